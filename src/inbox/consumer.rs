//! The inbox's consumer: one thread that polls librdkafka, gathers a
//! batch, stores it, and answers the group's rebalances.
//!
//! Resuming a partition: it is assigned at its stored next offset. Kafka
//! answers a fetch that starts inside a record batch with the whole batch
//! and librdkafka drops the records before the offset asked for, so the
//! first record delivered is the stored offset's (or the next one there
//! is: transaction markers, compaction and retention leave gaps).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use tokio::runtime::Handle;

use super::schema::InboxTables;
use super::store::{Incoming, Store, StoreError, TopicPartition, Written};
use crate::live::{InboxPartition, InboxSnapshot, LiveState};
use crate::metrics as m;
use crate::postgres::ConnectionConfig;

/// How `walrelay inbox` runs.
#[derive(Clone, Debug)]
pub struct InboxConfig {
    pub pg: ConnectionConfig,
    pub brokers: String,
    /// `-X key=value`, over the consumer's defaults.
    pub overrides: Vec<(String, String)>,
    /// Topic names, or regular expressions starting with `^`.
    pub topics: Vec<String>,
    pub tables: InboxTables,
    pub group: String,
    /// Records per PostgreSQL transaction, at most.
    pub batch_size: usize,
    /// How long a batch waits to fill before it is stored anyway.
    pub batch_wait: Duration,
    /// Longest wait between attempts to reach PostgreSQL again.
    pub max_backoff: Duration,
}

impl InboxConfig {
    /// The consumer's librdkafka configuration.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group)
            .set("client.id", "walrelay-inbox")
            // Offsets live in PostgreSQL, with the rows.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            // High watermarks for the consumer-lag gauge.
            .set("statistics.interval.ms", "1000");
        if self.topics.iter().any(|t| t.starts_with('^')) {
            // A pattern picks up topics created later at the next metadata
            // refresh: every second rather than librdkafka's 5 minutes, so
            // a new topic's first records do not wait (one metadata
            // request a second).
            config.set("topic.metadata.refresh.interval.ms", "1000");
        }
        for (key, value) in &self.overrides {
            config.set(key, value);
        }
        config
    }
}

/// Why the inbox stopped.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("Kafka consumer: {0}; fix: check --brokers and the -X options")]
    Kafka(#[from] KafkaError),
}

/// Where this consumer is in one partition.
#[derive(Clone, Debug)]
struct Position {
    /// The first offset not yet consumed (stored or in the batch); `None`
    /// before the first record when nothing was ever stored.
    next: Option<i64>,
    high_watermark: Option<i64>,
}

impl Position {
    fn resuming(stored: Option<i64>) -> Self {
        Position {
            next: stored,
            high_watermark: None,
        }
    }

    /// Where to start reading: the stored next offset, or the log's start
    /// when nothing was ever stored (or, through `auto.offset.reset`, when
    /// retention deleted the stored offset).
    fn start(&self) -> Offset {
        match self.next {
            Some(next) => Offset::Offset(next),
            None => Offset::Beginning,
        }
    }
}

/// What the consumer thread and its rebalance callbacks share (the
/// callbacks run inside `poll`, on the same thread, so the lock is never
/// contended; it is there because the context is `Sync`).
struct Shared {
    store: Store,
    positions: HashMap<TopicPartition, Position>,
    batch: Vec<Incoming>,
    /// A failure inside a callback, for the loop to return.
    failure: Option<InboxError>,
    /// A batch could not be stored: every partition must go back to the
    /// offset PostgreSQL holds.
    rewind_needed: bool,
    duplicates: u64,
}

struct InboxContext {
    handle: Handle,
    shared: Mutex<Shared>,
    live: Arc<LiveState>,
    group: String,
    max_backoff: Duration,
    shutdown: Arc<AtomicBool>,
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
                if let Some(position) = shared.positions.get_mut(&(topic.clone(), *partition))
                    && p.hi_offset >= 0
                {
                    position.high_watermark = Some(p.hi_offset);
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
        let partitions: Vec<TopicPartition> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        metrics::counter!(m::INBOX_REBALANCES_TOTAL).increment(1);
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let stored = self.stored_offsets(&partitions);
                let mut shared = self.lock();
                for tp in &partitions {
                    let position = Position::resuming(stored.get(tp).copied());
                    if let Err(e) = tpl.set_partition_offset(&tp.0, tp.1, position.start()) {
                        tracing::error!(topic = %tp.0, partition = tp.1, error = %e, "cannot set the start offset");
                    }
                    shared.positions.insert(tp.clone(), position);
                }
                drop(shared);
                tracing::info!(partitions = ?partitions, "partitions assigned; each resumes at its stored offset");
                if cooperative {
                    consumer.incremental_assign(tpl).map(|_| ())
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // Store what is in hand for them, so the next owner starts
                // after it rather than consuming it again.
                self.flush();
                let mut shared = self.lock();
                for tp in &partitions {
                    shared.positions.remove(tp);
                }
                shared
                    .batch
                    .retain(|r| !partitions.contains(&(r.topic.clone(), r.partition)));
                drop(shared);
                tracing::info!(partitions = ?partitions, "partitions revoked");
                if cooperative {
                    consumer.incremental_unassign(tpl).map(|_| ())
                } else {
                    consumer.unassign()
                }
            }
            other => {
                tracing::warn!(error = ?other, "rebalance failed; giving up the assignment");
                self.lock().positions.clear();
                consumer.unassign()
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot apply the group's assignment");
        }
        self.publish_snapshot();
    }
}

