//! An in-memory broker, for testing the publisher and both sources
//! in-process with tokio's paused time, and the inbox's consumer loop. It
//! keeps a log per partition as Kafka does, transactions included: records
//! of an open or aborted transaction are in the log but invisible to
//! readers (`read_committed`), and taking over a transactional id fences
//! the previous holder. The test decides when records are acknowledged,
//! which fail, and which are too large, and which partitions have no
//! leader: records sent to one wait, and a transaction that touched one
//! ends for its client but keeps its transactional id from beginning
//! another (or being taken over) until the partition is back, as Kafka's
//! coordinator does while it cannot write its markers.
//!
//! The logs as readers see them, and what a test writes there directly:
//! `memory/logs.rs`; the producer side (the `Sink`): `memory/sink.rs`.

mod logs;
mod sink;

pub use sink::MemorySink;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::sink::{BrokerError, BrokerErrorClass, Delivery, SendId};
use crate::record::KafkaRecord;
use sink::fenced_error;

/// A record in a partition's log.
#[derive(Clone, Debug)]
struct Logged {
    record: KafkaRecord,
    /// The transaction it was written in, if any.
    txn: Option<u64>,
}

/// A record sent and not yet acknowledged.
struct Held {
    record: KafkaRecord,
    partition: i32,
    send: SendId,
    sink: usize,
    txn: Option<u64>,
    /// The transactional id and epoch that sent it.
    holder: Option<(String, u32)>,
}

#[derive(Default)]
struct BrokerState {
    logs: HashMap<(String, i32), Vec<Logged>>,
    /// Partition counts of topics that have more than one.
    partitions: HashMap<String, i32>,
    held: VecDeque<Held>,
    paused: bool,
    /// The next deliveries fail with these errors.
    fail_next: VecDeque<BrokerError>,
    /// Records larger than this are refused as too large.
    max_record_bytes: Option<usize>,
    /// Topics writes to which are refused as not authorized.
    unauthorized: HashSet<String>,
    /// Every send, in order.
    sent: usize,
    /// The transactional ids whose producer was told to send what it
    /// lingers on, in order.
    sent_lingering: Vec<String>,
    /// Topics that do not exist and may not be created.
    missing_topics: Vec<String>,
    committed: HashSet<u64>,
    next_txn: u64,
    /// Transactional id -> the epoch of its current holder.
    epochs: HashMap<String, u32>,
    /// Each sink's delivery channel.
    deliveries: Vec<mpsc::UnboundedSender<Delivery>>,
    /// Partitions with no leader.
    offline: HashSet<(String, i32)>,
    /// Partitions each transaction touched.
    touched: HashMap<u64, HashSet<(String, i32)>>,
    /// Transactional ids whose last transaction ended while it touched
    /// partitions with no leader: they wait for those.
    blocked: HashMap<String, HashSet<(String, i32)>>,
    /// Partitions where a transaction of these ids was left open (its
    /// marker never written while the partition had no leader): it hides
    /// the partition's tail until the id's next abort there ends it.
    left_open: HashMap<(String, i32), HashSet<String>>,
    /// Where in the partition's log the first transaction left open begins
    /// (a `read_committed` reader's last stable offset).
    open_from: HashMap<(String, i32), usize>,
    /// Commits wait while this is set.
    commits_held: bool,
    /// Commits that go through while commits are held.
    commit_passes: usize,
    /// Commits under way (begun, not yet answered).
    commits_waiting: usize,
    /// The next commits fail with these errors (nothing of them committed).
    commit_failures: VecDeque<BrokerError>,
    /// Transactional id -> its transaction whose commit failed transiently:
    /// committing again commits it (as a producer's retried commit does).
    retry_commit: HashMap<String, u64>,
    /// How many times each topic was deleted and created again: its id
    /// changes each time.
    generations: HashMap<String, u32>,
}

impl BrokerState {
    fn visible(&self, logged: &Logged) -> bool {
        logged.txn.is_none_or(|t| self.committed.contains(&t))
    }

    /// Whether a held record can be written now.
    fn writable(&self, held: &Held) -> bool {
        let blocked = held
            .holder
            .as_ref()
            .is_some_and(|(id, _)| self.blocked.contains_key(id));
        !blocked
            && !self
                .offline
                .contains(&(held.record.topic.clone(), held.partition))
    }

