//! A transaction left open.
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

use super::{Next, State, Transaction};
use crate::publish::ledgers::PartitionKey;
use crate::publish::sink::BrokerError;

#[derive(Debug)]
pub(super) struct Cleanup {
    index: usize,
    pub(super) partitions: Vec<PartitionKey>,
    /// Aborts that failed.
    failures: u32,
}

/// Aborts of a cleanup that may fail before it is given up (its id may have
/// got stuck on another partition meanwhile).
pub(super) const CLEANUP_ABORTS: u32 = 3;

/// The next step of a cleanup.
#[derive(Debug, PartialEq, Eq)]
pub enum CleanupStep {
    /// Take this id over first.
    TakeOver(String),
    /// Begin, send one record to each partition, and abort, under this id.
    Abort(String, Vec<PartitionKey>),
}

impl Transaction {
    /// `partition`'s tail is hidden by an open transaction: each id whose
    /// last transaction there was aborted cleans up there. Whether any will
    /// (if none, the tail read stands, unsure).
    pub fn clean_up(&mut self, partition: &PartitionKey) -> bool {
        // An id resting on another partition cannot clean up until that one
        // is back: the read stands (unsure) rather than wait for it.
        let mut any = false;
        for id in &mut self.ids {
            // An id whose transaction there has not ended yet (the open
            // one's, or the one committing) may commit it: its last one
            // there is not known to be aborted.
            if id.aborted_in.contains(partition)
                && !id.touched.contains(partition)
                && id.resting.is_empty()
            {
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

    /// `index` begins to rest: the cleanups it was to do are dropped (it
    /// can do none until its partition is back, and the partitions would
    /// wait for it): their tails are read again, and Kafka ends what is
    /// open there (past `HIDDEN_WAIT`, published again, unsure).
    pub(super) fn drop_cleanups(&mut self, index: usize) {
        let id = &mut self.ids[index];
        if !id.to_clean.is_empty() {
            tracing::warn!(id = %id.name, partitions = ?id.to_clean, "a transactional id that was to end what it left open in these partitions rests on a partition with no leader: their tails are read again");
            self.dropped_cleanups.extend(id.to_clean.drain());
        }
    }

    /// Partitions whose cleanup was dropped since last asked: the publisher
    /// reads their tails again.
    pub fn take_dropped_cleanups(&mut self) -> Vec<PartitionKey> {
        std::mem::take(&mut self.dropped_cleanups)
    }

    /// The next step of a cleanup, when one is due and no transaction is
    /// open.
    pub fn next_cleanup(&mut self) -> Option<CleanupStep> {
        if self.state != State::Idle
            || self.stuck.is_some()
            || self.cleanup.is_some()
            || self.committing.is_some()
        {
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
                    return Next::Pause(crate::publish::outcome::backoff(
                        failures,
                        crate::publish::pause::MAX_RETRY_BACKOFF,
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
    pub(super) fn give_up_cleanup(&mut self) -> Next {
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
}
