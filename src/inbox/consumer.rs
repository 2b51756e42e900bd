//! The inbox's consumer loop: one thread that polls librdkafka, places
//! the partitions the group assigns, gathers a batch and stores it.
//!
//! Placing a partition: the rebalance callback assigns it paused
//! ([`super::context`]); the loop reads its stored next offset, seeks
//! there and resumes it. Kafka answers a fetch that starts inside a record
//! batch with the whole batch and librdkafka drops the records before the
//! offset asked for, so the first record delivered is the stored offset's
//! (or the next one there is: transaction markers, compaction and
//! retention leave gaps).
//!
//! Before a partition is placed, its stored offset is checked against its
//! log now: a topic deleted and created again (or a truncated log) is
//! noticed, never read from a position of the old log ([`super::reset`]).
//! While it is read, a log that goes back under the consumer, or a topic
//! whose id changes, gets its partitions placed again, so checked again.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::TopicPartitionList;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use tokio::runtime::Handle;

use super::context::{InboxContext, partition_list};
use super::positions::{Arrival, Start};
use super::reset::{self, LogNow, OnTopicReset, PartitionReset, TopicResets};
use super::schema::InboxTables;
use super::seams::{InboxConsumer, InboxStore};
use super::store::{Incoming, Store, StoreError, StoredOffset, TopicPartition, Written};
use crate::live::LiveState;
use crate::metrics as m;
use crate::postgres::ConnectionConfig;
use crate::sql::{SqlCause, SqlError};

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
    /// What to do with a partition whose topic was made again (or whose
    /// log was truncated).
    pub on_topic_reset: OnTopicReset,
    /// How often the ids of the topics held are read again, to notice a
    /// topic made again while it is read.
    pub topic_check_interval: Duration,
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
            // librdkafka's consumer default, kept explicit: subscribing to
            // (or checking) a topic never creates it with the broker's
            // defaults. `-X` may not change it (cli/args.rs).
            .set("allow.auto.create.topics", "false")
            // Records of aborted transactions are never stored; `-X` may
            // not change it either.
            .set("isolation.level", "read_committed")
            // Subscribing to a topic the relay has not made yet must not
            // make it with the broker's defaults (librdkafka's consumer
            // default; said here, where the consumer is made).
            .set("allow.auto.create.topics", "false")
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
    #[error(transparent)]
    TopicReset(#[from] TopicResets),
}

/// How long one `poll` waits at most: a SIGTERM is seen within it.
const POLL_WAIT: Duration = Duration::from_millis(100);
/// The first wait after PostgreSQL failed; it doubles up to --max-backoff.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// How long a seek may take, and the wait before one that failed (the
/// partition's fetcher was not started yet) is tried again.
const SEEK_TIMEOUT: Duration = Duration::from_secs(1);
const SEEK_RETRY: Duration = Duration::from_millis(100);
/// Longest a store call may wait on PostgreSQL: a server that froze while
/// its host still answers TCP (or a write waiting on a lock) would
/// otherwise hold the loop, the group membership and SIGTERM for good. The
/// call is then given up as a lost connection (a write either committed
/// with its offsets or did not: both are safe to read again).
const STORE_TIMEOUT: Duration = Duration::from_secs(60);
/// Once asked to stop, how long a store call may still take (the batch in
/// hand stored at exit among them).
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Longest a placement waits for the broker's topic ids or a partition's
/// watermarks, and the wait before it tries again when it got none.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(5);
const KAFKA_RETRY: Duration = Duration::from_secs(1);
/// Longest the periodic check of the topic ids waits (a check missed is
/// made at the next one).
const TOPIC_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Runs the inbox until `shutdown` is set; blocks the calling thread.
pub fn run(
    config: InboxConfig,
    handle: Handle,
    live: Arc<LiveState>,
    shutdown: Arc<AtomicBool>,
) -> Result<(), InboxError> {
    let store = handle.block_on(Store::connect(&config.pg, &config.tables, &config.group))?;
    let context = InboxContext::new(Arc::clone(&live), config.group.clone());
    let consumer: BaseConsumer<InboxContext> =
        config.client_config().create_with_context(context)?;
    let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    live.set_connected(true);
    live.set_role(crate::live::Role::Active);
    tracing::info!(topics = ?config.topics, group = %config.group, table = %config.tables.name(), "consuming into the inbox");
    Inbox::new(consumer, store, handle, live, config, shutdown).run()
}

