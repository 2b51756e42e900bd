//! The transaction, with a transactional sink: it takes records for a
//! short while, then holds new ones back until those sent are delivered,
//! and commits (or aborts after a failure). While it commits, the next one
//! takes records under another of the session's ids
//! (`transaction/overlap.rs`); with no other id usable (resting, stuck or
//! cleaning up), new records wait for the commit.
//!
//! ```text
//!   Uninitialized ─init─> Initializing ─> Idle ─first record─> Open ─closing, all delivered─> Committing ─> Idle
//!                                                               │ a record failed                  │ failed
//!                                                               └───────────> Aborting ─> Idle <────┘ (records sent again)
//! ```
//!
//! The session's three ids, taken over: `transaction/ids.rs`; the next
//! transaction under another id while one commits:
//! `transaction/overlap.rs`; what happens when a partition has no leader:
//! `transaction/stuck.rs`; ending a transaction left open in a partition's
//! log: `transaction/cleanup.rs`.

mod cleanup;
mod ids;
mod overlap;
mod stuck;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::time::Duration;

use tokio::time::Instant;

use super::ledgers::PartitionKey;
use super::sink::{BrokerError, BrokerErrorClass};
use crate::metrics as m;

/// How long a transaction takes new records (longer while the one before
/// still commits: commits then pace transactions); then they wait until it
/// commits, or go into the next one under the other id. Short, because its
/// records are readable only once it commits; its producer sends what
/// lingers once it closes (`send_lingering_now`). Measured at 2,000
/// events/s: 10 ms gave a readable p50 of 10 ms, 3 ms one of 6 ms, with the
/// same CPU per event on a saturated primary.
const MAX_OPEN: Duration = Duration::from_millis(3);
/// How long a transaction takes records when a backlog waits at its start
/// (`BACKLOG` records or more): a commit costs a round trip to the
/// coordinator with new records held, so a drain commits fewer, larger
/// transactions; a steady stream keeps the short window and its latency.
const BACKLOG_OPEN: Duration = Duration::from_millis(50);
const BACKLOG: usize = 1000;

/// The suffixes of the session's spare transactional ids (`ids.rs`).
pub const SPARE_SUFFIXES: [&str; 2] = [".spare", ".spare2"];

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
    /// Abort the transaction before the open one (its commit failed).
    AbortPrevious,
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

#[derive(Debug)]
pub struct Transaction {
    state: State,
    /// A record of the open transaction failed: it must be aborted.
    must_abort: bool,
    /// This session's ids: `<id>`, `<id>.spare` and `<id>.spare2`.
    ids: Vec<TxnId>,
    /// The id in use, if any.
    current: Option<usize>,
    /// The id being taken over to clean up.
    initializing: Option<usize>,
    /// The ids being taken over for the session, all at once.
    taking_over: Vec<usize>,
    /// Ids whose takeover failed in this round: taken over again after
    /// one backoff, once the round's others have answered.
    failed_takeovers: Vec<usize>,
    /// The current id is stuck on these partitions: end its transaction
    /// and rest it.
    stuck: Option<HashSet<PartitionKey>>,
    /// The id cleaning up, and where.
    cleanup: Option<Cleanup>,
    /// The transaction before the open one, while it ends (`overlap.rs`).
    committing: Option<Committing>,
    /// Partitions whose cleanup was dropped because its id began to rest:
    /// their tails are read again (`take_dropped_cleanups`).
    dropped_cleanups: Vec<PartitionKey>,
    /// An abort failed: the next is not tried before this (the publisher's
    /// pause wakes it then).
    abort_again_at: Option<Instant>,
    /// The current transactional id (for messages).
    pub id: Option<String>,
    /// What one transaction may take: half the relay's in-flight window,
    /// so the next fills the other half while it commits.
    limit: Taken,
    /// What the open transaction took.
    taken: Taken,
    /// The open transaction's producer was told to send what lingers.
    lingering_sent: bool,
}

/// Records and their bytes.
#[derive(Clone, Copy, Debug, Default)]
struct Taken {
    records: usize,
    bytes: usize,
}

