//! The transaction, with a transactional sink: one open at a time; it takes
//! records for a short while, then holds new ones back until those sent are
//! delivered, and commits (or aborts after a failure).
//!
//! ```text
//!   Uninitialized ─init─> Initializing ─> Idle ─first record─> Open ─closing, all delivered─> Committing ─> Idle
//!                                                               │ a record failed                  │ failed
//!                                                               └───────────> Aborting ─> Idle <────┘ (records sent again)
//! ```
//!
//! # A partition with no leader
//!
//! Kafka ends a transaction only once it has written its marker into every
//! partition the transaction touched. So a transaction that touched a
//! partition whose every replica is offline cannot end until that
//! partition is back, and until then its transactional id can begin no
//! other. Each session therefore takes over two ids, `<id>` and
//! `<id>.spare`. When a partition the current id touched (in the open
//! transaction, or the one before, whose markers may still be unwritten)
//! has no leader, that id is *stuck*: its open transaction is aborted (its
//! records are sent again), its producer dropped, and it rests until the
//! partition is back, while the other id carries the records of every
//! other partition. The publisher keeps the offline partition's records
//! out of transactions meanwhile (`offline.rs`).
//!
//! # A transaction left open
//!
//! A transaction that touched a partition while it had no leader can be
//! left open in that partition's log once it is back (its marker never
//! written): it hides everything after it from `read_committed` readers,
//! and a later commit marker of the same producer would make its aborted
//! records visible. Kafka ends a producer's open transaction in a
//! partition with that producer's next marker there, as that marker says.
//! So when a tail read finds the partition hidden by an open transaction,
//! each id whose last transaction there was *aborted* (known in this
//! process) cleans up: it is taken over again if it must be, begins a
//! transaction, sends one record to the partition, waits until it is
//! written, and aborts, which ends what it left open there as aborted.
//! So does every id not resting, in a session that has not used the
//! partition yet, when all that is hidden (read uncommitted) is this
//! relay's records of events the session streams again: none was confirmed
//! before, and the session sends again what the tail lacks
//! (`LedgerScan::hides_only_replayed`). The tail is then read again.
//! Where neither holds (an id's last transaction there committed, another
//! source's records, an event from before the session's stream), nothing
//! is ended (an abort could take back committed events): the tail is read
//! again until Kafka ends it; past `HIDDEN_WAIT` (publisher.rs) the read
//! counts as unsure and the partition's events are published again
//! (duplicates possible, never a loss).

use std::collections::HashSet;
use std::time::Duration;

use tokio::time::Instant;

use super::ledgers::PartitionKey;
use super::sink::{BrokerError, BrokerErrorClass};
use crate::metrics as m;

/// How long a transaction takes new records; then they wait while it
/// commits. Short, because its records count as delivered only once it
/// commits; librdkafka sends what lingers at once when a commit begins.
const MAX_OPEN: Duration = Duration::from_millis(10);
/// How long a transaction takes records when a backlog waits at its start
/// (`BACKLOG` records or more): a commit costs a round trip to the
/// coordinator with new records held, so a drain commits fewer, larger
/// transactions; a steady stream keeps the short window and its latency.
const BACKLOG_OPEN: Duration = Duration::from_millis(50);
const BACKLOG: usize = 1000;

/// The suffix of the spare transactional id.
pub const SPARE_SUFFIX: &str = ".spare";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Not transactional.
    Off,
    /// No session yet, an id still to take over, or no id to use.
    Uninitialized,
    Initializing,
    Idle,
    Open {
        since: Instant,
        open_for: Duration,
    },
    Committing,
    Aborting,
    /// A cleanup transaction is being aborted.
    Cleaning,
}

/// What to do with the transaction now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Commit,
    Abort,
}

impl State {
    /// Open, and taking no more records.
    fn closed() -> Self {
        State::Open {
            since: Instant::now(),
            open_for: Duration::ZERO,
        }
    }
}

/// What the publisher does once a takeover, a commit or an abort finished.
#[derive(Debug)]
pub enum Next {
    /// Nothing more: records flow (or wait for the next attempt, already set).
    Go,
    /// Records go through this id's producer from now on.
    Use(String),
    /// Committed: its acknowledged records are delivered.
    Deliver,
    /// Aborted: nothing of it is visible; every record of it goes again,
    /// in order.
    SendAgain,
    /// The current id is stuck on a partition without a leader: drop its
    /// producer, send every record again, through `next` if there is an
    /// id to use (else records wait until one is back).
    Rest {
        abandon: String,
        next: Option<String>,
    },
    /// The commit may still complete (aborting could make its records
    /// visible twice once they are sent again): commit again shortly.
    CommitAgain,
    /// Clean up: begin a transaction under the current producer (the id
    /// given, taken over), send one record to each of the partitions, and
    /// abort it.
    CleanUp(String, Vec<PartitionKey>),
    /// The cleanup is done: records go through this id again, and the
    /// partitions' tails are read again.
    Cleaned(Option<String>, Vec<PartitionKey>),
    /// The cleanup was given up: drop this id's producer, go on with the
    /// current one, and read the partitions' tails again.
    CleanupGivenUp(String, Vec<PartitionKey>),
    /// A failure to wait out, counted in the publisher's backoff.
    BackOff,
    /// Hold every record back this long.
    Pause(Duration),
    /// The producer cannot go on.
    EndProducer(BrokerError),
}

