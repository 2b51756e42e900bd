//! Two transactions at once: the next one takes records while the one
//! before commits.
//!
//! A transaction commits only once every record of it is delivered
//! (appended, acknowledged), so once its commit begins nothing of it is
//! still on its way to a partition: the next transaction's records can go
//! out at once, under another of the session's transactional ids, and land
//! after it in every partition. What keeps the guarantees:
//!
//! - one commit or abort at a time, and in order: the open transaction
//!   ends only after the one before has ended (it keeps taking records
//!   meanwhile);
//! - the one before fails to commit: it is aborted, then the open one
//!   too, and every record of both goes again, in order (the open one's
//!   records would otherwise be readable ahead of the earlier ones sent
//!   again);
//! - a record counts as delivered only once its own transaction commits
//!   (`records.rs` seals the committing transaction's records), so
//!   nothing is confirmed past an uncommitted one;
//! - only with another id ready and neither stuck, resting or cleaning
//!   up: otherwise one transaction at a time, on the id in use, as before.
//!   The other is the first such id, so two ids take turns and the third
//!   stays clean (`ids.rs`): it carries on when a partition losing its
//!   leader sticks both (the committing one's markers cannot be written
//!   there, the open one's records cannot).

use std::collections::HashSet;

use super::{End, Next, State, Transaction};
use crate::metrics as m;
use crate::publish::ledgers::PartitionKey;
use crate::publish::sink::{BrokerError, BrokerErrorClass};

/// The transaction before the open one, still ending.
#[derive(Debug)]
pub(super) struct Committing {
    /// Its id.
    pub(super) index: usize,
    pub(super) phase: Phase,
    /// Partitions with no leader it touched: its id rests once it ended.
    pub(super) stuck: HashSet<PartitionKey>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    Committing,
    /// Its commit failed: abort it, then the open one.
    MustAbort,
    Aborting,
}

impl Transaction {
    /// A record is to be sent while the current transaction commits: if
    /// another id can take records (the first: two take turns), it is the current one from now on,
    /// and the next transaction begins under it at once. Its name, if so
    /// (the publisher sends through it).
    pub fn overlap(&mut self) -> Option<String> {
        if self.state != State::Committing || self.committing.is_some() {
            return None;
        }
        let current = self.current?;
        let other = self.next_id()?;
        self.committing = Some(Committing {
            index: current,
            phase: Phase::Committing,
            stuck: HashSet::new(),
        });
        self.current = Some(other);
        self.state = State::Idle;
        self.must_abort = false;
        self.id = Some(self.ids[other].name.clone());
        self.id.clone()
    }

    /// The id the next transaction would take while the current one
    /// commits, if any: the first other id ready, and neither stuck,
    /// resting nor cleaning up.
    pub(super) fn next_id(&self) -> Option<usize> {
        if self.stuck.is_some()
            || self.cleanup.is_some()
            || self.ids.iter().any(|id| !id.to_clean.is_empty())
        {
            return None;
        }
        let current = self.current?;
        (0..self.ids.len())
            .find(|&i| i != current && self.ids[i].ready && self.ids[i].resting.is_empty())
    }

    /// The id of the transaction before the open one, while it ends.
    pub fn committing_id(&self) -> Option<String> {
        let c = self.committing.as_ref()?;
        Some(self.ids[c.index].name.clone())
    }

    /// Whether the transaction before the open one still ends, and how:
    /// `None` while none does (the open one ends as it would alone).
    pub(super) fn previous_due(&mut self) -> Option<Option<End>> {
        let c = self.committing.as_mut()?;
        if c.phase == Phase::MustAbort {
            c.phase = Phase::Aborting;
            return Some(Some(End::AbortPrevious));
        }
        // Ends in order: the open one waits for the one before.
        Some(None)
    }

    /// Whether records may go into the open transaction (or begin one)
    /// while the one before ends: not once that one failed.
    pub(super) fn previous_lets_send(&self) -> bool {
        self.committing
            .as_ref()
            .is_none_or(|c| c.phase == Phase::Committing)
    }

    /// The commit of the transaction before the open one finished.
    pub(super) fn previous_committed(&mut self, result: Result<(), BrokerError>) -> Next {
        match result {
            Ok(()) => {
                let c = self.committing.take().expect("a commit under way");
                self.ended_at(c.index, false);
                self.retire_if_stuck(c);
                Next::Deliver
            }
            Err(error) if error.ends_producer() => Next::EndProducer(error),
            Err(error) if error.class == BrokerErrorClass::Transient => {
                tracing::warn!(%error, "the commit did not finish; committing again");
                metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "commit").increment(1);
                Next::CommitAgain
            }
            Err(error) => {
                tracing::warn!(%error, "the transaction did not commit; aborting it and the one after it, and sending their records again");
                metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "commit").increment(1);
                if let Some(c) = self.committing.as_mut() {
                    c.phase = Phase::MustAbort;
                }
                // The open one never commits now: its records would land
                // ahead of the earlier ones sent again.
                self.must_abort = true;
                Next::Go
            }
        }
    }

    /// The abort of the transaction before the open one finished: the open
    /// one is aborted next, if it began, else every record goes again.
    pub(super) fn previous_aborted(&mut self, result: Result<(), BrokerError>) -> Next {
        match result {
            Ok(()) => {
                let c = self.committing.take().expect("an abort under way");
                self.ended_at(c.index, true);
                self.retire_if_stuck(c);
                match self.state {
                    // Its abort comes next (`due`), then everything goes again.
                    State::Open { .. } => Next::Go,
                    _ if self.stuck.is_some() => self.rest(false),
                    _ => {
                        self.must_abort = false;
                        Next::SendAgain
                    }
                }
            }
            Err(error) if error.ends_producer() => Next::EndProducer(error),
            Err(error) => {
                tracing::warn!(%error, "aborting the transaction failed; trying again");
                if let Some(c) = self.committing.as_mut() {
                    c.phase = Phase::MustAbort;
                }
                self.abort_again_later()
            }
        }
    }

    /// The id of the transaction before, ended, rests if it touched a
    /// partition with no leader meanwhile (its markers may be unwritten
    /// there): the open one's id carries on alone.
    fn retire_if_stuck(&mut self, c: Committing) {
        if c.stuck.is_empty() {
            return;
        }
        self.drop_cleanups(c.index);
        let id = &mut self.ids[c.index];
        tracing::warn!(id = %id.name, partitions = ?c.stuck, "a partition this transactional id wrote to has no leader: it rests until the partition is back");
        id.ready = false;
        id.resting.extend(c.stuck);
        // What is left open there may be an earlier transaction, committed.
        for key in &id.previous {
            id.aborted_in.remove(key);
        }
        id.touched.clear();
        id.previous.clear();
    }
}
