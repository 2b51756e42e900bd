//! Partitions with no leader: only their own records wait.

use super::*;

#[tokio::test(start_paused = true)]
async fn a_partition_offline_before_its_tail_is_read_is_shown_held_and_the_rest_goes_on() {
    const OTHER: &str = "outbox.event.invoice";
    let broker = MemoryBroker::default();
    let mut publisher = Publisher::new(broker.transactional_sink(), config(true));
    // A restart while OTHER's only replica is down: exactly once must read
    // its tail before sending, and cannot.
    publisher.begin_session(Some(replay()), Some("walrelay.7.walrelay".into()));
    broker.take_offline(OTHER, 0);
    let mut outcomes = Vec::new();
    for n in 1..=6 {
        let topic = if n % 2 == 0 { OTHER } else { TOPIC };
        outcomes.extend(publisher.publish(event_to(topic, n)));
    }
    assert_eq!(
        settle(&mut publisher, outcomes, 3).await.unwrap(),
        [1, 3, 5]
    );
    assert!(publisher.held_partitions().is_empty(), "not before STALL");
    let held = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let held = publisher.held_partitions();
            if !held.is_empty() {
                return held;
            }
            tokio::select! {
                outcomes = publisher.next() => panic!("nothing settles: {outcomes:?}"),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    })
    .await
    .expect("the partition whose tail cannot be read is shown held");
    assert_eq!(held.len(), 1);
    assert_eq!((held[0].topic.as_str(), held[0].partition), (OTHER, 0));
    assert!(broker.log(OTHER).is_empty());
    // The partition is back: its tail is read and its records go, once.
    broker.bring_online(OTHER, 0);
    let rest = settle(&mut publisher, Vec::new(), 3).await.unwrap();
    assert_eq!(rest, [2, 4, 6]);
    assert_eq!(ids(&broker.log(OTHER)), ["2", "4", "6"].map(String::from));
    assert!(publisher.held_partitions().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_partition_without_a_leader_holds_back_only_its_own_records() {
    const OTHER: &str = "outbox.event.invoice";
    let broker = MemoryBroker::default();
    let mut publisher = Publisher::new(broker.transactional_sink(), config(true));
    publisher.begin_session(Some(replay()), Some("walrelay.7.walrelay".into()));
    // Both partitions' tails are read and written to first; the id's last
    // transaction before the outage is the online topic's.
    let first = publisher.publish(event_to(OTHER, 0));
    assert_eq!(settle(&mut publisher, first, 1).await.unwrap(), [0]);
    let second = publisher.publish(event_to(TOPIC, 20));
    assert_eq!(settle(&mut publisher, second, 1).await.unwrap(), [20]);
    // The broker holding the only replica of OTHER's partition is gone.
    broker.take_offline(OTHER, 0);
    let mut outcomes = Vec::new();
    for n in 1..=10 {
        let topic = if n % 2 == 0 { OTHER } else { TOPIC };
        outcomes.extend(publisher.publish(event_to(topic, n)));
    }
    let mut delivered = Vec::new();
    let started = tokio::time::Instant::now();
    while delivered.len() < 5 {
        for outcome in outcomes.drain(..) {
            match outcome {
                Outcome::Delivered { tag, .. } => delivered.push(tag),
                other => panic!("unexpected {other:?}"),
            }
        }
        if delivered.len() < 5 {
            outcomes = tokio::time::timeout(Duration::from_secs(60), publisher.next())
                .await
                .expect("the other topic's records are delivered while the partition is offline")
                .unwrap();
        }
    }
    assert_eq!(delivered, [1, 3, 5, 7, 9], "only the online partition's");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        ids(&broker.log(TOPIC)),
        ["20", "1", "3", "5", "7", "9"].map(String::from)
    );
    assert_eq!(ids(&broker.log(OTHER)), ["0"].map(String::from));
    let held = publisher.held_partitions();
    assert_eq!(held.len(), 1);
    assert_eq!((held[0].topic.as_str(), held[0].partition), (OTHER, 0));
    assert!(
        broker.is_blocked("walrelay.7.walrelay"),
        "the first id's transaction touched the offline partition"
    );
    // New records of the online topic keep flowing under the spare id.
    outcomes = publisher.publish(event_to(TOPIC, 11));
    let more = settle(&mut publisher, outcomes, 1).await.unwrap();
    assert_eq!(more, [11]);
    assert_eq!(
        publisher.in_flight(),
        5,
        "the offline partition's records wait"
    );
    // The partition is back: its records go, each once, in order.
    broker.bring_online(OTHER, 0);
    let rest = settle(&mut publisher, Vec::new(), 5).await.unwrap();
    assert_eq!(rest, [2, 4, 6, 8, 10]);
    assert_eq!(
        ids(&broker.log(OTHER)),
        ["0", "2", "4", "6", "8", "10"].map(String::from)
    );
    assert!(
        !broker.is_left_open(OTHER, 0),
        "the transaction left open while it had no leader was ended by a cleanup"
    );
    let uncommitted = broker.log_uncommitted(OTHER);
    assert_eq!(
        uncommitted
            .iter()
            .filter(|r| r.header(CLEANUP_HEADER).is_some())
            .count(),
        1,
        "the id whose transaction there was aborted ended it with one cleanup record; the spare, which never wrote there, did not"
    );
    assert_eq!(uncommitted.len(), 7, "six events and one cleanup record");
    assert!(publisher.held_partitions().is_empty());
    assert_eq!(
        broker.transactional_ids(),
        SESSION_IDS.map(String::from),
        "a session takes over three ids"
    );
}
