//! Every catalog query walrelay runs, and identifier quoting. `setup`,
//! `check`, `status`, the slot monitor and slot creation all ask the same
//! questions; they ask them here.

use crate::sql::{SqlClient as Client, SqlError};

pub use crate::postgres::{quote_ident, quote_literal};

/// `"schema"."table"`.
pub fn qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

/// Whether a table (or any relation) of that name exists.
pub async fn table_exists(client: &Client, schema: &str, table: &str) -> Result<bool, SqlError> {
    Ok(client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&qualified(schema, table)],
        )
        .await?
        .get(0))
}

pub async fn publication_exists(client: &Client, publication: &str) -> Result<bool, SqlError> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&publication],
        )
        .await?
        .get(0))
}

/// Whether the publication publishes inserts; `None` when it does not exist.
pub async fn publication_publishes_inserts(
    client: &Client,
    publication: &str,
) -> Result<Option<bool>, SqlError> {
    Ok(client
        .query_opt(
            "SELECT pubinsert FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?
        .map(|row| row.get(0)))
}

/// Whether the publication covers the table (listed, or FOR ALL TABLES).
pub async fn publication_covers(
    client: &Client,
    publication: &str,
    schema: &str,
    table: &str,
) -> Result<bool, SqlError> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)",
            &[&publication, &schema, &table],
        )
        .await?
        .get(0))
}

/// What a publication does with one table's inserts: what pgoutput reads
/// to decide whether an INSERT becomes a message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishedTable {
    /// `publish` includes `insert`.
    pub inserts: bool,
    /// The table is in it (listed, FOR ALL TABLES, or TABLES IN SCHEMA).
    pub covered: bool,
    /// Its row filter (15+), as `pg_get_expr` prints it.
    pub row_filter: Option<String>,
    /// The columns it publishes (15+); `None` when the server does not say.
    pub columns: Option<Vec<String>>,
}

/// How `publication` publishes `schema.table`; `None` when the publication
/// does not exist. Row filters and column lists (15+) come through
/// `to_jsonb`, so the query runs on PostgreSQL 14 to 18.
pub async fn published_table(
    client: &Client,
    publication: &str,
    schema: &str,
    table: &str,
) -> Result<Option<PublishedTable>, SqlError> {
    let Some(row) = client
        .query_opt(
            "SELECT p.pubinsert, t.pubname IS NOT NULL, to_jsonb(t) ->> 'rowfilter',
                    (to_jsonb(t) -> 'attnames')::text
             FROM pg_publication p
             LEFT JOIN pg_publication_tables t
               ON t.pubname = p.pubname AND t.schemaname = $2 AND t.tablename = $3
             WHERE p.pubname = $1",
            &[&publication, &schema, &table],
        )
        .await?
    else {
        return Ok(None);
    };
    let columns: Option<String> = row.get(3);
    Ok(Some(PublishedTable {
        inserts: row.get(0),
        covered: row.get(1),
        row_filter: row.get(2),
        columns: columns.and_then(|json| serde_json::from_str(&json).ok()),
    }))
}

