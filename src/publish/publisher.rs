//! The publisher: sources hand it records, it gets them into Kafka, and it
//! says what became of each ([`Outcome`]), returned from the call that
//! learnt it.
//!
//! - Records go to the broker in the order they were handed over, per
//!   partition: a record that must wait (its topic is being prepared, its
//!   partition's tail is being read, it waits to be sent again, the
//!   producer's queue is full) holds every later record of its partition,
//!   and a full queue holds everything.
//! - Exactly once: walrelay picks each record's partition (`partitioner`)
//!   and skips what the partition already holds (`ledgers`).
//! - Transactions (a transactional sink): records go out in transactions,
//!   one open at a time, committed as soon as all its records are
//!   delivered. A record counts as delivered only once its transaction
//!   commits; an aborted transaction's records are sent again.
//! - A failed delivery is sent again after a backoff (it stays in flight
//!   meanwhile); a record the broker will never take comes back as
//!   [`Outcome::Refused`] for the source to keep it durably.
//!
//! Nothing here waits: every wait is a future or a timer that [`Publisher::next`]
//! polls, so the source's loop answers shutdown and the walsender meanwhile.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::time::{Instant, Sleep};

use super::error::{DeliveryDecision, PublishError, decide};
use super::ledgers::{PartitionKey, PartitionLedgers, Replay, ScanSettings, Verdict};
use super::partitioner::partition_for;
use super::position::Position;
use super::scan::LedgerScan;
use super::sink::{BrokerError, Delivery, LocalBoxFuture, RecordId, SendRefused, Sink, TopicError};
use super::topics::{Prepared, Readiness, Topics};
use crate::metrics as m;
use crate::record::KafkaRecord;

/// How long records wait after the producer's queue turned one away.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(5);

/// The longest pause before sending failed records again.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(5);

/// How long a transaction takes new records; then they wait while it
/// commits. Short, because its records count as delivered only once it
/// commits; librdkafka sends what lingers at once when a commit begins.
const TXN_MAX_OPEN: Duration = Duration::from_millis(10);

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
        kind: &'static str,
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

/// How the publisher works.
#[derive(Clone, Debug)]
pub struct PublisherConfig {
    pub dead_letter_topic: String,
    pub topic_failures: TopicFailures,
    /// Exactly once: walrelay picks partitions and reads their tails.
    pub exactly_once: Option<ScanSettings>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Waiting to be sent.
    Pending,
    /// Sent, not yet delivered.
    Sent,
    /// Delivered, its transaction not yet committed.
    Acked,
}

#[derive(Debug)]
struct Entry<T> {
    tag: T,
    record: KafkaRecord,
    position: Option<Position>,
    dead_letter: bool,
    partition: Option<i32>,
    state: State,
}

/// The transaction's state, with a transactional sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Txn {
    /// Not transactional.
    Off,
    /// No session yet, or the producer must be taken over again.
    Uninitialized,
    Initializing,
    Idle,
    Open,
    Committing,
    Aborting,
}

/// Broker I/O the publisher waits for.
enum Io {
    Prepared(String, Result<i32, TopicError>),
    /// Of the session it was started in.
    Session(u64, SessionIo),
}

enum SessionIo {
    Scanned(PartitionKey, Instant, Result<Box<LedgerScan>, BrokerError>),
    Initialized(Result<(), BrokerError>),
    Committed(Result<(), BrokerError>),
    Aborted(Result<(), BrokerError>),
}

/// What holds records back, as the last pass over the waiting ones found.
#[derive(Default)]
struct Held {
    /// Everything (a full queue, a transaction being ended, a pause).
    all: bool,
    topics: HashSet<String>,
    partitions: HashSet<PartitionKey>,
}

