//! walrelay's own record of the slots it made and streamed from, in a
//! table beside the outbox (`walrelay_slots`). A slot that vanished leaves
//! no trace in `pg_replication_slots`; this record is how `setup` and
//! `run --create-slot` tell "never had a slot" (make one) from "had one and
//! lost it" (events since its last confirmed LSN were never streamed: a new
//! slot would skip them silently, so refuse and name `walrelay recover`).
//!
//! The record is a table, not a file, so it follows the database: a
//! promoted standby has it, and so does a restored backup.

use crate::catalog::qualified;
use crate::lsn::Lsn;
use crate::postgres::ConnectionConfig;
use crate::slot_health::{LastConfirmed, recover_command};
use crate::sql::{SqlClient as Client, SqlError};
use crate::standby::WriteRoute;

/// The record's table name, in the schema of the first outbox table.
pub const TABLE: &str = "walrelay_slots";

/// Where the record is kept: beside the first outbox table.
pub fn record_schema(tables: &[(String, String)]) -> String {
    tables
        .first()
        .map_or_else(|| "public".to_owned(), |(schema, _)| schema.clone())
}

/// One slot walrelay made or streamed from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotRecord {
    pub slot: String,
    /// The outbox tables it streamed, `schema.table`.
    pub tables: Vec<String>,
    /// When walrelay made it (UTC, RFC 3339); `None` for a slot made
    /// before walrelay kept records.
    pub created_at: Option<String>,
    pub last: LastConfirmed,
}

/// The slot was in use and is gone: a new one would silently skip every
/// event committed since.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "replication slot {slot:?} does not exist, but walrelay made or streamed from it before ({}{}): it was dropped or invalidated, or this server was promoted without it, and events committed since were not streamed. A new slot would skip them silently, so none is made. Recover them from the outbox table with `{}` (same --pg-url, --brokers and routing flags as run); or, to accept that loss, run `walrelay setup --new-slot`. See docs/runbooks/slot-dropped.md",
    record.last,
    record.created_at.as_deref().map(|at| format!(", created at {at}")).unwrap_or_default(),
    recover_command(&record.slot)
)]
pub struct SlotWasInUse {
    pub slot: String,
    pub record: SlotRecord,
}

fn table(schema: &str) -> String {
    qualified(schema, TABLE)
}

fn tables_text(tables: &[(String, String)]) -> Vec<String> {
    tables.iter().map(|(s, t)| format!("{s}.{t}")).collect()
}

/// Creates the record's table if it is missing (only then: a role that
/// may not create tables in the schema can still use one made by setup).
pub async fn ensure_table(client: &Client, schema: &str) -> Result<(), SqlError> {
    if table_exists(client, schema).await? {
        return Ok(());
    }
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {0} (
  slot_name     text PRIMARY KEY,
  publication   text NOT NULL,
  tables        text[] NOT NULL,
  created_at    timestamptz,
  created_lsn   pg_lsn,
  last_used_at  timestamptz,
  confirmed_lsn pg_lsn,
  confirmed_at  timestamptz,
  inserts_at_confirm bigint
);
COMMENT ON TABLE {0} IS 'walrelay: the replication slots it made and streamed from (see walrelay setup --new-slot)'",
            table(schema)
        ))
        .await
}

/// Whether the record's table exists.
pub async fn table_exists(client: &Client, schema: &str) -> Result<bool, SqlError> {
    crate::catalog::table_exists(client, schema, TABLE).await
}

/// The record of `slot`; `None` when walrelay never made or streamed from
/// a slot of that name here (or the table does not exist). Keyed by name:
/// a second slot under another name (`--slot`) is a deliberate choice.
pub async fn find(
    client: &Client,
    schema: &str,
    slot: &str,
) -> Result<Option<SlotRecord>, SqlError> {
    if !table_exists(client, schema).await? {
        return Ok(None);
    }
    let row = client
        .query_opt(
            &format!(
                "SELECT slot_name, tables,
                        to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                        confirmed_lsn::text,
                        to_char(confirmed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
                 FROM {} WHERE slot_name = $1",
                table(schema)
            ),
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| {
        let (lsn, at): (Option<String>, Option<String>) = (r.get(3), r.get(4));
        SlotRecord {
            slot: r.get(0),
            tables: r.get(1),
            created_at: r.get(2),
            last: LastConfirmed {
                lsn: lsn.clone(),
                seen: lsn.zip(at),
            },
        }
    }))
}

