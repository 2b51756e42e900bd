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

/// A first life of the inbox stores `n` events `old-N` of partition 0,
/// then stops: the store holds next offset `n` under the topic's id.
fn first_life(n: usize) -> (MemoryBroker, MemoryStore) {
    let broker = MemoryBroker::default();
    let store = MemoryStore::new("a");
    for i in 0..n {
        produce(&broker, 0, &format!("old-{i}"));
    }
    let inbox = start(
        &broker,
        store.another("a"),
        config(100, Duration::from_millis(20), FIRST_BACKOFF),
    );
    inbox.member.assign(&[tp(0)]);
    wait_until("the first life stores its events", || {
        next_offsets(&store) == offsets(&[(0, n as i64)])
    });
    inbox.stop().unwrap();
    assert_eq!(stored_topic_ids(&store), [(tp(0), broker.topic_id(TOPIC))]);
    (broker, store)
}

fn stored_topic_ids(store: &MemoryStore) -> Vec<(TopicPartition, String)> {
    store.tables().topic_ids.clone().into_iter().collect()
}

/// Topic `orders` is deleted and created again, `ids` in partition 0.
fn recreate(broker: &MemoryBroker, ids: &[String]) {
    let records = ids.iter().map(|id| (0, record(id))).collect();
    broker.recreate_topic(TOPIC, records);
}

fn named(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i}")).collect()
}

/// An inbox on partition 0 that stops by itself: its error.
fn stops_with(running: Running) -> InboxError {
    wait_until("the loop stops", || running.thread.is_finished());
    match running.thread.join().unwrap() {
        Ok(()) => panic!("the loop stopped without an error"),
        Err(e) => e,
    }
}