/// One transactional id of the session.
#[derive(Debug)]
struct TxnId {
    name: String,
    /// Taken over in this session, its producer alive.
    ready: bool,
    /// Stuck: it is not used until each of these partitions has a leader
    /// again.
    resting: HashSet<PartitionKey>,
    /// Partitions of its open transaction.
    touched: HashSet<PartitionKey>,
    /// Partitions of its transaction before (its markers may still be
    /// unwritten).
    previous: HashSet<PartitionKey>,
    /// Partitions where its last transaction was aborted: one it left open
    /// there may be ended with an abort.
    aborted_in: HashSet<PartitionKey>,
    /// Partitions it must clean up (abort one record in).
    to_clean: HashSet<PartitionKey>,
}

impl TxnId {
    fn new(name: String) -> Self {
        TxnId {
            name,
            ready: false,
            resting: HashSet::new(),
            touched: HashSet::new(),
            previous: HashSet::new(),
            aborted_in: HashSet::new(),
            to_clean: HashSet::new(),
        }
    }
}

#[derive(Debug)]
pub struct Transaction {
    state: State,
    /// A record of the open transaction failed: it must be aborted.
    must_abort: bool,
    /// This session's ids: `<id>` and `<id>.spare`.
    ids: Vec<TxnId>,
    /// The id in use, if any.
    current: Option<usize>,
    /// The id being taken over.
    initializing: Option<usize>,
    /// The current id is stuck on these partitions: end its transaction
    /// and rest it.
    stuck: Option<HashSet<PartitionKey>>,
    /// The id cleaning up, and where.
    cleanup: Option<Cleanup>,
    /// The current transactional id (for messages).
    pub id: Option<String>,
}

#[derive(Debug)]
struct Cleanup {
    index: usize,
    partitions: Vec<PartitionKey>,
    /// Aborts that failed.
    failures: u32,
}

/// Aborts of a cleanup that may fail before it is given up (its id may have
/// got stuck on another partition meanwhile).
const CLEANUP_ABORTS: u32 = 3;

/// The next step of a cleanup.
#[derive(Debug, PartialEq, Eq)]
pub enum CleanupStep {
    /// Take this id over first.
    TakeOver(String),
    /// Begin, send one record to each partition, and abort, under this id.
    Abort(String, Vec<PartitionKey>),
}

impl Transaction {
    pub fn new(transactional: bool) -> Self {
        Transaction {
            state: if transactional {
                State::Uninitialized
            } else {
                State::Off
            },
            must_abort: false,
            ids: Vec::new(),
            current: None,
            initializing: None,
            stuck: None,
            cleanup: None,
            id: None,
        }
    }

    pub fn is_on(&self) -> bool {
        self.state != State::Off
    }

    /// A new session takes the transactional ids over: `id` and its spare.
    /// An id resting on an offline partition in this process stays out
    /// until the partition is back (taking it over now would wait for it).
    pub fn restart(&mut self, id: Option<String>) {
        if !self.is_on() {
            return;
        }
        self.rest_stuck();
        self.state = State::Uninitialized;
        self.must_abort = false;
        self.stuck = None;
        self.current = None;
        self.initializing = None;
        self.cleanup = None;
        self.id = None;
        let names: Vec<String> = match &id {
            Some(id) => vec![id.clone(), format!("{id}{SPARE_SUFFIX}")],
            None => Vec::new(),
        };
        let mut ids: Vec<TxnId> = Vec::new();
        for name in names {
            let mut entry = TxnId::new(name.clone());
            if let Some(old) = self.ids.iter_mut().find(|o| o.name == name) {
                // What it aborted is not carried over: another process may
                // have used the id since, and committed there.
                entry.resting = std::mem::take(&mut old.resting);
            }
            ids.push(entry);
        }
        self.ids = ids;
    }

    /// A stuck id rests, even with its transaction's end unknown (a new
    /// session begins): taking it over again would wait for its partitions.
    fn rest_stuck(&mut self) {
        if let (Some(stuck), Some(index)) = (self.stuck.take(), self.current) {
            self.ids[index].resting.extend(stuck);
        }
    }

    /// Everything in flight was abandoned: the producers must be taken over
    /// again.
    pub fn abandon(&mut self) {
        self.rest_stuck();
        if self.is_on() {
            self.state = State::Uninitialized;
            self.must_abort = false;
            self.stuck = None;
            self.current = None;
            self.initializing = None;
            self.cleanup = None;
            for id in &mut self.ids {
                id.to_clean.clear();
                id.ready = false;
                id.touched.clear();
                id.previous.clear();
            }
        }
    }

    /// The id to take over now, if one must be: every id not resting is
    /// taken over before the first record goes out, so every earlier
    /// holder of each is fenced.
    pub fn take_initialization(&mut self) -> Option<String> {
        if self.state != State::Uninitialized {
            return None;
        }
        let index = self
            .ids
            .iter()
            .position(|id| !id.ready && id.resting.is_empty())?;
        self.state = State::Initializing;
        self.initializing = Some(index);
        self.id = Some(self.ids[index].name.clone());
        Some(self.ids[index].name.clone())
    }

