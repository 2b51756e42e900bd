//! What sources and the publisher say to each other: the records handed
//! over ([`Outgoing`]), what became of them ([`Outcome`]), and how the
//! publisher is set up.

use std::time::Duration;

use super::error::RefusalKind;
use super::ledgers::ScanSettings;
use super::position::Position;
use super::sink::BrokerError;
use crate::record::KafkaRecord;

/// A record a source hands over, with what the source needs back.
#[derive(Debug)]
pub struct Outgoing<T> {
    pub record: KafkaRecord,
    pub tag: T,
    /// Exactly once: where the event is in its source.
    pub position: Option<Position>,
    /// The record is a dead letter.
    pub dead_letter: bool,
}

/// What became of a record.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome<T> {
    /// In Kafka for good (its transaction committed, with a transactional
    /// sink).
    Delivered {
        tag: T,
        topic: String,
        dead_letter: bool,
    },
    /// Already in its partition (exactly once): not sent again.
    Skipped { tag: T },
    /// The broker will never take it (too large, invalid): the source keeps
    /// it whole somewhere durable, then may send its dead letter.
    Refused {
        tag: T,
        record: KafkaRecord,
        error: BrokerError,
        kind: RefusalKind,
        dead_letter: bool,
    },
    /// Its topic cannot be used and someone must fix that
    /// ([`TopicFailures::FailRecords`]).
    Failed { tag: T, error: String },
}

/// What a topic that cannot be used (missing under --no-create-topics,
/// not creatable) means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopicFailures {
    /// The source stops with the fix ([`PublishError::Topic`]).
    Stop,
    /// Each waiting record fails on its own ([`Outcome::Failed`]): a polled
    /// row can wait for its next attempt while others go on.
    FailRecords,
}

/// What a source promises about duplicates (`--delivery`), the same for
/// both sources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryGuarantee {
    /// Every event once in Kafka: records carry their position and origin,
    /// and a restarted relay skips what a partition already holds.
    ExactlyOnce,
    /// Every event at least once: a restart may publish again what was
    /// not yet confirmed to PostgreSQL (or its row deleted).
    AtLeastOnce,
}

impl DeliveryGuarantee {
    pub fn is_exactly_once(self) -> bool {
        self == DeliveryGuarantee::ExactlyOnce
    }

    /// The flag's value, as metrics and the dashboard show it.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryGuarantee::ExactlyOnce => "exactly-once",
            DeliveryGuarantee::AtLeastOnce => "at-least-once",
        }
    }
}

/// How the publisher works.
#[derive(Clone, Debug)]
pub struct PublisherConfig {
    pub dead_letter_topic: String,
    pub topic_failures: TopicFailures,
    /// Exactly once: walrelay picks partitions and reads their tails.
    pub exactly_once: Option<ScanSettings>,
}

/// Capped exponential backoff with full jitter, starting at 250 ms.
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(250).saturating_mul(1 << attempt.min(16));
    let capped = base.min(max);
    let jitter = rand::random_range(0.5..=1.0);
    capped.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let max = Duration::from_secs(30);
        assert!(backoff(1, max) <= Duration::from_millis(500));
        assert!(backoff(1, max) >= Duration::from_millis(250));
        assert!(backoff(20, max) <= max);
        assert!(backoff(20, max) >= max / 2);
    }
}
