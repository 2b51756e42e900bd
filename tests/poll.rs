//! `walrelay run --source poll` against a real PostgreSQL and a real
//! broker: setup and check, the record contract next to the WAL source's,
//! per-aggregate order with concurrent writers and two relays (one killed),
//! the late-committing lower sequence, a rule that keeps published rows,
//! and rows that keep failing.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rand::Rng;
use support::kafka::{Broker, Record};
use support::proxy::Proxy;
use support::relay::RelayProcess;
use support::workload::{commit_order, seeded_rng, setup};
use support::{PgCluster, Stack, StackOptions, wait_for};

const POLL: &[&str] = &["--source", "poll"];

fn walrelay(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_walrelay"))
        .args(args)
        .output()
        .unwrap()
}

/// A stack whose outbox is set up for polling (`setup --source poll`).
async fn poll_stack(name: &str) -> Stack {
    Stack::start_with(
        name,
        StackOptions {
            setup_args: POLL.to_vec(),
            ..Default::default()
        },
    )
    .await
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn setup_for_polling_is_idempotent_numbers_existing_rows_and_check_sees_every_piece() {
    let pg = PgCluster::start();
    let db = pg.create_database("pollsetup").await;
    let url = pg.url(&db);
    // An outbox made for the WAL source, with rows, becomes pollable; the
    // rows are numbered in the order they were created.
    setup(&url, &[]);
    let client = pg.client(&db).await;
    client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, created_at) VALUES
               ('o', 'a', 'third', now()),
               ('o', 'a', 'first', now() - interval '2 minutes'),
               ('o', 'a', 'second', now() - interval '1 minute')",
        )
        .await
        .unwrap();
    let mut first = setup(&url, POLL);
    // A random source id names these rows' records apart from any other
    // database's: the origin header of every record.
    let source_line = first.remove(first.len() - 2);
    let source_id = source_line
        .strip_prefix("public.outbox's records carry source id ")
        .unwrap_or_else(|| panic!("{source_line}"))
        .to_owned();
    assert_eq!(source_id.len(), 36, "a UUID: {source_id}");
    assert_eq!(
        first,
        [
            "table public.outbox exists",
            "added columns seq, attempts, last_error, next_attempt_at, published_at to public.outbox",
            "created trigger(s) walrelay_order, walrelay_notify on public.outbox",
            "numbered 3 existing rows of public.outbox",
            "created index outbox_walrelay_pending on public.outbox (rows not yet published, by seq)",
            "created index outbox_walrelay_aggregate on public.outbox (rows not yet published, by aggregate and seq)",
            "created table public.outbox_walrelay_in_flight (rows a relay may have sent, for exactly once)",
            "dead-letter table public.walrelay_dead_letters exists",
        ]
    );
    let order: Vec<String> = client
        .query("SELECT event_type FROM outbox ORDER BY seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(order, ["first", "second", "third"]);
    let second = setup(&url, POLL);
    assert_eq!(
        second,
        [
            "table public.outbox exists",
            "public.outbox has the polling columns",
            "public.outbox has the ordering and notify triggers",
            "dead-letter table public.walrelay_dead_letters exists",
        ]
    );
    let comment: String = client
        .query_one(
            "SELECT obj_description('outbox_walrelay_in_flight'::regclass, 'pg_class')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(comment, format!("walrelay source {source_id}"), "kept");
    // New rows are numbered after the old ones.
    client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type) VALUES ('o', 'a', 'fourth')",
        )
        .await
        .unwrap();
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox WHERE seq > (SELECT max(seq) FROM outbox WHERE event_type = 'third')").await,
        1
    );

    let check = walrelay(&["check", "--pg-url", &url, "--source", "poll"]);
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{report}");
    assert!(
        report.contains("ok    public.outbox is set up for polling"),
        "{report}"
    );
    assert!(
        !report.contains("wal_level"),
        "no replication checks: {report}"
    );

    client
        .batch_execute("DROP TRIGGER walrelay_notify ON outbox")
        .await
        .unwrap();
    let check = walrelay(&["check", "--pg-url", &url, "--source", "poll"]);
    let report = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{report}");
    assert!(
        report
            .contains("FAIL  public.outbox is not set up for polling: no trigger walrelay_notify")
            && report.contains("fix: walrelay setup --source poll"),
        "{report}"
    );
    // run refuses it with the same fix, before publishing anything.
    let broker = Broker::shared();
    let mut relay = RelayProcess::start(&url, &broker.bootstrap(), POLL);
    let status = relay.wait(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1), "{}", relay.log());
    assert!(
        relay.log().contains("is not set up for polling (it has no trigger walrelay_notify): run `walrelay setup --source poll`"),
        "{}",
        relay.log()
    );
}