/// May a missing `slot` be made? Yes when walrelay never streamed from a
/// slot of that name, or the operator accepts a new slot (`new_slot`).
pub async fn may_create(
    client: &Client,
    schema: &str,
    slot: &str,
    new_slot: bool,
) -> Result<Result<(), SlotWasInUse>, SqlError> {
    if new_slot {
        return Ok(Ok(()));
    }
    Ok(match find(client, schema, slot).await? {
        Some(record) => Err(SlotWasInUse {
            slot: slot.to_owned(),
            record,
        }),
        None => Ok(()),
    })
}

/// Records a slot walrelay just made at `lsn` (replacing any record of a
/// slot of that name).
pub async fn created(
    client: &Client,
    schema: &str,
    slot: &str,
    publication: &str,
    tables: &[(String, String)],
    lsn: &str,
) -> Result<(), SqlError> {
    client
        .execute(
            &format!(
                "INSERT INTO {} (slot_name, publication, tables, created_at, created_lsn)
                 VALUES ($1, $2, $3, now(), $4::text::pg_lsn)
                 ON CONFLICT (slot_name) DO UPDATE SET publication = EXCLUDED.publication,
                   tables = EXCLUDED.tables, created_at = now(), created_lsn = EXCLUDED.created_lsn,
                   last_used_at = NULL, confirmed_lsn = NULL, confirmed_at = NULL",
                table(schema)
            ),
            &[&slot, &publication, &tables_text(tables), &lsn],
        )
        .await?;
    Ok(())
}

/// Records that `slot` exists and streams these tables (setup and run; a
/// slot made before walrelay kept records gets one here).
pub async fn used(
    client: &Client,
    schema: &str,
    slot: &str,
    publication: &str,
    tables: &[(String, String)],
) -> Result<(), SqlError> {
    client
        .execute(
            &format!(
                "INSERT INTO {} (slot_name, publication, tables, last_used_at)
                 VALUES ($1, $2, $3, now())
                 ON CONFLICT (slot_name) DO UPDATE SET publication = EXCLUDED.publication,
                   tables = EXCLUDED.tables, last_used_at = now()",
                table(schema)
            ),
            &[&slot, &publication, &tables_text(tables)],
        )
        .await?;
    Ok(())
}

/// Records the slot's confirmed position, so that once the slot is gone
/// the error can still say since when events are missing; with
/// `inserts`, the rows inserted into its tables by then (else the count
/// recorded before stays: older, so it counts more as missing, never
/// fewer).
pub async fn confirmed(
    client: &Client,
    schema: &str,
    slot: &str,
    lsn: &str,
    inserts: Option<i64>,
) -> Result<(), SqlError> {
    client
        .execute(
            &format!(
                "UPDATE {} SET confirmed_lsn = $2::text::pg_lsn, confirmed_at = now(),
                   inserts_at_confirm = coalesce($3, inserts_at_confirm)
                 WHERE slot_name = $1 AND confirmed_lsn IS DISTINCT FROM $2::text::pg_lsn",
                table(schema)
            ),
            &[&slot, &lsn, &inserts],
        )
        .await?;
    Ok(())
}

/// The rows inserted into the slot's tables so far by PostgreSQL's
/// statistics, and the WAL position then (every insert counted is at or
/// before it: the statistics only lag).
async fn inserts_sample(
    client: &Client,
    schema: &str,
    slot: &str,
) -> Result<Option<(i64, Lsn)>, SqlError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT (SELECT sum(n_tup_ins)::bigint FROM pg_stat_user_tables s
                         WHERE s.schemaname || '.' || s.relname = ANY(r.tables)),
                        pg_current_wal_lsn()::text
                 FROM {} r WHERE r.slot_name = $1",
                table(schema)
            ),
            &[&slot],
        )
        .await?;
    Ok(row.and_then(|row| {
        let inserts: Option<i64> = row.get(0);
        let at: String = row.get(1);
        Some((inserts?, at.parse().ok()?))
    }))
}

/// The last insert count read at or before `confirmed`: every insert it
/// counts is confirmed.
fn inserts_by(samples: &std::collections::VecDeque<(i64, Lsn)>, confirmed: Lsn) -> Option<i64> {
    samples
        .iter()
        .rev()
        .find(|(_, at)| *at <= confirmed)
        .map(|(inserts, _)| *inserts)
}

/// Insert counts kept to pick one from before a confirmed position: a
/// few minutes of the monitor's passes.
const SAMPLES_KEPT: usize = 300;

