//! `walrelay inbox`: the HTTP server, and the consumer on a thread of its
//! own (librdkafka's poll blocks), stopped on SIGINT/SIGTERM.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::inbox::{self, InboxConfig};
use crate::kafka::ProducerSettings;
use crate::live::{LiveState, Source, Subject};

pub async fn run(config: InboxConfig, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    let live = Arc::new(LiveState::with_source(Source::Inbox));
    let (background, _stop_background) = super::run::background();
    let metrics = crate::http::install_metrics()?;
    inbox::counters::export_from_zero();
    // The broker probe: a client of the same brokers and options, which
    // never creates a topic either (it asks for every topic's metadata,
    // which creates none; the setting says so outright).
    let probe = ProducerSettings {
        brokers: config.brokers.clone(),
        overrides: config
            .overrides
            .iter()
            .cloned()
            .chain([("allow.auto.create.topics".into(), "false".into())])
            .collect(),
    };
    let probed = Arc::clone(&live);
    crate::kafka::probe::spawn(&probe, background.clone(), move |reachable| {
        inbox::broker_answered(&probed, reachable)
    })
    .map_err(anyhow::Error::msg)?;
    crate::http::spawn(
        listener,
        metrics,
        Arc::clone(&live),
        Subject {
            name: config.topics.join(" "),
            delivery: "exactly-once",
            max_in_flight_events: Some(config.batch_size as u64),
            table: Some(config.tables.name()),
            group: Some(config.group.clone()),
            ..Subject::default()
        },
        background,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut shutdown = crate::shutdown::Shutdown::on_signals();
    let handle = tokio::runtime::Handle::current();
    let consumer = {
        let (live, stop) = (Arc::clone(&live), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("inbox".into())
            .spawn(move || inbox::run(config, handle, live, stop))?
    };
    // The consumer thread blocks on this runtime for PostgreSQL; keep
    // driving it until the thread is done.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(consumer.join());
    });
    tokio::pin!(done_rx);
    let result = tokio::select! {
        result = &mut done_rx => result,
        _ = shutdown.wait() => {
            stop.store(true, Ordering::Relaxed);
            done_rx.await
        }
    };
    match result {
        Ok(Ok(outcome)) => outcome.map_err(Into::into),
        Ok(Err(_)) => Err(anyhow::anyhow!("the inbox consumer thread panicked")),
        Err(_) => Err(anyhow::anyhow!("the inbox consumer thread vanished")),
    }
}