/// A table's OID by name; `None` when no relation has that name.
pub async fn table_oid(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<Option<u32>, SqlError> {
    Ok(client
        .query_one("SELECT to_regclass($1)::oid", &[&qualified(schema, table)])
        .await?
        .get(0))
}

/// The `schema.table` a relation OID has now; `None` once it is dropped.
pub async fn table_name_of(client: &Client, oid: u32) -> Result<Option<String>, SqlError> {
    Ok(client
        .query_opt(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
            &[&oid],
        )
        .await?
        .map(|row| row.get(0)))
}

/// The server's WAL position now (its replay position on a standby), and
/// its clock (UTC, RFC 3339).
pub async fn wal_position(client: &Client) -> Result<(String, String), SqlError> {
    let row = client
        .query_one(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text,
                    to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// A replication slot's plugin, database, and failover state (17+).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    pub plugin: String,
    pub database: String,
    /// Synchronized to standbys (`None` before PostgreSQL 17).
    pub failover: Option<bool>,
    /// A copy a standby keeps of its primary's slot (17+).
    pub synced: Option<bool>,
    /// Dropped at disconnect or promotion (a synced copy is temporary
    /// until it is usable).
    pub temporary: bool,
}

/// The first PostgreSQL major version with failover slots.
pub const FAILOVER_SLOTS_SINCE: i32 = 17;

/// Columns that exist only in some versions are read through `to_jsonb`,
/// so one query serves PostgreSQL 14 to 18.
pub async fn slot(client: &Client, name: &str) -> Result<Option<SlotInfo>, SqlError> {
    Ok(client
        .query_opt(
            "SELECT coalesce(plugin::text, ''), coalesce(database::text, ''),
                    (to_jsonb(s) ->> 'failover')::bool, (to_jsonb(s) ->> 'synced')::bool, temporary
             FROM pg_replication_slots s WHERE slot_name = $1",
            &[&name],
        )
        .await?
        .map(|row| SlotInfo {
            plugin: row.get(0),
            database: row.get(1),
            failover: row.get(2),
            synced: row.get(3),
            temporary: row.get(4),
        }))
}

/// The server's major version (14, 15, ... 18).
pub async fn server_major(client: &Client) -> Result<i32, SqlError> {
    let num: String = client
        .query_one("SELECT current_setting('server_version_num')", &[])
        .await?
        .get(0);
    Ok(num.parse::<i32>().unwrap_or(0) / 10_000)
}

/// Creates a pgoutput slot, a failover slot when asked and the server has
/// them (17+); returns the LSN it starts at.
pub async fn create_logical_slot(
    client: &Client,
    name: &str,
    failover: bool,
) -> Result<String, SqlError> {
    let sql = if failover && server_major(client).await? >= FAILOVER_SLOTS_SINCE {
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
    } else {
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')"
    };
    Ok(client.query_one(sql, &[&name]).await?.get(0))
}

/// `max_slot_wal_keep_size` in bytes; `None` when -1 (slots keep WAL
/// without limit).
pub async fn max_slot_wal_keep_size(client: &Client) -> Result<Option<i64>, SqlError> {
    let mb: i64 = client
        .query_one(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'max_slot_wal_keep_size'",
            &[],
        )
        .await?
        .get(0);
    Ok((mb >= 0).then_some(mb * 1024 * 1024))
}

/// Whether the server is a standby.
pub async fn in_recovery(client: &Client) -> Result<bool, SqlError> {
    Ok(client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await?
        .get(0))
}

/// Physical slots (the standbys'), by name.
pub async fn physical_slots(client: &Client) -> Result<Vec<String>, SqlError> {
    Ok(client
        .query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_type = 'physical' ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// A setting that may not exist in this version (`None` then).
pub async fn setting_if_any(client: &Client, name: &str) -> Result<Option<String>, SqlError> {
    Ok(client
        .query_one("SELECT current_setting($1, true)", &[&name])
        .await?
        .get(0))
}

pub async fn current_database(client: &Client) -> Result<String, SqlError> {
    Ok(client
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0))
}

/// A server setting, as `SHOW` prints it.
pub async fn setting(client: &Client, name: &str) -> Result<String, SqlError> {
    Ok(client
        .query_one("SELECT current_setting($1)", &[&name])
        .await?
        .get(0))
}

pub async fn replication_slot_count(client: &Client) -> Result<i64, SqlError> {
    Ok(client
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await?
        .get(0))
}

pub async fn wal_sender_count(client: &Client) -> Result<i64, SqlError> {
    Ok(client
        .query_one("SELECT count(*) FROM pg_stat_replication", &[])
        .await?
        .get(0))
}

/// The current role, and whether it may replicate.
pub async fn role_can_replicate(client: &Client) -> Result<(String, bool), SqlError> {
    let row = client
        .query_one(
            "SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// A table's columns and their types (`format_type`), in order.
pub async fn table_columns(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<Vec<(String, String)>, SqlError> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
             FROM pg_attribute a WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&qualified(schema, table)],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// A table's columns and their type OIDs, in order (what a Relation
/// message would say; the polling source reads rows with it).
pub async fn table_column_oids(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<Vec<(String, u32)>, SqlError> {
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid
             FROM pg_attribute a WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&qualified(schema, table)],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The names of a table's (non-internal) triggers.
pub async fn table_triggers(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<Vec<String>, SqlError> {
    let rows = client
        .query(
            "SELECT tgname::text FROM pg_trigger
             WHERE tgrelid = $1::text::regclass AND NOT tgisinternal ORDER BY 1",
            &[&qualified(schema, table)],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Whether an index of that name exists in `schema`.
pub async fn index_exists(client: &Client, schema: &str, index: &str) -> Result<bool, SqlError> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                            WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('i', 'I'))",
            &[&schema, &index],
        )
        .await?
        .get(0))
}

pub async fn has_primary_key(client: &Client, schema: &str, table: &str) -> Result<bool, SqlError> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = $1::text::regclass AND indisprimary)",
            &[&qualified(schema, table)],
        )
        .await?
        .get(0))
}

/// One reading of a slot, from `pg_replication_slots` and
/// `pg_stat_replication`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct SlotSnapshot {
    pub slot_name: String,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub wal_status: Option<String>,
    pub safe_wal_size: Option<i64>,
    pub lag_bytes: Option<i64>,
    pub retained_wal_bytes: Option<i64>,
    pub confirmed_flush_lsn: Option<String>,
    pub restart_lsn: Option<String>,
    pub write_lag_seconds: Option<f64>,
    pub flush_lag_seconds: Option<f64>,
    /// Synchronized to standbys (17+).
    pub failover: Option<bool>,
    /// A standby's copy of its primary's slot (17+).
    pub synced: Option<bool>,
    /// Why the slot was invalidated (17+), or its conflict (16).
    pub invalidation_reason: Option<String>,
    /// Since when an inactive slot has been unused (17+).
    pub inactive_since: Option<String>,
    /// Decodes prepared transactions at PREPARE (14+ with the slot option).
    pub two_phase: Option<bool>,
}

