//! Retention (`walrelay run --retain 24h`): the relay deletes outbox rows
//! that are older than the retention *and* whose event PostgreSQL knows
//! is delivered, so the rows stay for `recover` and `backfill` meanwhile.
//!
//! # How a row is known to be confirmed
//!
//! The relay confirms a commit LSN to the slot only after every event at
//! or below it is acknowledged by the broker (acks=all). So a row may go
//! once its inserting transaction committed at or below the slot's
//! `confirmed_flush_lsn`. PostgreSQL does not store a row's commit LSN,
//! but the slot's `catalog_xmin` gives a bound on it that needs no state
//! of ours and survives every restart:
//!
//! - the decoder raises a slot's `catalog_xmin` only to the
//!   `oldestRunningXid` of an `xl_running_xacts` record at some LSN `L`
//!   (or lower, if the reorder buffer still needs an older snapshot), and
//!   only once `confirmed_flush_lsn >= L` (`LogicalIncreaseXminForSlot`,
//!   `LogicalConfirmReceivedLocation`);
//! - every transaction id below `oldestRunningXid` had ended before that
//!   record was written: a commit record is inserted before the
//!   transaction leaves the proc array, and the record is written after
//!   the proc array was read. So its commit ends at or below `L`;
//! - hence a row whose `xmin` is older than the slot's `catalog_xmin`
//!   committed at or below `L <= confirmed_flush_lsn`: its event is in
//!   Kafka (or in the dead-letter table), confirmed.
//!
//! `age()` compares transaction ids across wraparound. A row frozen long
//! ago with a raw `xmin` over 2^31 transactions old reads as young and is
//! kept: when in doubt, keep. The bound lags the confirmed LSN by at most
//! one `xl_running_xacts` interval (15 s on a busy server), which does not
//! matter next to a retention of hours.
//!
//! A row committed before the slot existed was never streamed, yet is
//! below the bound too: backfill such rows before turning retention on
//! (docs/retention.md says so).
//!
//! # How it stays out of the way
//!
//! Each batch is one short autocommit `DELETE` of at most `batch_size`
//! rows, picked oldest first through the index on the created-at column
//! with `FOR UPDATE SKIP LOCKED` (a row someone holds is left for the
//! next pass), under a `lock_timeout` so a pending `ALTER TABLE` never
//! queues writers behind it. Failures are logged and counted; the next
//! pass tries again. Pruning never stops or slows the stream.

use std::time::Duration;

use crate::catalog::{qualified, quote_ident};
use crate::metrics as m;
use crate::replication::ConnectionConfig;
use crate::shutdown::Shutdown;
use crate::sql::{SqlClient, SqlError, SqlSession};

/// The default rows per `DELETE`.
pub const DEFAULT_BATCH_SIZE: u64 = 1000;

/// What retention needs.
#[derive(Clone, Debug)]
pub struct RetentionConfig {
    pub pg: ConnectionConfig,
    pub slot: String,
    pub tables: Vec<(String, String)>,
    pub created_at_column: String,
    /// Rows younger than this are kept, confirmed or not.
    pub retain: Duration,
    /// Rows per `DELETE` (one short transaction each).
    pub batch_size: u64,
    /// Time between passes.
    pub interval: Duration,
}

/// Why a pass deleted nothing.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error(transparent)]
    Postgres(#[from] SqlError),
    #[error(
        "replication slot {0:?} does not exist in this database: retention deletes nothing, since no row can be known to be delivered"
    )]
    NoSlot(String),
}

/// Prunes every `interval` until `shutdown`.
pub fn spawn(config: RetentionConfig, mut shutdown: Shutdown) {
    metrics::gauge!(m::RETENTION_SECONDS).set(config.retain.as_secs_f64());
    tokio::spawn(async move {
        let mut session = SqlSession::new(config.pg.clone());
        // The first pass waits one interval: the stream starts first.
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + config.interval,
            config.interval,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if shutdown.unless(tick.tick()).await.is_none() {
                return;
            }
            let result = match session.client().await {
                Ok(client) => prune(client, &config).await,
                Err(e) => Err(e.into()),
            };
            match result {
                Ok(deleted) => {
                    metrics::counter!(m::RETENTION_PASSES_TOTAL).increment(1);
                    if deleted > 0 {
                        tracing::debug!(deleted, "retention pass");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "retention pass failed; retrying at the next pass");
                    metrics::counter!(m::RETENTION_ERRORS_TOTAL).increment(1);
                }
            }
        }
    });
}

