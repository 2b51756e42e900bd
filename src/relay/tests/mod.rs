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
use crate::replication::ReplicationEvent;
use crate::shutdown::{Shutdown, ShutdownTrigger};

pub(super) use crate::shutdown::local_loop;

pub(super) use super::scripted::relay_config as config;

/// A relay running on a local task, with its handles.
pub(super) struct Harness {
    pub(super) server: ScriptedServer,
    pub(super) dead_letters: MemoryDeadLetters,
    pub(super) stop: ShutdownTrigger,
    pub(super) findings: mpsc::Sender<crate::relay::monitor::Finding>,
    pub(super) relay: tokio::task::JoinHandle<Result<(), RelayError>>,
}

impl Harness {
    /// Stops the relay and checks that it ended without an error.
    pub(super) async fn finish(self) {
        local_loop::finish(&self.stop, self.relay).await;
    }
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
