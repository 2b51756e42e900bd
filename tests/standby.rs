//! Decoding from a physical standby (PostgreSQL 16+): a primary, a
//! streaming standby with the relay's slot (made by `walrelay setup` on
//! the standby, with `--primary-url`), a writer on the primary and the
//! relay on the standby. Each event arrives once under the writer and
//! through the standby's promotion; an idle outbox's slot still advances
//! (the heartbeat goes to the primary); and a recovery conflict that
//! invalidates the standby's slot stops the relay with the cause and the
//! fix, and `walrelay recover` brings the events back.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::kafka::{Broker, Record, Topics};
use support::relay::RelayProcess;
use support::workload::{current_lsn, lsn_of, setup, steady_writer};
use support::{PgCluster, PgOptions, wait_for};
use walrelay::lsn::Lsn;

/// Logical decoding on a standby came with PostgreSQL 16: the server under
/// test when it has it (WALRELAY_TEST_PG), else 16.
fn standby_major() -> u32 {
    support::pg_major().max(16)
}

/// A primary, its standby (through the physical slot standby1, with
/// hot_standby_feedback on), and a database set up for decoding on the
/// standby.
struct Pair {
    primary: PgCluster,
    standby: PgCluster,
    db: String,
    topics: Topics,
}

impl Pair {
    async fn start(name: &str) -> Pair {
        let primary = PgCluster::start_version(standby_major(), PgOptions::default());
        let db = primary.create_database(name).await;
        primary
            .client(&db)
            .await
            .batch_execute("SELECT pg_create_physical_replication_slot('standby1', true)")
            .await
            .unwrap();
        let standby = primary.standby("standby1", &db);
        // On an idle primary the standby's new slot would wait for a
        // running-transactions record: setup asks the primary for one.
        let lines = setup(
            &standby.url(&db),
            &["--primary-url", &primary.url(&db), "--no-failover"],
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("created replication slot walrelay")),
            "{lines:?}"
        );
        assert!(
            lines.iter().any(|l| l.contains("is a standby")),
            "{lines:?}"
        );
        Pair {
            primary,
            standby,
            db,
            topics: Topics::new(name),
        }
    }

    /// `walrelay run` on the standby, writing through the primary.
    fn relay(&self, args: &[&str]) -> RelayProcess {
        let primary = self.primary.url(&self.db);
        let mut all = vec!["--primary-url", primary.as_str(), "--max-backoff", "1s"];
        all.extend_from_slice(args);
        self.relay_without_primary(&all)
    }

    fn relay_without_primary(&self, args: &[&str]) -> RelayProcess {
        let args = self.topics.relay_args(args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        RelayProcess::start(
            &self.standby.url(&self.db),
            &Broker::shared().bootstrap(),
            &args,
        )
    }

    /// A walrelay command (check, recover) on the standby, its output.
    fn command(&self, name: &str, args: &[&str]) -> std::process::Output {
        let primary = self.primary.url(&self.db);
        let mut all = vec!["--primary-url", primary.as_str()];
        all.extend_from_slice(args);
        self.command_on(&self.standby, name, &all)
    }

    /// A walrelay command on `server` of the pair, its output.
    fn command_on(&self, server: &PgCluster, name: &str, args: &[&str]) -> std::process::Output {
        let replay = matches!(name, "recover" | "backfill");
        let args = if replay {
            self.topics.relay_args(args)
        } else {
            args.iter().map(|a| (*a).to_owned()).collect()
        };
        std::process::Command::new(env!("CARGO_BIN_EXE_walrelay"))
            .args([name, "--pg-url", &server.url(&self.db)])
            .args(&args)
            .args(if replay {
                vec!["--brokers".to_owned(), Broker::shared().bootstrap()]
            } else {
                vec![]
            })
            .output()
            .unwrap()
    }

    /// Waits until the standby's slot has confirmed everything the primary
    /// had written by now (the standby replays it first).
    async fn wait_caught_up(&self, relay: &RelayProcess) {
        let primary = self.primary.client(&self.db).await;
        let end = current_lsn(&primary).await;
        let standby = self.standby.client(&self.db).await;
        wait_caught_up_on(&standby, end, relay).await;
    }
}

