//! In-memory stand-ins for the inbox's Kafka consumer and PostgreSQL
//! store, for testing the consumer loop in-process (`tests.rs`).
//!
//! [`MemoryConsumer`] reads the in-memory broker's per-partition logs
//! (`publish::memory`, `read_committed`) and honours assignment, seek,
//! pause and resume. The test changes its assignment through a
//! [`MemberHandle`]; the change happens inside the loop's next `poll`,
//! through the same [`InboxContext::rebalanced`] that librdkafka's
//! callback calls (cooperative: only the partitions named move). It does
//! not model prefetching: a paused partition delivers nothing. As
//! librdkafka with `auto.offset.reset=earliest`, a partition read past
//! its log's end (its topic made again) starts again from the log's
//! start; it reports the broker's topic ids and watermarks.
//!
//! [`MemoryStore`] keeps the inbox's rows by id and each partition's next
//! offset and topic id, a batch all or nothing, and can lose its
//! connection, refuse for good, or hang.

use std::cell::Cell;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::{Offset, TopicPartitionList};

use super::context::{Assignment, InboxContext, Rebalance, partition_list};
use super::incoming::{DeadLetterKind, Incoming};
use super::seams::{InboxConsumer, InboxStore};
use super::store::{StoreError, StoredOffset, TopicPartition, Written};
use crate::live::LiveState;
use crate::publish::memory::MemoryBroker;
use crate::record::KafkaRecord;
use crate::sql::{SqlCause, SqlError};

/// One member of the group, as the test sees it and the consumer uses it.
#[derive(Default)]
struct Member {
    /// Rebalances the test asked for, run inside the next `poll`.
    rebalances: VecDeque<(Rebalance, Vec<TopicPartition>)>,
    /// Assigned partitions and the offset each reads next.
    assigned: BTreeMap<TopicPartition, i64>,
    paused: BTreeSet<TopicPartition>,
    /// Every seek done, in order.
    seeks: Vec<(TopicPartition, Offset)>,
    /// Topic ids and watermarks are not answered (the broker is away).
    unanswered: bool,
    /// Times the topic ids were asked for.
    topic_id_requests: usize,
}

/// The loop's Kafka consumer, on the in-memory broker.
pub struct MemoryConsumer {
    broker: MemoryBroker,
    context: Arc<InboxContext>,
    member: Arc<Mutex<Member>>,
}

/// The test's handle on a [`MemoryConsumer`] running in a loop.
#[derive(Clone)]
pub struct MemberHandle {
    context: Arc<InboxContext>,
    member: Arc<Mutex<Member>>,
}

impl MemoryConsumer {
    pub fn new(broker: &MemoryBroker, live: Arc<LiveState>) -> (Self, MemberHandle) {
        let context = Arc::new(InboxContext::new(live, "walrelay-test".into()));
        let member = Arc::new(Mutex::new(Member::default()));
        let handle = MemberHandle {
            context: Arc::clone(&context),
            member: Arc::clone(&member),
        };
        let consumer = MemoryConsumer {
            broker: broker.clone(),
            context,
            member,
        };
        (consumer, handle)
    }

    fn member(&self) -> MutexGuard<'_, Member> {
        self.member.lock().unwrap()
    }

    /// The next record of an assigned, unpaused partition, moving past it.
    fn next_record(&self) -> Option<Incoming> {
        let mut member = self.member();
        let Member {
            assigned, paused, ..
        } = &mut *member;
        for ((topic, partition), next) in assigned.iter_mut() {
            if paused.contains(&(topic.clone(), *partition)) {
                continue;
            }
            // Past the log's end: auto.offset.reset=earliest.
            if *next > self.broker.log_end(topic, *partition) {
                *next = 0;
            }
            if let Some((offset, record)) = self.broker.read(topic, *partition, *next) {
                *next = offset + 1;
                return Some(incoming(*partition, offset, record));
            }
        }
        None
    }
}

