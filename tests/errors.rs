//! Every failure says what happened, and a Kafka outage never holds
//! PostgreSQL hostage: connection errors of every command against a real
//! server, a fast shutdown with the broker paused or a backlog draining,
//! and a long broker outage under load.

mod support;

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use support::workload::commit_order;
use support::{BrokerChoice, PgCluster, PgOptions, Stack, StackOptions, free_port, wait_for};

/// Runs a walrelay command; returns its exit code and standard error.
fn walrelay(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_walrelay"))
        .args(args)
        .env("WALRELAY_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The arguments of each command that connects, for one URL.
fn commands(url: &str) -> Vec<Vec<String>> {
    let http = format!("127.0.0.1:{}", free_port());
    [
        vec!["setup", "--pg-url", url],
        vec!["check", "--pg-url", url],
        vec!["status", "--pg-url", url],
        vec!["tail", "--pg-url", url],
        vec![
            "run",
            "--pg-url",
            url,
            "--brokers",
            "127.0.0.1:9",
            "--http-addr",
            &http,
        ],
    ]
    .into_iter()
    .map(|args| args.into_iter().map(str::to_owned).collect())
    .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_command_names_the_server_the_cause_and_the_fix_when_it_cannot_connect() {
    // `nobody` may log in without a password, so the server itself says
    // the role does not exist (under md5 it would ask for a password).
    let pg = PgCluster::start_with(PgOptions {
        hba_first: vec![
            "host all nobody 127.0.0.1/32 trust".into(),
            "host replication nobody 127.0.0.1/32 trust".into(),
        ],
        ..Default::default()
    });
    let address = format!("127.0.0.1:{}", pg.port);
    let closed_port = free_port();
    let cases = [
        (
            format!(
                "postgres://nobody@127.0.0.1:{}/postgres?sslmode=disable",
                pg.port
            ),
            address.clone(),
            "role \"nobody\" does not exist",
            "the role in --pg-url does not exist",
        ),
        (
            format!(
                "postgres://postgres@127.0.0.1:{}/nosuchdb?sslmode=disable",
                pg.port
            ),
            address.clone(),
            "database \"nosuchdb\" does not exist",
            "check the database name in --pg-url",
        ),
        (
            format!("postgres://postgres@127.0.0.1:{closed_port}/postgres?sslmode=disable"),
            format!("127.0.0.1:{closed_port}"),
            "refused",
            "nothing accepts connections there",
        ),
    ];
    for (url, address, cause, fix) in &cases {
        for args in commands(url) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (code, stderr) = walrelay(&args);
            let command = args[0];
            assert_eq!(code, Some(1), "{command} {url}: {stderr}");
            assert!(
                stderr.contains(&format!("PostgreSQL at {address}")),
                "{command}: the address: {stderr}"
            );
            assert!(
                stderr.contains(cause),
                "{command}: the cause {cause:?}: {stderr}"
            );
            assert!(stderr.contains(fix), "{command}: the fix {fix:?}: {stderr}");
            assert!(!stderr.contains("db error"), "{command}: {stderr}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_slot_monitor_says_the_server_is_shutting_down_instead_of_db_error() {
    let stack = Stack::start("monitorlog").await;
    let mut relay = stack.relay(&[]);
    wait_for("the relay to stream", Duration::from_secs(20), async || {
        let (code, _) = relay.http_get("/readyz").await?;
        (code == 200).then_some(())
    })
    .await;
    stack.pg.stop("fast");
    wait_for(
        "the relay to say that PostgreSQL shut down",
        Duration::from_secs(30),
        async || {
            let log = relay.log();
            (log.contains("PostgreSQL is shutting down")
                || log.contains("the database system is shutting down"))
            .then_some(())
        },
    )
    .await;
    stack.pg.start_again();
    let log = relay.log();
    assert!(!log.contains("db error"), "{log}");
    assert!(relay.terminate(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_broker_paused_a_fast_shutdown_completes_and_nothing_is_lost() {
    let stack = Stack::start_with(
        "paused",
        StackOptions {
            broker: BrokerChoice::Pausable,
            twin: true,
            ..Default::default()
        },
    )
    .await;
    let relay = stack.relay(&["--standby-retry", "500ms"]);
    wait_for("the relay to stream", Duration::from_secs(20), async || {
        let (code, _) = relay.http_get("/readyz").await?;
        (code == 200).then_some(())
    })
    .await;
    // A second relay stands by: it must not hold the shutdown either.
    let standby = stack.relay(&["--standby-retry", "500ms"]);
    wait_for(
        "the second relay to stand by",
        Duration::from_secs(20),
        async || {
            let (_, body) = standby.http_get("/readyz").await?;
            body.contains("\"role\":\"standby\"").then_some(())
        },
    )
    .await;
    stack.insert_events("held", 100).await;
    assert_eq!(
        stack
            .broker
            .consume(&stack.topic("held"), 100, Duration::from_secs(30))
            .len(),
        100
    );
    stack.broker.pause();
    stack.insert_events("held", 100).await;
    let waiting_commit = commit_order(&stack.pg, &stack.db, "twin", 200).await[100].2;
    wait_for(
        "the events to wait for the paused broker",
        Duration::from_secs(30),
        async || (relay.metric("walrelay_events_in_flight").await? > 0.0).then_some(()),
    )
    .await;
    assert!(stack.confirmed().await < waiting_commit);

    let stopping = Instant::now();
    stack.pg.stop("fast");
    let took = stopping.elapsed();
    eprintln!("pg_ctl stop -m fast with the broker paused: {took:?}");
    assert!(
        took < Duration::from_secs(20),
        "the shutdown took {took:?}; relay log:\n{}",
        relay.log()
    );
    assert!(
        relay.log().contains("letting go of the slot"),
        "{}",
        relay.log()
    );

    stack.pg.start_again();
    let client = stack.pg.client(&stack.db).await;
    assert!(
        support::workload::confirmed(&client, "walrelay").await < waiting_commit,
        "nothing unacknowledged was confirmed"
    );
    stack.broker.resume();
    wait_for(
        "the relay to confirm the waiting events",
        Duration::from_secs(60),
        async || {
            (support::workload::confirmed(&client, "walrelay").await >= waiting_commit)
                .then_some(())
        },
    )
    .await;
    let truth = commit_order(&stack.pg, &stack.db, "twin", 200).await;
    let records = stack.broker.consume_all(&stack.topic("held"));
    let ids: HashSet<&str> = records.iter().map(|r| r.header("id").unwrap()).collect();
    for (id, _, end) in &truth {
        assert!(ids.contains(id.as_str()), "event {id} ({end}) lost");
    }
    drop(standby);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_backlog_drain_does_not_hold_a_fast_shutdown() {
    let stack = Stack::start_with(
        "draining",
        StackOptions {
            twin: true,
            ..Default::default()
        },
    )
    .await;
    // A backlog that a deliberately slow relay drains in minutes.
    for _ in 0..40 {
        stack.insert_events("drain", 1000).await;
    }
    let mut slow = stack.relay(&["--max-in-flight-events", "20", "-X", "linger.ms=100"]);
    wait_for("the drain to start", Duration::from_secs(30), async || {
        let (_, body) = slow.http_get("/api/status").await?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (v["events_published"].as_u64()? > 100).then_some(())
    })
    .await;
    let stopping = Instant::now();
    stack.pg.stop("fast");
    let took = stopping.elapsed();
    eprintln!("pg_ctl stop -m fast while draining: {took:?}");
    assert!(
        took < Duration::from_secs(15),
        "the shutdown waited for the drain ({took:?}); relay log:\n{}",
        slow.log()
    );
    assert!(
        slow.log().contains("PostgreSQL is shutting down"),
        "{}",
        slow.log()
    );
    stack.pg.start_again();
    // A relay at full speed finishes the drain: nothing was lost.
    slow.kill9().await;
    let fast = stack.relay(&[]);
    let truth = commit_order(&stack.pg, &stack.db, "twin", 40_000).await;
    let client = stack.pg.client(&stack.db).await;
    wait_for(
        "the drain to finish",
        Duration::from_secs(120),
        async || {
            (support::workload::confirmed(&client, "walrelay").await >= truth.last().unwrap().2)
                .then_some(())
        },
    )
    .await;
    let records = stack.broker.consume_all(&stack.topic("drain"));
    let ids: HashSet<&str> = records.iter().map(|r| r.header("id").unwrap()).collect();
    assert_eq!(ids.len(), 40_000, "{}", fast.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sixty_second_broker_outage_under_load_releases_the_slot_and_takes_it_back_losing_nothing()
 {
    let (stack, link) = Stack::start_behind_proxy(
        "outage",
        StackOptions {
            twin: true,
            ..Default::default()
        },
    )
    .await;
    let relay = stack.relay(&["--max-backoff", "2s"]);
    let writer_client = stack.pg.client(&stack.db).await;
    let stop_writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = std::sync::Arc::clone(&stop_writing);
    let writer = tokio::spawn(async move {
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            writer_client
                .execute(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                     SELECT 'outage', 'k' || (g % 10), 'E', jsonb_build_object('g', g) FROM generate_series(1, 10) g",
                    &[],
                )
                .await
                .unwrap();
            n += 10;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        n
    });
    wait_for(
        "the relay to publish",
        Duration::from_secs(30),
        async || (relay.metric("walrelay_events_published_total").await? > 0.0).then_some(()),
    )
    .await;
    link.cut();
    let outage = Instant::now();
    let reason = wait_for(
        "the relay to let go of the slot",
        Duration::from_secs(30),
        async || {
            let (_, body) = relay.http_get("/api/status").await?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let inactive: bool = stack
                .client
                .query_one(
                    "SELECT NOT active FROM pg_replication_slots WHERE slot_name = 'walrelay'",
                    &[],
                )
                .await
                .ok()?
                .get(0);
            (inactive && v["waiting_for_broker"] == true).then(|| v["reason"].to_string())
        },
    )
    .await;
    assert!(reason.contains("waiting for the broker"), "{reason}");
    let (code, readyz) = relay.http_get("/readyz").await.unwrap();
    assert_eq!(code, 503);
    assert!(readyz.contains("waiting for the broker"), "{readyz}");
    let (_, metrics) = relay.http_get("/metrics").await.unwrap();
    assert!(
        metrics.contains("walrelay_waiting_for_broker 1"),
        "{metrics}"
    );
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{}/", relay.http_port);
    let dom = support::chromium(profile.path(), &url, &["--dump-dom"]);
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        support::visible_text(&dom).contains("waiting for the broker: the slot is released"),
        "the dashboard shows the reason: {dom}"
    );
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(outage.elapsed())).await;
    link.restore();
    wait_for(
        "the relay to stream again",
        Duration::from_secs(60),
        async || {
            let (code, _) = relay.http_get("/readyz").await?;
            (code == 200).then_some(())
        },
    )
    .await;
    stop_writing.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.await.unwrap();
    let truth = commit_order(&stack.pg, &stack.db, "twin", written).await;
    stack
        .wait_confirmed(truth.last().unwrap().2, Duration::from_secs(60))
        .await;
    let records = stack.broker.consume_all(&stack.topic("outage"));
    let ids: HashSet<&str> = records.iter().map(|r| r.header("id").unwrap()).collect();
    for (id, _, end) in &truth {
        assert!(
            ids.contains(id.as_str()),
            "event {id} ({end}) lost; relay log:\n{}",
            relay.log()
        );
    }
    let (_, metrics) = relay.http_get("/metrics").await.unwrap();
    assert!(
        metrics.contains("walrelay_waiting_for_broker 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("walrelay_slot_releases_total{reason=\"broker\"}"),
        "{metrics}"
    );
}

/// Producer options that would let a record time out and land after later
/// records of its key, put a key in another partition, let a client create
/// a topic with the broker's defaults, or weaken exactly once, are refused
/// before anything starts: exit 2, the option named, and what to do
/// instead.
#[test]
fn producer_options_that_would_weaken_order_or_exactly_once_exit_2_naming_the_fix() {
    for (option, says) in [
        ("retries=3", "leave retries unset"),
        ("message.timeout.ms=3000", "message.timeout.ms"),
        ("delivery.timeout.ms=3000", "delivery.timeout.ms"),
        ("max.in.flight.requests.per.connection=10", "use 1 to 5"),
        ("transactional.id=mine", "transactional.id"),
        // Keys land where Java's partitioner (murmur2) puts them.
        ("partitioner=random", "murmur2"),
        ("topic.partitioner=consistent", "exactly once"),
        // A metadata request must not make a topic with the broker's
        // defaults before walrelay creates it as asked.
        ("allow.auto.create.topics=true", "--topic-partitions"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_walrelay"))
            .args([
                "run",
                "--pg-url",
                "postgres://postgres@127.0.0.1:1/db",
                "--brokers",
                "127.0.0.1:1",
                "-X",
                option,
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "-X {option}: {stderr}");
        assert!(
            stderr.contains(&format!("-X {}", option.split('=').next().unwrap()))
                && stderr.contains(says),
            "-X {option}: {stderr}"
        );
    }
    // The inbox's consumer never makes the topics it subscribes to either.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walrelay"))
        .args([
            "inbox",
            "--pg-url",
            "postgres://postgres@127.0.0.1:1/db",
            "--brokers",
            "127.0.0.1:1",
            "--topic",
            "orders",
            "-X",
            "allow.auto.create.topics=true",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("-X allow.auto.create.topics=true: "),
        "{stderr}"
    );
}
