//! The publisher's rules, in-process: the in-memory broker (transactions
//! and fencing included) and tokio's paused time.

use std::time::Duration;

use bytes::Bytes;

use super::memory::{MemoryBroker, MemorySink};
use super::*;
use crate::lsn::Lsn;
use crate::record::KafkaRecord;
use crate::timeline::TimelineHistory;

mod chaos;
mod offline;
mod open_transactions;
mod overlap;

const TOPIC: &str = "outbox.event.order";

fn config(exactly_once: bool) -> PublisherConfig {
    PublisherConfig {
        dead_letter_topic: "walrelay.dead-letter".into(),
        topic_failures: TopicFailures::Stop,
        exactly_once: exactly_once.then(|| ScanSettings {
            lookback: 1000,
            dead_letter_topic: "walrelay.dead-letter".into(),
            window: 100,
            margin: crate::publish::EVENT_MARGIN,
        }),
    }
}

/// The transactional ids a session under `walrelay.7.walrelay` takes over.
const SESSION_IDS: [&str; 3] = [
    "walrelay.7.walrelay",
    "walrelay.7.walrelay.spare",
    "walrelay.7.walrelay.spare2",
];

fn replay() -> Replay {
    Replay {
        origin: Origin::parse("7/walrelay/1").unwrap(),
        history: TimelineHistory::new(1),
        start: Lsn(0),
    }
}

/// Event `n` as the WAL relay hands it over: key, id and position headers.
fn event(n: u64) -> Outgoing<u64> {
    let position = Position {
        commit: Lsn(n * 100),
        change: Lsn(n * 100),
        rank: 0,
    };
    Outgoing {
        record: KafkaRecord {
            topic: TOPIC.into(),
            key: Some(Bytes::from(format!("k{}", n % 3))),
            value: Some(Bytes::from("{}")),
            headers: vec![
                ("id".into(), Bytes::from(n.to_string())),
                (POSITION_HEADER.into(), Bytes::from(position.to_string())),
                (ORIGIN_HEADER.into(), Bytes::from("7/walrelay/1")),
            ],
        },
        tag: n,
        position: Some(position),
        dead_letter: false,
    }
}

/// Event `n` to `topic`, keyed `k{n}` so keys stay in one partition.
fn event_to(topic: &str, n: u64) -> Outgoing<u64> {
    let mut out = event(n);
    out.record.topic = topic.into();
    out
}

fn ids(records: &[KafkaRecord]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8(r.header("id").unwrap().to_vec()).unwrap())
        .collect()
}

/// Drives the publisher until `n` records are delivered or skipped, or an
/// error; returns the settled tags in order.
async fn settle<S: Sink>(
    publisher: &mut Publisher<S, u64>,
    mut outcomes: Vec<Outcome<u64>>,
    n: usize,
) -> Result<Vec<u64>, PublishError> {
    let mut settled = Vec::new();
    loop {
        for outcome in outcomes.drain(..) {
            match outcome {
                Outcome::Delivered { tag, .. } | Outcome::Skipped { tag } => settled.push(tag),
                other => panic!("unexpected {other:?}"),
            }
        }
        if settled.len() >= n {
            return Ok(settled);
        }
        outcomes = publisher.next().await?;
    }
}

#[tokio::test(start_paused = true)]
async fn transactional_records_count_as_delivered_only_once_their_transaction_commits() {
    let broker = MemoryBroker::default();
    let mut publisher = Publisher::new(broker.transactional_sink(), config(true));
    publisher.begin_session(Some(replay()), Some("walrelay.7.walrelay".into()));
    broker.pause();
    let mut outcomes = Vec::new();
    for n in 1..=5 {
        outcomes.extend(publisher.publish(event(n)));
    }
    assert!(outcomes.is_empty());
    let waiting = tokio::time::timeout(Duration::from_secs(1), publisher.next()).await;
    assert!(
        waiting.is_err(),
        "nothing delivered while the broker holds it"
    );
    assert!(broker.log(TOPIC).is_empty());
    broker.resume();
    let settled = settle(&mut publisher, Vec::new(), 5).await.unwrap();
    assert_eq!(settled, [1, 2, 3, 4, 5]);
    assert_eq!(
        ids(&broker.log(TOPIC)),
        ["1", "2", "3", "4", "5"].map(String::from)
    );
}

#[tokio::test(start_paused = true)]
async fn a_relay_taking_over_fences_the_one_before_so_no_event_lands_twice() {
    let broker = MemoryBroker::default();
    let id = "walrelay.7.walrelay";
    // Relay A sends three events; the broker stalls before acknowledging.
    let mut a = Publisher::new(broker.transactional_sink(), config(true));
    a.begin_session(Some(replay()), Some(id.into()));
    broker.pause();
    for n in 1..=3 {
        assert!(a.publish(event(n)).is_empty());
    }
    let _ = tokio::time::timeout(Duration::from_millis(100), a.next()).await;
    assert_eq!(broker.held(), 3, "A's records wait at the broker");
    // Relay B takes the slot over and replays the same events.
    let mut b = Publisher::new(broker.transactional_sink(), config(true));
    b.begin_session(Some(replay()), Some(id.into()));
    let mut outcomes = Vec::new();
    for n in 1..=3 {
        outcomes.extend(b.publish(event(n)));
    }
    // The broker comes back: A's records arrive after the fence.
    broker.resume();
    let settled = settle(&mut b, outcomes, 3).await.unwrap();
    assert_eq!(settled, [1, 2, 3]);
    let fenced = loop {
        match a.next().await {
            Ok(outcomes) => assert!(outcomes.is_empty(), "A delivered {outcomes:?}"),
            Err(error) => break error,
        }
    };
    assert!(matches!(fenced, PublishError::Fenced { .. }), "{fenced}");
    assert_eq!(
        ids(&broker.log(TOPIC)),
        ["1", "2", "3"].map(String::from),
        "each event once for a read_committed consumer"
    );
}

