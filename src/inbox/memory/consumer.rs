//! The in-memory Kafka consumer: reads the in-memory broker's logs as a
//! member of a group whose rebalances the test runs through a
//! [`MemberHandle`], inside the loop's `poll`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::{Offset, TopicPartitionList};

use super::super::context::{Assignment, InboxContext, Rebalance, partition_list};
use super::super::incoming::Incoming;
use super::super::seams::InboxConsumer;
use super::super::store::TopicPartition;
use crate::live::LiveState;
use crate::publish::memory::MemoryBroker;
use crate::record::KafkaRecord;

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