fn incoming(partition: i32, offset: i64, record: KafkaRecord) -> Incoming {
    Incoming {
        topic: record.topic,
        partition,
        offset,
        key: record.key.map(|k| k.to_vec()),
        headers: record
            .headers
            .into_iter()
            .map(|(k, v)| (k.into_owned(), Some(v.to_vec())))
            .collect(),
        payload: record.value.map(|v| v.to_vec()),
        timestamp_ms: None,
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<(TopicPartition, Offset)> {
    tpl.elements()
        .iter()
        .map(|e| ((e.topic().to_owned(), e.partition()), e.offset()))
        .collect()
}

impl InboxConsumer for MemoryConsumer {
    fn poll(&self, wait: Duration) -> Option<KafkaResult<Incoming>> {
        let deadline = Instant::now() + wait;
        loop {
            // As librdkafka does, the rebalance callback runs inside poll.
            let rebalance = self.member().rebalances.pop_front();
            if let Some((event, partitions)) = rebalance {
                let tpl = partition_list(&partitions);
                self.context.rebalanced(self, event, true, &tpl);
                continue;
            }
            if let Some(record) = self.next_record() {
                return Some(Ok(record));
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(1)));
        }
    }

    /// Moves the assigned partitions; one not assigned is left out of the
    /// list returned (not sought).
    fn seek_partitions(
        &self,
        partitions: TopicPartitionList,
        _timeout: Duration,
    ) -> KafkaResult<TopicPartitionList> {
        let mut member = self.member();
        let mut sought = TopicPartitionList::new();
        for (tp, offset) in partitions_of(&partitions) {
            let to = match offset {
                Offset::Beginning => 0,
                Offset::Offset(n) => n,
                other => panic!("the inbox seeks to a stored offset or the start, not {other:?}"),
            };
            if let Some(next) = member.assigned.get_mut(&tp) {
                *next = to;
                member.seeks.push((tp.clone(), offset));
                sought.add_partition_offset(&tp.0, tp.1, offset)?;
            }
        }
        Ok(sought)
    }

    fn resume(&self, partitions: &TopicPartitionList) -> KafkaResult<()> {
        let mut member = self.member();
        for (tp, _) in partitions_of(partitions) {
            member.paused.remove(&tp);
        }
        Ok(())
    }

    fn unsubscribe(&self) {
        let all: Vec<TopicPartition> = self.member().assigned.keys().cloned().collect();
        if !all.is_empty() {
            let tpl = partition_list(&all);
            self.context.rebalanced(self, Rebalance::Revoke, true, &tpl);
        }
    }

    fn context(&self) -> &InboxContext {
        &self.context
    }

    fn topic_ids(
        &self,
        topics: &[&str],
        _timeout: Duration,
    ) -> KafkaResult<HashMap<String, KafkaResult<Option<String>>>> {
        let mut member = self.member();
        member.topic_id_requests += 1;
        if member.unanswered {
            return Err(KafkaError::AdminOp(
                rdkafka::error::RDKafkaErrorCode::OperationTimedOut,
            ));
        }
        Ok(topics
            .iter()
            .map(|t| ((*t).to_owned(), Ok(Some(self.broker.topic_id(t)))))
            .collect())
    }

    fn log_bounds(&self, tp: &TopicPartition, _timeout: Duration) -> KafkaResult<(i64, i64)> {
        if self.member().unanswered {
            return Err(KafkaError::MetadataFetch(
                rdkafka::error::RDKafkaErrorCode::OperationTimedOut,
            ));
        }
        Ok((0, self.broker.log_end(&tp.0, tp.1)))
    }
}

impl Assignment for MemoryConsumer {
    fn pause(&self, partitions: &TopicPartitionList) -> KafkaResult<()> {
        let mut member = self.member();
        for (tp, _) in partitions_of(partitions) {
            member.paused.insert(tp);
        }
        Ok(())
    }

    /// Without a committed offset in Kafka (the inbox commits none), a
    /// partition assigned starts at the log's start (`auto.offset.reset`).
    fn assign(&self, partitions: &TopicPartitionList, cooperative: bool) -> KafkaResult<()> {
        let mut member = self.member();
        if !cooperative {
            member.assigned.clear();
        }
        for (tp, _) in partitions_of(partitions) {
            member.assigned.insert(tp, 0);
        }
        Ok(())
    }

    fn unassign(&self, partitions: &TopicPartitionList, cooperative: bool) -> KafkaResult<()> {
        let mut member = self.member();
        if !cooperative {
            member.assigned.clear();
        }
        for (tp, _) in partitions_of(partitions) {
            member.assigned.remove(&tp);
            member.paused.remove(&tp);
        }
        Ok(())
    }
}

impl MemberHandle {
    /// The group gives this member `partitions` (at its next `poll`).
    pub fn assign(&self, partitions: &[TopicPartition]) {
        let mut member = self.member.lock().unwrap();
        member
            .rebalances
            .push_back((Rebalance::Assign, partitions.to_vec()));
    }

    /// The group takes `partitions` away (at the member's next `poll`).
    pub fn revoke(&self, partitions: &[TopicPartition]) {
        let mut member = self.member.lock().unwrap();
        member
            .rebalances
            .push_back((Rebalance::Revoke, partitions.to_vec()));
    }

    /// What the loop and the rebalance callbacks share.
    pub fn context(&self) -> &InboxContext {
        &self.context
    }

    /// Every seek so far, in order.
    pub fn seeks(&self) -> Vec<(TopicPartition, Offset)> {
        self.member.lock().unwrap().seeks.clone()
    }

    /// Topic ids and watermarks go unanswered (`true`), or are answered.
    pub fn set_unanswered(&self, unanswered: bool) {
        self.member.lock().unwrap().unanswered = unanswered;
    }

    /// Times the loop asked for topic ids.
    pub fn topic_id_requests(&self) -> usize {
        self.member.lock().unwrap().topic_id_requests
    }
}

/// What the test makes the store do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The connection is lost: every call fails (transiently) until the
    /// fault is cleared and the store reconnected.
    ConnectionLost,
    /// Every call is refused for good (the tables went away).
    Refused,
    /// Every call waits until the fault changes.
    Hang,
}

