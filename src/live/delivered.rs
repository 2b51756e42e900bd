//! Counting what the broker has for good, in Prometheus and in the live
//! state alike, with the metric handles looked up once.

use crate::metrics as m;

/// Counts records the broker has for good, in the metrics and the live
/// state: published (with its commit-to-ack latency) or dead-lettered.
/// Holds the metric handles, so a record costs no registry lookup.
pub struct Delivered {
    published: std::collections::HashMap<String, metrics::Counter>,
    commit_to_ack: metrics::Histogram,
    last_ack: metrics::Gauge,
}

impl Default for Delivered {
    fn default() -> Self {
        Delivered {
            published: std::collections::HashMap::new(),
            commit_to_ack: metrics::histogram!(m::COMMIT_TO_ACK_SECONDS),
            last_ack: metrics::gauge!(m::LAST_ACK_TIMESTAMP_SECONDS),
        }
    }
}

impl Delivered {
    pub fn count(
        &mut self,
        live: &super::LiveState,
        topic: &str,
        created: crate::timestamp::PgTimestamp,
        dead_letter: bool,
    ) {
        use std::sync::atomic::Ordering;
        let now = crate::timestamp::PgTimestamp::now();
        if dead_letter {
            live.counters.dead_letters.fetch_add(1, Ordering::Relaxed);
        } else {
            let latency = (now.0 - created.0).max(0) as f64 / 1e6;
            match self.published.get(topic) {
                Some(counter) => counter.increment(1),
                None => {
                    let counter =
                        metrics::counter!(m::EVENTS_PUBLISHED_TOTAL, "topic" => topic.to_owned());
                    counter.increment(1);
                    self.published.insert(topic.to_owned(), counter);
                }
            }
            live.counters
                .events_delivered
                .fetch_add(1, Ordering::Relaxed);
            self.commit_to_ack.record(latency);
            live.latency.record(latency);
            live.latency_histogram.record(latency);
        }
        self.last_ack.set(now.unix_micros() as f64 / 1e6);
        live.record_ack();
    }
}