/// The record the contract (docs/configuration.md, "The Kafka record") says a row
/// becomes, built from the row as PostgreSQL prints it, without walrelay's
/// router: the oracle both sources are held against.
struct Expected {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
}

async fn expected_records(client: &tokio_postgres::Client) -> HashMap<String, Expected> {
    client.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    let rows = client
        .query(
            "SELECT id::text, aggregate_id, event_type, payload::text, headers::text,
                    replace(replace(created_at::text, ' ', 'T'), '+00', 'Z')
             FROM outbox",
            &[],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            let id: String = r.get(0);
            let event_type: String = r.get(2);
            let user: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(&r.get::<_, String>(4)).unwrap();
            let mut user: Vec<(String, Vec<u8>)> = user
                .into_iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k, v.as_bytes().to_vec())))
                .collect();
            user.sort();
            let mut headers = vec![
                ("id".to_owned(), id.clone().into_bytes()),
                ("event_type".to_owned(), event_type.clone().into_bytes()),
            ];
            headers.extend(user);
            for (name, value) in [
                ("ce_specversion", "1.0".to_owned()),
                ("ce_id", id.clone()),
                ("ce_type", event_type),
                ("ce_source", "/walrelay/public/outbox".to_owned()),
                ("ce_time", r.get(5)),
                ("content-type", "application/json".to_owned()),
            ] {
                headers.push((name.to_owned(), value.into_bytes()));
            }
            let expected = Expected {
                key: Some(r.get::<_, String>(1).into_bytes()),
                value: r.get::<_, Option<String>>(3).map(String::into_bytes),
                headers,
            };
            (id, expected)
        })
        .collect()
}

