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

use super::consumer::{Inbox, InboxConfig, InboxError};
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

/// A producer writes an event with this id to `partition`; returns its
/// offset.
fn produce(broker: &MemoryBroker, partition: i32, id: &str) -> i64 {
    let record = KafkaRecord {
        topic: TOPIC.into(),
        key: Some(Bytes::from(format!("key-{id}"))),
        value: Some(Bytes::from(format!("{{\"id\":\"{id}\"}}"))),
        headers: vec![("id".into(), Bytes::from(id.to_owned()))],
    };
    broker.append(partition, record);
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

#[test]
fn each_id_lands_once_and_the_stored_offsets_are_the_logs_ends() {
    let broker = MemoryBroker::default();
    let store = MemoryStore::new("a");
    let mut produced = produce_numbered(&broker, &[0, 1], 0..12);
    produced.extend(produce_numbered(&broker, &[0], 12..13));
    let inbox = start(
        &broker,
        store.another("a"),
        config(10, Duration::from_millis(20), FIRST_BACKOFF),
    );
    inbox.member.assign(&[tp(0), tp(1)]);
    wait_until("the first events are stored", || {
        next_offsets(&store) == offsets(&[(0, 13), (1, 12)])
    });
    // More arrive while it runs.
    produced.extend(produce_numbered(&broker, &[1], 12..17));
    wait_until("the later events are stored", || {
        next_offsets(&store) == offsets(&[(0, 13), (1, 17)])
    });
    inbox.stop().unwrap();

    assert_stored_once(&store, &produced);
    let tables = store.tables();
    assert!(
        tables.batches.iter().all(|n| *n <= 10),
        "{:?}",
        tables.batches
    );
    assert_eq!(
        tables.batches.iter().sum::<usize>(),
        30,
        "each record was written once"
    );
}

#[test]
fn a_failed_write_rewinds_every_partition_to_its_stored_offset_after_a_backoff() {
    let broker = MemoryBroker::default();
    let store = MemoryStore::new("a");
    let max_backoff = Duration::from_millis(400);
    let inbox = start(&broker, store.another("a"), config(4, FOREVER, max_backoff));
    inbox.member.assign(&[tp(0), tp(1)]);
    let mut produced = produce_numbered(&broker, &[0, 1], 0..2);
    wait_until("the first batch is stored", || {
        next_offsets(&store) == offsets(&[(0, 2), (1, 2)])
    });

    store.set_fault(Some(Fault::ConnectionLost));
    produced.extend(produce_numbered(&broker, &[0, 1], 2..4));
    wait_until("the write and three reconnections failed", || {
        store.tables().failed_attempts().len() >= 4
    });
    {
        let tables = store.tables();
        let failed = tables.failed_attempts();
        assert_eq!(failed[0].call, Call::Write);
        assert!(failed[1..].iter().all(|a| a.call == Call::Reconnect));
        // 100 ms, doubling up to --max-backoff.
        let backoffs = [FIRST_BACKOFF, FIRST_BACKOFF * 2, max_backoff];
        for (pair, backoff) in failed.windows(2).zip(backoffs) {
            let waited = pair[1].at - pair[0].at;
            assert!(waited >= backoff, "waited {waited:?}, not {backoff:?}");
        }
        assert_eq!(tables.rows.len(), 4, "nothing of the failed batch");
        assert_eq!(tables.next_offsets, offsets(&[(0, 2), (1, 2)]));
    }
    // Until PostgreSQL answers, both partitions wait to be placed again,
    // with nothing in hand.
    assert_eq!(inbox.batch_len(), 0);
    let shared = inbox.member.context().lock();
    assert!(
        shared
            .positions
            .iter()
            .all(|(_, p)| p.placement == Placement::Unread)
    );
    drop(shared);

    store.set_fault(None);
    wait_until("the rest is stored once PostgreSQL is back", || {
        next_offsets(&store) == offsets(&[(0, 4), (1, 4)])
    });
    let seeks = inbox.member.seeks();
    inbox.stop().unwrap();

    assert_stored_once(&store, &produced);
    // Placed at the start of the log, then again at the stored offsets.
    assert_eq!(
        seeks,
        [
            (tp(0), Offset::Beginning),
            (tp(1), Offset::Beginning),
            (tp(0), Offset::Offset(2)),
            (tp(1), Offset::Offset(2)),
        ]
    );
    assert_eq!(store.tables().batches, [4, 4], "the failed batch, again");
}

#[test]
fn a_partition_given_up_mid_batch_is_resumed_by_its_new_owner_at_the_stored_offset() {
    let (broker, store, a, b) = two_members(6);
    a.member.assign(&[tp(0), tp(1)]);
    let mut produced = produce_numbered(&broker, &[0, 1], 0..3);
    wait_until("a stores the first batch", || {
        next_offsets(&store) == offsets(&[(0, 3), (1, 3)])
    });
    produced.extend(produce_numbered(&broker, &[0, 1], 3..5));
    wait_until("a holds two records of each partition", || {
        a.batch_len() == 4
    });

    a.member.revoke(&[tp(1)]);
    wait_until("a gave partition 1 up", || a.placed(&[tp(0)]));
    assert_eq!(a.batch_len(), 2, "the records of partition 1 are dropped");
    b.member.assign(&[tp(1)]);
    wait_until("b stores what a dropped", || {
        next_offsets(&store) == offsets(&[(0, 3), (1, 5)])
    });
    // a stores what it holds as it stops.
    a.stop().unwrap();
    assert_eq!(next_offsets(&store), offsets(&[(0, 5), (1, 5)]));
    let b_seeks = b.member.seeks();
    b.stop().unwrap();

    assert_stored_once(&store, &produced);
    assert_eq!(b_seeks, [(tp(1), Offset::Offset(3))]);
    let tables = store.tables();
    let by_b: Vec<(TopicPartition, i64)> = tables
        .rows
        .values()
        .filter(|r| r.writer == "b")
        .map(|r| (r.tp.clone(), r.offset))
        .collect();
    assert_eq!(by_b, [(tp(1), 3), (tp(1), 4)]);
    assert_eq!(tables.batches, [6, 2, 2], "nothing was written twice");
}

#[test]
fn a_partition_revoked_while_its_batch_is_written_is_resumed_after_that_batch() {
    let (broker, store, a, b) = two_members(4);
    a.member.assign(&[tp(0), tp(1)]);
    wait_until("a placed both partitions", || a.placed(&[tp(0), tp(1)]));
    store.set_fault(Some(Fault::Hang));
    let mut produced = produce_numbered(&broker, &[0, 1], 0..2);
    wait_until("a's write hangs", || store.tables().hanging == 1);
    // The group moves partition 1 while a is inside the write: a's
    // callback runs at its next poll, after the write.
    a.member.revoke(&[tp(1)]);
    store.set_fault(None);
    wait_until("a gave partition 1 up", || a.placed(&[tp(0)]));
    assert_eq!(next_offsets(&store), offsets(&[(0, 2), (1, 2)]));

    b.member.assign(&[tp(1)]);
    produced.extend(produce_numbered(&broker, &[1], 2..4));
    wait_until("b stores what came after a's batch", || {
        next_offsets(&store) == offsets(&[(0, 2), (1, 4)])
    });
    let b_seeks = b.member.seeks();
    a.stop().unwrap();
    b.stop().unwrap();

    assert_stored_once(&store, &produced);
    assert_eq!(b_seeks, [(tp(1), Offset::Offset(2))]);
    assert_eq!(store.tables().batches, [4, 2]);
}

#[test]
fn a_record_whose_id_is_stored_already_is_counted_as_a_duplicate_and_skipped() {
    let broker = MemoryBroker::default();
    let store = MemoryStore::new("a");
    // The producer sent "b" twice, the second time in a later batch.
    for id in ["a", "b", "c", "b"] {
        produce(&broker, 0, id);
    }
    let inbox = start(
        &broker,
        store.another("a"),
        config(2, FOREVER, FIRST_BACKOFF),
    );
    inbox.member.assign(&[tp(0)]);
    wait_until("all four are consumed", || {
        next_offsets(&store) == offsets(&[(0, 4)])
    });
    let duplicates = inbox.member.context().lock().duplicates;
    inbox.stop().unwrap();

    let tables = store.tables();
    let rows: Vec<(&str, i64)> = tables
        .rows
        .iter()
        .map(|(id, r)| (id.as_str(), r.offset))
        .collect();
    assert_eq!(rows, [("a", 0), ("b", 1), ("c", 2)]);
    assert_eq!(tables.duplicates, 1);
    assert_eq!(duplicates, 1, "the loop counts it");
}

#[test]
fn a_permanent_store_error_stops_the_loop_with_the_error() {
    let (broker, store, inbox) = one_member_on_partition_0(2);
    store.set_fault(Some(Fault::Refused));
    produce_numbered(&broker, &[0], 0..2);
    wait_until("the loop stops", || inbox.thread.is_finished());

    let result = inbox.thread.join().unwrap();
    assert!(
        matches!(result, Err(InboxError::Store(StoreError::NotSetUp(_)))),
        "{result:?}"
    );
    let tables = store.tables();
    assert!(tables.rows.is_empty());
    assert!(tables.next_offsets.is_empty());
    assert_eq!(tables.failed_attempts().len(), 1, "not tried again");
}

#[test]
fn shutdown_during_a_store_outage_exits_promptly_without_waiting_out_the_backoff() {
    let broker = MemoryBroker::default();
    let store = MemoryStore::new("a");
    let max_backoff = Duration::from_secs(60);
    let inbox = start(&broker, store.another("a"), config(1, FOREVER, max_backoff));
    inbox.member.assign(&[tp(0)]);
    wait_until("partition 0 is placed", || inbox.placed(&[tp(0)]));
    store.set_fault(Some(Fault::ConnectionLost));
    produce_numbered(&broker, &[0], 0..1);
    // Failures at 0, 0.1, 0.3, 0.7 and 1.5 s: the next is 1.6 s later.
    wait_until("five attempts failed", || {
        store.tables().failed_attempts().len() >= 5
    });
    let attempts = store.tables().attempts.len();

    let asked = Instant::now();
    let result = inbox.stop();
    let took = asked.elapsed();
    assert!(result.is_ok(), "{result:?}");
    // One poll (100 ms) and the exit; not the 1.6 s backoff.
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let tables = store.tables();
    assert_eq!(tables.attempts.len(), attempts, "nothing tried at exit");
    assert!(tables.rows.is_empty());
}

/// SIGTERM while PostgreSQL answers nothing (a frozen server, or a write
/// waiting on a lock): the write is given up `STOP_GRACE` after the stop
/// request, the loop exits, and the batch stays unstored with its offset,
/// for the next owner to read again.
#[test]
fn shutdown_while_a_write_gets_no_answer_exits_after_the_grace() {
    let (broker, store, inbox) = one_member_on_partition_0(1);
    store.set_fault(Some(Fault::Hang));
    produce_numbered(&broker, &[0], 0..1);
    wait_until("the write gets no answer", || store.tables().hanging == 1);

    inbox.shutdown.store(true, Ordering::Relaxed);
    let asked = Instant::now();
    while !inbox.thread.is_finished() && asked.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let finished = inbox.thread.is_finished();
    store.set_fault(None);
    let result = inbox.thread.join().unwrap();
    assert!(
        finished,
        "asked to stop 10 s ago, the loop is still in the store's write"
    );
    assert!(result.is_ok(), "{result:?}");
    let tables = store.tables();
    assert_eq!(tables.hanging, 0, "the write was given up");
    assert!(tables.rows.is_empty() && tables.next_offsets.is_empty());
}
