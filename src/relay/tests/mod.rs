//! The loop's rules, in-process: a scripted walsender, an in-memory broker
//! and tokio's paused time. The integration tests check the same rules
//! against real servers; these pin down timing and ordering exactly.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::scripted::ScriptedServer;
use super::{RelayConfig, RelayError, WalRelay};
use crate::dead_letters::MemoryDeadLetters;
use crate::live::LiveState;
use crate::publish::memory::MemoryBroker;
use crate::replication::{ConnectionConfig, ReplicationEvent};
use crate::shutdown::{Shutdown, ShutdownTrigger};

pub(super) fn config() -> RelayConfig {
    RelayConfig {
        pg: ConnectionConfig::from_url("postgres://u@localhost/db").unwrap(),
        slot: "walrelay".into(),
        publication: "walrelay".into(),
        router: crate::router::test_support::config(),
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
        dead_letter_table: ("public".into(), "walrelay_dead_letters".into()),
        replication_timeout: Duration::from_secs(30),
    }
}

/// A relay running on a local task, with its handles.
pub(super) struct Harness {
    pub(super) server: ScriptedServer,
    pub(super) dead_letters: MemoryDeadLetters,
    pub(super) stop: ShutdownTrigger,
    pub(super) findings: mpsc::Sender<crate::monitor::Finding>,
    pub(super) relay: tokio::task::JoinHandle<Result<(), RelayError>>,
}

pub(super) fn start(
    config: RelayConfig,
    server: &ScriptedServer,
    broker: &MemoryBroker,
) -> Harness {
    let (stop, shutdown) = Shutdown::new();
    let (findings_tx, findings) = mpsc::channel(1);
    let dead_letters = MemoryDeadLetters::default();
    let relay = WalRelay::new(
        config,
        server.connector(),
        broker.sink(),
        Arc::new(LiveState::new()),
        findings,
    )
    .with_dead_letter_store(std::rc::Rc::new(dead_letters.clone()));
    Harness {
        server: server.clone(),
        dead_letters,
        stop,
        findings: findings_tx,
        relay: tokio::task::spawn_local(relay.run(shutdown)),
    }
}

pub(super) fn push(wal: &mpsc::UnboundedSender<ReplicationEvent>, events: Vec<ReplicationEvent>) {
    for e in events {
        wal.send(e).unwrap();
    }
}

/// Lets the relay run for `d` of (paused, virtual) time.
pub(super) async fn run_for(d: Duration) {
    tokio::time::sleep(d).await;
}

pub(super) fn ids(records: &[crate::record::KafkaRecord]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8(r.header("id").unwrap().to_vec()).unwrap())
        .collect()
}

mod exactly_once;
mod faults;
mod flow;
