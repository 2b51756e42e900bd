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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;

use super::position::{ORIGIN_HEADER, POSITION_HEADER};
use super::publisher::CLEANUP_HEADER;
use super::scan::{LedgerScan, Scan, TailRecord};
use super::sink::{
    BrokerError, BrokerErrorClass, Delivery, LocalBoxFuture, SendId, SendRefused, Sink, TopicError,
};
use crate::record::KafkaRecord;

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

    /// `topic` has `n` partitions.
    pub fn set_partitions(&self, topic: &str, n: i32) {
        self.state
            .lock()
            .unwrap()
            .partitions
            .insert(topic.to_owned(), n);
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

    /// The records held are lost with the producer that sent them (its
    /// relay died): never acknowledged, never in the log.
    pub fn discard_held(&self) {
        self.state.lock().unwrap().held.clear();
    }

    /// Records handed to the broker and not yet acknowledged.
    pub fn held(&self) -> usize {
        self.state.lock().unwrap().held.len()
    }

    /// Every send so far (retries included).
    pub fn sent(&self) -> usize {
        self.state.lock().unwrap().sent
    }
}

pub struct MemorySink {
    broker: MemoryBroker,
    index: usize,
    deliveries: mpsc::UnboundedReceiver<Delivery>,
    transactional: bool,
    /// Each transactional id this sink took over: its epoch and open
    /// transaction.
    producers: HashMap<String, Producer>,
    /// The id records go through now.
    current: Option<String>,
}

struct Producer {
    epoch: u32,
    txn: Option<u64>,
}

impl MemorySink {
    fn holder(&self) -> Option<(String, u32)> {
        let id = self.current.as_ref()?;
        Some((id.clone(), self.producers.get(id)?.epoch))
    }

    fn txn(&self) -> Option<u64> {
        self.current
            .as_ref()
            .and_then(|id| self.producers.get(id))
            .and_then(|p| p.txn)
    }

    /// Whether another sink took this one's transactional id over.
    fn fenced(&self, state: &BrokerState) -> bool {
        self.holder()
            .as_ref()
            .is_some_and(|(id, epoch)| state.epochs.get(id) != Some(epoch))
    }
}

fn fenced_error() -> BrokerError {
    BrokerError {
        class: BrokerErrorClass::Fenced,
        message: "Broker: Producer fenced by a newer instance".into(),
    }
}

fn purged_error() -> BrokerError {
    BrokerError {
        class: BrokerErrorClass::Abortable,
        message: "Local: Purged in queue".into(),
    }
}

impl Sink for MemorySink {
    fn transactional(&self) -> bool {
        self.transactional
    }

    fn send(
        &mut self,
        record: &KafkaRecord,
        partition: Option<i32>,
        send: SendId,
    ) -> Result<(), SendRefused> {
        let txn = self.txn();
        let release = {
            let mut state = self.broker.state.lock().unwrap();
            if self.transactional && (txn.is_none() || self.fenced(&state)) {
                return Err(SendRefused::Rejected(fenced_error()));
            }
            let partition = partition.unwrap_or(0);
            if let Some(txn) = txn {
                state
                    .touched
                    .entry(txn)
                    .or_default()
                    .insert((record.topic.clone(), partition));
            }
            state.sent += 1;
            let held = Held {
                record: record.clone(),
                partition,
                send,
                sink: self.index,
                txn,
                holder: self.holder(),
            };
            let release = !state.paused && state.writable(&held);
            state.held.push_back(held);
            release
        };
        if release {
            let last = self.broker.held() - 1;
            self.broker.release(last);
        }
        Ok(())
    }

    fn poll_delivery(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.deliveries.poll_recv(cx)
    }

    fn prepare_topic(&self, topic: &str, _create: bool) -> LocalBoxFuture<Result<i32, TopicError>> {
        let state = self.broker.state.lock().unwrap();
        let missing = state.missing_topics.iter().any(|t| t == topic);
        let partitions = state.partitions.get(topic).copied().unwrap_or(1);
        let topic = topic.to_owned();
        Box::pin(async move {
            if missing {
                Err(TopicError::Missing(topic))
            } else {
                Ok(partitions)
            }
        })
    }

    fn scan_tail(
        &self,
        topic: &str,
        partition: i32,
        mut scan: LedgerScan,
    ) -> LocalBoxFuture<Result<LedgerScan, BrokerError>> {
        let state = self.broker.state.lock().unwrap();
        if state.offline.contains(&(topic.to_owned(), partition)) {
            // As Kafka: no leader to fetch from.
            return Box::pin(async {
                Err(BrokerError {
                    class: BrokerErrorClass::Transient,
                    message: "Local: Unknown partition (no leader)".into(),
                })
            });
        }
        let hidden = state.left_open.contains_key(&(topic.to_owned(), partition));
        // What the open transaction hides, as a read_uncommitted reader
        // sees it (cleanup records left out).
        let hidden_records: Vec<TailRecord> = state
            .open_from
            .get(&(topic.to_owned(), partition))
            .and_then(|from| {
                let log = state.logs.get(&(topic.to_owned(), partition))?;
                Some(
                    log.iter()
                        .enumerate()
                        .skip(*from)
                        .filter(|(_, l)| l.record.header(CLEANUP_HEADER).is_none())
                        .map(|(offset, l)| tail_record(offset, &l.record))
                        .collect(),
                )
            })
            .unwrap_or_default();
        let log: Vec<(usize, KafkaRecord)> = state
            .logs
            .get(&(topic.to_owned(), partition))
            .map(|log| {
                log.iter()
                    .enumerate()
                    .filter(|(_, l)| state.visible(l))
                    .map(|(offset, l)| (offset, l.record.clone()))
                    .collect()
            })
            .unwrap_or_default();
        drop(state);
        Box::pin(async move {
            if hidden {
                scan.hidden_by_open_transaction();
                scan.hidden_records(&hidden_records);
            }
            for (offset, record) in log.iter().rev() {
                if scan.push(&tail_record(*offset, record)) == Scan::Enough {
                    break;
                }
            }
            Ok(scan)
        })
    }

