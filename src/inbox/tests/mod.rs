//! The consumer loop's rules, in-process: the loop on a thread of its own
//! (as `walrelay inbox` runs it), reading the in-memory broker through
//! [`MemoryConsumer`] and storing into [`MemoryStore`]. The loop keeps
//! real (std) time; the tests use short batch waits and backoffs, wait for
//! conditions rather than for fixed times, and check waits only from
//! below (a backoff is never shorter than it should be). The integration
//! tests (`tests/inbox.rs`) check the same rules against real servers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::Offset;

use super::InboxConfig;
use super::consumer::{Inbox, InboxError};
use super::memory::{Call, Fault, MemberHandle, MemoryConsumer, MemoryStore};
use super::positions::Placement;
use super::reset::OnTopicReset;
use super::schema::InboxTables;
use super::store::{StoreError, TopicPartition};
use crate::live::LiveState;
use crate::postgres::ConnectionConfig;
use crate::publish::memory::MemoryBroker;
use crate::record::KafkaRecord;

const TOPIC: &str = "orders";
/// Long enough never to end a batch: it is stored when full, or at exit.
const FOREVER: Duration = Duration::from_secs(3600);
/// The loop's first backoff after PostgreSQL failed (`FIRST_BACKOFF`).
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

fn tp(partition: i32) -> TopicPartition {
    (TOPIC.to_owned(), partition)
}

fn config(batch_size: usize, batch_wait: Duration, max_backoff: Duration) -> InboxConfig {
    InboxConfig {
        pg: ConnectionConfig::from_url("postgres://u@localhost/db").unwrap(),
        brokers: "memory".into(),
        overrides: vec![],
        topics: vec![TOPIC.into()],
        tables: InboxTables::new("public", "inbox"),
        group: "walrelay-test".into(),
        batch_size,
        batch_wait,
        max_backoff,
        on_topic_reset: OnTopicReset::Fail,
        topic_check_interval: FOREVER,
    }
}

/// An event with this id.
fn record(id: &str) -> KafkaRecord {
    KafkaRecord {
        topic: TOPIC.into(),
        key: Some(Bytes::from(format!("key-{id}"))),
        value: Some(Bytes::from(format!("{{\"id\":\"{id}\"}}"))),
        headers: vec![("id".into(), Bytes::from(id.to_owned()))],
    }
}

/// A producer writes an event with this id to `partition`; returns its
/// offset.
fn produce(broker: &MemoryBroker, partition: i32, id: &str) -> i64 {
    broker.append(partition, record(id));
    log_len(broker, partition) - 1
}

fn log_len(broker: &MemoryBroker, partition: i32) -> i64 {
    let mut n = 0;
    while broker.read(TOPIC, partition, n).is_some() {
        n += 1;
    }
    n
}

/// Events `event-{partition}-{n}` for n in `range`, in each of
/// `partitions`; returns each id's partition and offset.
fn produce_numbered(
    broker: &MemoryBroker,
    partitions: &[i32],
    range: std::ops::Range<usize>,
) -> BTreeMap<String, (TopicPartition, i64)> {
    let mut produced = BTreeMap::new();
    for n in range {
        for p in partitions {
            let id = format!("event-{p}-{n}");
            let offset = produce(broker, *p, &id);
            produced.insert(id, (tp(*p), offset));
        }
    }
    produced
}

/// An inbox loop on its own thread, as `walrelay inbox` runs it.
struct Running {
    member: MemberHandle,
    shutdown: Arc<AtomicBool>,
    thread: JoinHandle<Result<(), InboxError>>,
    /// The loop blocks on it for each store call.
    _runtime: Arc<tokio::runtime::Runtime>,
}

fn start(broker: &MemoryBroker, store: MemoryStore, config: InboxConfig) -> Running {
    // The loop blocks on the runtime from its own thread; a worker drives
    // the runtime's timers meanwhile, as `walrelay inbox`'s main thread does.
    let runtime = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap(),
    );
    let live = Arc::new(LiveState::new());
    let (consumer, member) = MemoryConsumer::new(broker, Arc::clone(&live));
    let shutdown = Arc::new(AtomicBool::new(false));
    let inbox = Inbox::new(
        consumer,
        store,
        runtime.handle().clone(),
        live,
        config,
        Arc::clone(&shutdown),
    );
    let thread = std::thread::spawn(move || inbox.run());
    Running {
        member,
        shutdown,
        thread,
        _runtime: runtime,
    }
}

impl Running {
    fn stop(self) -> Result<(), InboxError> {
        self.shutdown.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }

    fn batch_len(&self) -> usize {
        self.member.context().lock().batch.len()
    }

    /// Each of these partitions is held and placed, and no other.
    fn placed(&self, partitions: &[TopicPartition]) -> bool {
        let shared = self.member.context().lock();
        let placed: BTreeSet<&TopicPartition> = shared
            .positions
            .iter()
            .filter(|(_, p)| p.placement == Placement::Placed)
            .map(|(tp, _)| tp)
            .collect();
        shared.positions.iter().count() == partitions.len()
            && partitions.iter().all(|tp| placed.contains(tp))
    }
}

/// One member, placed on partition 0, storing batches of `batch`.
fn one_member_on_partition_0(batch: usize) -> (MemoryBroker, MemoryStore, Running) {
    let broker = MemoryBroker::default();
    let store = MemoryStore::new("a");
    let inbox = start(
        &broker,
        store.another("a"),
        config(batch, FOREVER, FIRST_BACKOFF),
    );
    inbox.member.assign(&[tp(0)]);
    wait_until("partition 0 is placed", || inbox.placed(&[tp(0)]));
    (broker, store, inbox)
}

/// Two members of one group sharing one store: `a` stores batches of
/// `a_batch`, `b` of 2.
fn two_members(a_batch: usize) -> (MemoryBroker, MemoryStore, Running, Running) {
    let broker = MemoryBroker::default();
    let store = MemoryStore::new("a");
    let a_config = config(a_batch, FOREVER, FIRST_BACKOFF);
    let a = start(&broker, store.another("a"), a_config);
    let b = start(
        &broker,
        store.another("b"),
        config(2, FOREVER, FIRST_BACKOFF),
    );
    (broker, store, a, b)
}

/// Waits (in real time, at most 10 s) until `done`.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn next_offsets(store: &MemoryStore) -> BTreeMap<TopicPartition, i64> {
    store.tables().next_offsets.clone()
}

fn offsets(pairs: &[(i32, i64)]) -> BTreeMap<TopicPartition, i64> {
    pairs.iter().map(|(p, n)| (tp(*p), *n)).collect()
}

/// Every event produced is in the inbox once, at the partition and offset
/// it was produced at; nothing else is.
fn assert_stored_once(store: &MemoryStore, produced: &BTreeMap<String, (TopicPartition, i64)>) {
    let tables = store.tables();
    let stored: BTreeMap<String, (TopicPartition, i64)> = tables
        .rows
        .iter()
        .map(|(id, row)| (id.clone(), (row.tp.clone(), row.offset)))
        .collect();
    assert_eq!(&stored, produced);
    assert_eq!(tables.duplicates, 0, "no record was stored twice");
}

mod delivery;
mod stopping;
mod topic_reset;
