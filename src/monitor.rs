//! The slot monitor: every few seconds, on its own SQL connection, reads
//! the slot's lag and retained WAL and exports them, and checks that the
//! outbox tables and the publication are still there. A failed reading is
//! logged and counted and never stops the stream; a dropped table or
//! publication is a [`Finding`] the relay acts on.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::catalog::{self, SlotSnapshot, quote_ident};
use crate::live::LiveState;
use crate::metrics as m;
use crate::replication::ConnectionConfig;
use crate::sql::{SqlClient, SqlError, SqlSession};

/// How often the slot is read: the dashboard's history has a sample a
/// second.
pub const INTERVAL: Duration = Duration::from_secs(1);

const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

/// What the monitor tells the relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// The outbox can no longer be streamed: the relay stops with the fix.
    Outbox(OutboxProblem),
    /// PostgreSQL is shutting down (it ended the monitor's session and
    /// refuses new ones): the relay ends its replication session at once,
    /// so the walsender does not hold the shutdown while events drain.
    ServerStopping,
}

/// A dropped outbox table or publication, or a table the publication no
/// longer covers: changes to it are not streamed, so relaying on would
/// silently skip events.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OutboxProblem {
    #[error(
        "publication {publication:?} was dropped: recreate it (walrelay setup, or CREATE PUBLICATION {} FOR TABLE ...); events committed while it was missing were not streamed and are still in the outbox table unless deleted",
        quote_ident(publication)
    )]
    PublicationDropped { publication: String },
    #[error(
        "outbox table {schema}.{table} was dropped: recreate it (walrelay setup) and add it to the publication, or remove it from --table"
    )]
    TableDropped { schema: String, table: String },
    #[error(
        "publication {publication:?} no longer covers outbox table {schema}.{table}: ALTER PUBLICATION {} ADD TABLE {}",
        quote_ident(publication),
        catalog::qualified(schema, table)
    )]
    TableNotCovered {
        publication: String,
        schema: String,
        table: String,
    },
}

/// What the monitor watches.
#[derive(Clone, Debug)]
pub struct MonitorConfig {
    pub pg: ConnectionConfig,
    pub slot: String,
    pub publication: String,
    pub tables: Vec<(String, String)>,
}

/// Starts the monitor task; its findings arrive on the returned channel.
pub fn spawn(config: MonitorConfig, live: Arc<LiveState>) -> mpsc::Receiver<Finding> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut session = SqlSession::new(config.pg.clone());
        let mut tick = tokio::time::interval(INTERVAL);
        let mut last_failure = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                reason = session.closed() => {
                    // The server ended the session: a fast shutdown does
                    // that first, then refuses new connections.
                    tracing::debug!(reason = %reason.message, "slot monitor session ended");
                    if let Err(e) = session.client().await {
                        if is_shutting_down(&e) {
                            tracing::info!("PostgreSQL is shutting down");
                            let _ = tx.try_send(Finding::ServerStopping);
                        }
                    }
                    continue;
                }
            }
            let client = match session.client().await {
                Ok(c) => c,
                Err(e) => {
                    if is_shutting_down(&e) {
                        let _ = tx.try_send(Finding::ServerStopping);
                    }
                    failed(
                        &live,
                        &mut last_failure,
                        format!("slot monitor cannot connect: {e}"),
                    );
                    continue;
                }
            };
            match catalog::slots(client, Some(&config.slot)).await {
                Ok(slots) => {
                    let snapshot = slots.into_iter().next();
                    export(&config.slot, snapshot.as_ref());
                    live.set_slot(snapshot);
                    if let Ok(limit) = catalog::max_slot_wal_keep_size(client).await {
                        live.set_wal_keep_limit(limit);
                    }
                }
                Err(e) => failed(
                    &live,
                    &mut last_failure,
                    format!("slot monitor query failed: {e}"),
                ),
            }
            match outbox_problem(client, &config.publication, &config.tables).await {
                Ok(Some(problem)) => {
                    // The relay ends on the first; a full channel means it has one.
                    let _ = tx.try_send(Finding::Outbox(problem));
                }
                Ok(None) => last_failure = None,
                Err(e) => failed(
                    &live,
                    &mut last_failure,
                    format!("outbox check failed: {e}"),
                ),
            }
        }
    });
    rx
}

async fn outbox_problem(
    client: &SqlClient,
    publication: &str,
    tables: &[(String, String)],
) -> Result<Option<OutboxProblem>, SqlError> {
    if !catalog::publication_exists(client, publication).await? {
        return Ok(Some(OutboxProblem::PublicationDropped {
            publication: publication.to_owned(),
        }));
    }
    for (schema, table) in tables {
        if !catalog::table_exists(client, schema, table).await? {
            return Ok(Some(OutboxProblem::TableDropped {
                schema: schema.clone(),
                table: table.clone(),
            }));
        }
        if !catalog::publication_covers(client, publication, schema, table).await? {
            return Ok(Some(OutboxProblem::TableNotCovered {
                publication: publication.to_owned(),
                schema: schema.clone(),
                table: table.clone(),
            }));
        }
    }
    Ok(None)
}

/// The server refuses connections because it is shutting down.
fn is_shutting_down(error: &SqlError) -> bool {
    error
        .server()
        .is_some_and(|e| e.code == "57P03" && e.message.contains("shutting down"))
}

/// Counts a failed reading; logs it when it differs from the last one, so
/// a server that is down for a while does not flood the log.
fn failed(live: &LiveState, last: &mut Option<String>, message: String) {
    if last.as_deref() != Some(message.as_str()) {
        tracing::warn!(error = %message, "slot monitor");
    } else {
        tracing::debug!(error = %message, "slot monitor");
    }
    *last = Some(message);
    metrics::counter!(m::MONITOR_ERRORS_TOTAL).increment(1);
    live.counters.monitor_errors.fetch_add(1, Ordering::Relaxed);
}

fn export(slot: &str, snapshot: Option<&SlotSnapshot>) {
    let Some(s) = snapshot else {
        metrics::gauge!(m::SLOT_ACTIVE, "slot" => slot.to_owned()).set(0.0);
        return;
    };
    metrics::gauge!(m::SLOT_ACTIVE, "slot" => slot.to_owned()).set(if s.active {
        1.0
    } else {
        0.0
    });
    if let Some(v) = s.lag_bytes {
        metrics::gauge!(m::SLOT_LAG_BYTES, "slot" => slot.to_owned()).set(v as f64);
    }
    if let Some(v) = s.retained_wal_bytes {
        metrics::gauge!(m::SLOT_RETAINED_WAL_BYTES, "slot" => slot.to_owned()).set(v as f64);
    }
    metrics::gauge!(m::SLOT_SAFE_WAL_SIZE_BYTES, "slot" => slot.to_owned())
        .set(s.safe_wal_size.map_or(-1.0, |v| v as f64));
    for state in WAL_STATUSES {
        let value = if s.wal_status.as_deref() == Some(state) {
            1.0
        } else {
            0.0
        };
        metrics::gauge!(m::SLOT_WAL_STATUS, "slot" => slot.to_owned(), "wal_status" => state)
            .set(value);
    }
    metrics::gauge!(m::SLOT_WRITE_LAG_SECONDS, "slot" => slot.to_owned())
        .set(s.write_lag_seconds.unwrap_or(0.0));
    metrics::gauge!(m::SLOT_FLUSH_LAG_SECONDS, "slot" => slot.to_owned())
        .set(s.flush_lag_seconds.unwrap_or(0.0));
}