async fn wait_caught_up_on(client: &tokio_postgres::Client, end: Lsn, relay: &RelayProcess) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let confirmed = confirmed(client).await;
        if confirmed >= end {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the relay did not confirm {end} ({confirmed}); relay log:\n{}",
            relay.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn confirmed(client: &tokio_postgres::Client) -> Lsn {
    lsn_of(
        client,
        "SELECT coalesce(confirmed_flush_lsn, '0/0')::text FROM pg_replication_slots WHERE slot_name = 'walrelay'",
    )
    .await
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

/// Every event of `ids` is in `records` once, and nothing else is.
fn assert_each_once(ids: &[String], records: &[Record], relay_log: &str) {
    let mut copies: HashMap<&str, usize> = HashMap::new();
    for r in records {
        *copies.entry(r.header("id").unwrap()).or_default() += 1;
    }
    let wrong: Vec<(&String, usize)> = ids
        .iter()
        .map(|id| (id, copies.get(id.as_str()).copied().unwrap_or(0)))
        .filter(|(_, n)| *n != 1)
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} events did not arrive exactly once (id, copies): {:?}; relay log:\n{relay_log}",
        wrong.len(),
        ids.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert_eq!(
        records.len(),
        ids.len(),
        "no record of an event the outbox does not have"
    );
}

/// A writer committing 5 events every 20 ms on the primary (whichever
/// host is it), until told to stop.
fn writer(
    pair: &Pair,
    aggregate_type: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    let conninfo = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname={} target_session_attrs=read-write connect_timeout=2",
        pair.primary.port, pair.standby.port, pair.db
    );
    steady_writer(conninfo, aggregate_type, stop)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_on_the_standby_delivers_each_event_of_a_writer_once() {
    let pair = Pair::start("standbywriter").await;
    // Setup again changes nothing; without the primary it says what it needs.
    let again = setup(
        &pair.standby.url(&pair.db),
        &[
            "--primary-url",
            &pair.primary.url(&pair.db),
            "--no-failover",
        ],
    );
    assert!(
        again.contains(&"replication slot walrelay exists".to_owned()),
        "{again:?}"
    );
    let alone = std::process::Command::new(env!("CARGO_BIN_EXE_walrelay"))
        .args(["setup", "--pg-url", &pair.standby.url(&pair.db)])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&alone.stderr);
    assert!(!alone.status.success(), "{said}");
    assert!(
        said.contains("--pg-url is a standby") && said.contains("--primary-url"),
        "{said}"
    );
    let report = pair.command("check", &[]);
    let text = String::from_utf8_lossy(&report.stdout);
    for line in [
        "hot_standby_feedback = on",
        "the primary's wal_level = logical",
    ] {
        assert!(text.contains(line), "{line:?} missing: {text}");
    }
    assert!(!text.contains("FAIL"), "{text}");

    // A producer limit below one event's size: that event is refused for
    // good and kept in the dead-letter table, which only the primary can
    // take.
    let mut relay = pair.relay(&[
        "--heartbeat-interval",
        "1s",
        "-X",
        "message.max.bytes=100000",
    ]);
    let stop = Arc::new(AtomicBool::new(false));
    let writing = writer(&pair, "standby", Arc::clone(&stop));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let primary = pair.primary.client(&pair.db).await;
    primary
        .batch_execute(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload)
               VALUES ('00000000-0000-0000-0000-00000000000b', 'big', 'k', 'TooBig', jsonb_build_object('blob', repeat('y', 200000)))",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let written = writing.await.unwrap();
    pair.wait_caught_up(&relay).await;
    let kept: i64 = primary
        .query_one(
            "SELECT count(*) FROM walrelay_dead_letters WHERE id = '00000000-0000-0000-0000-00000000000b'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 1, "kept on the primary; relay log:\n{}", relay.log());
    primary
        .execute("DELETE FROM outbox WHERE aggregate_type = 'big'", &[])
        .await
        .unwrap();

    let ids = outbox_ids(&primary).await;
    assert!(ids.len() >= written && written > 0, "{written} written");
    let records = Broker::shared().consume_all(&pair.topics.topic("standby"));
    assert_each_once(&ids, &records, &relay.log());
    let uncommitted = Broker::shared().consume_all_uncommitted(&pair.topics.topic("standby"));
    eprintln!(
        "read_committed: {} records; read_uncommitted: {}",
        records.len(),
        uncommitted.len()
    );

    // The slot's lag is measured against the standby's replay position,
    // and the heartbeat, written on the primary, never failed.
    let metrics = wait_for("the lag metric", Duration::from_secs(10), async || {
        let (_, text) = relay.http_get("/metrics").await?;
        text.contains("walrelay_slot_lag_bytes{").then_some(text)
    })
    .await;
    let heartbeat_errors =
        support::relay::metric_in(&metrics, "walrelay_heartbeat_errors_total").unwrap_or(0.0);
    assert_eq!(heartbeat_errors, 0.0, "{}", relay.log());
    let (_, status) = relay.http_get("/api/status").await.unwrap();
    assert!(
        status.contains(&format!("\"host\":\"127.0.0.1:{}\"", pair.standby.port)),
        "streams from the standby: {status}"
    );
    eprintln!(
        "standby under a writer: {written} events written, {} records",
        records.len()
    );

    // A backfill on the standby reads the rows there and keeps its
    // progress on the primary.
    let backfill = pair.command(
        "backfill",
        &[
            "--name",
            "again",
            "--topic-template",
            "again.{aggregate_type}",
        ],
    );
    assert!(
        backfill.status.success(),
        "backfill failed: {}{}",
        String::from_utf8_lossy(&backfill.stdout),
        String::from_utf8_lossy(&backfill.stderr)
    );
    let again = Broker::shared().consume_all(&pair.topics.named("again.standby"));
    assert_each_once(&ids, &again, "(backfill)");
    let progress: i64 = primary
        .query_one("SELECT count(*) FROM walrelay_backfill WHERE done", &[])
        .await
        .unwrap()
        .get(0);
    assert!(progress >= 1, "the backfill's progress is on the primary");
    assert!(relay.terminate(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_standby_promoted_mid_stream_delivers_each_event_once() {
    let pair = Pair::start("standbypromoted").await;
    let mut relay = pair.relay(&["--heartbeat-interval", "1s"]);
    let stop = Arc::new(AtomicBool::new(false));
    let writing = writer(&pair, "promoted", Arc::clone(&stop));
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The primary dies; its standby, where the relay decodes, is promoted
    // and takes the writes.
    pair.primary.stop("immediate");
    pair.standby.promote();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let written = writing.await.unwrap();

    // The truth is the new primary's outbox.
    let new_primary = pair.standby.client(&pair.db).await;
    let end = current_lsn(&new_primary).await;
    wait_caught_up_on(&new_primary, end, &relay).await;
    let ids = outbox_ids(&new_primary).await;
    let records = Broker::shared().consume_all(&pair.topics.topic("promoted"));
    assert_each_once(&ids, &records, &relay.log());
    let uncommitted = Broker::shared().consume_all_uncommitted(&pair.topics.topic("promoted"));
    eprintln!(
        "read_committed: {} records; read_uncommitted: {}",
        records.len(),
        uncommitted.len()
    );
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "the relay streams on; log:\n{}",
        relay.log()
    );
    // The heartbeat now goes to the promoted server: the slot moves on
    // while the outbox is idle.
    let idle = current_lsn(&new_primary).await;
    wait_caught_up_on(&new_primary, idle, &relay).await;
    eprintln!(
        "promoted mid-stream: {written} events written, {} on the new primary, {} records",
        ids.len(),
        records.len()
    );
    assert!(relay.terminate(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_outbox_on_the_standby_still_advances_its_slot() {
    let pair = Pair::start("standbyidle").await;

    // Without the primary's URL the heartbeat has nowhere to go: the
    // relay says so, and names the fix.
    let mut alone = pair.relay_without_primary(&[]);
    let status = alone.wait(Duration::from_secs(30)).await;
    assert!(!status.success());
    let log = alone.log();
    assert!(
        log.contains("--pg-url is a standby") && log.contains("--primary-url"),
        "{log}"
    );

    let relay = pair.relay(&["--heartbeat-interval", "500ms"]);
    let standby = pair.standby.client(&pair.db).await;
    let primary = pair.primary.client(&pair.db).await;
    primary
        .batch_execute("CREATE TABLE busy (n int)")
        .await
        .unwrap();
    let start = confirmed(&standby).await;
    // The database is busy, the outbox idle: the slot must not pin WAL.
    for round in 0..3 {
        primary
            .execute("INSERT INTO busy SELECT generate_series(1, 1000)", &[])
            .await
            .unwrap();
        let end = current_lsn(&primary).await;
        wait_caught_up_on(&standby, end, &relay).await;
        eprintln!("idle outbox, round {round}: the standby's slot confirmed {end}");
    }
    assert!(confirmed(&standby).await > start);
    let records = Broker::shared().consume_all(&pair.topics.topic("idle"));
    assert!(records.is_empty(), "heartbeats are never published");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recovery_conflict_invalidating_the_standby_slot_stops_the_relay_and_recover_brings_the_events_back()
 {
    let pair = Pair::start("standbyconflict").await;
    let primary = pair.primary.client(&pair.db).await;
    let standby_admin = pair.standby.client("postgres").await;
    let insert = async |n: i32| {
        primary
            .execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                 SELECT 'conflict', 'agg-' || (g % 7), 'E', '{}' FROM generate_series(1, $1::int) g",
                &[&n],
            )
            .await
            .unwrap();
    };
    let mut relay = pair.relay(&["--heartbeat-interval", "1s"]);
    insert(50).await;
    pair.wait_caught_up(&relay).await;

    // Without hot_standby_feedback the primary does not know what the
    // standby's slot needs, and vacuums it away.
    for sql in [
        "ALTER SYSTEM SET hot_standby_feedback = off",
        "SELECT pg_reload_conf()",
    ] {
        standby_admin.batch_execute(sql).await.unwrap();
    }
    wait_for(
        "the primary to forget the standby's horizon",
        Duration::from_secs(30),
        async || {
            let row = primary
                .query_one(
                    "SELECT xmin IS NULL AND catalog_xmin IS NULL FROM pg_replication_slots WHERE slot_name = 'standby1'",
                    &[],
                )
                .await
                .ok()?;
            row.get::<_, bool>(0).then_some(())
        },
    )
    .await;
    let standby = pair.standby.client(&pair.db).await;
    wait_for(
        "a recovery conflict to invalidate the standby's slot",
        Duration::from_secs(60),
        async || {
            insert(10).await;
            primary
                .batch_execute("CREATE TABLE conflict_test (x int, y text); DROP TABLE conflict_test")
                .await
                .unwrap();
            primary.batch_execute("VACUUM pg_class").await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            let row = standby
                .query_one(
                    "SELECT coalesce(to_jsonb(s) ->> 'invalidation_reason', '') || coalesce(to_jsonb(s) ->> 'conflicting', '')
                     FROM pg_replication_slots s WHERE slot_name = 'walrelay'",
                    &[],
                )
                .await
                .ok()?;
            let state: String = row.get(0);
            (state.contains("rows_removed") || state.contains("true")).then_some(state)
        },
    )
    .await;
    insert(20).await;

    // A clear stop: the cause, the fix, and the way back.
    let status = relay.wait(Duration::from_secs(60)).await;
    assert!(!status.success());
    let log = relay.log();
    for words in [
        "recovery conflict",
        "hot_standby_feedback = on",
        "primary_slot_name",
        "walrelay recover --slot",
    ] {
        assert!(log.contains(words), "{words:?} missing: {log}");
    }

    // Started again, the relay finds the slot invalidated before it
    // streams: the same stop, naming the slot.
    let mut again = pair.relay(&[]);
    let status = again.wait(Duration::from_secs(60)).await;
    assert!(!status.success());
    let log = again.log();
    for words in [
        "replication slot \"walrelay\" on this standby was invalidated by a recovery conflict",
        "hot_standby_feedback = on",
        "walrelay recover --slot walrelay",
    ] {
        assert!(log.contains(words), "{words:?} missing: {log}");
    }
    let report = pair.command("check", &[]);
    let text = String::from_utf8_lossy(&report.stdout);
    assert!(
        text.contains("FAIL  hot_standby_feedback is off"),
        "check names the cause: {text}"
    );

    // Fixed as the message says, then recovered on the standby.
    for sql in [
        "ALTER SYSTEM RESET hot_standby_feedback",
        "SELECT pg_reload_conf()",
    ] {
        standby_admin.batch_execute(sql).await.unwrap();
    }
    let recover = pair.command("recover", &[]);
    assert!(
        recover.status.success(),
        "recover failed: {}{}",
        String::from_utf8_lossy(&recover.stdout),
        String::from_utf8_lossy(&recover.stderr)
    );
    let mut relay = pair.relay(&["--heartbeat-interval", "1s"]);
    insert(30).await;
    pair.wait_caught_up(&relay).await;
    let ids = outbox_ids(&primary).await;
    let records = Broker::shared().consume_all(&pair.topics.topic("conflict"));
    assert_each_once(&ids, &records, &relay.log());
    eprintln!(
        "conflict: {} events, {} records; recover said: {}",
        ids.len(),
        records.len(),
        String::from_utf8_lossy(&recover.stdout).trim()
    );
    assert!(relay.terminate(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_standby_lost_recover_on_the_primary_brings_back_what_its_slot_had_not_confirmed() {
    let pair = Pair::start("standbylost").await;
    let primary = pair.primary.client(&pair.db).await;
    let insert = async |n: i32| {
        primary
            .execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                 SELECT 'lost', 'agg-' || (g % 7), 'E', '{}' FROM generate_series(1, $1::int) g",
                &[&n],
            )
            .await
            .unwrap();
    };
    let mut relay = pair.relay(&["--heartbeat-interval", "1s"]);
    insert(100).await;
    pair.wait_caught_up(&relay).await;
    // walrelay's record of the slot, on the primary, reaches what the
    // standby's slot confirmed.
    let standby = pair.standby.client(&pair.db).await;
    let on_standby = confirmed(&standby).await;
    wait_for(
        "the record of the standby's slot on the primary",
        Duration::from_secs(30),
        async || {
            let row = primary
                .query_one(
                    "SELECT coalesce(confirmed_lsn, '0/0')::text FROM walrelay_slots WHERE slot_name = 'walrelay'",
                    &[],
                )
                .await
                .ok()?;
            (row.get::<_, String>(0).parse::<Lsn>().ok()? >= on_standby).then_some(())
        },
    )
    .await;

    // The standby, and its slot, are lost; the outbox goes on.
    relay.kill9().await;
    pair.standby.stop("immediate");
    insert(50).await;

    // The documented path: recover where a slot can be made (here the
    // primary), from walrelay's record of the lost slot.
    let recover = pair.command_on(&pair.primary, "recover", &[]);
    let said = String::from_utf8_lossy(&recover.stdout);
    assert!(
        recover.status.success(),
        "recover failed: {said}{}",
        String::from_utf8_lossy(&recover.stderr)
    );
    let args = pair.topics.relay_args(&["--heartbeat-interval", "1s"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let relay = RelayProcess::start(
        &pair.primary.url(&pair.db),
        &Broker::shared().bootstrap(),
        &args,
    );
    insert(20).await;
    let end = current_lsn(&primary).await;
    wait_caught_up_on(&primary, end, &relay).await;
    let ids = outbox_ids(&primary).await;
    let records = Broker::shared().consume_all(&pair.topics.topic("lost"));
    assert_each_once(&ids, &records, &relay.log());
    eprintln!(
        "standby lost: {} events, {} records; recover said: {}",
        ids.len(),
        records.len(),
        said.trim()
    );
}
