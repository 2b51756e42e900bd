//! Retention (`run --retain`) against real PostgreSQL and Apache Kafka:
//! it deletes only rows whose event the slot has confirmed, through relay
//! crashes and broker outages, and every event still arrives once.
//!
//! The rows are written with a created_at an hour in the past, so a
//! retention of one second makes every row old enough at once: what keeps
//! a row is then only whether its event is confirmed.

mod support;

use std::collections::HashSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::workload::{assert_exactly_once_in_order, commit_order};
use support::{BrokerChoice, Stack, StackOptions};
use walrelay::lsn::Lsn;

/// Relay flags that make pruning eager: rows kept one second, small
/// batches, a pass every 200 ms.
const PRUNE_NOW: &[&str] = &[
    "--retain",
    "1s",
    "--retain-batch-size",
    "100",
    "--retain-interval",
    "200ms",
    "--max-backoff",
    "1s",
];

async fn stack(name: &str, broker: BrokerChoice) -> Stack {
    Stack::start_with(
        name,
        StackOptions {
            broker,
            twin: true,
            setup_args: vec!["--retain", "24h"],
            ..Default::default()
        },
    )
    .await
}

/// Inserts `n` events of `aggregate_type` created an hour ago, in one
/// transaction.
async fn insert_old(client: &tokio_postgres::Client, aggregate_type: &str, n: i32) {
    client
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at)
             SELECT $1::text, 'k' || (g % 10), 'E', jsonb_build_object('g', g), now() - interval '1 hour'
             FROM generate_series(1, $2::int) g",
            &[&aggregate_type, &n],
        )
        .await
        .unwrap();
}

async fn rows(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap()
        .get(0)
}