/// A call the loop made to the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Offsets,
    Write,
    Reset,
    Reconnect,
}

#[derive(Clone, Debug)]
pub struct Attempt {
    pub at: Instant,
    pub call: Call,
    pub ok: bool,
}

/// A row of the inbox table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub tp: TopicPartition,
    pub offset: i64,
    /// The store (the consumer) that wrote it.
    pub writer: &'static str,
}

/// The tables, shared by every store of a test.
#[derive(Default)]
pub struct Tables {
    /// The inbox table, by id (its primary key).
    pub rows: BTreeMap<String, Row>,
    /// The group's next offset per partition.
    pub next_offsets: BTreeMap<TopicPartition, i64>,
    /// The topic id stored beside each next offset (none: stored by an
    /// older walrelay).
    pub topic_ids: BTreeMap<TopicPartition, String>,
    /// Records skipped because their id was stored already.
    pub duplicates: u64,
    /// The size of each batch written, in order.
    pub batches: Vec<usize>,
    /// Every call, in order (a call that hangs once it returns).
    pub attempts: Vec<Attempt>,
    /// Calls held by a hang now.
    pub hanging: usize,
    fault: Option<Fault>,
}

impl Tables {
    pub fn failed_attempts(&self) -> Vec<Attempt> {
        self.attempts.iter().filter(|a| !a.ok).cloned().collect()
    }
}

struct Database {
    tables: Mutex<Tables>,
}

/// One consumer's connection to the in-memory tables.
pub struct MemoryStore {
    database: Arc<Database>,
    writer: &'static str,
    /// Lost with the connection, until `reconnect`.
    connected: Cell<bool>,
}

impl MemoryStore {
    pub fn new(writer: &'static str) -> Self {
        let database = Database {
            tables: Mutex::new(Tables::default()),
        };
        MemoryStore {
            database: Arc::new(database),
            writer,
            connected: Cell::new(true),
        }
    }

    /// Another consumer's connection to the same tables.
    pub fn another(&self, writer: &'static str) -> Self {
        MemoryStore {
            database: Arc::clone(&self.database),
            writer,
            connected: Cell::new(true),
        }
    }

    /// From now on every call does as `fault` says (`None`: as it should).
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.tables().fault = fault;
    }

    pub fn tables(&self) -> MutexGuard<'_, Tables> {
        self.database.tables.lock().unwrap()
    }

    /// Waits while the fault is `Hang`, as a server that answers nothing:
    /// the call's future stays pending (the thread is not blocked).
    async fn unless_hanging(&self) {
        if self.tables().fault != Some(Fault::Hang) {
            return;
        }
        self.tables().hanging += 1;
        // Uncounted when the call ends or is abandoned.
        let _hanging = Hanging(self);
        while self.tables().fault == Some(Fault::Hang) {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// The tables, the call recorded; or the
    /// error the fault (or a connection lost before) makes of it.
    fn call(&self, call: Call) -> Result<MutexGuard<'_, Tables>, StoreError> {
        let mut tables = self.database.tables.lock().unwrap();
        let error = match tables.fault {
            Some(Fault::Refused) => Some(StoreError::NotSetUp("the inbox table is gone".into())),
            Some(Fault::ConnectionLost) => {
                self.connected.set(false);
                Some(connection_lost())
            }
            _ if call == Call::Reconnect => {
                self.connected.set(true);
                None
            }
            _ if !self.connected.get() => Some(connection_lost()),
            _ => None,
        };
        tables.attempts.push(Attempt {
            at: Instant::now(),
            call,
            ok: error.is_none(),
        });
        match error {
            Some(e) => Err(e),
            None => Ok(tables),
        }
    }
}

