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

    pub fn initialized(&mut self, ok: bool) {
        self.state = if ok {
            State::Idle
        } else {
            State::Uninitialized
        };
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

    /// The commit may still complete (a retriable error): commit again.
    pub fn commit_again(&mut self) {
        self.state = State::Committing;
    }

    /// The commit failed without ending the producer: abort instead.
    pub fn commit_failed(&mut self) {
        self.state = State::closed();
        self.must_abort = true;
    }

    /// A commit or an abort finished.
    pub fn ended(&mut self) {
        self.state = State::Idle;
        self.must_abort = false;
    }

    /// An abort failed: try it again.
    pub fn abort_failed(&mut self) {
        self.state = State::closed();
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
        t.initialized(true);
        assert!(t.needs_begin() && t.may_send());
        t.began(0);
        assert_eq!(t.due(1, true), None, "a record is outstanding");
        tokio::time::advance(MAX_OPEN).await;
        assert!(!t.may_send(), "closing: new records wait");
        assert_eq!(t.due(0, true), Some(End::Commit));
        t.ended();
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
        t.initialized(true);
        t.began(0);
        assert_eq!(t.due(0, false), None, "still open: records may come");
        tokio::time::advance(MAX_OPEN).await;
        assert!(!t.may_send());
        assert_eq!(t.due(0, false), Some(End::Abort), "closed and empty");
        t.ended();
        assert!(t.needs_begin() && t.may_send());
    }

    #[tokio::test(start_paused = true)]
    async fn a_transaction_begun_with_a_backlog_takes_records_longer() {
        let mut t = Transaction::new(true);
        t.restart(Some("walrelay.7.s".into()));
        t.take_initialization();
        t.initialized(true);
        t.began(BACKLOG - 1);
        tokio::time::advance(MAX_OPEN).await;
        assert!(!t.may_send(), "a short backlog keeps the short window");
        assert_eq!(t.due(0, true), Some(End::Commit));
        t.ended();
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
}
