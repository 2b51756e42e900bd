//! Transactions left open in a partition's log: read again until Kafka ends
//! them, or ended by an abort where nothing confirmed can be taken back.

use super::*;

#[tokio::test(start_paused = true)]
async fn a_hidden_tail_no_id_may_end_is_read_again_until_kafka_ends_it_and_nothing_is_doubled() {
    const OTHER: &str = "outbox.event.invoice";
    let broker = MemoryBroker::default();
    let mut publisher = Publisher::new(broker.transactional_sink(), config(true));
    publisher.begin_session(Some(replay()), Some("walrelay.7.walrelay".into()));
    // The id's last transaction before the outage wrote to OTHER too: an
    // abort there could take it back, so no cleanup is allowed.
    let first = publisher.publish(event_to(OTHER, 0));
    assert_eq!(settle(&mut publisher, first, 1).await.unwrap(), [0]);
    broker.take_offline(OTHER, 0);
    let mut outcomes = Vec::new();
    for n in 1..=4 {
        let topic = if n % 2 == 0 { OTHER } else { TOPIC };
        outcomes.extend(publisher.publish(event_to(topic, n)));
    }
    assert_eq!(settle(&mut publisher, outcomes, 2).await.unwrap(), [1, 3]);
    broker.bring_online(OTHER, 0);
    // The left-open transaction hides OTHER's tail: its records wait.
    let waited = tokio::time::timeout(Duration::from_secs(30), publisher.next()).await;
    assert!(
        waited.is_err(),
        "nothing settles while the tail is hidden: {waited:?}"
    );
    assert!(broker.is_left_open(OTHER, 0));
    assert_eq!(ids(&broker.log(OTHER)), ["0"].map(String::from));
    // The broker times the transaction out: the tail is read, and each
    // event goes once.
    broker.time_out_left_open(OTHER, 0);
    let rest = settle(&mut publisher, Vec::new(), 2).await.unwrap();
    assert_eq!(rest, [2, 4]);
    assert_eq!(ids(&broker.log(OTHER)), ["0", "2", "4"].map(String::from));
}

/// A session after a hanging transaction of `hanging` (events left open in
/// OTHER's partition by the relay's id, their marker never written) hands
/// over events 1-4 again, OTHER's and TOPIC's in turn, from event `from`
/// on; returns the settled tags, the broker and whether OTHER is still
/// hidden.
async fn replay_over_a_hanging_transaction(
    hanging: Vec<KafkaRecord>,
    from: u64,
) -> (Vec<u64>, MemoryBroker, bool) {
    const OTHER: &str = "outbox.event.invoice";
    let broker = MemoryBroker::default();
    let first = event_to(OTHER, 0).record;
    broker.append(0, first);
    broker.leave_open(OTHER, 0, "walrelay.7.walrelay", hanging);
    let mut publisher = Publisher::new(broker.transactional_sink(), config(true));
    publisher.begin_session(Some(replay()), Some("walrelay.7.walrelay".into()));
    let mut outcomes = Vec::new();
    for n in from..=4 {
        let topic = if n % 2 == 0 { OTHER } else { TOPIC };
        outcomes.extend(publisher.publish(event_to(topic, n)));
    }
    let expected = (from..=4).count();
    let settled = tokio::time::timeout(
        Duration::from_secs(30),
        settle(&mut publisher, outcomes, expected),
    )
    .await
    .ok()
    .map(|settled| settled.unwrap())
    .unwrap_or_default();
    let hidden = broker.is_left_open(OTHER, 0);
    (settled, broker, hidden)
}

#[tokio::test(start_paused = true)]
async fn a_hanging_transaction_that_hides_only_events_the_session_streams_again_is_ended_and_each_goes_once()
 {
    const OTHER: &str = "outbox.event.invoice";
    let hanging = vec![event_to(OTHER, 2).record];
    let (mut settled, broker, hidden) = replay_over_a_hanging_transaction(hanging, 1).await;
    settled.sort();
    assert_eq!(settled, [1, 2, 3, 4]);
    assert!(!hidden, "ended by a cleanup, not by a timeout");
    assert_eq!(ids(&broker.log(OTHER)), ["0", "2", "4"].map(String::from));
    assert_eq!(ids(&broker.log(TOPIC)), ["1", "3"].map(String::from));
}

#[tokio::test(start_paused = true)]
async fn a_hanging_transaction_is_not_aborted_where_it_may_hold_a_confirmed_event_or_another_producers()
 {
    const OTHER: &str = "outbox.event.invoice";
    // Event 2 was committed before the session's first event (3): it may
    // be confirmed, and an abort could take it back.
    let (settled, _, hidden) =
        replay_over_a_hanging_transaction(vec![event_to(OTHER, 2).record], 3).await;
    assert!(hidden, "left open");
    assert_eq!(settled, Vec::<u64>::new(), "OTHER's events wait meanwhile");
    // A record of another source: what became of it is not known.
    let mut foreign = event_to(OTHER, 2).record;
    foreign.headers.retain(|(name, _)| *name != ORIGIN_HEADER);
    foreign
        .headers
        .push((ORIGIN_HEADER.into(), Bytes::from("9/other/1")));
    let (_, _, hidden) = replay_over_a_hanging_transaction(vec![foreign], 1).await;
    assert!(hidden, "left open");
}