pub struct Publisher<S: Sink, T> {
    sink: S,
    config: PublisherConfig,
    entries: BTreeMap<RecordId, Entry<T>>,
    /// Records waiting to be sent, in the order they were handed over.
    pending: BTreeSet<RecordId>,
    held: Held,
    next_id: u64,
    topics: Topics,
    ledgers: Option<PartitionLedgers>,
    io: FuturesUnordered<LocalBoxFuture<Io>>,
    /// When waiting records may be tried again.
    pause_until: Option<Instant>,
    timer: Pin<Box<Sleep>>,
    /// Failures since the last success, for the backoff.
    failures: u32,
    txn: Txn,
    /// When the open transaction began.
    txn_opened_at: Instant,
    transactional_id: Option<String>,
    /// Counts sessions, so I/O of an ended one is ignored.
    session: u64,
    /// A record of the open transaction failed: it must be aborted.
    must_abort: bool,
    /// Records whose delivery report is outstanding.
    sent: usize,
    /// An error to return from the next call of `next`.
    failed: Option<PublishError>,
}

impl<S: Sink, T: Copy> Publisher<S, T> {
    pub fn new(sink: S, config: PublisherConfig) -> Self {
        let txn = if sink.transactional() {
            Txn::Uninitialized
        } else {
            Txn::Off
        };
        let mut publisher = Publisher {
            ledgers: config.exactly_once.clone().map(PartitionLedgers::new),
            sink,
            entries: BTreeMap::new(),
            pending: BTreeSet::new(),
            held: Held::default(),
            next_id: 0,
            topics: Topics::default(),
            io: FuturesUnordered::new(),
            pause_until: None,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            failures: 0,
            txn,
            txn_opened_at: Instant::now(),
            transactional_id: None,
            session: 0,
            must_abort: false,
            sent: 0,
            failed: None,
            config,
        };
        // The dead-letter topic is made ready before a record needs it.
        let dead_letters = publisher.config.dead_letter_topic.clone();
        publisher.prepare(&dead_letters);
        publisher
    }

    /// A session starts, nothing in flight: exactly once, partitions are
    /// read again on first use; with transactions, the producer takes over
    /// `transactional_id` first, fencing any earlier holder of it.
    pub fn begin_session(&mut self, replay: Option<Replay>, transactional_id: Option<String>) {
        self.session += 1;
        if let (Some(ledgers), Some(replay)) = (self.ledgers.as_mut(), replay) {
            ledgers.begin(replay);
        }
        if self.txn != Txn::Off {
            self.transactional_id = transactional_id;
            self.txn = Txn::Uninitialized;
            self.start_init();
        }
    }

    fn start_init(&mut self) {
        let Some(id) = self.transactional_id.clone() else {
            return;
        };
        self.txn = Txn::Initializing;
        let init = self.sink.init(&id);
        self.watch(async move { SessionIo::Initialized(init.await) });
    }

    /// Waits for broker I/O of this session.
    fn watch(&mut self, io: impl std::future::Future<Output = SessionIo> + 'static) {
        let session = self.session;
        self.io
            .push(Box::pin(async move { Io::Session(session, io.await) }));
    }

    /// Hands a record over. What became of it may be known at once.
    pub fn publish(&mut self, out: Outgoing<T>) -> Vec<Outcome<T>> {
        let id = RecordId(self.next_id);
        self.next_id += 1;
        self.entries.insert(
            id,
            Entry {
                tag: out.tag,
                record: out.record,
                position: out.position,
                dead_letter: out.dead_letter,
                partition: None,
                state: State::Pending,
            },
        );
        self.pending.insert(id);
        let mut outcomes = Vec::new();
        if self.pending.len() == 1 {
            self.held = Held::default();
        }
        self.try_send(id, &mut outcomes);
        outcomes
    }

    /// Whether new records go out now; false while the producer's queue is
    /// full, so the source stops reading.
    pub fn accepting(&self) -> bool {
        !(self.held.all && self.pause_until.is_some())
    }

    /// Records handed over and not yet delivered, skipped or refused.
    pub fn in_flight(&self) -> usize {
        self.entries.len()
    }

