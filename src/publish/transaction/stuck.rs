//! A partition with no leader.
//!
//! Kafka ends a transaction only once it has written its marker into every
//! partition the transaction touched. So a transaction that touched a
//! partition whose every replica is offline cannot end until that partition
//! is back, and until then its transactional id can begin no other. Each
//! session therefore takes over three ids, `<id>`, `<id>.spare` and
//! `<id>.spare2`: two take turns (`overlap.rs`), the third stays clean,
//! since a partition losing its leader while one of the two commits and the
//! other is open sticks both. When a partition the current id touched (in
//! the open transaction, or the one before, whose markers may still be
//! unwritten) has no leader, that id is *stuck*: its open transaction is
//! aborted (its records are sent again), its producer dropped, and it rests
//! until the partition is back, while another id carries the records of
//! every other partition (alone, one transaction at a time, when it is the
//! only one left). The publisher keeps the offline partition's records out
//! of transactions meanwhile (`offline.rs`).

use std::collections::HashSet;

use super::{Next, State, Transaction};
use crate::publish::ledgers::PartitionKey;

impl Transaction {
    /// A stuck id rests, even with its transaction's end unknown (a new
    /// session begins): taking it over again would wait for its partitions.
    pub(super) fn rest_stuck(&mut self) {
        if let (Some(stuck), Some(index)) = (self.stuck.take(), self.current) {
            self.ids[index].resting.extend(stuck);
        }
        if let Some(c) = self.committing.take() {
            self.ids[c.index].resting.extend(c.stuck);
        }
    }

    /// Partitions with no leader now: whether the current id is stuck on
    /// one of them. If so, its open transaction must be aborted
    /// ([`Transaction::due`]), or, with none open, it rests at once
    /// ([`Next::Rest`]).
    pub fn leaderless(&mut self, partitions: &HashSet<PartitionKey>) -> Option<Next> {
        // The id whose transaction is ending rests once it has ended.
        if let Some(c) = self.committing.as_mut() {
            let id = &self.ids[c.index];
            c.stuck.extend(
                id.touched
                    .union(&id.previous)
                    .filter(|p| partitions.contains(*p))
                    .cloned(),
            );
        }
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
            State::Idle if self.committing.is_none() => Some(self.rest(false)),
            // A commit or an abort under way ends first (the one before the
            // open one's too).
            _ => None,
        }
    }

    /// A stuck id whose commit or abort ended meanwhile rests now.
    pub fn rest_if_stuck(&mut self) -> Option<Next> {
        (self.state == State::Idle && self.stuck.is_some() && self.committing.is_none())
            .then(|| self.rest(false))
    }

    /// The current id rests on the partitions it is stuck on; `aborted`:
    /// its open transaction was aborted.
    pub(super) fn rest(&mut self, aborted: bool) -> Next {
        let stuck = self.stuck.take().unwrap_or_default();
        self.must_abort = false;
        let Some(index) = self.current.take() else {
            return Next::SendAgain;
        };
        self.drop_cleanups(index);
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
    /// be taken over again. A stuck id whose commit or abort has not ended
    /// yet still ends it (and is taken over again after), but no longer
    /// rests on these: no later answer would say they are back.
    pub fn back(&mut self, partitions: &HashSet<PartitionKey>) {
        for id in &mut self.ids {
            id.resting.retain(|p| !partitions.contains(p));
        }
        if let Some(stuck) = self.stuck.as_mut() {
            stuck.retain(|p| !partitions.contains(p));
        }
        // So does the id of the transaction before the open one, still
        // ending: it is not retired on these once it has ended.
        if let Some(c) = self.committing.as_mut() {
            c.stuck.retain(|p| !partitions.contains(p));
        }
    }
}