impl InboxContext {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stored offsets of newly assigned partitions; PostgreSQL is
    /// tried until it answers (the partitions cannot start without them).
    fn stored_offsets(&self, partitions: &[TopicPartition]) -> HashMap<TopicPartition, i64> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut shared = self.lock();
            let result = self.handle.block_on(shared.store.offsets(partitions));
            match result {
                Ok(offsets) => return offsets,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the stored offsets; trying again");
                    self.live.set_last_error(&e.to_string());
                    if self.shutdown.load(Ordering::Relaxed) || !e.is_transient() {
                        shared.failure = Some(InboxError::Store(e.into()));
                        // Start nowhere: the loop stops before reading.
                        return HashMap::new();
                    }
                    let _ = self.handle.block_on(shared.store.reconnect());
                }
            }
            drop(shared);
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }

    /// Stores the batch in hand. On a failure the batch is dropped and
    /// every partition rewinds to what PostgreSQL holds.
    fn flush(&self) -> bool {
        let mut shared = self.lock();
        if shared.batch.is_empty() {
            return true;
        }
        let batch = std::mem::take(&mut shared.batch);
        let started = Instant::now();
        let result = self.handle.block_on(shared.store.write(&batch));
        match result {
            Ok(written) => {
                shared.duplicates += written.duplicates;
                drop(shared);
                self.count(&batch, &written, started);
                true
            }
            Err(e) => {
                self.live.set_last_error(&e.to_string());
                tracing::warn!(error = %e, records = batch.len(), "cannot store the batch; it will be consumed again");
                if !e.is_transient() {
                    shared.failure = Some(InboxError::Store(e.into()));
                }
                shared.rewind_needed = true;
                false
            }
        }
    }

    fn count(&self, batch: &[Incoming], written: &Written, started: Instant) {
        metrics::counter!(m::INBOX_RECORDS_STORED_TOTAL).increment(written.stored);
        metrics::counter!(m::INBOX_DUPLICATES_SKIPPED_TOTAL).increment(written.duplicates);
        metrics::histogram!(m::INBOX_BATCH_SECONDS).record(started.elapsed().as_secs_f64());
        let counters = &self.live.counters;
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
            self.live.latency.record(seconds);
            self.live.latency_histogram.record(seconds);
        }
        if written.stored > 0 {
            self.live.record_ack();
        }
        tracing::debug!(
            records = batch.len(),
            stored = written.stored,
            duplicates = written.duplicates,
            "batch stored"
        );
    }

    /// Consumer lag per partition, for the gauge and the dashboard.
    fn publish_snapshot(&self) {
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
                metrics::gauge!(m::INBOX_CONSUMER_LAG, "topic" => topic.clone(), "partition" => partition.to_string())
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
}

/// What to do with a record that just arrived.
enum Arrival {
    Take,
    /// Already stored or in the batch (a record fetched before a rewind):
    /// drop it.
    Below,
    /// Not ours (revoked in the meantime).
    NotOurs,
}

