//! `walrelay run`: wires the HTTP server, the slot monitor, the heartbeat
//! and the relay together, and stops them on SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::catalog;
use crate::kafka::{KafkaSink, SinkSettings};
use crate::live::{LiveState, Source, Subject};
use crate::monitor::MonitorConfig;
use crate::poll::{PgStore, PollConfig, PollRelay};
use crate::relay::{DeliveryGuarantee, PgConnector, RelayConfig, WalRelay};
use crate::shutdown::Shutdown;
use crate::sql;

/// How long the producer may take to reach a broker before streaming
/// starts anyway (events then wait for the broker).
const WARM_UP: Duration = Duration::from_secs(10);

/// What `run` needs besides the relay's configuration.
pub struct RunOptions {
    pub relay: RelayConfig,
    pub kafka: SinkSettings,
    pub listener: tokio::net::TcpListener,
    pub create_slot: bool,
    pub heartbeat_interval: Duration,
    /// `--retain`: prune confirmed rows older than this.
    pub retention: Option<crate::retention::RetentionConfig>,
}

pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    let RunOptions {
        relay: config,
        kafka,
        listener,
        create_slot,
        heartbeat_interval,
        retention,
    } = options;
    let live = Arc::new(LiveState::new());
    let metrics = crate::http::install_metrics()?;
    crate::http::spawn(
        listener,
        metrics,
        Arc::clone(&live),
        kafka.producer.clone(),
        Subject {
            name: config.slot.clone(),
            delivery: match config.delivery {
                DeliveryGuarantee::ExactlyOnce => "exactly-once",
                DeliveryGuarantee::AtLeastOnce => "at-least-once",
            },
            max_in_flight_events: Some(config.max_in_flight_events as u64),
            max_in_flight_bytes: Some(config.max_in_flight_bytes as u64),
            ..Subject::default()
        },
    )?;
    ensure_slot(&config, create_slot).await?;
    let client = sql::connect(&config.pg).await?;
    crate::dead_letters::check(&client, &config.dead_letter_table)
        .await
        .map_err(anyhow::Error::msg)?;
    if let Some(retention) = retention {
        check_retention_index(&client, &retention).await?;
        crate::retention::spawn(retention);
    }
    drop(client);
    let findings = crate::monitor::spawn(
        MonitorConfig {
            pg: config.pg.clone(),
            slot: config.slot.clone(),
            publication: config.publication.clone(),
            tables: config.router.tables.clone(),
        },
        Arc::clone(&live),
    );
    if !heartbeat_interval.is_zero() {
        crate::heartbeat::spawn(
            config.pg.clone(),
            config.heartbeat_prefix.clone(),
            heartbeat_interval,
        );
    }
    let mut shutdown = Shutdown::on_signals();
    let sink = KafkaSink::new(&kafka)?;
    if !warm_up(&sink, &mut shutdown).await {
        return Ok(());
    }
    let connector = PgConnector {
        pg: config.pg.clone(),
        slot: config.slot.clone(),
        publication: config.publication.clone(),
        proto_version: config.proto_version,
        setup_timeout: config.replication_timeout,
    };
    WalRelay::new(config, connector, sink, live, findings)
        .run(shutdown)
        .await?;
    Ok(())
}

