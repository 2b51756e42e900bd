//! `walrelay run` end to end: a real PostgreSQL, a real broker, the binary.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::kafka::{Broker, Record};
use support::relay::RelayProcess;
use support::{PgCluster, wait_for};

/// Runs `walrelay setup` with `args` and returns its output lines.
fn setup(pg_url: &str, args: &[&str]) -> Vec<String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walrelay"))
        .args(["setup", "--pg-url", pg_url])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "setup failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect()
}

async fn confirmed_flush_lsn(client: &tokio_postgres::Client, slot: &str) -> String {
    client
        .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn setup_is_idempotent_and_says_what_it_did() {
    let pg = PgCluster::start();
    let db = pg.create_database("setup").await;
    let first = setup(&pg.url(&db), &[]);
    assert_eq!(first[0], "created table public.outbox");
    assert_eq!(first[1], "created publication walrelay for public.outbox");
    assert!(first[2].starts_with("created replication slot walrelay at "), "{first:?}");
    let second = setup(&pg.url(&db), &[]);
    assert_eq!(
        second,
        [
            "table public.outbox exists",
            "publication walrelay exists and covers public.outbox",
            "replication slot walrelay exists"
        ]
    );
    // A second table is added to the existing publication.
    let third = setup(&pg.url(&db), &["--table", "public.outbox,public.outbox2"]);
    assert_eq!(third[1], "created table public.outbox2");
    assert_eq!(third[2], "added public.outbox2 to publication walrelay");
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
    assert_eq!(columns, ["id", "aggregate_type", "aggregate_id", "event_type", "payload", "headers", "created_at"]);
}

fn by_id(records: &[Record]) -> HashMap<String, Record> {
    records.iter().map(|r| (r.header("id").unwrap().to_owned(), r.clone())).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_part_of_the_record_contract_arrives_byte_for_byte() {
    let pg = PgCluster::start();
    let broker = Broker::start();
    let db = pg.create_database("contract").await;
    setup(&pg.url(&db), &["--table", "public.outbox,public.outbox_text,public.outbox_bytea,public.outbox_json"]);
    let client = pg.client(&db).await;
    client
        .batch_execute(
            "ALTER TABLE outbox_text ALTER COLUMN payload TYPE text USING payload::text;
             ALTER TABLE outbox_bytea ALTER COLUMN payload TYPE bytea USING convert_to(payload::text, 'UTF8');
             ALTER TABLE outbox_json ALTER COLUMN payload TYPE json USING payload::json;
             ALTER TABLE outbox ADD COLUMN tenant_id text;",
        )
        .await
        .unwrap();
    let mut relay = RelayProcess::start(
        &pg.url(&db),
        &broker.bootstrap(),
        &[
            "--table",
            "public.outbox,public.outbox_text,public.outbox_bytea,public.outbox_json",
            "--topic-template",
            "{schema}.{aggregate_type}",
            "--header-column",
            "tenant_id:tenant",
            "-X",
            "message.max.bytes=3000000",
        ],
    );
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
        .query_one("SELECT payload::text FROM outbox WHERE aggregate_type = 'big'", &[])
        .await
        .unwrap()
        .get(0);

    let orders = broker.consume("public.order", 2, Duration::from_secs(60));
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
            "id", "event_type", "traceparent", "tracestate", "tenant", "ce_specversion", "ce_id", "ce_type", "ce_source",
            "ce_time", "content-type"
        ]
    );
    assert_eq!(created.header("event_type"), Some("OrderCreated"));
    assert_eq!(created.header("traceparent"), Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
    assert_eq!(created.header("tracestate"), Some("k=v"));
    assert_eq!(created.header("tenant"), Some("acme"));
    assert_eq!(created.header("ce_specversion"), Some("1.0"));
    assert_eq!(created.header("ce_id"), Some("00000000-0000-0000-0000-000000000001"));
    assert_eq!(created.header("ce_type"), Some("OrderCreated"));
    assert_eq!(created.header("ce_source"), Some("/walrelay/public/outbox"));
    assert_eq!(created.header("ce_time"), Some("2026-11-23T08:32:03.123456Z"));
    assert_eq!(created.header("content-type"), Some("application/json"));
    let deleted = &orders["00000000-0000-0000-0000-000000000002"];
    assert_eq!(deleted.value, None, "a NULL payload is a tombstone");
    assert_eq!(deleted.key.as_deref(), Some(&b"order-1"[..]));
    assert_eq!(deleted.header("tenant"), None);
    assert_eq!(deleted.header("ce_time"), Some("2026-11-23T08:32:04Z"));

    let big = broker.consume("public.big", 1, Duration::from_secs(60));
    assert_eq!(big.len(), 1);
    assert_eq!(big[0].value.as_deref(), Some(expected_big.as_bytes()), "1 MB payload byte for byte");

    let text = broker.consume("public.text", 1, Duration::from_secs(30));
    assert_eq!(text.len(), 1, "relay log:\n{}", relay.log());
    assert_eq!(text[0].value.as_deref(), Some("plain text, ü".as_bytes()));
    assert_eq!(text[0].header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(text[0].header("ce_source"), Some("/walrelay/public/outbox_text"));
    let bytes = broker.consume("public.bytes", 1, Duration::from_secs(30));
    assert_eq!(bytes[0].value.as_deref(), Some(&[0x00, 0xff, 0x0a, 0x7f][..]));
    assert_eq!(bytes[0].header("content-type"), Some("application/octet-stream"));
    let json = broker.consume("public.json", 1, Duration::from_secs(30));
    assert_eq!(json[0].value.as_deref(), Some(&br#"{"b": 1,   "a": [1, 2]}"#[..]), "json keeps its text as stored");

    let status = relay.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "exit {status}; log:\n{}", relay.log());
}