/// The ids still in the outbox table.
async fn ids(client: &tokio_postgres::Client) -> HashSet<String> {
    client
        .query("SELECT id::text FROM outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Every outbox insert committed so far, as (id, commit end LSN), from the
/// test_decoding slot `twin` (PostgreSQL's own decoding, not walrelay's).
async fn committed(client: &tokio_postgres::Client) -> Vec<(String, Lsn)> {
    let rows = client
        .query(
            "SELECT lsn::text, data FROM pg_logical_slot_peek_changes('twin', NULL, NULL)",
            &[],
        )
        .await
        .unwrap();
    let mut pending = Vec::new();
    let mut out = Vec::new();
    for row in rows {
        let data: String = row.get(1);
        if data.starts_with("table public.outbox: INSERT: ") {
            let columns = support::workload::parse_test_decoding_insert(&data);
            let id = columns.into_iter().find(|(n, _)| n == "id").unwrap().1;
            pending.push(id.unwrap());
        } else if data.starts_with("COMMIT") {
            let end: Lsn = row.get::<_, String>(0).parse().unwrap();
            out.extend(pending.drain(..).map(|id| (id, end)));
        }
    }
    out
}

/// The invariant: every committed row that is gone from the table was
/// committed at or below `confirmed`. Returns how many are gone.
async fn assert_only_confirmed_rows_gone(client: &tokio_postgres::Client, confirmed: Lsn) -> usize {
    // Read the truth before the table: a row committed in between is in
    // the table, never taken for deleted.
    let truth = committed(client).await;
    let left = ids(client).await;
    let mut gone = 0;
    for (id, end) in &truth {
        if !left.contains(id) {
            gone += 1;
            assert!(
                *end <= confirmed,
                "row {id} committed at {end} was deleted, but the slot confirmed only {confirmed}"
            );
        }
    }
    gone
}

/// Waits for `what`, writing a CHECKPOINT each second: the slot's
/// catalog_xmin (which retention's bound is) moves at xl_running_xacts
/// records, and a checkpoint writes one at once rather than within 15 s.
async fn wait_pruned<T>(stack: &Stack, what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let mut tries = 0;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        tries += 1;
        assert!(tries < 180, "timed out waiting for {what}");
        stack.client.batch_execute("CHECKPOINT").await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_outage_during_pruning_deletes_no_unconfirmed_row_and_loses_no_event() {
    let stack = stack("retainbroker", BrokerChoice::Private).await;
    let client = &stack.client;
    let relay = stack.relay(PRUNE_NOW);

    // Confirmed rows go.
    insert_old(client, "kept", 200).await;
    wait_pruned(&stack, "the first rows to be pruned", async || {
        (rows(client).await == 0).then_some(())
    })
    .await;
    assert_eq!(
        relay.metric("walrelay_retention_deleted_total").await,
        Some(200.0)
    );

    // With the broker down nothing is confirmed, so nothing goes, however
    // many passes run and however old the rows are.
    stack.broker.stop();
    insert_old(client, "kept", 300).await;
    let outage_commit = committed(client).await.last().unwrap().1;
    let passes = relay
        .metric("walrelay_retention_passes_total")
        .await
        .unwrap();
    wait_pruned(&stack, "twenty passes with the broker down", async || {
        let now = relay.metric("walrelay_retention_passes_total").await?;
        (now >= passes + 20.0).then_some(())
    })
    .await;
    assert_eq!(rows(client).await, 300, "unconfirmed rows were deleted");
    let confirmed = stack.confirmed().await;
    assert!(
        confirmed < outage_commit,
        "the slot confirmed {confirmed}, past the events the broker never took (commit {outage_commit})"
    );
    assert_only_confirmed_rows_gone(client, stack.confirmed().await).await;
    let age = relay
        .metric("walrelay_retention_oldest_row_age_seconds")
        .await
        .unwrap();
    assert!(age >= 3600.0, "the oldest row's age is {age}");

    // The broker back: they are published, confirmed, and then pruned.
    stack.broker.start_again();
    wait_pruned(
        &stack,
        "the rows written during the outage to be pruned",
        async || (rows(client).await == 0).then_some(()),
    )
    .await;
    let truth = commit_order(&stack.pg, &stack.db, "twin", 500).await;
    stack
        .wait_confirmed(truth.last().unwrap().2, Duration::from_secs(60))
        .await;
    let records = stack.broker.consume_all(&stack.topic("kept"));
    assert_exactly_once_in_order(&truth, &records);
    drop(relay);
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_relay_while_it_prunes_deletes_only_confirmed_rows_and_every_event_arrives_once()
 {
    let stack = stack("retainkill", BrokerChoice::Shared).await;
    let client = &stack.client;
    let start = || stack.relay(PRUNE_NOW);
    let mut relay = start();
    // Four writers of old rows until the kills are done (so there is
    // always something to prune): 10 events a transaction, over 50
    // aggregates.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let url = stack.url();
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let mut t = 0;
                while !stop.load(Ordering::Relaxed) {
                    client
                        .execute(
                            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at)
                             SELECT 'pruned', 'agg-' || (($1::int * 7 + $2::int + g) % 50), 'E',
                                    jsonb_build_object('w', $1::int, 't', $2::int, 'g', g),
                                    now() - interval '1 hour'
                             FROM generate_series(1, 10) g",
                            &[&w, &t],
                        )
                        .await
                        .unwrap();
                    t += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    let mut gone_at_kills = Vec::new();
    for _ in 0..5 {
        // Kill only once this relay has pruned something, so each kill
        // lands while pruning runs.
        wait_pruned(&stack, "the relay to prune", async || {
            (relay.metric("walrelay_retention_deleted_total").await? > 0.0).then_some(())
        })
        .await;
        relay.kill9().await;
        // A dead relay confirms nothing more: every row gone must have
        // committed at or below what the slot confirmed.
        let confirmed = stack.confirmed().await;
        gone_at_kills.push(assert_only_confirmed_rows_gone(client, confirmed).await);
        relay = start();
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let written = committed(client).await.len();
    let truth = commit_order(&stack.pg, &stack.db, "twin", written).await;
    stack
        .wait_confirmed(truth.last().unwrap().2, Duration::from_secs(120))
        .await;
    assert_exactly_once_in_order(&truth, &stack.broker.consume_all(&stack.topic("pruned")));
    wait_pruned(&stack, "every row to be pruned", async || {
        (rows(client).await == 0).then_some(())
    })
    .await;
    eprintln!("{written} events; rows pruned by each of the 5 kills: {gone_at_kills:?}");
    assert!(relay.terminate(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn run_refuses_retain_without_its_index_and_setup_and_check_make_and_find_it() {
    let stack = Stack::start("retainindex").await;
    let mut relay = stack.relay(&["--retain", "24h"]);
    let status = relay.wait(Duration::from_secs(60)).await;
    let log = relay.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("--retain needs an index on public.outbox (created_at)")
            && log.contains("walrelay setup --retain 24h"),
        "{log}"
    );
    let check = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_walrelay"))
            .args(["check", "--pg-url", &stack.url()])
            .args(args)
            .output()
            .unwrap()
    };
    let out = check(&["--retain", "24h"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("public.outbox has no index on created_at"),
        "{text}"
    );
    let lines = support::workload::setup(&stack.url(), &["--retain", "24h"]);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("created index outbox_created_at_idx")),
        "{lines:?}"
    );
    let lines = support::workload::setup(&stack.url(), &["--retain", "24h"]);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("public.outbox has an index on created_at")),
        "{lines:?}"
    );
    let out = check(&["--retain", "24h"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ok    public.outbox has an index on created_at"),
        "{text}"
    );
}

#[test]
fn bad_retain_values_are_clear_errors() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_walrelay"))
            .args([
                "run",
                "--pg-url",
                "postgres://u@127.0.0.1:1/db",
                "--brokers",
                "127.0.0.1:1",
            ])
            .args(args)
            .output()
            .unwrap()
    };
    for (value, says) in [
        ("24", "has no unit"),
        ("0h", "a retention of zero"),
        ("1y", "unknown unit \"y\""),
        ("-3h", "is not a retention"),
        ("", "is not a retention"),
    ] {
        let out = run(&[&format!("--retain={value}")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{value}: {err}");
        assert!(
            err.contains("--retain") && err.contains(says) && err.contains("such as 24h or 7d"),
            "{value}: {err}"
        );
    }
    let out = run(&["--retain", "24h", "--source", "poll"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--retain works with --source wal"), "{err}");
    let out = run(&["--retain", "24h", "--retain-interval", "0s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--retain-interval must be greater than zero"),
        "{err}"
    );
}
