//! The slot monitor: every few seconds, on its own control connection, reads
//! the slot's lag and retained WAL and exports them. A failure is logged and
//! counted; it never stops the stream.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::metrics as m;
use crate::replication::ConnectionConfig;
use crate::replication::config::SqlSession;
use crate::status::{RelayStatus, Sample, SlotSnapshot};

/// How often the slot is read.
pub const INTERVAL: Duration = Duration::from_secs(2);

const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

/// The query behind the lag metrics: one row per slot (all, or one by name).
pub const SLOT_QUERY: &str = "
SELECT s.slot_name::text,
       s.active,
       s.active_pid,
       s.wal_status,
       s.safe_wal_size,
       (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END
          - s.confirmed_flush_lsn)::bigint AS lag_bytes,
       (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END
          - s.restart_lsn)::bigint AS retained_wal_bytes,
       s.confirmed_flush_lsn::text,
       s.restart_lsn::text,
       EXTRACT(epoch FROM r.write_lag)::float8,
       EXTRACT(epoch FROM r.flush_lag)::float8
FROM pg_replication_slots s
LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
WHERE $1::text IS NULL OR s.slot_name = $1
ORDER BY s.slot_name";

/// Reads slots (all when `slot` is `None`).
pub async fn read_slots(
    client: &tokio_postgres::Client,
    slot: Option<&str>,
) -> Result<Vec<SlotSnapshot>, tokio_postgres::Error> {
    let rows = client.query(SLOT_QUERY, &[&slot]).await?;
    Ok(rows
        .iter()
        .map(|r| SlotSnapshot {
            slot_name: r.get(0),
            active: r.get(1),
            active_pid: r.get(2),
            wal_status: r.get(3),
            safe_wal_size: r.get(4),
            lag_bytes: r.get(5),
            retained_wal_bytes: r.get(6),
            confirmed_flush_lsn: r.get(7),
            restart_lsn: r.get(8),
            write_lag_seconds: r.get(9),
            flush_lag_seconds: r.get(10),
        })
        .collect())
}

/// Starts the monitor task. It also watches that the outbox tables exist:
/// a dropped outbox table is a permanent condition that ends the relay.
pub fn spawn(
    config: ConnectionConfig,
    slot: String,
    publication: String,
    tables: Vec<(String, String)>,
    status: Arc<RelayStatus>,
) {
    tokio::spawn(async move {
        let mut session = SqlSession::new(config);
        let mut tick = tokio::time::interval(INTERVAL);
        loop {
            tick.tick().await;
            let c = match session.client().await {
                Ok(c) => c,
                Err(e) => {
                    failed(&status, &format!("slot monitor cannot connect: {e}"));
                    record_sample(&status);
                    continue;
                }
            };
            match read_slots(c, Some(&slot)).await {
                Ok(slots) => {
                    let snapshot = slots.into_iter().next();
                    export(&slot, snapshot.as_ref());
                    status.set_slot(snapshot);
                }
                Err(e) => failed(&status, &format!("slot monitor query failed: {e}")),
            }
            match outbox_problem(c, &publication, &tables).await {
                Ok(Some(problem)) => status.set_fatal(problem),
                Ok(None) => {}
                Err(e) => failed(&status, &format!("outbox check failed: {e}")),
            }
            record_sample(&status);
        }
    });
}

/// A dropped outbox table or publication, or a table the publication no
/// longer covers: changes to it are not streamed, so relaying on would
/// silently skip events. These end the relay with their fix.
async fn outbox_problem(
    client: &tokio_postgres::Client,
    publication: &str,
    tables: &[(String, String)],
) -> Result<Option<String>, tokio_postgres::Error> {
    use crate::replication::connection::quote_ident;
    let publication_exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&publication],
        )
        .await?
        .get(0);
    if !publication_exists {
        return Ok(Some(format!(
            "publication {publication:?} was dropped: recreate it (walrelay setup, or CREATE PUBLICATION {} FOR TABLE ...); events committed while it was missing were not streamed and are still in the outbox table unless deleted",
            quote_ident(publication)
        )));
    }
    for (schema, table) in tables {
        let name = format!("{}.{}", quote_ident(schema), quote_ident(table));
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
            .await?
            .get(0);
        if !exists {
            return Ok(Some(format!(
                "outbox table {schema}.{table} was dropped: recreate it (walrelay setup) and add it to the publication, or remove it from --table"
            )));
        }
        let covered: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)",
                &[&publication, schema, table],
            )
            .await?
            .get(0);
        if !covered {
            return Ok(Some(format!(
                "publication {publication:?} no longer covers outbox table {schema}.{table}: ALTER PUBLICATION {} ADD TABLE {name}",
                quote_ident(publication)
            )));
        }
    }
    Ok(None)
}

fn failed(status: &RelayStatus, message: &str) {
    tracing::warn!(error = message, "slot monitor");
    metrics::counter!(m::MONITOR_ERRORS_TOTAL).increment(1);
    status
        .counters
        .monitor_errors
        .fetch_add(1, Ordering::Relaxed);
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

fn record_sample(status: &RelayStatus) {
    let slot = status.slot();
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    status.history.push(Sample {
        unix_ms,
        lag_bytes: slot.as_ref().and_then(|s| s.lag_bytes),
        retained_wal_bytes: slot.as_ref().and_then(|s| s.retained_wal_bytes),
        events_published: status.counters.events_published.load(Ordering::Relaxed),
        in_flight: status.counters.in_flight.load(Ordering::Relaxed),
        p99_commit_to_ack_ms: status.latency.quantile(0.99).map(|s| s * 1000.0),
    });
}
