//! Two transactions at once (`transaction/overlap.rs`): the next one takes
//! records while the one before commits, and a failed commit takes both
//! back.

use super::*;

/// Drives the publisher for `wait` (paused time): what settled meanwhile.
async fn run_for(publisher: &mut Publisher<MemorySink, u64>, wait: Duration) -> Vec<u64> {
    let mut settled = Vec::new();
    let until = tokio::time::Instant::now() + wait;
    while let Ok(outcomes) = tokio::time::timeout_at(until, publisher.next()).await {
        for outcome in outcomes.unwrap() {
            match outcome {
                Outcome::Delivered { tag, .. } | Outcome::Skipped { tag } => settled.push(tag),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    settled
}

/// Drives the publisher for `wait`: whether nothing settled meanwhile.
async fn settles_nothing(publisher: &mut Publisher<MemorySink, u64>, wait: Duration) -> bool {
    run_for(publisher, wait).await.is_empty()
}

fn session(broker: &MemoryBroker) -> Publisher<MemorySink, u64> {
    let mut publisher = Publisher::new(broker.transactional_sink(), config(true));
    publisher.begin_session(Some(replay()), Some("walrelay.7.walrelay".into()));
    publisher
}

/// Events `from..to` handed over; nothing settles at once.
fn publish(publisher: &mut Publisher<MemorySink, u64>, from: u64, to: u64) {
    for n in from..to {
        assert!(publisher.publish(event(n)).is_empty());
    }
}

/// Drives the publisher until `n` events settle, checking that each one
/// that does is committed already: nothing counts as delivered (and so is
/// confirmed) past what a read_committed reader sees.
async fn settle_committed(
    publisher: &mut Publisher<MemorySink, u64>,
    broker: &MemoryBroker,
    n: usize,
) -> Vec<u64> {
    let mut settled = Vec::new();
    while settled.len() < n {
        let more = run_for(publisher, Duration::from_millis(100)).await;
        let visible = ids(&broker.log(TOPIC));
        for n in &more {
            assert!(
                visible.contains(&n.to_string()),
                "{n} settled before its transaction committed"
            );
        }
        settled.extend(more);
        assert!(broker.sent() < 100, "settles in a few rounds");
    }
    settled
}

fn strings(range: std::ops::Range<u64>) -> Vec<String> {
    range.map(|n| n.to_string()).collect()
}

#[tokio::test(start_paused = true)]
async fn records_go_into_the_next_transaction_while_the_one_before_commits() {
    let broker = MemoryBroker::default();
    let mut publisher = session(&broker);
    broker.hold_commits();
    publish(&mut publisher, 0, 4);
    assert!(settles_nothing(&mut publisher, Duration::from_millis(100)).await);
    assert_eq!(broker.commits_waiting(), 1, "the first transaction commits");
    assert_eq!(broker.sent(), 4);
    publish(&mut publisher, 4, 8);
    assert!(settles_nothing(&mut publisher, Duration::from_millis(100)).await);
    assert_eq!(
        broker.sent(),
        8,
        "the next records went out while the commit before is under way"
    );
    assert_eq!(broker.log_uncommitted(TOPIC).len(), 8);
    assert!(broker.log(TOPIC).is_empty(), "nothing committed yet");
    broker.let_one_commit_through();
    let settled = settle_committed(&mut publisher, &broker, 4).await;
    assert_eq!(settled, [0, 1, 2, 3], "the first transaction's, only");
    assert!(
        settles_nothing(&mut publisher, Duration::from_millis(100)).await,
        "the next transaction's records settle only once it commits"
    );
    broker.release_commits();
    let settled = settle_committed(&mut publisher, &broker, 4).await;
    assert_eq!(settled, [4, 5, 6, 7]);
    assert_eq!(ids(&broker.log(TOPIC)), strings(0..8));
    assert_eq!(broker.log_uncommitted(TOPIC).len(), 8, "nothing sent twice");
}

#[tokio::test(start_paused = true)]
async fn a_transaction_that_stops_taking_records_has_them_sent_at_once() {
    let broker = MemoryBroker::default();
    let mut publisher = session(&broker);
    // Unacknowledged, as records lingering in librdkafka are.
    broker.pause();
    publish(&mut publisher, 0, 3);
    assert!(settles_nothing(&mut publisher, Duration::from_millis(1)).await);
    assert!(
        broker.sent_lingering().is_empty(),
        "still open: more records may batch with these"
    );
    assert!(settles_nothing(&mut publisher, Duration::from_millis(100)).await);
    assert_eq!(
        broker.sent_lingering(),
        ["walrelay.7.walrelay"],
        "closed: its producer sends them now, once"
    );
    broker.resume();
    let settled = settle_committed(&mut publisher, &broker, 3).await;
    assert_eq!(settled, [0, 1, 2]);
    assert_eq!(broker.sent_lingering().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_next_transaction_has_its_records_sent_at_once_only_when_it_stops_taking_them() {
    let broker = MemoryBroker::default();
    let mut publisher = session(&broker);
    broker.pause();
    broker.hold_commits();
    publish(&mut publisher, 0, 2);
    assert!(settles_nothing(&mut publisher, Duration::from_millis(100)).await);
    assert_eq!(broker.sent_lingering(), [SESSION_IDS[0]]);
    broker.resume();
    assert!(settles_nothing(&mut publisher, Duration::from_millis(100)).await);
    assert_eq!(broker.commits_waiting(), 1, "the first transaction commits");
    broker.pause();
    publish(&mut publisher, 2, 4);
    assert!(settles_nothing(&mut publisher, Duration::from_millis(100)).await);
    assert_eq!(
        broker.sent_lingering(),
        [SESSION_IDS[0]],
        "the next one, under the other id, takes records while the one before commits"
    );
    broker.let_one_commit_through();
    let settled = settle_committed(&mut publisher, &broker, 2).await;
    assert_eq!(settled, [0, 1]);
    assert_eq!(
        broker.sent_lingering(),
        [SESSION_IDS[0], SESSION_IDS[1]],
        "closed once the one before committed: its own producer sends"
    );
    broker.resume();
    broker.release_commits();
    let settled = settle_committed(&mut publisher, &broker, 2).await;
    assert_eq!(settled, [2, 3]);
    assert_eq!(ids(&broker.log(TOPIC)), strings(0..4));
}

#[tokio::test(start_paused = true)]
async fn a_commit_that_fails_while_the_next_transaction_is_open_takes_both_back_and_each_event_goes_once_in_order()
 {
    let broker = MemoryBroker::default();
    let mut publisher = session(&broker);
    broker.hold_commits();
    broker.fail_next_commit(BrokerError {
        class: BrokerErrorClass::Abortable,
        message: "Broker: Transaction coordinator aborted the transaction".into(),
    });
    publish(&mut publisher, 0, 5);
    assert!(settles_nothing(&mut publisher, Duration::from_millis(100)).await);
    assert_eq!(broker.commits_waiting(), 1);
    publish(&mut publisher, 5, 10);
    assert!(settles_nothing(&mut publisher, Duration::from_millis(100)).await);
    assert_eq!(broker.sent(), 10, "the next transaction took records");
    broker.release_commits();
    let settled = settle_committed(&mut publisher, &broker, 10).await;
    assert_eq!(settled, (0..10).collect::<Vec<_>>());
    assert_eq!(
        ids(&broker.log(TOPIC)),
        strings(0..10),
        "each event once, in order, none of either aborted transaction visible"
    );
    assert!(
        broker.log_uncommitted(TOPIC).len() > 10,
        "both were taken back"
    );
}

#[tokio::test(start_paused = true)]
async fn with_one_id_resting_the_other_two_take_turns() {
    const OTHER: &str = "outbox.event.invoice";
    let broker = MemoryBroker::default();
    let mut publisher = session(&broker);
    let first = publisher.publish(event_to(OTHER, 0));
    assert_eq!(settle(&mut publisher, first, 1).await.unwrap(), [0]);
    // The first id gets stuck on OTHER's partition, and rests.
    broker.take_offline(OTHER, 0);
    let mut outcomes = publisher.publish(event_to(OTHER, 2));
    outcomes.extend(publisher.publish(event_to(TOPIC, 1)));
    assert_eq!(settle(&mut publisher, outcomes, 1).await.unwrap(), [1]);
    assert!(broker.is_blocked("walrelay.7.walrelay"));
    // Two ids are left: the next transaction goes under the third while
    // the spare commits.
    broker.hold_commits();
    for n in [3, 5] {
        assert!(publisher.publish(event_to(TOPIC, n)).is_empty());
    }
    assert!(settles_nothing(&mut publisher, Duration::from_millis(100)).await);
    assert_eq!(broker.commits_waiting(), 1);
    let sent = broker.sent();
    for n in [7, 9] {
        assert!(publisher.publish(event_to(TOPIC, n)).is_empty());
    }
    assert!(settles_nothing(&mut publisher, Duration::from_millis(100)).await);
    assert_eq!(
        broker.sent(),
        sent + 2,
        "the next records went out while the commit is under way"
    );
    broker.release_commits();
    let settled = settle(&mut publisher, Vec::new(), 4).await.unwrap();
    assert_eq!(settled, [3, 5, 7, 9]);
    assert_eq!(
        ids(&broker.log(TOPIC)),
        ["1", "3", "5", "7", "9"].map(String::from)
    );
    broker.bring_online(OTHER, 0);
    assert_eq!(settle(&mut publisher, Vec::new(), 1).await.unwrap(), [2]);
    assert_eq!(ids(&broker.log(OTHER)), ["0", "2"].map(String::from));
}

/// Why a session takes over a third id: once two ids take turns, both
/// write to every busy partition, so a partition that loses its leader
/// while one commits and the other is open sticks both (the committing
/// one's markers cannot be written there, the open one's records cannot
/// be). The third, clean id (fenced at the session's start, never used
/// while the two can take turns) carries the other partitions' records,
/// one transaction at a time (cluster.rs
/// `one_topics_only_broker_killed_holds_back_only_that_topics_events`).
#[tokio::test(start_paused = true)]
async fn with_both_ids_in_use_a_partition_without_a_leader_still_holds_back_only_its_own_records() {
    const OTHER: &str = "outbox.event.invoice";
    let broker = MemoryBroker::default();
    let mut publisher = session(&broker);
    let first = publisher.publish(event_to(OTHER, 0));
    assert_eq!(settle(&mut publisher, first, 1).await.unwrap(), [0]);
    // A transaction with both topics' records commits (held) while the
    // next takes both topics' records too.
    broker.hold_commits();
    for n in [1, 2] {
        let topic = if n % 2 == 0 { OTHER } else { TOPIC };
        assert!(publisher.publish(event_to(topic, n)).is_empty());
    }
    assert!(settles_nothing(&mut publisher, Duration::from_millis(100)).await);
    assert_eq!(broker.commits_waiting(), 1);
    broker.take_offline(OTHER, 0);
    let mut outcomes = Vec::new();
    for n in 3..=8 {
        let topic = if n % 2 == 0 { OTHER } else { TOPIC };
        outcomes.extend(publisher.publish(event_to(topic, n)));
    }
    broker.release_commits();
    let settled =
        tokio::time::timeout(Duration::from_secs(60), settle(&mut publisher, outcomes, 5))
            .await
            .expect("the online topic's records are delivered while OTHER is offline")
            .unwrap();
    let mut settled = settled;
    settled.sort();
    assert_eq!(settled, [1, 2, 3, 5, 7]);
    assert!(
        broker.is_blocked("walrelay.7.walrelay"),
        "the committing id"
    );
    assert!(
        broker.is_blocked("walrelay.7.walrelay.spare"),
        "the open one"
    );
    // Only the third id is left: one transaction at a time.
    broker.hold_commits();
    for n in [9, 11] {
        assert!(publisher.publish(event_to(TOPIC, n)).is_empty());
    }
    assert!(settles_nothing(&mut publisher, Duration::from_millis(100)).await);
    assert_eq!(broker.commits_waiting(), 1);
    let sent = broker.sent();
    for n in [13, 15] {
        assert!(publisher.publish(event_to(TOPIC, n)).is_empty());
    }
    assert!(settles_nothing(&mut publisher, Duration::from_millis(100)).await);
    assert_eq!(broker.sent(), sent, "nothing goes out while it commits");
    broker.release_commits();
    let settled = settle(&mut publisher, Vec::new(), 4).await.unwrap();
    assert_eq!(settled, [9, 11, 13, 15]);
    assert_eq!(
        ids(&broker.log(TOPIC)),
        ["1", "3", "5", "7", "9", "11", "13", "15"].map(String::from)
    );
    // OTHER is back: its records go, each once, in order.
    broker.bring_online(OTHER, 0);
    assert_eq!(
        settle(&mut publisher, Vec::new(), 3).await.unwrap(),
        [4, 6, 8]
    );
    assert_eq!(
        ids(&broker.log(OTHER)),
        ["0", "2", "4", "6", "8"].map(String::from)
    );
}

/// The committing id touched a partition that loses its leader and comes
/// back while the commit is still under way: no id rests on it for good
/// (no later answer would say it is back), so two ids still take turns.
#[tokio::test(start_paused = true)]
async fn a_partition_back_before_the_commit_ends_does_not_rest_ids_forever() {
    const OTHER: &str = "outbox.event.invoice";
    let broker = MemoryBroker::default();
    let mut publisher = session(&broker);
    broker.hold_commits();
    assert!(publisher.publish(event_to(OTHER, 0)).is_empty());
    assert!(settles_nothing(&mut publisher, Duration::from_millis(100)).await);
    assert_eq!(broker.commits_waiting(), 1, "N (OTHER) commits");
    broker.take_offline(OTHER, 0);
    // N+1 under the spare: OTHER's record is never acknowledged.
    assert!(publisher.publish(event_to(OTHER, 2)).is_empty());
    assert!(publisher.publish(event_to(TOPIC, 1)).is_empty());
    // Records outstanding past the stall: OTHER is found without a leader.
    assert!(
        run_for(&mut publisher, Duration::from_secs(7))
            .await
            .is_empty()
    );
    assert_eq!(publisher.held_partitions().len(), 1, "OTHER held");
    broker.bring_online(OTHER, 0);
    // Asked again: OTHER is back, while N still commits.
    assert!(
        run_for(&mut publisher, Duration::from_secs(3))
            .await
            .is_empty()
    );
    assert!(publisher.held_partitions().is_empty(), "OTHER back");
    broker.release_commits();
    let mut settled = run_for(&mut publisher, Duration::from_secs(600)).await;
    settled.sort();
    assert_eq!(settled, [0, 1, 2], "everything settles once OTHER is back");
    // Two ids still take turns: the next transaction goes out while the
    // one before commits.
    broker.hold_commits();
    publish(&mut publisher, 10, 12);
    assert!(settles_nothing(&mut publisher, Duration::from_millis(100)).await);
    assert_eq!(broker.commits_waiting(), 1);
    let sent = broker.sent();
    publish(&mut publisher, 12, 14);
    assert!(settles_nothing(&mut publisher, Duration::from_millis(100)).await);
    assert_eq!(
        broker.sent(),
        sent + 2,
        "no id rests on OTHER: the overlap goes on"
    );
    broker.release_commits();
    let settled = settle_committed(&mut publisher, &broker, 4).await;
    assert_eq!(settled, [10, 11, 12, 13]);
}

/// A commit that fails transiently while the next transaction is open is
/// committed again (through its own id), and the next one after it.
#[tokio::test(start_paused = true)]
async fn a_commit_failing_transiently_while_the_next_is_open_is_committed_again() {
    let broker = MemoryBroker::default();
    let mut publisher = session(&broker);
    broker.hold_commits();
    broker.fail_next_commit(BrokerError::transient("Local: Timed out"));
    publish(&mut publisher, 0, 4);
    assert!(settles_nothing(&mut publisher, Duration::from_millis(100)).await);
    publish(&mut publisher, 4, 8);
    assert!(settles_nothing(&mut publisher, Duration::from_millis(100)).await);
    broker.release_commits();
    let settled = settle_committed(&mut publisher, &broker, 8).await;
    assert_eq!(settled, (0..8).collect::<Vec<_>>());
    assert_eq!(ids(&broker.log(TOPIC)), strings(0..8));
    assert_eq!(broker.log_uncommitted(TOPIC).len(), 8, "nothing sent twice");
}

/// The commit of the transaction before the open one is fenced: the error
/// names that one's id, not the open one's.
#[tokio::test(start_paused = true)]
async fn a_fenced_commit_before_the_open_transaction_names_its_own_id() {
    let broker = MemoryBroker::default();
    let mut publisher = session(&broker);
    broker.hold_commits();
    broker.fail_next_commit(BrokerError {
        class: BrokerErrorClass::Fenced,
        message: "Broker: Producer attempted an operation with an old epoch".into(),
    });
    publish(&mut publisher, 0, 4);
    assert!(settles_nothing(&mut publisher, Duration::from_millis(100)).await);
    publish(&mut publisher, 4, 8);
    assert!(settles_nothing(&mut publisher, Duration::from_millis(100)).await);
    broker.release_commits();
    let error = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match publisher.next().await {
                Ok(outcomes) => assert!(outcomes.is_empty(), "{outcomes:?}"),
                Err(error) => return error,
            }
        }
    })
    .await
    .expect("the fenced commit ends the producer");
    match error {
        crate::publish::error::PublishError::Fenced {
            transactional_id, ..
        } => assert_eq!(transactional_id, "walrelay.7.walrelay"),
        other => panic!("{other:?}"),
    }
}

/// Kafka's hanging transaction (open_transactions.rs): a partition whose
/// only broker was killed comes back still holding the transaction of id
/// A (the committing one) open, though A's coordinator completed it. The
/// tail is read again (the partition is back) while A's commit there is
/// still under way, under the next transaction. A's last *ended*
/// transaction there was aborted, so A is scheduled to clean up there; by
/// the time the cleanup runs, A's transaction there has committed (its
/// events delivered, confirmable), and A's abort there would end that
/// committed transaction as aborted: a loss. No id whose transaction
/// there has not ended may be scheduled to abort there.
#[tokio::test(start_paused = true)]
async fn a_cleanup_is_not_scheduled_for_an_id_whose_commit_there_is_still_under_way() {
    const OTHER: &str = "outbox.event.invoice";
    const A: &str = "walrelay.7.walrelay";
    let broker = MemoryBroker::default();
    let mut publisher = session(&broker);
    let mut settled = Vec::new();
    broker.hold_commits();
    // A's transaction with OTHER fails to commit while B's is open: both
    // are aborted (A's last transaction in OTHER: aborted).
    broker.fail_next_commit(BrokerError {
        class: BrokerErrorClass::Abortable,
        message: "Broker: Transaction coordinator aborted the transaction".into(),
    });
    assert!(publisher.publish(event_to(OTHER, 0)).is_empty());
    settled.extend(run_for(&mut publisher, Duration::from_millis(100)).await);
    assert!(publisher.publish(event_to(TOPIC, 1)).is_empty());
    settled.extend(run_for(&mut publisher, Duration::from_millis(100)).await);
    broker.let_one_commit_through();
    settled.extend(run_for(&mut publisher, Duration::from_millis(100)).await);
    // B carries 0 and 1 again; A and B then take turns with TOPIC only.
    for n in [3, 5] {
        assert!(publisher.publish(event_to(TOPIC, n)).is_empty());
        settled.extend(run_for(&mut publisher, Duration::from_millis(100)).await);
        broker.let_one_commit_through();
        settled.extend(run_for(&mut publisher, Duration::from_millis(100)).await);
    }
    // A's next transaction writes 6 to OTHER and commits (held) ...
    assert!(publisher.publish(event_to(OTHER, 6)).is_empty());
    settled.extend(run_for(&mut publisher, Duration::from_millis(100)).await);
    broker.let_one_commit_through();
    settled.extend(run_for(&mut publisher, Duration::from_millis(100)).await);
    assert_eq!(broker.commits_waiting(), 1, "A commits 6");
    settled.sort();
    assert_eq!(settled, [0, 1, 3, 5]);
    // ... while OTHER's only broker is killed (found while B's record 7
    // is outstanding) ...
    broker.take_offline(OTHER, 0);
    broker.pause();
    assert!(publisher.publish(event_to(TOPIC, 7)).is_empty());
    assert!(
        run_for(&mut publisher, Duration::from_secs(6))
            .await
            .is_empty()
    );
    assert_eq!(publisher.held_partitions().len(), 1, "OTHER held");
    // ... and comes back still holding A's transaction open (its marker
    // lost), before A's commit returns.
    broker.leave_open(OTHER, 0, A, Vec::new());
    broker.bring_online(OTHER, 0);
    broker.resume();
    assert!(
        run_for(&mut publisher, Duration::from_secs(3))
            .await
            .is_empty()
    );
    assert!(publisher.held_partitions().is_empty(), "OTHER back");
    // 8 goes to OTHER: its tail is read again, and found hidden.
    assert!(publisher.publish(event_to(OTHER, 8)).is_empty());
    assert!(settles_nothing(&mut publisher, Duration::from_millis(100)).await);
    // A's commit returns: 6 is delivered (and may be confirmed).
    broker.release_commits();
    let mut more = run_for(&mut publisher, Duration::from_secs(10)).await;
    more.sort();
    assert_eq!(more[..2], [6, 7]);
    assert!(
        broker.is_left_open(OTHER, 0),
        "A's last transaction in OTHER committed: no abort of A's may end what is open there"
    );
    // Kafka ends it (the broker's transaction timeout): 8 goes, once.
    broker.time_out_left_open(OTHER, 0);
    let mut rest = more[2..].to_vec();
    rest.extend(run_for(&mut publisher, Duration::from_secs(10)).await);
    assert_eq!(rest, [8]);
    assert_eq!(ids(&broker.log(OTHER)), ["0", "6", "8"].map(String::from));
}