    fn leaderless(
        &self,
        partitions: Vec<(String, i32)>,
    ) -> LocalBoxFuture<Result<Vec<(String, i32)>, BrokerError>> {
        let state = self.broker.state.lock().unwrap();
        let leaderless = partitions
            .into_iter()
            .filter(|p| state.offline.contains(p))
            .collect();
        Box::pin(async move { Ok(leaderless) })
    }

    fn init(&mut self, transactional_id: &str) -> LocalBoxFuture<Result<(), BrokerError>> {
        // The takeover waits while the id's last transaction cannot end.
        let broker = self.broker.clone();
        let id = transactional_id.to_owned();
        let epoch = {
            let mut state = broker.state.lock().unwrap();
            let epoch = state.epochs.get(&id).map_or(0, |e| e + 1);
            // The previous holder is fenced: its open transaction never
            // commits (its records stay invisible) and what it still sends
            // is refused.
            state.epochs.insert(id.clone(), epoch);
            epoch
        };
        self.producers
            .insert(id.clone(), Producer { epoch, txn: None });
        self.current = Some(id.clone());
        Box::pin(async move {
            while broker.is_blocked(&id) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(())
        })
    }

    fn switch_to(&mut self, transactional_id: &str) {
        if self.producers.contains_key(transactional_id) {
            self.current = Some(transactional_id.to_owned());
        }
    }

    fn abandon(&mut self, transactional_id: &str) {
        let Some(producer) = self.producers.remove(transactional_id) else {
            return;
        };
        // What it held is purged, reported as such, and never committed.
        let mut state = self.broker.state.lock().unwrap();
        let (purged, kept): (VecDeque<Held>, VecDeque<Held>) = std::mem::take(&mut state.held)
            .into_iter()
            .partition(|h| h.sink == self.index && h.txn.is_some() && h.txn == producer.txn);
        state.held = kept;
        for held in purged {
            let _ = state.deliveries[held.sink].send(Delivery {
                send: held.send,
                result: Err(purged_error()),
            });
        }
        state.end(Some(transactional_id), producer.txn);
    }

    fn begin(&mut self) -> Result<(), BrokerError> {
        let mut state = self.broker.state.lock().unwrap();
        if self.fenced(&state) {
            return Err(fenced_error());
        }
        state.next_txn += 1;
        let txn = state.next_txn;
        if let Some(producer) = self
            .current
            .as_ref()
            .and_then(|id| self.producers.get_mut(id))
        {
            producer.txn = Some(txn);
        }
        Ok(())
    }

    fn commit(&mut self) -> LocalBoxFuture<Result<(), BrokerError>> {
        let broker = self.broker.clone();
        let holder = self.holder();
        let txn = self.take_txn();
        Box::pin(async move {
            loop {
                {
                    let mut state = broker.state.lock().unwrap();
                    let fenced = holder
                        .as_ref()
                        .is_some_and(|(id, epoch)| state.epochs.get(id) != Some(epoch));
                    if fenced {
                        return Err(fenced_error());
                    }
                    // A commit flushes: it waits for its records.
                    if !state.held.iter().any(|h| h.txn == txn) {
                        if let Some(txn) = txn {
                            state.committed.insert(txn);
                        }
                        let id = holder.as_ref().map(|(id, _)| id.as_str());
                        state.end(id, txn);
                        return Ok(());
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    }

    fn abort(&mut self) -> LocalBoxFuture<Result<(), BrokerError>> {
        let holder = self.holder();
        let txn = self.take_txn();
        let mut state = self.broker.state.lock().unwrap();
        // Records not yet written are purged, and reported so.
        let (purged, kept): (VecDeque<Held>, VecDeque<Held>) = std::mem::take(&mut state.held)
            .into_iter()
            .partition(|h| txn.is_some() && h.txn == txn);
        state.held = kept;
        for held in purged {
            let _ = state.deliveries[held.sink].send(Delivery {
                send: held.send,
                result: Err(purged_error()),
            });
        }
        let id = holder.as_ref().map(|(id, _)| id.as_str());
        state.abort_ends_left_open(id, txn);
        state.end(id, txn);
        Box::pin(async { Ok(()) })
    }
}

impl MemorySink {
    /// Ends the current producer's transaction on the client's side.
    fn take_txn(&mut self) -> Option<u64> {
        self.current
            .as_ref()
            .and_then(|id| self.producers.get_mut(id))
            .and_then(|p| p.txn.take())
    }
}

/// What a tail scan reads of a logged record.
fn tail_record(offset: usize, record: &KafkaRecord) -> TailRecord {
    let header = |name: &str| {
        record
            .header(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    TailRecord {
        offset: offset as i64,
        origin: header(ORIGIN_HEADER),
        position: header(POSITION_HEADER),
    }
}
