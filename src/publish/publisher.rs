//! The publisher: sources hand it records, it gets them into Kafka, and it
//! says what became of each ([`Outcome`]), returned from the call that
//! learnt it.
//!
//! - Records go to the broker in the order they were handed over, per
//!   partition: a record that must wait (its topic is being prepared, its
//!   partition's tail is being read, it waits to be sent again, the
//!   producer's queue is full) holds every later record of its partition,
//!   and a full queue holds everything (`records.rs`).
//! - Exactly once: walrelay picks each record's partition (`partitioner`)
//!   and skips what the partition already holds (`ledgers`).
//! - Transactions (a transactional sink, `transaction.rs`): a record counts
//!   as delivered only once its transaction commits; an aborted
//!   transaction's records are sent again, in order.
//! - A failed delivery is sent again after a backoff (it stays in flight
//!   meanwhile); a record the broker will never take comes back as
//!   [`Outcome::Refused`] for the source to keep it durably.
//!
//! Nothing here waits: every wait is a future or a timer that
//! [`Publisher::next`] polls, so the source's loop answers shutdown and the
//! walsender meanwhile.

use std::collections::{HashMap, HashSet};
use std::future::poll_fn;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use super::broker_io::{BrokerIo, Io, SessionIo};
use super::error::{DeliveryDecision, PublishError, decide};
use super::ledgers::{PartitionKey, PartitionLedgers, Replay, Verdict};
use super::offline::{HeldPartition, Offline};
use super::outcome::{Outcome, Outgoing, PublisherConfig, TopicFailures};
use super::partitioner::partition_for;
use super::pause::Pause;
use super::records::{Entry, Records};
use super::scan::LedgerScan;
use super::sink::{
    BrokerError, BrokerErrorClass, Delivery, LocalBoxFuture, RecordId, SendId, SendRefused, Sink,
    TopicError,
};
use super::topics::{Prepared, Readiness, Topics};
use super::transaction::{CleanupStep, End, Next, Transaction};
use crate::lsn::Lsn;
use crate::metrics as m;
use crate::record::KafkaRecord;
use bytes::Bytes;

/// How long records wait after the producer's queue turned one away.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(5);

pub struct Publisher<S: Sink, T> {
    sink: S,
    config: PublisherConfig,
    records: Records<T>,
    topics: Topics,
    ledgers: Option<PartitionLedgers>,
    txn: Transaction,
    offline: Offline,
    io: BrokerIo,
    pause: Pause,
    /// An error to return from the next call of `next`.
    failed: Option<PublishError>,
    /// Partitions cleaned up in this session (once each).
    cleaned: HashSet<PartitionKey>,
    /// Partitions this session sent events to, or skipped events as
    /// already there: a transaction left open there may hold events it
    /// counts as delivered.
    used_in_session: HashSet<PartitionKey>,
    /// The earliest commit position of the events handed over in this
    /// session: every event committed from there on is streamed by it.
    replayed_from: Option<Lsn>,
    /// Partitions whose tail an open transaction hides, since when.
    hidden: HashMap<PartitionKey, Instant>,
    /// The cleanup under way: its partitions, which were written, how many
    /// reports are outstanding, and its round (late reports of an earlier
    /// round are passed over).
    cleanup: CleanupSends,
}

#[derive(Default)]
struct CleanupSends {
    round: u16,
    partitions: Vec<PartitionKey>,
    written: Vec<PartitionKey>,
    outstanding: usize,
}

/// Whether a cleanup of `key`, whose tail an open transaction hides, is
/// scheduled (once a session): where an id's last transaction there was
/// aborted, or where all the transaction hides is events this session
/// streams again (from `replayed_from`) and the session has not used the
/// partition yet, so nothing there counts as delivered.
fn clean_up(
    txn: &mut Transaction,
    cleaned: &mut HashSet<PartitionKey>,
    used_in_session: &HashSet<PartitionKey>,
    replayed_from: Option<Lsn>,
    key: &PartitionKey,
    scan: &LedgerScan,
) -> bool {
    if cleaned.contains(key) {
        return false;
    }
    let replayed = !used_in_session.contains(key)
        && replayed_from.is_some_and(|from| scan.hides_only_replayed(from));
    let scheduled = txn.clean_up(key) || (replayed && txn.clean_up_unconfirmed(key));
    if scheduled {
        cleaned.insert(key.clone());
    }
    scheduled
}

