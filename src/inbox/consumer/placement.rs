//! Placing partitions: where each assigned (or rewound) partition starts
//! reading, checked against its log now, and the seek and resume that put
//! it there; and noticing a placed partition whose log went back or whose
//! topic was made again, so that it is placed again. The loop's half that
//! asks Kafka about logs and topics, apart from its batch and store.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rdkafka::TopicPartitionList;

use super::super::context::partition_list;
use super::super::positions::Start;
use super::super::reset::{self, LogNow, OnTopicReset, PartitionReset, TopicResets};
use super::super::seams::{InboxConsumer, InboxStore};
use super::super::store::{StoreError, StoredOffset, TopicPartition};
use super::{FIRST_BACKOFF, Inbox, InboxError, bounded};
use crate::metrics as m;

/// How long a seek may take, and the wait before one that failed (the
/// partition's fetcher was not started yet) is tried again.
const SEEK_TIMEOUT: Duration = Duration::from_secs(1);
const SEEK_RETRY: Duration = Duration::from_millis(100);
/// Longest a placement waits for the broker's topic ids or a partition's
/// watermarks, and the wait before it tries again when it got none.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(5);
const KAFKA_RETRY: Duration = Duration::from_secs(1);
/// Longest the periodic check of the topic ids waits (a check missed is
/// made at the next one).
const TOPIC_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