fn connection_lost() -> StoreError {
    SqlError::new("memory", SqlCause::Closed).into()
}

/// The record's id header, as the real store reads it.
fn id(record: &Incoming) -> Option<String> {
    let header = |name: &str| {
        record
            .headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    };
    header("id")
        .or_else(|| header("ce_id"))
        .filter(|id| !id.is_empty())
        .map(|id| String::from_utf8_lossy(id).into_owned())
}

/// A call held by `Fault::Hang`, counted in `Tables::hanging`.
struct Hanging<'a>(&'a MemoryStore);

impl Drop for Hanging<'_> {
    fn drop(&mut self) {
        self.0.tables().hanging -= 1;
    }
}

impl InboxStore for MemoryStore {
    async fn offsets(
        &self,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, StoredOffset>, StoreError> {
        self.unless_hanging().await;
        let tables = self.call(Call::Offsets)?;
        Ok(partitions
            .iter()
            .filter_map(|tp| {
                let stored = StoredOffset {
                    next: *tables.next_offsets.get(tp)?,
                    topic_id: tables.topic_ids.get(tp).cloned(),
                };
                Some((tp.clone(), stored))
            })
            .collect())
    }

    async fn reset(
        &mut self,
        tp: &TopicPartition,
        from: &StoredOffset,
        to: &StoredOffset,
    ) -> Result<bool, StoreError> {
        self.unless_hanging().await;
        let mut tables = self.call(Call::Reset)?;
        if tables.next_offsets.get(tp) != Some(&from.next)
            || tables.topic_ids.get(tp) != from.topic_id.as_ref()
        {
            return Ok(false);
        }
        tables.next_offsets.insert(tp.clone(), to.next);
        match &to.topic_id {
            Some(id) => tables.topic_ids.insert(tp.clone(), id.clone()),
            None => tables.topic_ids.remove(tp),
        };
        Ok(true)
    }

    async fn write(
        &mut self,
        batch: &[Incoming],
        topic_ids: &HashMap<TopicPartition, String>,
    ) -> Result<Written, StoreError> {
        let writer = self.writer;
        self.unless_hanging().await;
        let mut tables = self.call(Call::Write)?;
        let mut written = Written::default();
        for record in batch {
            let tp = (record.topic.clone(), record.partition);
            let next = written.next_offsets.entry(tp.clone()).or_insert(0);
            *next = (*next).max(record.offset + 1);
            let Some(id) = id(record) else {
                written
                    .dead_letters
                    .push((DeadLetterKind::MissingId, "no id header".into()));
                continue;
            };
            match tables.rows.entry(id) {
                Entry::Occupied(_) => written.duplicates += 1,
                Entry::Vacant(row) => {
                    let offset = record.offset;
                    row.insert(Row { tp, offset, writer });
                    written.stored += 1;
                    written.stored_timestamps_ms.extend(record.timestamp_ms);
                }
            }
        }
        // GREATEST, as the real store: a late writer never moves an
        // offset back, nor one that read another topic of the same name.
        for (tp, next) in &written.next_offsets {
            let id = topic_ids.get(tp);
            if let (Some(stored), Some(id)) = (tables.topic_ids.get(tp), id)
                && stored != id
            {
                continue;
            }
            let stored = tables.next_offsets.entry(tp.clone()).or_insert(*next);
            *stored = (*stored).max(*next);
            if let Some(id) = id {
                tables.topic_ids.insert(tp.clone(), id.clone());
            }
        }
        tables.duplicates += written.duplicates;
        tables.batches.push(batch.len());
        Ok(written)
    }

    async fn reconnect(&mut self) -> Result<(), StoreError> {
        self.unless_hanging().await;
        self.call(Call::Reconnect).map(drop)
    }
}
