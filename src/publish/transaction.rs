//! The transaction, with a transactional sink: one open at a time; it takes
//! records for a short while, then holds new ones back until those sent are
//! delivered, and commits (or aborts after a failure).
//!
//! ```text
//!   Uninitialized ─init─> Initializing ─> Idle ─first record─> Open ─closing, all delivered─> Committing ─> Idle
//!                                                               │ a record failed                  │ failed
//!                                                               └───────────> Aborting ─> Idle <────┘ (records sent again)
//! ```

use std::time::Duration;

use tokio::time::Instant;

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Not transactional.
    Off,
    /// No session yet, or the producer must be taken over again.
    Uninitialized,
    Initializing,
    Idle,
    Open {
        since: Instant,
        open_for: Duration,
    },
    Committing,
    Aborting,
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
    /// Committed: its acknowledged records are delivered.
    Deliver,
    /// Aborted: nothing of it is visible; every record of it goes again,
    /// in order.
    SendAgain,
    /// The commit may still complete (aborting could make its records
    /// visible twice once they are sent again): commit again shortly.
    CommitAgain,
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
    /// The transactional id of this session.
    pub id: Option<String>,
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
            id: None,
        }
    }

    pub fn is_on(&self) -> bool {
        self.state != State::Off
    }

    /// A new session takes the transactional id over.
    pub fn restart(&mut self, id: Option<String>) {
        if self.is_on() {
            self.state = State::Uninitialized;
            self.must_abort = false;
            self.id = id;
        }
    }

    /// Everything in flight was abandoned: the producer must be taken over
    /// again.
    pub fn abandon(&mut self) {
        if self.is_on() {
            self.state = State::Uninitialized;
            self.must_abort = false;
        }
    }

    /// The id to take over now, if the producer must be initialized.
    pub fn take_initialization(&mut self) -> Option<String> {
        if self.state != State::Uninitialized {
            return None;
        }
        let id = self.id.clone()?;
        self.state = State::Initializing;
        Some(id)
    }

    /// The takeover of the transactional id finished.
    pub fn initialized(&mut self, result: Result<(), BrokerError>) -> Next {
        self.state = if result.is_ok() {
            State::Idle
        } else {
            State::Uninitialized
        };
        match result {
            Ok(()) => {
                tracing::debug!(id = ?self.id, "transactional producer ready");
                Next::Go
            }
            Err(error) if error.ends_producer() => Next::EndProducer(error),
            Err(error) => {
                tracing::warn!(%error, "cannot take over the transactional id yet");
                Next::BackOff
            }
        }
    }

    /// A commit finished.
    pub fn committed(&mut self, result: Result<(), BrokerError>) -> Next {
        match result {
            Ok(()) => {
                self.ended();
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

    /// An abort finished.
    pub fn aborted(&mut self, result: Result<(), BrokerError>) -> Next {
        match result {
            Ok(()) => {
                self.ended();
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
    /// and it failed, or it holds delivered records.
    pub fn due(&mut self, sent: usize, any_acked: bool) -> Option<End> {
        if !matches!(self.state, State::Open { .. }) || sent > 0 {
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
    fn ended(&mut self) {
        self.state = State::Idle;
        self.must_abort = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_transaction_takes_records_briefly_then_commits_once_they_are_delivered() {
        let mut t = Transaction::new(true);
        assert!(!t.may_send(), "not before the id is taken over");
        t.restart(Some("walrelay.7.s".into()));
        assert_eq!(t.take_initialization().as_deref(), Some("walrelay.7.s"));
        t.initialized(Ok(()));
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
        t.restart(Some("walrelay.7.s".into()));
        t.take_initialization();
        t.initialized(Ok(()));
        t.began(0);
        assert_eq!(t.due(0, false), None, "still open: records may come");
        tokio::time::advance(MAX_OPEN).await;
        assert!(!t.may_send());
        assert_eq!(t.due(0, false), Some(End::Abort), "closed and empty");
        assert!(matches!(t.aborted(Ok(())), Next::SendAgain));
        assert!(t.needs_begin() && t.may_send());
    }

    #[tokio::test(start_paused = true)]
    async fn a_transaction_begun_with_a_backlog_takes_records_longer() {
        let mut t = Transaction::new(true);
        t.restart(Some("walrelay.7.s".into()));
        t.take_initialization();
        t.initialized(Ok(()));
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
            t.aborted(Err(error(BrokerErrorClass::Transient))),
            Next::Pause(_)
        ));
        assert_eq!(t.due(0, true), Some(End::Abort), "and aborted again");
        assert!(matches!(
            t.aborted(Err(error(BrokerErrorClass::Fenced))),
            Next::EndProducer(_)
        ));
    }
}