/// Cleanup records' ids count down from here, one per partition: never
/// one of a record in hand, so the records' bookkeeping passes them over.
const CLEANUP_RECORDS: u64 = (1 << 48) - 1;
/// At most this many partitions in one cleanup (the ids below are the
/// records').
const CLEANUP_PARTITIONS: u64 = 1 << 16;

/// A cleanup record's index among its cleanup's partitions.
fn cleanup_index(id: RecordId) -> Option<usize> {
    CLEANUP_RECORDS
        .checked_sub(id.0)
        .filter(|index| *index < CLEANUP_PARTITIONS)
        .map(|index| index as usize)
}
/// How long a cleanup waits for its records to be written before it
/// aborts anyway (a partition that cannot be written is not cleaned):
/// below the broker-stall timeout's default (5 s).
const CLEANUP_WAIT: Duration = Duration::from_secs(4);
/// How long a partition whose tail an open transaction hides is read
/// again, waiting for Kafka to end that transaction, before its events are
/// published again unsure: past the transaction timeout (60 s), after
/// which the broker aborts an abandoned producer's transaction.
const HIDDEN_WAIT: Duration = Duration::from_secs(75);
/// How often it is read again meanwhile.
const HIDDEN_RETRY: Duration = Duration::from_secs(2);
/// The header a cleanup record carries.
pub const CLEANUP_HEADER: &str = "walrelay_cleanup";

impl<S: Sink, T: Copy> Publisher<S, T> {
    pub fn new(sink: S, config: PublisherConfig) -> Self {
        let mut publisher = Publisher {
            ledgers: config.exactly_once.clone().map(PartitionLedgers::new),
            txn: Transaction::new(sink.transactional()),
            offline: Offline::default(),
            sink,
            records: Records::new(),
            topics: Topics::default(),
            io: BrokerIo::new(),
            pause: Pause::new(),
            failed: None,
            cleaned: HashSet::new(),
            used_in_session: HashSet::new(),
            replayed_from: None,
            cleanup: CleanupSends::default(),
            hidden: HashMap::new(),
            config,
        };
        // The dead-letter topic is made ready before a record needs it.
        let dead_letters = publisher.config.dead_letter_topic.clone();
        publisher.prepare(&dead_letters, true);
        publisher
    }

    /// A session starts, nothing in flight: exactly once, partitions are
    /// read again on first use; with transactions, the producer takes over
    /// `transactional_id` first, fencing any earlier holder of it.
    pub fn begin_session(&mut self, replay: Option<Replay>, transactional_id: Option<String>) {
        self.io.new_session();
        self.cleaned.clear();
        self.used_in_session.clear();
        self.replayed_from = None;
        self.hidden.clear();
        self.cleanup.outstanding = 0;
        if let (Some(ledgers), Some(replay)) = (self.ledgers.as_mut(), replay) {
            ledgers.begin(replay);
        }
        self.txn.restart(transactional_id);
        self.initialize_if_needed();
    }

    fn initialize_if_needed(&mut self) {
        match self.txn.next_cleanup() {
            Some(CleanupStep::TakeOver(id)) => {
                let init = self.sink.init(&id);
                self.io
                    .watch(async move { SessionIo::Initialized(init.await) });
                return;
            }
            Some(CleanupStep::Abort(id, partitions)) => {
                self.clean_up_under(&id, &partitions);
                return;
            }
            None => {}
        }
        if let Some(id) = self.txn.take_initialization() {
            let init = self.sink.init(&id);
            self.io
                .watch(async move { SessionIo::Initialized(init.await) });
        }
    }

    /// Hands a record over. What became of it may be known at once.
    pub fn publish(&mut self, out: Outgoing<T>) -> Vec<Outcome<T>> {
        if let Some(position) = &out.position {
            self.replayed_from = Some(
                self.replayed_from
                    .map_or(position.commit, |from| from.min(position.commit)),
            );
        }
        let id = self
            .records
            .add(out.tag, out.record, out.position, out.dead_letter);
        let mut outcomes = Vec::new();
        self.try_send(id, &mut outcomes);
        outcomes
    }

