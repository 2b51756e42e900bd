//! Exactly once: what each partition already holds (`scan.rs` explains
//! why that is enough). Pure bookkeeping: a partition is scanned on its
//! first use in a session, and this module only says when a scan is
//! needed and what it looks for; the publisher runs the scans.

use std::collections::HashMap;

use super::position::{Origin, Position};
use super::scan::{Ledger, LedgerScan, ScanRequest};
use crate::lsn::Lsn;
use crate::metrics as m;
use crate::timeline::TimelineHistory;

/// Own records from before the replay's start a scan of an event topic
/// must see when one producer keeps each partition in position order (the
/// WAL relay). The dead-letter topic's margin is the window: a refused
/// record's dead letter can land behind up to a window of later ones.
pub const MARGIN: usize = 100;

/// What scans of this session look for.
#[derive(Clone, Debug)]
pub struct Replay {
    pub origin: Origin,
    pub history: TimelineHistory,
    /// The slot's position this session started from.
    pub start: Lsn,
}

/// Scan settings that do not change.
#[derive(Clone, Debug)]
pub struct ScanSettings {
    pub lookback: usize,
    pub dead_letter_topic: String,
    /// The in-flight window, the dead-letter topic's margin.
    pub window: usize,
    /// Own records from before the start a scan of an event topic must
    /// see: how far out of position order they can be ([`MARGIN`] for one
    /// producer; the polling source's batches in flight at once).
    pub margin: usize,
}

/// A topic and one of its partitions: `None` where the sink's partitioner
/// picks it (at least once, a record with no key).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey {
    pub topic: String,
    pub partition: Option<i32>,
}

impl PartitionKey {
    /// One partition of `topic`.
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        PartitionKey {
            topic: topic.into(),
            partition: Some(partition),
        }
    }

    /// The partition as a metric label.
    pub fn label(&self) -> String {
        self.partition.map_or_else(String::new, |p| p.to_string())
    }
}

/// What a record for a partition may do now.
#[derive(Debug)]
pub enum Verdict {
    /// Go to the broker.
    Send,
    /// Already in the log: not sent again.
    Skip,
    /// Wait: the partition's tail is being read.
    Wait,
    /// Wait, and read the partition's tail with this scan first.
    Scan(Box<LedgerScan>),
}

pub struct PartitionLedgers {
    settings: ScanSettings,
    /// `None` while no session has started.
    replay: Option<Replay>,
    /// `None`: being scanned.
    known: HashMap<PartitionKey, Option<Ledger>>,
    /// Partitions whose tail was read unsure at least once (their events
    /// may be published twice): what the tests allow duplicates in.
    #[cfg(test)]
    pub unsure: std::collections::HashSet<PartitionKey>,
}

impl PartitionLedgers {
    pub fn new(settings: ScanSettings) -> Self {
        PartitionLedgers {
            settings,
            replay: None,
            known: HashMap::new(),
            #[cfg(test)]
            unsure: Default::default(),
        }
    }

    /// A session starts (nothing is in flight then). What was known of the
    /// partitions is dropped and each is scanned again on first use:
    /// another relay may have written to them since, or the history changed.
    pub fn begin(&mut self, replay: Replay) {
        self.known.clear();
        self.replay = Some(replay);
    }

    /// What a record at `position` for `key` may do.
    pub fn verdict(&mut self, key: &PartitionKey, position: &Position) -> Verdict {
        match self.known.get(key) {
            Some(Some(ledger)) if ledger.contains(position) => Verdict::Skip,
            Some(Some(_)) => Verdict::Send,
            Some(None) => Verdict::Wait,
            None => {
                self.known.insert(key.clone(), None);
                Verdict::Scan(Box::new(LedgerScan::new(self.request(&key.topic))))
            }
        }
    }

    fn request(&self, topic: &str) -> ScanRequest {
        let replay = self
            .replay
            .clone()
            .expect("records are published only while a session runs");
        ScanRequest {
            origin: replay.origin,
            history: replay.history,
            start: replay.start,
            margin: if topic == self.settings.dead_letter_topic {
                self.settings.window.max(self.settings.margin)
            } else {
                self.settings.margin
            },
            lookback: self.settings.lookback,
        }
    }

