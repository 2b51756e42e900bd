//! The loop's rules, in-process: a scripted walsender, an in-memory broker
//! and tokio's paused time. The integration tests check the same rules
//! against real servers; these pin down timing and ordering exactly.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::LocalSet;

use super::scripted::{ScriptedServer, wire};
use super::{RelayConfig, RelayError, WalRelay};
use crate::live::LiveState;
use crate::lsn::Lsn;
use crate::publish::memory::MemoryBroker;
use crate::replication::{ConnectionConfig, ReplicationEvent};
use crate::router::{OutboxColumns, RouterConfig};
use crate::shutdown::{Shutdown, ShutdownTrigger};

fn config() -> RelayConfig {
    RelayConfig {
        pg: ConnectionConfig::from_url("postgres://u@localhost/db").unwrap(),
        slot: "walrelay".into(),
        publication: "walrelay".into(),
        router: RouterConfig {
            tables: vec![("public".into(), "outbox".into())],
            columns: OutboxColumns::default(),
            header_columns: vec![],
            topic_template: "outbox.event.{aggregate_type}".parse().unwrap(),
            message_prefix: "walrelay".into(),
            dead_letter_topic: "walrelay.dead-letter".into(),
            cloudevents: true,
            cloudevents_source: None,
        },
        max_in_flight_events: 10_000,
        max_in_flight_bytes: 64 << 20,
        status_interval: Duration::from_secs(1),
        shutdown_timeout: Duration::from_secs(30),
        proto_version: None,
        max_backoff: Duration::from_secs(30),
        permanent_error_attempts: 3,
        standby_retry: Duration::from_secs(2),
        broker_stall_timeout: Duration::from_secs(5),
        delivery: super::DeliveryGuarantee::ExactlyOnce,
        exactly_once_lookback: 100_000,
        heartbeat_prefix: "walrelay.heartbeat".into(),
        transactional_id: None,
    }
}

/// A relay running on a local task, with its handles.
struct Harness {
    server: ScriptedServer,
    stop: ShutdownTrigger,
    findings: mpsc::Sender<crate::monitor::Finding>,
    relay: tokio::task::JoinHandle<Result<(), RelayError>>,
}

fn start(config: RelayConfig, server: &ScriptedServer, broker: &MemoryBroker) -> Harness {
    let (stop, shutdown) = Shutdown::new();
    let (findings_tx, findings) = mpsc::channel(1);
    let relay = WalRelay::new(
        config,
        server.connector(),
        broker.sink(),
        Arc::new(LiveState::new()),
        findings,
    );
    Harness {
        server: server.clone(),
        stop,
        findings: findings_tx,
        relay: tokio::task::spawn_local(relay.run(shutdown)),
    }
}

fn push(wal: &mpsc::UnboundedSender<ReplicationEvent>, events: Vec<ReplicationEvent>) {
    for e in events {
        wal.send(e).unwrap();
    }
}

/// Lets the relay run for `d` of (paused, virtual) time.
async fn run_for(d: Duration) {
    tokio::time::sleep(d).await;
}

