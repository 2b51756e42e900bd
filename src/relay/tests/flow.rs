//! The loop's flow: the window, retries, shutdown, the watermark.

use std::time::Duration;

use super::*;
use crate::lsn::Lsn;
use crate::publish::memory::MemoryBroker;
use crate::relay::scripted::{ScriptedServer, wire};

#[tokio::test(start_paused = true)]
async fn a_full_window_stops_reading_wal_and_keeps_sending_status_updates() {
    local_loop::run(async {
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
        h.finish().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_delivery_is_sent_again_after_its_backoff_and_holds_the_watermark_meanwhile() {
    local_loop::run(async {
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
        h.finish().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_record_the_broker_refuses_for_good_becomes_a_dead_letter_and_the_stream_goes_on() {
    local_loop::run(async {
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
        let kept = h.dead_letters.0.lock().unwrap().clone();
        assert_eq!(kept.len(), 1, "kept in the dead-letter table");
        assert_eq!(
            kept[0].record.value.as_ref().map(|v| v.len()),
            Some(big.len()),
            "whole, value included"
        );
        assert_eq!(kept[0].kind, "too_large");
        assert_eq!(h.server.confirmed(), Lsn(2000));
        h.finish().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_in_flight_events_confirms_them_and_ends_the_stream() {
    local_loop::run(async {
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
    local_loop::run(async {
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
        local_loop::run(async move {
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
                h.finish().await;
            })
            .await;
    }
}

#[tokio::test(start_paused = true)]
async fn after_a_lost_connection_the_relay_waits_for_in_flight_events_then_resumes_after_them() {
    local_loop::run(async {
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
            h.finish().await;
        })
        .await;
}

#[tokio::test(start_paused = true)]
async fn keepalive_wal_ends_are_confirmed_only_when_nothing_is_in_flight() {
    local_loop::run(async {
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
        h.finish().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_missing_dead_letter_topic_at_start_is_not_fatal_but_a_missing_event_topic_stops_the_relay()
 {
    local_loop::run(async {
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