/// How often, at most, the slot's confirmed position is written to the
/// record.
const RECORD_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The slot monitor's writer of the confirmed position: when it moved, at
/// most every [`RECORD_EVERY`], on the primary while the server decoded
/// from is a standby. A failure is only logged (the record says since when
/// events are missing, it guards nothing).
pub struct Recorder {
    schema: String,
    slot: String,
    route: WriteRoute,
    recorded: Option<(String, tokio::time::Instant)>,
    /// Insert counts with the WAL position they were read at, oldest
    /// first. The count recorded beside a confirmed position is the last
    /// one read at or before it: one read at the time of recording would
    /// count inserts after the position (confirmed or not), and recover
    /// would then report fewer missing events than there are.
    samples: std::collections::VecDeque<(i64, Lsn)>,
    /// When the writer could last not be reached: tried again after
    /// [`RECORD_EVERY`].
    unreachable_at: Option<tokio::time::Instant>,
}

impl Recorder {
    pub fn new(schema: String, slot: String, primary: Option<ConnectionConfig>) -> Self {
        Recorder {
            schema,
            slot,
            route: WriteRoute::new(primary),
            recorded: None,
            samples: std::collections::VecDeque::new(),
            unreachable_at: None,
        }
    }

    /// Records `last` through `client` (the monitor's connection to the
    /// server decoded from), or the primary's connection.
    pub async fn note(&mut self, client: &Client, last: &LastConfirmed) {
        let Some(lsn) = &last.lsn else { return };
        if self
            .unreachable_at
            .is_some_and(|at| at.elapsed() < RECORD_EVERY)
        {
            return;
        }
        let (schema, slot) = (&self.schema, &self.slot);
        let writer = match self.route.client(client).await {
            Ok(writer) if std::ptr::eq(writer, client) => Ok(writer),
            // The primary's session gets the monitor's bounds: a lock on
            // the record must not hold the monitor.
            Ok(writer) => writer
                .batch_execute("SET statement_timeout = '10s'; SET lock_timeout = '2s'")
                .await
                .map(|()| writer),
            Err(e) => Err(e),
        };
        let writer = match writer {
            Ok(writer) => writer,
            Err(e) => {
                tracing::debug!(error = %e, "cannot record the slot's confirmed position");
                self.unreachable_at = Some(tokio::time::Instant::now());
                return;
            }
        };
        self.unreachable_at = None;
        // Read where the inserts happen (the primary's statistics).
        match inserts_sample(writer, schema, slot).await {
            Ok(Some(sample)) => {
                if self.samples.len() == SAMPLES_KEPT {
                    self.samples.pop_front();
                }
                self.samples.push_back(sample);
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "cannot read the outbox's insert count"),
        }
        if let Some((was, at)) = &self.recorded {
            if was == lsn || at.elapsed() < RECORD_EVERY {
                return;
            }
        }
        let inserts = lsn
            .parse()
            .ok()
            .and_then(|confirmed| inserts_by(&self.samples, confirmed));
        let written = confirmed(writer, schema, slot, lsn, inserts).await;
        let now = tokio::time::Instant::now();
        self.recorded = match written {
            Ok(()) => Some((lsn.clone(), now)),
            Err(e) => {
                tracing::debug!(error = %e, "cannot record the slot's confirmed position");
                Some((String::new(), now))
            }
        };
    }
}

/// Rows inserted into the slot's outbox tables since its last recorded
/// confirmation, by PostgreSQL's statistics (which count the inserts of
/// rolled-back transactions too, and may lag a second): with when that
/// confirmation was recorded. `None` without a record or statistics.
pub async fn inserts_since_confirm(
    client: &Client,
    schema: &str,
    slot: &str,
) -> Result<Option<(i64, String)>, SqlError> {
    if !table_exists(client, schema).await? {
        return Ok(None);
    }
    let row = client
        .query_opt(
            &format!(
                "SELECT (SELECT sum(n_tup_ins)::bigint FROM pg_stat_user_tables s
                         WHERE s.schemaname || '.' || s.relname = ANY(r.tables)) - r.inserts_at_confirm,
                        to_char(r.confirmed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
                 FROM {} r WHERE r.slot_name = $1 AND r.inserts_at_confirm IS NOT NULL",
                table(schema)
            ),
            &[&slot],
        )
        .await?;
    Ok(row.and_then(|r| {
        let inserted: Option<i64> = r.get(0);
        let at: Option<String> = r.get(1);
        inserted.zip(at)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_insert_count_recorded_is_the_last_read_at_or_before_the_confirmed_position() {
        let samples = std::collections::VecDeque::from([
            (1000, Lsn(0x100)),
            (1000, Lsn(0x180)),
            (1100, Lsn(0x200)),
        ]);
        assert_eq!(inserts_by(&samples, Lsn(0x1FF)), Some(1000));
        assert_eq!(inserts_by(&samples, Lsn(0x200)), Some(1100));
        assert_eq!(
            inserts_by(&samples, Lsn(0xFF)),
            None,
            "none read early enough: the count recorded before stays"
        );
    }
}