fn ids(records: &[crate::record::KafkaRecord]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8(r.header("id").unwrap().to_vec()).unwrap())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_full_window_stops_reading_wal_and_keeps_sending_status_updates() {
    LocalSet::new()
        .run_until(async {
            let server = ScriptedServer::default();
            let broker = MemoryBroker::default();
            broker.pause();
            let wal = server.session();
            let mut cfg = config();
            cfg.max_in_flight_events = 2;
            // This test is about the window; the stall rule has its own.
            cfg.broker_stall_timeout = Duration::from_secs(60);
            let h = start(cfg, &server, &broker);
            for i in 1..=5u64 {
                let id = format!("id-{i}");
                push(&wal, wire::transaction(i * 1000, &[(&id, "k", "{}")]));
            }
            run_for(Duration::from_millis(500)).await;
            assert_eq!(
                broker.held(),
                2,
                "two events fill the window; reading stopped"
            );
            let updates_before = h.server.feedback.lock().unwrap().len();
            run_for(Duration::from_secs(10)).await;
            let updates = h.server.feedback.lock().unwrap().clone();
            assert!(
                updates.len() - updates_before >= 9,
                "a status update every second while full: {} in 10 s",
                updates.len() - updates_before
            );
            assert!(
                updates.iter().all(|(lsn, _)| *lsn == Lsn::ZERO),
                "nothing acknowledged, nothing confirmed"
            );
            assert_eq!(broker.held(), 2, "still no more than the window");
            broker.resume();
            run_for(Duration::from_secs(2)).await;
            assert_eq!(
                ids(&broker.log("outbox.event.order")),
                ["id-1", "id-2", "id-3", "id-4", "id-5"]
            );
            assert_eq!(h.server.confirmed(), Lsn(5000));
            h.stop.trigger();
            h.relay.await.unwrap().unwrap();
        })
        .await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_delivery_is_sent_again_after_its_backoff_and_holds_the_watermark_meanwhile() {
    LocalSet::new()
        .run_until(async {
            let server = ScriptedServer::default();
            let broker = MemoryBroker::default();
            broker.fail_next(crate::publish::BrokerError::transient(
                "Local: Broker transport failure",
            ));
            let wal = server.session();
            let h = start(config(), &server, &broker);
            push(&wal, wire::transaction(1000, &[("a", "k", "{}")]));
            run_for(Duration::from_millis(100)).await;
            assert_eq!(broker.sent(), 1);
            assert!(broker.log("outbox.event.order").is_empty());
            // The first retry comes after 250-500 ms of backoff, not before.
            run_for(Duration::from_millis(100)).await;
            assert_eq!(broker.sent(), 1, "no resend before the backoff");
            assert_eq!(
                h.server.confirmed(),
                Lsn::ZERO,
                "the failed event holds the watermark"
            );
            run_for(Duration::from_millis(500)).await;
            assert_eq!(broker.sent(), 2, "sent again after the backoff");
            assert_eq!(ids(&broker.log("outbox.event.order")), ["a"]);
            run_for(Duration::from_millis(100)).await;
            assert_eq!(h.server.confirmed(), Lsn(1000));
            h.stop.trigger();
            h.relay.await.unwrap().unwrap();
        })
        .await;
}

#[tokio::test(start_paused = true)]
async fn a_record_the_broker_refuses_for_good_becomes_a_dead_letter_and_the_stream_goes_on() {
    LocalSet::new()
        .run_until(async {
            let server = ScriptedServer::default();
            let broker = MemoryBroker::default();
            broker.refuse_records_over(2_000);
            let wal = server.session();
            let h = start(config(), &server, &broker);
            let big = wire::payload(5_000);
            push(&wal, wire::transaction(1000, &[("big", "k", &big)]));
            push(&wal, wire::transaction(2000, &[("after", "k", "{}")]));
            run_for(Duration::from_millis(100)).await;
            assert_eq!(ids(&broker.log("outbox.event.order")), ["after"]);
            let dead = broker.log("walrelay.dead-letter");
            assert_eq!(ids(&dead), ["big"]);
            assert_eq!(dead[0].value, None, "an oversize value does not travel");
            assert_eq!(
                dead[0].header("walrelay_error_kind").map(|v| v.to_vec()),
                Some(b"too_large".to_vec())
            );
            assert_eq!(h.server.confirmed(), Lsn(2000));
            h.stop.trigger();
            h.relay.await.unwrap().unwrap();
        })
        .await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_in_flight_events_confirms_them_and_ends_the_stream() {
    LocalSet::new()
        .run_until(async {
            let server = ScriptedServer::default();
            let broker = MemoryBroker::default();
            broker.pause();
            let wal = server.session();
            let h = start(config(), &server, &broker);
            push(
                &wal,
                wire::transaction(1000, &[("a", "k", "{}"), ("b", "k", "{}")]),
            );
            run_for(Duration::from_millis(100)).await;
            h.stop.trigger();
            run_for(Duration::from_secs(3)).await;
            assert!(!h.relay.is_finished(), "waits for the in-flight events");
            push(&wal, wire::transaction(2000, &[("late", "k", "{}")]));
            broker.resume();
            let result = tokio::time::timeout(Duration::from_secs(5), h.relay).await;
            result.expect("stops once drained").unwrap().unwrap();
            assert_eq!(
                ids(&broker.log("outbox.event.order")),
                ["a", "b"],
                "nothing read after the stop"
            );
            assert_eq!(h.server.confirmed(), Lsn(1000));
            assert!(
                *h.server.finished.lock().unwrap(),
                "the stream ended cleanly"
            );
        })
        .await;
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_that_times_out_confirms_only_what_was_acknowledged() {
    LocalSet::new()
        .run_until(async {
            let server = ScriptedServer::default();
            let broker = MemoryBroker::default();
            let wal = server.session();
            let mut cfg = config();
            cfg.shutdown_timeout = Duration::from_secs(2);
            let h = start(cfg, &server, &broker);
            push(&wal, wire::transaction(1000, &[("a", "k", "{}")]));
            run_for(Duration::from_millis(100)).await;
            broker.pause();
            push(&wal, wire::transaction(2000, &[("b", "k", "{}")]));
            run_for(Duration::from_millis(100)).await;
            h.stop.trigger();
            tokio::time::timeout(Duration::from_secs(3), h.relay)
                .await
                .expect("the shutdown timeout ends the wait")
                .unwrap()
                .unwrap();
            assert_eq!(h.server.confirmed(), Lsn(1000), "b was never acknowledged");
        })
        .await;
}

/// A small deterministic generator, so a failing order can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % below
    }
}

#[tokio::test(start_paused = true)]
async fn the_watermark_never_passes_an_unacknowledged_event_whatever_the_ack_order() {
    for seed in 1..=20u64 {
        LocalSet::new()
            .run_until(async move {
                let server = ScriptedServer::default();
                let broker = MemoryBroker::default();
                broker.pause();
                let wal = server.session();
                let h = start(config(), &server, &broker);
                let mut rng = Lcg(seed);
                // 8 transactions of 0 to 3 events; (end LSN, ids).
                let mut txns: Vec<(u64, Vec<String>)> = Vec::new();
                for t in 1..=8u64 {
                    let n = rng.next(4);
                    let ids: Vec<String> = (0..n).map(|i| format!("t{t}-e{i}")).collect();
                    let rows: Vec<(&str, &str, &str)> =
                        ids.iter().map(|id| (id.as_str(), "k", "{}")).collect();
                    push(&wal, wire::transaction(t * 1000, &rows));
                    txns.push((t * 1000, ids));
                }
                run_for(Duration::from_millis(100)).await;
                let mut acked: Vec<String> = Vec::new();
                while broker.held() > 0 {
                    broker.release(rng.next(broker.held()));
                    run_for(Duration::from_millis(50)).await;
                    acked = ids(&broker.log("outbox.event.order"));
                    let confirmed = h.server.confirmed();
                    let oldest_waiting = txns
                        .iter()
                        .find(|(_, ids)| ids.iter().any(|id| !acked.contains(id)))
                        .map(|(end, _)| Lsn(*end));
                    if let Some(oldest) = oldest_waiting {
                        assert!(
                            confirmed < oldest,
                            "seed {seed}: confirmed {confirmed} while the transaction ending at {oldest} waits"
                        );
                    }
                }
                run_for(Duration::from_secs(1)).await;
                assert_eq!(acked.len(), txns.iter().map(|(_, ids)| ids.len()).sum::<usize>());
                assert_eq!(h.server.confirmed(), Lsn(8000), "seed {seed}");
                h.stop.trigger();
                h.relay.await.unwrap().unwrap();
            })
            .await;
    }
}

#[tokio::test(start_paused = true)]
async fn after_a_lost_connection_the_relay_waits_for_in_flight_events_then_resumes_after_them() {
    LocalSet::new()
        .run_until(async {
            let server = ScriptedServer::default();
            let broker = MemoryBroker::default();
            broker.pause();
            let first = server.session();
            let second = server.session();
            let h = start(config(), &server, &broker);
            push(&first, wire::transaction(1000, &[("a", "k", "{}")]));
            run_for(Duration::from_millis(100)).await;
            drop(first); // the server ends the stream
            run_for(Duration::from_secs(10)).await;
            assert_eq!(
                *h.server.starts.lock().unwrap(),
                [Lsn::ZERO],
                "no new session while an event is in flight"
            );
            broker.resume();
            run_for(Duration::from_secs(2)).await;
            assert_eq!(
                *h.server.starts.lock().unwrap(),
                [Lsn::ZERO, Lsn::ZERO],
                "the next session starts at the slot's position: the stream ended before the event was confirmed"
            );
            // The server replays the unconfirmed transaction: already in
            // Kafka, it is skipped.
            push(&second, wire::transaction(1000, &[("a", "k", "{}")]));
            push(&second, wire::transaction(2000, &[("b", "k", "{}")]));
            run_for(Duration::from_millis(100)).await;
            assert_eq!(ids(&broker.log("outbox.event.order")), ["a", "b"]);
            assert_eq!(h.server.confirmed(), Lsn(2000));
            h.stop.trigger();
            h.relay.await.unwrap().unwrap();
        })
        .await;
}

#[tokio::test(start_paused = true)]
async fn keepalive_wal_ends_are_confirmed_only_when_nothing_is_in_flight() {
    LocalSet::new()
        .run_until(async {
            let server = ScriptedServer::default();
            let broker = MemoryBroker::default();
            let wal = server.session();
            let h = start(config(), &server, &broker);
            push(&wal, vec![wire::keepalive(500, true)]);
            run_for(Duration::from_millis(50)).await;
            assert_eq!(
                h.server.confirmed(),
                Lsn(500),
                "idle: the WAL end is confirmed at once"
            );
            broker.pause();
            push(&wal, wire::transaction(1000, &[("a", "k", "{}")]));
            push(&wal, vec![wire::keepalive(9000, true)]);
            run_for(Duration::from_secs(3)).await;
            assert_eq!(h.server.confirmed(), Lsn(500), "an event is in flight");
            broker.resume();
            run_for(Duration::from_millis(50)).await;
            assert_eq!(h.server.confirmed(), Lsn(1000));
            h.stop.trigger();
            h.relay.await.unwrap().unwrap();
        })
        .await;
}

#[tokio::test(start_paused = true)]
async fn a_missing_dead_letter_topic_at_start_is_not_fatal_but_a_missing_event_topic_stops_the_relay()
 {
    LocalSet::new()
        .run_until(async {
            let server = ScriptedServer::default();
            let broker = MemoryBroker::default();
            broker.without_topic("walrelay.dead-letter");
            broker.without_topic("outbox.event.order");
            let wal = server.session();
            let h = start(config(), &server, &broker);
            run_for(Duration::from_secs(5)).await;
            assert!(
                !h.relay.is_finished(),
                "the dead-letter topic is only warmed up"
            );
            push(&wal, wire::transaction(1000, &[("a", "k", "{}")]));
            let result = tokio::time::timeout(Duration::from_secs(5), h.relay)
                .await
                .expect("the relay stops")
                .unwrap();
            let error = result.unwrap_err().to_string();
            assert!(
                error.contains("topic \"outbox.event.order\" does not exist"),
                "{error}"
            );
            assert_eq!(h.server.confirmed(), Lsn::ZERO);
        })
        .await;
}

#[tokio::test(start_paused = true)]
async fn a_broker_that_acknowledges_nothing_makes_the_relay_let_go_of_the_slot_until_it_answers() {
    LocalSet::new()
        .run_until(async {
            let server = ScriptedServer::default();
            let broker = MemoryBroker::default();
            let first = server.session();
            let second = server.session();
            let h = start(config(), &server, &broker);
            push(&first, wire::transaction(1000, &[("a", "k", "{}")]));
            run_for(Duration::from_millis(100)).await;
            broker.pause();
            push(&first, wire::transaction(2000, &[("b", "k", "{}")]));
            run_for(Duration::from_secs(4)).await;
            assert!(
                !*h.server.finished.lock().unwrap(),
                "within the stall timeout"
            );
            run_for(Duration::from_secs(2)).await;
            assert!(
                *h.server.finished.lock().unwrap(),
                "after 5 s without an acknowledgement the session ended cleanly"
            );
            assert_eq!(
                h.server.confirmed(),
                Lsn(1000),
                "the watermark was confirmed first"
            );
            run_for(Duration::from_secs(30)).await;
            assert_eq!(
                h.server.starts.lock().unwrap().len(),
                1,
                "no new session while the event waits"
            );
            broker.resume();
            run_for(Duration::from_millis(100)).await;
            assert_eq!(
                *h.server.starts.lock().unwrap(),
                [Lsn::ZERO, Lsn(1000)],
                "streaming again once the event is acknowledged, from the slot's position"
            );
            // The server replays what the slot had not confirmed: already
            // in Kafka, it is skipped.
            push(&second, wire::transaction(2000, &[("b", "k", "{}")]));
            push(&second, wire::transaction(3000, &[("c", "k", "{}")]));
            run_for(Duration::from_millis(100)).await;
            assert_eq!(ids(&broker.log("outbox.event.order")), ["a", "b", "c"]);
            assert_eq!(h.server.confirmed(), Lsn(3000));
            h.stop.trigger();
            h.relay.await.unwrap().unwrap();
        })
        .await;
}

#[tokio::test(start_paused = true)]
async fn a_server_shutting_down_makes_the_relay_end_its_session_at_once() {
    LocalSet::new()
        .run_until(async {
            let server = ScriptedServer::default();
            let broker = MemoryBroker::default();
            let first = server.session();
            let _second = server.session();
            let h = start(config(), &server, &broker);
            push(&first, wire::transaction(1000, &[("a", "k", "{}")]));
            broker.pause();
            push(&first, wire::transaction(2000, &[("b", "k", "{}")]));
            run_for(Duration::from_millis(100)).await;
            h.findings
                .send(crate::monitor::Finding::ServerStopping)
                .await
                .unwrap();
            run_for(Duration::from_millis(100)).await;
            assert!(*h.server.finished.lock().unwrap(), "ended at once");
            assert_eq!(h.server.confirmed(), Lsn::ZERO, "nothing acknowledged yet");
            broker.resume();
            run_for(Duration::from_secs(30)).await;
            assert_eq!(
                *h.server.starts.lock().unwrap(),
                [Lsn::ZERO, Lsn::ZERO],
                "back after the in-flight events, from the slot's position"
            );
            h.stop.trigger();
            h.relay.await.unwrap().unwrap();
        })
        .await;
}

/// Runs a relay over `txns` (end LSN, rows) with the slot confirmed at
/// `slot_confirmed`, until everything is acknowledged, then kills it (no
/// shutdown, as a crash would).
async fn run_then_crash(
    broker: &MemoryBroker,
    slot_confirmed: u64,
    txns: &[(u64, Vec<(&str, &str)>)],
) -> ScriptedServer {
    let server = ScriptedServer::default();
    *server.slot_confirmed.lock().unwrap() = Some(Lsn(slot_confirmed));
    let wal = server.session();
    let h = start(config(), &server, broker);
    for (end, rows) in txns {
        let rows: Vec<(&str, &str, &str)> =
            rows.iter().map(|(id, key)| (*id, *key, "{}")).collect();
        push(&wal, wire::transaction(*end, &rows));
    }
    run_for(Duration::from_secs(1)).await;
    h.relay.abort();
    server
}

fn id_counts(records: &[crate::record::KafkaRecord]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for id in ids(records) {
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(start_paused = true)]
async fn a_relay_replaying_after_a_crash_skips_what_each_partition_already_holds() {
    LocalSet::new()
        .run_until(async {
            let broker = MemoryBroker::default();
            broker.set_partitions("outbox.event.order", 4);
            let txns: Vec<(u64, Vec<(&str, &str)>)> = vec![
                (1000, vec![("a", "k1"), ("b", "k2")]),
                (2000, vec![("c", "k3")]),
                (3000, vec![("d", "k1"), ("e", "k4"), ("f", "k2")]),
                (4000, vec![("g", "k3")]),
            ];
            // The first relay published everything but confirmed only 2000.
            run_then_crash(&broker, 0, &txns).await;
            let sent_by_first = broker.sent();
            // The second replays from the slot's 2000, plus a new transaction.
            let mut replay = txns[2..].to_vec();
            replay.push((5000, vec![("h", "k4")]));
            let server = run_then_crash(&broker, 2000, &replay).await;
            let counts = id_counts(&broker.log("outbox.event.order"));
            assert!(
                counts.values().all(|n| *n == 1),
                "each event once: {counts:?}"
            );
            assert_eq!(counts.len(), 8);
            assert_eq!(
                broker.sent() - sent_by_first,
                1,
                "only the new event was sent"
            );
            assert_eq!(
                server.confirmed(),
                Lsn(5000),
                "skipped events count as delivered"
            );
        })
        .await;
}

#[tokio::test(start_paused = true)]
async fn records_of_another_producer_are_passed_over_and_hide_nothing() {
    LocalSet::new()
        .run_until(async {
            let broker = MemoryBroker::default();
            let txns: Vec<(u64, Vec<(&str, &str)>)> =
                vec![(1000, vec![("a", "k")]), (2000, vec![("b", "k")])];
            run_then_crash(&broker, 0, &txns).await;
            // Another producer writes a record claiming b's position, but
            // under another source, and one without headers.
            let mut foreign = broker.log("outbox.event.order")[1].clone();
            for (name, value) in foreign.headers.iter_mut() {
                if name == crate::publish::ORIGIN_HEADER {
                    *value = bytes::Bytes::from_static(b"9999/other/1");
                }
                if name == "id" {
                    *value = bytes::Bytes::from_static(b"foreign");
                }
            }
            broker.append(0, foreign);
            broker.append(
                0,
                crate::record::KafkaRecord {
                    topic: "outbox.event.order".into(),
                    key: None,
                    value: None,
                    headers: vec![],
                },
            );
            run_then_crash(
                &broker,
                0,
                &[
                    (1000, vec![("a", "k")]),
                    (2000, vec![("b", "k")]),
                    (3000, vec![("c", "k")]),
                ],
            )
            .await;
            let counts = id_counts(
                &broker
                    .log("outbox.event.order")
                    .into_iter()
                    .filter(|r| r.header("id").is_some())
                    .collect::<Vec<_>>(),
            );
            assert_eq!(counts.get("a"), Some(&1));
            assert_eq!(counts.get("b"), Some(&1));
            assert_eq!(counts.get("c"), Some(&1));
        })
        .await;
}

#[tokio::test(start_paused = true)]
async fn a_raised_partition_count_may_duplicate_but_never_loses() {
    LocalSet::new()
        .run_until(async {
            let broker = MemoryBroker::default();
            broker.set_partitions("outbox.event.order", 2);
            let keys = ["k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8"];
            let ids: Vec<String> = (0..8).map(|i| format!("e{i}")).collect();
            let txns: Vec<(u64, Vec<(&str, &str)>)> = ids
                .iter()
                .zip(keys)
                .enumerate()
                .map(|(i, (id, key))| ((i as u64 + 1) * 1000, vec![(id.as_str(), key)]))
                .collect();
            run_then_crash(&broker, 0, &txns).await;
            broker.set_partitions("outbox.event.order", 8);
            run_then_crash(&broker, 0, &txns).await;
            let counts = id_counts(&broker.log("outbox.event.order"));
            for id in &ids {
                assert!(
                    counts.get(id).copied().unwrap_or(0) >= 1,
                    "{id} lost: {counts:?}"
                );
            }
        })
        .await;
}

#[tokio::test(start_paused = true)]
async fn a_dead_letter_written_before_a_crash_is_neither_lost_nor_doubled() {
    LocalSet::new()
        .run_until(async {
            let broker = MemoryBroker::default();
            let txns: Vec<(u64, Vec<(&str, &str)>)> =
                vec![(1000, vec![("nokey", "NULL")]), (2000, vec![("b", "k")])];
            run_then_crash(&broker, 0, &txns).await;
            assert_eq!(broker.log("walrelay.dead-letter").len(), 1);
            run_then_crash(&broker, 0, &txns).await;
            assert_eq!(broker.log("walrelay.dead-letter").len(), 1, "not doubled");
            assert_eq!(
                id_counts(&broker.log("outbox.event.order")).get("b"),
                Some(&1)
            );
        })
        .await;
}

#[tokio::test(start_paused = true)]
async fn at_least_once_publishes_again_what_was_not_confirmed() {
    LocalSet::new()
        .run_until(async {
            let broker = MemoryBroker::default();
            let server = ScriptedServer::default();
            let wal = server.session();
            let mut cfg = config();
            cfg.delivery = super::DeliveryGuarantee::AtLeastOnce;
            let h = start(cfg.clone(), &server, &broker);
            push(&wal, wire::transaction(1000, &[("a", "k", "{}")]));
            run_for(Duration::from_secs(1)).await;
            h.relay.abort();
            let server = ScriptedServer::default();
            let wal = server.session();
            let h = start(cfg, &server, &broker);
            push(&wal, wire::transaction(1000, &[("a", "k", "{}")]));
            run_for(Duration::from_secs(1)).await;
            h.relay.abort();
            let log = broker.log("outbox.event.order");
            assert_eq!(
                ids(&log),
                ["a", "a"],
                "published again, as before exactly-once"
            );
            assert!(
                log[0].header(crate::publish::POSITION_HEADER).is_none(),
                "no position header"
            );
        })
        .await;
}