/// The ids in the inbox, sorted.
fn stored_ids(store: &MemoryStore) -> Vec<String> {
    store.tables().rows.keys().cloned().collect()
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

#[test]
fn a_topic_made_again_with_fewer_records_than_stored_stops_the_inbox_naming_partition_offsets_and_ids()
 {
    let (broker, store) = first_life(10);
    let old_id = broker.topic_id(TOPIC);
    recreate(&broker, &named("new", 0..3));
    let new_id = broker.topic_id(TOPIC);
    let inbox = start(
        &broker,
        store.another("a"),
        config(100, Duration::from_millis(20), FIRST_BACKOFF),
    );
    inbox.member.assign(&[tp(0)]);
    let member = inbox.member.clone();

    let error = stops_with(inbox);
    assert!(matches!(error, InboxError::TopicReset(_)), "{error:?}");
    let text = error.to_string();
    let facts = format!(
        "topic orders was deleted and created again: its id is {new_id}, but the inbox stored next offset 10 of partition 0 under topic id {old_id}; the partition's log now runs from offset 0 to 3"
    );
    assert!(text.contains(&facts), "{text}");
    assert!(text.contains("--on-topic-reset earliest"), "{text}");
    // Nothing read, nothing stored, nothing moved: the operator decides.
    assert!(member.seeks().is_empty());
    assert_eq!(stored_ids(&store), sorted(named("old", 0..10)));
    assert_eq!(next_offsets(&store), offsets(&[(0, 10)]));
    assert_eq!(stored_topic_ids(&store), [(tp(0), old_id)]);
}

#[test]
fn a_topic_made_again_that_grew_past_the_stored_offset_is_caught_by_its_topic_id() {
    let (broker, store) = first_life(10);
    let old_id = broker.topic_id(TOPIC);
    // Offset 10 exists in the new log: only the topic id tells.
    recreate(&broker, &named("new", 0..15));
    let new_id = broker.topic_id(TOPIC);
    let inbox = start(
        &broker,
        store.another("a"),
        config(100, Duration::from_millis(20), FIRST_BACKOFF),
    );
    inbox.member.assign(&[tp(0)]);

    let text = stops_with(inbox).to_string();
    let facts = format!(
        "its id is {new_id}, but the inbox stored next offset 10 of partition 0 under topic id {old_id}; the partition's log now runs from offset 0 to 15"
    );
    assert!(text.contains(&facts), "{text}");
    assert_eq!(stored_ids(&store), sorted(named("old", 0..10)));
    assert_eq!(next_offsets(&store), offsets(&[(0, 10)]));
}

#[test]
fn with_on_topic_reset_earliest_the_new_log_is_read_from_its_start_each_id_once() {
    let (broker, store) = first_life(10);
    // The new log holds an id stored from the old one: skipped as ever.
    let new_log: Vec<String> = ["new-0", "new-1", "old-4", "new-2"]
        .map(str::to_owned)
        .into();
    recreate(&broker, &new_log);
    let new_id = broker.topic_id(TOPIC);
    let mut earliest = config(100, Duration::from_millis(20), FIRST_BACKOFF);
    earliest.on_topic_reset = OnTopicReset::Earliest;
    let inbox = start(&broker, store.another("a"), earliest);
    inbox.member.assign(&[tp(0)]);
    wait_until("the new log is stored", || {
        next_offsets(&store) == offsets(&[(0, 4)])
    });
    let seeks = inbox.member.seeks();
    inbox.stop().unwrap();

    assert_eq!(seeks, [(tp(0), Offset::Offset(0))]);
    assert_eq!(stored_topic_ids(&store), [(tp(0), new_id)]);
    let tables = store.tables();
    let new_rows: Vec<(&str, i64)> = tables
        .rows
        .iter()
        .filter(|(id, _)| id.starts_with("new"))
        .map(|(id, row)| (id.as_str(), row.offset))
        .collect();
    assert_eq!(new_rows, [("new-0", 0), ("new-1", 1), ("new-2", 3)]);
    assert_eq!(tables.rows.len(), 13, "the old rows stay");
    assert_eq!(tables.duplicates, 1, "old-4 is stored once");
    drop(tables);

    // The reset is stored: the next life, with the default, reads on.
    produce(&broker, 0, "new-3");
    let inbox = start(
        &broker,
        store.another("a"),
        config(100, Duration::from_millis(20), FIRST_BACKOFF),
    );
    inbox.member.assign(&[tp(0)]);
    wait_until("the next record is stored", || {
        next_offsets(&store) == offsets(&[(0, 5)])
    });
    let seeks = inbox.member.seeks();
    inbox.stop().unwrap();
    assert_eq!(seeks, [(tp(0), Offset::Offset(4))]);
    assert!(store.tables().rows.contains_key("new-3"));
}

#[test]
fn a_topic_made_again_shorter_while_the_inbox_reads_it_stops_the_inbox() {
    let broker = MemoryBroker::default();
    let store = MemoryStore::new("a");
    let inbox = start(
        &broker,
        store.another("a"),
        config(100, Duration::from_millis(20), FIRST_BACKOFF),
    );
    inbox.member.assign(&[tp(0)]);
    for id in named("old", 0..10) {
        produce(&broker, 0, &id);
    }
    wait_until("the old log is stored", || {
        next_offsets(&store) == offsets(&[(0, 10)])
    });
    // The consumer's position is past the new log's end: it starts again
    // from the log's start, below the position.
    recreate(&broker, &named("new", 0..3));

    let text = stops_with(inbox).to_string();
    assert!(
        text.contains("but the inbox stored next offset 10 of partition 0 under topic id orders-id-0; the partition's log now runs from offset 0 to 3"),
        "{text}"
    );
    assert_eq!(stored_ids(&store), sorted(named("old", 0..10)));
    assert_eq!(next_offsets(&store), offsets(&[(0, 10)]));
}

#[test]
fn a_topic_made_again_and_grown_past_the_position_while_read_is_noticed_by_its_id_and_read_from_its_start()
 {
    let broker = MemoryBroker::default();
    let store = MemoryStore::new("a");
    let mut earliest = config(100, Duration::from_millis(20), FIRST_BACKOFF);
    earliest.on_topic_reset = OnTopicReset::Earliest;
    earliest.topic_check_interval = Duration::from_millis(20);
    let inbox = start(&broker, store.another("a"), earliest);
    inbox.member.assign(&[tp(0)]);
    for id in named("old", 0..10) {
        produce(&broker, 0, &id);
    }
    wait_until("the old log is stored", || {
        next_offsets(&store) == offsets(&[(0, 10)])
    });
    // librdkafka reads on at offset 10 of the new log: new-0 to new-9
    // would be passed over.
    recreate(&broker, &named("new", 0..15));
    let new_id = broker.topic_id(TOPIC);
    wait_until("the whole new log is stored", || {
        store.tables().rows.len() == 25
    });
    wait_until("the offset is the new log's end", || {
        next_offsets(&store) == offsets(&[(0, 15)])
    });
    inbox.stop().unwrap();

    let mut expected = named("old", 0..10);
    expected.extend(named("new", 0..15));
    assert_eq!(stored_ids(&store), sorted(expected));
    assert_eq!(stored_topic_ids(&store), [(tp(0), new_id)]);
}

#[test]
fn an_offset_stored_by_an_older_walrelay_without_a_topic_id_is_resumed_and_gets_the_id() {
    let broker = MemoryBroker::default();
    let store = MemoryStore::new("a");
    let produced = produce_numbered(&broker, &[0], 0..8);
    store.tables().next_offsets.insert(tp(0), 5);
    let inbox = start(
        &broker,
        store.another("a"),
        config(100, Duration::from_millis(20), FIRST_BACKOFF),
    );
    inbox.member.assign(&[tp(0)]);
    wait_until("the rest is stored", || {
        next_offsets(&store) == offsets(&[(0, 8)])
    });
    let seeks = inbox.member.seeks();
    inbox.stop().unwrap();

    assert_eq!(seeks, [(tp(0), Offset::Offset(5))]);
    let ids: Vec<&String> = produced.keys().filter(|id| produced[*id].1 >= 5).collect();
    assert_eq!(stored_ids(&store).iter().collect::<Vec<_>>(), ids);
    assert_eq!(stored_topic_ids(&store), [(tp(0), broker.topic_id(TOPIC))]);
}

#[test]
fn a_partition_waits_unplaced_while_kafka_does_not_say_its_topic_id() {
    let broker = MemoryBroker::default();
    let store = MemoryStore::new("a");
    let produced = produce_numbered(&broker, &[0], 0..4);
    let inbox = start(
        &broker,
        store.another("a"),
        config(100, Duration::from_millis(20), FIRST_BACKOFF),
    );
    inbox.member.set_unanswered(true);
    inbox.member.assign(&[tp(0)]);
    wait_until("the loop asked twice", || {
        inbox.member.topic_id_requests() >= 2
    });
    assert!(inbox.member.seeks().is_empty(), "not placed");
    assert!(store.tables().rows.is_empty());

    inbox.member.set_unanswered(false);
    wait_until("everything is stored", || {
        next_offsets(&store) == offsets(&[(0, 4)])
    });
    inbox.stop().unwrap();
    assert_stored_once(&store, &produced);
}
