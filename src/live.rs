//! The relay's live state, shared with the HTTP endpoints (`/readyz`, the
//! dashboard): whether it streams and from which host, what it confirmed,
//! the last error. Written by the relay and the slot monitor, read by the
//! HTTP server; the relay never reads it back to decide anything.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub use crate::catalog::SlotSnapshot;
use crate::lsn::Lsn;

/// Where the events come from (or, for the inbox, go).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `run`: the replication slot.
    #[default]
    Wal,
    /// `run --source poll`: the outbox table, polled.
    Poll,
    /// `inbox`: Kafka into an inbox table.
    Inbox,
}

/// One reading of the outbox table's backlog (the polling source).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Backlog {
    /// Rows not yet published.
    pub pending_rows: i64,
    /// Of those, rows that failed at least once.
    pub failing_rows: i64,
    /// Age of the oldest row not yet published.
    pub oldest_pending_seconds: Option<f64>,
}

/// The inbox's view of its group: what it holds and how far behind.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct InboxSnapshot {
    pub group: String,
    pub partitions: Vec<InboxPartition>,
    /// Records skipped since start because their id was already stored.
    pub duplicates: u64,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct InboxPartition {
    pub topic: String,
    pub partition: i32,
    /// The next offset to consume; `None` before the first record.
    pub next_offset: Option<i64>,
    /// Records behind the partition's high watermark.
    pub lag: Option<i64>,
}

/// What this relay instance is doing with its slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Not streaming yet, or reconnecting after an error.
    Starting,
    /// Streaming from the slot.
    Active,
    /// Another process holds the slot; this one waits to take over.
    Standby,
}

#[derive(Debug)]
pub struct LiveState {
    connected: AtomicBool,
    role: Mutex<Role>,
    /// The PostgreSQL host streaming, while connected.
    host: Mutex<Option<String>>,
    /// The relay let go of the slot because the broker does not answer.
    waiting_for_broker: AtomicBool,
    confirmed: AtomicU64,
    last_ack_unix_micros: AtomicU64,
    last_error: Mutex<Option<String>>,
    slot: Mutex<Option<SlotSnapshot>>,
    source: Source,
    backlog: Mutex<Option<Backlog>>,
    /// The inbox's consumer lag, summed over its partitions.
    consumer_lag: Mutex<Option<i64>>,
    inbox: Mutex<Option<InboxSnapshot>>,
    pub counters: LiveCounters,
    pub latency: LatencyWindow,
    /// Every commit-to-ack latency since start.
    pub latency_histogram: LatencyHistogram,
    pub history: History,
}

impl Default for LiveState {
    fn default() -> Self {
        LiveState {
            connected: AtomicBool::new(false),
            role: Mutex::new(Role::Starting),
            host: Mutex::new(None),
            waiting_for_broker: AtomicBool::new(false),
            confirmed: AtomicU64::new(0),
            last_ack_unix_micros: AtomicU64::new(0),
            last_error: Mutex::new(None),
            slot: Mutex::new(None),
            source: Source::Wal,
            backlog: Mutex::new(None),
            consumer_lag: Mutex::new(None),
            inbox: Mutex::new(None),
            counters: LiveCounters::default(),
            latency: LatencyWindow::default(),
            latency_histogram: LatencyHistogram::default(),
            history: History::default(),
        }
    }
}

impl LiveState {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_source(source: Source) -> Self {
        LiveState {
            source,
            ..Self::default()
        }
    }

    pub fn source(&self) -> Source {
        self.source
    }

    pub fn set_backlog(&self, backlog: Option<Backlog>) {
        *self.backlog.lock().unwrap_or_else(|e| e.into_inner()) = backlog;
    }

