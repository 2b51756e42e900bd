//! Faults that really happen: a dropped slot, publication, login or table;
//! a broker paused past wal_sender_timeout; an idle outbox on a busy
//! database; a second relay taking over; network cuts; and a chaos run
//! that crashes the relay and the broker and restarts PostgreSQL.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rand::Rng;
use support::proxy::Proxy;
use support::relay::RelayProcess;
use support::workload::{commit_order, current_lsn, seeded_rng};
use support::{BrokerChoice, PgOptions, Stack, StackOptions, wait_for};
use walrelay::lsn::Lsn;

/// Waits until the relay exits, and returns its exit code and log.
async fn exit_of(relay: &mut RelayProcess) -> (Option<i32>, String) {
    let status = relay.wait(Duration::from_secs(60)).await;
    (status.code(), relay.log())
}

async fn walsender_pid(client: &tokio_postgres::Client) -> Option<i32> {
    client
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'walrelay' AND active",
            &[],
        )
        .await
        .unwrap()
        .map(|r| r.get::<_, i32>(0))
}

async fn terminate_walsender(client: &tokio_postgres::Client, slot: &str) {
    client
        .execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
            &[&slot],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_slot_ends_the_relay_with_its_fix() {
    let stack = Stack::start("noslot").await;
    let client = &stack.client;
    let mut relay = stack.relay(&["--max-backoff", "1s"]);
    wait_for("the relay to stream", Duration::from_secs(20), async || {
        let (code, _) = relay.http_get("/readyz").await?;
        (code == 200).then_some(())
    })
    .await;
    // Terminate the walsender and drop the slot before the relay is back.
    wait_for(
        "the slot to be dropped",
        Duration::from_secs(20),
        async || {
            terminate_walsender(client, "walrelay").await;
            client
                .batch_execute("SELECT pg_drop_replication_slot('walrelay')")
                .await
                .ok()
        },
    )
    .await;
    let (code, log) = exit_of(&mut relay).await;
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("replication slot \"walrelay\" does not exist"),
        "{log}"
    );
    assert!(log.contains("walrelay recover --slot walrelay"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_publication_ends_the_relay_with_its_fix() {
    let stack = Stack::start("nopub").await;
    let (client, broker) = (&stack.client, &stack.broker);
    let mut relay = stack.relay(&[]);
    stack.insert_events("before", 1).await;
    assert_eq!(
        broker
            .consume(&stack.topic("before"), 1, Duration::from_secs(30))
            .len(),
        1
    );
    client
        .batch_execute("DROP PUBLICATION walrelay")
        .await
        .unwrap();
    stack.insert_events("after", 1).await;
    let (code, log) = exit_of(&mut relay).await;
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("publication \"walrelay\" does not exist")
            || log.contains("publication \"walrelay\" was dropped"),
        "{log}"
    );
    assert!(log.contains("CREATE PUBLICATION"), "{log}");
    // The event written after the drop is still in the outbox table.
    assert_eq!(
        client
            .query("SELECT 1 FROM outbox", &[])
            .await
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_login_ends_the_relay_with_its_fix() {
    let stack = Stack::start("nologin").await;
    let (pg, db, client, broker) = (&stack.pg, &stack.db, &stack.client, &stack.broker);
    client
        .batch_execute("CREATE ROLE relay LOGIN REPLICATION PASSWORD 'relay pw'")
        .await
        .unwrap();
    let url = pg.url_as("relay", "relay%20pw", db);
    let mut relay = stack.relay_via(&url, &["--heartbeat-interval", "0"]);
    stack.insert_events("login", 1).await;
    assert_eq!(
        broker
            .consume(&stack.topic("login"), 1, Duration::from_secs(30))
            .len(),
        1,
        "{}",
        relay.log()
    );
    client
        .batch_execute("ALTER ROLE relay NOLOGIN")
        .await
        .unwrap();
    terminate_walsender(client, "walrelay").await;
    let (code, log) = exit_of(&mut relay).await;
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("role \"relay\" is not permitted to log in"),
        "{log}"
    );
    assert!(log.contains("ALTER ROLE <role> WITH LOGIN"), "{log}");
    assert!(
        !log.contains("relay pw"),
        "the password never appears in the log"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_outbox_table_ends_the_relay_with_its_fix() {
    let stack = Stack::start("notable").await;
    let (client, broker) = (&stack.client, &stack.broker);
    let mut relay = stack.relay(&[]);
    stack.insert_events("t", 3).await;
    assert_eq!(
        broker
            .consume(&stack.topic("t"), 3, Duration::from_secs(30))
            .len(),
        3
    );
    client.batch_execute("DROP TABLE outbox").await.unwrap();
    let (code, log) = exit_of(&mut relay).await;
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("outbox table public.outbox was dropped"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_paused_past_wal_sender_timeout_does_not_drop_the_replication_connection() {
    let stack = Stack::start_with(
        "backpressure",
        StackOptions {
            pg: PgOptions {
                wal_sender_timeout: "3s",
                ..Default::default()
            },
            broker: BrokerChoice::Pausable,
            ..Default::default()
        },
    )
    .await;
    let (pg, client, broker) = (&stack.pg, &stack.client, &stack.broker);
    // The window rule, not the stall rule (tested in tests/errors.rs).
    let relay = stack.relay(&[
        "--max-in-flight-events",
        "5",
        "--broker-stall-timeout",
        "60s",
    ]);
    stack.insert_events("bp", 1).await;
    assert_eq!(
        broker
            .consume(&stack.topic("bp"), 1, Duration::from_secs(30))
            .len(),
        1,
        "{}",
        relay.log()
    );
    let pid_before = walsender_pid(client).await.expect("streaming");

    broker.pause();
    stack.insert_events("bp", 200).await;
    wait_for("the window to fill", Duration::from_secs(30), async || {
        (relay.metric("walrelay_events_in_flight").await? == 5.0).then_some(())
    })
    .await;
    // Four times wal_sender_timeout with a full window: the time is the test.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let pid_during = walsender_pid(client).await;
    let (_, metrics) = relay.http_get("/metrics").await.unwrap();
    broker.resume();

    assert_eq!(
        pid_during,
        Some(pid_before),
        "the same walsender streams; relay log:\n{}",
        relay.log()
    );
    assert!(metrics.contains("walrelay_reconnects_total 0"), "{metrics}");
    assert!(
        metrics.contains("walrelay_events_in_flight 5"),
        "the window is full: {metrics}"
    );
    assert!(
        !pg.log()
            .contains("terminating walsender process due to replication timeout")
    );
    assert_eq!(
        broker
            .consume(&stack.topic("bp"), 201, Duration::from_secs(60))
            .len(),
        201
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_keep_the_slot_moving_while_the_outbox_is_idle_and_another_table_is_busy() {
    let stack = Stack::start("heartbeat").await;
    let (client, broker) = (&stack.client, &stack.broker);
    client
        .batch_execute("CREATE TABLE busy (id bigserial PRIMARY KEY, v text)")
        .await
        .unwrap();
    let relay = stack.relay(&["--heartbeat-interval", "500ms"]);
    wait_for("the relay to stream", Duration::from_secs(20), async || {
        let (code, _) = relay.http_get("/readyz").await?;
        (code == 200).then_some(())
    })
    .await;
    // About 40 MB of WAL into a table that is not an outbox.
    let started = current_lsn(client).await;
    for _ in 0..40 {
        client
            .batch_execute("INSERT INTO busy (v) SELECT repeat(md5(random()::text), 30) FROM generate_series(1, 1000)")
            .await
            .unwrap();
        // A checkpoint lets the restart point move as the slot confirms.
        client.batch_execute("CHECKPOINT").await.unwrap();
    }
    let end = current_lsn(client).await;
    assert!(end.bytes_since(started) > 30_000_000, "{started} .. {end}");
    let (lag, retained) = wait_for("the slot to follow the WAL", Duration::from_secs(30), async || {
        let row = client
            .query_one(
                "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, (pg_current_wal_lsn() - restart_lsn)::bigint
                 FROM pg_replication_slots WHERE slot_name = 'walrelay'",
                &[],
            )
            .await
            .ok()?;
        let (lag, retained): (i64, i64) = (row.get(0), row.get(1));
        (lag < 100_000 && retained < 8_000_000).then_some((lag, retained))
    })
    .await;
    eprintln!(
        "after {} bytes of other WAL: lag {lag} B, retained {retained} B",
        end.bytes_since(started)
    );
    let (_, metrics) = relay.http_get("/metrics").await.unwrap();
    let latency: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("walrelay_heartbeat_latency_seconds "))
        .expect("heartbeat latency exported")
        .parse()
        .unwrap();
    assert!(
        latency > 0.0 && latency < 5.0,
        "heartbeat latency {latency}"
    );
    // Heartbeats are never published.
    assert_eq!(broker.consume_all(&stack.topics.dead_letters()).len(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_relay_takes_over_when_the_active_one_dies_and_nothing_is_lost() {
    let stack = Stack::start_with(
        "failover",
        StackOptions {
            twin: true,
            ..Default::default()
        },
    )
    .await;
    let mut a = stack.relay(&["--standby-retry", "500ms"]);
    let role = |r: &RelayProcess| {
        let port = r.http_port;
        async move {
            let (code, body) = support::relay::http_get(port, "/readyz").await?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            Some((code, v["role"].as_str()?.to_owned()))
        }
    };
    wait_for(
        "relay A to be active",
        Duration::from_secs(20),
        async || (role(&a).await? == (200, "active".into())).then_some(()),
    )
    .await;
    let b = stack.relay(&["--standby-retry", "500ms"]);
    wait_for("relay B to stand by", Duration::from_secs(20), async || {
        (role(&b).await? == (503, "standby".into())).then_some(())
    })
    .await;

    let writer_client = stack.pg.client(&stack.db).await;
    let writer = tokio::spawn(async move {
        for i in 0..100 {
            writer_client
                .execute(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                     SELECT 'ha', 'k' || (g % 10), 'E', jsonb_build_object('g', g) FROM generate_series(1, 20) g",
                    &[],
                )
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(if i < 50 { 20 } else { 10 })).await;
        }
    });
    let mut rng = seeded_rng("standby_takeover");
    tokio::time::sleep(Duration::from_millis(rng.random_range(500..1100))).await;
    a.kill9().await;
    let killed = Instant::now();
    wait_for(
        "relay B to take over",
        Duration::from_secs(15),
        async || (role(&b).await? == (200, "active".into())).then_some(()),
    )
    .await;
    let takeover = killed.elapsed();
    writer.await.unwrap();
    let truth = commit_order(&stack.pg, &stack.db, "twin", 2000).await;
    stack
        .wait_confirmed(truth.last().unwrap().2, Duration::from_secs(60))
        .await;
    let records = stack.broker.consume_all(&stack.topic("ha"));
    let ids: HashSet<&str> = records.iter().map(|r| r.header("id").unwrap()).collect();
    for (id, _, end) in &truth {
        assert!(
            ids.contains(id.as_str()),
            "event {id} (commit {end}) lost in the takeover; B log:\n{}",
            b.log()
        );
    }
    eprintln!(
        "takeover in {takeover:?}; {} records for 2000 events",
        records.len()
    );
    assert!(takeover < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread")]
async fn cut_connections_to_postgres_and_the_broker_heal_by_themselves_without_loss() {
    let (stack, kafka_proxy) = Stack::start_behind_proxy(
        "netcut",
        StackOptions {
            twin: true,
            ..Default::default()
        },
    )
    .await;
    let broker = &stack.broker;
    let pg_proxy = Proxy::start(stack.pg.port).await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/{}?sslmode=disable",
        pg_proxy.port, stack.db
    );
    let relay = stack.relay_via(&url, &["--max-backoff", "2s"]);
    let topic = stack.topic("net");
    stack.insert_events("net", 100).await;
    assert_eq!(
        broker.consume(&topic, 100, Duration::from_secs(30)).len(),
        100
    );

    // Cut PostgreSQL: the replication connection drops; events written meanwhile wait.
    pg_proxy.cut();
    wait_for(
        "the relay to notice the cut",
        Duration::from_secs(30),
        async || (relay.metric("walrelay_replication_connected").await? == 0.0).then_some(()),
    )
    .await;
    stack.insert_events("net", 100).await;
    pg_proxy.restore();
    assert_eq!(
        broker.consume(&topic, 200, Duration::from_secs(60)).len(),
        200,
        "{}",
        relay.log()
    );

    // Cut the broker: deliveries wait, nothing is confirmed past them.
    kafka_proxy.cut();
    stack.insert_events("net", 100).await;
    wait_for(
        "events waiting for the cut-off broker",
        Duration::from_secs(30),
        async || (relay.metric("walrelay_events_in_flight").await? > 0.0).then_some(()),
    )
    .await;
    let truth = commit_order(&stack.pg, &stack.db, "twin", 300).await;
    let waiting_commit = truth.last().unwrap().2;
    assert!(
        stack.confirmed().await < waiting_commit,
        "nothing unacknowledged is confirmed"
    );
    kafka_proxy.restore();
    stack
        .wait_confirmed(waiting_commit, Duration::from_secs(60))
        .await;
    let records = broker.consume_all(&topic);
    let ids: HashSet<&str> = records.iter().map(|r| r.header("id").unwrap()).collect();
    for (id, _, _) in &truth {
        assert!(
            ids.contains(id.as_str()),
            "event {id} lost; relay log:\n{}",
            relay.log()
        );
    }
    let reconnects = relay.metric("walrelay_reconnects_total").await.unwrap();
    assert!(reconnects >= 1.0, "the cut was noticed");
    assert_eq!(
        relay.metric("walrelay_replication_connected").await,
        Some(1.0)
    );
}

/// A host that accepts connections and then answers nothing (a frozen
/// machine, a route that black-holes) holds the relay only for
/// `connect_timeout` at connect and `--replication-timeout` while streaming:
/// it then streams from the next host of `--pg-url`, and nothing is lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_that_freezes_is_passed_over_for_the_next_host_within_seconds() {
    let stack = Stack::start("frozen").await;
    // The server ends a walsender whose client went silent after 5 s
    // (default 60 s), so the slot the frozen route still holds comes free.
    for sql in [
        "ALTER SYSTEM SET wal_sender_timeout = '5s'",
        "SELECT pg_reload_conf()",
    ] {
        stack.client.batch_execute(sql).await.unwrap();
    }
    let frozen = Proxy::start(stack.pg.port).await;
    let direct = format!("127.0.0.1:{}", stack.pg.port);
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{}?sslmode=disable&connect_timeout=2&target_session_attrs=read-write",
        frozen.port, stack.pg.port, stack.db
    );
    let host_of = async |relay: &RelayProcess| -> Option<String> {
        let (_, body) = relay.http_get("/readyz").await?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["host"].as_str().map(str::to_owned)
    };

    // Frozen from the start: connecting to it is given up on.
    frozen.freeze();
    let relay = stack.relay_via(
        &url,
        &["--replication-timeout", "4s", "--max-backoff", "1s"],
    );
    let topic = stack.topic("frozen");
    stack.insert_events("frozen", 50).await;
    let started = Instant::now();
    wait_for(
        "the relay to stream from the second host",
        Duration::from_secs(30),
        async || (host_of(&relay).await? == direct).then_some(()),
    )
    .await;
    assert_eq!(
        stack
            .broker
            .consume(&topic, 50, Duration::from_secs(30))
            .len(),
        50,
        "{}",
        relay.log()
    );
    let first_wait = started.elapsed();
    assert!(
        relay.log().contains("no answer within 2s"),
        "the log names the host that did not answer: {}",
        relay.log()
    );
    drop(relay);

    // Frozen while streaming: the silence is noticed and the other host
    // takes over once the server lets go of the slot.
    frozen.thaw();
    let relay = stack.relay_via(
        &format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{}?sslmode=disable&connect_timeout=2&target_session_attrs=read-write",
            frozen.port, stack.pg.port, stack.db
        ),
        &["--replication-timeout", "4s", "--max-backoff", "1s"],
    );
    let via_proxy = format!("127.0.0.1:{}", frozen.port);
    wait_for(
        "the relay to stream through the first host",
        Duration::from_secs(30),
        async || (host_of(&relay).await? == via_proxy).then_some(()),
    )
    .await;
    frozen.freeze();
    let froze = Instant::now();
    stack.insert_events("frozen", 50).await;
    wait_for(
        "the relay to stream from the second host again",
        Duration::from_secs(60),
        async || (host_of(&relay).await? == direct).then_some(()),
    )
    .await;
    let records = stack.broker.consume(&topic, 100, Duration::from_secs(30));
    let ids: HashSet<&str> = records.iter().map(|r| r.header("id").unwrap()).collect();
    assert_eq!(ids.len(), 100, "{}", relay.log());
    eprintln!(
        "streaming from the next host: {:.1} s after start with the first frozen, {:.1} s after it froze mid-stream",
        first_wait.as_secs_f64(),
        froze.elapsed().as_secs_f64()
    );
}

/// A relay log's warnings and errors.
fn warnings(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Chaos: a steady writer while the relay is SIGKILLed at random moments,
/// the broker is SIGKILLed and started again three times, and PostgreSQL
/// restarts once: every event arrives exactly once, in per-key order. CI
/// runs a short variant; `just chaos` sets WALRELAY_CHAOS_EVENTS=100000
/// and WALRELAY_CHAOS_KILLS=20.
#[tokio::test(flavor = "multi_thread")]
async fn chaos_kills_and_restarts_deliver_every_event_exactly_once_in_per_key_order() {
    let events: i32 = std::env::var("WALRELAY_CHAOS_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let kills: usize = std::env::var("WALRELAY_CHAOS_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let broker_restarts = 3;
    let stack = Stack::start_with(
        "chaos",
        StackOptions {
            broker: BrokerChoice::Private,
            twin: true,
            ..Default::default()
        },
    )
    .await;
    let (pg, db, broker) = (&stack.pg, &stack.db, &stack.broker);
    let start = || stack.relay(&["--max-backoff", "1s", "--topic-partitions", "3"]);
    let mut relay = start();
    let mut rng = seeded_rng("chaos");

    // The writer: 10 events per transaction at a steady rate, reconnecting
    // across the PostgreSQL restart, until every event is committed.
    let writer_url = pg.url(db);
    let per_txn = 10;
    let writer = tokio::spawn(async move {
        let mut committed = 0;
        let mut client: Option<tokio_postgres::Client> = None;
        while committed < events {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                match tokio_postgres::connect(&writer_url, tokio_postgres::NoTls).await {
                    Ok((c, conn)) => {
                        tokio::spawn(conn);
                        client = Some(c);
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
            let c = client.as_ref().unwrap();
            let batch = committed / per_txn;
            let result = c
                .execute(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                     SELECT 'chaos', 'agg-' || ((g + $1::int) % 50), 'E', jsonb_build_object('batch', $1::int, 'g', g)
                     FROM generate_series(1, $2::int) g",
                    &[&batch, &per_txn],
                )
                .await;
            match result {
                Ok(_) => committed += per_txn,
                // The restart may or may not have committed it: the twin slot tells.
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });

    let mut confirmed_at_kill: Vec<Lsn> = Vec::new();
    // What happened when, and what each killed relay warned about, for the
    // message of a failure.
    let began = Instant::now();
    let mut history: Vec<String> = Vec::new();
    let faults = kills + broker_restarts + 1;
    for step in 0..faults {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1000))).await;
        let at = began.elapsed().as_secs_f64();
        if step == faults / 2 {
            pg.restart();
            history.push(format!("{at:.1} s: PostgreSQL restarted"));
        } else if step % 3 == 1 && step / 3 < broker_restarts {
            // A crash under load: Kafka had written every record it
            // acknowledged, so the restarted broker has them all.
            let in_flight = relay.metric("walrelay_events_in_flight").await;
            broker.kill9();
            broker.start_again();
            history.push(format!(
                "{at:.1} s: broker killed with {in_flight:?} events in flight, back after {:.1} s",
                began.elapsed().as_secs_f64() - at
            ));
        } else {
            relay.kill9().await;
            let client = pg.client(db).await;
            let confirmed = support::workload::confirmed(&client, "walrelay").await;
            confirmed_at_kill.push(confirmed);
            history.push(format!(
                "{at:.1} s: relay killed at confirmed {confirmed}; its warnings:\n{}",
                warnings(&relay.log())
            ));
            relay = start();
        }
    }
    writer.await.unwrap();
    // The stack's own client died with the restart; count on a new one.
    let client = pg.client(db).await;
    let committed: i64 = client
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    let truth = commit_order(pg, db, "twin", committed as usize).await;
    let last = truth.last().unwrap().2;
    wait_for(
        "the relay to confirm the last commit",
        Duration::from_secs(180),
        async || (support::workload::confirmed(&client, "walrelay").await >= last).then_some(()),
    )
    .await;
    let records = broker.consume_all(&stack.topic("chaos"));

    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut first_order: HashMap<String, Vec<String>> = HashMap::new();
    for r in &records {
        let id = r.header("id").unwrap().to_owned();
        let n = seen.entry(id.clone()).or_default();
        *n += 1;
        if *n == 1 {
            let key = String::from_utf8(r.key.clone().unwrap()).unwrap();
            first_order.entry(key).or_default().push(id);
        }
    }
    let missing: Vec<_> = truth
        .iter()
        .filter(|(id, _, _)| !seen.contains_key(id))
        .collect();
    if !missing.is_empty() {
        let mut partitions: HashMap<i32, (usize, i64, i64)> = HashMap::new();
        for r in &records {
            let e = partitions.entry(r.partition).or_insert((0, i64::MAX, 0));
            e.0 += 1;
            e.1 = e.1.min(r.offset);
            e.2 = e.2.max(r.offset);
        }
        eprintln!(
            "{} of {} events missing, first {:?}, last {:?}; partitions (count, first offset, last offset): {partitions:?}; kills confirmed at {confirmed_at_kill:?}",
            missing.len(),
            truth.len(),
            missing.first(),
            missing.last()
        );
    }
    let mut commit_by_key: HashMap<String, Vec<String>> = HashMap::new();
    for (id, key, end) in &truth {
        assert!(
            seen.contains_key(id),
            "event {id} (commit {end}) lost; relay log:\n{}",
            relay.log()
        );
        commit_by_key
            .entry(key.clone())
            .or_default()
            .push(id.clone());
    }
    for (key, ids) in &commit_by_key {
        assert_eq!(&first_order[key], ids, "per-key order of {key}");
    }
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "chaos: {} events, {kills} relay kills, {broker_restarts} broker kills, 1 PostgreSQL restart: {} records, {duplicates} duplicates",
        truth.len(),
        records.len()
    );
    // Exactly once (the default): no event twice, whatever happened.
    let twice: Vec<_> = truth
        .iter()
        .filter(|(id, _, _)| seen[id] > 1)
        .take(5)
        .map(|(id, key, end)| {
            let copies: Vec<(i32, i64)> = records
                .iter()
                .filter(|r| r.header("id") == Some(id.as_str()))
                .map(|r| (r.partition, r.offset))
                .collect();
            format!("{id} of {key} (commit {end}) at (partition, offset) {copies:?}")
        })
        .collect();
    assert_eq!(
        duplicates,
        0,
        "duplicates, first {twice:#?}; what happened:\n{}\nthe last relay's warnings:\n{}",
        history.join("\n"),
        warnings(&relay.log())
    );
}
