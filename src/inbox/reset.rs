//! A partition whose log is not the one the inbox stored offsets for.
//!
//! The inbox stores each partition's next offset and, beside it, its
//! topic's id (KIP-516). A topic deleted and created again keeps its name
//! and gets a new, empty log and a new id; a truncated log (an unclean
//! leader election) loses its end. Either way the stored offset says
//! nothing about the log now: asked for an offset past the log's end,
//! librdkafka starts again from the log's start (`auto.offset.reset`),
//! and the records there would look already stored; a new log that has
//! grown past the stored offset would be read from there, its first
//! records passed over. Both are silent losses.
//!
//! So a partition's stored offset is checked against its log before the
//! partition is read ([`check`]): past the log's end, or stored under
//! another topic id, the partition was reset, and `--on-topic-reset`
//! decides what happens: stop with the facts and the fix (the default), or
//! read the new log from its start (each record is still stored once: the
//! inbox's primary key is the record's `id`).

use std::fmt;

use super::store::{StoredOffset, TopicPartition};

/// What the inbox does with a partition whose topic was made again (or
/// whose log was truncated).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnTopicReset {
    /// Stop with an error naming the topic, the partition, the offsets and
    /// the topic ids, and what to do.
    Fail,
    /// Read the partition's log now from its start; a record whose id is
    /// already in the inbox is skipped.
    Earliest,
}

/// A partition's log now, as the broker reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogNow {
    /// The first offset still in the log (low watermark).
    pub start: i64,
    /// The offset the next record will get (high watermark).
    pub end: i64,
    /// `None` when the broker keeps no topic ids.
    pub topic_id: Option<String>,
}

/// A partition whose stored offset belongs to another log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionReset {
    pub tp: TopicPartition,
    pub stored: StoredOffset,
    pub log: LogNow,
}

/// Whether the stored offset of `tp` belongs to its log now: `None` when
/// it does (or when nothing says otherwise: a stored offset without a
/// topic id, from an older walrelay, that is not past the log's end).
pub fn check(tp: &TopicPartition, stored: &StoredOffset, log: &LogNow) -> Option<PartitionReset> {
    let id_changed = matches!(
        (&stored.topic_id, &log.topic_id),
        (Some(was), Some(now)) if was != now
    );
    (id_changed || stored.next > log.end).then(|| PartitionReset {
        tp: tp.clone(),
        stored: stored.clone(),
        log: log.clone(),
    })
}

impl fmt::Display for PartitionReset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ((topic, partition), stored, log) = (&self.tp, &self.stored, &self.log);
        let ids = match (&stored.topic_id, &log.topic_id) {
            (Some(was), Some(now)) if was != now => {
                return write!(
                    f,
                    "topic {topic} was deleted and created again: its id is {now}, but the inbox stored next offset {} of partition {partition} under topic id {was}; the partition's log now runs from offset {} to {}",
                    stored.next, log.start, log.end,
                );
            }
            (Some(was), Some(_)) => format!("topic id {was}"),
            (None, Some(now)) => format!("no topic id stored, {now} now"),
            (Some(was), None) => format!("topic id {was} stored, none reported now"),
            (None, None) => "the broker reports no topic ids".to_owned(),
        };
        write!(
            f,
            "partition {partition} of topic {topic} ends at offset {}, below the next offset the inbox stored, {}: the topic was deleted and created again, or the partition's log truncated ({ids})",
            log.end, stored.next,
        )
    }
}

/// Partitions reset, under `--on-topic-reset fail`: why the inbox stopped,
/// and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicResets {
    pub resets: Vec<PartitionReset>,
    /// Where the offsets are, for the fix by hand.
    pub offsets_table: String,
    pub group: String,
}

impl fmt::Display for TopicResets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, reset) in self.resets.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{reset}")?;
        }
        write!(
            f,
            ". The inbox stopped rather than pass over records of the new log. To read it from its start, run `walrelay inbox` with --on-topic-reset earliest (a record whose id is already in the inbox is skipped, so none is stored twice); to start elsewhere, set that partition's next_offset (and topic_id to NULL) in {} for consumer group {}",
            self.offsets_table, self.group
        )
    }
}

impl std::error::Error for TopicResets {}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp() -> TopicPartition {
        ("orders".to_owned(), 3)
    }

    fn stored(next: i64, topic_id: Option<&str>) -> StoredOffset {
        StoredOffset {
            next,
            topic_id: topic_id.map(str::to_owned),
        }
    }

    fn log(start: i64, end: i64, topic_id: Option<&str>) -> LogNow {
        LogNow {
            start,
            end,
            topic_id: topic_id.map(str::to_owned),
        }
    }

    #[test]
    fn a_stored_offset_within_the_same_topics_log_is_no_reset() {
        assert_eq!(
            check(&tp(), &stored(40, Some("A")), &log(0, 40, Some("A"))),
            None
        );
        assert_eq!(
            check(&tp(), &stored(0, Some("A")), &log(0, 0, Some("A"))),
            None
        );
        // Retention removed the stored offset: librdkafka starts at the
        // log's start, as it always did.
        assert_eq!(
            check(&tp(), &stored(5, Some("A")), &log(9, 40, Some("A"))),
            None
        );
    }

    #[test]
    fn a_stored_offset_past_the_logs_end_is_a_reset_with_or_without_topic_ids() {
        for ids in [(Some("A"), Some("A")), (None, Some("A")), (None, None)] {
            let reset = check(&tp(), &stored(10_000, ids.0), &log(0, 40, ids.1));
            assert!(reset.is_some(), "{ids:?}");
        }
    }

    #[test]
    fn another_topic_id_is_a_reset_even_when_the_new_log_has_grown_past_the_offset() {
        let reset = check(&tp(), &stored(40, Some("A")), &log(0, 12_000, Some("B")));
        assert!(reset.is_some());
    }

    #[test]
    fn an_offset_stored_without_a_topic_id_takes_the_current_one_on_trust() {
        // Tables of an older walrelay hold no topic id: only the offset
        // can tell.
        assert_eq!(
            check(&tp(), &stored(40, None), &log(0, 12_000, Some("B"))),
            None
        );
        assert_eq!(
            check(&tp(), &stored(40, Some("A")), &log(0, 12_000, None)),
            None
        );
    }

    #[test]
    fn the_error_names_topic_partition_offsets_ids_and_the_fix() {
        let resets = TopicResets {
            resets: vec![
                check(&tp(), &stored(10_000, Some("A")), &log(0, 40, Some("B"))).unwrap(),
                check(&tp(), &stored(10_000, None), &log(0, 40, Some("B"))).unwrap(),
            ],
            offsets_table: "public.inbox_offsets".into(),
            group: "walrelay-inbox".into(),
        };
        let text = resets.to_string();
        for needle in [
            "topic orders was deleted and created again: its id is B, but the inbox stored next offset 10000 of partition 3 under topic id A; the partition's log now runs from offset 0 to 40",
            "; partition 3 of topic orders ends at offset 40, below the next offset the inbox stored, 10000",
            "(no topic id stored, B now)",
            "--on-topic-reset earliest",
            "next_offset (and topic_id to NULL) in public.inbox_offsets for consumer group walrelay-inbox",
        ] {
            assert!(text.contains(needle), "{needle:?} is not in: {text}");
        }
    }
}
