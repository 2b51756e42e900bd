//! The inbox's counters, in Prometheus and on the dashboard: every series
//! exported from zero when the command starts, and what a stored batch
//! adds. The inbox owns them, so the HTTP server only serves them.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::incoming::{DeadLetterKind, Incoming};
use super::store::Written;
use crate::live::LiveState;
use crate::metrics as m;

/// Exports the inbox's counters at zero, for each label value they take,
/// so a scrape shows every series the dashboards use from the start.
pub fn export_from_zero() {
    metrics::counter!(m::INBOX_RECORDS_CONSUMED_TOTAL).absolute(0);
    metrics::counter!(m::INBOX_RECORDS_STORED_TOTAL).absolute(0);
    metrics::counter!(m::INBOX_DUPLICATES_SKIPPED_TOTAL).absolute(0);
    metrics::counter!(m::INBOX_TOPIC_RESETS_TOTAL).absolute(0);
    for kind in DeadLetterKind::ALL {
        metrics::counter!(m::INBOX_DEAD_LETTERS_TOTAL, "kind" => kind.as_str()).absolute(0);
    }
}

/// Counts a stored batch on the metrics and the dashboard.
pub(super) fn count(live: &LiveState, batch: &[Incoming], written: &Written, started: Instant) {
    metrics::counter!(m::INBOX_RECORDS_STORED_TOTAL).increment(written.stored);
    metrics::counter!(m::INBOX_DUPLICATES_SKIPPED_TOTAL).increment(written.duplicates);
    metrics::histogram!(m::INBOX_BATCH_SECONDS).record(started.elapsed().as_secs_f64());
    let counters = &live.counters;
    counters
        .events_delivered
        .fetch_add(written.stored, Ordering::Relaxed);
    for (kind, reason) in &written.dead_letters {
        metrics::counter!(m::INBOX_DEAD_LETTERS_TOTAL, "kind" => kind.as_str()).increment(1);
        counters.dead_letters.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            kind = kind.as_str(),
            reason,
            "a record went to the dead-letter table"
        );
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    for produced in &written.stored_timestamps_ms {
        let seconds = (now_ms - produced).max(0) as f64 / 1000.0;
        metrics::histogram!(m::INBOX_PRODUCED_TO_STORED_SECONDS).record(seconds);
        live.latency.record(seconds);
        live.latency_histogram.record(seconds);
    }
    if written.stored > 0 {
        live.record_ack();
    }
    tracing::debug!(
        records = batch.len(),
        stored = written.stored,
        duplicates = written.duplicates,
        "batch stored"
    );
}
