//! The backlog monitor: each table's unpublished rows, failing rows and the
//! age of the oldest, every interval, into the metrics and the live state.

use std::sync::Arc;
use std::time::Duration;

use super::claim::{self, OutboxTable};
use super::load_tables;
use crate::live::{Backlog, LiveState};
use crate::metrics as m;
use crate::postgres::ConnectionConfig;
use crate::router::RouterConfig;
use crate::shutdown::Shutdown;
use crate::sql::{self, SqlClient};

/// Reads each table's backlog every `interval` into the metrics and the
/// live state, until shutdown.
pub fn spawn_backlog_monitor(
    pg: ConnectionConfig,
    router: RouterConfig,
    interval: Duration,
    live: Arc<LiveState>,
    mut shutdown: Shutdown,
) {
    tokio::spawn(async move {
        let mut session: Option<(SqlClient, Vec<OutboxTable>)> = None;
        loop {
            if session.as_ref().is_none_or(|(c, _)| c.is_closed()) {
                let connect = async {
                    let client = sql::connect(&pg).await.ok()?;
                    let tables = load_tables(&client, &router).await.ok()?;
                    Some((client, tables))
                };
                match shutdown.unless(connect).await {
                    Some(connected) => session = connected,
                    None => return,
                }
            }
            if let Some((client, tables)) = &session {
                let mut total = Backlog::default();
                for table in tables {
                    match claim::number_unsequenced(client, table).await {
                        Ok(0) => {}
                        Ok(numbered) => {
                            tracing::warn!(table = %table.name(), numbered, "rows came in without a sequence number (the insert trigger was bypassed); numbered them now, after the rows numbered before");
                            metrics::counter!(m::POLL_ROWS_NUMBERED_TOTAL).increment(numbered);
                        }
                        Err(error) => {
                            tracing::warn!(%error, "cannot number rows that came in without a sequence number")
                        }
                    }
                    match claim::backlog(client, table).await {
                        Ok(backlog) => {
                            let name = table.name();
                            metrics::gauge!(m::OUTBOX_PENDING_ROWS, "table" => name.clone())
                                .set(backlog.pending_rows as f64);
                            metrics::gauge!(m::OUTBOX_FAILING_ROWS, "table" => name.clone())
                                .set(backlog.failing_rows as f64);
                            metrics::gauge!(m::OUTBOX_OLDEST_PENDING_SECONDS, "table" => name)
                                .set(backlog.oldest_pending_seconds.unwrap_or(0.0));
                            total.pending_rows += backlog.pending_rows;
                            total.failing_rows += backlog.failing_rows;
                            total.oldest_pending_seconds = match (
                                total.oldest_pending_seconds,
                                backlog.oldest_pending_seconds,
                            ) {
                                (Some(a), Some(b)) => Some(a.max(b)),
                                (a, b) => a.or(b),
                            };
                        }
                        Err(error) => {
                            tracing::debug!(%error, "backlog query failed");
                            metrics::counter!(m::MONITOR_ERRORS_TOTAL).increment(1);
                            live.counters
                                .monitor_errors
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
                live.set_backlog(Some(total));
            }
            if !shutdown.sleep(interval).await {
                return;
            }
        }
    });
}