    /// Whether new records go out now; false while the producer's queue is
    /// full or a failure is waited out, so the source stops reading.
    pub fn accepting(&self) -> bool {
        !(self.records.held.all && self.pause.is_on())
    }

    /// Records handed over and not yet settled.
    pub fn in_flight(&self) -> usize {
        self.records.len()
    }

    /// Partitions with no leader whose records wait, and since when.
    pub fn held_partitions(&self) -> Vec<HeldPartition> {
        self.offline.snapshot()
    }

    /// Shows the partitions whose records wait on `board` (the dashboard's).
    pub fn share_held_partitions(&mut self, board: crate::live::HeldPartitions) {
        self.offline.share(board);
    }

    /// Forgets every record (the source ends its session and will read
    /// them again): the open transaction is left to be aborted by the next
    /// session's takeover, and the producer is taken over again.
    pub fn discard(&mut self) -> usize {
        self.pause.clear();
        self.replayed_from = None;
        self.cleanup.outstanding = 0;
        self.io.new_session();
        self.txn.abandon();
        self.sink.renew_if_failed();
        self.records.clear()
    }

    /// What became of records since the last call, once something did.
    /// Cancel-safe: everything learnt in one poll is returned by it.
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
            while let Poll::Ready(Some(io)) = self.io.poll_next(cx) {
                self.on_io(io, &mut outcomes);
                changed = true;
            }
            // The timer wakes the publisher when a pause ends, when the
            // open transaction stops taking records, or when partitions
            // should be asked after (`offline.rs`).
            let ask_at = self.offline.ask_at(self.records.oldest_outstanding());
            let wake_at = match (self.txn.closes_at(), ask_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if self.pause.poll_timer(cx, wake_at) {
                changed = true;
            }
            if changed {
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
        if let Some(index) = cleanup_index(delivery.send.id) {
            let current = delivery.send.attempt == self.cleanup.round
                && self.cleanup.outstanding > 0
                && self.txn.is_cleaning();
            if let Some(key) = self.cleanup.partitions.get(index).filter(|_| current) {
                match &delivery.result {
                    Ok(()) => self.cleanup.written.push(key.clone()),
                    Err(error) => {
                        tracing::warn!(%error, topic = %key.topic, partition = key.partition, "a cleanup record was not written: what was left open there stays")
                    }
                }
                self.cleanup.outstanding -= 1;
                if self.cleanup.outstanding == 0 {
                    self.abort_cleanup();
                }
            }
            return;
        }
        if !self.records.reported(delivery.send) {
            return; // discarded, settled, or a report of an earlier send
        }
        let id = delivery.send.id;
        match delivery.result {
            Ok(()) => {
                self.pause.succeeded();
                if self.txn.is_on() {
                    self.records.mark_acked(id);
                } else {
                    let entry = self.records.remove(id).expect("reported");
                    outcomes.push(Outcome::Delivered {
                        tag: entry.tag,
                        topic: entry.record.topic,
                        dead_letter: entry.dead_letter,
                    });
                }
            }
            // The transaction is being aborted: its records not yet
            // written are purged, and go again once it ends.
            Err(_) if self.txn.is_aborting() => self.records.requeue(id),
            Err(error) => self.on_failure(id, error, outcomes),
        }
    }

    /// A record was not taken: send it again later, refuse it, or give up
    /// on the producer.
    fn on_failure(&mut self, id: RecordId, error: BrokerError, outcomes: &mut Vec<Outcome<T>>) {
        // The transaction cannot commit now: it is aborted and its records
        // sent again (a refused one goes back to its source).
        self.txn.fail();
        match decide(&error) {
            DeliveryDecision::EndProducer => {
                self.failed = Some(PublishError::ending(error, self.txn.id.as_deref()));
            }
            DeliveryDecision::Refuse { kind } => {
                let entry = self.records.remove(id).expect("a record in flight");
                tracing::warn!(topic = %entry.record.topic, reason = %error, kind = kind.as_str(), "the broker refused a record for good");
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
                let wait = self.pause.failed();
                tracing::warn!(error = %error, retry_in = ?wait, "delivery failed; will send again");
                metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "delivery").increment(1);
                self.records.requeue(id);
                self.pause(wait);
            }
        }
    }

