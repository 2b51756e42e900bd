//! Where each backfill got to, in a small table of its own: written after
//! every row before that point is in Kafka, so a run that dies resends at
//! most the page it was on, and those records are found in Kafka and
//! skipped (`ids.rs`).

use crate::sql::{SqlClient, SqlError};

use super::rows::After;

/// The progress table (`public.walrelay_backfill`).
pub const BACKFILL_TABLE: &str = "walrelay_backfill";

/// One backfill's progress.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub after: After,
    pub sent: i64,
    pub skipped: i64,
    /// When the current page started going out (Unix ms, this machine's
    /// clock, which stamps the records): a resumed run reads Kafka back
    /// from here.
    pub page_started_ms: Option<i64>,
    pub done: bool,
    /// Which rows, and to which topics (see `backfill.rs`): a run of the
    /// same name that asks for others does not take this one's place.
    pub selection: String,
}

pub async fn ensure_table(client: &SqlClient) -> Result<(), SqlError> {
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS public.{BACKFILL_TABLE} (
               name text PRIMARY KEY,
               after_created_at text,
               after_id text,
               sent bigint NOT NULL DEFAULT 0,
               skipped bigint NOT NULL DEFAULT 0,
               page_started_ms bigint,
               done boolean NOT NULL DEFAULT false,
               updated_at timestamptz NOT NULL DEFAULT now());
             ALTER TABLE public.{BACKFILL_TABLE} ADD COLUMN IF NOT EXISTS selection text NOT NULL DEFAULT ''"
        ))
        .await
}

pub async fn load(client: &SqlClient, name: &str) -> Result<Option<Progress>, SqlError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT after_created_at, after_id, sent, skipped, page_started_ms, done, selection
                 FROM public.{BACKFILL_TABLE} WHERE name = $1"
            ),
            &[&name],
        )
        .await?;
    Ok(row.map(|r| Progress {
        after: After {
            created_at: r.get(0),
            id: r.get(1),
        },
        sent: r.get(2),
        skipped: r.get(3),
        page_started_ms: r.get(4),
        done: r.get(5),
        selection: r.get(6),
    }))
}

pub async fn save(client: &SqlClient, name: &str, progress: &Progress) -> Result<(), SqlError> {
    client
        .execute(
            &format!(
                "INSERT INTO public.{BACKFILL_TABLE}
                   (name, after_created_at, after_id, sent, skipped, page_started_ms, done, selection, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now())
                 ON CONFLICT (name) DO UPDATE SET
                   after_created_at = $2, after_id = $3, sent = $4, skipped = $5,
                   page_started_ms = $6, done = $7, selection = $8, updated_at = now()"
            ),
            &[
                &name,
                &progress.after.created_at,
                &progress.after.id,
                &progress.sent,
                &progress.skipped,
                &progress.page_started_ms,
                &progress.done,
                &progress.selection,
            ],
        )
        .await?;
    Ok(())
}

/// Recoveries under way (`public.walrelay_recover`): written before the
/// lost slot is dropped, cleared once every row is in Kafka, so a recovery
/// that dies is finished by the next run instead of being taken for a
/// healthy slot.
pub const RECOVER_TABLE: &str = "walrelay_recover";

pub async fn ensure_recover_table(client: &SqlClient) -> Result<(), SqlError> {
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS public.{RECOVER_TABLE} (
               slot text PRIMARY KEY,
               lost_confirmed_lsn text NOT NULL,
               failover boolean NOT NULL,
               underway boolean NOT NULL,
               started_at timestamptz NOT NULL DEFAULT now(),
               finished_at timestamptz)"
        ))
        .await
}

/// Whether a recovery of `slot` is under way (or died midway), for `run`,
/// which must not stream from the new slot before it is done: false when
/// no recovery was ever run here.
pub async fn recovery_pending(client: &SqlClient, slot: &str) -> Result<bool, SqlError> {
    let exists: bool = client
        .query_one(
            &format!("SELECT to_regclass('public.{RECOVER_TABLE}') IS NOT NULL"),
            &[],
        )
        .await?
        .get(0);
    Ok(exists && recovery_underway(client, slot).await?.is_some())
}

/// `Some(failover)` when a recovery of `slot` is under way.
pub async fn recovery_underway(client: &SqlClient, slot: &str) -> Result<Option<bool>, SqlError> {
    let row = client
        .query_opt(
            &format!("SELECT failover FROM public.{RECOVER_TABLE} WHERE slot = $1 AND underway"),
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

pub async fn begin_recovery(
    client: &SqlClient,
    slot: &str,
    lost_confirmed_lsn: &str,
    failover: bool,
) -> Result<(), SqlError> {
    client
        .execute(
            &format!(
                "INSERT INTO public.{RECOVER_TABLE} (slot, lost_confirmed_lsn, failover, underway)
                 VALUES ($1, $2, $3, true)
                 ON CONFLICT (slot) DO UPDATE SET lost_confirmed_lsn = $2, failover = $3,
                   underway = true, started_at = now(), finished_at = NULL"
            ),
            &[&slot, &lost_confirmed_lsn, &failover],
        )
        .await?;
    Ok(())
}

pub async fn end_recovery(client: &SqlClient, slot: &str) -> Result<(), SqlError> {
    client
        .execute(
            &format!(
                "UPDATE public.{RECOVER_TABLE} SET underway = false, finished_at = now() WHERE slot = $1"
            ),
            &[&slot],
        )
        .await?;
    Ok(())
}
