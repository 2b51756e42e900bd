//! `walrelay backfill` and `walrelay recover`: the HTTP server (its
//! /metrics carries the progress), then the job (`crate::replay`).

use std::sync::Arc;

use crate::kafka::ProducerSettings;
use crate::live::{LiveState, Subject};
use crate::replay::backfill::{self, BackfillOptions};
use crate::replay::recover::{self, RecoverOptions};
use crate::shutdown::StopOnDrop;

pub async fn backfill(
    options: BackfillOptions,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<()> {
    let _stop_background = serve(
        listener,
        &options.kafka.producer,
        format!("backfill {}", options.name),
        options.exactly_once,
    )?;
    backfill::run(options).await?;
    Ok(())
}

pub async fn recover(
    options: RecoverOptions,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<()> {
    let _stop_background = serve(
        listener,
        &options.kafka.producer,
        format!("recover {}", options.slot),
        options.exactly_once,
    )?;
    recover::run(options).await?;
    Ok(())
}

/// The HTTP server and the broker probe, until the returned guard drops.
fn serve(
    listener: tokio::net::TcpListener,
    producer: &ProducerSettings,
    name: String,
    exactly_once: bool,
) -> anyhow::Result<StopOnDrop> {
    let (background, stop) = super::run::background();
    let live = Arc::new(LiveState::new());
    let metrics = crate::http::install_metrics()?;
    super::run::probe_broker(producer, &live, &background)?;
    crate::http::spawn(
        listener,
        metrics,
        live,
        Subject {
            name,
            delivery: if exactly_once {
                "exactly-once"
            } else {
                "at-least-once"
            },
            ..Subject::default()
        },
        background,
    );
    Ok(stop)
}
