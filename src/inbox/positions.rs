//! Where the consumer is in each partition it holds, and what to do with a
//! record that arrives for one.
//!
//! A partition is read only once it is placed: its start (the next offset
//! PostgreSQL holds for it, checked against its log now: `reset.rs`) has
//! been read and the consumer moved there. Before that every record that
//! arrives for it is dropped, never taken: taking one past the stored
//! offset would pass over the records between them, and those would be
//! lost. A placed partition whose log goes back under the consumer is
//! placed again, never read on from below its position.

use std::collections::HashMap;

use rdkafka::Offset;

use super::store::TopicPartition;

/// How far a partition is from being read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Just assigned, rewound after a failed store, or its log went back:
    /// its start must be read from PostgreSQL and checked against its log.
    Unread,
    /// Its start is known (`next`); the consumer has not moved there yet.
    Unsought,
    /// Read from `next` on.
    Placed,
}

/// Where this consumer is in one partition.
#[derive(Clone, Debug)]
pub struct Position {
    pub placement: Placement,
    /// The first offset not yet consumed (stored or in the batch); `None`
    /// before the first record when nothing was ever stored.
    pub next: Option<i64>,
    /// The id of the topic read, learnt when placed (`None`: the broker
    /// keeps no topic ids).
    pub topic_id: Option<String>,
    pub high_watermark: Option<i64>,
}

/// Where a partition starts, once its stored offset was checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Start {
    /// The next offset to take; `None` when nothing was ever stored.
    pub next: Option<i64>,
    pub topic_id: Option<String>,
}

impl Position {
    /// Where to start reading: the stored next offset, or the log's start
    /// when nothing was ever stored (or, through `auto.offset.reset`, when
    /// retention deleted the stored offset).
    pub fn start(&self) -> Offset {
        match self.next {
            Some(next) => Offset::Offset(next),
            None => Offset::Beginning,
        }
    }
}

/// What to do with a record that just arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    Take,
    /// Below the partition's position: its log went back (librdkafka
    /// started again from the log's start after asking for an offset past
    /// its end: the topic was made again, or the log truncated). Dropped,
    /// and the partition is to be placed again.
    Behind,
    /// The partition is not placed yet: drop it, it is read again from the
    /// stored offset.
    Unplaced,
    /// Not ours (revoked in the meantime).
    NotOurs,
}

/// Every partition this consumer holds.
#[derive(Debug, Default)]
pub struct Positions(HashMap<TopicPartition, Position>);

impl Positions {
    /// A partition just assigned: unread until the loop places it.
    pub fn assign(&mut self, tp: TopicPartition) {
        self.0.insert(
            tp,
            Position {
                placement: Placement::Unread,
                next: None,
                topic_id: None,
                high_watermark: None,
            },
        );
    }

