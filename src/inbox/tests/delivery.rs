//! Each event once: batches stored with their offsets, a failed write
//! rewound, partitions moving between members, duplicates skipped.

use super::*;

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