/// The consumer loop. It alone does PostgreSQL I/O (it owns the store):
/// it places the partitions the group assigns, gathers the batch and
/// stores it, and rewinds after a failed store.
pub(super) struct Inbox<C: InboxConsumer, S: InboxStore> {
    consumer: C,
    store: S,
    handle: Handle,
    live: Arc<LiveState>,
    config: InboxConfig,
    shutdown: Arc<AtomicBool>,
    /// When the first record of the batch in hand was taken.
    batch_started: Option<Instant>,
    /// The store's connection failed: it is made again before next use.
    reconnect: bool,
    /// A failed store rewound every partition, not placed again yet.
    rewinding: bool,
    /// No partition is placed before this: the backoff after PostgreSQL
    /// failed, or the wait after a seek that failed.
    place_after: Instant,
    backoff: Duration,
    /// Placed partitions whose log went back, or whose topic's id changed:
    /// to be placed again.
    replace: Vec<TopicPartition>,
    last_topic_check: Instant,
}

impl<C: InboxConsumer, S: InboxStore> Inbox<C, S> {
    pub(super) fn new(
        consumer: C,
        store: S,
        handle: Handle,
        live: Arc<LiveState>,
        config: InboxConfig,
        shutdown: Arc<AtomicBool>,
    ) -> Self {
        Inbox {
            consumer,
            store,
            handle,
            live,
            config,
            shutdown,
            batch_started: None,
            reconnect: false,
            rewinding: false,
            place_after: Instant::now(),
            backoff: FIRST_BACKOFF,
            replace: Vec::new(),
            last_topic_check: Instant::now(),
        }
    }

    /// Consumes until `shutdown` is set (or PostgreSQL refuses for good).
    /// Graceful: what is in hand is stored, then the group is left (the
    /// revoke callback runs while the consumer closes).
    pub(super) fn run(mut self) -> Result<(), InboxError> {
        let result = self.consume();
        if result.is_ok()
            && let Err(e) = self.flush()
        {
            tracing::warn!(error = %e, "cannot store the batch in hand at exit; the next owner consumes it again");
        }
        self.consumer.unsubscribe();
        self.live.set_connected(false);
        drop(self);
        result
    }

    fn context(&self) -> &InboxContext {
        self.consumer.context()
    }

    /// Until `shutdown` is set, or PostgreSQL refuses for good. Every
    /// wait is a `poll` of at most `POLL_WAIT`, so the group membership
    /// stays alive through a PostgreSQL outage and SIGTERM is prompt.
    fn consume(&mut self) -> Result<(), InboxError> {
        let mut last_snapshot = Instant::now();
        while !self.shutdown.load(Ordering::Relaxed) {
            self.receive();
            if self.last_topic_check.elapsed() >= self.config.topic_check_interval {
                self.last_topic_check = Instant::now();
                self.check_topic_ids();
            }
            self.place_again()?;
            self.place()?;
            let full = self.context().lock().batch.len() >= self.config.batch_size;
            let due = self
                .batch_started
                .is_some_and(|s| s.elapsed() >= self.config.batch_wait);
            if full || due {
                self.flush()?;
            }
            if last_snapshot.elapsed() >= Duration::from_secs(1) {
                last_snapshot = Instant::now();
                self.context().publish_snapshot();
            }
        }
        Ok(())
    }

    /// One `poll`: a record of a placed partition joins the batch (the
    /// rebalance callbacks run in here too).
    fn receive(&mut self) {
        let wait = match self.batch_started {
            Some(started) => self.config.batch_wait.saturating_sub(started.elapsed()),
            None => POLL_WAIT,
        };
        match self.consumer.poll(wait.min(POLL_WAIT)) {
            Some(Ok(record)) => {
                metrics::counter!(m::INBOX_RECORDS_CONSUMED_TOTAL).increment(1);
                let tp = (record.topic.clone(), record.partition);
                let mut shared = self.consumer.context().lock();
                match shared.positions.arrive(&tp, record.offset) {
                    Arrival::Take => {
                        shared.batch.push(record);
                        self.batch_started.get_or_insert_with(Instant::now);
                    }
                    Arrival::Behind if !self.replace.contains(&tp) => {
                        tracing::warn!(topic = %tp.0, partition = tp.1, offset = record.offset,
                            "a record below the partition's position: its log went back (the topic made again, or the log truncated); checking it again");
                        self.replace.push(tp);
                    }
                    _ => {}
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "consumer");
                self.live.set_last_error(&format!("Kafka: {e}"));
            }
            None => {}
        }
    }