    pub fn backlog(&self) -> Option<Backlog> {
        self.backlog
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_inbox(&self, inbox: Option<InboxSnapshot>) {
        *self.inbox.lock().unwrap_or_else(|e| e.into_inner()) = inbox;
    }

    pub fn inbox(&self) -> Option<InboxSnapshot> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_consumer_lag(&self, lag: Option<i64>) {
        *self.consumer_lag.lock().unwrap_or_else(|e| e.into_inner()) = lag;
    }

    pub fn consumer_lag(&self) -> Option<i64> {
        *self.consumer_lag.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a point to the dashboard's history, from the latest readings.
    pub fn record_sample(&self) {
        let slot = self.slot();
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.history.push(Sample {
            unix_ms,
            lag_bytes: slot.as_ref().and_then(|s| s.lag_bytes),
            retained_wal_bytes: slot.as_ref().and_then(|s| s.retained_wal_bytes),
            pending_rows: self.backlog().map(|b| b.pending_rows),
            consumer_lag: self.consumer_lag(),
            events_published: self.counters.events_published.load(Ordering::Relaxed),
            in_flight: self.counters.in_flight.load(Ordering::Relaxed),
            p99_commit_to_ack_ms: self.latency.quantile(0.99).map(|s| s * 1000.0),
        });
    }

    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
        if connected {
            self.set_role(Role::Active);
        }
    }

    pub fn set_role(&self, role: Role) {
        *self.role.lock().unwrap_or_else(|e| e.into_inner()) = role;
    }

    pub fn role(&self) -> Role {
        *self.role.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_waiting_for_broker(&self, waiting: bool) {
        self.waiting_for_broker.store(waiting, Ordering::Relaxed);
    }

    pub fn waiting_for_broker(&self) -> bool {
        self.waiting_for_broker.load(Ordering::Relaxed)
    }

    /// Why the relay is not streaming, for people: `None` while it streams.
    pub fn reason(&self) -> Option<String> {
        if self.source == Source::Poll && self.waiting_for_broker() {
            return Some("waiting for the broker: nothing was acknowledged for --broker-stall-timeout, so walrelay rolled its claim back (the rows stay in the table); it polls again once the broker answers".to_owned());
        }
        if self.connected() {
            return None;
        }
        Some(match self.role() {
            Role::Standby => "standing by: another relay holds the slot".to_owned(),
            _ if self.waiting_for_broker() => {
                "waiting for the broker: nothing was acknowledged for --broker-stall-timeout, so walrelay let go of the slot (PostgreSQL is not held); it streams again once the broker answers".to_owned()
            }
            _ => match self.last_error() {
                Some(error) => format!("reconnecting after: {error}"),
                None => "starting".to_owned(),
            },
        })
    }

    pub fn set_host(&self, host: Option<String>) {
        *self.host.lock().unwrap_or_else(|e| e.into_inner()) = host;
    }

    /// The PostgreSQL host streaming, while connected.
    pub fn host(&self) -> Option<String> {
        self.host.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn set_confirmed(&self, lsn: Lsn) {
        self.confirmed.store(lsn.0, Ordering::Relaxed);
    }

    pub fn confirmed(&self) -> Lsn {
        Lsn(self.confirmed.load(Ordering::Relaxed))
    }

    pub fn record_ack(&self) {
        let now = crate::pgoutput::PgTimestamp::now().unix_micros();
        self.last_ack_unix_micros
            .store(now.max(0) as u64, Ordering::Relaxed);
    }

    /// Unix time in microseconds of the last acknowledged event (0: none yet).
    pub fn last_ack_unix_micros(&self) -> u64 {
        self.last_ack_unix_micros.load(Ordering::Relaxed)
    }

    pub fn set_last_error(&self, error: &str) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_owned());
    }

    pub fn set_slot(&self, slot: Option<SlotSnapshot>) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = slot;
    }

    pub fn slot(&self) -> Option<SlotSnapshot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A point of the dashboard's history.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Sample {
    pub unix_ms: u64,
    pub lag_bytes: Option<i64>,
    pub retained_wal_bytes: Option<i64>,
    /// The polling source's rows not yet published.
    pub pending_rows: Option<i64>,
    /// The inbox's consumer lag.
    pub consumer_lag: Option<i64>,
    pub events_published: u64,
    pub in_flight: u64,
    pub p99_commit_to_ack_ms: Option<f64>,
}