impl<C: InboxConsumer, S: InboxStore> Inbox<C, S> {
    /// Places the partitions assigned or rewound since: reads their stored
    /// offsets, seeks each to its start and resumes it. PostgreSQL failing
    /// for now is retried after a backoff; for good, it stops the inbox.
    pub(super) fn place(&mut self) -> Result<(), InboxError> {
        if Instant::now() < self.place_after {
            return Ok(());
        }
        let unread = self.context().lock().positions.unread();
        if !unread.is_empty() {
            match self.stored_offsets(&unread) {
                Ok(stored) => {
                    let Some(starts) = self.starts(&unread, &stored)? else {
                        return Ok(());
                    };
                    self.context().lock().positions.found(&starts);
                    self.backoff = FIRST_BACKOFF;
                    self.live.set_connected(true);
                    if std::mem::take(&mut self.rewinding) {
                        tracing::info!(
                            "PostgreSQL is back; every partition resumes at its stored offset"
                        );
                    }
                }
                Err(e) if e.is_transient() => {
                    self.unreachable(&e);
                    return Ok(());
                }
                // The tables went away (or the role lost its rights): stop.
                Err(e) => return Err(e.into()),
            }
        }
        let unsought = self.context().lock().positions.unsought();
        if unsought.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), start) in &unsought {
            tpl.add_partition_offset(topic, *partition, *start)?;
        }
        // librdkafka drops what was fetched before a seek; `arrive` drops
        // what is below the stored offset.
        let sought: Vec<TopicPartition> = match self.consumer.seek_partitions(tpl, SEEK_TIMEOUT) {
            Ok(tpl) => tpl
                .elements()
                .iter()
                .filter(|e| e.error().is_ok())
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, "cannot seek yet; trying again");
                Vec::new()
            }
        };
        if sought.len() < unsought.len() {
            // Most likely a fetcher not started yet: the next iterations
            // try again.
            self.place_after = Instant::now() + SEEK_RETRY;
        }
        if sought.is_empty() {
            return Ok(());
        }
        let mut shared = self.context().lock();
        for tp in &sought {
            shared.positions.placed(tp);
        }
        drop(shared);
        if let Err(e) = self.consumer.resume(&partition_list(&sought)) {
            tracing::warn!(error = %e, "cannot resume the partitions placed");
        }
        tracing::info!(partitions = ?sought, "partitions placed at their stored offsets");
        Ok(())
    }

    /// PostgreSQL did not answer a placement's call: tried again after a
    /// backoff, on a fresh connection.
    fn unreachable(&mut self, e: &StoreError) {
        self.reconnect = true;
        self.live.set_connected(false);
        self.live.set_last_error(&e.to_string());
        if self.rewinding {
            tracing::warn!(error = %e, "PostgreSQL is still unreachable");
        } else {
            tracing::warn!(error = %e, "cannot read the stored offsets; trying again");
        }
        self.back_off();
    }

    /// Where each of these partitions starts: its stored offset, if it
    /// belongs to the partition's log now; if not (the topic was made
    /// again, or the log truncated), as `--on-topic-reset` says: stop
    /// with the facts, or the log's start (stored at once, so a restart
    /// does not decide again). `None` when Kafka or PostgreSQL did not
    /// answer: the partitions stay unread and are tried again later.
    fn starts(
        &mut self,
        partitions: &[TopicPartition],
        stored: &HashMap<TopicPartition, StoredOffset>,
    ) -> Result<Option<HashMap<TopicPartition, Start>>, InboxError> {
        let Some(ids) = self.topic_ids_to_place(partitions) else {
            return Ok(None);
        };
        let mut starts = HashMap::new();
        let mut resets = Vec::new();
        for tp in partitions {
            let topic_id = ids[&tp.0].clone();
            let Some(stored) = stored.get(tp) else {
                starts.insert(
                    tp.clone(),
                    Start {
                        next: None,
                        topic_id,
                    },
                );
                continue;
            };
            let (start, end) = match self.consumer.log_bounds(tp, KAFKA_TIMEOUT) {
                Ok(bounds) => bounds,
                Err(e) => {
                    self.kafka_unanswered(&format!(
                        "cannot read the log bounds of {} partition {}: {e}",
                        tp.0, tp.1
                    ));
                    return Ok(None);
                }
            };
            let log = LogNow {
                start,
                end,
                topic_id: topic_id.clone(),
            };
            match reset::check(tp, stored, &log) {
                None => {
                    // An offset stored without a topic id (an older
                    // walrelay) takes the current one from the next batch.
                    let next = Some(stored.next);
                    starts.insert(tp.clone(), Start { next, topic_id });
                }
                Some(reset) => resets.push(reset),
            }
        }
        if resets.is_empty() {
            return Ok(Some(starts));
        }
        if self.config.on_topic_reset == OnTopicReset::Fail {
            return Err(TopicResets {
                resets,
                offsets_table: self.config.tables.offsets_table_name(),
                group: self.config.group.clone(),
            }
            .into());
        }
        for reset in resets {
            match self.restart_log(&reset) {
                Ok(true) => {
                    let start = Start {
                        next: Some(reset.log.start),
                        topic_id: reset.log.topic_id,
                    };
                    starts.insert(reset.tp, start);
                }
                // Another member moved the offset meanwhile: read it again.
                Ok(false) => return Ok(None),
                Err(e) if e.is_transient() => {
                    self.unreachable(&e);
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Some(starts))
    }

    /// The ids of the topics of these partitions, to check and store with
    /// their offsets; `None` when Kafka did not say them all.
    fn topic_ids_to_place(
        &mut self,
        partitions: &[TopicPartition],
    ) -> Option<HashMap<String, Option<String>>> {
        let topics: BTreeSet<&str> = partitions.iter().map(|(t, _)| t.as_str()).collect();
        let topics: Vec<&str> = topics.into_iter().collect();
        let mut described = match self.consumer.topic_ids(&topics, KAFKA_TIMEOUT) {
            Ok(described) => described,
            Err(e) => {
                self.kafka_unanswered(&format!("cannot read the ids of topics {topics:?}: {e}"));
                return None;
            }
        };
        let mut ids = HashMap::new();
        for topic in topics {
            match described.remove(topic) {
                Some(Ok(id)) => {
                    ids.insert(topic.to_owned(), id);
                }
                Some(Err(e)) => {
                    self.kafka_unanswered(&format!("cannot read the id of topic {topic}: {e}"));
                    return None;
                }
                None => {
                    self.kafka_unanswered(&format!("the broker did not describe topic {topic}"));
                    return None;
                }
            }
        }
        Some(ids)
    }

    /// `--on-topic-reset earliest`: the partition's stored offset moves to
    /// its log's start, with the topic's id now; returns whether it moved
    /// (it had not changed since it was read).
    fn restart_log(&mut self, reset: &PartitionReset) -> Result<bool, StoreError> {
        let to = StoredOffset {
            next: reset.log.start,
            topic_id: reset.log.topic_id.clone(),
        };
        let address = self.config.pg.address();
        let call = self.store.reset(&reset.tp, &reset.stored, &to);
        let moved = bounded(&self.handle, &self.shutdown, &address, call)?;
        if moved {
            metrics::counter!(m::INBOX_TOPIC_RESETS_TOTAL).increment(1);
            tracing::warn!(topic = %reset.tp.0, partition = reset.tp.1, from = reset.stored.next, to = to.next,
                "{reset}; reading the new log from its start (--on-topic-reset earliest)");
        }
        Ok(moved)
    }

    /// Kafka did not answer a placement's question: the partitions stay
    /// unread and are tried again in a while.
    fn kafka_unanswered(&mut self, what: &str) {
        tracing::warn!("{what}; trying again");
        self.live.set_last_error(&format!("Kafka: {what}"));
        self.place_after = Instant::now() + KAFKA_RETRY;
    }

    /// Partitions whose log went back, or whose topic's id changed, are
    /// placed again: the batch in hand is stored first (its records were
    /// taken in order from the log read so far, which may be gone from
    /// Kafka), then their start is read and checked again.
    pub(super) fn place_again(&mut self) -> Result<(), InboxError> {
        if self.replace.is_empty() {
            return Ok(());
        }
        self.flush()?;
        let partitions = std::mem::take(&mut self.replace);
        self.context().lock().positions.unplace(&partitions);
        if let Err(e) = self.consumer.pause(&partition_list(&partitions)) {
            tracing::warn!(error = %e, "cannot pause the partitions; what arrives for them before they are placed is dropped");
        }
        Ok(())
    }

    /// Every `topic_check_interval`: the ids of the topics held against
    /// those their partitions were placed with. librdkafka notices a topic
    /// made again only when its new log ends below the position; one grown
    /// past it would be read on from there, its first records passed over.
    pub(super) fn check_topic_ids(&mut self) {
        let placed = self.context().lock().positions.topic_ids();
        if placed.is_empty() {
            return;
        }
        let topics: BTreeSet<&str> = placed.keys().map(|(t, _)| t.as_str()).collect();
        let topics: Vec<&str> = topics.into_iter().collect();
        let now = match self.consumer.topic_ids(&topics, TOPIC_CHECK_TIMEOUT) {
            Ok(now) => now,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the topic ids; checking again later");
                return;
            }
        };
        let mut changed: Vec<(&TopicPartition, &String, &String)> = placed
            .iter()
            .filter_map(|(tp, was)| match now.get(&tp.0) {
                Some(Ok(Some(id))) if id != was => Some((tp, was, id)),
                _ => None,
            })
            .collect();
        changed.sort();
        for (tp, was, id) in changed {
            if !self.replace.contains(tp) {
                tracing::warn!(topic = %tp.0, partition = tp.1, was = %was, now = %id,
                    "the topic's id changed: it was deleted and created again; checking the partition again");
                self.replace.push(tp.clone());
            }
        }
    }

    /// The stored next offsets of these partitions (reconnected first
    /// when the connection failed).
    fn stored_offsets(
        &mut self,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, StoredOffset>, StoreError> {
        let (handle, shutdown) = (&self.handle, &*self.shutdown);
        let address = self.config.pg.address();
        if self.reconnect {
            bounded(handle, shutdown, &address, self.store.reconnect())?;
            self.reconnect = false;
        }
        bounded(handle, shutdown, &address, self.store.offsets(partitions))
    }
}