    /// Places the partitions assigned or rewound since: reads their stored
    /// offsets, seeks each to its start and resumes it. PostgreSQL failing
    /// for now is retried after a backoff; for good, it stops the inbox.
    fn place(&mut self) -> Result<(), InboxError> {
        if Instant::now() < self.place_after {
            return Ok(());
        }
        let unread = self.context().lock().positions.unread();
        if !unread.is_empty() {
            match self.stored_offsets(&unread) {
                Ok(stored) => {
                    let Some(starts) = self.starts(&unread, &stored)? else {
                        return Ok(());
                    };
                    self.context().lock().positions.found(&starts);
                    self.backoff = FIRST_BACKOFF;
                    self.live.set_connected(true);
                    if std::mem::take(&mut self.rewinding) {
                        tracing::info!(
                            "PostgreSQL is back; every partition resumes at its stored offset"
                        );
                    }
                }
                Err(e) if e.is_transient() => {
                    self.unreachable(&e);
                    return Ok(());
                }
                // The tables went away (or the role lost its rights): stop.
                Err(e) => return Err(e.into()),
            }
        }
        let unsought = self.context().lock().positions.unsought();
        if unsought.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), start) in &unsought {
            tpl.add_partition_offset(topic, *partition, *start)?;
        }
        // librdkafka drops what was fetched before a seek; `arrive` drops
        // what is below the stored offset.
        let sought: Vec<TopicPartition> = match self.consumer.seek_partitions(tpl, SEEK_TIMEOUT) {
            Ok(tpl) => tpl
                .elements()
                .iter()
                .filter(|e| e.error().is_ok())
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, "cannot seek yet; trying again");
                Vec::new()
            }
        };
        if sought.len() < unsought.len() {
            // Most likely a fetcher not started yet: the next iterations
            // try again.
            self.place_after = Instant::now() + SEEK_RETRY;
        }
        if sought.is_empty() {
            return Ok(());
        }
        let mut shared = self.context().lock();
        for tp in &sought {
            shared.positions.placed(tp);
        }
        drop(shared);
        if let Err(e) = self.consumer.resume(&partition_list(&sought)) {
            tracing::warn!(error = %e, "cannot resume the partitions placed");
        }
        tracing::info!(partitions = ?sought, "partitions placed at their stored offsets");
        Ok(())
    }

    /// PostgreSQL did not answer a placement's call: tried again after a
    /// backoff, on a fresh connection.
    fn unreachable(&mut self, e: &StoreError) {
        self.reconnect = true;
        self.live.set_connected(false);
        self.live.set_last_error(&e.to_string());
        if self.rewinding {
            tracing::warn!(error = %e, "PostgreSQL is still unreachable");
        } else {
            tracing::warn!(error = %e, "cannot read the stored offsets; trying again");
        }
        self.back_off();
    }

    /// Where each of these partitions starts: its stored offset, if it
    /// belongs to the partition's log now; if not (the topic was made
    /// again, or the log truncated), as `--on-topic-reset` says: stop
    /// with the facts, or the log's start (stored at once, so a restart
    /// does not decide again). `None` when Kafka or PostgreSQL did not
    /// answer: the partitions stay unread and are tried again later.
    fn starts(
        &mut self,
        partitions: &[TopicPartition],
        stored: &HashMap<TopicPartition, StoredOffset>,
    ) -> Result<Option<HashMap<TopicPartition, Start>>, InboxError> {
        let Some(ids) = self.topic_ids_to_place(partitions) else {
            return Ok(None);
        };
        let mut starts = HashMap::new();
        let mut resets = Vec::new();
        for tp in partitions {
            let topic_id = ids[&tp.0].clone();
            let Some(stored) = stored.get(tp) else {
                starts.insert(
                    tp.clone(),
                    Start {
                        next: None,
                        topic_id,
                    },
                );
                continue;
            };
            let (start, end) = match self.consumer.log_bounds(tp, KAFKA_TIMEOUT) {
                Ok(bounds) => bounds,
                Err(e) => {
                    self.kafka_unanswered(&format!(
                        "cannot read the log bounds of {} partition {}: {e}",
                        tp.0, tp.1
                    ));
                    return Ok(None);
                }
            };
            let log = LogNow {
                start,
                end,
                topic_id: topic_id.clone(),
            };
            match reset::check(tp, stored, &log) {
                None => {
                    // An offset stored without a topic id (an older
                    // walrelay) takes the current one from the next batch.
                    let next = Some(stored.next);
                    starts.insert(tp.clone(), Start { next, topic_id });
                }
                Some(reset) => resets.push(reset),
            }
        }
        if resets.is_empty() {
            return Ok(Some(starts));
        }
        if self.config.on_topic_reset == OnTopicReset::Fail {
            return Err(TopicResets {
                resets,
                offsets_table: self.config.tables.offsets_table_name(),
                group: self.config.group.clone(),
            }
            .into());
        }
        for reset in resets {
            match self.restart_log(&reset) {
                Ok(true) => {
                    let start = Start {
                        next: Some(reset.log.start),
                        topic_id: reset.log.topic_id,
                    };
                    starts.insert(reset.tp, start);
                }
                // Another member moved the offset meanwhile: read it again.
                Ok(false) => return Ok(None),
                Err(e) if e.is_transient() => {
                    self.unreachable(&e);
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Some(starts))
    }

    /// The ids of the topics of these partitions, to check and store with
    /// their offsets; `None` when Kafka did not say them all.
    fn topic_ids_to_place(
        &mut self,
        partitions: &[TopicPartition],
    ) -> Option<HashMap<String, Option<String>>> {
        let topics: BTreeSet<&str> = partitions.iter().map(|(t, _)| t.as_str()).collect();
        let topics: Vec<&str> = topics.into_iter().collect();
        let mut described = match self.consumer.topic_ids(&topics, KAFKA_TIMEOUT) {
            Ok(described) => described,
            Err(e) => {
                self.kafka_unanswered(&format!("cannot read the ids of topics {topics:?}: {e}"));
                return None;
            }
        };
        let mut ids = HashMap::new();
        for topic in topics {
            match described.remove(topic) {
                Some(Ok(id)) => {
                    ids.insert(topic.to_owned(), id);
                }
                Some(Err(e)) => {
                    self.kafka_unanswered(&format!("cannot read the id of topic {topic}: {e}"));
                    return None;
                }
                None => {
                    self.kafka_unanswered(&format!("the broker did not describe topic {topic}"));
                    return None;
                }
            }
        }
        Some(ids)
    }

    /// `--on-topic-reset earliest`: the partition's stored offset moves to
    /// its log's start, with the topic's id now; returns whether it moved
    /// (it had not changed since it was read).
    fn restart_log(&mut self, reset: &PartitionReset) -> Result<bool, StoreError> {
        let to = StoredOffset {
            next: reset.log.start,
            topic_id: reset.log.topic_id.clone(),
        };
        let address = self.config.pg.address();
        let call = self.store.reset(&reset.tp, &reset.stored, &to);
        let moved = bounded(&self.handle, &self.shutdown, &address, call)?;
        if moved {
            metrics::counter!(m::INBOX_TOPIC_RESETS_TOTAL).increment(1);
            tracing::warn!(topic = %reset.tp.0, partition = reset.tp.1, from = reset.stored.next, to = to.next,
                "{reset}; reading the new log from its start (--on-topic-reset earliest)");
        }
        Ok(moved)
    }

    /// Kafka did not answer a placement's question: the partitions stay
    /// unread and are tried again in a while.
    fn kafka_unanswered(&mut self, what: &str) {
        tracing::warn!("{what}; trying again");
        self.live.set_last_error(&format!("Kafka: {what}"));
        self.place_after = Instant::now() + KAFKA_RETRY;
    }

    /// Partitions whose log went back, or whose topic's id changed, are
    /// placed again: the batch in hand is stored first (its records were
    /// taken in order from the log read so far, which may be gone from
    /// Kafka), then their start is read and checked again.
    fn place_again(&mut self) -> Result<(), InboxError> {
        if self.replace.is_empty() {
            return Ok(());
        }
        self.flush()?;
        let partitions = std::mem::take(&mut self.replace);
        self.context().lock().positions.unplace(&partitions);
        if let Err(e) = self.consumer.pause(&partition_list(&partitions)) {
            tracing::warn!(error = %e, "cannot pause the partitions; what arrives for them before they are placed is dropped");
        }
        Ok(())
    }

    /// Every `topic_check_interval`: the ids of the topics held against
    /// those their partitions were placed with. librdkafka notices a topic
    /// made again only when its new log ends below the position; one grown
    /// past it would be read on from there, its first records passed over.
    fn check_topic_ids(&mut self) {
        let placed = self.context().lock().positions.topic_ids();
        if placed.is_empty() {
            return;
        }
        let topics: BTreeSet<&str> = placed.keys().map(|(t, _)| t.as_str()).collect();
        let topics: Vec<&str> = topics.into_iter().collect();
        let now = match self.consumer.topic_ids(&topics, TOPIC_CHECK_TIMEOUT) {
            Ok(now) => now,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the topic ids; checking again later");
                return;
            }
        };
        let mut changed: Vec<(&TopicPartition, &String, &String)> = placed
            .iter()
            .filter_map(|(tp, was)| match now.get(&tp.0) {
                Some(Ok(Some(id))) if id != was => Some((tp, was, id)),
                _ => None,
            })
            .collect();
        changed.sort();
        for (tp, was, id) in changed {
            if !self.replace.contains(tp) {
                tracing::warn!(topic = %tp.0, partition = tp.1, was = %was, now = %id,
                    "the topic's id changed: it was deleted and created again; checking the partition again");
                self.replace.push(tp.clone());
            }
        }
    }

    /// The stored next offsets of these partitions (reconnected first
    /// when the connection failed).
    fn stored_offsets(
        &mut self,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, StoredOffset>, StoreError> {
        let (handle, shutdown) = (&self.handle, &*self.shutdown);
        let address = self.config.pg.address();
        if self.reconnect {
            bounded(handle, shutdown, &address, self.store.reconnect())?;
            self.reconnect = false;
        }
        bounded(handle, shutdown, &address, self.store.offsets(partitions))
    }

    /// Stores the batch in hand. On a failure the batch is dropped and
    /// every partition rewinds to what PostgreSQL holds.
    fn flush(&mut self) -> Result<(), InboxError> {
        self.batch_started = None;
        // Taken out: the lock is not held across the write.
        let batch = std::mem::take(&mut self.context().lock().batch);
        if batch.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let address = self.config.pg.address();
        let topic_ids = self.context().lock().positions.topic_ids();
        let write = self.store.write(&batch, &topic_ids);
        match bounded(&self.handle, &self.shutdown, &address, write) {
            Ok(written) => {
                self.context().lock().duplicates += written.duplicates;
                count(&self.live, &batch, &written, started);
                self.backoff = FIRST_BACKOFF;
                self.live.set_connected(true);
                Ok(())
            }
            Err(e) => {
                self.live.set_last_error(&e.to_string());
                tracing::warn!(error = %e, records = batch.len(), "cannot store the batch; it will be consumed again");
                if !e.is_transient() {
                    return Err(e.into());
                }
                self.rewind();
                Ok(())
            }
        }
    }

    /// After a failed store: every partition is paused and unplaced, to be
    /// placed again at the offset PostgreSQL holds once it answers (after
    /// a backoff, on a fresh connection).
    fn rewind(&mut self) {
        self.reconnect = true;
        self.rewinding = true;
        self.live.set_connected(false);
        let partitions = {
            let mut shared = self.context().lock();
            shared.batch.clear();
            shared.positions.rewind_all()
        };
        if !partitions.is_empty()
            && let Err(e) = self.consumer.pause(&partition_list(&partitions))
        {
            tracing::warn!(error = %e, "cannot pause the partitions; what arrives for them before they are placed is dropped");
        }
        self.back_off();
    }

    fn back_off(&mut self) {
        self.place_after = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(self.config.max_backoff);
    }
}

/// Counts a stored batch on the metrics and the dashboard.
/// Runs a store call to its end, or until it waited `STORE_TIMEOUT`, or
/// `STOP_GRACE` past a stop request.
fn bounded<T>(
    handle: &Handle,
    shutdown: &AtomicBool,
    address: &str,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let unanswered = |wait: Duration| {
        let cause = std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("PostgreSQL answered nothing for {wait:?}"),
        );
        StoreError::from(SqlError::new(address, SqlCause::Os(cause)))
    };
    handle.block_on(async {
        let stop = async {
            while !shutdown.load(Ordering::Relaxed) {
                tokio::time::sleep(POLL_WAIT).await;
            }
            tokio::time::sleep(STOP_GRACE).await;
        };
        tokio::select! {
            biased;
            result = call => result,
            () = tokio::time::sleep(STORE_TIMEOUT) => Err(unanswered(STORE_TIMEOUT)),
            () = stop => Err(unanswered(STOP_GRACE)),
        }
    })
}

fn count(live: &LiveState, batch: &[Incoming], written: &Written, started: Instant) {
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