    /// Holds every record back for at least `wait`.
    fn pause(&mut self, wait: Duration) {
        self.pause.extend(wait);
        self.records.held.all = true;
    }

    fn on_io(&mut self, io: Io, outcomes: &mut Vec<Outcome<T>>) {
        let io = match io {
            Io::Prepared(topic, result) => return self.on_prepared(topic, result, outcomes),
            Io::Asked(asked, result) => return self.on_asked(asked, result, outcomes),
            Io::Session(io) => io,
            Io::Ended => return,
        };
        match io {
            SessionIo::Scanned(key, started, result) => {
                let Some(ledgers) = self.ledgers.as_mut() else {
                    return;
                };
                match result {
                    // The broker is away, or reading is not allowed yet:
                    // publishing blind would duplicate what the partition
                    // holds, and nothing can be sent meanwhile anyway. Its
                    // records wait; the tail is read again.
                    Err(error)
                        if matches!(
                            error.class,
                            BrokerErrorClass::Transient | BrokerErrorClass::NotAuthorized
                        ) =>
                    {
                        let wait = self.pause.failed();
                        self.offline.read_failed(&key);
                        if error.class == BrokerErrorClass::NotAuthorized {
                            tracing::error!(topic = %key.topic, partition = key.partition, %error, "exactly once reads each partition's tail, and this principal may not: grant it READ on the topic (or run --delivery at-least-once); its records wait");
                        } else {
                            tracing::warn!(topic = %key.topic, partition = key.partition, %error, retry_in = ?wait, "cannot read the partition's tail yet; its records wait");
                        }
                        let scan = ledgers.rescan(&key);
                        let read = self.read_tail(&key, scan);
                        self.io.watch(async move {
                            tokio::time::sleep(wait).await;
                            SessionIo::Scanned(key, started, read.await.map(Box::new))
                        });
                    }
                    // An open transaction hides the tail: it may be one of
                    // this relay's ids, left open by a partition that had no
                    // leader. Clean up once, then read it again.
                    Ok(scan)
                        if scan.is_hidden()
                            && self.txn.is_on()
                            && clean_up(
                                &mut self.txn,
                                &mut self.cleaned,
                                &self.used_in_session,
                                self.replayed_from,
                                &key,
                                &scan,
                            ) => {}
                    // No id of this session may end it: Kafka does, once
                    // the transaction times out (an abandoned producer's) or
                    // its markers are written. Read again until then; only
                    // past that is the tail taken as unsure (published
                    // again, at least once).
                    Ok(scan)
                        if scan.is_hidden()
                            && self.txn.is_on()
                            && self
                                .hidden
                                .entry(key.clone())
                                .or_insert_with(Instant::now)
                                .elapsed()
                                < HIDDEN_WAIT =>
                    {
                        tracing::info!(topic = %key.topic, partition = key.partition, "an open transaction hides the partition's newest records: reading it again until Kafka ends it");
                        self.io.watch(async move {
                            tokio::time::sleep(HIDDEN_RETRY).await;
                            SessionIo::ReadHiddenAgain(key)
                        });
                    }
                    result => {
                        self.hidden.remove(&key);
                        self.offline.read_done(&key);
                        let result = result.map(|scan| *scan).map_err(|e| e.to_string());
                        ledgers.scanned(key, started.elapsed().as_secs_f64(), result);
                    }
                }
            }
            SessionIo::Initialized(result) => {
                let next = self.txn.initialized(result);
                self.follow(next, outcomes);
            }
            SessionIo::Committed(result) => {
                tracing::debug!(?result, id = ?self.txn.id, "commit finished");
                let next = self.txn.committed(result);
                self.follow(next, outcomes);
                if let Some(next) = self.txn.rest_if_stuck() {
                    self.follow(next, outcomes);
                }
            }
            SessionIo::Aborted(result) if self.txn.is_cleaning() => {
                tracing::debug!(?result, written = ?self.cleanup.written, "cleanup abort finished");
                match self.txn.cleaned(result, &self.cleanup.written) {
                    Next::Pause(wait) => {
                        let abort = self.sink.abort();
                        self.io.watch(async move {
                            tokio::time::sleep(wait).await;
                            SessionIo::Aborted(abort.await)
                        });
                    }
                    next => {
                        self.follow(next, outcomes);
                        if let Some(next) = self.txn.rest_if_stuck() {
                            self.follow(next, outcomes);
                        }
                    }
                }
            }
            SessionIo::Aborted(result) => {
                tracing::debug!(?result, id = ?self.txn.id, acked = self.records.any_acked(), "abort finished");
                let next = self.txn.aborted(result, self.records.any_acked());
                self.follow(next, outcomes);
            }
            SessionIo::ReadHiddenAgain(key) => {
                if let Some(ledgers) = self.ledgers.as_mut() {
                    let scan = ledgers.rescan(&key);
                    let read = self.read_tail(&key, scan);
                    let started = Instant::now();
                    self.io.watch(async move {
                        SessionIo::Scanned(key, started, read.await.map(Box::new))
                    });
                }
            }
            SessionIo::CleanupWaited(round) => {
                if round == self.cleanup.round
                    && self.cleanup.outstanding > 0
                    && self.txn.is_cleaning()
                {
                    tracing::warn!(waiting = ?self.cleanup.partitions, "cleanup records not written in time: aborting without them");
                    self.cleanup.outstanding = 0;
                    self.abort_cleanup();
                }
            }
        }
    }

