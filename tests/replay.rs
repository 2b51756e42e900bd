//! `walrelay backfill` and `walrelay recover` against a real PostgreSQL and
//! a real broker: a time range backfilled to topics of its own, killed
//! midway and run again; a slot invalidated by `max_slot_wal_keep_size`
//! during a broker outage, recovered from the table; and the same with the
//! rows deleted, where recover names the gap and stops.
//!
//! Every count is what a `read_committed` reader (what exactly once
//! promises) gets; what a `read_uncommitted` reader gets is printed beside.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use support::kafka::Record;
use support::relay::RelayProcess;
use support::workload::current_lsn;
use support::{BrokerChoice, PgOptions, Stack, StackOptions, wait_for};

/// `walrelay <command>` against the stack, its topics in the test's
/// namespace.
fn command(stack: &Stack, name: &str, args: &[&str]) -> RelayProcess {
    let args = stack.topics.relay_args(args);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    RelayProcess::start_command(name, &stack.url(), &stack.broker.bootstrap(), &args)
}

/// Events of the recovery test written while the broker is away
/// (`WALRELAY_TEST_RECOVER_EVENTS`, default 20,000).
fn outage_events() -> i32 {
    std::env::var("WALRELAY_TEST_RECOVER_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

/// Each record's `id` header, counted.
fn id_counts(records: &[Record]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for r in records {
        *counts
            .entry(r.header("id").expect("an id header").to_owned())
            .or_insert(0) += 1;
    }
    counts
}

async fn table_ids(stack: &Stack, filter: &str) -> HashSet<String> {
    stack
        .client
        .query(&format!("SELECT id::text FROM outbox WHERE {filter}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backfill_of_a_time_range_killed_midway_and_run_again_sends_each_event_once_in_key_order()
{
    let stack = Stack::start("backfillkill").await;
    // 30,000 rows one second apart; the range takes the middle 20,000.
    stack
        .client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at)
             SELECT 'order', 'k' || (g % 50), 'E', jsonb_build_object('g', g),
                    timestamptz '2026-01-01 00:00:00+00' + g * interval '1 second'
             FROM generate_series(0, 29999) g",
        )
        .await
        .unwrap();
    let since = "2026-01-01T01:23:20Z"; // g = 5000
    let until = "2026-01-01T06:56:40Z"; // g = 25000
    let args = [
        "--topic-template",
        "backfill.{aggregate_type}",
        "--since",
        since,
        "--until",
        until,
        "--name",
        "range",
        "--page-size",
        "500",
    ];
    let mut first = command(&stack, "backfill", &args);
    wait_for(
        "the backfill to send 3000 events",
        Duration::from_secs(120),
        async || {
            let row = stack
                .client
                .query_opt(
                    "SELECT sent FROM walrelay_backfill WHERE name = 'range/public.outbox'",
                    &[],
                )
                .await
                .ok()??;
            (row.get::<_, i64>(0) >= 3000).then_some(())
        },
    )
    .await;
    let progress = first
        .metric("walrelay_replay_events_total")
        .await
        .expect("the progress metric");
    assert!(
        progress >= 3000.0,
        "walrelay_replay_events_total {progress}"
    );
    first.kill9().await;
    let (sent, done): (i64, bool) = {
        let row = stack
            .client
            .query_one(
                "SELECT sent, done FROM walrelay_backfill WHERE name = 'range/public.outbox'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(
        !done,
        "the backfill finished before it was killed ({sent} sent): the test needs more rows"
    );
    eprintln!("killed after {sent} events were written down as sent");

    let mut second = command(&stack, "backfill", &args);
    let status = second.wait(Duration::from_secs(300)).await;
    assert!(
        status.success(),
        "the resumed backfill failed:\n{}",
        second.log()
    );

    let topic = stack.topics.named("backfill.order");
    let records = stack.broker.consume_all(&topic);
    let counts = id_counts(&records);
    let wanted = table_ids(
        &stack,
        &format!("created_at >= '{since}' AND created_at < '{until}'"),
    )
    .await;
    assert_eq!(wanted.len(), 20_000);
    let doubled: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        doubled.is_empty(),
        "{} events arrived more than once",
        doubled.len()
    );
    let got: HashSet<String> = counts.keys().cloned().collect();
    assert_eq!(
        got.len(),
        wanted.len(),
        "events missing: {}",
        wanted.difference(&got).count()
    );
    assert_eq!(got, wanted);
    // Per key, the events arrive in the order they were written.
    let mut last: HashMap<Vec<u8>, i64> = HashMap::new();
    let mut partitions: HashMap<Vec<u8>, i32> = HashMap::new();
    for r in &records {
        let key = r.key.clone().expect("a key");
        let value: serde_json::Value = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        let g = value["g"].as_i64().unwrap();
        if let Some(before) = last.insert(key.clone(), g) {
            assert!(before < g, "key {key:?}: event {g} after {before}");
        }
        assert_eq!(*partitions.entry(key).or_insert(r.partition), r.partition);
    }
    // A second run of the same name has nothing to do.
    let mut third = command(&stack, "backfill", &args);
    assert!(third.wait(Duration::from_secs(120)).await.success());
    assert_eq!(stack.broker.consume_all(&topic).len(), 20_000);
    // The same name asking for other rows does not take the first one's
    // progress for its own.
    let mut other_args = args;
    other_args[3] = "2026-01-01T02:00:00Z";
    let mut other = command(&stack, "backfill", &other_args);
    let status = other.wait(Duration::from_secs(120)).await;
    assert_eq!(status.code(), Some(1), "{}", other.log());
    assert!(
        other.log().contains("give it a --name of its own"),
        "{}",
        other.log()
    );
    assert_eq!(stack.broker.consume_all(&topic).len(), 20_000);
    eprintln!(
        "read_committed: {} records; read_uncommitted: {}",
        records.len(),
        stack.broker.consume_all_uncommitted(&topic).len()
    );
}

/// A stack whose slot is invalidated as soon as it holds back more than a
/// little WAL, with a broker of its own to stop.
async fn small_slot_stack(name: &str) -> Stack {
    Stack::start_with(
        name,
        StackOptions {
            pg: PgOptions {
                // The point of these tests: a slot lost to
                // max_slot_wal_keep_size, made to happen in seconds.
                extra_conf: vec!["max_slot_wal_keep_size = '1MB'".into()],
                ..PgOptions::default()
            },
            broker: BrokerChoice::Private,
            ..StackOptions::default()
        },
    )
    .await
}

/// Streams 1,000 events, stops the broker, writes `n` more (in
/// transactions of 100), then switches WAL segments and checkpoints until
/// the slot is lost, and kills the relay. Returns the slot's last confirmed
/// LSN.
async fn lose_the_slot_during_an_outage(stack: &Stack, n: i32) -> String {
    let mut relay = command(stack, "run", &[]);
    stack.insert_events("order", 1000).await;
    let lsn = current_lsn(&stack.client).await;
    stack.wait_confirmed(lsn, Duration::from_secs(60)).await;
    // The relay records the slot's confirmed position with the inserts
    // counted by then (read at or before it), so that recover can say how
    // many events a lost slot took with it.
    wait_for(
        "walrelay to record the slot's insert count",
        Duration::from_secs(60),
        async || {
            let row = stack
                .client
                .query_opt(
                    "SELECT 1 FROM walrelay_slots WHERE slot_name = 'walrelay'
                       AND inserts_at_confirm IS NOT NULL AND confirmed_lsn >= $1::text::pg_lsn",
                    &[&lsn.to_string()],
                )
                .await
                .unwrap();
            row.map(|_| ())
        },
    )
    .await;
    stack.broker.stop();
    for _ in 0..n / 100 {
        stack.insert_events("order", 100).await;
    }
    stack
        .client
        .batch_execute("CREATE TABLE filler (x text)")
        .await
        .unwrap();
    wait_for(
        "the slot to be lost",
        Duration::from_secs(120),
        async || {
            stack
                .client
                .batch_execute(
                    "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 2000);
                 SELECT pg_switch_wal(); CHECKPOINT;",
                )
                .await
                .unwrap();
            let status: Option<String> = stack
                .client
                .query_one(
                    "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'walrelay'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (status.as_deref() == Some("lost")).then_some(())
        },
    )
    .await;
    relay.kill9().await;
    stack.broker.start_again();
    stack
        .client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'walrelay'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_lost_during_a_broker_outage_is_recovered_and_run_delivers_each_event_once() {
    let stack = small_slot_stack("recover").await;
    let n = outage_events();
    let confirmed = lose_the_slot_during_an_outage(&stack, n).await;
    eprintln!("slot lost after confirming {confirmed}");

    let mut recover = command(&stack, "recover", &[]);
    let status = recover.wait(Duration::from_secs(600)).await;
    assert!(status.success(), "recover failed:\n{}", recover.log());
    let status: String = stack
        .client
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'walrelay'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(status, "lost", "recover made the slot again");

    // After the recovery: the stream goes on from the new slot.
    let mut relay = command(&stack, "run", &[]);
    stack.insert_events("order", 500).await;
    let lsn = current_lsn(&stack.client).await;
    stack.wait_confirmed(lsn, Duration::from_secs(120)).await;
    relay.terminate(Duration::from_secs(60)).await;

    let topic = stack.topic("order");
    let records = stack.broker.consume_all(&topic);
    let counts = id_counts(&records);
    let wanted = table_ids(&stack, "true").await;
    assert_eq!(wanted.len(), 1000 + n as usize + 500);
    let doubled = counts.values().filter(|c| **c > 1).count();
    assert_eq!(doubled, 0, "{doubled} events arrived more than once");
    let got: HashSet<String> = counts.keys().cloned().collect();
    assert_eq!(wanted.difference(&got).count(), 0, "events never delivered");
    assert_eq!(got, wanted);
    eprintln!(
        "read_committed: {} records; read_uncommitted: {}",
        records.len(),
        stack.broker.consume_all_uncommitted(&topic).len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_slot_walrelay_streamed_from_is_recovered_from_its_record_and_each_event_arrives_once()
 {
    let stack = Stack::start("recoverdropped").await;
    let mut relay = command(&stack, "run", &[]);
    stack.insert_events("order", 300).await;
    let topic = stack.topic("order");
    assert_eq!(
        stack
            .broker
            .consume(&topic, 300, Duration::from_secs(60))
            .len(),
        300
    );
    relay.terminate(Duration::from_secs(60)).await;
    // Dropped by hand while the relay is away; events go on meanwhile.
    stack
        .client
        .batch_execute("SELECT pg_drop_replication_slot('walrelay')")
        .await
        .unwrap();
    stack.insert_events("order", 700).await;

    let mut recover = command(&stack, "recover", &[]);
    let status = recover.wait(Duration::from_secs(300)).await;
    assert!(status.success(), "recover failed:\n{}", recover.log());

    let mut relay = command(&stack, "run", &[]);
    stack.insert_events("order", 100).await;
    let lsn = current_lsn(&stack.client).await;
    stack.wait_confirmed(lsn, Duration::from_secs(120)).await;
    relay.terminate(Duration::from_secs(60)).await;

    let counts = id_counts(&stack.broker.consume_all(&topic));
    let wanted = table_ids(&stack, "true").await;
    assert_eq!(wanted.len(), 1100);
    assert_eq!(counts.values().filter(|c| **c > 1).count(), 0, "doubled");
    let got: HashSet<String> = counts.keys().cloned().collect();
    assert_eq!(got, wanted, "each event once, none missing");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_lost_with_its_rows_deleted_is_not_recovered_and_the_gap_is_named() {
    let stack = small_slot_stack("recovergone").await;
    let confirmed = lose_the_slot_during_an_outage(&stack, 2000).await;
    // As an application that deletes the row in the inserting transaction
    // (or a prune) leaves it.
    stack
        .client
        .batch_execute("DELETE FROM outbox")
        .await
        .unwrap();

    let mut recover = command(&stack, "recover", &[]);
    let status = recover.wait(Duration::from_secs(300)).await;
    assert_eq!(
        status.code(),
        Some(1),
        "recover must stop:\n{}",
        recover.log()
    );
    let log = recover.log();
    assert!(
        log.contains(&format!("after confirming {confirmed}"))
            && log.contains("cannot be accounted for"),
        "the error names the gap:\n{log}"
    );
    assert!(
        log.contains("--accept-loss"),
        "the error names the way on:\n{log}"
    );
    // How many: the 2,000 written after the last confirmation, counted from
    // PostgreSQL's statistics (an upper bound: they may lag the record).
    let count: i64 = log
        .split("at most ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the error counts the lost events:\n{log}"));
    assert!((2000..=3000).contains(&count), "{count}:\n{log}");
    // Nothing was changed: the lost slot is still there.
    let status: String = stack
        .client
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'walrelay'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "lost");

    // The operator accepts the loss: a new slot, and the stream goes on.
    let mut accept = command(&stack, "recover", &["--accept-loss"]);
    assert!(
        accept.wait(Duration::from_secs(300)).await.success(),
        "recover --accept-loss failed:\n{}",
        accept.log()
    );
    let status: String = stack
        .client
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'walrelay'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(status, "lost");
}

#[tokio::test(flavor = "multi_thread")]
async fn moving_off_a_polling_relay_with_a_first_slot_loses_nothing_and_doubles_nothing() {
    let stack = Stack::start("firstslot").await;
    // Before walrelay: no slot, and a polling relay that published the
    // older part of the table (here: a backfill to the usual topics, whose
    // records carry the rows' ids as any outbox relay's do).
    stack
        .client
        .batch_execute("SELECT pg_drop_replication_slot('walrelay')")
        .await
        .unwrap();
    stack.insert_events("order", 1000).await;
    stack
        .client
        .batch_execute(
            "UPDATE outbox SET created_at = created_at - interval '1 hour'
             WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT 400)",
        )
        .await
        .unwrap();
    let until: String = stack
        .client
        .query_one("SELECT (now() - interval '30 minutes')::text", &[])
        .await
        .unwrap()
        .get(0);
    let mut poller = command(&stack, "backfill", &["--until", &until, "--name", "poller"]);
    let status = poller.wait(Duration::from_secs(120)).await;
    assert!(status.success(), "{}", poller.log());
    let topic = stack.topic("order");
    assert_eq!(stack.broker.consume_all(&topic).len(), 400);

    // The polling relay stopped; walrelay takes over.
    let mut first = command(&stack, "recover", &["--first-slot"]);
    let status = first.wait(Duration::from_secs(120)).await;
    assert!(
        status.success(),
        "recover --first-slot failed:\n{}",
        first.log()
    );
    let mut relay = command(&stack, "run", &[]);
    stack.insert_events("order", 300).await;
    let lsn = current_lsn(&stack.client).await;
    stack.wait_confirmed(lsn, Duration::from_secs(120)).await;
    relay.terminate(Duration::from_secs(60)).await;

    let records = stack.broker.consume_all(&topic);
    let counts = id_counts(&records);
    assert_eq!(
        counts.values().filter(|c| **c > 1).count(),
        0,
        "events doubled"
    );
    let got: HashSet<String> = counts.keys().cloned().collect();
    assert_eq!(got, table_ids(&stack, "true").await);
    assert_eq!(records.len(), 1300);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recovery_killed_after_making_the_new_slot_is_finished_by_the_next_run() {
    let stack = small_slot_stack("recoverkill").await;
    lose_the_slot_during_an_outage(&stack, 5000).await;

    let mut recover = command(&stack, "recover", &[]);
    wait_for("the new slot", Duration::from_secs(120), async || {
        let status: Option<String> = stack
            .client
            .query_opt(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'walrelay'",
                &[],
            )
            .await
            .ok()??
            .get(0);
        (status.as_deref() != Some("lost")).then_some(())
    })
    .await;
    recover.kill9().await;
    let underway: bool = stack
        .client
        .query_one(
            "SELECT underway FROM walrelay_recover WHERE slot = 'walrelay'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(underway, "the recovery was killed before it finished");

    // `run` first would start past the rows recover had not sent yet: the
    // operator runs recover again, which finishes the job.
    let mut again = command(&stack, "recover", &[]);
    let status = again.wait(Duration::from_secs(300)).await;
    assert!(
        status.success(),
        "the second recover failed:\n{}",
        again.log()
    );
    let mut relay = command(&stack, "run", &[]);
    stack.insert_events("order", 200).await;
    let lsn = current_lsn(&stack.client).await;
    stack.wait_confirmed(lsn, Duration::from_secs(120)).await;
    relay.terminate(Duration::from_secs(60)).await;

    let records = stack.broker.consume_all(&stack.topic("order"));
    let counts = id_counts(&records);
    let got: HashSet<String> = counts.keys().cloned().collect();
    assert_eq!(got, table_ids(&stack, "true").await, "every event arrives");
    // Nothing was written while the recovery ran, so nothing is doubled.
    assert_eq!(counts.values().filter(|c| **c > 1).count(), 0);
}

#[test]
fn bad_flags_of_backfill_and_recover_stop_with_exit_code_2_naming_the_flag() {
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_walrelay"))
            .args(args)
            .args([
                "--pg-url",
                "postgres://u@127.0.0.1:1/db",
                "--brokers",
                "127.0.0.1:1",
            ])
            .output()
            .unwrap()
    };
    let out = run(&["backfill", "--name", "a/b"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--name"));
    let out = run(&["recover", "--first-slot", "--accept-loss"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--first-slot") && stderr.contains("--accept-loss"),
        "{stderr}"
    );
}
