//! A PostgreSQL 17+ primary failover under load: a primary and a physical
//! standby keeping a copy of the relay's failover slot, with
//! synchronized_standby_slots on the primary; the relay is given both
//! hosts. The primary dies (`-m immediate`), the standby is promoted, and
//! the relay carries on from the synchronized slot: every event of the new
//! primary's outbox is in Kafka once, and Kafka holds no event the new
//! primary does not have.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::kafka::{Broker, Topics};
use support::proxy::Proxy;
use support::relay::RelayProcess;
use support::workload::{current_lsn, lsn_of, setup, steady_writer};
use support::{PgCluster, PgOptions, free_port, wait_for};

/// Failover slots came with PostgreSQL 17: the server under test when it
/// has them (WALRELAY_TEST_PG), else 17.
fn failover_major() -> u32 {
    support::pg_major().max(17)
}

/// Primary, standby and a database with the outbox, the failover slot
/// and synchronized_standby_slots.
async fn primary_and_standby() -> (PgCluster, PgCluster, String) {
    let primary = PgCluster::start_version(failover_major(), PgOptions::default());
    let db = primary.create_database("failover").await;
    let lines = setup(&primary.url(&db), &[]);
    assert!(
        lines.iter().any(|l| l.contains("is a failover slot")),
        "{lines:?}"
    );
    primary
        .client(&db)
        .await
        .batch_execute("SELECT pg_create_physical_replication_slot('standby1', true)")
        .await
        .unwrap();
    let standby = primary.standby("standby1", &db);
    // Set on the primary after the copy: the promoted standby has no
    // standby of its own, and a slot named here that it lacks would hold
    // its logical decoding (`walrelay check` says so).
    let client = primary.client(&db).await;
    for sql in [
        "ALTER SYSTEM SET synchronized_standby_slots = 'standby1'",
        "SELECT pg_reload_conf()",
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    (primary, standby, db)
}

/// Waits until the standby holds a synchronized, persistent copy of the
/// slot. A synced slot is temporary until the primary's has moved past what
/// the standby can decode from; a promotion drops it then.
async fn synchronized_copy(standby: &tokio_postgres::Client) {
    wait_for(
        "the standby's synchronized copy of the slot",
        Duration::from_secs(90),
        async || {
            let row = standby
                .query_opt(
                    "SELECT synced AND NOT temporary FROM pg_replication_slots WHERE slot_name = 'walrelay'",
                    &[],
                )
                .await
                .ok()??;
            row.get::<_, bool>(0).then_some(())
        },
    )
    .await;
}

/// The ids of the events in `client`'s outbox.
async fn outbox_ids(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query("SELECT id::text FROM outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// How many records carry each event id.
fn copies_by_id(records: &[support::kafka::Record]) -> HashMap<&str, usize> {
    let mut copies: HashMap<&str, usize> = HashMap::new();
    for r in records {
        *copies.entry(r.header("id").unwrap()).or_default() += 1;
    }
    copies
}

/// A writer that commits outbox rows through whichever host is the
/// primary, reconnecting across the failover, until told to stop.
fn writer(
    primary: &PgCluster,
    standby: &PgCluster,
    db: &str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    let conninfo = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname={db} target_session_attrs=read-write connect_timeout=2",
        primary.port, standby.port
    );
    steady_writer(conninfo, "failover", stop)
}

async fn fail_over(broker_down_during_promotion: bool) {
    let (primary, standby, db) = primary_and_standby().await;
    let broker_port = free_port();
    let broker = Broker::start_behind(broker_port);
    let link = Proxy::start_on(broker_port, broker.port).await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{db}?sslmode=disable&target_session_attrs=read-write",
        primary.port, standby.port
    );
    let mut relay = RelayProcess::start(
        &url,
        &broker.bootstrap(),
        &["--max-backoff", "1s", "--heartbeat-interval", "1s"],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let writing = writer(&primary, &standby, &db, Arc::clone(&stop));

    // The standby keeps a synchronized copy of the slot.
    let standby_client = standby.client(&db).await;
    synchronized_copy(&standby_client).await;
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_walrelay"))
        .args(["check", "--pg-url", &url])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(
        report.contains("standby 127.0.0.1:")
            && report.contains("has a synchronized copy of slot walrelay"),
        "check sees the standby ready: {report}"
    );
    assert!(!report.contains("FAIL"), "{report}");
    tokio::time::sleep(Duration::from_secs(2)).await;

    if broker_down_during_promotion {
        link.cut();
    }
    primary.stop("immediate");
    let failed = Instant::now();
    standby.promote();
    eprintln!("promoted {:?} after the primary died", failed.elapsed());
    tokio::time::sleep(Duration::from_secs(4)).await;
    if broker_down_during_promotion {
        link.restore();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let written = writing.await.unwrap();

    // The truth is the new primary's outbox.
    let new_primary = standby.client(&db).await;
    let end = current_lsn(&new_primary).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let confirmed = lsn_of(
            &new_primary,
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'walrelay'",
        )
        .await;
        if confirmed >= end {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the relay did not confirm the new primary's WAL ({confirmed} < {end}); relay log:\n{}",
            relay.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ids = outbox_ids(&new_primary).await;
    let records = broker.consume_all("outbox.event.failover");
    let copies = copies_by_id(&records);
    for id in &ids {
        assert_eq!(
            copies.get(id.as_str()).copied().unwrap_or(0),
            1,
            "event {id} of the new primary's outbox; relay log:\n{}",
            relay.log()
        );
    }
    let phantoms: Vec<&&str> = copies
        .keys()
        .filter(|id| !ids.iter().any(|i| i == **id))
        .collect();
    assert!(
        phantoms.is_empty(),
        "events the new primary does not have: {phantoms:?}"
    );
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "the relay never exits; log:\n{}",
        relay.log()
    );
    let (_, status) = relay.http_get("/api/status").await.unwrap();
    assert!(
        status.contains(&format!("\"host\":\"127.0.0.1:{}\"", standby.port)),
        "streams from the new primary: {status}"
    );
    eprintln!(
        "failover{}: {written} events written, {} in the new primary, {} records",
        if broker_down_during_promotion {
            " with the broker down"
        } else {
            ""
        },
        ids.len(),
        records.len()
    );
    assert!(relay.terminate(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_promoted_standby_carries_the_slot_and_every_event_arrives_once() {
    fail_over(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_promotion_while_the_broker_is_down_loses_nothing_and_publishes_no_phantom() {
    fail_over(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn check_names_the_fix_for_each_missing_piece_of_a_failover_and_setup_mends_the_slot() {
    let primary = PgCluster::start_version(failover_major(), PgOptions::default());
    let db = primary.create_database("failcheck").await;
    setup(&primary.url(&db), &["--no-failover"]);
    primary
        .client(&db)
        .await
        .batch_execute("SELECT pg_create_physical_replication_slot('standby1', true)")
        .await
        .unwrap();
    let standby = primary.standby("standby1", &db);
    let standby_admin = standby.client("postgres").await;
    for sql in [
        "ALTER SYSTEM SET sync_replication_slots = off".to_owned(),
        "ALTER SYSTEM SET hot_standby_feedback = off".to_owned(),
        format!(
            "ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port={} user=postgres'",
            primary.port
        ),
        "SELECT pg_reload_conf()".to_owned(),
    ] {
        standby_admin.batch_execute(&sql).await.unwrap();
    }
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{db}?sslmode=disable",
        primary.port, standby.port
    );
    let check = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_walrelay"))
            .args(["check", "--pg-url", &url])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, report) = check();
    assert_eq!(code, Some(1), "{report}");
    let address = format!("127.0.0.1:{}", standby.port);
    for (problem, fix) in [
        (
            "FAIL  replication slot walrelay is not a failover slot".to_owned(),
            "fix: walrelay setup (makes it one)".to_owned(),
        ),
        (
            "FAIL  synchronized_standby_slots is empty: the relay can receive and publish a transaction the standby never gets".to_owned(),
            "fix: ALTER SYSTEM SET synchronized_standby_slots = 'standby1'; SELECT pg_reload_conf()".to_owned(),
        ),
        (
            format!("FAIL  standby {address}: sync_replication_slots is off"),
            "fix: on the standby: ALTER SYSTEM SET sync_replication_slots = on".to_owned(),
        ),
        (
            format!("FAIL  standby {address}: hot_standby_feedback is off"),
            "fix: on the standby: ALTER SYSTEM SET hot_standby_feedback = on".to_owned(),
        ),
        (
            format!("FAIL  standby {address} streams through standby1, which synchronized_standby_slots on the primary does not list"),
            "fix: on the primary: ALTER SYSTEM SET synchronized_standby_slots = 'standby1'".to_owned(),
        ),
        (
            format!("FAIL  standby {address}: primary_conninfo names no database"),
            "fix: on the standby: add dbname=".to_owned(),
        ),
    ] {
        let at = report
            .find(&problem)
            .unwrap_or_else(|| panic!("{problem:?} missing: {report}"));
        let next = &report[at..].lines().nth(1).unwrap_or_default();
        assert!(next.trim_start().starts_with(&fix), "{problem}: {next}\n{report}");
    }

    // Mend it: setup makes the existing slot a failover slot; the
    // settings are fixed as check said; the standby copies the slot.
    let lines = setup(&primary.url(&db), &[]);
    assert!(
        lines.contains(&"made replication slot walrelay a failover slot".to_owned()),
        "{lines:?}"
    );
    for sql in [
        "ALTER SYSTEM RESET sync_replication_slots".to_owned(),
        "ALTER SYSTEM RESET hot_standby_feedback".to_owned(),
        "ALTER SYSTEM RESET primary_conninfo".to_owned(),
        "SELECT pg_reload_conf()".to_owned(),
    ] {
        standby_admin.batch_execute(&sql).await.unwrap();
    }
    let primary_client = primary.client(&db).await;
    for sql in [
        "ALTER SYSTEM SET synchronized_standby_slots = 'standby1'",
        "SELECT pg_reload_conf()",
    ] {
        primary_client.batch_execute(sql).await.unwrap();
    }
    // A relay moves the slot, so the standby's copy becomes usable.
    let args = Topics::new("failovercheck").relay_args(&["--heartbeat-interval", "500ms"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _relay = RelayProcess::start(&primary.url(&db), &Broker::shared().bootstrap(), &args);
    let report = wait_for("check to pass", Duration::from_secs(90), async || {
        let (code, report) = check();
        (code == Some(0) && report.contains("has a synchronized copy of slot walrelay"))
            .then_some(report)
    })
    .await;
    assert!(!report.contains("FAIL"), "{report}");
}

/// Without synchronized_standby_slots the standby's copy of the slot can
/// be behind what the relay confirmed on the primary. Here the standby
/// lags (its WAL stream is cut), the relay confirms W on the primary, the
/// standby is promoted at S < W and takes commits at once: every one of
/// them arrives, because a session on another server starts from that
/// server's slot and never from a position learned elsewhere.
#[tokio::test(flavor = "multi_thread")]
async fn a_lagging_standby_promoted_behind_the_relays_watermark_delivers_every_new_commit() {
    let primary = PgCluster::start_version(failover_major(), PgOptions::default());
    let db = primary.create_database("lagging").await;
    setup(&primary.url(&db), &[]);
    primary
        .client(&db)
        .await
        .batch_execute("SELECT pg_create_physical_replication_slot('standby1', true)")
        .await
        .unwrap();
    let standby = primary.standby("standby1", &db);
    // The standby's WAL comes through a proxy, so that it can be made to lag.
    let wal_link = Proxy::start(primary.port).await;
    let standby_admin = standby.client("postgres").await;
    for sql in [
        format!(
            "ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port={} user=postgres dbname={db}'",
            wal_link.port
        ),
        "SELECT pg_reload_conf()".to_owned(),
    ] {
        standby_admin.batch_execute(&sql).await.unwrap();
    }
    let broker = Broker::start();
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{db}?sslmode=disable&target_session_attrs=read-write",
        primary.port, standby.port
    );
    let mut relay = RelayProcess::start(
        &url,
        &broker.bootstrap(),
        &["--max-backoff", "1s", "--heartbeat-interval", "1s"],
    );
    let insert = async |client: &tokio_postgres::Client, transactions: usize| {
        for _ in 0..transactions {
            client
                .execute(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                     SELECT 'lagging', 'agg-' || (g % 7), 'E', '{}' FROM generate_series(1, 10) g",
                    &[],
                )
                .await
                .unwrap();
        }
    };
    let confirmed_on = async |client: &tokio_postgres::Client| {
        lsn_of(
            client,
            "SELECT coalesce(confirmed_flush_lsn, '0/0')::text FROM pg_replication_slots WHERE slot_name = 'walrelay'",
        )
        .await
    };

    // Both in step: the standby has a synchronized copy of the slot.
    let primary_client = primary.client(&db).await;
    insert(&primary_client, 10).await;
    let standby_client = standby.client(&db).await;
    synchronized_copy(&standby_client).await;

    // The standby falls behind; the relay publishes and confirms on.
    wal_link.cut();
    let fork = lsn_of(&standby_client, "SELECT pg_last_wal_receive_lsn()::text").await;
    insert(&primary_client, 20).await;
    let end = current_lsn(&primary_client).await;
    wait_for(
        "the relay to confirm the primary's WAL",
        Duration::from_secs(60),
        async || (confirmed_on(&primary_client).await >= end).then_some(()),
    )
    .await;
    let watermark = confirmed_on(&primary_client).await;
    let synced = confirmed_on(&standby_client).await;
    assert!(
        synced <= fork && fork < watermark,
        "staged: the standby's slot ({synced}) and WAL ({fork}) are behind the relay's watermark ({watermark})"
    );

    // The primary dies; the lagging standby is promoted and written to at
    // once, at positions the relay has already confirmed on the old one.
    primary.stop("immediate");
    standby.promote();
    let new_primary = standby.client(&db).await;
    insert(&new_primary, 40).await;
    let new_end = current_lsn(&new_primary).await;
    assert!(
        fork < watermark && new_end > watermark,
        "the new commits span S..W"
    );
    wait_for(
        "the relay to confirm the new primary's WAL",
        Duration::from_secs(90),
        async || (confirmed_on(&new_primary).await >= new_end).then_some(()),
    )
    .await;

    let ids = outbox_ids(&new_primary).await;
    let records = broker.consume_all("outbox.event.lagging");
    let copies = copies_by_id(&records);
    let missing: Vec<&String> = ids
        .iter()
        .filter(|id| !copies.contains_key(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of the new primary's {} events never arrived: {:?}; relay log:\n{}",
        missing.len(),
        ids.len(),
        &missing[..missing.len().min(5)],
        relay.log()
    );
    let doubled: Vec<(&&str, &usize)> = copies.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "published twice: {doubled:?}");
    eprintln!(
        "lagging standby: forked at {fork}, relay had confirmed {watermark}; {} events on the new primary, all arrived; {} records",
        ids.len(),
        records.len()
    );
    assert!(relay.child.try_wait().unwrap().is_none(), "{}", relay.log());
    assert!(relay.terminate(Duration::from_secs(30)).await.success());
}