/// Runs the inbox until `shutdown` is set; blocks the calling thread.
pub fn run(
    config: InboxConfig,
    handle: Handle,
    live: Arc<LiveState>,
    shutdown: Arc<AtomicBool>,
) -> Result<(), InboxError> {
    let store = handle.block_on(Store::connect(&config.pg, &config.tables, &config.group))?;
    let context = InboxContext {
        handle: handle.clone(),
        shared: Mutex::new(Shared {
            store,
            positions: HashMap::new(),
            batch: Vec::new(),
            failure: None,
            rewind_needed: false,
            duplicates: 0,
        }),
        live: Arc::clone(&live),
        group: config.group.clone(),
        max_backoff: config.max_backoff,
        shutdown: Arc::clone(&shutdown),
    };
    let consumer: BaseConsumer<InboxContext> =
        config.client_config().create_with_context(context)?;
    let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    live.set_connected(true);
    live.set_role(crate::live::Role::Active);
    tracing::info!(topics = ?config.topics, group = %config.group, table = %config.tables.name(), "consuming into the inbox");
    let mut batch_started: Option<Instant> = None;
    let mut last_snapshot = Instant::now();
    let mut backoff = Duration::from_millis(100);
    let result = loop {
        if shutdown.load(Ordering::Relaxed) {
            break Ok(());
        }
        let wait = match batch_started {
            Some(started) => config.batch_wait.saturating_sub(started.elapsed()),
            None => Duration::from_millis(200),
        };
        match consumer.poll(wait) {
            Some(Ok(message)) => {
                metrics::counter!(m::INBOX_RECORDS_CONSUMED_TOTAL).increment(1);
                let tp = (message.topic().to_owned(), message.partition());
                let arrival = arrive(consumer.context(), &tp, message.offset());
                match arrival {
                    Arrival::Take => {
                        let record = incoming(&message);
                        let mut shared = consumer.context().lock();
                        shared.batch.push(record);
                        batch_started.get_or_insert_with(Instant::now);
                    }
                    Arrival::Below | Arrival::NotOurs => {}
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "consumer");
                live.set_last_error(&format!("Kafka: {e}"));
            }
            None => {}
        }
        if let Some(failure) = consumer.context().lock().failure.take() {
            break Err(failure);
        }
        let full = consumer.context().lock().batch.len() >= config.batch_size;
        let due = batch_started.is_some_and(|s| s.elapsed() >= config.batch_wait);
        if full || due {
            batch_started = None;
            if consumer.context().flush() {
                backoff = Duration::from_millis(100);
                live.set_connected(true);
            } else if let Some(failure) = consumer.context().lock().failure.take() {
                break Err(failure);
            }
        }
        if consumer.context().lock().rewind_needed {
            batch_started = None;
            live.set_connected(false);
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(config.max_backoff);
            match rewind(&consumer, &handle) {
                Ok(()) => live.set_connected(true),
                Err(e) => tracing::warn!(error = %e, "PostgreSQL is still unreachable"),
            }
        }
        if last_snapshot.elapsed() >= Duration::from_secs(1) {
            last_snapshot = Instant::now();
            consumer.context().publish_snapshot();
        }
    };
    // Graceful: what is in hand is stored, then the group is left (the
    // revoke callback runs while the consumer closes).
    if result.is_ok() {
        consumer.context().flush();
    }
    consumer.unsubscribe();
    live.set_connected(false);
    drop(consumer);
    result
}

/// Decides what to do with a record at `offset` of `tp`, and moves the
/// partition's position.
fn arrive(context: &InboxContext, tp: &TopicPartition, offset: i64) -> Arrival {
    let mut shared = context.lock();
    let Some(position) = shared.positions.get_mut(tp) else {
        return Arrival::NotOurs;
    };
    match position.next {
        Some(next) if offset < next => Arrival::Below,
        Some(next) => {
            if offset > next {
                // Transaction markers take offsets; compaction and
                // retention remove records. Nothing is passed over.
                tracing::debug!(topic = %tp.0, partition = tp.1, from = next, to = offset, "offsets without records");
            }
            position.next = Some(offset + 1);
            Arrival::Take
        }
        None => {
            position.next = Some(offset + 1);
            Arrival::Take
        }
    }
}

/// After a failed store: reconnect, and move every partition back to the
/// offset PostgreSQL holds for it.
fn rewind(consumer: &BaseConsumer<InboxContext>, handle: &Handle) -> Result<(), StoreError> {
    let context = consumer.context();
    let mut shared = context.lock();
    shared.batch.clear();
    if let Err(e) = handle.block_on(shared.store.reconnect()) {
        if !e.is_transient() {
            // The tables went away (or the role lost its rights): stop.
            shared.failure = Some(InboxError::Store(e));
            return Ok(());
        }
        return Err(e);
    }
    let partitions: Vec<TopicPartition> = shared.positions.keys().cloned().collect();
    let stored = handle.block_on(shared.store.offsets(&partitions))?;
    shared.rewind_needed = false;
    for tp in partitions {
        let at = stored.get(&tp).copied();
        let high = shared.positions.get(&tp).and_then(|p| p.high_watermark);
        let mut position = Position::resuming(at);
        position.high_watermark = high;
        let offset = position.start();
        shared.positions.insert(tp.clone(), position);
        if let Err(e) = consumer.seek(&tp.0, tp.1, offset, Duration::from_secs(5)) {
            tracing::warn!(topic = %tp.0, partition = tp.1, error = %e, "seek failed");
        }
    }
    tracing::info!("PostgreSQL is back; every partition resumes at its stored offset");
    Ok(())
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