#[tokio::test(start_paused = true)]
async fn a_session_takes_its_three_transactional_ids_over_at_once() {
    let broker = MemoryBroker::default();
    let mut publisher: Publisher<MemorySink, u64> =
        Publisher::new(broker.transactional_sink(), config(true));
    // Nothing is polled: no takeover has answered yet.
    publisher.begin_session(Some(replay()), Some("walrelay.7.walrelay".into()));
    assert_eq!(
        broker.transactional_ids(),
        SESSION_IDS.map(String::from),
        "all three asked for at once, before any answered"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_transaction_is_aborted_and_sent_again_whole_and_in_order() {
    let broker = MemoryBroker::default();
    let mut publisher = Publisher::new(broker.transactional_sink(), config(true));
    publisher.begin_session(Some(replay()), Some("walrelay.7.walrelay".into()));
    broker.pause();
    for n in 1..=4 {
        assert!(publisher.publish(event(n)).is_empty());
    }
    let _ = tokio::time::timeout(Duration::from_millis(10), publisher.next()).await;
    broker.fail_next(BrokerError::transient("Local: Message timed out"));
    broker.resume();
    let settled = settle(&mut publisher, Vec::new(), 4).await.unwrap();
    assert_eq!(settled, [1, 2, 3, 4]);
    assert_eq!(
        ids(&broker.log(TOPIC)),
        ["1", "2", "3", "4"].map(String::from),
        "the aborted transaction's records are invisible; its retry has them all, in order"
    );
    assert!(
        broker.log_uncommitted(TOPIC).len() > 4,
        "a first copy was aborted"
    );
}

#[tokio::test(start_paused = true)]
async fn an_authorization_failure_is_waited_out_and_nothing_is_dropped() {
    let broker = MemoryBroker::default();
    let mut publisher = Publisher::new(broker.sink(), config(false));
    broker.authorize(TOPIC, false);
    for n in 1..=3 {
        assert!(publisher.publish(event(n)).is_empty());
    }
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let outcomes = publisher.next().await.unwrap();
            assert!(
                outcomes.is_empty(),
                "settled while not authorized: {outcomes:?}"
            );
        }
    })
    .await;
    assert!(waited.is_err(), "still waiting after a minute");
    assert!(broker.sent() > 3, "sent again after pauses");
    broker.authorize(TOPIC, true);
    let settled = settle(&mut publisher, Vec::new(), 3).await.unwrap();
    assert_eq!(settled, [1, 2, 3]);
    assert_eq!(ids(&broker.log(TOPIC)), ["1", "2", "3"].map(String::from));
}

#[tokio::test(start_paused = true)]
async fn records_waiting_for_their_partition_are_not_overtaken() {
    let broker = MemoryBroker::default();
    broker.set_partitions(TOPIC, 1);
    let mut publisher = Publisher::new(broker.sink(), config(true));
    publisher.begin_session(Some(replay()), None);
    let mut outcomes = Vec::new();
    // The first record asks for the partition's scan; the rest wait for
    // it, and go in the order they came.
    for n in 1..=20 {
        outcomes.extend(publisher.publish(event(n)));
    }
    let settled = settle(&mut publisher, outcomes, 20).await.unwrap();
    assert_eq!(settled, (1..=20).collect::<Vec<_>>());
    assert_eq!(
        ids(&broker.log(TOPIC)),
        (1..=20).map(|n| n.to_string()).collect::<Vec<_>>()
    );
}

#[tokio::test(start_paused = true)]
async fn a_record_too_large_comes_back_refused_for_its_source_to_keep() {
    let broker = MemoryBroker::default();
    broker.refuse_records_over(50);
    let mut publisher = Publisher::new(broker.sink(), config(false));
    let mut big = event(1);
    big.record.value = Some(Bytes::from("x".repeat(100)));
    let mut outcomes = publisher.publish(big);
    while outcomes.is_empty() {
        outcomes = publisher.next().await.unwrap();
    }
    match &outcomes[0] {
        Outcome::Refused {
            tag: 1,
            kind: RefusalKind::TooLarge,
            record,
            dead_letter: false,
            ..
        } => assert_eq!(record.value.as_ref().unwrap().len(), 100, "whole"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_topic_that_gains_partitions_is_used_with_its_new_count_and_a_shrunk_one_stops() {
    let broker = MemoryBroker::default();
    broker.set_partitions(TOPIC, 2);
    let mut publisher = Publisher::new(broker.sink(), config(true));
    publisher.begin_session(Some(replay()), None);
    let outcomes = publisher.publish(event(1));
    settle(&mut publisher, outcomes, 1).await.unwrap();
    broker.set_partitions(TOPIC, 4);
    tokio::time::advance(topics::REFRESH).await;
    // The next record triggers the refresh and waits for it.
    let outcomes = publisher.publish(event(2));
    settle(&mut publisher, outcomes, 1).await.unwrap();
    let outcomes = publisher.publish(event(3));
    settle(&mut publisher, outcomes, 1).await.unwrap();
    broker.set_partitions(TOPIC, 1);
    tokio::time::advance(topics::REFRESH).await;
    let mut outcomes = publisher.publish(event(4));
    let error = loop {
        match publisher.next().await {
            Ok(more) => outcomes.extend(more),
            Err(error) => break error,
        }
    };
    assert!(
        matches!(
            error,
            PublishError::Topic(TopicError::Shrank {
                before: 4,
                now: 1,
                ..
            })
        ),
        "{error}"
    );
}