    /// Forgets what is known of `key`: its next record reads its tail again.
    pub fn forget_partition(&mut self, key: &PartitionKey) {
        self.known.remove(key);
    }

    /// A scan failed for a reason that passes (the broker is away): the
    /// partition's records wait, and it is read again with this scan.
    pub fn rescan(&self, key: &PartitionKey) -> LedgerScan {
        LedgerScan::new(self.request(&key.topic))
    }

    /// A scan finished (or failed for good): the partition's ledger is
    /// known.
    pub fn scanned(&mut self, key: PartitionKey, seconds: f64, result: Result<LedgerScan, String>) {
        let (topic, partition) = (&key.topic, key.partition);
        metrics::histogram!(m::PARTITION_RECOVERY_SECONDS).record(seconds);
        metrics::counter!(m::PARTITION_RECOVERIES_TOTAL).increment(1);
        let ledger = match result {
            Ok(scan) => {
                let read = scan.read();
                let (ledger, end) = scan.finish();
                tracing::debug!(
                    topic,
                    partition,
                    read,
                    present = ledger.len(),
                    seconds,
                    ?end,
                    "partition tail scanned"
                );
                if let Some(reason) = end.reason() {
                    #[cfg(test)]
                    self.unsure.insert(key.clone());
                    tracing::warn!(
                        topic,
                        partition,
                        read,
                        reason,
                        "the partition's tail could not be read to certainty: events not seen in it are published again (at least once)"
                    );
                    metrics::counter!(m::PARTITIONS_AT_LEAST_ONCE_TOTAL, "reason" => reason)
                        .increment(1);
                }
                ledger
            }
            Err(error) => {
                #[cfg(test)]
                self.unsure.insert(key.clone());
                tracing::warn!(topic, partition, %error, "the partition's tail cannot be read: its events are published again (at least once)");
                metrics::counter!(m::PARTITIONS_AT_LEAST_ONCE_TOTAL, "reason" => "unreadable")
                    .increment(1);
                Ledger::default()
            }
        };
        self.known.insert(key, Some(ledger));
    }

    /// Forgets a topic's partitions (its partition count changed): each
    /// is scanned again on first use.
    pub fn forget_topic(&mut self, topic: &str) {
        self.known
            .retain(|key, ledger| key.topic != topic || ledger.is_none());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::scan::TailRecord;

    fn ledgers() -> PartitionLedgers {
        let mut l = PartitionLedgers::new(ScanSettings {
            lookback: 1000,
            dead_letter_topic: "dlq".into(),
            window: 500,
            margin: MARGIN,
        });
        l.begin(Replay {
            origin: Origin::parse("7/walrelay/1").unwrap(),
            history: TimelineHistory::new(1),
            start: Lsn(0x100),
        });
        l
    }

    fn pos(commit: u64) -> Position {
        Position {
            commit: Lsn(commit),
            change: Lsn(commit),
            rank: 0,
        }
    }

    #[test]
    fn a_partition_is_scanned_once_then_skips_exactly_what_it_holds() {
        let mut l = ledgers();
        let key = PartitionKey::new("t", 0);
        let Verdict::Scan(mut scan) = l.verdict(&key, &pos(0x200)) else {
            panic!("the first record of a partition asks for a scan");
        };
        assert!(matches!(l.verdict(&key, &pos(0x300)), Verdict::Wait));
        scan.push(&TailRecord {
            offset: 0,
            origin: Some("7/walrelay/1".into()),
            position: Some(pos(0x200).to_string()),
        });
        l.scanned(key.clone(), 0.01, Ok(*scan));
        assert!(matches!(l.verdict(&key, &pos(0x200)), Verdict::Skip));
        assert!(matches!(l.verdict(&key, &pos(0x300)), Verdict::Send));
        l.forget_topic("t");
        assert!(matches!(l.verdict(&key, &pos(0x300)), Verdict::Scan(_)));
    }

    #[test]
    fn the_dead_letter_topic_looks_a_window_further_back() {
        let l = ledgers();
        assert_eq!(l.request("dlq").margin, 500);
        assert_eq!(l.request("t").margin, MARGIN);
    }
}