    /// Forgets every record (the source ends its session and will read
    /// them again): the open transaction is left to be aborted by the next
    /// session's takeover, and the producer is taken over again.
    pub fn discard(&mut self) -> usize {
        let dropped = self.entries.len();
        self.entries.clear();
        self.pending.clear();
        self.held = Held::default();
        self.sent = 0;
        self.must_abort = false;
        self.pause_until = None;
        self.session += 1;
        if self.txn != Txn::Off {
            self.txn = Txn::Uninitialized;
        }
        self.sink.renew_if_failed();
        dropped
    }

    /// What became of records since the last call, once something did.
    /// Cancel-safe.
    pub async fn next(&mut self) -> Result<Vec<Outcome<T>>, PublishError> {
        poll_fn(|cx| self.poll_next(cx)).await
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Vec<Outcome<T>>, PublishError>> {
        let mut outcomes = Vec::new();
        loop {
            if outcomes.is_empty() {
                if let Some(error) = self.failed.take() {
                    return Poll::Ready(Err(error));
                }
            }
            let mut changed = false;
            while let Poll::Ready(Some(delivery)) = self.sink.poll_delivery(cx) {
                self.on_delivery(delivery, &mut outcomes);
                changed = true;
            }
            while let Poll::Ready(Some(io)) = self.io.poll_next_unpin(cx) {
                self.on_io(io, &mut outcomes);
                changed = true;
            }
            if let Some(at) = self.wake_at() {
                if self.timer.deadline() != at {
                    self.timer.as_mut().reset(at);
                }
                if self.timer.as_mut().poll(cx).is_ready() {
                    if self.pause_until.is_some_and(|p| p <= Instant::now()) {
                        self.pause_until = None;
                    }
                    changed = true;
                }
            }
            if changed {
                self.end_transaction_if_due();
                self.pump(&mut outcomes);
            }
            if !outcomes.is_empty() {
                return Poll::Ready(Ok(outcomes));
            }
            if self.failed.is_some() {
                continue;
            }
            if !changed {
                return Poll::Pending;
            }
        }
    }

    fn on_delivery(&mut self, delivery: Delivery, outcomes: &mut Vec<Outcome<T>>) {
        let Some(entry) = self.entries.get_mut(&delivery.id) else {
            return; // discarded
        };
        if entry.state != State::Sent {
            return;
        }
        self.sent -= 1;
        match delivery.result {
            Ok(()) if self.txn == Txn::Off => {
                self.failures = 0;
                let entry = self.entries.remove(&delivery.id).expect("looked up above");
                outcomes.push(Outcome::Delivered {
                    tag: entry.tag,
                    topic: entry.record.topic,
                    dead_letter: entry.dead_letter,
                });
            }
            Ok(()) => {
                self.failures = 0;
                entry.state = State::Acked;
            }
            Err(error) => self.on_failure(delivery.id, error, outcomes),
        }
    }

    /// A record was not taken: send it again later, refuse it, or give up
    /// on the producer.
    fn on_failure(&mut self, id: RecordId, error: BrokerError, outcomes: &mut Vec<Outcome<T>>) {
        if self.txn != Txn::Off {
            // The transaction cannot commit now: abort it and send its
            // records again (a refused one goes back to its source).
            self.must_abort = true;
        }
        match decide(&error) {
            DeliveryDecision::EndProducer => {
                self.failed = Some(PublishError::ending(
                    error,
                    self.transactional_id.as_deref(),
                ));
            }
            DeliveryDecision::Refuse { kind } => {
                let entry = self.entries.remove(&id).expect("a record in flight");
                self.pending.remove(&id);
                tracing::warn!(topic = %entry.record.topic, reason = %error, kind, "the broker refused a record for good");
                metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "refused").increment(1);
                outcomes.push(Outcome::Refused {
                    tag: entry.tag,
                    record: entry.record,
                    error,
                    kind,
                    dead_letter: entry.dead_letter,
                });
            }
            DeliveryDecision::Retry => {
                self.failures += 1;
                let wait = backoff(self.failures.min(8), MAX_RETRY_BACKOFF);
                tracing::warn!(error = %error, retry_in = ?wait, "delivery failed; will send again");
                metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "delivery").increment(1);
                if let Some(entry) = self.entries.get_mut(&id) {
                    entry.state = State::Pending;
                    self.pending.insert(id);
                }
                self.pause(wait);
            }
        }
    }

    fn pause(&mut self, wait: Duration) {
        let until = Instant::now() + wait;
        self.pause_until = Some(self.pause_until.map_or(until, |u| u.max(until)));
        self.held.all = true;
    }

    /// When the timer must wake the publisher: a pause ends, or the open
    /// transaction has taken records long enough.
    fn wake_at(&self) -> Option<Instant> {
        let close =
            (self.txn == Txn::Open && !self.closing()).then(|| self.txn_opened_at + TXN_MAX_OPEN);
        match (self.pause_until, close) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The open transaction takes no more records: it commits once those
    /// sent are delivered.
    fn closing(&self) -> bool {
        self.txn == Txn::Open && self.txn_opened_at.elapsed() >= TXN_MAX_OPEN
    }

    fn on_io(&mut self, io: Io, outcomes: &mut Vec<Outcome<T>>) {
        let io = match io {
            Io::Prepared(topic, result) => return self.on_prepared(topic, result, outcomes),
            Io::Session(session, io) if session == self.session => io,
            Io::Session(..) => return, // of an ended session
        };
        match io {
            SessionIo::Scanned(key, started, result) => {
                if let Some(ledgers) = self.ledgers.as_mut() {
                    let result = result.map(|scan| *scan).map_err(|e| e.to_string());
                    ledgers.scanned(key, started.elapsed().as_secs_f64(), result);
                }
            }
            SessionIo::Initialized(Ok(())) => {
                tracing::debug!(id = ?self.transactional_id, "transactional producer ready");
                self.txn = Txn::Idle;
            }
            SessionIo::Initialized(Err(error)) if error.ends_producer() => {
                self.failed = Some(PublishError::Producer(error));
            }
            SessionIo::Initialized(Err(error)) => {
                self.failures += 1;
                let wait = backoff(self.failures.min(8), MAX_RETRY_BACKOFF);
                tracing::warn!(%error, retry_in = ?wait, "cannot take over the transactional id yet");
                self.pause(wait);
                self.txn = Txn::Uninitialized;
            }
            SessionIo::Committed(Ok(())) => {
                self.txn = Txn::Idle;
                let acked: Vec<RecordId> = self
                    .entries
                    .iter()
                    .filter(|(_, e)| e.state == State::Acked)
                    .map(|(id, _)| *id)
                    .collect();
                for id in acked {
                    let entry = self.entries.remove(&id).expect("listed above");
                    outcomes.push(Outcome::Delivered {
                        tag: entry.tag,
                        topic: entry.record.topic,
                        dead_letter: entry.dead_letter,
                    });
                }
            }
            SessionIo::Committed(Err(error)) | SessionIo::Aborted(Err(error))
                if error.ends_producer() =>
            {
                self.failed = Some(PublishError::ending(
                    error,
                    self.transactional_id.as_deref(),
                ));
            }
            SessionIo::Committed(Err(error)) => {
                tracing::warn!(%error, "the transaction did not commit; aborting it and sending its records again");
                metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "commit").increment(1);
                self.txn = Txn::Open;
                self.must_abort = true;
            }
            SessionIo::Aborted(result) => {
                if let Err(error) = result {
                    tracing::warn!(%error, "aborting the transaction failed; trying again");
                    self.txn = Txn::Open;
                    self.pause(backoff(1, MAX_RETRY_BACKOFF));
                    return;
                }
                // Nothing of it is visible: every record of it goes again,
                // in order.
                self.txn = Txn::Idle;
                self.must_abort = false;
                self.sent = 0;
                for (id, entry) in self.entries.iter_mut() {
                    if entry.state != State::Pending {
                        entry.state = State::Pending;
                        self.pending.insert(*id);
                    }
                }
            }
        }
    }

    fn on_prepared(
        &mut self,
        topic: String,
        result: Result<i32, TopicError>,
        outcomes: &mut Vec<Outcome<T>>,
    ) {
        let was_preparing = self.topics.is_preparing(&topic);
        let error = match result.map(|p| self.topics.prepared(&topic, p)) {
            Ok(Ok(Prepared::Ready)) => {
                tracing::debug!(topic, "topic ready");
                return;
            }
            Ok(Ok(Prepared::Grew)) => {
                if let Some(ledgers) = self.ledgers.as_mut() {
                    ledgers.forget_topic(&topic);
                }
                return;
            }
            Ok(Err(error)) | Err(error) => error,
        };
        if !was_preparing {
            if let TopicError::Shrank { .. } = error {
                self.failed = Some(PublishError::Topic(error));
            } else {
                // A refresh that failed: the known count stands.
                tracing::debug!(topic, %error, "cannot read the topic's partition count again");
                self.topics.refresh_failed(&topic);
            }
            return;
        }
        let waiting: Vec<RecordId> = self
            .pending
            .iter()
            .filter(|id| self.entries[id].record.topic == topic)
            .copied()
            .collect();
        let retry = matches!(
            error,
            TopicError::Metadata { .. }
                | TopicError::Create {
                    permanent: false,
                    ..
                }
        );
        if waiting.is_empty() && topic == self.config.dead_letter_topic {
            // Prepared ahead of need: not an error yet; the first dead
            // letter prepares it again.
            tracing::warn!(topic, %error, "cannot prepare the dead-letter topic yet");
            self.topics.forget(&topic);
            return;
        }
        if retry {
            self.failures += 1;
            let wait = backoff(self.failures, MAX_RETRY_BACKOFF);
            tracing::warn!(topic, %error, retry_in = ?wait, "topic not ready; retrying");
            metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "metadata").increment(1);
            self.topics.forget(&topic);
            self.pause(wait);
            return;
        }
        match self.config.topic_failures {
            TopicFailures::Stop => self.failed = Some(PublishError::Topic(error)),
            TopicFailures::FailRecords => {
                tracing::warn!(topic, %error, records = waiting.len(), "topic cannot be used");
                metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "topic").increment(1);
                self.topics.forget(&topic);
                for id in waiting {
                    self.pending.remove(&id);
                    let entry = self.entries.remove(&id).expect("pending");
                    outcomes.push(Outcome::Failed {
                        tag: entry.tag,
                        error: error.to_string(),
                    });
                }
            }
        }
    }

    fn prepare(&mut self, topic: &str) {
        self.prepare_with(topic, true);
        self.topics.preparing(topic);
    }

    fn prepare_with(&mut self, topic: &str, create: bool) {
        let prepare = self.sink.prepare_topic(topic, create);
        let topic = topic.to_owned();
        self.io
            .push(Box::pin(async move { Io::Prepared(topic, prepare.await) }));
    }

    /// With a transactional sink: commits the open transaction once all its
    /// records are delivered, or aborts it after a failure.
    fn end_transaction_if_due(&mut self) {
        if self.txn != Txn::Open || self.sent > 0 {
            return;
        }
        if self.must_abort {
            self.txn = Txn::Aborting;
            let abort = self.sink.abort();
            self.watch(async move { SessionIo::Aborted(abort.await) });
        } else if self.entries.values().any(|e| e.state == State::Acked) {
            self.txn = Txn::Committing;
            let commit = self.sink.commit();
            self.watch(async move { SessionIo::Committed(commit.await) });
        }
    }

    /// Whether records may be sent at all now.
    fn may_send(&mut self) -> bool {
        if self.pause_until.is_some() || self.failed.is_some() {
            return false;
        }
        match self.txn {
            Txn::Off | Txn::Idle => !self.must_abort,
            Txn::Open => !self.must_abort && !self.closing(),
            Txn::Uninitialized => {
                self.start_init();
                false
            }
            Txn::Initializing | Txn::Committing | Txn::Aborting => false,
        }
    }

    /// Offers every waiting record again, in order.
    fn pump(&mut self, outcomes: &mut Vec<Outcome<T>>) {
        self.held = Held::default();
        let waiting: Vec<RecordId> = self.pending.iter().copied().collect();
        for id in waiting {
            self.try_send(id, outcomes);
            if self.held.all {
                break;
            }
        }
        self.end_transaction_if_due();
    }

    /// Sends a waiting record if nothing holds it, or notes what does.
    fn try_send(&mut self, id: RecordId, outcomes: &mut Vec<Outcome<T>>) {
        if self.held.all || !self.may_send() {
            self.held.all = true;
            return;
        }
        let entry = &self.entries[&id];
        let topic = entry.record.topic.clone();
        if self.held.topics.contains(&topic) {
            return;
        }
        let partitions = match self.topics.readiness(&topic) {
            Readiness::Unknown => {
                self.prepare(&topic);
                self.held.topics.insert(topic);
                return;
            }
            Readiness::Waiting => {
                self.held.topics.insert(topic);
                return;
            }
            Readiness::Growing { .. } => {
                let in_flight = self
                    .entries
                    .values()
                    .any(|e| e.state != State::Pending && e.record.topic == topic);
                if in_flight {
                    self.held.topics.insert(topic);
                    return;
                }
                self.topics.grown(&topic);
                return self.try_send(id, outcomes);
            }
            Readiness::Ready {
                partitions,
                refresh,
            } => {
                if refresh {
                    self.topics.refreshing(&topic);
                    self.prepare_with(&topic, false);
                }
                partitions
            }
        };
        let entry = &self.entries[&id];
        let partition = match (&self.ledgers, entry.position) {
            (Some(_), Some(position)) => Some(partition_for(
                entry.record.key.as_deref(),
                &position,
                partitions,
            )),
            _ => None,
        };
        let key = (topic, partition.unwrap_or(-1));
        if self.held.partitions.contains(&key) {
            return;
        }
        if let (Some(ledgers), Some(position)) = (self.ledgers.as_mut(), entry.position) {
            match ledgers.verdict(&key, &position) {
                Verdict::Send => {}
                Verdict::Skip => {
                    self.pending.remove(&id);
                    let entry = self.entries.remove(&id).expect("pending");
                    metrics::counter!(m::EVENTS_SKIPPED_TOTAL).increment(1);
                    outcomes.push(Outcome::Skipped { tag: entry.tag });
                    return;
                }
                Verdict::Wait => {
                    self.held.partitions.insert(key);
                    return;
                }
                Verdict::Scan(scan) => {
                    let read = self.sink.scan_tail(&key.0, key.1, *scan);
                    let scanned = key.clone();
                    let started = Instant::now();
                    self.watch(async move {
                        SessionIo::Scanned(scanned, started, read.await.map(Box::new))
                    });
                    self.held.partitions.insert(key);
                    return;
                }
            }
        }
        if self.txn == Txn::Idle {
            if let Err(error) = self.sink.begin() {
                self.failed = Some(PublishError::ending(
                    error,
                    self.transactional_id.as_deref(),
                ));
                self.held.all = true;
                return;
            }
            self.txn = Txn::Open;
            self.txn_opened_at = Instant::now();
        }
        let entry = self.entries.get_mut(&id).expect("pending");
        entry.partition = partition;
        match self.sink.send(&entry.record, partition, id) {
            Ok(()) => {
                entry.state = State::Sent;
                self.sent += 1;
                self.pending.remove(&id);
            }
            Err(SendRefused::QueueFull) => self.pause(QUEUE_FULL_PAUSE),
            Err(SendRefused::Rejected(error)) => {
                self.held.partitions.insert(key);
                self.on_failure(id, error, outcomes);
            }
        }
    }
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