    pub fn remove(&mut self, tp: &TopicPartition) {
        self.0.remove(tp);
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// Every partition back to unread (after a failed store); returns them.
    pub fn rewind_all(&mut self) -> Vec<TopicPartition> {
        for position in self.0.values_mut() {
            position.placement = Placement::Unread;
        }
        self.0.keys().cloned().collect()
    }

    /// These placed partitions back to unread: their start is read and
    /// checked again.
    pub fn unplace(&mut self, partitions: &[TopicPartition]) {
        for tp in partitions {
            if let Some(position) = self.0.get_mut(tp) {
                position.placement = Placement::Unread;
            }
        }
    }

    /// The partitions whose start must be read from PostgreSQL.
    pub fn unread(&self) -> Vec<TopicPartition> {
        self.in_state(Placement::Unread)
    }

    /// The partitions whose start is known, and where to move to.
    pub fn unsought(&self) -> Vec<(TopicPartition, Offset)> {
        self.in_state(Placement::Unsought)
            .into_iter()
            .map(|tp| {
                let start = self.0[&tp].start();
                (tp, start)
            })
            .collect()
    }

    fn in_state(&self, placement: Placement) -> Vec<TopicPartition> {
        let mut partitions: Vec<TopicPartition> = self
            .0
            .iter()
            .filter(|(_, p)| p.placement == placement)
            .map(|(tp, _)| tp.clone())
            .collect();
        partitions.sort();
        partitions
    }

    /// The starts of these partitions were read and checked. A partition
    /// revoked or rewound since is left alone.
    pub fn found(&mut self, starts: &HashMap<TopicPartition, Start>) {
        for (tp, start) in starts {
            if let Some(position) = self.0.get_mut(tp)
                && position.placement == Placement::Unread
            {
                position.next = start.next;
                position.topic_id = start.topic_id.clone();
                position.placement = Placement::Unsought;
            }
        }
    }

    /// The topic id each partition was placed with, where known (stored
    /// beside its offsets).
    pub fn topic_ids(&self) -> HashMap<TopicPartition, String> {
        self.0
            .iter()
            .filter_map(|(tp, p)| Some((tp.clone(), p.topic_id.clone()?)))
            .collect()
    }

    /// The consumer was moved to the partition's start.
    pub fn placed(&mut self, tp: &TopicPartition) {
        if let Some(position) = self.0.get_mut(tp)
            && position.placement == Placement::Unsought
        {
            position.placement = Placement::Placed;
        }
    }

    pub fn set_high_watermark(&mut self, tp: &TopicPartition, high: i64) {
        if let Some(position) = self.0.get_mut(tp) {
            position.high_watermark = Some(high);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&TopicPartition, &Position)> {
        self.0.iter()
    }

    /// Decides what to do with a record at `offset` of `tp`, and moves the
    /// partition's position past a record taken.
    pub fn arrive(&mut self, tp: &TopicPartition, offset: i64) -> Arrival {
        let Some(position) = self.0.get_mut(tp) else {
            return Arrival::NotOurs;
        };
        if position.placement != Placement::Placed {
            return Arrival::Unplaced;
        }
        match position.next {
            Some(next) if offset < next => Arrival::Behind,
            Some(next) => {
                if offset > next {
                    // Transaction markers take offsets; compaction and
                    // retention remove records. Nothing is passed over.
                    tracing::debug!(topic = %tp.0, partition = tp.1, from = next, to = offset, "offsets without records");
                }
                position.next = Some(offset + 1);
                Arrival::Take
            }
            None => {
                position.next = Some(offset + 1);
                Arrival::Take
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(partition: i32) -> TopicPartition {
        ("orders".to_owned(), partition)
    }

    /// Starts `next` (and topic id "A") for `tp(0)`.
    fn start(next: Option<i64>) -> HashMap<TopicPartition, Start> {
        let start = Start {
            next,
            topic_id: Some("A".into()),
        };
        HashMap::from([(tp(0), start)])
    }

    /// `tp(0)` placed at `stored`.
    fn placed_at(stored: Option<i64>) -> Positions {
        let mut positions = Positions::default();
        positions.assign(tp(0));
        positions.found(&start(stored));
        positions.placed(&tp(0));
        positions
    }

    #[test]
    fn nothing_is_taken_before_the_partition_is_placed() {
        let mut positions = Positions::default();
        positions.assign(tp(0));
        assert_eq!(positions.unread(), [tp(0)]);
        assert_eq!(positions.arrive(&tp(0), 0), Arrival::Unplaced);
        positions.found(&start(Some(40)));
        assert_eq!(positions.unsought(), [(tp(0), Offset::Offset(40))]);
        // Known but not sought yet: a record fetched from elsewhere
        // (the log's start, or past the stored offset) is still dropped.
        assert_eq!(positions.arrive(&tp(0), 41), Arrival::Unplaced);
        positions.placed(&tp(0));
        assert_eq!(positions.arrive(&tp(0), 40), Arrival::Take);
        assert_eq!(positions.arrive(&tp(1), 0), Arrival::NotOurs);
    }

    #[test]
    fn a_placed_partition_takes_from_its_stored_offset_on() {
        let mut positions = placed_at(Some(10));
        assert_eq!(positions.arrive(&tp(0), 10), Arrival::Take);
        // A gap (a transaction marker) is passed over, not a record.
        assert_eq!(positions.arrive(&tp(0), 12), Arrival::Take);
        assert_eq!(positions.iter().next().unwrap().1.next, Some(13));
        assert_eq!(
            positions.topic_ids(),
            HashMap::from([(tp(0), "A".to_owned())])
        );
    }

    #[test]
    fn a_record_below_the_position_means_the_log_went_back_and_is_not_taken() {
        let mut positions = placed_at(Some(10));
        assert_eq!(positions.arrive(&tp(0), 10), Arrival::Take);
        // librdkafka started the log again from its start.
        assert_eq!(positions.arrive(&tp(0), 0), Arrival::Behind);
        assert_eq!(positions.iter().next().unwrap().1.next, Some(11));
        positions.unplace(&[tp(0)]);
        assert_eq!(positions.unread(), [tp(0)]);
        assert_eq!(positions.arrive(&tp(0), 1), Arrival::Unplaced);
    }

    #[test]
    fn nothing_stored_starts_at_the_log_start_and_takes_the_first_record() {
        let mut positions = Positions::default();
        positions.assign(tp(0));
        positions.found(&start(None));
        assert_eq!(positions.unsought(), [(tp(0), Offset::Beginning)]);
        positions.placed(&tp(0));
        assert_eq!(positions.arrive(&tp(0), 7), Arrival::Take);
    }

    #[test]
    fn a_rewind_unplaces_every_partition_until_its_start_is_read_again() {
        let mut positions = placed_at(Some(5));
        assert_eq!(positions.arrive(&tp(0), 5), Arrival::Take);
        assert_eq!(positions.rewind_all(), [tp(0)]);
        assert_eq!(positions.arrive(&tp(0), 6), Arrival::Unplaced);
        positions.found(&start(Some(5)));
        positions.placed(&tp(0));
        assert_eq!(positions.arrive(&tp(0), 5), Arrival::Take);
    }

    #[test]
    fn a_start_read_for_a_partition_revoked_meanwhile_is_ignored() {
        let mut positions = Positions::default();
        positions.assign(tp(0));
        positions.remove(&tp(0));
        positions.found(&start(Some(3)));
        assert!(positions.unsought().is_empty());
        assert_eq!(positions.arrive(&tp(0), 3), Arrival::NotOurs);
    }
}