    /// The takeover of the transactional id finished.
    pub fn initialized(&mut self, result: Result<(), BrokerError>) -> Next {
        let index = self.initializing.take();
        if let Some(cleanup) = &self.cleanup {
            // An id taken over to clean up: the current one, if any, waits.
            self.state = State::Idle;
            return match (result, index) {
                (Ok(()), Some(index)) => {
                    self.ids[index].ready = true;
                    self.state = State::Cleaning;
                    Next::CleanUp(self.ids[index].name.clone(), cleanup.partitions.clone())
                }
                (Err(error), _) if error.ends_producer() => Next::EndProducer(error),
                // Retrying could wait as long as what it would end (its
                // markers pending on a partition still away): give it up.
                (Err(error), _) => {
                    tracing::warn!(%error, "cannot take over the transactional id to clean up; its partitions' events are published again instead");
                    self.give_up_cleanup()
                }
                (Ok(()), None) => Next::Go,
            };
        }
        self.state = State::Uninitialized;
        match result {
            Ok(()) => {
                let Some(index) = index else {
                    return Next::Go;
                };
                self.ids[index].ready = true;
                tracing::debug!(id = %self.ids[index].name, "transactional producer ready");
                if self.ids.iter().any(|id| !id.ready && id.resting.is_empty()) {
                    return Next::Go; // the next id is taken over first
                }
                match self.pick() {
                    Some(name) => {
                        self.state = State::Idle;
                        Next::Use(name)
                    }
                    None => Next::Go,
                }
            }
            Err(error) if error.ends_producer() => Next::EndProducer(error),
            Err(error) => {
                tracing::warn!(%error, "cannot take over the transactional id yet");
                Next::BackOff
            }
        }
    }

    /// Makes the first ready, rested id the current one.
    fn pick(&mut self) -> Option<String> {
        let index = self
            .ids
            .iter()
            .position(|id| id.ready && id.resting.is_empty())?;
        self.current = Some(index);
        self.id = Some(self.ids[index].name.clone());
        Some(self.ids[index].name.clone())
    }

