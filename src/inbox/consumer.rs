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
//! Placing is `consumer/placement.rs`'s; this file keeps the loop, its batch and
//! its store calls.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use tokio::runtime::Handle;

use super::config::InboxConfig;
use super::context::{InboxContext, partition_list};
use super::counters;
use super::positions::Arrival;
use super::reset::TopicResets;
use super::seams::{InboxConsumer, InboxStore};
use super::store::{Store, StoreError, TopicPartition};
use crate::live::LiveState;
use crate::metrics as m;
use crate::sql::{SqlCause, SqlError};

mod placement;

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
/// Longest a store call may wait on PostgreSQL: a server that froze while
/// its host still answers TCP (or a write waiting on a lock) would
/// otherwise hold the loop, the group membership and SIGTERM for good. The
/// call is then given up as a lost connection (a write either committed
/// with its offsets or did not: both are safe to read again).
const STORE_TIMEOUT: Duration = Duration::from_secs(60);
/// Once asked to stop, how long a store call may still take (the batch in
/// hand stored at exit among them).
const STOP_GRACE: Duration = Duration::from_secs(2);

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
                counters::count(&self.live, &batch, &written, started);
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
