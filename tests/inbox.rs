//! `walrelay inbox` against a real PostgreSQL and a real broker: records
//! with duplicate ids and kill -9s land once each; the stored offsets
//! match the rows; two instances share a group's partitions; and the
//! whole pattern end to end, the WAL relay into Kafka into an inbox in
//! another database.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use rand::Rng;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use support::kafka::{Broker, Record, Topics};
use support::proxy::Proxy;
use support::relay::RelayProcess;
use support::workload::{current_lsn, seeded_rng, setup};
use support::{PgCluster, Stack, wait_for};

/// The group leaves a killed member behind for this long.
const SESSION: &str = "session.timeout.ms=6000";

/// One record to produce: partition, key, id header, value.
struct Out {
    partition: i32,
    key: String,
    id: Option<String>,
    value: String,
}

/// Produces the records in order, batched (linger), so that a consumer
/// resumes in the middle of record batches.
fn produce(broker: &Broker, topic: &str, records: &[Out]) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("linger.ms", "20")
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    for r in records {
        let mut headers = OwnedHeaders::new().insert(Header {
            key: "ce_type",
            value: Some("OrderPlaced"),
        });
        if let Some(id) = &r.id {
            headers = headers.insert(Header {
                key: "id",
                value: Some(id.as_str()),
            });
        }
        let record = BaseRecord::to(topic)
            .partition(r.partition)
            .key(&r.key)
            .payload(&r.value)
            .headers(headers);
        let mut record = record;
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    producer.poll(Duration::from_millis(50));
                    record = back;
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(60)).unwrap();
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// A metric's value in Prometheus text (summed over its labels).
/// Records `range` over four partitions: keys `<key>N`, ids `<id>-N`,
/// values `{"n": N}`.
fn numbered(key: &str, id: &str, range: std::ops::Range<usize>) -> Vec<Out> {
    range
        .map(|i| Out {
            partition: (i % 4) as i32,
            key: format!("{key}{i}"),
            id: Some(format!("{id}-{i}")),
            value: format!("{{\"n\": {i}}}"),
        })
        .collect()
}