/// The query behind the lag metrics and `walrelay status`: one row per
/// slot (all, or one by name). Columns of newer versions come through
/// `to_jsonb`, so the query runs on PostgreSQL 14 to 18.
const SLOTS_QUERY: &str = "
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
       EXTRACT(epoch FROM r.flush_lag)::float8,
       (to_jsonb(s) ->> 'failover')::bool,
       (to_jsonb(s) ->> 'synced')::bool,
       coalesce(to_jsonb(s) ->> 'invalidation_reason',
                CASE WHEN (to_jsonb(s) ->> 'conflicting')::bool THEN 'conflicting' END),
       to_char((to_jsonb(s) ->> 'inactive_since')::timestamptz AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
       (to_jsonb(s) ->> 'two_phase')::bool
FROM pg_replication_slots s
LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
WHERE $1::text IS NULL OR s.slot_name = $1
ORDER BY s.slot_name";

/// Reads slots (all when `slot` is `None`).
pub async fn slots(client: &Client, slot: Option<&str>) -> Result<Vec<SlotSnapshot>, SqlError> {
    let rows = client.query(SLOTS_QUERY, &[&slot]).await?;
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
            failover: r.get(11),
            synced: r.get(12),
            invalidation_reason: r.get(13),
            inactive_since: r.get(14),
            two_phase: r.get(15),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_literals_are_quoted_with_their_quotes_doubled() {
        assert_eq!(quote_ident("outbox"), "\"outbox\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(qualified("public", "outbox"), "\"public\".\"outbox\"");
    }
}
