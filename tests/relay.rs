//! `walrelay run` end to end: a real PostgreSQL, a real broker, the binary.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use rand::Rng;
use support::kafka::Record;
use support::workload::{commit_order, current_lsn, seeded_rng, setup};
use support::{BrokerChoice, PgCluster, Stack, StackOptions, wait_for};

#[tokio::test(flavor = "multi_thread")]
async fn setup_is_idempotent_and_says_what_it_did() {
    let pg = PgCluster::start();
    let db = pg.create_database("setup").await;
    let first = setup(&pg.url(&db), &[]);
    assert_eq!(first[0], "created table public.outbox");
    assert_eq!(
        first[1],
        "created dead-letter table public.walrelay_dead_letters"
    );
    assert_eq!(first[2], "created publication walrelay for public.outbox");
    assert!(
        first[3].starts_with("created replication slot walrelay at "),
        "{first:?}"
    );
    let second = setup(&pg.url(&db), &[]);
    assert_eq!(
        second[..4],
        [
            "table public.outbox exists",
            "dead-letter table public.walrelay_dead_letters exists",
            "publication walrelay exists and covers public.outbox",
            "replication slot walrelay exists"
        ]
    );
    // The slot is a failover slot where the server has them (17+), and
    // setup says why it is not one where it does not.
    let failover: Option<bool> = pg
        .client(&db)
        .await
        .query_one(
            "SELECT (to_jsonb(s) ->> 'failover')::bool FROM pg_replication_slots s WHERE slot_name = 'walrelay'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if pg.major >= 17 {
        assert_eq!(failover, Some(true));
        assert!(
            second[4].starts_with("replication slot walrelay is a failover slot"),
            "{second:?}"
        );
    } else {
        assert_eq!(failover, None);
        assert_eq!(
            second[4],
            format!(
                "failover slots need PostgreSQL 17, and this server is {}: after a primary failover the new primary has no slot walrelay; upgrade to keep it on standbys",
                pg.major
            )
        );
    }
    assert_eq!(first[4], second[4]);
    // A second table is added to the existing publication.
    let third = setup(&pg.url(&db), &["--table", "public.outbox,public.outbox2"]);
    assert_eq!(third[1], "created table public.outbox2");
    assert_eq!(
        third[2..4],
        [
            "dead-letter table public.walrelay_dead_letters exists",
            "added public.outbox2 to publication walrelay"
        ]
    );
    let columns: Vec<String> = pg
        .client(&db)
        .await
        .query(
            "SELECT column_name::text FROM information_schema.columns WHERE table_name = 'outbox' ORDER BY ordinal_position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        columns,
        [
            "id",
            "aggregate_type",
            "aggregate_id",
            "event_type",
            "payload",
            "headers",
            "created_at"
        ]
    );
}

