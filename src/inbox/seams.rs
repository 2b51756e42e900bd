//! What the consumer loop asks of Kafka and of PostgreSQL, as two traits:
//! implemented by librdkafka's consumer and by [`Store`] for `walrelay
//! inbox`, and by in-memory stand-ins for the in-process tests
//! (`memory.rs`).

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Headers, Message};

use super::context::{Assignment, InboxContext};
use super::incoming::Incoming;
use super::store::{Store, StoreError, StoredOffset, TopicPartition, Written};
use crate::kafka::topic_id;

/// The Kafka consumer, as the loop and the rebalance callbacks (which run
/// inside its `poll`) use it.
pub trait InboxConsumer: Assignment {
    /// The next record, or an error, or nothing within `wait`. The
    /// rebalance callbacks run in here, on the caller's thread.
    fn poll(&self, wait: Duration) -> Option<KafkaResult<Incoming>>;
    /// Moves each partition to its offset; returns the list with an error
    /// on each partition that could not be moved (or leaves it out).
    fn seek_partitions(
        &self,
        partitions: TopicPartitionList,
        timeout: Duration,
    ) -> KafkaResult<TopicPartitionList>;
    fn resume(&self, partitions: &TopicPartitionList) -> KafkaResult<()>;
    /// Leaves the group (the partitions are revoked).
    fn unsubscribe(&self);
    /// What the loop and the rebalance callbacks share.
    fn context(&self) -> &InboxContext;
    /// Each topic's id (KIP-516), `None` when the broker keeps none; an
    /// error for a topic it could not describe. Blocks up to `timeout`;
    /// never creates a topic.
    fn topic_ids(
        &self,
        topics: &[&str],
        timeout: Duration,
    ) -> KafkaResult<HashMap<String, KafkaResult<Option<String>>>>;
    /// The partition's log now: its first offset and the offset its next
    /// record will get (low and high watermarks). Blocks up to `timeout`.
    fn log_bounds(&self, tp: &TopicPartition, timeout: Duration) -> KafkaResult<(i64, i64)>;
}

impl InboxConsumer for BaseConsumer<InboxContext> {
    fn poll(&self, wait: Duration) -> Option<KafkaResult<Incoming>> {
        BaseConsumer::poll(self, wait).map(|m| m.map(|m| incoming(&m)))
    }

    fn seek_partitions(
        &self,
        partitions: TopicPartitionList,
        timeout: Duration,
    ) -> KafkaResult<TopicPartitionList> {
        Consumer::seek_partitions(self, partitions, timeout)
    }

    fn resume(&self, partitions: &TopicPartitionList) -> KafkaResult<()> {
        Consumer::resume(self, partitions)
    }

    fn unsubscribe(&self) {
        Consumer::unsubscribe(self);
    }

    fn context(&self) -> &InboxContext {
        Consumer::context(self)
    }

    fn topic_ids(
        &self,
        topics: &[&str],
        timeout: Duration,
    ) -> KafkaResult<HashMap<String, KafkaResult<Option<String>>>> {
        topic_id::topic_ids(self.client(), topics, timeout)
    }

    fn log_bounds(&self, tp: &TopicPartition, timeout: Duration) -> KafkaResult<(i64, i64)> {
        Consumer::fetch_watermarks(self, &tp.0, tp.1, timeout)
    }
}

impl Assignment for BaseConsumer<InboxContext> {
    fn pause(&self, partitions: &TopicPartitionList) -> KafkaResult<()> {
        Consumer::pause(self, partitions)
    }

    fn assign(&self, partitions: &TopicPartitionList, cooperative: bool) -> KafkaResult<()> {
        if cooperative {
            self.incremental_assign(partitions)
        } else {
            Consumer::assign(self, partitions)
        }
    }

    fn unassign(&self, partitions: &TopicPartitionList, cooperative: bool) -> KafkaResult<()> {
        if cooperative {
            self.incremental_unassign(partitions)
        } else {
            Consumer::unassign(self)
        }
    }
}

fn incoming<M: Message>(message: &M) -> Incoming {
    Incoming {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        headers: message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default(),
        payload: message.payload().map(<[u8]>::to_vec),
        timestamp_ms: message.timestamp().to_millis(),
    }
}

/// Where the inbox's rows and offsets are kept: PostgreSQL ([`Store`]).
pub trait InboxStore {
    /// The stored next offset (and topic id) of each of these partitions
    /// that has one.
    fn offsets(
        &self,
        partitions: &[TopicPartition],
    ) -> impl Future<Output = Result<HashMap<TopicPartition, StoredOffset>, StoreError>>;
    /// Stores a batch and each partition's next offset with its topic id
    /// (when known), all or nothing.
    fn write(
        &mut self,
        batch: &[Incoming],
        topic_ids: &HashMap<TopicPartition, String>,
    ) -> impl Future<Output = Result<Written, StoreError>>;
    /// Moves a partition's stored offset to `to` if it is still `from`
    /// (its topic was made again); returns whether it did.
    fn reset(
        &mut self,
        tp: &TopicPartition,
        from: &StoredOffset,
        to: &StoredOffset,
    ) -> impl Future<Output = Result<bool, StoreError>>;
    /// A fresh connection after a failure.
    fn reconnect(&mut self) -> impl Future<Output = Result<(), StoreError>>;
}

impl InboxStore for Store {
    async fn offsets(
        &self,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, StoredOffset>, StoreError> {
        Ok(Store::offsets(self, partitions).await?)
    }

    async fn write(
        &mut self,
        batch: &[Incoming],
        topic_ids: &HashMap<TopicPartition, String>,
    ) -> Result<Written, StoreError> {
        Ok(Store::write(self, batch, topic_ids).await?)
    }

    async fn reset(
        &mut self,
        tp: &TopicPartition,
        from: &StoredOffset,
        to: &StoredOffset,
    ) -> Result<bool, StoreError> {
        Ok(Store::reset(self, tp, from, to).await?)
    }

    async fn reconnect(&mut self) -> Result<(), StoreError> {
        Store::reconnect(self).await
    }
}
