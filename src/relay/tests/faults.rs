//! Faults: a stalled broker, a server shutting down or gone silent, refused
//! writes, a producer that failed for good.

use std::time::Duration;

use super::*;
use crate::lsn::Lsn;
use crate::publish::memory::MemoryBroker;
use crate::relay::scripted::{ScriptedServer, wire};

#[tokio::test(start_paused = true)]
async fn a_broker_that_acknowledges_nothing_makes_the_relay_let_go_of_the_slot_until_it_answers() {
    local_loop::run(async {
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
        h.finish().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_server_shutting_down_makes_the_relay_end_its_session_at_once() {
    local_loop::run(async {
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
            .send(crate::relay::monitor::Finding::ServerStopping)
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
        h.finish().await;
    })
    .await;
}

/// Runs a relay over `txns` (end LSN, rows) with the slot confirmed at
/// `slot_confirmed`, until everything is acknowledged, then kills it (no
/// shutdown, as a crash would).
#[tokio::test(start_paused = true)]
async fn writes_refused_as_not_authorized_are_waited_out_never_dropped_or_confirmed() {
    local_loop::run(async {
        let server = ScriptedServer::default();
        let broker = MemoryBroker::default();
        let wal = server.session();
        let again = server.session();
        let h = start(config(), &server, &broker);
        push(&wal, wire::transaction(1000, &[("a", "k", "{}")]));
        run_for(Duration::from_millis(100)).await;
        // An ACL rotation takes WRITE away, on the events' topic and on
        // the dead-letter topic.
        broker.authorize("outbox.event.order", false);
        broker.authorize("walrelay.dead-letter", false);
        push(&wal, wire::transaction(2000, &[("b", "k", "{}")]));
        push(&wal, wire::transaction(3000, &[("c", "k", "{}")]));
        run_for(Duration::from_secs(30)).await;
        assert_eq!(ids(&broker.log("outbox.event.order")), ["a"]);
        assert!(
            broker.log("walrelay.dead-letter").is_empty(),
            "not dead-lettered"
        );
        assert!(h.dead_letters.0.lock().unwrap().is_empty());
        assert_eq!(
            h.server.confirmed(),
            Lsn(1000),
            "nothing confirmed past the refused event"
        );
        assert!(
            *h.server.finished.lock().unwrap(),
            "the slot was let go meanwhile"
        );
        broker.authorize("outbox.event.order", true);
        broker.authorize("walrelay.dead-letter", true);
        run_for(Duration::from_secs(10)).await;
        // The next session replays from the slot's position.
        assert_eq!(*h.server.starts.lock().unwrap(), [Lsn::ZERO, Lsn(1000)]);
        push(&again, wire::transaction(2000, &[("b", "k", "{}")]));
        push(&again, wire::transaction(3000, &[("c", "k", "{}")]));
        run_for(Duration::from_secs(1)).await;
        assert_eq!(ids(&broker.log("outbox.event.order")), ["a", "b", "c"]);
        assert_eq!(h.server.confirmed(), Lsn(3000));
        h.finish().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_server_that_goes_silent_is_noticed_and_the_relay_connects_again() {
    local_loop::run(async {
        let server = ScriptedServer::default();
        let broker = MemoryBroker::default();
        // The first host vanishes without a reset after one event: the
        // connection stays open, nothing more arrives.
        let gone = server.silent_session();
        let other = server.session();
        let h = start(config(), &server, &broker);
        push(&gone, wire::transaction(1000, &[("a", "k", "{}")]));
        run_for(Duration::from_secs(20)).await;
        assert_eq!(
            h.server.starts.lock().unwrap().len(),
            1,
            "within the timeout"
        );
        run_for(Duration::from_secs(15)).await;
        assert_eq!(
            *h.server.starts.lock().unwrap(),
            [Lsn::ZERO, Lsn(1000)],
            "connected again after 30 s of silence, from the slot's position"
        );
        push(&other, wire::transaction(2000, &[("b", "k", "{}")]));
        run_for(Duration::from_millis(100)).await;
        assert_eq!(ids(&broker.log("outbox.event.order")), ["a", "b"]);
        // A server that answers is never taken for gone, however idle.
        run_for(Duration::from_secs(120)).await;
        assert_eq!(h.server.starts.lock().unwrap().len(), 2);
        drop(gone);
        h.finish().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_producer_that_fails_for_good_is_made_anew_and_the_events_in_flight_are_read_again() {
    local_loop::run(async {
        let server = ScriptedServer::default();
        let broker = MemoryBroker::default();
        let first = server.session();
        let second = server.session();
        let h = start(config(), &server, &broker);
        push(&first, wire::transaction(1000, &[("a", "k", "{}")]));
        run_for(Duration::from_millis(100)).await;
        // librdkafka reports a fatal error (a broken idempotent
        // sequence) for the next record.
        broker.fail_next(crate::publish::BrokerError {
            class: crate::publish::BrokerErrorClass::Fatal,
            message: "Local: Fatal error: Broker: Out of order sequence number".into(),
        });
        push(&first, wire::transaction(2000, &[("b", "k", "{}")]));
        run_for(Duration::from_secs(5)).await;
        assert!(
            *h.server.finished.lock().unwrap() || h.server.starts.lock().unwrap().len() == 2,
            "the session ended instead of retrying the broken producer forever"
        );
        assert_eq!(*h.server.starts.lock().unwrap(), [Lsn::ZERO, Lsn(1000)]);
        // The server replays what the slot had not confirmed.
        push(&second, wire::transaction(2000, &[("b", "k", "{}")]));
        run_for(Duration::from_millis(100)).await;
        assert_eq!(ids(&broker.log("outbox.event.order")), ["a", "b"]);
        assert_eq!(h.server.confirmed(), Lsn(2000));
        h.finish().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_unroutable_change_whose_dead_letter_is_refused_is_kept_before_it_is_confirmed() {
    local_loop::run(async {
        let server = ScriptedServer::default();
        let broker = MemoryBroker::default();
        broker.refuse_records_over(2_000);
        let wal = server.session();
        let h = start(config(), &server, &broker);
        // A NULL key: a dead letter of every column, too large to go.
        let big = wire::payload(5_000);
        push(
            &wal,
            wire::transaction(1000, &[("nokey-big", "NULL", &big)]),
        );
        push(&wal, wire::transaction(2000, &[("after", "k", "{}")]));
        run_for(Duration::from_secs(2)).await;
        let kept = h.dead_letters.0.lock().unwrap().clone();
        assert_eq!(kept.len(), 1, "kept whole in the dead-letter table");
        assert!(kept[0].record.value.as_ref().unwrap().len() > 5_000);
        assert_eq!(ids(&broker.log("outbox.event.order")), ["after"]);
        assert_eq!(h.server.confirmed(), Lsn(2000));
        h.finish().await;
    })
    .await;
}