    /// Ends what `id` left open in `partitions`: a transaction with one
    /// record to each, aborted (`transaction.rs`).
    fn clean_up_under(&mut self, id: &str, partitions: &[PartitionKey]) {
        self.sink.switch_to(id);
        if let Err(error) = self.sink.begin() {
            self.failed = Some(PublishError::ending(error, Some(id)));
            return;
        }
        let round = self.cleanup.round.wrapping_add(1);
        self.cleanup = CleanupSends {
            round,
            partitions: partitions.to_vec(),
            written: Vec::new(),
            outstanding: 0,
        };
        for (index, PartitionKey { topic, partition }) in partitions
            .iter()
            .take(CLEANUP_PARTITIONS as usize)
            .enumerate()
        {
            let record = KafkaRecord {
                topic: topic.clone(),
                key: Some(Bytes::from_static(b"walrelay-cleanup")),
                value: Some(Bytes::new()),
                headers: vec![(
                    CLEANUP_HEADER.into(),
                    Bytes::from_static(b"an aborted record ending a transaction left open"),
                )],
            };
            let send = SendId {
                id: RecordId(CLEANUP_RECORDS - index as u64),
                attempt: round,
            };
            match self.sink.send(&record, *partition, send) {
                Ok(()) => self.cleanup.outstanding += 1,
                Err(refused) => {
                    tracing::debug!(
                        ?refused,
                        topic,
                        partition,
                        "the cleanup record was not queued"
                    )
                }
            }
        }
        // Aborted once written: a record never sent would not put the
        // partition in the transaction, and the abort would end nothing
        // there.
        if self.cleanup.outstanding == 0 {
            self.abort_cleanup();
        } else {
            self.io.watch(async move {
                tokio::time::sleep(CLEANUP_WAIT).await;
                SessionIo::CleanupWaited(round)
            });
        }
    }

    fn abort_cleanup(&mut self) {
        let abort = self.sink.abort();
        self.io
            .watch(async move { SessionIo::Aborted(abort.await) });
    }

