//! Exactly once: replays skip what each partition already holds.

use std::time::Duration;

use super::*;
use crate::lsn::Lsn;
use crate::publish::memory::MemoryBroker;
use crate::relay::scripted::{ScriptedServer, wire};

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
    local_loop::run(async {
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
    local_loop::run(async {
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
    local_loop::run(async {
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
    local_loop::run(async {
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
    local_loop::run(async {
        let broker = MemoryBroker::default();
        let server = ScriptedServer::default();
        let wal = server.session();
        let mut cfg = config();
        cfg.delivery = crate::relay::DeliveryGuarantee::AtLeastOnce;
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