    /// A transaction ends: its id waits while a partition it touched has
    /// no leader.
    fn end(&mut self, id: Option<&str>, txn: Option<u64>) {
        let (Some(id), Some(txn)) = (id, txn) else {
            return;
        };
        let touched = self.touched.remove(&txn).unwrap_or_default();
        let waiting: HashSet<(String, i32)> =
            touched.intersection(&self.offline).cloned().collect();
        for partition in &waiting {
            self.left_open
                .entry(partition.clone())
                .or_default()
                .insert(id.to_owned());
            let first = self
                .logs
                .get(partition)
                .and_then(|log| log.iter().position(|l| l.txn == Some(txn)));
            if let Some(first) = first {
                let from = self.open_from.entry(partition.clone()).or_insert(first);
                *from = (*from).min(first);
            }
        }
        if !waiting.is_empty() {
            self.blocked.insert(id.to_owned(), waiting);
        }
    }

    /// An abort by `id` ends what it left open in the partitions it touched.
    fn abort_ends_left_open(&mut self, id: Option<&str>, txn: Option<u64>) {
        let (Some(id), Some(txn)) = (id, txn) else {
            return;
        };
        let Some(touched) = self.touched.get(&txn) else {
            return;
        };
        for partition in touched.iter().filter(|p| !self.offline.contains(*p)) {
            if let Some(ids) = self.left_open.get_mut(partition) {
                ids.remove(id);
            }
        }
        self.left_open.retain(|_, ids| !ids.is_empty());
        let left_open = &self.left_open;
        self.open_from.retain(|p, _| left_open.contains_key(p));
    }
}

/// The test's handle on the in-memory broker.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    state: Arc<Mutex<BrokerState>>,
}

impl MemoryBroker {
    /// A sink without transactions.
    pub fn sink(&self) -> MemorySink {
        self.make_sink(false)
    }

    /// A sink that writes in transactions.
    pub fn transactional_sink(&self) -> MemorySink {
        self.make_sink(true)
    }

    fn make_sink(&self, transactional: bool) -> MemorySink {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = self.state.lock().unwrap();
        state.deliveries.push(tx);
        MemorySink {
            broker: self.clone(),
            index: state.deliveries.len() - 1,
            deliveries: rx,
            transactional,
            producers: HashMap::new(),
            current: None,
        }
    }

    /// Holds every delivery until `resume` or `release`.
    pub fn pause(&self) {
        self.state.lock().unwrap().paused = true;
    }

    /// Acknowledges everything held that can be written, in order, and
    /// what comes after.
    pub fn resume(&self) {
        self.state.lock().unwrap().paused = false;
        self.release_writable();
    }

    /// Acknowledges every held record that can be written now, in order.
    fn release_writable(&self) {
        loop {
            let next = {
                let state = self.state.lock().unwrap();
                if state.paused {
                    return;
                }
                state.held.iter().position(|h| state.writable(h))
            };
            match next {
                Some(index) => self.release(index),
                None => return,
            }
        }
    }

    /// Acknowledges (or fails) the oldest record held for `partition` of
    /// `topic`, if it can be written now: partitions answer in any order,
    /// each in its own.
    pub fn release_partition(&self, topic: &str, partition: i32) {
        let next = {
            let state = self.state.lock().unwrap();
            state
                .held
                .iter()
                .position(|h| h.record.topic == topic && h.partition == partition)
                .filter(|&i| state.writable(&state.held[i]))
        };
        if let Some(index) = next {
            self.release(index);
        }
    }

    /// `partition` of `topic` loses its leader: records sent to it wait.
    pub fn take_offline(&self, topic: &str, partition: i32) {
        self.state
            .lock()
            .unwrap()
            .offline
            .insert((topic.to_owned(), partition));
    }

    /// `partition` of `topic` has a leader again: transactions waiting for
    /// it end, and its records are written.
    pub fn bring_online(&self, topic: &str, partition: i32) {
        {
            let mut state = self.state.lock().unwrap();
            let key = (topic.to_owned(), partition);
            state.offline.remove(&key);
            state.blocked.retain(|_, waiting| {
                waiting.remove(&key);
                !waiting.is_empty()
            });
        }
        self.release_writable();
    }