/// `record` is the contract's record for its row: key, value and headers
/// byte for byte, then the exactly-once headers (position and origin,
/// which begins with `origin_id`).
fn assert_contract(
    record: &Record,
    expected: &HashMap<String, Expected>,
    source: &str,
    origin_id: &str,
) {
    let id = record.header("id").unwrap();
    let want = &expected[id];
    assert_eq!(record.key, want.key, "{source}: key of {id}");
    assert_eq!(record.value, want.value, "{source}: value of {id}");
    let (own, exactly_once): (Vec<_>, Vec<_>) = record
        .headers
        .iter()
        .cloned()
        .partition(|(k, _)| !k.starts_with("walrelay_"));
    assert_eq!(own, want.headers, "{source}: headers of {id}");
    let names: Vec<&str> = exactly_once.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        ["walrelay_position", "walrelay_origin"],
        "{source}: {id}"
    );
    assert!(
        record
            .header("walrelay_position")
            .unwrap()
            .parse::<walrelay::publish::Position>()
            .is_ok(),
        "{source}: a position that parses"
    );
    let origin = record.header("walrelay_origin").unwrap();
    assert!(
        origin.starts_with(&format!("{origin_id}/")),
        "{source}: origin {origin} names {origin_id}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn polled_records_and_the_wal_sources_are_both_the_contracts_record_byte_for_byte() {
    let stack = Stack::start("pollcontract").await;
    setup(&stack.url(), POLL);
    stack
        .client
        .batch_execute(
            r#"INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers, created_at) VALUES
                 ('order', 'o-1', 'Placed', '{"total": 42, "lines": [1, 2]}', '{"trace": "t-1"}', '2026-11-25 10:00:00.123456+00'),
                 ('order', 'o-1', 'Paid', '{"ünïcödé": "✓"}', '{}', now()),
                 ('order', 'o-2', 'Tombstone', NULL, '{"a": "b", "c": "d", "n": 1}', now());
               INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                 SELECT 'bulk', 'b-' || (g % 7), 'E', jsonb_build_object('g', g, 'pad', repeat('x', g))
                 FROM generate_series(1, 200) g;"#,
        )
        .await
        .unwrap();
    let expected = expected_records(&stack.client).await;
    // The WAL source's records name the cluster; the polling source's the
    // id setup gave the table.
    let system_id: i64 = stack
        .client
        .query_one("SELECT system_identifier FROM pg_control_system()", &[])
        .await
        .unwrap()
        .get(0);
    let source_id: String = stack
        .client
        .query_one(
            "SELECT substr(obj_description('outbox_walrelay_in_flight'::regclass, 'pg_class'), 17)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let mut wal = stack.relay(&["--topic-template", "wal.{aggregate_type}"]);
    let mut poll = stack.relay(&[
        "--source",
        "poll",
        "--topic-template",
        "poll.{aggregate_type}",
        "--on-published",
        "mark",
    ]);
    for (kind, n) in [("order", 3), ("bulk", 200)] {
        let system_id = system_id.to_string();
        for (source, relay, origin_id) in [
            ("wal", &wal, system_id.as_str()),
            ("poll", &poll, source_id.as_str()),
        ] {
            let records = stack.broker.consume(
                &stack.topics.named(&format!("{source}.{kind}")),
                n,
                Duration::from_secs(60),
            );
            assert_eq!(records.len(), n, "{}", relay.log());
            for record in &records {
                assert_contract(record, &expected, source, origin_id);
            }
        }
    }
    // Marked, not deleted: every row is there, published.
    assert_eq!(
        count(
            &stack.client,
            "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL AND attempts = 1"
        )
        .await,
        203
    );
    assert!(wal.terminate(Duration::from_secs(30)).await.success());
    assert!(poll.terminate(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lower_sequence_that_commits_later_is_not_overtaken_and_other_aggregates_flow_meanwhile()
{
    let stack = poll_stack("polltrap").await;
    let mut relay = stack.relay(&["--source", "poll", "--poll-interval", "100ms"]);
    let insert = |key: &str, event: &str| {
        format!(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type) VALUES ('trap', '{key}', '{event}')"
        )
    };
    // Writer A takes x's turn and its number, and does not commit yet.
    let mut a = stack.pg.client(&stack.db).await;
    let ta = a.transaction().await.unwrap();
    ta.batch_execute(&insert("x", "x1")).await.unwrap();
    // Writer B, same aggregate: waits at its insert for A's commit.
    let b_url = stack.url();
    let b_insert = insert("x", "x2");
    let b = tokio::spawn(async move {
        let (client, conn) = tokio_postgres::connect(&b_url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client.batch_execute(&b_insert).await.unwrap();
    });
    wait_for(
        "writer B to wait for writer A's aggregate lock",
        Duration::from_secs(10),
        async || {
            (count(
                &stack.client,
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'",
            )
            .await
                == 1)
                .then_some(())
        },
    )
    .await;
    // Another aggregate commits meanwhile, after A took its number, and is
    // published without waiting for x.
    stack
        .client
        .batch_execute(&insert("y", "y1"))
        .await
        .unwrap();
    let records = stack
        .broker
        .consume(&stack.topic("trap"), 1, Duration::from_secs(30));
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].header("event_type"), Some("y1"));
    // A commits, then B: x1 then x2, in that order, after y1.
    ta.commit().await.unwrap();
    b.await.unwrap();
    let records = stack
        .broker
        .consume(&stack.topic("trap"), 3, Duration::from_secs(30));
    let order: Vec<&str> = records
        .iter()
        .map(|r| r.header("event_type").unwrap())
        .collect();
    assert_eq!(order, ["y1", "x1", "x2"], "{}", relay.log());
    assert!(relay.terminate(Duration::from_secs(30)).await.success());
}

/// The relay's half of the ordering rule, without a second relay: a row
/// held by another transaction (as another relay holds its claim) stops its
/// aggregate, and only its aggregate.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_another_relay_holds_stops_its_aggregate_and_no_other() {
    let stack = poll_stack("pollheld").await;
    stack
        .client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type) VALUES
               ('held', 'x', 'x1'), ('held', 'x', 'x2'), ('held', 'y', 'y1')",
        )
        .await
        .unwrap();
    // Another "relay" holds x1, as a claim does until its commit.
    let mut other = stack.pg.client(&stack.db).await;
    let claim = other.transaction().await.unwrap();
    let held = claim
        .query(
            "SELECT seq FROM outbox WHERE event_type = 'x1' FOR UPDATE",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
    let mut relay = stack.relay(&["--source", "poll", "--poll-interval", "100ms"]);
    let records = stack
        .broker
        .consume(&stack.topic("held"), 1, Duration::from_secs(30));
    assert_eq!(records[0].header("event_type"), Some("y1"));
    // y2 comes after x2: the claim that publishes it looked at x2 too.
    stack
        .client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type) VALUES ('held', 'y', 'y2')",
        )
        .await
        .unwrap();
    let records = stack
        .broker
        .consume(&stack.topic("held"), 2, Duration::from_secs(30));
    let order: Vec<&str> = records
        .iter()
        .map(|r| r.header("event_type").unwrap())
        .collect();
    assert_eq!(order, ["y1", "y2"], "x2 waits for x1: {}", relay.log());
    // The other relay lets go without publishing: x1, then x2.
    claim.rollback().await.unwrap();
    let records = stack
        .broker
        .consume(&stack.topic("held"), 4, Duration::from_secs(30));
    let order: Vec<&str> = records
        .iter()
        .map(|r| r.header("event_type").unwrap())
        .collect();
    assert_eq!(order, ["y1", "y2", "x1", "x2"], "{}", relay.log());
    assert!(relay.terminate(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_writers_and_two_relays_one_killed_deliver_every_row_once_in_commit_order_per_key() {
    // The broker answers slowly (through a proxy that delays what clients
    // send), so a batch spends a while published and not yet committed.
    let (stack, broker_link) = Stack::start_behind_proxy(
        "pollorder",
        StackOptions {
            setup_args: vec!["--source", "poll"],
            twin: true,
            ..Default::default()
        },
    )
    .await;
    let topic = stack.topic("poll");
    stack.broker.create_topic(&topic, 4);
    broker_link.set_delay(Duration::from_millis(150));
    let relay_args = [
        "--source",
        "poll",
        "--poll-batch-size",
        "50",
        "--poll-interval",
        "200ms",
        // A cut connection is retried within a second, so a relay that was
        // cut keeps taking part.
        "--max-backoff",
        "1s",
    ];
    // Relay A reaches PostgreSQL through a proxy, so its batch can be
    // caught after the broker took it and before its commit.
    let proxy = Proxy::start(stack.pg.port).await;
    let a_url = format!(
        "postgres://postgres@127.0.0.1:{}/{}?sslmode=disable",
        proxy.port, stack.db
    );
    let mut a = stack.relay_via(&a_url, &relay_args);
    let mut b = stack.relay(&relay_args);
    let mut rng = seeded_rng("poll_two_relays");
    // 10 writers x 300 transactions of 1 to 5 events over 200 aggregates,
    // for about 30 seconds (time enough to catch relay A mid-batch on a
    // busy machine);
    // a transaction writes its aggregates in key order (the trigger locks
    // each aggregate until commit, so a consistent order avoids deadlocks).
    let writers: Vec<_> = (0..10)
        .map(|w| {
            let url = stack.url();
            let seed: u64 = rng.random();
            tokio::spawn(async move {
                let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let mut written = 0i64;
                for t in 0..300 {
                    tokio::time::sleep(Duration::from_millis(rng.random_range(50..150))).await;
                    let n: i32 = rng.random_range(1..=5);
                    let first: i32 = rng.random_range(0..200);
                    client
                        .execute(
                            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                             SELECT 'poll', 'agg-' || lpad(((($1::int + g) % 200))::text, 3, '0'), 'E',
                                    jsonb_build_object('w', $2::int, 't', $3::int, 'g', g)
                             FROM generate_series(1, $4::int) g
                             ORDER BY 2",
                            &[&first, &w, &t, &n],
                        )
                        .await
                        .unwrap();
                    written += n as i64;
                }
                written
            })
        })
        .collect();
    // Hold what A sends to PostgreSQL at a random moment. If A was
    // publishing a batch, its records reach Kafka while its commit never
    // reaches PostgreSQL: rows in Kafka and still in the table, in two
    // readings apart (B's own batches settle within milliseconds).
    let published_by_a = async || -> Option<u64> {
        let (_, body) = a.http_get("/api/status").await?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["events_published"].as_u64()
    };
    let mut in_doubt: HashSet<String> = HashSet::new();
    for _ in 0..20 {
        // Only while A is publishing.
        let before = published_by_a().await.unwrap_or(0);
        wait_for("relay A to publish", Duration::from_secs(30), async || {
            (published_by_a().await? > before).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
        proxy.hold_upstream();
        let published_and_there = async || -> HashSet<String> {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let in_kafka: HashSet<String> = stack
                .broker
                .consume_all(&topic)
                .iter()
                .map(|r| r.header("id").unwrap().to_owned())
                .collect();
            stack
                .client
                .query("SELECT id::text FROM outbox", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .filter(|id| in_kafka.contains(id))
                .collect()
        };
        let first = published_and_there().await;
        let second = published_and_there().await;
        in_doubt = first.intersection(&second).cloned().collect();
        if !in_doubt.is_empty() {
            break;
        }
        // A was caught between batches or inside a claim: nothing of it is
        // in Kafka. What it sent meanwhile is lost, so its connection goes
        // and it connects again.
        proxy.cut();
        proxy.release_upstream();
        proxy.restore();
    }
    assert!(
        !in_doubt.is_empty(),
        "relay A was never caught with a published batch; A:\n{}",
        a.log()
    );
    // kill -9, and its connection goes: PostgreSQL rolls its claim back.
    a.kill9().await;
    proxy.cut();
    let mut total = 0;
    for w in writers {
        total += w.await.unwrap();
    }
    let truth = commit_order(&stack.pg, &stack.db, "twin", total as usize).await;
    wait_for(
        "every row published and deleted",
        Duration::from_secs(120),
        async || (count(&stack.client, "SELECT count(*) FROM outbox").await == 0).then_some(()),
    )
    .await;
    let records = stack.broker.consume_all(&topic);
    let mut first_seen: HashMap<String, Vec<String>> = HashMap::new();
    let mut seen: HashSet<String> = HashSet::new();
    for r in &records {
        let id = r.header("id").unwrap().to_owned();
        if seen.insert(id.clone()) {
            let key = String::from_utf8(r.key.clone().unwrap()).unwrap();
            first_seen.entry(key).or_default().push(id);
        }
    }
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for (id, key, _) in &truth {
        assert!(
            seen.contains(id),
            "event {id} of {key} lost; relay B:\n{}",
            b.log()
        );
        expected.entry(key.clone()).or_default().push(id.clone());
    }
    assert_eq!(seen.len(), truth.len(), "no record that was not committed");
    for (key, ids) in &expected {
        assert_eq!(&first_seen[key], ids, "per-key order of {key}");
    }
    // The killed relay's unfinished batch is taken over by B, which finds
    // its rows in doubt and reads their partitions first: exactly once,
    // none arrives twice (at least once, exactly those rows would).
    let mut copies: HashMap<&str, usize> = HashMap::new();
    for r in &records {
        *copies.entry(r.header("id").unwrap()).or_default() += 1;
    }
    let doubled: HashSet<String> = copies
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| (*id).to_owned())
        .collect();
    eprintln!(
        "{} events, {} records, {} in doubt at the kill, {} published twice",
        truth.len(),
        records.len(),
        in_doubt.len(),
        doubled.len()
    );
    assert!(
        doubled.is_empty(),
        "published twice: {doubled:?}; relay B:\n{}",
        b.log()
    );
    assert_eq!(records.len(), truth.len());
    assert!(
        b.log().contains("rows a relay may have sent already"),
        "B took rows in doubt over: {}",
        b.log()
    );
    assert!(b.terminate(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rule_that_turns_the_settles_delete_into_an_update_still_settles_each_row_once() {
    let stack = poll_stack("pollrule").await;
    // Published rows kept by a rule instead of `--on-published mark`: the
    // settle's DELETE reports no rows (it found its rows by ctid, and
    // looks for them by seq as well when fewer changed than it published).
    stack
        .client
        .batch_execute(
            "CREATE RULE keep_published AS ON DELETE TO outbox DO INSTEAD
               UPDATE outbox SET published_at = now() WHERE seq = OLD.seq;
             INSERT INTO outbox (aggregate_type, aggregate_id, event_type)
               SELECT 'kept', 'k' || (g % 7), 'e' || g FROM generate_series(1, 120) g",
        )
        .await
        .unwrap();
    let mut relay = stack.relay(&[
        "--source",
        "poll",
        "--poll-interval",
        "100ms",
        "--poll-batch-size",
        "50",
    ]);
    wait_for(
        "every row published and kept",
        Duration::from_secs(60),
        async || {
            let pending = count(
                &stack.client,
                "SELECT count(*) FROM outbox WHERE published_at IS NULL",
            )
            .await;
            (pending == 0).then_some(())
        },
    )
    .await;
    // A few more polls go by: nothing is claimed again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let records = stack
        .broker
        .consume(&stack.topic("kept"), 120, Duration::from_secs(30));
    let ids: HashSet<&str> = records.iter().map(|r| r.header("id").unwrap()).collect();
    assert_eq!((records.len(), ids.len()), (120, 120), "{}", relay.log());
    assert_eq!(
        count(&stack.client, "SELECT count(*) FROM outbox").await,
        120
    );
    assert!(relay.terminate(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_that_keeps_failing_goes_to_the_dead_letter_topic_after_max_attempts() {
    let stack = poll_stack("pollfail").await;
    stack.broker.create_topic(&stack.topic("good"), 1);
    stack.broker.create_topic(&stack.topics.dead_letters(), 1);
    let missing = format!("topic \"{}\" does not exist", stack.topic("missing"));
    let mut relay = stack.relay(&[
        "--source",
        "poll",
        "--no-create-topics",
        "--max-attempts",
        // Retries 0.5-1, 1-2, 2-4 and 2.5-5 s apart: the failing row is
        // there to be seen for 6 s or more, however slowly this test looks.
        "5",
        "--max-backoff",
        "5s",
        "--poll-interval",
        "100ms",
    ]);
    stack
        .client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type) VALUES ('missing', 'm', 'Lost');
             INSERT INTO outbox (aggregate_type, aggregate_id, event_type) VALUES ('good', 'g', 'One');",
        )
        .await
        .unwrap();
    // The failing row counts its attempts and says why, while the good row
    // has already gone: it does not wait for the failing one.
    wait_for(
        "a failed attempt, the good row settled",
        Duration::from_secs(30),
        async || {
            let row = stack
                .client
                .query_opt(
                    "SELECT attempts, last_error,
                            (SELECT count(*) FROM outbox WHERE aggregate_type = 'good')
                       FROM outbox WHERE aggregate_type = 'missing'",
                    &[],
                )
                .await
                .ok()??;
            let (attempts, error, good): (i32, Option<String>, i64) =
                (row.get(0), row.get(1), row.get(2));
            (attempts >= 1 && good == 0).then_some(error)
        },
    )
    .await
    .filter(|e| e.contains(&format!("{missing} and --no-create-topics is set")))
    .expect("last_error names the topic and the fix");
    let good = stack
        .broker
        .consume(&stack.topic("good"), 1, Duration::from_secs(30));
    assert_eq!(good.len(), 1);
    let dead = stack
        .broker
        .consume(&stack.topics.dead_letters(), 1, Duration::from_secs(60));
    assert_eq!(dead.len(), 1, "{}", relay.log());
    assert_eq!(dead[0].header("walrelay_error_kind"), Some("max_attempts"));
    let reason = dead[0].header("walrelay_error").unwrap();
    assert!(
        reason.starts_with(&format!("failed 5 times; last error: {missing}")),
        "{reason}"
    );
    assert_eq!(
        dead[0].header("event_type"),
        Some("Lost"),
        "the event's own headers travel"
    );
    wait_for(
        "the table to be empty",
        Duration::from_secs(10),
        async || (count(&stack.client, "SELECT count(*) FROM outbox").await == 0).then_some(()),
    )
    .await;
    let (_, metrics) = relay.http_get("/metrics").await.unwrap();
    assert!(
        metrics.contains("walrelay_dead_letters_total{kind=\"max_attempts\"} 1"),
        "{metrics}"
    );
    assert!(relay.terminate(Duration::from_secs(30)).await.success());
}

/// A backlog written since the table was last analyzed (here, never: its
/// autovacuum is off) still has the relay's claims walk the `seq` index
/// and stop at the batch's size, instead of reading every pending row and
/// sorting them: PostgreSQL planned that from its missing statistics, and
/// each claim took 150 ms over 200,000 rows against 8 ms (see
/// `poll/claim.rs`). The plans are the server's own (`auto_explain`).
#[tokio::test(flavor = "multi_thread")]
async fn the_relays_claims_walk_the_seq_index_on_a_table_never_analyzed() {
    let stack = poll_stack("pollplan").await;
    stack
        .client
        .batch_execute(&format!(
            "ALTER TABLE outbox SET (autovacuum_enabled = false);
             INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
               SELECT 'plan', 'order-' || (g % 1000), 'OrderPlaced', '{{}}'
               FROM generate_series(1, 20000) g;
             ALTER DATABASE {db} SET session_preload_libraries = 'auto_explain';
             ALTER DATABASE {db} SET auto_explain.log_min_duration = 0",
            db = stack.db
        ))
        .await
        .unwrap();
    let analyzed = count(
        &stack.client,
        "SELECT count(*) FROM pg_stats WHERE tablename = 'outbox'",
    )
    .await;
    assert_eq!(analyzed, 0, "the table has statistics: the test needs none");

    let mut relay = stack.relay(&["--source", "poll"]);
    let records = stack
        .broker
        .consume(&stack.topic("plan"), 20000, Duration::from_secs(120));
    assert_eq!(records.len(), 20000, "{}", relay.log());
    assert!(relay.terminate(Duration::from_secs(30)).await.success());

    // Each claim's plan: the rows to claim come from an ordered walk of the
    // pending index, straight into the row locks and the limit.
    let log = stack.pg.log();
    let claims: Vec<&str> = log
        .split("LOG:  duration:")
        .filter(|entry| entry.contains("CTE claimed"))
        .collect();
    assert!(
        claims.len() >= 20000 / 500,
        "{} claims logged",
        claims.len()
    );
    for plan in claims {
        let claimed: Vec<&str> = plan
            .lines()
            .skip_while(|line| !line.contains("CTE claimed"))
            .take_while(|line| !line.contains("CTE Scan on claimed"))
            .collect();
        let node = |name: &str| claimed.iter().any(|line| line.contains(name));
        assert!(
            node("Index Scan using outbox_walrelay_pending on outbox c")
                && !node("Sort")
                && !node("Bitmap")
                && !node("Seq Scan"),
            "a claim that does not walk the index:\n{plan}"
        );
    }
}