/// Live counters the dashboard reads (Prometheus gets the same through the
/// `metrics` crate; these are for the page and `/readyz`).
#[derive(Debug, Default)]
pub struct LiveCounters {
    pub events_published: AtomicU64,
    pub events_skipped: AtomicU64,
    pub dead_letters: AtomicU64,
    pub in_flight: AtomicU64,
    pub reconnects: AtomicU64,
    pub broker_reachable: AtomicBool,
    pub monitor_errors: AtomicU64,
}

/// Recent commit-to-ack latencies, for the dashboard's percentiles.
#[derive(Debug, Default)]
pub struct LatencyWindow {
    samples: Mutex<std::collections::VecDeque<f64>>,
}

impl LatencyWindow {
    const CAPACITY: usize = 4096;

    pub fn record(&self, seconds: f64) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() == Self::CAPACITY {
            samples.pop_front();
        }
        samples.push_back(seconds);
    }

    /// The q-quantile (0..=1) of the recent latencies, in seconds.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.is_empty() {
            return None;
        }
        let mut sorted: Vec<f64> = samples.iter().copied().collect();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let index = ((sorted.len() - 1) as f64 * q).round() as usize;
        Some(sorted[index])
    }
}

/// The dashboard's ring of samples.
#[derive(Debug, Default)]
pub struct History {
    samples: Mutex<std::collections::VecDeque<Sample>>,
}

impl History {
    /// Ten minutes at one sample every two seconds.
    const CAPACITY: usize = 300;

    pub fn push(&self, sample: Sample) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() == Self::CAPACITY {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    pub fn snapshot(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// Commit-to-ack latencies over the whole run, in log-linear buckets (16
/// per power of two, so any quantile is within about 6%), for benchmarks
/// and the dashboard. Lock-free; fixed size.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    max_micros: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: (0..Self::BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            max_micros: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    const SUB: u64 = 16;
    const BUCKETS: usize = 64 * 16;

    fn index(micros: u64) -> usize {
        if micros < Self::SUB {
            return micros as usize;
        }
        let power = 63 - u64::from(micros.leading_zeros());
        let shift = power - 4;
        let mantissa = (micros >> shift) & (Self::SUB - 1);
        ((power - 3) * Self::SUB + mantissa) as usize
    }

    /// The smallest value of a bucket.
    fn lower_bound(index: usize) -> u64 {
        let index = index as u64;
        if index < Self::SUB {
            return index;
        }
        let power = index / Self::SUB + 3;
        let mantissa = index % Self::SUB;
        (Self::SUB + mantissa) << (power - 4)
    }

    pub fn record(&self, seconds: f64) {
        let micros = (seconds * 1e6).max(0.0) as u64;
        self.buckets[Self::index(micros).min(Self::BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.max_micros.fetch_max(micros, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn max_seconds(&self) -> f64 {
        self.max_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// The q-quantile (0..=1) in seconds, `None` before the first value.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = ((count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            seen += bucket.load(Ordering::Relaxed);
            if seen >= rank {
                // The bucket's midpoint.
                let low = Self::lower_bound(i);
                let high = Self::lower_bound(i + 1).max(low + 1);
                return Some((low + high) as f64 / 2.0 / 1e6);
            }
        }
        Some(self.max_seconds())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_within_a_few_percent() {
        let h = LatencyHistogram::default();
        for ms in 1..=1000 {
            h.record(ms as f64 / 1000.0);
        }
        let p50 = h.quantile(0.5).unwrap();
        let p99 = h.quantile(0.99).unwrap();
        assert!((p50 - 0.5).abs() / 0.5 < 0.07, "p50 {p50}");
        assert!((p99 - 0.99).abs() / 0.99 < 0.07, "p99 {p99}");
        assert_eq!(h.count(), 1000);
        assert_eq!(h.max_seconds(), 1.0);
        assert_eq!(LatencyHistogram::default().quantile(0.5), None);
    }

    #[test]
    fn histogram_buckets_are_ordered_and_cover_their_values() {
        for micros in [0u64, 1, 15, 16, 17, 100, 1000, 123_456, 10_000_000] {
            let i = LatencyHistogram::index(micros);
            assert!(LatencyHistogram::lower_bound(i) <= micros, "{micros}");
            assert!(LatencyHistogram::lower_bound(i + 1) > micros, "{micros}");
        }
    }
}