/// `run --source poll`: the HTTP server, the backlog monitor and the
/// polling loop.
pub async fn run_poll(
    config: PollConfig,
    kafka: SinkSettings,
    listener: tokio::net::TcpListener,
    status_interval: Duration,
) -> anyhow::Result<()> {
    let live = Arc::new(LiveState::with_source(Source::Poll));
    let metrics = crate::http::install_metrics()?;
    let tables = config
        .router
        .tables
        .iter()
        .map(|(s, t)| format!("{s}.{t}"))
        .collect::<Vec<_>>()
        .join(", ");
    crate::http::spawn(
        listener,
        metrics,
        Arc::clone(&live),
        kafka.producer.clone(),
        Subject {
            name: tables,
            delivery: if config.exactly_once {
                "exactly-once"
            } else {
                "at-least-once"
            },
            // Each lane holds at most one batch.
            max_in_flight_events: Some((config.batch_size * config.lanes.max(1)) as u64),
            ..Subject::default()
        },
    )?;
    // A table that is not set up is an error with its fix, before anything
    // else happens.
    let client = sql::connect(&config.pg).await?;
    crate::poll::load_tables(&client, &config.router).await?;
    crate::dead_letters::check(&client, &config.dead_letter_table)
        .await
        .map_err(anyhow::Error::msg)?;
    drop(client);
    let mut shutdown = Shutdown::on_signals();
    crate::poll::spawn_backlog_monitor(
        config.pg.clone(),
        config.router.clone(),
        status_interval.max(Duration::from_secs(1)),
        Arc::clone(&live),
        shutdown.clone(),
    );
    let sink = KafkaSink::new(&kafka)?;
    if !warm_up(&sink, &mut shutdown).await {
        return Ok(());
    }
    let store = PgStore::new(config.clone());
    PollRelay::new(config, store, sink, live)
        .run(shutdown)
        .await?;
    Ok(())
}

/// Connects the producer before the first event, so early events do not
/// wait for a connection. False when shutdown came first.
async fn warm_up(sink: &KafkaSink, shutdown: &mut Shutdown) -> bool {
    let connect = sink.connector();
    match shutdown
        .unless(tokio::task::spawn_blocking(move || connect(WARM_UP)))
        .await
    {
        Some(connected) => {
            if !connected.unwrap_or(false) {
                tracing::warn!("no broker answered yet; events wait until one does");
            }
            true
        }
        None => false,
    }
}

/// Binds the HTTP address, or says which flag to change.
pub async fn listen(addr: &str) -> Result<tokio::net::TcpListener, String> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|_| format!("--http-addr {addr:?}: expected host:port, such as 127.0.0.1:9187"))?;
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("--http-addr {addr}: cannot listen ({e}); choose a free port"))
}

/// Without the index on the created-at column every batch would scan the
/// whole table: refuse to start, with the fix.
async fn check_retention_index(
    client: &sql::SqlClient,
    retention: &crate::retention::RetentionConfig,
) -> anyhow::Result<()> {
    for (schema, table) in &retention.tables {
        let column = &retention.created_at_column;
        if !crate::retention::has_index(client, schema, table, column).await? {
            anyhow::bail!(
                "--retain needs an index on {schema}.{table} ({column}), so pruning never scans the table: run `walrelay setup --retain {}` (or {})",
                humane(retention.retain),
                crate::retention::create_index_sql(schema, table, column)
            );
        }
    }
    Ok(())
}

/// A retention as the operator would write it (24h rather than 1d).
fn humane(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s % 86_400 == 0 && s > 86_400 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A missing slot is an error unless the operator asked to create it: a
/// slot that vanished means events may have been lost.
async fn ensure_slot(config: &RelayConfig, create: bool) -> anyhow::Result<()> {
    let client = sql::connect(&config.pg).await?;
    match catalog::slot(&client, &config.slot).await? {
        Some(slot) if slot.plugin != "pgoutput" => anyhow::bail!(
            "replication slot {:?} uses output plugin {:?}, not pgoutput; drop it or choose another --slot",
            config.slot,
            slot.plugin
        ),
        Some(_) => Ok(()),
        None if create => {
            catalog::create_logical_slot(&client, &config.slot, true).await?;
            tracing::info!(slot = %config.slot, "created replication slot");
            Ok(())
        }
        None => anyhow::bail!(
            "replication slot {:?} does not exist: run `walrelay setup` (or pass --create-slot). If it existed before, someone dropped it and events written meanwhile were not relayed",
            config.slot
        ),
    }
}
