//! `walrelay run`: wires the HTTP server, the slot monitor, the heartbeat
//! and the relay together, and stops them on SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::catalog;
use crate::kafka::{KafkaSink, ProducerSettings, SinkSettings};
use crate::live::{LiveState, Source, Subject};
use crate::poll::{PgStore, PollConfig, PollRelay};
use crate::relay::monitor::MonitorConfig;
use crate::relay::outbox_watch::OutboxWatch;
use crate::relay::{PgConnector, RelayConfig, WalRelay};
use crate::router::RouterConfig;
use crate::shutdown::{Shutdown, StopOnDrop};
use crate::slot_health::{self, LastConfirmed, SlotProblem};
use crate::slot_record;
use crate::sql;

pub use crate::slot_record::record_schema;

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
    let primary = config.primary.clone();
    let live = Arc::new(LiveState::new());
    let (background, _stop_background) = background();
    let metrics = crate::http::install_metrics()?;
    probe_broker(&kafka.producer, &live, &background)?;
    crate::http::spawn(
        listener,
        metrics,
        Arc::clone(&live),
        Subject {
            name: config.slot.clone(),
            delivery: config.delivery.as_str(),
            max_in_flight_events: Some(config.max_in_flight_events as u64),
            max_in_flight_bytes: Some(config.max_in_flight_bytes as u64),
            ..Subject::default()
        },
        background.clone(),
    );
    let client = sql::connect(&config.pg).await?;
    let writer = primary_for_run(&client, primary.as_ref(), heartbeat_interval, &retention).await?;
    let (record_schema, last_confirmed) =
        ensure_slot(&config, create_slot, writer.as_ref(), primary.as_ref()).await?;
    // Streaming from a slot `recover` made before it has published the
    // rows of its snapshot would put later events ahead of earlier ones.
    // Recover keeps its progress on the primary when this is a standby.
    let recover_progress = writer.as_ref().unwrap_or(&client);
    if crate::replay::state::recovery_pending(recover_progress, &config.slot).await? {
        anyhow::bail!(
            "a `walrelay recover --slot {0}` is under way, or died midway: let it finish (or run it again, it goes on where it stopped), then start run",
            config.slot
        );
    }
    crate::dead_letters::check(&client, &config.dead_letter_table)
        .await
        .map_err(anyhow::Error::msg)?;
    // A publication that decodes events away stops the relay before it
    // streams anything.
    let mut outbox = OutboxWatch::new(
        &config.slot,
        &config.publication,
        &config.router.tables,
        needed_columns(&config.router),
    );
    if let Some(problem) = outbox.check(&client).await? {
        return Err(problem.into());
    }
    if let Some(retention) = retention {
        check_retention_index(&client, &retention).await?;
        crate::retention::spawn(retention, background.clone());
    }
    drop(client);
    let (findings, verified) = crate::relay::monitor::spawn(
        MonitorConfig {
            pg: config.pg.clone(),
            slot: config.slot.clone(),
            outbox,
            record_schema,
            last_confirmed,
            primary: primary.clone(),
        },
        Arc::clone(&live),
        background.clone(),
    );
    if !heartbeat_interval.is_zero() {
        crate::relay::heartbeat::spawn(
            config.pg.clone(),
            primary,
            config.heartbeat_prefix.clone(),
            heartbeat_interval,
            background.clone(),
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
        .with_confirm_cap(verified)
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
    let (background, _stop_background) = background();
    let metrics = crate::http::install_metrics()?;
    let tables = config
        .router
        .tables
        .iter()
        .map(|(s, t)| format!("{s}.{t}"))
        .collect::<Vec<_>>()
        .join(", ");
    probe_broker(&kafka.producer, &live, &background)?;
    crate::http::spawn(
        listener,
        metrics,
        Arc::clone(&live),
        Subject {
            name: tables,
            delivery: config.delivery.as_str(),
            // Each lane holds at most one batch.
            max_in_flight_events: Some((config.batch_size * config.lanes.max(1)) as u64),
            ..Subject::default()
        },
        background,
    );
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

/// The stop of a command's background loops (HTTP, sampler, broker
/// probe, monitors), and its trigger, which fires when dropped: at the
/// command's end, after the drain, so they serve all through it.
pub(crate) fn background() -> (Shutdown, StopOnDrop) {
    let (trigger, background) = Shutdown::new();
    (background, StopOnDrop(trigger))
}

/// The broker probe of a relay (WAL, poll, backfill, recover): its answer
/// is `/readyz`'s `broker_reachable`, nothing more.
pub(crate) fn probe_broker(
    producer: &ProducerSettings,
    live: &Arc<LiveState>,
    background: &Shutdown,
) -> anyhow::Result<()> {
    let live = Arc::clone(live);
    crate::kafka::probe::spawn(producer, background.clone(), move |reachable| {
        live.set_broker_reachable(reachable)
    })
    .map_err(anyhow::Error::msg)
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

/// The columns the relay reads from an outbox row: a publication's column
/// list must keep them.
fn needed_columns(router: &RouterConfig) -> Vec<String> {
    let mut columns = crate::relay::outbox_watch::relay_columns(&router.columns);
    columns.extend(router.header_columns.iter().map(|h| h.column.clone()));
    columns
}

/// When `--pg-url` is a standby: a connection to the primary for the
/// writes a standby cannot take, or the error that names the fix. `--retain`
/// is refused there: its deletes must see the slot's position, and the
/// slot is on the standby.
async fn primary_for_run(
    client: &sql::SqlClient,
    primary: Option<&crate::postgres::ConnectionConfig>,
    heartbeat_interval: Duration,
    retention: &Option<crate::retention::RetentionConfig>,
) -> anyhow::Result<Option<sql::SqlClient>> {
    if !catalog::in_recovery(client).await? {
        return Ok(None);
    }
    if retention.is_some() {
        anyhow::bail!(
            "--retain cannot run while the relay decodes from a standby: the primary, where rows are deleted, cannot see how far the standby's slot has confirmed. Leave --retain out (delete rows on your own schedule, older than the slot's lag), or decode from the primary"
        );
    }
    let what = if heartbeat_interval.is_zero() {
        "walrelay's record of its slots is kept on the primary"
    } else {
        "the heartbeat that moves an idle slot is written on the primary (or turn it off with --heartbeat-interval 0)"
    };
    Ok(crate::standby::primary_for(client, primary, what).await?)
}

/// A missing slot is an error unless the operator asked to create it and
/// walrelay never streamed from a slot of that name (its record says):
/// a slot that vanished means events were not streamed. A slot that is
/// invalidated, or about to be, stops the relay too. Returns where the
/// record is kept (if it can be) and the slot's last confirmed position
/// as it has it.
///
/// On a standby the slot is read (and made) there, and the record is kept
/// on the primary (`writer`, which `primary` reaches).
async fn ensure_slot(
    config: &RelayConfig,
    create: bool,
    writer: Option<&sql::SqlClient>,
    primary: Option<&crate::postgres::ConnectionConfig>,
) -> anyhow::Result<(Option<String>, LastConfirmed)> {
    let server = sql::connect(&config.pg).await?;
    let client = writer.unwrap_or(&server);
    let schema = record_schema(&config.router.tables);
    let recording = match slot_record::ensure_table(client, &schema).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "cannot keep walrelay's record of its slots in {schema}.{}: a dropped slot cannot be told from one never made; run `walrelay setup` as a role that may create it", slot_record::TABLE);
            false
        }
    };
    let (recording, record) = if recording {
        match slot_record::find(client, &schema, &config.slot).await {
            Ok(record) => (true, record),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read walrelay's record of its slots in {schema}.{}: a dropped slot cannot be told from one never made; grant this role SELECT, INSERT, UPDATE on it", slot_record::TABLE);
                (false, None)
            }
        }
    } else {
        (false, None)
    };
    // The record guards against making a slot again; failing to update it
    // only costs the time in a later error message.
    let note = |what: &str, e: crate::sql::SqlError| {
        tracing::warn!(error = %e, "cannot {what} in {schema}.{}", slot_record::TABLE);
    };
    let was_in_use = record.is_some();
    let last = record.map(|r| r.last).unwrap_or_default();
    match catalog::slot(&server, &config.slot).await? {
        Some(slot) if slot.plugin != "pgoutput" => anyhow::bail!(
            "replication slot {:?} uses output plugin {:?}, not pgoutput; drop it or choose another --slot",
            config.slot,
            slot.plugin
        ),
        Some(_) => {
            let reading = catalog::slots(&server, Some(&config.slot))
                .await?
                .into_iter()
                .next();
            if let Some(problem) = slot_health::assess(&config.slot, reading.as_ref(), last.clone())
            {
                return Err(problem.into());
            }
        }
        None if create => {
            if recording {
                slot_record::may_create(client, &schema, &config.slot, false).await??;
            }
            let create = catalog::create_logical_slot(&server, &config.slot, writer.is_none());
            let lsn = match (writer, primary) {
                (Some(_), Some(primary)) => {
                    crate::standby::with_standby_snapshots(primary, create).await?
                }
                _ => create.await?,
            };
            if recording {
                if let Err(e) = slot_record::created(
                    client,
                    &schema,
                    &config.slot,
                    &config.publication,
                    &config.router.tables,
                    &lsn,
                )
                .await
                {
                    note("record the new slot", e);
                }
            }
            tracing::info!(slot = %config.slot, "created replication slot");
        }
        None if was_in_use => {
            return Err(SlotProblem::Missing {
                slot: config.slot.clone(),
                last,
            }
            .into());
        }
        None => anyhow::bail!(
            "replication slot {:?} does not exist: run `walrelay setup` (or pass --create-slot). If it existed before, someone dropped it and events written meanwhile were not relayed: recover them with `{}`",
            config.slot,
            slot_health::recover_command(&config.slot)
        ),
    }
    if recording {
        if let Err(e) = slot_record::used(
            client,
            &schema,
            &config.slot,
            &config.publication,
            &config.router.tables,
        )
        .await
        {
            note("record the slot's use", e);
        }
    }
    Ok((recording.then_some(schema), last))
}