use cleanup::Cleanup;
pub use cleanup::CleanupStep;
use ids::TxnId;
use overlap::Committing;

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
            taking_over: Vec::new(),
            failed_takeovers: Vec::new(),
            stuck: None,
            cleanup: None,
            committing: None,
            dropped_cleanups: Vec::new(),
            abort_again_at: None,
            id: None,
            limit: Taken {
                records: usize::MAX,
                bytes: usize::MAX,
            },
            taken: Taken::default(),
            lingering_sent: false,
        }
    }

    /// One transaction takes at most `records` records and `bytes` bytes
    /// (at least one record). A transaction's records are acknowledged only
    /// once it commits, so one that took the whole in-flight window would
    /// stop reading WAL for each commit; at half of it, the next one takes
    /// the other half meanwhile.
    pub fn limit(&mut self, records: usize, bytes: usize) {
        self.limit = Taken {
            records: records.max(1),
            bytes: bytes.max(1),
        };
    }

    /// Whether the open transaction took all it may: the whole window's
    /// worth when no other id could take the next one while it commits.
    fn full(&self) -> bool {
        let share = if self.next_id().is_some() { 1 } else { 2 };
        self.taken.records >= self.limit.records.saturating_mul(share)
            || self.taken.bytes >= self.limit.bytes.saturating_mul(share)
    }

    pub fn is_on(&self) -> bool {
        self.state != State::Off
    }

    /// A commit finished.
    pub fn committed(&mut self, result: Result<(), BrokerError>) -> Next {
        if self.committing.is_some() {
            return self.previous_committed(result);
        }
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
        if self.committing.is_some() {
            return self.previous_aborted(result);
        }
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
                    return self.abort_again_later();
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
                self.abort_again_later()
            }
        }
    }

    /// An abort failed: the next waits a backoff (records are held as
    /// long), or a failing coordinator would be asked again at once.
    fn abort_again_later(&mut self) -> Next {
        let wait = super::outcome::backoff(1, super::pause::MAX_RETRY_BACKOFF);
        self.abort_again_at = Some(Instant::now() + wait);
        Next::Pause(wait)
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
            State::Off => true,
            // A stuck id begins nothing more: it rests once the
            // transaction before the open one has ended.
            State::Idle => self.stuck.is_none() && self.previous_lets_send(),
            // While the one before commits, the open one takes records on.
            State::Open { since, open_for } => {
                !self.must_abort
                    && !self.full()
                    && (since.elapsed() < open_for || self.committing.is_some())
            }
            _ => false,
        }
    }

    /// A record goes out: whether a transaction must begin first.
    pub fn needs_begin(&self) -> bool {
        self.state == State::Idle
    }

    /// The transaction began with `waiting` records in hand.
    pub fn began(&mut self, waiting: usize) {
        self.taken = Taken::default();
        self.lingering_sent = false;
        self.state = State::Open {
            since: Instant::now(),
            open_for: if waiting >= BACKLOG {
                BACKLOG_OPEN
            } else {
                MAX_OPEN
            },
        };
    }

    /// A record of the open transaction, of `bytes`, goes to `partition`.
    pub fn sent_to(&mut self, partition: &PartitionKey, bytes: usize) {
        if let Some(index) = self.current {
            self.taken.records += 1;
            self.taken.bytes += bytes;
            let touched = &mut self.ids[index].touched;
            if !touched.contains(partition) {
                touched.insert(partition.clone());
            }
        }
    }

    /// The partitions the current id's transactions touched (the open one
    /// and the one before), and the committing id's.
    pub fn touched(&self) -> HashSet<PartitionKey> {
        let committing = self.committing.as_ref().map(|c| c.index);
        self.current
            .iter()
            .chain(committing.iter())
            .flat_map(|&i| self.ids[i].touched.union(&self.ids[i].previous))
            .cloned()
            .collect()
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
            State::Open { since, open_for } if since.elapsed() < open_for && !self.full() => {
                Some(since + open_for)
            }
            _ => None,
        }
    }

    /// Whether the open transaction's producer should send what it holds
    /// back for batching now (once per transaction): it takes no more
    /// records and `sent` of them are still outstanding. It commits only
    /// once they are delivered, and the last of them would otherwise
    /// linger (librdkafka's `linger.ms`) with nothing more to batch.
    pub fn send_lingering_now(&mut self, sent: usize) -> bool {
        let State::Open { since, open_for } = self.state else {
            return false;
        };
        let closed = self.full() || (since.elapsed() >= open_for && self.committing.is_none());
        if self.lingering_sent || sent == 0 || self.must_abort || !closed {
            return false;
        }
        self.lingering_sent = true;
        true
    }

    /// Whether to end the transaction now: nothing is outstanding (`sent`)
    /// and it failed, or it holds delivered records. A stuck transaction
    /// is aborted at once: its records for the offline partition would
    /// never be delivered.
    pub fn due(&mut self, sent: usize, any_acked: bool) -> Option<End> {
        if self.abort_again_at.is_some_and(|at| Instant::now() < at) {
            return None;
        }
        self.abort_again_at = None;
        if let Some(previous) = self.previous_due() {
            return previous;
        }
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
            self.ended_at(index, aborted);
        }
    }

    /// A commit or an abort of `index`'s transaction went through.
    fn ended_at(&mut self, index: usize, aborted: bool) {
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
