//! The records the publisher holds: every record handed over and not yet
//! settled, in the order it was handed over, with what it is waiting for.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ops::Bound;

use tokio::time::Instant;

use super::ledgers::PartitionKey;
use super::position::Position;
use super::sink::{RecordId, SendId};
use crate::record::KafkaRecord;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Waiting to be sent.
    Pending,
    /// Sent, not yet delivered.
    Sent,
    /// Its delivery report is being handled.
    Reported,
    /// Delivered, its transaction not yet committed.
    Acked,
    /// Delivered, its transaction committing (the next one may be open
    /// meanwhile, under another transactional id).
    Sealed,
}

#[derive(Debug)]
pub struct Entry<T> {
    pub tag: T,
    pub record: KafkaRecord,
    pub position: Option<Position>,
    pub dead_letter: bool,
    pub state: State,
    /// Counts its sends: a report of an earlier one is not this one's.
    pub attempt: u16,
    /// Sent: when, and to which partition (`None`: the sink's
    /// partitioner picked).
    sent: Option<(Instant, Option<i32>)>,
}

/// What holds waiting records back, as the last pass over them found.
#[derive(Default)]
pub struct Held {
    /// Everything (a full queue, a transaction being ended, a pause).
    pub all: bool,
    pub topics: HashSet<String>,
    pub partitions: HashSet<PartitionKey>,
}

pub struct Records<T> {
    entries: BTreeMap<RecordId, Entry<T>>,
    /// Records waiting to be sent, in the order they were handed over.
    pending: BTreeSet<RecordId>,
    next_id: u64,
    /// Records whose delivery report is outstanding.
    sent: usize,
    /// Records delivered, their transaction not yet committed.
    acked: usize,
    /// Records of the transaction committing.
    sealed: usize,
    /// Records whose delivery report is outstanding, oldest send first.
    outstanding: BTreeSet<(Instant, RecordId)>,
    pub held: Held,
}

impl<T> Records<T> {
    pub fn new() -> Self {
        Records {
            entries: BTreeMap::new(),
            pending: BTreeSet::new(),
            next_id: 0,
            sent: 0,
            acked: 0,
            sealed: 0,
            outstanding: BTreeSet::new(),
            held: Held::default(),
        }
    }

    /// Takes a record in, waiting; its id orders it after every earlier one.
    pub fn add(
        &mut self,
        tag: T,
        record: KafkaRecord,
        position: Option<Position>,
        dead_letter: bool,
    ) -> RecordId {
        let id = RecordId(self.next_id);
        self.next_id += 1;
        self.entries.insert(
            id,
            Entry {
                tag,
                record,
                position,
                dead_letter,
                state: State::Pending,
                attempt: 0,
                sent: None,
            },
        );
        if self.pending.is_empty() {
            // Nothing waits: what held records back no longer does.
            self.held = Held::default();
        }
        self.pending.insert(id);
        id
    }

    pub fn get(&self, id: RecordId) -> Option<&Entry<T>> {
        self.entries.get(&id)
    }

    /// The oldest waiting record after `after` (from the first if
    /// `None`): the waiting records are walked one at a time, since
    /// sending one may settle others and most walks stop early.
    pub fn next_waiting(&self, after: Option<RecordId>) -> Option<RecordId> {
        match after {
            None => self.pending.first().copied(),
            Some(id) => self
                .pending
                .range((Bound::Excluded(id), Bound::Unbounded))
                .next()
                .copied(),
        }
    }

    /// The records waiting to be sent, in order.
    pub fn waiting(&self) -> impl Iterator<Item = &Entry<T>> {
        self.pending.iter().map(|id| &self.entries[id])
    }

    /// The waiting records of `topic`.
    pub fn waiting_for(&self, topic: &str) -> Vec<RecordId> {
        self.pending
            .iter()
            .filter(|id| self.entries[id].record.topic == topic)
            .copied()
            .collect()
    }

    /// The next send of a waiting record.
    pub fn next_send(&self, id: RecordId) -> SendId {
        SendId {
            id,
            attempt: self
                .entries
                .get(&id)
                .map_or(0, |e| e.attempt.wrapping_add(1)),
        }
    }

    /// `send` went out to `partition`.
    pub fn mark_sent(&mut self, send: SendId, partition: Option<i32>) {
        if let Some(entry) = self.entries.get_mut(&send.id) {
            let now = Instant::now();
            entry.state = State::Sent;
            entry.attempt = send.attempt;
            entry.sent = Some((now, partition));
            self.pending.remove(&send.id);
            self.outstanding.insert((now, send.id));
            self.sent += 1;
        }
    }