/// One pass: deletes, batch by batch, every row of every table that is old
/// enough and confirmed; then records the oldest row's age. Returns the
/// rows deleted.
pub async fn prune(client: &SqlClient, config: &RetentionConfig) -> Result<u64, RetentionError> {
    // A pending ACCESS EXCLUSIVE lock must not make writers queue behind a
    // DELETE waiting for it; a statement never runs long either.
    client
        .batch_execute("SET lock_timeout = '2s'; SET statement_timeout = '60s'")
        .await?;
    let slot = client
        .query_opt(
            "SELECT catalog_xmin IS NOT NULL FROM pg_replication_slots
             WHERE slot_name = $1 AND database = current_database()",
            &[&config.slot],
        )
        .await?;
    if !slot.is_some_and(|row| row.get::<_, bool>(0)) {
        return Err(RetentionError::NoSlot(config.slot.clone()));
    }
    let retain = config.retain.as_secs_f64();
    let mut total = 0;
    for (schema, table) in &config.tables {
        let name = format!("{schema}.{table}");
        let delete = delete_sql(schema, table, &config.created_at_column, config.batch_size);
        loop {
            let deleted = client.execute(&delete, &[&retain, &config.slot]).await?;
            metrics::counter!(m::RETENTION_DELETED_TOTAL, "table" => name.clone())
                .increment(deleted);
            total += deleted;
            if deleted < config.batch_size {
                break;
            }
        }
        let age: f64 = client
            .query_one(&oldest_sql(schema, table, &config.created_at_column), &[])
            .await?
            .get(0);
        metrics::gauge!(m::RETENTION_OLDEST_ROW_AGE_SECONDS, "table" => name).set(age);
    }
    Ok(total)
}

/// One batch: `$1` the retention in seconds, `$2` the slot. The row's
/// `xmin` must be older than the slot's `catalog_xmin` (see the module
/// comment), and older than every other pgoutput slot's of the database
/// too: another relay (a second slot on the same table) may not have
/// confirmed it yet, and its `recover` would need the row. A missing (or
/// invalidated) own slot makes the bound NULL, which deletes nothing.
fn delete_sql(schema: &str, table: &str, created_at: &str, batch_size: u64) -> String {
    let table = qualified(schema, table);
    let created_at = quote_ident(created_at);
    format!(
        "DELETE FROM {table} WHERE ctid = ANY(ARRAY(
           SELECT ctid FROM {table}
           WHERE {created_at} < now() - make_interval(secs => $1::float8)
             AND age(xmin) > (SELECT CASE WHEN bool_or(slot_name = $2) THEN max(age(catalog_xmin)) END
                              FROM pg_replication_slots
                              WHERE database = current_database() AND plugin = 'pgoutput'
                                AND catalog_xmin IS NOT NULL)
           ORDER BY {created_at}
           LIMIT {batch_size}
           FOR UPDATE SKIP LOCKED))"
    )
}

/// The oldest row's age in seconds (0 for an empty table).
fn oldest_sql(schema: &str, table: &str, created_at: &str) -> String {
    format!(
        "SELECT COALESCE(EXTRACT(EPOCH FROM now() - min({}))::float8, 0) FROM {}",
        quote_ident(created_at),
        qualified(schema, table)
    )
}

/// The index retention's batches walk, oldest first.
pub fn index_name(table: &str, created_at: &str) -> String {
    let mut name = format!("{table}_{created_at}_idx");
    // PostgreSQL truncates identifiers to 63 bytes; truncate the same way
    // so setup and check agree on the name.
    while name.len() > 63 {
        name.pop();
    }
    name
}

/// `CREATE INDEX CONCURRENTLY`: writers go on while it builds.
pub fn create_index_sql(schema: &str, table: &str, created_at: &str) -> String {
    format!(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} ({})",
        quote_ident(&index_name(table, created_at)),
        qualified(schema, table),
        quote_ident(created_at)
    )
}

/// Whether a valid index leads with the created-at column (any name).
pub async fn has_index(
    client: &SqlClient,
    schema: &str,
    table: &str,
    created_at: &str,
) -> Result<bool, SqlError> {
    Ok(client
        .query_one(
            "SELECT EXISTS (
               SELECT 1 FROM pg_index i
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
               WHERE i.indrelid = $1::text::regclass AND a.attname = $2
                 AND i.indisvalid AND i.indpred IS NULL)",
            &[&qualified(schema, table), &created_at],
        )
        .await?
        .get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_name_is_cut_where_postgres_cuts_identifiers() {
        assert_eq!(index_name("outbox", "created_at"), "outbox_created_at_idx");
        assert_eq!(index_name(&"t".repeat(70), "c").len(), 63);
    }

    #[test]
    fn delete_takes_a_bounded_batch_oldest_first_and_skips_locked_rows() {
        let sql = delete_sql("public", "outbox", "created_at", 1000);
        assert!(sql.contains("LIMIT 1000"), "{sql}");
        assert!(sql.contains("ORDER BY \"created_at\""), "{sql}");
        assert!(sql.contains("FOR UPDATE SKIP LOCKED"), "{sql}");
        assert!(
            sql.contains("THEN max(age(catalog_xmin))") && sql.contains("bool_or(slot_name = $2)"),
            "{sql}"
        );
    }
}
