//! A topic made again (or a log truncated), before or while it is read,
//! with `--on-topic-reset` fail or earliest; topic ids stored and awaited.

use super::*;

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
