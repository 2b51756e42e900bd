//! Each record's partition, and partitions with no leader: asked after,
//! held, and let go.

use std::collections::HashSet;

use tokio::time::Instant;

use super::Publisher;
use crate::publish::ledgers::PartitionKey;
use crate::publish::outcome::Outcome;
use crate::publish::partitioner::partition_for;
use crate::publish::records::Entry;
use crate::publish::scan::LedgerScan;
use crate::publish::sink::{BrokerError, LocalBoxFuture, RecordId, Sink};
use crate::publish::topics::Readiness;

impl<S: Sink, T: Copy> Publisher<S, T> {
    /// The partition a waiting record goes to, or `None` while its topic
    /// holds it.
    pub(super) fn partition_of(&mut self, id: RecordId) -> Option<PartitionKey> {
        let entry = self.records.get(id).expect("waiting");
        let topic = entry.record.topic.clone();
        if self.records.held.topics.contains(&topic) {
            return None;
        }
        let partitions = match self.topics.readiness(&topic) {
            Readiness::Unknown => {
                self.prepare(&topic, true);
                self.records.held.topics.insert(topic);
                return None;
            }
            Readiness::Waiting => {
                self.records.held.topics.insert(topic);
                return None;
            }
            Readiness::Growing { .. } => {
                // Nothing of it may be in flight when keys move.
                if self.records.in_flight_to(&topic) {
                    self.records.held.topics.insert(topic);
                    return None;
                }
                self.topics.grown(&topic);
                return self.partition_of(id);
            }
            Readiness::Ready {
                partitions,
                refresh,
            } => {
                if refresh {
                    self.prepare(&topic, false);
                }
                partitions
            }
        };
        let entry = self.records.get(id).expect("waiting");
        let partition = self.pick_partition(entry, partitions);
        Some(PartitionKey { topic, partition })
    }

    /// Exactly once, walrelay picks the partition (as Java's partitioner
    /// does); otherwise librdkafka's murmur2_random does the same for keyed
    /// records (`None`: the sink picks).
    pub(super) fn pick_partition(&self, entry: &Entry<T>, partitions: i32) -> Option<i32> {
        match (&self.ledgers, entry.record.key.as_deref(), entry.position) {
            (Some(_), Some(key), _) => Some(partition_for(Some(key), None, partitions)),
            (Some(_), None, Some(position)) => {
                Some(partition_for(None, Some(&position), partitions))
            }
            _ => None,
        }
    }

    /// Reads a partition's tail again. Only a partition walrelay picked
    /// (exactly once) is ever scanned, so it has a number.
    pub(super) fn read_tail(
        &self,
        key: &PartitionKey,
        scan: LedgerScan,
    ) -> LocalBoxFuture<Result<LedgerScan, BrokerError>> {
        let partition = key
            .partition
            .expect("a scanned partition was picked by walrelay");
        self.sink.scan_tail(&key.topic, partition, scan)
    }

    /// Asks the sink which partitions have no leader, if it is time: those
    /// of records outstanding for a while, those the transaction touched,
    /// and those held.
    pub(super) fn ask_after_partitions(&mut self) {
        let due = self
            .offline
            .ask_at(self.records.oldest_outstanding())
            .is_some_and(|at| at <= Instant::now());
        if !due {
            return;
        }
        let mut asked = self.records.outstanding_partitions();
        asked.extend(self.txn.touched());
        asked.extend(self.offline.unread().cloned());
        asked.extend(self.offline.held().cloned());
        // Records whose partition the sink picks cannot be asked after;
        // without transactions they wait inside the producer anyway.
        asked.retain(|key| key.partition.is_some());
        self.offline.asking();
        if asked.is_empty() {
            self.offline.unanswered();
            return;
        }
        let numbered = asked
            .iter()
            .filter_map(|key| Some((key.topic.clone(), key.partition?)))
            .collect();
        let answer = self.sink.leaderless(numbered);
        self.io.watch_leaders(asked, answer);
    }

    /// Which partitions have no leader: hold their records (and rest a
    /// transactional id stuck on one); let go of those back.
    pub(super) fn on_asked(
        &mut self,
        asked: HashSet<PartitionKey>,
        result: Result<Vec<PartitionKey>, BrokerError>,
        outcomes: &mut Vec<Outcome<T>>,
    ) {
        let leaderless: HashSet<PartitionKey> = match result {
            Ok(leaderless) => leaderless.into_iter().collect(),
            Err(error) => {
                tracing::debug!(%error, "cannot ask which partitions have a leader");
                self.offline.unanswered();
                return;
            }
        };
        let (_, back) = self.offline.answered(&asked, &leaderless);
        if !back.is_empty() {
            self.txn.back(&back);
            // Read again before use: a transaction may have been left open
            // there while it had no leader.
            if let Some(ledgers) = self.ledgers.as_mut() {
                for key in &back {
                    ledgers.forget_partition(key);
                    self.cleaned.remove(key);
                }
            }
        }
        let held: HashSet<PartitionKey> = self.offline.held().cloned().collect();
        if let Some(next) = self.txn.leaderless(&held) {
            self.follow(next, outcomes);
        }
    }

    /// Whether every record in hand waits for a partition with no leader:
    /// nothing else is outstanding, so nothing else can make progress.
    pub fn waits_only_for_offline(&self) -> bool {
        if self.offline.is_empty()
            || self.records.len() == 0
            || self.records.sent() > 0
            || self.records.any_written()
        {
            return false;
        }
        self.records
            .waiting()
            .all(|entry| match self.topics.readiness(&entry.record.topic) {
                Readiness::Ready { partitions, .. } => {
                    let partition = self.pick_partition(entry, partitions);
                    self.offline.holds(&PartitionKey {
                        topic: entry.record.topic.clone(),
                        partition,
                    })
                }
                _ => false,
            })
    }
}
