//! The consumer's librdkafka context: what its callbacks (run inside
//! `poll`, on the consumer's own thread) see, and the dashboard's view of
//! it.
//!
//! The rebalance callback only records what happened: it does no
//! PostgreSQL I/O and never waits. A partition assigned is paused and left
//! unplaced for the loop, which reads its stored offset, seeks there and
//! resumes it; a partition revoked is forgotten with the records in hand
//! for it (the next owner reads them again from the stored offset).

use std::sync::{Arc, Mutex, MutexGuard};

use rdkafka::TopicPartitionList;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;

use super::incoming::Incoming;
use super::positions::Positions;
use super::store::TopicPartition;
use crate::live::{InboxPartition, InboxSnapshot, LiveState};
use crate::metrics as m;

/// What a rebalance does to a consumer's assignment: librdkafka's
/// consumer, or the tests' in-memory one.
pub trait Assignment {
    /// Takes the partitions on (added to the assignment when
    /// `cooperative`, replacing it when eager).
    fn assign(&self, partitions: &TopicPartitionList, cooperative: bool) -> KafkaResult<()>;
    /// Gives the partitions up (all of them when eager).
    fn unassign(&self, partitions: &TopicPartitionList, cooperative: bool) -> KafkaResult<()>;
    /// Stops fetching them until resumed.
    fn pause(&self, partitions: &TopicPartitionList) -> KafkaResult<()>;
}

/// What the loop and the callbacks share: small, in memory, and never
/// locked across I/O. (The callbacks run on the loop's thread, so the
/// lock is not contended; it is there because the context is `Sync`.)
#[derive(Default)]
pub struct Shared {
    pub positions: Positions,
    /// Records taken and not yet stored, of placed partitions only.
    pub batch: Vec<Incoming>,
    /// Records skipped since start because their id was already stored.
    pub duplicates: u64,
}

pub struct InboxContext {
    shared: Mutex<Shared>,
    live: Arc<LiveState>,
    group: String,
}

impl InboxContext {
    pub fn new(live: Arc<LiveState>, group: String) -> Self {
        InboxContext {
            shared: Mutex::new(Shared::default()),
            live,
            group,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Consumer lag per partition, for the gauge and the dashboard.
    pub fn publish_snapshot(&self) {
        let shared = self.lock();
        let mut partitions: Vec<InboxPartition> = shared
            .positions
            .iter()
            .map(|((topic, partition), p)| {
                let lag = match (p.high_watermark, p.next) {
                    (Some(high), Some(next)) => Some((high - next).max(0)),
                    (Some(high), None) => Some(high.max(0)),
                    _ => None,
                };
                metrics::gauge!(m::INBOX_CONSUMER_LAG_RECORDS, "topic" => topic.clone(), "partition" => partition.to_string())
                    .set(lag.unwrap_or(0) as f64);
                InboxPartition {
                    topic: topic.clone(),
                    partition: *partition,
                    next_offset: p.next,
                    lag,
                }
            })
            .collect();
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        let total = partitions.iter().filter_map(|p| p.lag).sum::<i64>();
        self.live.set_consumer_lag(Some(total));
        self.live.set_inbox(Some(InboxSnapshot {
            group: self.group.clone(),
            partitions,
            duplicates: shared.duplicates,
        }));
        self.live.record_in_flight(
            shared.batch.len(),
            shared
                .batch
                .iter()
                .map(|r| {
                    r.key.as_ref().map_or(0, Vec::len) + r.payload.as_ref().map_or(0, Vec::len)
                })
                .sum(),
        );
    }

    /// A rebalance of the group, as librdkafka's callback (or the tests'
    /// in-memory consumer, inside its `poll` likewise) reports it.
    pub fn rebalanced<C: Assignment>(
        &self,
        consumer: &C,
        event: Rebalance,
        cooperative: bool,
        tpl: &TopicPartitionList,
    ) {
        let partitions: Vec<TopicPartition> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        metrics::counter!(m::INBOX_REBALANCES_TOTAL).increment(1);
        let result = match event {
            Rebalance::Assign => self.assigned(consumer, cooperative, tpl, &partitions),
            Rebalance::Revoke => self.revoked(consumer, cooperative, tpl, &partitions),
            Rebalance::Failed(other) => {
                tracing::warn!(error = ?other, "rebalance failed; giving up the assignment");
                let mut shared = self.lock();
                shared.positions.clear();
                shared.batch.clear();
                drop(shared);
                consumer.unassign(tpl, false)
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot apply the group's assignment");
        }
        self.publish_snapshot();
    }

    /// Partitions just assigned: assigned, paused, and unplaced until the
    /// loop has read where each starts.
    fn assigned<C: Assignment>(
        &self,
        consumer: &C,
        cooperative: bool,
        tpl: &TopicPartitionList,
        partitions: &[TopicPartition],
    ) -> Result<(), KafkaError> {
        consumer.assign(tpl, cooperative)?;
        // Nothing is fetched for them until they are placed (what is
        // fetched anyway would be dropped).
        if let Err(e) = consumer.pause(tpl) {
            tracing::warn!(error = %e, "cannot pause the partitions assigned; what arrives for them before they are placed is dropped");
        }
        let mut shared = self.lock();
        for tp in partitions {
            shared.positions.assign(tp.clone());
        }
        // Read again from the stored offset, like everything after it.
        shared
            .batch
            .retain(|r| !partitions.contains(&(r.topic.clone(), r.partition)));
        drop(shared);
        tracing::info!(partitions = ?partitions, "partitions assigned; each resumes at its stored offset");
        Ok(())
    }

    /// Partitions given up: forgotten, with the records in hand for them
    /// (never stored, so the next owner reads them again from the stored
    /// offset: a re-read, not a duplicate).
    fn revoked<C: Assignment>(
        &self,
        consumer: &C,
        cooperative: bool,
        tpl: &TopicPartitionList,
        partitions: &[TopicPartition],
    ) -> Result<(), KafkaError> {
        let mut shared = self.lock();
        for tp in partitions {
            shared.positions.remove(tp);
        }
        let before = shared.batch.len();
        shared
            .batch
            .retain(|r| !partitions.contains(&(r.topic.clone(), r.partition)));
        let dropped = before - shared.batch.len();
        drop(shared);
        tracing::info!(partitions = ?partitions, dropped, "partitions revoked; the records in hand for them are left to the next owner");
        consumer.unassign(tpl, cooperative)
    }
}

/// What a rebalance callback is told.
#[derive(Clone, Copy, Debug)]
pub enum Rebalance {
    Assign,
    Revoke,
    /// The rebalance failed (librdkafka's error): the assignment is given
    /// up.
    Failed(RDKafkaRespErr),
}

impl ClientContext for InboxContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "Kafka consumer");
        self.live.set_last_error(&format!("Kafka: {reason}"));
    }

    fn stats(&self, statistics: Statistics) {
        let mut shared = self.lock();
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if p.hi_offset >= 0 {
                    shared
                        .positions
                        .set_high_watermark(&(topic.clone(), *partition), p.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for InboxContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let event = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke,
            other => Rebalance::Failed(other),
        };
        self.rebalanced(consumer, event, cooperative, tpl);
    }
}

/// The partitions as a list for librdkafka's calls.
pub fn partition_list(partitions: &[TopicPartition]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (topic, partition) in partitions {
        tpl.add_partition(topic, *partition);
    }
    tpl
}
