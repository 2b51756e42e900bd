//! The session's transactional ids: `<id>`, `<id>.spare` and
//! `<id>.spare2`, each taken over (fencing any earlier holder) before the
//! first record goes out; which one is in use.

use std::collections::HashSet;

use super::{Next, SPARE_SUFFIXES, State, Transaction};
use crate::publish::ledgers::PartitionKey;
use crate::publish::sink::BrokerError;

/// One transactional id of the session.
#[derive(Debug)]
pub(super) struct TxnId {
    pub(super) name: String,
    /// Taken over in this session, its producer alive.
    pub(super) ready: bool,
    /// Stuck: it is not used until each of these partitions has a leader
    /// again.
    pub(super) resting: HashSet<PartitionKey>,
    /// Partitions of its open transaction.
    pub(super) touched: HashSet<PartitionKey>,
    /// Partitions of its transaction before (its markers may still be
    /// unwritten).
    pub(super) previous: HashSet<PartitionKey>,
    /// Partitions where its last transaction was aborted: one it left open
    /// there may be ended with an abort.
    pub(super) aborted_in: HashSet<PartitionKey>,
    /// Partitions it must clean up (abort one record in).
    pub(super) to_clean: HashSet<PartitionKey>,
}

impl TxnId {
    pub(super) fn new(name: String) -> Self {
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

impl Transaction {
    /// A new session takes the transactional ids over: `id` and its two
    /// spares. Two take turns (the next transaction under one while the
    /// other commits); the third stays clean, so that with both of the
    /// others stuck on a partition with no leader (one committing, one
    /// open, both wrote there) an id is left to carry every other
    /// partition's records (`stuck.rs`).
    /// An id resting on an offline partition in this process stays out
    /// until the partition is back (taking it over now would wait for it).
    pub fn restart(&mut self, id: Option<String>) {
        if !self.is_on() {
            return;
        }
        self.rest_stuck();
        self.uninitialized();
        self.id = None;
        let names: Vec<String> = match &id {
            Some(id) => std::iter::once(id.clone())
                .chain(SPARE_SUFFIXES.iter().map(|suffix| format!("{id}{suffix}")))
                .collect(),
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

    /// No id in use, none being taken over, nothing to end: a session
    /// (re)starts or was abandoned.
    fn uninitialized(&mut self) {
        self.state = State::Uninitialized;
        self.must_abort = false;
        self.stuck = None;
        self.current = None;
        self.initializing = None;
        self.taking_over.clear();
        self.failed_takeovers.clear();
        self.cleanup = None;
    }

    /// Everything in flight was abandoned: the producers must be taken over
    /// again.
    pub fn abandon(&mut self) {
        self.rest_stuck();
        if self.is_on() {
            self.uninitialized();
            for id in &mut self.ids {
                id.to_clean.clear();
                id.ready = false;
                id.touched.clear();
                id.previous.clear();
            }
        }
    }

    /// The next id to take over now, if one must be: every id not resting
    /// is taken over before the first record goes out, so every earlier
    /// holder of each is fenced. They are taken over at once (call this
    /// until it answers `None`): each takeover is a round trip to its
    /// coordinator, and a restart waits for all of them.
    pub fn take_initialization(&mut self) -> Option<String> {
        let taking_over = self.state == State::Initializing && self.cleanup.is_none();
        if self.state != State::Uninitialized && !taking_over {
            return None;
        }
        let index = (0..self.ids.len()).find(|&i| {
            !self.ids[i].ready
                && self.ids[i].resting.is_empty()
                && !self.taking_over.contains(&i)
                && !self.failed_takeovers.contains(&i)
        })?;
        self.state = State::Initializing;
        self.taking_over.push(index);
        Some(self.ids[index].name.clone())
    }

    /// The takeover of the transactional id `name` finished.
    pub fn initialized(&mut self, name: &str, result: Result<(), BrokerError>) -> Next {
        if let Some(cleanup) = &self.cleanup {
            let index = self.initializing.take();
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
        let Some(at) = self
            .taking_over
            .iter()
            .position(|&i| self.ids[i].name == name)
        else {
            return Next::Go; // not taken over in this session
        };
        let index = self.taking_over.remove(at);
        // The others under way are waited for; then, if any failed, one
        // backoff (not one per id) before the next attempt takes over what
        // is left.
        let round_over = self.taking_over.is_empty();
        if round_over {
            self.state = State::Uninitialized;
        }
        let back_off_once = |t: &mut Self| {
            if round_over && !t.failed_takeovers.is_empty() {
                t.failed_takeovers.clear();
                Next::BackOff
            } else {
                Next::Go
            }
        };
        match result {
            Ok(()) => {
                self.ids[index].ready = true;
                tracing::debug!(id = %self.ids[index].name, "transactional producer ready");
                if !round_over || !self.failed_takeovers.is_empty() {
                    return back_off_once(self);
                }
                if self.ids.iter().any(|id| !id.ready && id.resting.is_empty()) {
                    return Next::Go;
                }
                match self.pick() {
                    Some(name) => {
                        self.state = State::Idle;
                        Next::Use(name)
                    }
                    None => Next::Go,
                }
            }
            Err(error) if error.ends_producer() => {
                // The error names the id (no id is in use yet).
                self.id = Some(self.ids[index].name.clone());
                Next::EndProducer(error)
            }
            Err(error) => {
                tracing::warn!(%error, id = %self.ids[index].name, "cannot take over the transactional id yet");
                self.failed_takeovers.push(index);
                back_off_once(self)
            }
        }
    }

    /// Makes the first ready, rested id the current one.
    pub(super) fn pick(&mut self) -> Option<String> {
        let index = self
            .ids
            .iter()
            .position(|id| id.ready && id.resting.is_empty())?;
        self.current = Some(index);
        self.id = Some(self.ids[index].name.clone());
        Some(self.ids[index].name.clone())
    }
}