    /// A delivery report came for `send`: whether it was outstanding (a
    /// report of an earlier send, or of a record settled since, is not).
    /// The caller then marks it delivered, sends it again, or settles it.
    pub fn reported(&mut self, send: SendId) -> bool {
        match self.entries.get_mut(&send.id) {
            Some(entry) if entry.state == State::Sent && entry.attempt == send.attempt => {
                self.sent -= 1;
                entry.state = State::Reported;
                if let Some((at, _)) = entry.sent {
                    self.outstanding.remove(&(at, send.id));
                }
                true
            }
            _ => false,
        }
    }

    /// When the oldest record still outstanding was sent.
    pub fn oldest_outstanding(&self) -> Option<Instant> {
        self.outstanding.first().map(|(at, _)| *at)
    }

    /// The partitions of the records outstanding.
    pub fn outstanding_partitions(&self) -> HashSet<PartitionKey> {
        self.outstanding
            .iter()
            .filter_map(|(_, id)| {
                let entry = &self.entries[id];
                let (_, partition) = entry.sent?;
                Some(PartitionKey {
                    topic: entry.record.topic.clone(),
                    partition,
                })
            })
            .collect()
    }

    pub fn mark_acked(&mut self, id: RecordId) {
        if let Some(entry) = self.entries.get_mut(&id) {
            if entry.state != State::Acked {
                self.acked += 1;
            }
            entry.state = State::Acked;
        }
    }

    /// Back to waiting (to be sent again).
    pub fn requeue(&mut self, id: RecordId) {
        if let Some(entry) = self.entries.get_mut(&id) {
            match entry.state {
                State::Sent => {
                    self.sent -= 1;
                    if let Some((at, _)) = entry.sent {
                        self.outstanding.remove(&(at, id));
                    }
                }
                State::Acked => self.acked -= 1,
                State::Sealed => self.sealed -= 1,
                State::Pending | State::Reported => {}
            }
            entry.state = State::Pending;
            self.pending.insert(id);
        }
    }

    /// Every record sent or delivered goes back to waiting: their
    /// transaction was aborted.
    pub fn requeue_all(&mut self) {
        self.sent = 0;
        self.acked = 0;
        self.sealed = 0;
        self.outstanding.clear();
        for (id, entry) in self.entries.iter_mut() {
            if entry.state != State::Pending {
                entry.state = State::Pending;
                self.pending.insert(*id);
            }
        }
    }

    /// Settles a record: the publisher is done with it.
    pub fn remove(&mut self, id: RecordId) -> Option<Entry<T>> {
        self.pending.remove(&id);
        let entry = self.entries.remove(&id)?;
        match entry.state {
            State::Sent => {
                self.sent -= 1;
                if let Some((at, _)) = entry.sent {
                    self.outstanding.remove(&(at, id));
                }
            }
            State::Acked => self.acked -= 1,
            State::Sealed => self.sealed -= 1,
            State::Pending | State::Reported => {}
        }
        Some(entry)
    }

    /// The open transaction's delivered records are sealed: it commits,
    /// and what is delivered from now on is the next one's.
    pub fn seal(&mut self) {
        if self.acked == 0 {
            return;
        }
        self.sealed += self.acked;
        self.acked = 0;
        for entry in self.entries.values_mut() {
            if entry.state == State::Acked {
                entry.state = State::Sealed;
            }
        }
    }

    /// Settles every sealed record (their transaction committed).
    pub fn take_sealed(&mut self) -> Vec<Entry<T>> {
        if self.sealed == 0 {
            return Vec::new();
        }
        self.sealed = 0;
        let sealed: Vec<RecordId> = self
            .entries
            .iter()
            .filter(|(_, e)| e.state == State::Sealed)
            .map(|(id, _)| *id)
            .collect();
        sealed
            .into_iter()
            .filter_map(|id| self.entries.remove(&id))
            .collect()
    }

    /// Whether records were written in a transaction not yet committed
    /// (the open one's, or the one committing).
    pub fn any_written(&self) -> bool {
        self.acked > 0 || self.sealed > 0
    }

    pub fn any_acked(&self) -> bool {
        self.acked > 0
    }

    /// Whether any record of `topic` is with the broker.
    pub fn in_flight_to(&self, topic: &str) -> bool {
        self.entries
            .values()
            .any(|e| e.state != State::Pending && e.record.topic == topic)
    }

    /// Records whose delivery report is outstanding.
    pub fn sent(&self) -> usize {
        self.sent
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Forgets everything.
    pub fn clear(&mut self) -> usize {
        let dropped = self.entries.len();
        self.entries.clear();
        self.pending.clear();
        self.sent = 0;
        self.acked = 0;
        self.sealed = 0;
        self.outstanding.clear();
        self.held = Held::default();
        dropped
    }
}
