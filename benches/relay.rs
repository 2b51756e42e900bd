//! The WAL relay's own CPU per event, without PostgreSQL or librdkafka:
//! the whole loop (decode, route, publish, settle, confirm) fed by the
//! scripted walsender and publishing to the in-memory broker, which
//! acknowledges at once. Set beside `scripts/bench`'s figures on Apache
//! Kafka, the difference is what librdkafka's threads and the sockets cost.
//!
//! `cargo bench --features bench-support --bench relay` (optionally
//! `WALRELAY_BENCH_EVENTS=N`). Prints CPU per 100,000 events for exactly
//! once and at least once, three rounds each, alternating.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::LocalSet;
use walrelay::dead_letters::MemoryDeadLetters;
use walrelay::live::LiveState;
use walrelay::lsn::Lsn;
use walrelay::publish::memory::MemoryBroker;
use walrelay::relay::scripted::{ScriptedServer, relay_config, wire};
use walrelay::relay::{DeliveryGuarantee, RelayConfig, WalRelay};
use walrelay::shutdown::Shutdown;

fn config(delivery: DeliveryGuarantee) -> RelayConfig {
    RelayConfig {
        max_in_flight_events: 5_000,
        broker_stall_timeout: Duration::from_secs(60),
        delivery,
        ..relay_config()
    }
}

/// User + system CPU time of this process so far.
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
}

/// Streams `events` single-row transactions through a relay; returns the
/// relay's CPU and wall time from its start until all are confirmed.
fn run(delivery: DeliveryGuarantee, events: usize) -> (Duration, Duration) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    LocalSet::new().block_on(&runtime, async {
        let server = ScriptedServer::default();
        let broker = MemoryBroker::default();
        let wal = server.session();
        let payload = wire::payload(300);
        let mut last = 0;
        for i in 1..=events as u64 {
            let id = format!("00000000-0000-4000-8000-{i:012}");
            let key = format!("order-{}", i % 1000);
            last = i * 1000;
            for event in wire::transaction(last, &[(&id, &key, &payload)]) {
                wal.send(event).unwrap();
            }
        }
        let (stop, shutdown) = Shutdown::new();
        let (_findings_tx, findings) = mpsc::channel(1);
        let relay = WalRelay::new(
            config(delivery),
            server.connector(),
            broker.sink(),
            Arc::new(LiveState::new()),
            findings,
        )
        .with_dead_letter_store(Rc::new(MemoryDeadLetters::default()));
        let (started, cpu_before) = (Instant::now(), cpu());
        let relay = tokio::task::spawn_local(relay.run(shutdown));
        while server.confirmed() < Lsn(last) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let measured = (cpu() - cpu_before, started.elapsed());
        stop.trigger();
        relay.await.unwrap().unwrap();
        assert_eq!(
            broker.log("outbox.event.order").len(),
            events,
            "every event once"
        );
        measured
    })
}

fn main() {
    let events: usize = std::env::var("WALRELAY_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    println!("the WAL relay on the in-memory broker, {events} single-event transactions");
    for round in 0..3 {
        for (name, delivery) in [
            ("exactly once", DeliveryGuarantee::ExactlyOnce),
            ("at least once", DeliveryGuarantee::AtLeastOnce),
        ] {
            let (cpu, wall) = run(delivery, events);
            let per_100k = cpu.as_secs_f64() / events as f64 * 100_000.0;
            println!(
                "round {round}, {name}: CPU {per_100k:.3} s per 100,000 events, {:.0} events/s",
                events as f64 / wall.as_secs_f64()
            );
        }
    }
}
