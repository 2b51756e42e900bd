//! Broker failures as users of Apache Kafka meet them, in a three-node
//! KRaft cluster (`min.insync.replicas` 2) under load: the leader of the
//! partitions being written is killed, and a follower is paused until the
//! in-sync replicas fall below the minimum. The WAL source delivers every
//! event once, in per-key order; the polling source and the inbox lose
//! nothing.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::relay::RelayProcess;
use support::workload::{assert_exactly_once_in_order, commit_order, setup, steady_writer};
use support::{BrokerChoice, Stack, StackOptions, wait_for};

const TIMEOUT: Duration = Duration::from_secs(90);

async fn published(relay: &RelayProcess) -> Option<f64> {
    relay.metric("walrelay_events_published_total").await
}

/// Waits until `relay` has published `more` events after `from`.
async fn publishes(relay: &RelayProcess, what: &str, from: f64, more: f64) {
    wait_for(what, TIMEOUT, async || {
        (published(relay).await? >= from + more).then_some(())
    })
    .await;
}

/// Kills the node leading `topic`'s partition 0, and waits until other
/// nodes lead every partition it led. Returns the killed node.
fn kill_the_leader(stack: &Stack, topic: &str, partitions: i32) -> usize {
    let broker = &stack.broker;
    let leader = broker
        .leader(topic, 0)
        .expect("partition 0 has a leader before the kill");
    let led: Vec<i32> = (0..partitions)
        .filter(|p| broker.leader(topic, *p) == Some(leader))
        .collect();
    broker.kill_node(leader);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !led
        .iter()
        .all(|p| broker.leader(topic, *p).is_some_and(|l| l != leader))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no new leader for partitions {led:?} of {topic} after node {leader} died:\n{}",
            broker.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("killed node {leader}, the leader of partitions {led:?}; others lead them now");
    leader
}