    /// Asks the sink which partitions have no leader, if it is time: those
    /// of records outstanding for a while, those the transaction touched,
    /// and those held.
    fn ask_after_partitions(&mut self) {
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
    fn on_asked(
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

    /// Does what the transaction decided after its I/O.
    fn follow(&mut self, next: Next, outcomes: &mut Vec<Outcome<T>>) {
        match next {
            Next::Go => {}
            Next::Use(id) => self.sink.switch_to(&id),
            Next::CleanUp(id, partitions) => self.clean_up_under(&id, &partitions),
            Next::CleanupGivenUp(abandon, partitions) => {
                self.sink.abandon(&abandon);
                if let Some(id) = self.txn.id.clone() {
                    self.sink.switch_to(&id);
                }
                if let Some(ledgers) = self.ledgers.as_mut() {
                    for key in &partitions {
                        ledgers.forget_partition(key);
                    }
                }
            }
            Next::Cleaned(id, partitions) => {
                if let Some(id) = id {
                    self.sink.switch_to(&id);
                }
                if let Some(ledgers) = self.ledgers.as_mut() {
                    for key in &partitions {
                        ledgers.forget_partition(key);
                    }
                }
            }
            Next::Rest { abandon, next } => {
                metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "partition_offline")
                    .increment(1);
                self.sink.abandon(&abandon);
                self.records.requeue_all();
                match next {
                    Some(id) => {
                        tracing::info!(stuck = %abandon, now = %id, "records go on under the spare transactional id");
                        self.sink.switch_to(&id);
                    }
                    None => {
                        tracing::warn!(stuck = %abandon, "every transactional id waits for an offline partition: records wait until one is back")
                    }
                }
            }
            Next::Deliver => {
                for entry in self.records.take_acked() {
                    outcomes.push(Outcome::Delivered {
                        tag: entry.tag,
                        topic: entry.record.topic,
                        dead_letter: entry.dead_letter,
                    });
                }
            }
            Next::SendAgain => self.records.requeue_all(),
            Next::CommitAgain => {
                let commit = self.sink.commit();
                self.io.watch(async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    SessionIo::Committed(commit.await)
                });
            }
            Next::BackOff => {
                let wait = self.pause.failed();
                self.pause(wait);
            }
            Next::Pause(wait) => self.pause(wait),
            Next::EndProducer(error) => {
                self.failed = Some(PublishError::ending(error, self.txn.id.as_deref()));
            }
        }
    }

