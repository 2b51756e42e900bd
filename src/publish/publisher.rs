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
//!   transaction's records are sent again, in order. While one commits,
//!   the next takes records under another transactional id.
//! - A failed delivery is sent again after a backoff (it stays in flight
//!   meanwhile); a record the broker will never take comes back as
//!   [`Outcome::Refused`] for the source to keep it durably.
//!
//! Nothing here waits: every wait is a future or a timer that
//! [`Publisher::next`] polls, so the source's loop answers shutdown and the
//! walsender meanwhile.
//!
//! Split by concern: delivery reports (`publisher/delivery.rs`), broker I/O
//! that finished and what the transaction decides after it
//! (`publisher/io.rs`), partitions and their leaders
//! (`publisher/partitions.rs`), and cleanups of transactions left open
//! (`publisher/cleanup.rs`).

mod cleanup;
mod delivery;
mod io;
mod partitions;

use std::collections::{HashMap, HashSet};
use std::future::poll_fn;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use super::broker_io::{BrokerIo, SessionIo};
use super::error::PublishError;
use super::ledgers::{PartitionKey, PartitionLedgers, Replay, Verdict};
use super::offline::{HeldPartition, Offline};
use super::outcome::{Outcome, Outgoing, PublisherConfig};
use super::pause::Pause;
use super::records::Records;
use super::sink::{BrokerError, RecordId, SendRefused, Sink};
use super::topics::Topics;
use super::transaction::{CleanupStep, End, Transaction};
use crate::lsn::Lsn;
use crate::metrics as m;

/// How long records wait after the producer's queue turned one away:
/// less than a transaction's window (`transaction.rs`), so one whose first
/// record met a full queue still takes it rather than ending empty.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(2);

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

pub use cleanup::CLEANUP_HEADER;
use cleanup::CleanupSends;

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

    /// A transaction takes at most `records` records and `bytes` bytes:
    /// half the caller's in-flight window (`Transaction::limit`).
    pub fn limit_transactions(&mut self, records: usize, bytes: usize) {
        self.txn.limit(records, bytes);
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
            Some(CleanupStep::TakeOver(id)) => return self.take_over(id),
            Some(CleanupStep::Abort(id, partitions)) => {
                self.clean_up_under(&id, &partitions);
                return;
            }
            None => {}
        }
        // Every id the session needs, at once.
        while let Some(id) = self.txn.take_initialization() {
            self.take_over(id);
        }
    }

    /// Takes the transactional id `id` over, fencing any earlier holder.
    fn take_over(&mut self, id: String) {
        let init = self.sink.init(&id);
        self.io
            .watch(async move { SessionIo::Initialized(id, init.await) });
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
        // It may have filled the transaction.
        self.send_lingering_if_closed();
        outcomes
    }

    /// Whether new records go out now; false while the producer's queue is
    /// full or a failure is waited out, so the source stops reading.
    pub fn accepting(&self) -> bool {
        !(self.records.held.all && self.pause.is_on())
    }

    /// Partitions whose tail was read unsure in this publisher's life: the
    /// documented at-least-once fallback, where tests allow duplicates.
    #[cfg(test)]
    pub fn unsure_partitions(&self) -> HashSet<PartitionKey> {
        self.ledgers
            .as_ref()
            .map(|l| l.unsure.clone())
            .unwrap_or_default()
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

    /// Holds every record back for at least `wait`.
    fn pause(&mut self, wait: Duration) {
        self.pause.extend(wait);
        self.records.held.all = true;
    }

    /// Offers every waiting record again, in order, then ends the
    /// transaction if it is due.
    fn pump(&mut self, outcomes: &mut Vec<Outcome<T>>) {
        self.ask_after_partitions();
        loop {
            self.send_waiting(outcomes);
            match self.txn.due(self.records.sent(), self.records.any_acked()) {
                Some(End::Commit) => {
                    // What is delivered from now on is the next one's.
                    self.records.seal();
                    let commit = self.sink.commit();
                    self.io.watch(timed_commit(commit));
                    // Records waiting go at once, into the next transaction
                    // under the other id (`may_send`).
                    if self.records.next_waiting(None).is_some() {
                        continue;
                    }
                }
                Some(End::Abort) => {
                    let abort = self.sink.abort();
                    self.io
                        .watch(async move { SessionIo::Aborted(abort.await) });
                }
                Some(End::AbortPrevious) => {
                    let abort = self.under_committing(|sink| sink.abort());
                    self.io
                        .watch(async move { SessionIo::Aborted(abort.await) });
                }
                None => self.send_lingering_if_closed(),
            }
            return;
        }
    }

    /// Once the open transaction takes no more records, its producer sends
    /// what it holds back to batch at once: nothing more would join it.
    fn send_lingering_if_closed(&mut self) {
        if self.txn.send_lingering_now(self.records.sent()) {
            self.sink.send_lingering();
        }
    }

    /// Offers every waiting record, in order, until something holds all.
    fn send_waiting(&mut self, outcomes: &mut Vec<Outcome<T>>) {
        self.records.held = Default::default();
        let mut next = self.records.next_waiting(None);
        while let Some(id) = next {
            self.try_send(id, outcomes);
            if self.records.held.all {
                break;
            }
            next = self.records.next_waiting(Some(id));
        }
    }

    /// Calls the sink through the producer of the transaction before the
    /// open one (the current one's if none), then goes back to the current.
    fn under_committing<R>(&mut self, call: impl FnOnce(&mut S) -> R) -> R {
        let Some(id) = self.txn.committing_id() else {
            return call(&mut self.sink);
        };
        self.sink.switch_to(&id);
        let result = call(&mut self.sink);
        if let Some(current) = self.txn.id.clone() {
            self.sink.switch_to(&current);
        }
        result
    }

    /// Whether records may be sent at all now.
    fn may_send(&mut self) -> bool {
        if self.pause.is_on() || self.failed.is_some() {
            return false;
        }
        self.initialize_if_needed();
        // A record to send while the transaction commits: the next one
        // begins under the other id at once (`transaction/overlap.rs`).
        if let Some(id) = self.txn.overlap() {
            self.sink.switch_to(&id);
        }
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
        let bytes = entry.record.size();
        match self.sink.send(&entry.record, key.partition, send) {
            Ok(()) => {
                self.records.mark_sent(send, key.partition);
                self.txn.sent_to(&key, bytes);
                self.used_in_session.insert(key);
            }
            Err(SendRefused::QueueFull) => self.pause(QUEUE_FULL_PAUSE),
            Err(SendRefused::Rejected(error)) => {
                self.records.held.partitions.insert(key);
                self.on_failure(id, error, outcomes);
            }
        }
    }
}

/// A commit's answer, with how long the commit took: a record sent exactly
/// once is readable only once its transaction's commit returns.
async fn timed_commit(commit: impl Future<Output = Result<(), BrokerError>>) -> SessionIo {
    let started = Instant::now();
    let result = commit.await;
    metrics::histogram!(m::KAFKA_COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
    SessionIo::Committed(result)
}
