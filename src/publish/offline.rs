//! Partitions that cannot take writes: their leader is gone (every
//! replica's broker is down). Their records wait here, outside
//! transactions, so every other partition's go on committing; nothing is
//! confirmed past them meanwhile, since they are not delivered.
//!
//! Records outstanding for `STALL` make the publisher ask the sink which
//! of their partitions (and of those the current transaction touched) have
//! no leader; partitions held are asked again every `RECHECK` until they
//! have one. So are partitions whose tail read (exactly once, before their
//! first send) has failed for `STALL`: after a restart, the records of an
//! offline partition wait for that read, not inside the producer.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::ledgers::PartitionKey;
use crate::live::{self, HeldPartitions};
use crate::metrics as m;

/// How long records may be outstanding before their partitions are asked
/// after. A leader being elected takes about the broker's session timeout
/// (9 s by default), and its partitions have a leader all along: they are
/// never held.
pub const STALL: Duration = Duration::from_secs(5);
/// How often partitions held are asked after again.
pub const RECHECK: Duration = Duration::from_secs(2);

/// A partition held, since when.
#[derive(Clone, Debug, PartialEq)]
pub struct HeldPartition {
    pub topic: String,
    pub partition: i32,
    pub since: SystemTime,
}

#[derive(Default)]
pub struct Offline {
    held: HashMap<PartitionKey, (Instant, SystemTime)>,
    /// Where the dashboard reads them.
    board: HeldPartitions,
    /// A question is with the sink.
    asking: bool,
    last_asked: Option<Instant>,
    /// Partitions whose tail read keeps failing, since its first failure.
    unread: HashMap<PartitionKey, Instant>,
}

impl Offline {
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Whether `partition`'s records wait.
    pub fn holds(&self, partition: &PartitionKey) -> bool {
        !self.held.is_empty() && self.held.contains_key(partition)
    }

    pub fn held(&self) -> impl Iterator<Item = &PartitionKey> {
        self.held.keys()
    }

    /// The partitions held, for the dashboard.
    pub fn snapshot(&self) -> Vec<HeldPartition> {
        let mut held: Vec<HeldPartition> = self
            .held
            .iter()
            .filter_map(|(key, (_, since))| {
                Some(HeldPartition {
                    topic: key.topic.clone(),
                    partition: key.partition?,
                    since: *since,
                })
            })
            .collect();
        held.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        held
    }

    /// Shows the partitions held on `board` from now on.
    pub fn share(&mut self, board: HeldPartitions) {
        self.board = board;
        self.show();
    }

    fn show(&self) {
        let held = self
            .snapshot()
            .into_iter()
            .map(|h| live::HeldPartition {
                since_unix_ms: h
                    .since
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis() as u64,
                topic: h.topic,
                partition: h.partition,
            })
            .collect();
        self.board.set(held);
    }

    /// `partition`'s tail could not be read.
    pub fn read_failed(&mut self, partition: &PartitionKey) {
        self.unread
            .entry(partition.clone())
            .or_insert_with(Instant::now);
    }

    /// `partition`'s tail was read (or its read ended for good).
    pub fn read_done(&mut self, partition: &PartitionKey) {
        self.unread.remove(partition);
    }

    /// Partitions whose tail read has failed for `STALL`.
    pub fn unread(&self) -> impl Iterator<Item = &PartitionKey> {
        self.unread
            .iter()
            .filter(|(_, since)| since.elapsed() >= STALL)
            .map(|(key, _)| key)
    }

    /// When to ask next, given when the oldest record outstanding was sent.
    pub fn ask_at(&self, oldest_outstanding: Option<Instant>) -> Option<Instant> {
        if self.asking {
            return None;
        }
        let not_before = self.last_asked.map(|at| at + RECHECK);
        let oldest_unread = self.unread.values().min().copied();
        let stalled = match (oldest_outstanding, oldest_unread) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
        .map(|at| at + STALL);
        let recheck = (!self.held.is_empty()).then_some(not_before).flatten();
        let at = match (stalled, recheck) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }?;
        Some(not_before.map_or(at, |n| at.max(n)))
    }

    /// A question goes to the sink now.
    pub fn asking(&mut self) {
        self.asking = true;
        self.last_asked = Some(Instant::now());
    }

    /// The answer: of `asked`, those in `leaderless` have no leader. Returns
    /// the partitions newly held and those back.
    pub fn answered(
        &mut self,
        asked: &HashSet<PartitionKey>,
        leaderless: &HashSet<PartitionKey>,
    ) -> (HashSet<PartitionKey>, HashSet<PartitionKey>) {
        self.asking = false;
        let mut new = HashSet::new();
        for key in leaderless {
            if !self.held.contains_key(key) {
                let since = SystemTime::now();
                tracing::warn!(topic = %key.topic, partition = key.partition, "the partition has no leader: its records wait outside transactions until it is back, and nothing is confirmed past them; every other partition's records go on");
                let unix = since
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64();
                metrics::gauge!(m::PARTITION_UNAVAILABLE_SINCE, "topic" => key.topic.clone(), "partition" => key.label()).set(unix);
                self.held.insert(key.clone(), (Instant::now(), since));
                new.insert(key.clone());
            }
        }
        let back: HashSet<PartitionKey> = self
            .held
            .keys()
            .filter(|k| asked.contains(*k) && !leaderless.contains(*k))
            .cloned()
            .collect();
        for key in &back {
            if let Some((since, _)) = self.held.remove(key) {
                tracing::info!(topic = %key.topic, partition = key.partition, held_for = ?since.elapsed(), "the partition has a leader again: its records go on");
                metrics::gauge!(m::PARTITION_UNAVAILABLE_SINCE, "topic" => key.topic.clone(), "partition" => key.label()).set(0.0);
            }
        }
        metrics::gauge!(m::PARTITIONS_UNAVAILABLE).set(self.held.len() as f64);
        if !new.is_empty() || !back.is_empty() {
            self.show();
        }
        (new, back)
    }

    /// The question failed (the broker is away): ask again later.
    pub fn unanswered(&mut self) {
        self.asking = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: i32) -> PartitionKey {
        PartitionKey::new("t", p)
    }

    #[tokio::test(start_paused = true)]
    async fn records_outstanding_past_the_stall_are_asked_after_and_held_partitions_rechecked() {
        let mut offline = Offline::default();
        assert_eq!(
            offline.ask_at(None),
            None,
            "nothing outstanding, nothing held"
        );
        let sent = Instant::now();
        assert_eq!(offline.ask_at(Some(sent)), Some(sent + STALL));
        tokio::time::advance(STALL).await;
        offline.asking();
        assert_eq!(offline.ask_at(Some(sent)), None, "one question at a time");
        let asked: HashSet<_> = [key(0), key(1)].into();
        let (new, back) = offline.answered(&asked, &[key(1)].into());
        assert_eq!(new, [key(1)].into());
        assert!(back.is_empty());
        assert!(offline.holds(&key(1)) && !offline.holds(&key(0)));
        assert_eq!(
            offline.ask_at(None),
            Some(Instant::now() + RECHECK),
            "a held partition is asked after again"
        );
        tokio::time::advance(RECHECK).await;
        offline.asking();
        let (new, back) = offline.answered(&[key(1)].into(), &HashSet::new());
        assert!(new.is_empty());
        assert_eq!(back, [key(1)].into());
        assert!(!offline.holds(&key(1)));
        assert!(offline.snapshot().is_empty());
    }
}