fn by_id(records: &[Record]) -> HashMap<String, Record> {
    records
        .iter()
        .map(|r| (r.header("id").unwrap().to_owned(), r.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_part_of_the_record_contract_arrives_byte_for_byte() {
    let stack = Stack::start_with(
        "contract",
        StackOptions {
            setup_args: vec![
                "--table",
                "public.outbox,public.outbox_text,public.outbox_bytea,public.outbox_json",
            ],
            ..Default::default()
        },
    )
    .await;
    let (client, broker) = (&stack.client, &stack.broker);
    client
        .batch_execute(
            "ALTER TABLE outbox_text ALTER COLUMN payload TYPE text USING payload::text;
             ALTER TABLE outbox_bytea ALTER COLUMN payload TYPE bytea USING convert_to(payload::text, 'UTF8');
             ALTER TABLE outbox_json ALTER COLUMN payload TYPE json USING payload::json;
             ALTER TABLE outbox ADD COLUMN tenant_id text;",
        )
        .await
        .unwrap();
    let mut relay = stack.relay(&[
        "--table",
        "public.outbox,public.outbox_text,public.outbox_bytea,public.outbox_json",
        "--topic-template",
        "{schema}.{aggregate_type}",
        "--header-column",
        "tenant_id:tenant",
        "-X",
        "message.max.bytes=3000000",
    ]);
    client
        .batch_execute(
            r#"
            INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, headers, created_at, tenant_id) VALUES
              ('00000000-0000-0000-0000-000000000001', 'order', 'order-1', 'OrderCreated', '{"total": 12.5, "city": "Zürich 東京 🚀"}',
               '{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "tracestate": "k=v", "ignored": 42}',
               '2026-11-23 08:32:03.123456+00', 'acme'),
              ('00000000-0000-0000-0000-000000000002', 'order', 'order-1', 'OrderDeleted', NULL, '{}', '2026-11-23 08:32:04+00', NULL);
            INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload)
              SELECT '00000000-0000-0000-0000-000000000003', 'big', 'b-1', 'Big',
                     jsonb_build_object('blob', repeat('x', 1000000));
            INSERT INTO outbox_text (id, aggregate_type, aggregate_id, event_type, payload)
              VALUES ('00000000-0000-0000-0000-000000000004', 'text', 't-1', 'Texted', 'plain text, ü');
            INSERT INTO outbox_bytea (id, aggregate_type, aggregate_id, event_type, payload)
              VALUES ('00000000-0000-0000-0000-000000000005', 'bytes', 'b-2', 'Bytes', '\x00ff0a7f'::bytea);
            INSERT INTO outbox_json (id, aggregate_type, aggregate_id, event_type, payload)
              VALUES ('00000000-0000-0000-0000-000000000006', 'json', 'j-1', 'Jsoned', '{"b": 1,   "a": [1, 2]}');
            "#,
        )
        .await
        .unwrap();
    let expected_big: String = client
        .query_one(
            "SELECT payload::text FROM outbox WHERE aggregate_type = 'big'",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    let orders = broker.consume(
        &stack.topics.named("public.order"),
        2,
        Duration::from_secs(60),
    );
    assert_eq!(orders.len(), 2, "relay log:\n{}", relay.log());
    let orders = by_id(&orders);
    let created = &orders["00000000-0000-0000-0000-000000000001"];
    assert_eq!(created.key.as_deref(), Some(&b"order-1"[..]));
    assert_eq!(
        std::str::from_utf8(created.value.as_deref().unwrap()).unwrap(),
        r#"{"city": "Zürich 東京 🚀", "total": 12.5}"#
    );
    assert_eq!(
        created.header_names(),
        [
            "id",
            "event_type",
            "traceparent",
            "tracestate",
            "tenant",
            "ce_specversion",
            "ce_id",
            "ce_type",
            "ce_source",
            "ce_time",
            "content-type",
            "walrelay_position",
            "walrelay_origin"
        ]
    );
    // Exactly once (the default): where the event comes from.
    let system_id: String = client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        created.header("walrelay_origin"),
        Some(format!("{system_id}/walrelay/1").as_str())
    );
    let position = created.header("walrelay_position").unwrap();
    let parsed: walrelay::publish::Position = position.parse().unwrap();
    assert_eq!(parsed.to_string(), position, "fixed width");
    let deleted_position: walrelay::publish::Position =
        orders["00000000-0000-0000-0000-000000000002"]
            .header("walrelay_position")
            .unwrap()
            .parse()
            .unwrap();
    assert_eq!(parsed.commit, deleted_position.commit, "one transaction");
    assert!(
        parsed.change < deleted_position.change,
        "in statement order"
    );
    assert_eq!(created.header("event_type"), Some("OrderCreated"));
    assert_eq!(
        created.header("traceparent"),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(created.header("tracestate"), Some("k=v"));
    assert_eq!(created.header("tenant"), Some("acme"));
    assert_eq!(created.header("ce_specversion"), Some("1.0"));
    assert_eq!(
        created.header("ce_id"),
        Some("00000000-0000-0000-0000-000000000001")
    );
    assert_eq!(created.header("ce_type"), Some("OrderCreated"));
    assert_eq!(created.header("ce_source"), Some("/walrelay/public/outbox"));
    assert_eq!(
        created.header("ce_time"),
        Some("2026-11-23T08:32:03.123456Z")
    );
    assert_eq!(created.header("content-type"), Some("application/json"));
    let deleted = &orders["00000000-0000-0000-0000-000000000002"];
    assert_eq!(deleted.value, None, "a NULL payload is a tombstone");
    assert_eq!(deleted.key.as_deref(), Some(&b"order-1"[..]));
    assert_eq!(deleted.header("tenant"), None);
    assert_eq!(deleted.header("ce_time"), Some("2026-11-23T08:32:04Z"));

    let big = broker.consume(
        &stack.topics.named("public.big"),
        1,
        Duration::from_secs(60),
    );
    assert_eq!(big.len(), 1);
    assert_eq!(
        big[0].value.as_deref(),
        Some(expected_big.as_bytes()),
        "1 MB payload byte for byte"
    );

    let text = broker.consume(
        &stack.topics.named("public.text"),
        1,
        Duration::from_secs(30),
    );
    assert_eq!(text.len(), 1, "relay log:\n{}", relay.log());
    assert_eq!(text[0].value.as_deref(), Some("plain text, ü".as_bytes()));
    assert_eq!(
        text[0].header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(
        text[0].header("ce_source"),
        Some("/walrelay/public/outbox_text")
    );
    let bytes = broker.consume(
        &stack.topics.named("public.bytes"),
        1,
        Duration::from_secs(30),
    );
    assert_eq!(
        bytes[0].value.as_deref(),
        Some(&[0x00, 0xff, 0x0a, 0x7f][..])
    );
    assert_eq!(
        bytes[0].header("content-type"),
        Some("application/octet-stream")
    );
    let json = broker.consume(
        &stack.topics.named("public.json"),
        1,
        Duration::from_secs(30),
    );
    assert_eq!(
        json[0].value.as_deref(),
        Some(&br#"{"b": 1,   "a": [1, 2]}"#[..]),
        "json keeps its text as stored"
    );

    let status = relay.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "exit {status}; log:\n{}", relay.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_writers_keep_per_aggregate_commit_order_in_kafka() {
    let stack = Stack::start_with(
        "order",
        StackOptions {
            twin: true,
            ..Default::default()
        },
    )
    .await;
    let mut relay = stack.relay(&["--topic-partitions", "4"]);
    // 10 writers, 1,000 single-event transactions each, over 50 aggregates.
    let mut writers = Vec::new();
    for w in 0..10 {
        let c = stack.pg.client(&stack.db).await;
        writers.push(tokio::spawn(async move {
            for i in 0..1000 {
                let aggregate = format!("agg-{}", (w * 7 + i) % 50);
                c.execute(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', $1, 'E', jsonb_build_object('w', $2::int, 'i', $3::int))",
                    &[&aggregate, &w, &i],
                )
                .await
                .unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    // The truth is PostgreSQL's own decoding (test_decoding), not walrelay's.
    let truth = commit_order(&stack.pg, &stack.db, "twin", 10_000).await;
    stack
        .wait_confirmed(truth.last().unwrap().2, Duration::from_secs(120))
        .await;
    let records = stack.broker.consume_all(&stack.topic("order"));
    assert_eq!(records.len(), 10_000, "relay log:\n{}", relay.log());
    let mut kafka_order: HashMap<String, Vec<String>> = HashMap::new();
    let mut partition_of: HashMap<String, i32> = HashMap::new();
    for r in &records {
        let key = String::from_utf8(r.key.clone().unwrap()).unwrap();
        let previous = partition_of.insert(key.clone(), r.partition);
        assert!(
            previous.is_none_or(|p| p == r.partition),
            "one key, one partition"
        );
        kafka_order
            .entry(key)
            .or_default()
            .push(r.header("id").unwrap().to_owned());
    }
    let mut commit: HashMap<String, Vec<String>> = HashMap::new();
    for (id, key, _) in truth {
        commit.entry(key).or_default().push(id);
    }
    assert_eq!(commit.len(), 50);
    for (key, ids) in &commit {
        assert_eq!(&kafka_order[key], ids, "order of {key}");
    }
    let partitions: std::collections::HashSet<i32> = partition_of.values().copied().collect();
    assert!(partitions.len() > 1, "keys spread over partitions");
    assert!(relay.terminate(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_five_times_loses_nothing_and_duplicates_only_unconfirmed_events() {
    let stack = Stack::start_with(
        "crash",
        StackOptions {
            twin: true,
            ..Default::default()
        },
    )
    .await;
    // At least once: what this test has always checked.
    let start = || {
        stack.relay(&[
            "--max-in-flight-events",
            "500",
            "--delivery",
            "at-least-once",
        ])
    };
    let mut relay = start();
    let mut rng = seeded_rng("kill_9_five_times");

    // A writer of 20,000 events, 10 per transaction, while the relay is killed.
    let writer_client = stack.pg.client(&stack.db).await;
    let writer = tokio::spawn(async move {
        for batch in 0..2000 {
            writer_client
                .execute(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                     SELECT 'crash', 'agg-' || ((g + $1::int) % 20), 'E', jsonb_build_object('batch', $1::int, 'g', g)
                     FROM generate_series(1, 10) g",
                    &[&batch],
                )
                .await
                .unwrap();
            if batch % 100 == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let mut confirmed_at_kill = Vec::new();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(400..1300))).await;
        relay.kill9().await;
        // The slot's position is what the killed relay had confirmed.
        confirmed_at_kill.push(stack.confirmed().await);
        relay = start();
    }
    writer.await.unwrap();
    let truth = commit_order(&stack.pg, &stack.db, "twin", 20_000).await;
    stack
        .wait_confirmed(truth.last().unwrap().2, Duration::from_secs(120))
        .await;
    let records = stack.broker.consume_all(&stack.topic("crash"));
    let mut copies: HashMap<String, usize> = HashMap::new();
    for r in &records {
        *copies
            .entry(r.header("id").unwrap().to_owned())
            .or_default() += 1;
    }
    let mut duplicates = 0;
    for (id, _, end_lsn) in &truth {
        let n = copies.get(id).copied().unwrap_or(0);
        assert!(
            n >= 1,
            "event {id} (commit {end_lsn}) was lost; relay log:\n{}",
            relay.log()
        );
        // Each kill may resend only what it had not confirmed.
        let allowed = 1 + confirmed_at_kill.iter().filter(|c| *end_lsn > **c).count();
        assert!(
            n <= allowed,
            "event {id} arrived {n} times but only {allowed} were possible"
        );
        duplicates += n - 1;
    }
    assert_eq!(copies.len(), 20_000, "no unknown ids");
    eprintln!(
        "kill -9 x5: {} records for 20000 events, {duplicates} duplicates",
        records.len()
    );
    assert!(relay.terminate(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_broker_down_the_confirmed_lsn_stays_below_unacknowledged_commits() {
    let stack = Stack::start_with(
        "ackrule",
        StackOptions {
            broker: BrokerChoice::Private,
            twin: true,
            ..Default::default()
        },
    )
    .await;
    let relay = stack.relay(&[]);
    stack
        .client
        .batch_execute("INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('ack', 'a', 'First', '{}')")
        .await
        .unwrap();
    assert_eq!(
        stack
            .broker
            .consume(&stack.topic("ack"), 1, Duration::from_secs(30))
            .len(),
        1
    );

    stack.broker.stop();
    stack
        .client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             SELECT 'ack', 'a', 'WhileDown', jsonb_build_object('n', g) FROM generate_series(1, 50) g",
        )
        .await
        .unwrap();
    // The waiting events' own commit, from PostgreSQL's decoding.
    let waiting_commit = commit_order(&stack.pg, &stack.db, "twin", 51).await[1].2;
    // Other traffic keeps the WAL moving, so keepalives would tempt a naive relay.
    for _ in 0..20 {
        stack
            .client
            .batch_execute("SELECT pg_logical_emit_message(true, 'noise', 'x')")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let confirmed = stack.confirmed().await;
        assert!(
            confirmed < waiting_commit,
            "confirmed {confirmed} past unacknowledged events committed at {waiting_commit}"
        );
    }
    wait_for(
        "/readyz to report the broker down",
        Duration::from_secs(20),
        async || {
            let (code, body) = relay.http_get("/readyz").await?;
            (code == 503 && body.contains("\"broker_reachable\":false")).then_some(())
        },
    )
    .await;

    stack.broker.start_again();
    let records = stack
        .broker
        .consume(&stack.topic("ack"), 51, Duration::from_secs(60));
    assert_eq!(records.len(), 51, "relay log:\n{}", relay.log());
    stack
        .wait_confirmed(waiting_commit, Duration::from_secs(30))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn alter_table_messages_rollbacks_deletes_and_idle_outbox_behave() {
    let stack = Stack::start("behave").await;
    let (client, broker) = (&stack.client, &stack.broker);
    client
        .batch_execute("CREATE TABLE busy (id serial PRIMARY KEY, v text)")
        .await
        .unwrap();
    let mut relay = stack.relay(&["--header-column", "tenant"]);
    // One statement or explicit transaction per call: several statements in
    // one simple query would share an implicit transaction.
    for sql in [
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('t', 'k', 'BeforeAlter', '{}')",
        "BEGIN; INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('t', 'k', 'RolledBack', '{}'); ROLLBACK",
        "ALTER TABLE outbox ADD COLUMN tenant text",
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, tenant) VALUES ('t', 'k', 'AfterAlter', '{}', 'acme')",
        "BEGIN;
           INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload)
             VALUES ('00000000-0000-0000-0000-0000000000de', 't', 'k', 'DeletedInSameTxn', '{}');
           DELETE FROM outbox WHERE id = '00000000-0000-0000-0000-0000000000de';
         COMMIT",
        r#"UPDATE outbox SET payload = '{"changed": true}'"#,
        r#"SELECT pg_logical_emit_message(true, 'walrelay',
             '{"aggregate_type":"t","aggregate_id":"k","event_type":"FromMessage","payload":{"m":1},"headers":{"traceparent":"tp"}}')"#,
        r#"SELECT pg_logical_emit_message(true, 'other-prefix', '{"aggregate_type":"t"}')"#,
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    let records = broker.consume(&stack.topic("t"), 4, Duration::from_secs(60));
    let types: Vec<&str> = records
        .iter()
        .map(|r| r.header("event_type").unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "BeforeAlter",
            "AfterAlter",
            "DeletedInSameTxn",
            "FromMessage"
        ],
        "relay log:\n{}",
        relay.log()
    );
    assert_eq!(
        records[1].header("tenant"),
        Some("acme"),
        "the column added mid-stream is read by name"
    );
    assert_eq!(
        records[2].header("id"),
        Some("00000000-0000-0000-0000-0000000000de")
    );
    let message = &records[3];
    assert_eq!(message.value.as_deref(), Some(&br#"{"m":1}"#[..]));
    assert_eq!(message.header("traceparent"), Some("tp"));
    assert_eq!(
        message.header("ce_source"),
        Some("/walrelay/message/walrelay")
    );
    let id = message.header("id").unwrap();
    assert_eq!(
        uuid::Uuid::parse_str(id).unwrap().get_version_num(),
        5,
        "LSN-derived id"
    );

    // An idle outbox with a busy table: the slot follows the WAL.
    let base = stack.confirmed().await;
    for i in 0..30 {
        client
            .execute("INSERT INTO busy (v) SELECT repeat('x', 1000) FROM generate_series(1, 100) WHERE $1::int >= 0", &[&i])
            .await
            .unwrap();
    }
    let wal_now = current_lsn(client).await;
    stack.wait_confirmed(wal_now, Duration::from_secs(30)).await;
    assert!(wal_now.bytes_since(base) > 100_000);
    // Nothing else was published.
    assert_eq!(broker.consume_all(&stack.topic("t")).len(), 4);
    assert!(relay.terminate(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn unroutable_rows_and_oversize_records_go_to_the_dead_letter_topic_and_the_stream_goes_on() {
    let stack = Stack::start("dlq").await;
    let (client, broker) = (&stack.client, &stack.broker);
    client
        .batch_execute("ALTER TABLE outbox ALTER COLUMN aggregate_id DROP NOT NULL")
        .await
        .unwrap();
    let mut relay = stack.relay(&["-X", "message.max.bytes=100000"]);
    client
        .batch_execute(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload)
               VALUES ('00000000-0000-0000-0000-00000000000a', 'd', NULL, 'NoKey', '{\"x\": 1}');
             INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload)
               VALUES ('00000000-0000-0000-0000-00000000000b', 'd', 'k', 'TooBig', jsonb_build_object('blob', repeat('y', 200000)));
             SELECT pg_logical_emit_message(false, 'walrelay', '{\"aggregate_type\":\"d\",\"aggregate_id\":\"k\",\"event_type\":\"NonTx\"}');
             INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload)
               VALUES ('00000000-0000-0000-0000-00000000000c', 'd', 'k', 'After', '{}');",
        )
        .await
        .unwrap();
    let after = broker.consume(&stack.topic("d"), 1, Duration::from_secs(60));
    assert_eq!(after.len(), 1, "relay log:\n{}", relay.log());
    assert_eq!(after[0].header("event_type"), Some("After"));
    let dead = broker.consume(&stack.topics.dead_letters(), 3, Duration::from_secs(30));
    assert_eq!(dead.len(), 3, "relay log:\n{}", relay.log());
    let reasons: Vec<&str> = dead
        .iter()
        .map(|r| r.header("walrelay_error").unwrap())
        .collect();
    let no_key = dead
        .iter()
        .find(|r| r.header("walrelay_error") == Some("column \"aggregate_id\" is NULL"));
    let no_key = no_key.unwrap_or_else(|| panic!("reasons: {reasons:?}"));
    let original: serde_json::Value =
        serde_json::from_slice(no_key.value.as_ref().unwrap()).unwrap();
    assert_eq!(
        original["columns"]["id"],
        "00000000-0000-0000-0000-00000000000a"
    );
    assert_eq!(original["columns"]["payload"], "{\"x\": 1}");
    let too_big = dead
        .iter()
        .find(|r| r.header("id") == Some("00000000-0000-0000-0000-00000000000b"))
        .unwrap_or_else(|| panic!("reasons: {reasons:?}"));
    assert!(
        too_big
            .header("walrelay_error")
            .unwrap()
            .to_lowercase()
            .contains("too large"),
        "{reasons:?}"
    );
    assert_eq!(
        too_big.header("walrelay_original_topic"),
        Some(stack.topic("d").as_str())
    );
    assert!(
        too_big
            .header("walrelay_original_size")
            .unwrap()
            .parse::<usize>()
            .unwrap()
            > 200_000
    );
    let non_tx = dead
        .iter()
        .find(|r| {
            r.header("walrelay_error")
                .unwrap()
                .starts_with("non-transactional")
        })
        .unwrap_or_else(|| panic!("reasons: {reasons:?}"));
    assert!(
        std::str::from_utf8(non_tx.value.as_ref().unwrap())
            .unwrap()
            .contains("NonTx")
    );
    // The relay counts them.
    let (_, metrics) = relay.http_get("/metrics").await.unwrap();
    assert!(
        metrics.contains("walrelay_dead_letters_total{kind=\"unroutable\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("walrelay_dead_letters_total{kind=\"broker_rejected\"} 1"),
        "{metrics}"
    );
    assert!(relay.terminate(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn with_no_create_topics_a_missing_topic_stops_the_relay_naming_it() {
    let stack = Stack::start_with(
        "notopics",
        StackOptions {
            twin: true,
            ..Default::default()
        },
    )
    .await;
    let mut relay = stack.relay(&["--no-create-topics"]);
    stack
        .client
        .batch_execute("INSERT INTO outbox (aggregate_type, aggregate_id, event_type) VALUES ('missing', 'k', 'E')")
        .await
        .unwrap();
    let status = relay.wait(Duration::from_secs(60)).await;
    let log = relay.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "topic \"{}\" does not exist and --no-create-topics is set",
            stack.topic("missing")
        )),
        "{log}"
    );
    // Nothing was confirmed up to the event's own commit.
    let event_commit = commit_order(&stack.pg, &stack.db, "twin", 1).await[0].2;
    assert!(stack.confirmed().await < event_commit);
}

/// The test broker runs as Apache Kafka ships (auto.create.topics.enable
/// on, num.partitions 1): a client whose metadata request may create a
/// topic makes it there with one partition before walrelay's
/// CreateTopics. walrelay's topic has the partitions asked for, and its
/// events land across them where Java's partitioner puts their keys.
#[tokio::test(flavor = "multi_thread")]
async fn topics_walrelay_creates_on_a_stock_broker_have_the_partitions_asked_for() {
    let stack = Stack::start("partitions").await;
    let relay = stack.relay(&["--topic-partitions", "8"]);
    stack
        .client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             SELECT 'spread', 'agg-' || g, 'E', '{}' FROM generate_series(0, 99) g",
        )
        .await
        .unwrap();
    let topic = stack.topic("spread");
    let records = stack.broker.consume(&topic, 100, Duration::from_secs(60));
    let layout = stack.broker.layout(&topic).expect("the topic exists");
    let log = relay.log();
    assert_eq!(layout.len(), 8, "the topic's partitions; relay log:\n{log}");
    let mut used = std::collections::BTreeSet::new();
    for r in &records {
        let key = r.key.as_deref().unwrap();
        assert_eq!(
            r.partition,
            walrelay::publish::partition_for(Some(key), None, 8),
            "{} lands where Java's partitioner puts it",
            String::from_utf8_lossy(key)
        );
        used.insert(r.partition);
    }
    // The 100 keys fall in every one of the 8 partitions (murmur2 is
    // fixed, so this is a fact of these keys, not luck).
    assert_eq!(used.len(), 8, "partitions used: {used:?}");
    let created = log
        .lines()
        .find(|l| l.contains("created topic") && l.contains(&format!("\"{topic}\"")))
        .unwrap_or_else(|| panic!("no line saying the topic was created:\n{log}"));
    assert!(
        created.contains("partitions=8") && created.contains("replication_factor=1"),
        "what the broker made, as it has it: {created}"
    );
}

/// An existing topic keeps its partition count (exactly once uses the
/// topic's own): one with fewer than --topic-partitions asks for is a
/// warning naming the command that adds them, one with more a note.
#[tokio::test(flavor = "multi_thread")]
async fn an_existing_topic_with_another_partition_count_is_named_at_start_with_the_fix() {
    let stack = Stack::start("existing").await;
    let fewer = stack.topic("fewer");
    let more = stack.topic("more");
    stack.broker.create_topic(&fewer, 2);
    stack.broker.create_topic(&more, 6);
    let relay = stack.relay(&["--topic-partitions", "4"]);
    stack.insert_events("fewer", 10).await;
    stack.insert_events("more", 10).await;
    let timeout = Duration::from_secs(60);
    let in_fewer = stack.broker.consume(&fewer, 10, timeout);
    let in_more = stack.broker.consume(&more, 10, timeout);
    assert!(in_fewer.iter().all(|r| r.partition < 2), "{in_fewer:?}");
    for r in &in_more {
        assert_eq!(
            r.partition,
            walrelay::publish::partition_for(r.key.as_deref(), None, 6)
        );
    }
    assert_eq!(stack.broker.layout(&fewer).unwrap().len(), 2);
    assert_eq!(stack.broker.layout(&more).unwrap().len(), 6);

    let log = relay.log();
    let about = |topic: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains(&format!("topic=\"{topic}\"")))
            .map(str::to_owned)
            .collect()
    };
    let warned: Vec<String> = about(&fewer)
        .into_iter()
        .filter(|l| l.contains(" WARN "))
        .collect();
    assert_eq!(warned.len(), 1, "one warning about {fewer}:\n{log}");
    assert!(
        warned[0].contains("fewer partitions than --topic-partitions")
            && warned[0].contains(&format!(
                "fix=kafka-topics.sh --bootstrap-server {} --alter --topic {fewer} --partitions 4",
                stack.broker.bootstrap()
            )),
        "{}",
        warned[0]
    );
    let about_more = about(&more);
    assert!(
        about_more.iter().any(|l| l.contains(" INFO ")
            && l.contains("more partitions than --topic-partitions")
            && l.contains("partitions=6")),
        "{about_more:?}"
    );
    assert!(
        !about_more.iter().any(|l| l.contains(" WARN ")),
        "more partitions is fine: {about_more:?}"
    );
}

#[test]
fn bad_options_exit_with_code_2_and_name_the_option() {
    let run = |args: &[&str]| {
        let mut all = vec!["run", "--brokers", "127.0.0.1:1"];
        if !args.contains(&"--pg-url") {
            all.extend(["--pg-url", "postgres://u@127.0.0.1:1/db"]);
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_walrelay"))
            .args(all)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (args, expected) in [
        (
            &["--topic-template", "outbox.{nope}"][..],
            "--topic-template",
        ),
        (&["-X", "acks=1"][..], "acks must stay all"),
        (
            &["-X", "no.such.option=1"][..],
            "-X no.such.option=1: librdkafka refuses it",
        ),
        (
            &["-X", "linger.ms=soon"][..],
            "-X linger.ms=soon: librdkafka refuses it",
        ),
        (
            &["--pg-url", "mysql://u@h/db"][..],
            "--pg-url mysql://u@h/db: connection URL must start with postgres://",
        ),
        (
            &["--broker-stall-timeout", "0"][..],
            "--broker-stall-timeout",
        ),
        (
            &["--max-in-flight-bytes", "64 furlongs"][..],
            "--max-in-flight-bytes",
        ),
        (&["-X", "novalue"][..], "expected KEY=VALUE"),
        (&["--header-column", ":x"][..], "--header-column"),
        (&["--table", "a.b.c"][..], "--table"),
        (&["--status-interval", "soon"][..], "status-interval"),
        (&["--http-addr", "nowhere"][..], "--http-addr"),
        (
            &["--dead-letter-topic", "bad topic"][..],
            "--dead-letter-topic",
        ),
    ] {
        let (code, stderr) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

/// Under continuous WAL the replication link always has something to read;
/// the status update must still go out every `--status-interval`, or the
/// walsender's view of the relay (and `pg_stat_replication`) goes stale.
/// A backlog of many transactions keeps the link ready for the whole
/// drain, and a window far larger than it keeps reading from pausing.
#[tokio::test(flavor = "multi_thread")]
async fn status_updates_go_out_on_time_while_wal_streams_without_pause() {
    let stack = Stack::start("status").await;
    for _ in 0..150 {
        stack.insert_events("status", 2_000).await;
    }
    let end = current_lsn(&stack.client).await;
    let relay = stack.relay(&[
        "--status-interval",
        "1s",
        "--max-in-flight-events",
        "1000000",
        "--max-in-flight-bytes",
        "2GiB",
    ]);
    // The walsender's record of each status update it received, sampled
    // until the backlog is confirmed.
    let mut replies: Vec<std::time::SystemTime> = Vec::new();
    // The age of the last update when sampled: a sampler that stalls sees
    // fewer updates, never a longer silence than there was.
    let mut oldest_silence = Duration::ZERO;
    let started = std::time::Instant::now();
    while stack.confirmed().await < end {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the backlog was not confirmed in 5 minutes; relay log:\n{}",
            relay.log()
        );
        let row = stack
            .client
            .query_opt(
                "SELECT r.reply_time, extract(epoch FROM clock_timestamp() - r.reply_time)::float8
                 FROM pg_stat_replication r
                 JOIN pg_replication_slots s ON s.active_pid = r.pid
                 WHERE s.slot_name = 'walrelay' AND r.reply_time IS NOT NULL",
                &[],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            let at: std::time::SystemTime = row.get(0);
            if replies.last() != Some(&at) {
                replies.push(at);
            }
            let silence = Duration::from_secs_f64(row.get::<_, f64>(1).max(0.0));
            oldest_silence = oldest_silence.max(silence);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !replies.is_empty(),
        "no status update seen; relay log:\n{}",
        relay.log()
    );
    let streamed = std::time::SystemTime::now()
        .duration_since(replies[0])
        .unwrap_or_default();
    assert!(
        streamed >= Duration::from_secs(4),
        "the drain must outlast several status intervals to show anything (it took {streamed:?}); make the backlog larger"
    );
    assert!(
        oldest_silence <= Duration::from_secs(3),
        "a status update every 1s was asked for, but PostgreSQL had heard nothing for {oldest_silence:?} while WAL streamed ({} updates seen over {streamed:?}); relay log:\n{}",
        replies.len(),
        relay.log()
    );
    drop(relay);
}