    /// Whether `transactional_id` waits for a partition with no leader.
    pub fn is_blocked(&self, transactional_id: &str) -> bool {
        self.state
            .lock()
            .unwrap()
            .blocked
            .contains_key(transactional_id)
    }

    /// The transactional ids taken over so far.
    pub fn transactional_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.state.lock().unwrap().epochs.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Acknowledges (or fails) the `index`-th held record.
    pub fn release(&self, index: usize) {
        let mut state = self.state.lock().unwrap();
        let held = state.held.remove(index).expect("a held record");
        let fenced = held
            .holder
            .as_ref()
            .is_some_and(|(id, epoch)| state.epochs.get(id) != Some(epoch));
        let next_failure = if fenced {
            Some(fenced_error())
        } else {
            state.fail_next.pop_front()
        };
        let result = match next_failure {
            Some(error) => Err(error),
            None if state.unauthorized.contains(&held.record.topic) => Err(BrokerError {
                class: BrokerErrorClass::NotAuthorized,
                message: "Broker: Topic authorization failed".into(),
            }),
            None => match state.max_record_bytes {
                Some(max) if held.record.size() > max => Err(BrokerError {
                    class: BrokerErrorClass::TooLarge,
                    message: "Broker: Message size too large".into(),
                }),
                _ => {
                    state
                        .logs
                        .entry((held.record.topic.clone(), held.partition))
                        .or_default()
                        .push(Logged {
                            record: held.record,
                            txn: held.txn,
                        });
                    Ok(())
                }
            },
        };
        let _ = state.deliveries[held.sink].send(Delivery {
            send: held.send,
            result,
        });
    }

    /// Commits wait (their records written, invisible) until
    /// `release_commits`.
    pub fn hold_commits(&self) {
        self.state.lock().unwrap().commits_held = true;
    }

    pub fn release_commits(&self) {
        self.state.lock().unwrap().commits_held = false;
    }

    /// While commits are held, one goes through (the first to be ready).
    pub fn let_one_commit_through(&self) {
        self.state.lock().unwrap().commit_passes += 1;
    }

    /// Commits begun and not yet answered.
    pub fn commits_waiting(&self) -> usize {
        self.state.lock().unwrap().commits_waiting
    }

    /// The next commit fails with `error`: nothing of its transaction
    /// becomes visible.
    pub fn fail_next_commit(&self, error: BrokerError) {
        self.state.lock().unwrap().commit_failures.push_back(error);
    }

    pub fn fail_next(&self, error: BrokerError) {
        self.state.lock().unwrap().fail_next.push_back(error);
    }

    /// `topic` does not exist and may not be created.
    pub fn without_topic(&self, topic: &str) {
        self.state
            .lock()
            .unwrap()
            .missing_topics
            .push(topic.to_owned());
    }

    pub fn refuse_records_over(&self, bytes: usize) {
        self.state.lock().unwrap().max_record_bytes = Some(bytes);
    }

    /// Writes to `topic` are refused as not authorized (or allowed again).
    pub fn authorize(&self, topic: &str, allowed: bool) {
        let mut state = self.state.lock().unwrap();
        if allowed {
            state.unauthorized.remove(topic);
        } else {
            state.unauthorized.insert(topic.to_owned());
        }
    }

    /// `topic` has `n` partitions.
    pub fn set_partitions(&self, topic: &str, n: i32) {
        self.state
            .lock()
            .unwrap()
            .partitions
            .insert(topic.to_owned(), n);
    }

    /// The records held are lost with the producer that sent them (its
    /// relay died): never acknowledged, never in the log.
    pub fn discard_held(&self) {
        self.state.lock().unwrap().held.clear();
    }

    /// Records handed to the broker and not yet acknowledged.
    pub fn held(&self) -> usize {
        self.state.lock().unwrap().held.len()
    }

    /// The transactional ids whose producer was told to send what it
    /// lingers on, once per call.
    pub fn sent_lingering(&self) -> Vec<String> {
        self.state.lock().unwrap().sent_lingering.clone()
    }

    /// Every send so far (retries included).
    pub fn sent(&self) -> usize {
        self.state.lock().unwrap().sent
    }
}