/// Starts the killed node again and waits until it is back in sync.
fn bring_back(stack: &Stack, topic: &str) {
    stack.broker.start_again();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while stack
        .broker
        .partition(topic, 0)
        .is_none_or(|p| p.isr.len() < p.replicas.len())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the restarted node did not catch up: {:?}",
            stack.broker.partition(topic, 0)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_leader_of_the_partitions_being_written_loses_nothing_and_duplicates_nothing() {
    let stack = Stack::start_with(
        "leaderkill",
        StackOptions {
            broker: BrokerChoice::Cluster,
            twin: true,
            ..Default::default()
        },
    )
    .await;
    let topic = stack.topic("lead");
    stack.broker.create_topic(&topic, 3);
    let relay = stack.relay(&["--max-backoff", "1s"]);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = steady_writer(stack.url(), "lead", Arc::clone(&stop));
    publishes(&relay, "the relay to publish", 0.0, 200.0).await;

    kill_the_leader(&stack, &topic, 3);
    let at_kill = published(&relay).await.unwrap();
    publishes(
        &relay,
        "the relay to publish through the new leaders",
        at_kill,
        200.0,
    )
    .await;
    bring_back(&stack, &topic);
    let back = published(&relay).await.unwrap();
    publishes(&relay, "the relay to go on publishing", back, 100.0).await;
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();

    let truth = commit_order(&stack.pg, &stack.db, "twin", written).await;
    stack.wait_confirmed(truth.last().unwrap().2, TIMEOUT).await;
    assert_exactly_once_in_order(&truth, &stack.broker.consume_all(&topic));
    eprintln!("a leader killed under load: {written} events, each once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_follower_holds_every_event_until_it_returns_and_nothing_is_confirmed_past_them() {
    let stack = Stack::start_with(
        "followerpause",
        StackOptions {
            broker: BrokerChoice::Cluster,
            twin: true,
            ..Default::default()
        },
    )
    .await;
    // Two replicas, both needed in sync (min.insync.replicas 2): one
    // follower away, and the leader refuses acks=all writes
    // (NOT_ENOUGH_REPLICAS) until it is back.
    let topic = stack.topic("isr");
    stack.broker.create_topic_replicated(&topic, 1, 2);
    let relay = stack.relay(&[]);
    stack.insert_events("isr", 10).await;
    assert_eq!(
        stack.broker.consume(&topic, 10, TIMEOUT).len(),
        10,
        "{}",
        relay.log()
    );
    let before = stack.broker.partition(&topic, 0).unwrap();
    let leader = before.leader.unwrap();
    let follower = *before.replicas.iter().find(|r| **r != leader).unwrap();

    stack.broker.pause_node(follower);
    stack.insert_events("isr", 100).await;
    wait_for(
        "the in-sync replicas to shrink to the leader",
        TIMEOUT,
        async || {
            let now = stack.broker.partition(&topic, 0)?;
            (now.isr == [leader]).then_some(())
        },
    )
    .await;
    wait_for("the events to wait for the broker", TIMEOUT, async || {
        let waiting = relay.metric("walrelay_waiting_for_broker").await? == 1.0;
        (waiting || relay.metric("walrelay_events_in_flight").await? > 0.0).then_some(())
    })
    .await;
    let truth = commit_order(&stack.pg, &stack.db, "twin", 110).await;
    let waiting_commit = truth.last().unwrap().2;
    assert!(
        stack.confirmed().await < waiting_commit,
        "nothing the broker did not take is confirmed"
    );

    stack.broker.resume_node(follower);
    stack.wait_confirmed(waiting_commit, TIMEOUT).await;
    assert_exactly_once_in_order(&truth, &stack.broker.consume_all(&topic));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_polling_source_and_the_inbox_lose_nothing_when_the_leader_dies() {
    let stack = Stack::start_with(
        "pollleader",
        StackOptions {
            broker: BrokerChoice::Cluster,
            setup_args: vec!["--source", "poll"],
            twin: true,
            ..Default::default()
        },
    )
    .await;
    let topic = stack.topic("polled");
    stack.broker.create_topic(&topic, 3);
    let inbox_db = stack.pg.create_database("pollleaderinbox").await;
    let inbox_url = stack.pg.url(&inbox_db);
    setup(&inbox_url, &["--inbox"]);
    let inbox_client = stack.pg.client(&inbox_db).await;
    let stored = async || -> i64 {
        inbox_client
            .query_one("SELECT count(*) FROM inbox", &[])
            .await
            .unwrap()
            .get(0)
    };
    let relay = stack.relay(&[
        "--source",
        "poll",
        "--poll-interval",
        "100ms",
        "--max-backoff",
        "1s",
    ]);
    let inbox = stack.inbox(
        &inbox_url,
        &["--topic", &topic, "-X", "session.timeout.ms=6000"],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let writer = steady_writer(stack.url(), "polled", Arc::clone(&stop));
    wait_for("the inbox to store 200 events", TIMEOUT, async || {
        (stored().await >= 200).then_some(())
    })
    .await;

    kill_the_leader(&stack, &topic, 3);
    let at_kill = stored().await;
    wait_for(
        "the inbox to store 200 more through the new leaders",
        TIMEOUT,
        async || (stored().await >= at_kill + 200).then_some(()),
    )
    .await;
    bring_back(&stack, &topic);
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();

    let truth = commit_order(&stack.pg, &stack.db, "twin", written).await;
    let ids: HashSet<String> = truth.iter().map(|(id, _, _)| id.clone()).collect();
    wait_for("every row published and deleted", TIMEOUT, async || {
        let left: i64 = stack
            .client
            .query_one("SELECT count(*) FROM outbox", &[])
            .await
            .unwrap()
            .get(0);
        (left == 0).then_some(())
    })
    .await;
    let in_kafka: HashSet<String> = stack
        .broker
        .consume_all(&topic)
        .iter()
        .map(|r| r.header("id").unwrap().to_owned())
        .collect();
    assert_eq!(
        in_kafka,
        ids,
        "every polled row in Kafka; relay log:\n{}",
        relay.log()
    );
    wait_for("every event in the inbox", TIMEOUT, async || {
        (stored().await == written as i64).then_some(())
    })
    .await;
    let in_inbox: HashSet<String> = inbox_client
        .query("SELECT id FROM inbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        in_inbox,
        ids,
        "the inbox holds each event; log:\n{}",
        inbox.log()
    );
}

/// On a cluster set up as its operators are told to
/// (default.replication.factor 3, min.insync.replicas 2), the topics
/// walrelay creates get three replicas without being told; and `walrelay
/// check` names, with the fix, the topics walrelay writes that one broker's
/// loss could take confirmed events from: a single replica, or
/// min.insync.replicas 1. One cluster start serves both (a start is slow).
#[tokio::test(flavor = "multi_thread")]
async fn a_clusters_topics_get_its_replication_factor_and_check_names_the_weak_ones() {
    let stack = Stack::start_with(
        "replicas",
        StackOptions {
            broker: BrokerChoice::Cluster,
            ..Default::default()
        },
    )
    .await;
    let made = stack.topic("made");
    let dead_letters = stack.topics.dead_letters();
    let relay = stack.relay(&["--topic-partitions", "2"]);
    stack.insert_events("made", 10).await;
    assert_eq!(
        stack.broker.consume(&made, 10, TIMEOUT).len(),
        10,
        "{}",
        relay.log()
    );
    let replicas = |topic: &str| -> Option<Vec<usize>> {
        Some(
            stack
                .broker
                .layout(topic)?
                .iter()
                .map(|p| p.replicas.len())
                .collect(),
        )
    };
    assert_eq!(replicas(&made), Some(vec![3, 3]), "{}", relay.log());
    // The dead-letter topic is made at start, before any dead letter.
    wait_for("the dead-letter topic", TIMEOUT, async || {
        replicas(&dead_letters)
    })
    .await;
    assert_eq!(replicas(&dead_letters), Some(vec![3, 3]));
    let log = relay.log();
    assert!(
        log.lines().any(|l| l.contains("created topic")
            && l.contains(&format!("topic=\"{made}\""))
            && l.contains("partitions=2 replication_factor=3")),
        "{log}"
    );

    // Two topics of the template made by hand, each weak in one way.
    let single = stack.topic("single");
    stack.broker.create_topic_replicated(&single, 1, 1);
    let lax = stack.topic("lax");
    stack.broker.create_topic(&lax, 1);
    stack
        .broker
        .set_topic_config(&lax, "min.insync.replicas", "1");
    let bootstrap = stack.broker.bootstrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walrelay"))
        .args([
            "check",
            "--pg-url",
            &stack.url(),
            "--brokers",
            &bootstrap,
            "--topic-template",
            &stack.topic("{aggregate_type}"),
            "--dead-letter-topic",
            &dead_letters,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("walrelay check:\n{text}");
    assert_eq!(
        out.status.code(),
        Some(0),
        "warnings do not fail check:\n{text}"
    );
    let finding = |start: &str| -> (String, String) {
        let mut lines = text.lines();
        let what = lines
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line {start:?}:\n{text}"));
        let fix = lines.next().unwrap_or_default().trim();
        (what.to_owned(), fix.to_owned())
    };
    let (_, fix) = finding(&format!(
        "warn  topic {single} has replication factor 1 on a cluster of 3 brokers"
    ));
    assert!(
        fix.starts_with(&format!(
            "fix: reassign its partitions to 3 replicas each: kafka-reassign-partitions.sh --bootstrap-server {bootstrap}"
        )) && fix.ends_with(&format!("every partition of {single}")),
        "{fix}"
    );
    let (_, fix) = finding(&format!(
        "warn  topic {lax} has min.insync.replicas 1 (set on the topic)"
    ));
    assert_eq!(
        fix,
        format!(
            "fix: kafka-configs.sh --bootstrap-server {bootstrap} --alter --entity-type topics --entity-name {lax} --add-config min.insync.replicas=2"
        )
    );
    // The topics walrelay made are fine, and said to be.
    finding(&format!(
        "ok    topic {made}: 2 partition(s), replication factor 3, min.insync.replicas 2"
    ));
    finding(&format!(
        "ok    topic {dead_letters}: 2 partition(s), replication factor 3, min.insync.replicas 2"
    ));
    finding("ok    the brokers' default.replication.factor is 3");
}

/// A topic whose only replica's broker dies holds back only its own
/// events, under exactly once: every other topic's events keep reaching a
/// `read_committed` consumer, nothing is confirmed past the events that
/// wait, and once the broker is back each arrives once, in per-key order.
#[tokio::test(flavor = "multi_thread")]
async fn one_topics_only_broker_killed_holds_back_only_that_topics_events() {
    let stack = Stack::start_with(
        "offline",
        StackOptions {
            broker: BrokerChoice::Cluster,
            twin: true,
            ..Default::default()
        },
    )
    .await;
    // One replica: its broker's death leaves the partition without a
    // leader (unclean election is off, as shipped).
    let lone = stack.topic("lone");
    stack.broker.create_topic_replicated(&lone, 1, 1);
    let busy = stack.topic("busy");
    stack.broker.create_topic(&busy, 3);
    let relay = stack.relay(&["--max-backoff", "1s", "--max-in-flight-events", "20000"]);
    let stop = Arc::new(AtomicBool::new(false));
    let lone_writer = steady_writer(stack.url(), "lone", Arc::clone(&stop));
    let busy_writer = steady_writer(stack.url(), "busy", Arc::clone(&stop));
    let topic_published = |topic: &str| {
        let name = format!("walrelay_events_published_total{{topic=\"{topic}\"}}");
        let relay = &relay;
        async move { relay.metric(&name).await }
    };
    wait_for("both topics to be published", TIMEOUT, async || {
        (topic_published(&lone).await? >= 100.0 && topic_published(&busy).await? >= 100.0)
            .then_some(())
    })
    .await;

    let node = stack.broker.leader(&lone, 0).expect("a leader");
    stack.broker.kill_node(node);
    eprintln!("killed node {node}, the only replica of {lone}");
    // Whatever of the offline topic reaches Kafka was written before now.
    let lone_at_kill = stack.count_of("lone").await;
    wait_for(
        "the relay to hold the partition back",
        TIMEOUT,
        async || (relay.metric("walrelay_partitions_unavailable").await? == 1.0).then_some(()),
    )
    .await;
    // 300 events more than written so far reach a read_committed consumer
    // of the other topic.
    let busy_streams_on = async || {
        let busy_written = stack.count_of("busy").await;
        let seen = stack
            .broker
            .consume(&busy, busy_written + 300, TIMEOUT)
            .len();
        assert!(seen >= busy_written + 300, "{seen}");
    };
    // Events written after the partition went offline reach a
    // read_committed consumer of the other topic: the relay streams on.
    // Transactions commit in order, so once these are readable the one
    // that may have been committing at the kill (its records appended
    // before it) has ended too.
    busy_streams_on().await;
    let lone_then = topic_published(&lone).await.unwrap();
    assert!(
        lone_then <= lone_at_kill as f64,
        "{lone_then} events of the offline topic published, {lone_at_kill} written before it went"
    );
    busy_streams_on().await;
    assert_eq!(
        topic_published(&lone).await,
        Some(lone_then),
        "nothing of the offline topic is delivered while it has no leader"
    );
    let status = relay.http_get("/api/status").await.unwrap().1;
    assert!(
        status.contains(&lone),
        "the held partition is shown: {status}"
    );

    stop.store(true, Ordering::Relaxed);
    let written = lone_writer.await.unwrap() + busy_writer.await.unwrap();
    let truth = commit_order(&stack.pg, &stack.db, "twin", written).await;
    let lone_ids: HashSet<String> = stack
        .client
        .query(
            "SELECT id::text FROM outbox WHERE aggregate_type = 'lone'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (lone_truth, busy_truth): (Vec<_>, Vec<_>) = truth
        .iter()
        .cloned()
        .partition(|(id, _, _)| lone_ids.contains(id));
    let last_lone = lone_truth.last().unwrap().2;
    assert!(
        stack.confirmed().await < last_lone,
        "nothing is confirmed past the events that wait"
    );

    stack.broker.start_again();
    stack.wait_confirmed(truth.last().unwrap().2, TIMEOUT).await;
    assert_exactly_once_in_order(&busy_truth, &stack.broker.consume_all(&busy));
    assert_exactly_once_in_order(&lone_truth, &stack.broker.consume_all(&lone));
    eprintln!(
        "{} events of the offline topic and {} of the other, each once",
        lone_truth.len(),
        busy_truth.len()
    );
}
