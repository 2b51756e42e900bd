//! The in-memory broker's logs as readers see them (read_committed, or
//! not), and what a test writes into them directly: another producer's
//! records, a transaction left open, a topic made again.

use super::{Logged, MemoryBroker};
use crate::record::KafkaRecord;

impl MemoryBroker {
    /// Whether a transaction left open hides `partition` of `topic`.
    /// The coordinator aborts what was left open in `partition` (its
    /// transaction timed out).
    pub fn time_out_left_open(&self, topic: &str, partition: i32) {
        let mut state = self.state.lock().unwrap();
        state.left_open.remove(&(topic.to_owned(), partition));
        state.open_from.remove(&(topic.to_owned(), partition));
    }

    /// Kafka's hanging transaction: `records` written to `partition` of
    /// `topic` by `transactional_id` in a transaction whose marker never
    /// reaches the partition (the coordinator holds it ended), until that
    /// id's next abort there.
    pub fn leave_open(
        &self,
        topic: &str,
        partition: i32,
        transactional_id: &str,
        records: Vec<KafkaRecord>,
    ) {
        let mut state = self.state.lock().unwrap();
        state.next_txn += 1;
        let txn = state.next_txn;
        let key = (topic.to_owned(), partition);
        let log = state.logs.entry(key.clone()).or_default();
        let first = log.len();
        log.extend(records.into_iter().map(|record| Logged {
            record,
            txn: Some(txn),
        }));
        state
            .left_open
            .entry(key.clone())
            .or_default()
            .insert(transactional_id.to_owned());
        let from = state.open_from.entry(key).or_insert(first);
        *from = (*from).min(first);
    }

    pub fn is_left_open(&self, topic: &str, partition: i32) -> bool {
        self.state
            .lock()
            .unwrap()
            .left_open
            .contains_key(&(topic.to_owned(), partition))
    }

    /// Records a `read_committed` reader sees in `topic`, partition after
    /// partition.
    pub fn log(&self, topic: &str) -> Vec<KafkaRecord> {
        let state = self.state.lock().unwrap();
        let mut keys: Vec<&(String, i32)> = state.logs.keys().filter(|(t, _)| t == topic).collect();
        keys.sort();
        keys.iter()
            .flat_map(|k| state.logs[*k].iter())
            .filter(|l| state.visible(l))
            .map(|l| l.record.clone())
            .collect()
    }

    /// Records in `topic`'s log, visible or not (a `read_uncommitted`
    /// reader's view).
    pub fn log_uncommitted(&self, topic: &str) -> Vec<KafkaRecord> {
        let state = self.state.lock().unwrap();
        state
            .logs
            .iter()
            .filter(|((t, _), _)| t == topic)
            .flat_map(|(_, log)| log.iter().map(|l| l.record.clone()))
            .collect()
    }

    /// Another producer writes `record` to `partition`.
    pub fn append(&self, partition: i32, record: KafkaRecord) {
        self.state
            .lock()
            .unwrap()
            .logs
            .entry((record.topic.clone(), partition))
            .or_default()
            .push(Logged { record, txn: None });
    }

    /// The first record of `partition` of `topic` at or after `offset`
    /// that a `read_committed` reader sees, with its offset (records of
    /// aborted or open transactions take offsets and are passed over; an
    /// open transaction does not hold the reader back as Kafka's last
    /// stable offset would).
    pub fn read(&self, topic: &str, partition: i32, offset: i64) -> Option<(i64, KafkaRecord)> {
        let state = self.state.lock().unwrap();
        let log = state.logs.get(&(topic.to_owned(), partition))?;
        log.iter()
            .enumerate()
            .skip(offset.max(0) as usize)
            .find(|(_, l)| state.visible(l))
            .map(|(at, l)| (at as i64, l.record.clone()))
    }

    /// The offset the next record of `partition` of `topic` will get (the
    /// high watermark).
    pub fn log_end(&self, topic: &str, partition: i32) -> i64 {
        let state = self.state.lock().unwrap();
        state
            .logs
            .get(&(topic.to_owned(), partition))
            .map_or(0, |log| log.len() as i64)
    }

    /// `topic`'s id (KIP-516): a new one each time the topic is made again.
    pub fn topic_id(&self, topic: &str) -> String {
        let state = self.state.lock().unwrap();
        let generation = state.generations.get(topic).copied().unwrap_or(0);
        format!("{topic}-id-{generation}")
    }

    /// `topic` is deleted and created again (a new id, empty logs), and
    /// `records` are written to it, all at once.
    pub fn recreate_topic(&self, topic: &str, records: Vec<(i32, KafkaRecord)>) {
        let mut state = self.state.lock().unwrap();
        state.logs.retain(|(t, _), _| t != topic);
        *state.generations.entry(topic.to_owned()).or_default() += 1;
        for (partition, record) in records {
            state
                .logs
                .entry((record.topic.clone(), partition))
                .or_default()
                .push(Logged { record, txn: None });
        }
    }
}