    fn on_prepared(
        &mut self,
        topic: String,
        result: Result<i32, TopicError>,
        outcomes: &mut Vec<Outcome<T>>,
    ) {
        let first_time = self.topics.is_preparing(&topic);
        let error = match result.map(|p| self.topics.prepared(&topic, p)) {
            Ok(Ok(Prepared::Ready)) => return,
            Ok(Ok(Prepared::Grew)) => {
                if let Some(ledgers) = self.ledgers.as_mut() {
                    ledgers.forget_topic(&topic);
                }
                return;
            }
            Ok(Err(error)) | Err(error) => error,
        };
        if !first_time {
            if let TopicError::Shrank { .. } = error {
                self.failed = Some(PublishError::Topic(error));
            } else {
                // A refresh that failed: the known count stands.
                tracing::debug!(topic, %error, "cannot read the topic's partition count again");
                self.topics.refresh_failed(&topic);
            }
            return;
        }
        self.topics.forget(&topic);
        let waiting = self.records.waiting_for(&topic);
        if waiting.is_empty() && topic == self.config.dead_letter_topic {
            // Prepared ahead of need: the first dead letter prepares it again.
            tracing::warn!(topic, %error, "cannot prepare the dead-letter topic yet");
            return;
        }
        let retry = matches!(
            error,
            TopicError::Metadata { .. }
                | TopicError::Create {
                    permanent: false,
                    ..
                }
        );
        if retry {
            let wait = self.pause.failed();
            tracing::warn!(topic, %error, retry_in = ?wait, "topic not ready; retrying");
            metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "metadata").increment(1);
            self.pause(wait);
            return;
        }
        match self.config.topic_failures {
            TopicFailures::Stop => self.failed = Some(PublishError::Topic(error)),
            TopicFailures::FailRecords => {
                tracing::warn!(topic, %error, records = waiting.len(), "topic cannot be used");
                metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "topic").increment(1);
                for id in waiting {
                    let entry = self.records.remove(id).expect("waiting");
                    outcomes.push(Outcome::Failed {
                        tag: entry.tag,
                        error: error.to_string(),
                    });
                }
            }
        }
    }

    /// Prepares `topic` (creating it when `create`), or reads its count
    /// again.
    fn prepare(&mut self, topic: &str, create: bool) {
        if create {
            self.topics.preparing(topic);
        } else {
            self.topics.refreshing(topic);
        }
        let prepare = self.sink.prepare_topic(topic, create);
        self.io.watch_topic(topic.to_owned(), prepare);
    }

    /// Offers every waiting record again, in order, then ends the
    /// transaction if it is due.
    fn pump(&mut self, outcomes: &mut Vec<Outcome<T>>) {
        self.ask_after_partitions();
        self.records.held = Default::default();
        let mut next = self.records.next_waiting(None);
        while let Some(id) = next {
            self.try_send(id, outcomes);
            if self.records.held.all {
                break;
            }
            next = self.records.next_waiting(Some(id));
        }
        match self.txn.due(self.records.sent(), self.records.any_acked()) {
            Some(End::Commit) => {
                let commit = self.sink.commit();
                self.io
                    .watch(async move { SessionIo::Committed(commit.await) });
            }
            Some(End::Abort) => {
                let abort = self.sink.abort();
                self.io
                    .watch(async move { SessionIo::Aborted(abort.await) });
            }
            None => {}
        }
    }

    /// Whether records may be sent at all now.
    fn may_send(&mut self) -> bool {
        if self.pause.is_on() || self.failed.is_some() {
            return false;
        }
        self.initialize_if_needed();
        self.txn.may_send()
    }

    /// Sends a waiting record if nothing holds it, or notes what does.
    fn try_send(&mut self, id: RecordId, outcomes: &mut Vec<Outcome<T>>) {
        if self.records.held.all || !self.may_send() {
            self.records.held.all = true;
            return;
        }
        let Some(key) = self.partition_of(id) else {
            return; // its topic holds it
        };
        if self.records.held.partitions.contains(&key) {
            return;
        }
        if self.offline.holds(&key) {
            self.records.held.partitions.insert(key);
            return;
        }
        let entry = self.records.get(id).expect("waiting");
        if let (Some(ledgers), Some(position), Some(partition)) =
            (self.ledgers.as_mut(), entry.position, key.partition)
        {
            match ledgers.verdict(&key, &position) {
                Verdict::Send => {}
                Verdict::Skip => {
                    self.used_in_session.insert(key);
                    let entry = self.records.remove(id).expect("waiting");
                    metrics::counter!(m::EVENTS_SKIPPED_TOTAL).increment(1);
                    outcomes.push(Outcome::Skipped { tag: entry.tag });
                    return;
                }
                Verdict::Wait => {
                    self.records.held.partitions.insert(key);
                    return;
                }
                Verdict::Scan(scan) => {
                    let read = self.sink.scan_tail(&key.topic, partition, *scan);
                    let (scanned, started) = (key.clone(), Instant::now());
                    self.io.watch(async move {
                        SessionIo::Scanned(scanned, started, read.await.map(Box::new))
                    });
                    self.records.held.partitions.insert(key);
                    return;
                }
            }
        }
        if self.txn.needs_begin() {
            if let Err(error) = self.sink.begin() {
                self.failed = Some(PublishError::ending(error, self.txn.id.as_deref()));
                self.records.held.all = true;
                return;
            }
            self.txn.began(self.records.len());
        }
        let send = self.records.next_send(id);
        let entry = self.records.get(id).expect("waiting");
        match self.sink.send(&entry.record, key.partition, send) {
            Ok(()) => {
                self.records.mark_sent(send, key.partition);
                self.txn.sent_to(&key);
                self.used_in_session.insert(key);
            }
            Err(SendRefused::QueueFull) => self.pause(QUEUE_FULL_PAUSE),
            Err(SendRefused::Rejected(error)) => {
                self.records.held.partitions.insert(key);
                self.on_failure(id, error, outcomes);
            }
        }
    }

    /// The partition a waiting record goes to, or `None` while its topic
    /// holds it.
    fn partition_of(&mut self, id: RecordId) -> Option<PartitionKey> {
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
    fn pick_partition(&self, entry: &Entry<T>, partitions: i32) -> Option<i32> {
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
    fn read_tail(
        &self,
        key: &PartitionKey,
        scan: LedgerScan,
    ) -> LocalBoxFuture<Result<LedgerScan, BrokerError>> {
        let partition = key
            .partition
            .expect("a scanned partition was picked by walrelay");
        self.sink.scan_tail(&key.topic, partition, scan)
    }

    /// Whether every record in hand waits for a partition with no leader:
    /// nothing else is outstanding, so nothing else can make progress.
    pub fn waits_only_for_offline(&self) -> bool {
        if self.offline.is_empty()
            || self.records.len() == 0
            || self.records.sent() > 0
            || self.records.any_acked()
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
