//! The event ids some topics already hold, read back as a `read_committed`
//! consumer sees them: a record of an aborted transaction (a run killed
//! mid-transaction) is not there, so it is sent again.
//!
//! Each partition is read from the first record at or after a time to its
//! end. The time comes from the caller, with a margin: a record's
//! timestamp is set when it is produced, after the row was written.

use std::collections::HashSet;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

const TIMEOUT: Duration = Duration::from_secs(30);

/// The `id` headers of records in `topics` since `since_ms` (Unix
/// milliseconds); with `origin`, only of records carrying that
/// `walrelay_origin`. A topic that does not exist holds nothing.
pub fn ids_since(
    producer: &ClientConfig,
    topics: &[String],
    since_ms: i64,
    origin: Option<&str>,
) -> Result<HashSet<String>, KafkaError> {
    let consumer = read_back_consumer(producer)?;
    let mut ids = HashSet::new();
    for topic in topics {
        read_topic(&consumer, topic, since_ms, origin, &mut ids)?;
    }
    Ok(ids)
}

/// Partitions of `topics` that may have lost records from `since_ms` on
/// (their log starts past offset 0, and no record kept there is older
/// than the time): retention or a deletion removed what a read back would
/// need to see, so events found missing may be in Kafka's past already.
/// Each as `topic/partition (log starts at offset N)`.
pub fn not_kept_since(
    producer: &ClientConfig,
    topics: &[String],
    since_ms: i64,
) -> Result<Vec<String>, KafkaError> {
    let consumer = read_back_consumer(producer)?;
    let mut not_kept = Vec::new();
    for topic in topics {
        let mut wanted = TopicPartitionList::new();
        let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
        for t in metadata.topics() {
            if t.error().is_some() {
                continue;
            }
            for p in t.partitions() {
                wanted.add_partition_offset(topic, p.id(), Offset::Offset(since_ms))?;
            }
        }
        if wanted.count() == 0 {
            continue;
        }
        let found = consumer.offsets_for_times(wanted, TIMEOUT)?;
        for element in found.elements() {
            let (low, high) = consumer.fetch_watermarks(topic, element.partition(), TIMEOUT)?;
            if low == 0 {
                continue;
            }
            // The first record at or after the time is the first kept (or
            // none is kept at all): what came before may have been newer.
            let first_kept = match element.offset() {
                Offset::Offset(offset) => offset <= low,
                _ => high == low,
            };
            if first_kept {
                not_kept.push(format!(
                    "{topic}/{} (log starts at offset {low})",
                    element.partition()
                ));
            }
        }
    }
    Ok(not_kept)
}

/// A `read_committed` consumer with the producer's connection settings.
fn read_back_consumer(producer: &ClientConfig) -> Result<BaseConsumer, KafkaError> {
    let mut config = ClientConfig::new();
    for (key, value) in producer.config_map() {
        // Only the connection settings carry over to the consumer.
        if key == "bootstrap.servers"
            || key.starts_with("security.")
            || key.starts_with("ssl.")
            || key.starts_with("sasl.")
        {
            config.set(key, value);
        }
    }
    config
        .set("group.id", "walrelay-replay-read-back")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .set("allow.auto.create.topics", "false")
        .create()
}

/// One topic's share of [`ids_since`] (end-of-partition events name only
/// the partition, so topics are read one at a time).
fn read_topic(
    consumer: &BaseConsumer,
    topic: &str,
    since_ms: i64,
    origin: Option<&str>,
    ids: &mut HashSet<String>,
) -> Result<(), KafkaError> {
    let mut wanted = TopicPartitionList::new();
    let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
    for t in metadata.topics() {
        if t.error().is_some() {
            return Ok(());
        }
        for p in t.partitions() {
            wanted.add_partition_offset(topic, p.id(), Offset::Offset(since_ms))?;
        }
    }
    if wanted.count() == 0 {
        return Ok(());
    }
    // A partition with no record at or after the time has nothing to read.
    let found = consumer.offsets_for_times(wanted, TIMEOUT)?;
    let mut start = TopicPartitionList::new();
    for element in found.elements() {
        if let Offset::Offset(offset) = element.offset() {
            start.add_partition_offset(topic, element.partition(), Offset::Offset(offset))?;
        }
    }
    let open = start.count();
    if open == 0 {
        return Ok(());
    }
    consumer.assign(&start)?;
    let mut ended = HashSet::new();
    while ended.len() < open {
        match consumer.poll(TIMEOUT) {
            None => {
                return Err(KafkaError::MessageConsumption(
                    rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
                ));
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                ended.insert(partition);
            }
            Some(Err(error)) => return Err(error),
            Some(Ok(message)) => {
                let Some(headers) = message.headers() else {
                    continue;
                };
                let mut id = None;
                let mut mine = origin.is_none();
                for header in headers.iter() {
                    let value = header.value.map(String::from_utf8_lossy);
                    match header.key {
                        "id" => id = value.map(|v| v.into_owned()),
                        crate::publish::ORIGIN_HEADER => {
                            mine |= value.as_deref() == origin;
                        }
                        _ => {}
                    }
                }
                if let (true, Some(id)) = (mine, id) {
                    ids.insert(id);
                }
            }
        }
    }
    consumer.unassign()?;
    Ok(())
}
