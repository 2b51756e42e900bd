//! `walrelay backfill` and `walrelay recover`: the HTTP server (its
//! /metrics carries the progress), then the job (`crate::replay`).

use std::sync::Arc;

use crate::kafka::ProducerSettings;
use crate::live::{LiveState, Subject};
use crate::replay::backfill::{self, BackfillOptions};
use crate::replay::recover::{self, RecoverOptions};

pub async fn backfill(
    options: BackfillOptions,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<()> {
    serve(
        listener,
        options.kafka.producer.clone(),
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
    serve(
        listener,
        options.kafka.producer.clone(),
        format!("recover {}", options.slot),
        options.exactly_once,
    )?;
    recover::run(options).await?;
    Ok(())
}

fn serve(
    listener: tokio::net::TcpListener,
    producer: ProducerSettings,
    name: String,
    exactly_once: bool,
) -> anyhow::Result<()> {
    let metrics = crate::http::install_metrics()?;
    crate::http::spawn(
        listener,
        metrics,
        Arc::new(LiveState::new()),
        producer,
        Subject {
            name,
            delivery: if exactly_once {
                "exactly-once"
            } else {
                "at-least-once"
            },
            ..Subject::default()
        },
    )
}