    /// A commit finished.
    pub fn committed(&mut self, result: Result<(), BrokerError>) -> Next {
        match result {
            Ok(()) => {
                self.ended(false);
                Next::Deliver
            }
            Err(error) if error.ends_producer() => Next::EndProducer(error),
            Err(error) if error.class == BrokerErrorClass::Transient => {
                tracing::warn!(%error, "the commit did not finish; committing again");
                metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "commit").increment(1);
                self.state = State::Committing;
                Next::CommitAgain
            }
            Err(error) => {
                tracing::warn!(%error, "the transaction did not commit; aborting it and sending its records again");
                metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "commit").increment(1);
                self.state = State::closed();
                self.must_abort = true;
                Next::Go
            }
        }
    }

    /// An abort finished; `wrote`: records of the transaction were
    /// acknowledged (written to their partitions).
    pub fn aborted(&mut self, result: Result<(), BrokerError>, wrote: bool) -> Next {
        if self.stuck.is_some() {
            match &result {
                Ok(()) => return self.rest(true),
                Err(error) if error.ends_producer() => {}
                // Its written records would hold back read_committed
                // readers of their partitions (and exactly once's tail
                // reads) until the broker's transaction timeout: abort
                // again until the coordinator takes it.
                Err(error) if wrote => {
                    tracing::warn!(%error, "aborting the stuck transaction failed; trying again");
                    self.state = State::closed();
                    return Next::Pause(super::outcome::backoff(
                        1,
                        super::pause::MAX_RETRY_BACKOFF,
                    ));
                }
                // Nothing of it was written (its partitions could not even
                // be added while the transaction before waits for its
                // markers): its producer is dropped.
                Err(error) => {
                    tracing::warn!(%error, "the stuck transaction wrote nothing and cannot be aborted now; dropping its producer");
                    return self.rest(false);
                }
            }
        }
        match result {
            Ok(()) => {
                self.ended(true);
                Next::SendAgain
            }
            Err(error) if error.ends_producer() => Next::EndProducer(error),
            Err(error) => {
                tracing::warn!(%error, "aborting the transaction failed; trying again");
                self.state = State::closed();
                Next::Pause(super::outcome::backoff(1, super::pause::MAX_RETRY_BACKOFF))
            }
        }
    }

    /// Partitions with no leader now: whether the current id is stuck on
    /// one of them. If so, its open transaction must be aborted
    /// ([`Transaction::due`]), or, with none open, it rests at once
    /// ([`Next::Rest`]).
    pub fn leaderless(&mut self, partitions: &HashSet<PartitionKey>) -> Option<Next> {
        let index = self.current?;
        if self.stuck.is_some() {
            return None;
        }
        let id = &self.ids[index];
        let stuck: HashSet<PartitionKey> = id
            .touched
            .union(&id.previous)
            .filter(|p| partitions.contains(*p))
            .cloned()
            .collect();
        if stuck.is_empty() {
            return None;
        }
        tracing::warn!(id = %id.name, partitions = ?stuck, state = ?self.state, "a partition this transactional id wrote to has no leader: its transaction cannot end until the partition is back; the spare id takes over");
        self.stuck = Some(stuck);
        match self.state {
            State::Open { .. } => {
                self.must_abort = true;
                None
            }
            State::Idle => Some(self.rest(false)),
            // A commit or an abort under way ends first.
            _ => None,
        }
    }

    /// `partition`'s tail is hidden by an open transaction: each id whose
    /// last transaction there was aborted cleans up there. Whether any will
    /// (if none, the tail read stands, unsure).
    pub fn clean_up(&mut self, partition: &PartitionKey) -> bool {
        // An id resting on another partition cannot clean up until that one
        // is back: the read stands (unsure) rather than wait for it.
        let mut any = false;
        for id in &mut self.ids {
            if id.aborted_in.contains(partition) && id.resting.is_empty() {
                id.to_clean.insert(partition.clone());
                any = true;
            }
        }
        if any {
            tracing::info!(topic = %partition.topic, partition = partition.partition, "an open transaction hides the partition's newest records: the transactional ids whose last transaction there was aborted each abort one record there, ending what they left open");
        }
        any
    }

    /// `partition`'s tail is hidden by an open transaction that holds only
    /// records of events never confirmed to PostgreSQL, in a partition this
    /// session has not sent to: ending it with an abort takes back nothing
    /// confirmed, whatever an id's last transaction there was. Each id not
    /// resting cleans up there (an abort ends only what its own producer
    /// left open). Whether any will.
    pub fn clean_up_unconfirmed(&mut self, partition: &PartitionKey) -> bool {
        let mut any = false;
        for id in &mut self.ids {
            if id.resting.is_empty() {
                id.to_clean.insert(partition.clone());
                any = true;
            }
        }
        if any {
            tracing::info!(topic = %partition.topic, partition = partition.partition, "an open transaction hides the partition's newest records, none of them confirmed: each transactional id aborts one record there, ending what it left open");
        }
        any
    }

    /// The next step of a cleanup, when one is due and no transaction is
    /// open.
    pub fn next_cleanup(&mut self) -> Option<CleanupStep> {
        if self.state != State::Idle || self.stuck.is_some() || self.cleanup.is_some() {
            return None;
        }
        let index = self
            .ids
            .iter()
            .position(|id| !id.to_clean.is_empty() && id.resting.is_empty())?;
        let id = &self.ids[index];
        let mut partitions: Vec<PartitionKey> = id.to_clean.iter().cloned().collect();
        partitions.sort();
        self.cleanup = Some(Cleanup {
            index,
            partitions: partitions.clone(),
            failures: 0,
        });
        if id.ready {
            self.state = State::Cleaning;
            Some(CleanupStep::Abort(id.name.clone(), partitions))
        } else {
            self.state = State::Initializing;
            self.initializing = Some(index);
            Some(CleanupStep::TakeOver(id.name.clone()))
        }
    }

    /// A cleanup's abort finished; `written`: the partitions whose cleanup
    /// record was written (the abort ended what was left open there).
    pub fn cleaned(&mut self, result: Result<(), BrokerError>, written: &[PartitionKey]) -> Next {
        match result {
            Ok(()) => {}
            Err(error) if error.ends_producer() => {
                self.state = State::Idle;
                return Next::EndProducer(error);
            }
            Err(error) => {
                let failures = self.cleanup.as_mut().map_or(CLEANUP_ABORTS, |c| {
                    c.failures += 1;
                    c.failures
                });
                if failures < CLEANUP_ABORTS {
                    // The abort is tried again (never a begin before it ends).
                    tracing::warn!(%error, "the cleanup's abort failed; aborting again");
                    return Next::Pause(super::outcome::backoff(
                        failures,
                        super::pause::MAX_RETRY_BACKOFF,
                    ));
                }
                tracing::warn!(%error, "the cleanup's abort keeps failing: giving it up (its producer is dropped; those partitions' events are published again)");
                return self.give_up_cleanup();
            }
        }
        self.state = State::Idle;
        let Some(cleanup) = self.cleanup.take() else {
            return Next::Go;
        };
        let id = &mut self.ids[cleanup.index];
        for key in &cleanup.partitions {
            id.to_clean.remove(key);
            if written.contains(key) {
                id.aborted_in.remove(key);
            }
        }
        let current = self.current.map(|i| self.ids[i].name.clone());
        if current.is_none() {
            self.state = State::Uninitialized;
            if let Some(name) = self.pick() {
                self.state = State::Idle;
                return Next::Cleaned(Some(name), cleanup.partitions);
            }
        }
        Next::Cleaned(current, cleanup.partitions)
    }

    /// The cleanup under way is given up: its id's producer is dropped
    /// (taken over anew when next needed). Where that id was the current one,
    /// it rests on what it is stuck on, and the other carries on.
    fn give_up_cleanup(&mut self) -> Next {
        self.state = State::Uninitialized;
        let Some(cleanup) = self.cleanup.take() else {
            return Next::Go;
        };
        let index = cleanup.index;
        let id = &mut self.ids[index];
        for key in &cleanup.partitions {
            id.to_clean.remove(key);
        }
        id.ready = false;
        let abandon = id.name.clone();
        if self.current == Some(index) {
            id.resting.extend(self.stuck.take().unwrap_or_default());
            id.touched.clear();
            id.previous.clear();
            self.must_abort = false;
            self.current = None;
            self.id = None;
        }
        if self.current.is_some() || self.pick().is_some() {
            self.state = State::Idle;
        }
        Next::CleanupGivenUp(abandon, cleanup.partitions)
    }

    /// A stuck id whose commit or abort ended meanwhile rests now.
    pub fn rest_if_stuck(&mut self) -> Option<Next> {
        (self.state == State::Idle && self.stuck.is_some()).then(|| self.rest(false))
    }

    /// The current id rests on the partitions it is stuck on; `aborted`:
    /// its open transaction was aborted.
    fn rest(&mut self, aborted: bool) -> Next {
        let stuck = self.stuck.take().unwrap_or_default();
        self.must_abort = false;
        let Some(index) = self.current.take() else {
            return Next::SendAgain;
        };
        let id = &mut self.ids[index];
        id.ready = false;
        id.resting.extend(stuck);
        if aborted {
            // Where the transaction before touched a partition too, what is
            // left open there may be that one, committed: never ended with
            // an abort.
            let aborted_only: Vec<PartitionKey> =
                id.touched.difference(&id.previous).cloned().collect();
            id.aborted_in.extend(aborted_only);
        }
        for key in id.previous.iter().chain(&id.touched) {
            if !aborted || id.previous.contains(key) {
                id.aborted_in.remove(key);
            }
        }
        id.touched.clear();
        id.previous.clear();
        let abandon = id.name.clone();
        self.id = None;
        self.state = State::Uninitialized;
        let next = self.pick();
        if next.is_some() {
            self.state = State::Idle;
        }
        Next::Rest { abandon, next }
    }

    /// Partitions that have a leader again: ids resting on them only may
    /// be taken over again.
    pub fn back(&mut self, partitions: &HashSet<PartitionKey>) {
        for id in &mut self.ids {
            id.resting.retain(|p| !partitions.contains(p));
        }
    }

    /// Whether a cleanup transaction is under way.
    pub fn is_cleaning(&self) -> bool {
        self.state == State::Cleaning
    }

    /// Whether an abort is under way.
    pub fn is_aborting(&self) -> bool {
        self.state == State::Aborting
    }

    /// Whether records may be sent now.
    pub fn may_send(&self) -> bool {
        match self.state {
            State::Off | State::Idle => true,
            State::Open { since, open_for } => !self.must_abort && since.elapsed() < open_for,
            _ => false,
        }
    }

    /// A record goes out: whether a transaction must begin first.
    pub fn needs_begin(&self) -> bool {
        self.state == State::Idle
    }

    /// The transaction began with `waiting` records in hand.
    pub fn began(&mut self, waiting: usize) {
        self.state = State::Open {
            since: Instant::now(),
            open_for: if waiting >= BACKLOG {
                BACKLOG_OPEN
            } else {
                MAX_OPEN
            },
        };
    }

    /// A record of the open transaction goes to `partition`.
    pub fn sent_to(&mut self, partition: &PartitionKey) {
        if let Some(index) = self.current {
            let touched = &mut self.ids[index].touched;
            if !touched.contains(partition) {
                touched.insert(partition.clone());
            }
        }
    }

    /// The partitions the current id's transactions touched: the open one
    /// and the one before.
    pub fn touched(&self) -> HashSet<PartitionKey> {
        self.current
            .map(|i| {
                self.ids[i]
                    .touched
                    .union(&self.ids[i].previous)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A record of the open transaction failed.
    pub fn fail(&mut self) {
        if self.is_on() {
            self.must_abort = true;
        }
    }

    /// When the open transaction stops taking records.
    pub fn closes_at(&self) -> Option<Instant> {
        match self.state {
            State::Open { since, open_for } if since.elapsed() < open_for => Some(since + open_for),
            _ => None,
        }
    }

    /// Whether to end the transaction now: nothing is outstanding (`sent`)
    /// and it failed, or it holds delivered records. A stuck transaction
    /// is aborted at once: its records for the offline partition would
    /// never be delivered.
    pub fn due(&mut self, sent: usize, any_acked: bool) -> Option<End> {
        if !matches!(self.state, State::Open { .. }) {
            return None;
        }
        if self.stuck.is_some() {
            self.state = State::Aborting;
            return Some(End::Abort);
        }
        if sent > 0 {
            return None;
        }
        if self.must_abort {
            self.state = State::Aborting;
            Some(End::Abort)
        } else if any_acked {
            self.state = State::Committing;
            Some(End::Commit)
        } else if self.closes_at().is_none() {
            // Closed with nothing in it (the first send found the queue
            // full past the open time): end it, or nothing is sent again.
            self.state = State::Aborting;
            Some(End::Abort)
        } else {
            None
        }
    }

    /// A commit or an abort went through.
    fn ended(&mut self, aborted: bool) {
        self.state = State::Idle;
        self.must_abort = false;
        if let Some(index) = self.current {
            let id = &mut self.ids[index];
            for key in &id.touched {
                // Where the transaction before touched it too, what is left
                // open there may be that one, committed.
                if aborted && !id.previous.contains(key) {
                    id.aborted_in.insert(key.clone());
                } else {
                    id.aborted_in.remove(key);
                }
            }
            id.previous = std::mem::take(&mut id.touched);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes both ids over, as a session's start does.
    fn ready(t: &mut Transaction) {
        t.restart(Some("walrelay.7.s".into()));
        assert_eq!(t.take_initialization().as_deref(), Some("walrelay.7.s"));
        assert!(matches!(t.initialized(Ok(())), Next::Go));
        assert!(!t.may_send(), "not before the spare is taken over too");
        assert_eq!(
            t.take_initialization().as_deref(),
            Some("walrelay.7.s.spare")
        );
        assert!(matches!(t.initialized(Ok(())), Next::Use(id) if id == "walrelay.7.s"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_transaction_takes_records_briefly_then_commits_once_they_are_delivered() {
        let mut t = Transaction::new(true);
        assert!(!t.may_send(), "not before the id is taken over");
        ready(&mut t);
        assert!(t.needs_begin() && t.may_send());
        t.began(0);
        assert_eq!(t.due(1, true), None, "a record is outstanding");
        tokio::time::advance(MAX_OPEN).await;
        assert!(!t.may_send(), "closing: new records wait");
        assert_eq!(t.due(0, true), Some(End::Commit));
        assert!(matches!(t.committed(Ok(())), Next::Deliver));
        assert!(t.needs_begin());
        t.began(0);
        t.fail();
        assert!(!t.may_send());
        assert_eq!(t.due(0, true), Some(End::Abort));
        assert!(!Transaction::new(false).is_on());
    }

    #[tokio::test(start_paused = true)]
    async fn a_transaction_that_closes_with_nothing_sent_ends_instead_of_staying_open() {
        let mut t = Transaction::new(true);
        ready(&mut t);
        t.began(0);
        assert_eq!(t.due(0, false), None, "still open: records may come");
        tokio::time::advance(MAX_OPEN).await;
        assert!(!t.may_send());
        assert_eq!(t.due(0, false), Some(End::Abort), "closed and empty");
        assert!(matches!(t.aborted(Ok(()), false), Next::SendAgain));
        assert!(t.needs_begin() && t.may_send());
    }

    #[tokio::test(start_paused = true)]
    async fn a_transaction_begun_with_a_backlog_takes_records_longer() {
        let mut t = Transaction::new(true);
        ready(&mut t);
        t.began(BACKLOG - 1);
        tokio::time::advance(MAX_OPEN).await;
        assert!(!t.may_send(), "a short backlog keeps the short window");
        assert_eq!(t.due(0, true), Some(End::Commit));
        assert!(matches!(t.committed(Ok(())), Next::Deliver));
        t.began(BACKLOG);
        tokio::time::advance(MAX_OPEN).await;
        assert!(t.may_send(), "a backlog keeps the transaction open");
        assert_eq!(
            t.closes_at(),
            Some(Instant::now() + BACKLOG_OPEN - MAX_OPEN)
        );
        tokio::time::advance(BACKLOG_OPEN - MAX_OPEN).await;
        assert!(!t.may_send());
        assert_eq!(t.due(0, true), Some(End::Commit));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_commit_is_committed_again_or_aborted_by_its_error() {
        let error = |class| BrokerError {
            class,
            message: "test".into(),
        };
        let mut t = Transaction::new(true);
        t.restart(Some("walrelay.7.s".into()));
        t.take_initialization();
        assert!(matches!(
            t.initialized(Err(error(BrokerErrorClass::Transient))),
            Next::BackOff
        ));
        assert!(
            !t.may_send() && t.take_initialization().is_some(),
            "taken over again"
        );
        t.initialized(Ok(()));
        t.take_initialization();
        t.initialized(Ok(()));
        t.began(0);
        tokio::time::advance(MAX_OPEN).await;
        assert_eq!(t.due(0, true), Some(End::Commit));
        assert!(matches!(
            t.committed(Err(error(BrokerErrorClass::Transient))),
            Next::CommitAgain
        ));
        assert_eq!(t.due(0, true), None, "the commit is still under way");
        assert!(matches!(
            t.committed(Err(error(BrokerErrorClass::Abortable))),
            Next::Go
        ));
        assert_eq!(
            t.due(0, true),
            Some(End::Abort),
            "a commit that failed is aborted"
        );
        assert!(matches!(
            t.aborted(Err(error(BrokerErrorClass::Transient)), true),
            Next::Pause(_)
        ));
        assert_eq!(t.due(0, true), Some(End::Abort), "and aborted again");
        assert!(matches!(
            t.aborted(Err(error(BrokerErrorClass::Fenced)), true),
            Next::EndProducer(_)
        ));
    }

    fn key(topic: &str, partition: i32) -> PartitionKey {
        PartitionKey::new(topic, partition)
    }

    /// A transaction of the current id that wrote to `p`, then committed
    /// or aborted.
    async fn transaction_in(t: &mut Transaction, p: &PartitionKey, commit: bool) {
        t.began(0);
        t.sent_to(p);
        if !commit {
            t.fail();
        }
        tokio::time::advance(MAX_OPEN).await;
        if commit {
            assert_eq!(t.due(0, true), Some(End::Commit));
            assert!(matches!(t.committed(Ok(())), Next::Deliver));
        } else {
            assert_eq!(t.due(0, true), Some(End::Abort));
            assert!(matches!(t.aborted(Ok(()), true), Next::SendAgain));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn only_an_id_whose_last_transaction_in_a_partition_was_aborted_cleans_up_there() {
        let p = key("outbox.event.order", 0);
        let mut t = Transaction::new(true);
        ready(&mut t);
        transaction_in(&mut t, &p, true).await;
        assert!(
            !t.clean_up(&p),
            "an abort could take back what the id committed there"
        );
        assert_eq!(t.next_cleanup(), None);
        transaction_in(&mut t, &p, false).await;
        assert!(
            !t.clean_up(&p),
            "the transaction before wrote there too: what is left open may be that one, committed"
        );

        transaction_in(&mut t, &key("outbox.event.invoice", 0), true).await;
        transaction_in(&mut t, &p, false).await;
        assert!(t.clean_up(&p));
        assert_eq!(
            t.next_cleanup(),
            Some(CleanupStep::Abort("walrelay.7.s".into(), vec![p.clone()]))
        );
        assert!(!t.may_send(), "no records while the cleanup is under way");
        assert!(
            matches!(t.cleaned(Ok(()), std::slice::from_ref(&p)), Next::Cleaned(Some(id), ps) if id == "walrelay.7.s" && ps == [p.clone()])
        );
        assert!(t.may_send());
        assert!(!t.clean_up(&p), "once ended, never again");

        // An aborted transaction followed by a committed one: no cleanup.
        transaction_in(&mut t, &key("outbox.event.invoice", 0), true).await;
        transaction_in(&mut t, &p, false).await;
        transaction_in(&mut t, &p, true).await;
        assert!(!t.clean_up(&p));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cleanup_whose_record_was_not_written_is_not_counted_as_done() {
        let p = key("outbox.event.order", 0);
        let mut t = Transaction::new(true);
        ready(&mut t);
        transaction_in(&mut t, &p, false).await;
        assert!(t.clean_up(&p));
        assert!(t.next_cleanup().is_some());
        assert!(matches!(t.cleaned(Ok(()), &[]), Next::Cleaned(..)));
        assert!(
            t.clean_up(&p),
            "the abort ended nothing there: a later hidden tail is cleaned again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cleanup_abort_that_keeps_failing_is_given_up_and_its_producer_dropped() {
        let error = |class| BrokerError {
            class,
            message: "test".into(),
        };
        let p = key("outbox.event.order", 0);
        let mut t = Transaction::new(true);
        ready(&mut t);
        transaction_in(&mut t, &p, false).await;
        assert!(t.clean_up(&p));
        assert!(t.next_cleanup().is_some());
        for _ in 1..CLEANUP_ABORTS {
            assert!(matches!(
                t.cleaned(
                    Err(error(BrokerErrorClass::Abortable)),
                    std::slice::from_ref(&p)
                ),
                Next::Pause(_)
            ));
            assert!(!t.may_send(), "aborted again, never begun");
        }
        assert!(matches!(
            t.cleaned(Err(error(BrokerErrorClass::Abortable)), std::slice::from_ref(&p)),
            Next::CleanupGivenUp(id, ps) if id == "walrelay.7.s" && ps == [p.clone()]
        ));
        assert_eq!(t.next_cleanup(), None, "not tried again");
        assert_eq!(
            t.id.as_deref(),
            Some("walrelay.7.s.spare"),
            "the spare carries on"
        );
        assert!(t.may_send());
    }

    #[tokio::test(start_paused = true)]
    async fn a_partition_back_is_not_held_for_an_id_resting_on_another() {
        let mut t = Transaction::new(true);
        ready(&mut t);
        t.began(0);
        t.sent_to(&key("a", 0));
        t.sent_to(&key("b", 1));
        assert!(t.leaderless(&[key("b", 1)].into()).is_none());
        assert_eq!(t.due(2, false), Some(End::Abort));
        assert!(matches!(t.aborted(Ok(()), true), Next::Rest { .. }));
        assert!(
            !t.clean_up(&key("a", 0)),
            "the id that aborted there rests on b: a's read stands, unsure, rather than wait for b"
        );
        t.back(&[key("b", 1)].into());
        assert!(t.clean_up(&key("a", 0)), "once b is back, it cleans up");
    }

    #[tokio::test(start_paused = true)]
    async fn what_an_id_aborted_is_not_carried_into_a_new_session_but_unconfirmed_records_may_be_cleaned()
     {
        let p = key("outbox.event.order", 0);
        let mut t = Transaction::new(true);
        ready(&mut t);
        transaction_in(&mut t, &p, false).await;
        ready(&mut t);
        assert!(
            !t.clean_up(&p),
            "another process may have committed there under the id since"
        );
        assert!(
            t.clean_up_unconfirmed(&p),
            "where nothing hidden was confirmed, every id may abort there"
        );
        assert_eq!(
            t.next_cleanup(),
            Some(CleanupStep::Abort("walrelay.7.s".into(), vec![p.clone()]))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_id_stuck_on_a_partition_without_a_leader_rests_and_the_spare_carries_on() {
        let mut t = Transaction::new(true);
        ready(&mut t);
        t.began(0);
        t.sent_to(&key("a", 0));
        t.sent_to(&key("b", 1));
        assert_eq!(t.touched(), [key("a", 0), key("b", 1)].into());
        assert!(
            t.leaderless(&[key("c", 0)].into()).is_none(),
            "a partition it never touched does not stick it"
        );
        assert!(
            t.leaderless(&[key("b", 1)].into()).is_none(),
            "open: abort first"
        );
        assert!(!t.may_send());
        assert_eq!(
            t.due(3, false),
            Some(End::Abort),
            "aborted at once, records outstanding or not"
        );
        assert!(t.is_aborting());
        match t.aborted(Ok(()), true) {
            Next::Rest { abandon, next } => {
                assert_eq!(abandon, "walrelay.7.s");
                assert_eq!(next.as_deref(), Some("walrelay.7.s.spare"));
            }
            other => panic!("{other:?}"),
        }
        assert!(t.needs_begin() && t.may_send(), "the spare takes records");
        assert_eq!(t.id.as_deref(), Some("walrelay.7.s.spare"));
        // The spare gets stuck too, between transactions: its last one
        // touched the partition.
        t.began(0);
        t.sent_to(&key("a", 3));
        tokio::time::advance(MAX_OPEN).await;
        assert_eq!(t.due(0, true), Some(End::Commit));
        assert!(matches!(t.committed(Ok(())), Next::Deliver));
        match t.leaderless(&[key("a", 3)].into()) {
            Some(Next::Rest {
                abandon,
                next: None,
            }) => assert_eq!(abandon, "walrelay.7.s.spare"),
            other => panic!("{other:?}"),
        }
        assert!(!t.may_send(), "no id to use");
        assert_eq!(t.take_initialization(), None, "both rest");
        // The first id's partition is back: it is taken over again.
        t.back(&[key("b", 1)].into());
        assert_eq!(t.take_initialization().as_deref(), Some("walrelay.7.s"));
        assert!(matches!(t.initialized(Ok(())), Next::Use(id) if id == "walrelay.7.s"));
        assert!(t.may_send());
        // A new session leaves the resting spare out.
        t.restart(Some("walrelay.7.s".into()));
        assert_eq!(t.take_initialization().as_deref(), Some("walrelay.7.s"));
        assert!(matches!(t.initialized(Ok(())), Next::Use(_)));
        assert_eq!(t.take_initialization(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_id_whose_commit_was_under_way_rests_once_it_ends() {
        let mut t = Transaction::new(true);
        ready(&mut t);
        t.began(0);
        t.sent_to(&key("a", 0));
        tokio::time::advance(MAX_OPEN).await;
        assert_eq!(t.due(0, true), Some(End::Commit));
        assert!(t.leaderless(&[key("a", 0)].into()).is_none(), "committing");
        assert!(matches!(t.committed(Ok(())), Next::Deliver));
        assert!(matches!(
            t.rest_if_stuck(),
            Some(Next::Rest { next: Some(_), .. })
        ));
        assert!(t.may_send());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_transaction_that_wrote_is_aborted_until_it_goes_through() {
        let error = BrokerError::transient("Coordinator load in progress");
        let mut t = Transaction::new(true);
        ready(&mut t);
        t.began(0);
        t.sent_to(&key("a", 0));
        t.sent_to(&key("b", 0));
        assert!(t.leaderless(&[key("a", 0)].into()).is_none());
        assert_eq!(t.due(1, true), Some(End::Abort));
        assert!(
            matches!(t.aborted(Err(error.clone()), true), Next::Pause(_)),
            "its records in b would hold b's readers back: abort again"
        );
        assert_eq!(t.due(0, true), Some(End::Abort));
        assert!(matches!(
            t.aborted(Ok(()), true),
            Next::Rest { next: Some(_), .. }
        ));
        // One that wrote nothing is given up at once.
        t.began(0);
        t.sent_to(&key("a", 1));
        assert!(t.leaderless(&[key("a", 1)].into()).is_none());
        assert_eq!(t.due(1, false), Some(End::Abort));
        assert!(matches!(
            t.aborted(Err(error), false),
            Next::Rest { next: None, .. }
        ));
    }

    #[test]
    fn a_new_session_leaves_a_stuck_id_resting_whatever_became_of_its_abort() {
        let mut t = Transaction::new(true);
        ready(&mut t);
        t.began(0);
        t.sent_to(&key("a", 0));
        assert!(t.leaderless(&[key("a", 0)].into()).is_none());
        t.abandon();
        t.restart(Some("walrelay.7.s".into()));
        assert_eq!(
            t.take_initialization().as_deref(),
            Some("walrelay.7.s.spare"),
            "only the spare is taken over"
        );
        assert!(matches!(t.initialized(Ok(())), Next::Use(id) if id == "walrelay.7.s.spare"));
    }
}