async fn metric(process: &RelayProcess, name: &str) -> f64 {
    let Some((_, body)) = process.http_get("/metrics").await else {
        return 0.0;
    };
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The partitions an inbox holds, from its /api/status.
async fn assigned(process: &RelayProcess) -> Option<Vec<(String, i64)>> {
    let (_, body) = process.http_get("/api/status").await?;
    let status: serde_json::Value = serde_json::from_str(&body).ok()?;
    Some(
        status["inbox"]["partitions"]
            .as_array()?
            .iter()
            .map(|p| {
                (
                    p["topic"].as_str().unwrap_or_default().to_owned(),
                    p["partition"].as_i64().unwrap_or(-1),
                )
            })
            .collect(),
    )
}

/// Each partition's offsets by id, as the broker holds them.
fn first_offsets(records: &[Record]) -> HashMap<String, (i32, i64)> {
    let mut first: HashMap<String, (i32, i64)> = HashMap::new();
    for r in records {
        if let Some(id) = r.header("id") {
            let at = (r.partition, r.offset);
            first
                .entry(id.to_owned())
                .and_modify(|e| *e = (*e).min(at))
                .or_insert(at);
        }
    }
    first
}

#[tokio::test(flavor = "multi_thread")]
async fn setup_inbox_creates_its_tables_and_check_and_inbox_name_the_fix_until_then() {
    let pg = PgCluster::start();
    let db = pg.create_database("inboxsetup").await;
    let url = pg.url(&db);
    let check = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_walrelay"))
            .args(["check", "--pg-url", &url])
            .args(args)
            .output()
            .unwrap()
    };
    let before = check(&["--inbox"]);
    assert_eq!(before.status.code(), Some(1));
    let text = String::from_utf8_lossy(&before.stdout).into_owned();
    assert!(
        text.contains(
            "table public.inbox does not exist: run `walrelay setup --inbox public.inbox`"
        ),
        "{text}"
    );
    // The inbox itself refuses to start, with the same fix.
    let topics = Topics::new("inboxsetup");
    let args = topics.inbox_args(&["--topic", &topics.named("orders")]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut inbox = RelayProcess::start_inbox(&url, &Broker::shared().bootstrap(), &args);
    let status = inbox.wait(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1), "{}", inbox.log());
    assert!(
        inbox.log().contains("walrelay setup --inbox"),
        "{}",
        inbox.log()
    );

    assert_eq!(
        setup(&url, &["--inbox"]),
        [
            "created table public.inbox",
            "created table public.inbox_offsets",
            "created table public.inbox_dead_letters"
        ]
    );
    assert_eq!(
        setup(&url, &["--inbox"]),
        [
            "table public.inbox exists",
            "table public.inbox_offsets exists",
            "table public.inbox_dead_letters exists"
        ]
    );
    assert_eq!(
        setup(&url, &["--inbox", "app.events_in"])[0],
        "created table app.events_in",
        "another schema and name"
    );
    let after = check(&["--inbox"]);
    assert_eq!(
        after.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&after.stdout)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_records_with_duplicate_ids_and_five_kill9s_land_each_id_once() {
    let mut rng = seeded_rng("inbox kill -9");
    let pg = PgCluster::start();
    let db = pg.create_database("inboxkill").await;
    let url = pg.url(&db);
    setup(&url, &["--inbox"]);
    let client = pg.client(&db).await;
    let broker = Broker::shared();
    let topics = Topics::new("inboxkill");
    let topic = topics.named("orders");
    broker.create_topic(&topic, 4);
    // 10,000 ids; ids 4,000 to 4,999 sent again after 5,000 (a producer
    // restarting at least once); one record without an id; one whose
    // value is not JSON.
    let event = |i: usize| Out {
        partition: (i % 4) as i32,
        key: format!("order-{}", i % 97),
        id: Some(format!("evt-{i}")),
        value: format!("{{\"n\": {i}}}"),
    };
    let mut records: Vec<Out> = (0..5_000).map(event).collect();
    records.extend((4_000..5_000).map(event));
    records.push(Out {
        partition: 1,
        key: "anonymous".into(),
        id: None,
        value: "{}".into(),
    });
    records.push(Out {
        partition: 2,
        key: "broken".into(),
        id: Some("evt-broken".into()),
        value: "not json".into(),
    });
    records.extend((5_000..10_000).map(event));
    produce(broker, &topic, &records);
    let in_kafka = broker.consume(&topic, records.len(), Duration::from_secs(60));
    assert_eq!(in_kafka.len(), 11_002);

    let args = topics.inbox_args(&["--topic", &topic, "--batch-size", "20", "-X", SESSION]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut inbox = RelayProcess::start_inbox(&url, &broker.bootstrap(), &args);
    let mut at_kills = Vec::new();
    for kill in 0..5 {
        // Each life is killed once the inbox holds a seeded number of rows,
        // the five spread over the run: a life stores thousands of rows a
        // second, so a kill timed after a life's first store could come
        // after the last row.
        let target = 1_300 * (kill + 1) + rng.random_range(0..400);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let stored = count(&client, "SELECT count(*) FROM inbox").await;
            if stored >= target {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "life {kill} did not reach {target} rows in 90 s (the inbox holds {stored}); its log:\n{}",
                inbox.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        inbox.kill9().await;
        at_kills.push(count(&client, "SELECT count(*) FROM inbox").await);
        inbox = RelayProcess::start_inbox(&url, &broker.bootstrap(), &args);
    }
    eprintln!("rows stored at each kill: {at_kills:?}");
    assert!(
        at_kills.iter().all(|n| *n < 10_000),
        "every kill lands mid-run: {at_kills:?}"
    );
    wait_for("every id stored", Duration::from_secs(120), async || {
        (count(&client, "SELECT count(*) FROM inbox").await == 10_000).then_some(())
    })
    .await;
    // Everything consumed: the offsets reach each partition's end.
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    for r in &in_kafka {
        let end = ends.entry(r.partition).or_default();
        *end = (*end).max(r.offset + 1);
    }
    wait_for("the offsets to reach the end", Duration::from_secs(60), async || {
        let rows = client
            .query(
                "SELECT \"partition\", next_offset FROM inbox_offsets WHERE consumer_group = $1 AND topic = $2",
                &[&topics.group(), &topic],
            )
            .await
            .unwrap();
        let stored: BTreeMap<i32, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        (stored == ends).then_some(())
    })
    .await;
    assert!(inbox.terminate(Duration::from_secs(30)).await.success());

    // Each id once, and it is the first copy the broker holds: the later
    // duplicate was skipped, not stored over it.
    let first = first_offsets(&in_kafka);
    let rows = client
        .query(
            "SELECT id, \"partition\", \"offset\", payload->>'n', ce_type FROM inbox",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 10_000);
    let mut seen = HashSet::new();
    for row in &rows {
        let id: String = row.get(0);
        let at: (i32, i64) = (row.get(1), row.get(2));
        assert_eq!(Some(&at), first.get(&id), "{id} is not its first copy");
        assert_eq!(format!("evt-{}", row.get::<_, String>(3)), id);
        assert_eq!(
            row.get::<_, Option<String>>(4).as_deref(),
            Some("OrderPlaced")
        );
        seen.insert(id);
    }
    let expected: HashSet<String> = (0..10_000).map(|i| format!("evt-{i}")).collect();
    assert_eq!(seen, expected);
    // The offsets match what is stored: every record below each
    // partition's next offset is in the inbox or the dead-letter table,
    // and none above it.
    let stored_or_dead: HashSet<(i32, i64)> = client
        .query(
            "SELECT \"partition\", \"offset\" FROM inbox UNION ALL SELECT \"partition\", \"offset\" FROM inbox_dead_letters",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for r in &in_kafka {
        let original = r
            .header("id")
            .is_none_or(|id| first[id] == (r.partition, r.offset));
        assert_eq!(
            stored_or_dead.contains(&(r.partition, r.offset)),
            original,
            "record at {}/{}",
            r.partition,
            r.offset
        );
    }
    let dead: Vec<(String, i32)> = client
        .query(
            "SELECT kind, \"partition\" FROM inbox_dead_letters ORDER BY kind",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        dead,
        [("invalid_row".to_owned(), 2), ("missing_id".to_owned(), 1)]
    );
    let error: String = client
        .query_one(
            "SELECT error FROM inbox_dead_letters WHERE kind = 'invalid_row'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(error.contains("json"), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_inboxes_in_one_group_share_the_partitions_and_one_takes_over_on_shutdown() {
    let pg = PgCluster::start();
    let db = pg.create_database("inboxgroup").await;
    let url = pg.url(&db);
    setup(&url, &["--inbox"]);
    let client = pg.client(&db).await;
    let broker = Broker::shared();
    let topics = Topics::new("inboxgroup");
    let topic = topics.named("payments");
    broker.create_topic(&topic, 4);
    let args = topics.inbox_args(&["--topic", &topic, "-X", SESSION]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = RelayProcess::start_inbox(&url, &broker.bootstrap(), &args);
    wait_for(
        "the first inbox to hold the partitions",
        Duration::from_secs(60),
        async || (assigned(&a).await?.len() == 4).then_some(()),
    )
    .await;
    let started = Instant::now();
    let mut b = RelayProcess::start_inbox(&url, &broker.bootstrap(), &args);
    let (in_a, in_b) = wait_for(
        "the group to share the partitions",
        Duration::from_secs(120),
        async || {
            let (x, y) = (assigned(&a).await?, assigned(&b).await?);
            (!x.is_empty() && !y.is_empty() && x.len() + y.len() == 4).then_some((x, y))
        },
    )
    .await;
    eprintln!(
        "the group rebalanced onto a second member in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let held: HashSet<(String, i64)> = in_a.iter().chain(&in_b).cloned().collect();
    assert_eq!(held.len(), 4, "each partition held once: {in_a:?} {in_b:?}");

    let batch = |from: usize, to: usize| numbered("p", "pay", from..to);
    produce(broker, &topic, &batch(0, 2_000));
    wait_for("2,000 rows", Duration::from_secs(60), async || {
        (count(&client, "SELECT count(*) FROM inbox").await == 2_000).then_some(())
    })
    .await;
    let (stored_a, stored_b) = (
        metric(&a, "walrelay_inbox_records_stored_total").await,
        metric(&b, "walrelay_inbox_records_stored_total").await,
    );
    assert!(stored_a > 0.0 && stored_b > 0.0, "{stored_a} {stored_b}");
    assert_eq!(stored_a + stored_b, 2_000.0);

    // A graceful stop hands b's partitions to a.
    assert!(
        b.terminate(Duration::from_secs(30)).await.success(),
        "{}",
        b.log()
    );
    wait_for(
        "the survivor to hold every partition",
        Duration::from_secs(120),
        async || (assigned(&a).await?.len() == 4).then_some(()),
    )
    .await;
    produce(broker, &topic, &batch(2_000, 2_400));
    wait_for("2,400 rows", Duration::from_secs(60), async || {
        (count(&client, "SELECT count(*) FROM inbox").await == 2_400).then_some(())
    })
    .await;
    assert_eq!(
        metric(&a, "walrelay_inbox_duplicates_skipped_total").await,
        0.0,
        "the partitions changed hands at their stored offsets"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wal_relay_to_kafka_to_an_inbox_in_another_database_holds_each_event_once_after_relay_kills()
 {
    let mut rng = seeded_rng("outbox to inbox");
    let stack = Stack::start("e2eoutbox").await;
    let inbox_db = stack.pg.create_database("e2einbox").await;
    let inbox_url = stack.pg.url(&inbox_db);
    setup(&inbox_url, &["--inbox"]);
    let inbox_client = stack.pg.client(&inbox_db).await;
    let relay_args = ["--delivery", "at-least-once", "--topic-partitions", "2"];
    let mut relay = stack.relay(&relay_args);
    stack.insert_events("shipment", 10).await;
    let topic = stack.topic("shipment");
    assert_eq!(
        stack
            .broker
            .consume(&topic, 10, Duration::from_secs(30))
            .len(),
        10
    );
    let inbox = stack.inbox(
        &inbox_url,
        &["--topic", &stack.topics.pattern(), "-X", SESSION],
    );
    for round in 0..3 {
        for _ in 0..10 {
            stack.insert_events("shipment", 100).await;
        }
        // Soon after the inserts, while some are published but not yet
        // confirmed: the restarted relay publishes those again.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..40))).await;
        relay.kill9().await;
        eprintln!("killed the relay in round {round}");
        relay = stack.relay(&relay_args);
    }
    let end = current_lsn(&stack.client).await;
    stack.wait_confirmed(end, Duration::from_secs(120)).await;
    let events: HashSet<String> = stack
        .client
        .query("SELECT id::text FROM outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(events.len(), 3_010);
    let in_kafka = stack.broker.consume_all(&topic);
    wait_for(
        "every event in the inbox",
        Duration::from_secs(120),
        async || (count(&inbox_client, "SELECT count(*) FROM inbox").await == 3_010).then_some(()),
    )
    .await;
    let stored: HashSet<String> = inbox_client
        .query("SELECT id FROM inbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        stored, events,
        "the inbox holds exactly the outbox's events"
    );
    // Every copy in Kafka was either stored or skipped as a duplicate.
    let copies = in_kafka.len() as f64;
    wait_for(
        "the inbox to have read every copy",
        Duration::from_secs(30),
        async || {
            let seen = metric(&inbox, "walrelay_inbox_records_stored_total").await
                + metric(&inbox, "walrelay_inbox_duplicates_skipped_total").await;
            (seen == copies).then_some(())
        },
    )
    .await;
    eprintln!(
        "{} records in Kafka for {} events; the inbox skipped {} duplicates",
        in_kafka.len(),
        events.len(),
        in_kafka.len() - events.len()
    );
    drop(relay);
}

/// The inbox's failed attempts to reach PostgreSQL so far, from its log.
fn failed_attempts(log: &str) -> usize {
    log.lines()
        .filter(|l| {
            l.contains("PostgreSQL is still unreachable")
                || l.contains("cannot read the stored offsets")
        })
        .count()
}

/// Whether an inbox reaches PostgreSQL now, from its /api/status.
async fn streaming(process: &RelayProcess) -> Option<bool> {
    let (_, body) = process.http_get("/api/status").await?;
    let status: serde_json::Value = serde_json::from_str(&body).ok()?;
    status["streaming"].as_bool()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebalance_while_postgresql_is_unreachable_loses_nothing_and_sigterm_stays_prompt() {
    let pg = PgCluster::start();
    let db = pg.create_database("inboxoutage").await;
    let url = pg.url(&db);
    setup(&url, &["--inbox"]);
    let client = pg.client(&db).await;
    let broker = Broker::shared();
    let topics = Topics::new("inboxoutage");
    let topic = topics.named("orders");
    broker.create_topic(&topic, 4);
    // a and c reach PostgreSQL through a proxy that is cut; b directly.
    let proxy = Proxy::start(pg.port).await;
    let proxied = format!(
        "postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable",
        proxy.port
    );
    // Long backoffs: a wait that ignored SIGTERM would show.
    let args = topics.inbox_args(&["--topic", &topic, "--max-backoff", "10s", "-X", SESSION]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut a = RelayProcess::start_inbox(&proxied, &broker.bootstrap(), &args);
    let mut c = RelayProcess::start_inbox(&proxied, &broker.bootstrap(), &args);
    wait_for(
        "a and c to share the partitions",
        Duration::from_secs(120),
        async || {
            let (x, y) = (assigned(&a).await?, assigned(&c).await?);
            (!x.is_empty() && !y.is_empty() && x.len() + y.len() == 4).then_some(())
        },
    )
    .await;
    let batch = |from: usize, to: usize| numbered("k", "ord", from..to);
    produce(broker, &topic, &batch(0, 1_000));
    wait_for("1,000 rows", Duration::from_secs(60), async || {
        (count(&client, "SELECT count(*) FROM inbox").await == 1_000).then_some(())
    })
    .await;

    proxy.cut();
    produce(broker, &topic, &batch(1_000, 2_000));
    // a and c fail to store their batches and try PostgreSQL again, the
    // wait doubling from 0.1 s: after c's seventh attempt its next is 10 s
    // away (the cap), beyond the few seconds a SIGTERM may take (leaving
    // the group, a flush bounded at 2 s).
    wait_for(
        "c to try PostgreSQL seven times",
        Duration::from_secs(60),
        async || (failed_attempts(&c.log()) >= 7).then_some(()),
    )
    .await;
    let started = Instant::now();
    let status = c.terminate(Duration::from_secs(6)).await;
    eprintln!(
        "c stopped {:.2} s after SIGTERM, PostgreSQL unreachable",
        started.elapsed().as_secs_f64()
    );
    assert!(status.success(), "{}", c.log());

    // c left the group and a new member joins: two rebalances while a
    // cannot read its stored offsets. a still answers the group.
    let mut b = RelayProcess::start_inbox(&url, &broker.bootstrap(), &args);
    let in_b = wait_for(
        "a and b to share the partitions",
        Duration::from_secs(120),
        async || {
            let (x, y) = (assigned(&a).await?, assigned(&b).await?);
            (!x.is_empty() && !y.is_empty() && x.len() + y.len() == 4).then_some(y)
        },
    )
    .await;
    let in_b: Vec<i32> = in_b.iter().map(|(_, p)| *p as i32).collect();
    // b stores its partitions' records from their stored offsets (500 ids
    // a partition).
    wait_for(
        "b to store its partitions' records",
        Duration::from_secs(60),
        async || {
            let n: i64 = client
                .query_one(
                    "SELECT count(*) FROM inbox WHERE \"partition\" = ANY($1)",
                    &[&in_b],
                )
                .await
                .unwrap()
                .get(0);
            (n == 500 * in_b.len() as i64).then_some(())
        },
    )
    .await;
    assert!(!streaming(&a).await.unwrap(), "a is still cut off");

    // PostgreSQL is back for a: every partition resumes at its stored
    // offset, nothing lost and nothing stored twice.
    proxy.restore();
    wait_for("2,000 rows", Duration::from_secs(60), async || {
        (count(&client, "SELECT count(*) FROM inbox").await == 2_000).then_some(())
    })
    .await;
    produce(broker, &topic, &batch(2_000, 2_400));
    wait_for("2,400 rows", Duration::from_secs(60), async || {
        (count(&client, "SELECT count(*) FROM inbox").await == 2_400).then_some(())
    })
    .await;
    let ids: HashSet<String> = client
        .query("SELECT id FROM inbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let expected: HashSet<String> = (0..2_400).map(|i| format!("ord-{i}")).collect();
    assert_eq!(ids, expected);
    let ends: BTreeMap<i32, i64> = broker
        .watermarks(&topic)
        .into_iter()
        .map(|(p, (_, high))| (p, high))
        .collect();
    wait_for("the offsets to reach the end", Duration::from_secs(30), async || {
        let rows = client
            .query(
                "SELECT \"partition\", next_offset FROM inbox_offsets WHERE consumer_group = $1 AND topic = $2",
                &[&topics.group(), &topic],
            )
            .await
            .unwrap();
        let stored: BTreeMap<i32, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        (stored == ends).then_some(())
    })
    .await;
    for inbox in [&a, &b] {
        assert_eq!(
            metric(inbox, "walrelay_inbox_duplicates_skipped_total").await,
            0.0,
            "no record was stored twice"
        );
    }
    assert!(a.terminate(Duration::from_secs(30)).await.success());
    assert!(b.terminate(Duration::from_secs(30)).await.success());
}

/// What the inbox stored for `topic`: partition -> (next offset, topic id).
async fn stored_offsets(
    client: &tokio_postgres::Client,
    topics: &Topics,
    topic: &str,
) -> BTreeMap<i32, (i64, Option<String>)> {
    client
        .query(
            "SELECT \"partition\", next_offset, topic_id FROM inbox_offsets WHERE consumer_group = $1 AND topic = $2",
            &[&topics.group(), &topic],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

/// Records `<id>-N` for N in `range`, over `partitions` partitions.
fn spread(id: &str, range: std::ops::Range<usize>, partitions: usize) -> Vec<Out> {
    range
        .map(|i| Out {
            partition: (i % partitions) as i32,
            key: format!("k{i}"),
            id: Some(format!("{id}-{i}")),
            value: format!("{{\"n\": {i}}}"),
        })
        .collect()
}

/// Each id in the inbox with its partition and offset.
async fn rows(client: &tokio_postgres::Client) -> BTreeMap<String, (i32, i64)> {
    client
        .query("SELECT id, \"partition\", \"offset\" FROM inbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

/// An inbox that must stop by itself with exit code 1: its log.
async fn fails(mut inbox: RelayProcess) -> String {
    let status = inbox.wait(Duration::from_secs(90)).await;
    assert_eq!(status.code(), Some(1), "{}", inbox.log());
    inbox.log()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_topic_made_again_with_fewer_records_stops_the_inbox_until_told_to_read_it_from_its_start()
 {
    let pg = PgCluster::start();
    let db = pg.create_database("inboxshrunk").await;
    let url = pg.url(&db);
    setup(&url, &["--inbox"]);
    let client = pg.client(&db).await;
    let broker = Broker::shared();
    let topics = Topics::new("inboxshrunk");
    let topic = topics.named("orders");
    broker.create_topic(&topic, 2);
    produce(broker, &topic, &spread("old", 0..200, 2));
    let args = topics.inbox_args(&["--topic", &topic, "-X", SESSION]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut inbox = RelayProcess::start_inbox(&url, &broker.bootstrap(), &args);
    wait_for(
        "the old topic stored",
        Duration::from_secs(60),
        async || {
            let stored = stored_offsets(&client, &topics, &topic).await;
            let next: Vec<i64> = stored.values().map(|(n, _)| *n).collect();
            (next == [100, 100]).then_some(())
        },
    )
    .await;
    assert!(inbox.terminate(Duration::from_secs(30)).await.success());
    // The topic id stored beside the offsets is the one Kafka's tools show.
    let old_id = broker.topic_id(&topic);
    let stored = stored_offsets(&client, &topics, &topic).await;
    assert!(
        stored.values().all(|(_, id)| id.as_ref() == Some(&old_id)),
        "{stored:?}, Kafka says {old_id}"
    );

    broker.delete_topic(&topic);
    // An inbox started while the topic is gone does not create it, though
    // the broker would (auto.create.topics.enable=true, Kafka's default).
    let mut waiting = RelayProcess::start_inbox(&url, &broker.bootstrap(), &args);
    wait_for(
        "the inbox to find the topic missing",
        Duration::from_secs(60),
        async || {
            waiting
                .log()
                .contains("UnknownTopicOrPartition")
                .then_some(())
        },
    )
    .await;
    assert!(
        !broker.topic_exists(&topic),
        "the inbox created the topic it consumes"
    );
    assert!(waiting.terminate(Duration::from_secs(30)).await.success());

    // Made again, shorter than the stored offsets: 11 records in
    // partition 0 (one of them repeats an id stored from the old topic),
    // 10 in partition 1.
    broker.create_topic(&topic, 2);
    let mut new_log = vec![Out {
        partition: 0,
        key: "k1".into(),
        id: Some("old-1".into()),
        value: "{\"n\": 1}".into(),
    }];
    new_log.extend(spread("new", 0..20, 2));
    produce(broker, &topic, &new_log);
    let new_id = broker.topic_id(&topic);
    assert_ne!(new_id, old_id);

    let log = fails(RelayProcess::start_inbox(&url, &broker.bootstrap(), &args)).await;
    for partition_facts in [
        format!(
            "topic {topic} was deleted and created again: its id is {new_id}, but the inbox stored next offset 100 of partition 0 under topic id {old_id}; the partition's log now runs from offset 0 to 11"
        ),
        format!(
            "its id is {new_id}, but the inbox stored next offset 100 of partition 1 under topic id {old_id}; the partition's log now runs from offset 0 to 10"
        ),
        "run `walrelay inbox` with --on-topic-reset earliest".to_owned(),
    ] {
        assert!(
            log.contains(&partition_facts),
            "{partition_facts:?} in:\n{log}"
        );
    }
    // Nothing stored, nothing moved.
    assert_eq!(rows(&client).await.len(), 200);
    let stored = stored_offsets(&client, &topics, &topic).await;
    assert_eq!(
        stored.values().cloned().collect::<Vec<_>>(),
        [(100, Some(old_id.clone())), (100, Some(old_id.clone()))]
    );

    let mut earliest_args = args.clone();
    earliest_args.extend(["--on-topic-reset", "earliest"]);
    let mut inbox = RelayProcess::start_inbox(&url, &broker.bootstrap(), &earliest_args);
    wait_for(
        "the new log stored, each id once",
        Duration::from_secs(60),
        async || {
            let stored = stored_offsets(&client, &topics, &topic).await;
            let expected = BTreeMap::from([
                (0, (11, Some(new_id.clone()))),
                (1, (10, Some(new_id.clone()))),
            ]);
            (stored == expected).then_some(())
        },
    )
    .await;
    // Counted once the batch committed: every record of the new log seen.
    wait_for("the new log counted", Duration::from_secs(30), async || {
        let seen = metric(&inbox, "walrelay_inbox_records_stored_total").await
            + metric(&inbox, "walrelay_inbox_duplicates_skipped_total").await;
        (seen == 21.0).then_some(())
    })
    .await;
    assert_eq!(
        metric(&inbox, "walrelay_inbox_topic_resets_total").await,
        2.0
    );
    assert_eq!(
        metric(&inbox, "walrelay_inbox_records_stored_total").await,
        20.0
    );
    assert_eq!(
        metric(&inbox, "walrelay_inbox_duplicates_skipped_total").await,
        1.0,
        "old-1, stored from the old topic"
    );
    assert!(inbox.terminate(Duration::from_secs(30)).await.success());

    let rows = rows(&client).await;
    assert_eq!(rows.len(), 220);
    let in_kafka = broker.consume_all(&topic);
    assert_eq!(in_kafka.len(), 21);
    for record in &in_kafka {
        let id = record.header("id").unwrap();
        let expected = if id == "old-1" {
            (1, 0) // the old topic's copy, stored first
        } else {
            (record.partition, record.offset)
        };
        assert_eq!(rows.get(id), Some(&expected), "{id}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_topic_made_again_that_grew_past_the_stored_offset_is_caught_by_its_topic_id() {
    let pg = PgCluster::start();
    let db = pg.create_database("inboxgrown").await;
    let url = pg.url(&db);
    setup(&url, &["--inbox"]);
    let client = pg.client(&db).await;
    let broker = Broker::shared();
    let topics = Topics::new("inboxgrown");
    let topic = topics.named("orders");
    broker.create_topic(&topic, 1);
    produce(broker, &topic, &spread("old", 0..50, 1));
    let args = topics.inbox_args(&["--topic", &topic, "-X", SESSION]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut inbox = RelayProcess::start_inbox(&url, &broker.bootstrap(), &args);
    wait_for(
        "the old topic stored",
        Duration::from_secs(60),
        async || {
            let stored = stored_offsets(&client, &topics, &topic).await;
            (stored.get(&0).map(|(n, _)| *n) == Some(50)).then_some(())
        },
    )
    .await;
    assert!(inbox.terminate(Duration::from_secs(30)).await.success());
    let old_id = broker.topic_id(&topic);

    // Made again and grown past offset 50: the offset alone cannot tell.
    broker.delete_topic(&topic);
    broker.create_topic(&topic, 1);
    produce(broker, &topic, &spread("new", 0..80, 1));
    let new_id = broker.topic_id(&topic);

    let log = fails(RelayProcess::start_inbox(&url, &broker.bootstrap(), &args)).await;
    let facts = format!(
        "topic {topic} was deleted and created again: its id is {new_id}, but the inbox stored next offset 50 of partition 0 under topic id {old_id}; the partition's log now runs from offset 0 to 80"
    );
    assert!(log.contains(&facts), "{facts:?} in:\n{log}");
    assert_eq!(rows(&client).await.len(), 50, "nothing of the new topic");

    let mut earliest_args = args.clone();
    earliest_args.extend(["--on-topic-reset", "earliest"]);
    let mut inbox = RelayProcess::start_inbox(&url, &broker.bootstrap(), &earliest_args);
    wait_for(
        "the whole new log stored",
        Duration::from_secs(60),
        async || {
            let stored = stored_offsets(&client, &topics, &topic).await;
            (stored.get(&0) == Some(&(80, Some(new_id.clone())))).then_some(())
        },
    )
    .await;
    assert!(inbox.terminate(Duration::from_secs(30)).await.success());
    let rows = rows(&client).await;
    let new_rows: BTreeMap<&str, i64> = rows
        .iter()
        .filter(|(id, _)| id.starts_with("new-"))
        .map(|(id, (_, offset))| (id.as_str(), *offset))
        .collect();
    let expected: BTreeMap<String, i64> = (0..80).map(|i| (format!("new-{i}"), i)).collect();
    let expected: BTreeMap<&str, i64> = expected.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(
        new_rows, expected,
        "every record of the new topic, from offset 0"
    );
    assert_eq!(rows.len(), 130);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_offsets_table_made_before_topic_ids_gets_the_column_and_the_inbox_resumes_from_it() {
    let pg = PgCluster::start();
    let db = pg.create_database("inboxolder").await;
    let url = pg.url(&db);
    setup(&url, &["--inbox"]);
    let client = pg.client(&db).await;
    // The offsets table as an older walrelay made it, with an offset it
    // stored.
    let old_table = "DROP TABLE inbox_offsets;
        CREATE TABLE inbox_offsets (
          consumer_group text NOT NULL,
          topic          text NOT NULL,
          \"partition\"    integer NOT NULL,
          next_offset    bigint NOT NULL,
          updated_at     timestamptz NOT NULL DEFAULT now(),
          PRIMARY KEY (consumer_group, topic, \"partition\"))";
    client.batch_execute(old_table).await.unwrap();
    let broker = Broker::shared();
    let topics = Topics::new("inboxolder");
    let topic = topics.named("orders");
    broker.create_topic(&topic, 1);
    produce(broker, &topic, &spread("evt", 0..30, 1));
    client
        .execute(
            "INSERT INTO inbox_offsets (consumer_group, topic, \"partition\", next_offset) VALUES ($1, $2, 0, 10)",
            &[&topics.group(), &topic],
        )
        .await
        .unwrap();

    let args = topics.inbox_args(&["--topic", &topic, "-X", SESSION]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut inbox = RelayProcess::start_inbox(&url, &broker.bootstrap(), &args);
    let topic_id = broker.topic_id(&topic);
    wait_for("the rest stored", Duration::from_secs(60), async || {
        let stored = stored_offsets(&client, &topics, &topic).await;
        (stored.get(&0) == Some(&(30, Some(topic_id.clone())))).then_some(())
    })
    .await;
    assert!(inbox.terminate(Duration::from_secs(30)).await.success());
    assert!(
        inbox.log().contains("added column topic_id"),
        "{}",
        inbox.log()
    );
    let ids: Vec<String> = rows(&client).await.into_keys().collect();
    let mut expected: Vec<String> = (10..30).map(|i| format!("evt-{i}")).collect();
    expected.sort();
    assert_eq!(
        ids, expected,
        "resumed at the offset the older walrelay stored"
    );

    // `setup --inbox` brings such a table up to date too.
    client.batch_execute(old_table).await.unwrap();
    assert!(
        setup(&url, &["--inbox"])
            .contains(&"added column topic_id to table public.inbox_offsets".to_owned())
    );
    assert_eq!(setup(&url, &["--inbox"]).len(), 3, "once");
}

/// Consumer options that would let the inbox create topics, store records
/// of aborted transactions, or skip records on its own are refused before
/// anything starts: exit 2, the option named, and what to do instead.
#[test]
fn consumer_options_that_could_lose_or_invent_records_exit_2_naming_the_fix() {
    for (args, says) in [
        (
            &["-X", "allow.auto.create.topics=true"][..],
            "-X allow.auto.create.topics=true: the inbox never creates a topic",
        ),
        (
            &["-X", "isolation.level=read_uncommitted"][..],
            "-X isolation.level=read_uncommitted: the inbox reads read_committed",
        ),
        (
            &["-X", "auto.offset.reset=latest"][..],
            "-X auto.offset.reset: the inbox starts each partition at the offset stored in PostgreSQL",
        ),
        (&["--on-topic-reset", "latest"][..], "--on-topic-reset"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_walrelay"))
            .args(["inbox", "--pg-url", "postgres://postgres@127.0.0.1:1/db"])
            .args(["--brokers", "127.0.0.1:1", "--topic", "orders"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
