//! Claiming rows and settling them: the polling source's SQL.
//!
//! A claim runs in the transaction that later deletes (or marks) the rows,
//! so a relay that dies mid-batch rolls back and leaves its rows for the
//! next claim. In that transaction:
//!
//! 1. [`oldest_aggregates`]: the aggregates of the oldest rows due for
//!    publishing (`$1` rows deep).
//! 2. [`claim`]: every unpublished row of those aggregates in `seq` order,
//!    each `FOR UPDATE SKIP LOCKED`, beside what a plain read sees. Per
//!    aggregate, the batch stops at the first row it could not lock
//!    (another relay holds it until that relay's commit) or that is not
//!    due (waiting for its next attempt): nothing after such a row is
//!    published before it. Rows another relay holds are still unpublished
//!    to a plain read, so they always stop their aggregate here.
//! 3. [`settle`]: delete or mark what the broker acknowledged; count an
//!    attempt on what failed and hold its aggregate until the next try.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use tokio_postgres::Transaction;

use super::schema::{ATTEMPTS, LAST_ERROR, NEXT_ATTEMPT_AT, PUBLISHED_AT, SEQ};
use crate::catalog::{self, qualified, quote_ident};
use crate::live::Backlog;
use crate::pgoutput::{Column, ColumnValue, PgTimestamp, Relation, ReplicaIdentity, TupleData};
use crate::relation_cache::RelationInfo;
use crate::router::OutboxColumns;
use crate::sql::{SqlClient, SqlError};

/// What to do with a published row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnPublished {
    /// Delete it (the table holds only what is still to publish).
    Delete,
    /// Set `published_at` and keep it (prune it yourself).
    Mark,
}

/// An outbox table as the polling source reads it.
#[derive(Clone, Debug)]
pub struct OutboxTable {
    pub schema: String,
    pub table: String,
    /// Its columns, as the router reads a row.
    pub relation: RelationInfo,
    columns: OutboxColumns,
    has_created_at: bool,
}

/// One claimed row.
#[derive(Clone, Debug)]
pub struct ClaimedRow {
    pub seq: i64,
    pub attempts: i32,
    /// The aggregate, as the lock key sees it.
    pub aggregate: (Option<String>, Option<String>),
    /// Every column, in text format, as pgoutput would send it.
    pub tuple: TupleData,
    /// `created_at`, or the claim's time when the table has none.
    pub created: PgTimestamp,
}

/// A claimed row that could not be published, and when to try again.
#[derive(Clone, Debug)]
pub struct FailedRow {
    pub seq: i64,
    pub aggregate: (Option<String>, Option<String>),
    pub error: String,
    pub retry_in: Duration,
}

impl OutboxTable {
    /// Reads the table's shape from the catalog.
    pub async fn load(
        client: &SqlClient,
        schema: &str,
        table: &str,
        columns: &OutboxColumns,
    ) -> Result<Self, SqlError> {
        let shape = catalog::table_column_oids(client, schema, table).await?;
        let relation = RelationInfo::from_message(&Relation {
            xid: None,
            id: 0,
            namespace: schema.to_owned(),
            name: table.to_owned(),
            replica_identity: ReplicaIdentity::Default,
            columns: shape
                .iter()
                .map(|(name, oid)| Column {
                    is_key: *name == columns.id,
                    name: name.clone(),
                    type_oid: *oid,
                    type_modifier: -1,
                })
                .collect(),
        });
        Ok(OutboxTable {
            schema: schema.to_owned(),
            table: table.to_owned(),
            has_created_at: relation.column_index(&columns.created_at).is_some(),
            relation,
            columns: columns.clone(),
        })
    }

    fn target(&self) -> String {
        qualified(&self.schema, &self.table)
    }

    pub fn name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// Rows still to publish (and not waiting for their next attempt).
    fn pending(&self, alias: &str) -> String {
        format!(
            "{alias}.{} IS NULL AND ({alias}.{next} IS NULL OR {alias}.{next} <= now())",
            quote_ident(PUBLISHED_AT),
            next = quote_ident(NEXT_ATTEMPT_AT)
        )
    }

    /// The aggregate's type and id as text, named `t` and `i`.
    fn aggregate_columns(&self, alias: &str) -> String {
        format!(
            "{alias}.{}::text AS t, {alias}.{}::text AS i",
            quote_ident(&self.columns.aggregate_type),
            quote_ident(&self.columns.aggregate_id)
        )
    }

    /// The statement of step 1: `$1` rows deep.
    fn oldest_aggregates_sql(&self) -> String {
        format!(
            "SELECT DISTINCT t, i FROM (
               SELECT {columns} FROM {target} o WHERE {pending} ORDER BY o.{seq} LIMIT $1
             ) oldest",
            columns = self.aggregate_columns("o"),
            target = self.target(),
            pending = self.pending("o"),
            seq = quote_ident(SEQ),
        )
    }

    /// The statement of step 2: rows of those aggregates (`$1`
    /// types, `$2` ids), `$3` at most; each with whether it was claimed.
    fn claim_sql(&self) -> String {
        let values: Vec<String> = self
            .relation
            .columns
            .iter()
            .map(|c| format!("c.{}::text", quote_ident(&c.name)))
            .collect();
        let created = if self.has_created_at {
            format!(
                "(extract(epoch FROM c.{}) * 1000000)::int8",
                quote_ident(&self.columns.created_at)
            )
        } else {
            "(extract(epoch FROM now()) * 1000000)::int8".to_owned()
        };
        format!(
            "WITH wanted AS (SELECT * FROM unnest($1::text[], $2::text[]) AS k(t, i)),
             candidates AS MATERIALIZED (
               SELECT o.{seq}, {aggregate} FROM {target} o
               WHERE o.{published} IS NULL
                 AND EXISTS (SELECT 1 FROM wanted k
                             WHERE k.t IS NOT DISTINCT FROM o.{agg_type}::text
                               AND k.i IS NOT DISTINCT FROM o.{agg_id}::text)
               ORDER BY o.{seq} LIMIT $3),
             claimed AS MATERIALIZED (
               SELECT c.* FROM {target} c WHERE c.{seq} IN (SELECT {seq} FROM candidates)
               FOR UPDATE SKIP LOCKED)
             SELECT k.{seq}, c.{seq} IS NOT NULL,
                    coalesce(c.{next} IS NULL OR c.{next} <= now(), false),
                    coalesce(c.{attempts}, 0), k.t, k.i, {created}, {values}
             FROM candidates k LEFT JOIN claimed c ON c.{seq} = k.{seq}
             ORDER BY k.{seq}",
            seq = quote_ident(SEQ),
            target = self.target(),
            published = quote_ident(PUBLISHED_AT),
            agg_type = quote_ident(&self.columns.aggregate_type),
            agg_id = quote_ident(&self.columns.aggregate_id),
            next = quote_ident(NEXT_ATTEMPT_AT),
            attempts = quote_ident(ATTEMPTS),
            aggregate = self.aggregate_columns("o"),
            values = values.join(", "),
        )
    }
}

/// Step 1: the aggregates of the oldest `depth` rows due, as (type, id).
pub async fn oldest_aggregates(
    tx: &Transaction<'_>,
    table: &OutboxTable,
    depth: i64,
) -> Result<Vec<(Option<String>, Option<String>)>, tokio_postgres::Error> {
    let rows = tx.query(&table.oldest_aggregates_sql(), &[&depth]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Step 2: the rows to publish, in `seq` order. Per aggregate, rows stop
/// at the first one not claimed (someone holds it) or not due (waiting for
/// its next attempt), so nothing overtakes it.
pub async fn claim(
    tx: &Transaction<'_>,
    table: &OutboxTable,
    aggregates: &[(Option<String>, Option<String>)],
    limit: i64,
) -> Result<Vec<ClaimedRow>, tokio_postgres::Error> {
    let types: Vec<Option<&str>> = aggregates.iter().map(|(t, _)| t.as_deref()).collect();
    let ids: Vec<Option<&str>> = aggregates.iter().map(|(_, i)| i.as_deref()).collect();
    let rows = tx
        .query(&table.claim_sql(), &[&types, &ids, &limit])
        .await?;
    let mut stopped: HashSet<(Option<String>, Option<String>)> = HashSet::new();
    let mut claimed = Vec::new();
    for row in rows {
        let seq: i64 = row.get(0);
        let is_claimed: bool = row.get(1);
        let due: bool = row.get(2);
        let aggregate = (
            row.get::<_, Option<String>>(4),
            row.get::<_, Option<String>>(5),
        );
        if stopped.contains(&aggregate) {
            continue;
        }
        if !is_claimed || !due {
            // Held by another transaction (SKIP LOCKED passed it over), or
            // waiting for its next attempt: its aggregate's later rows
            // wait for it.
            tracing::debug!(
                seq,
                held = !is_claimed,
                "an aggregate's share of the batch ends here"
            );
            stopped.insert(aggregate);
            continue;
        }
        let created = PgTimestamp::from_unix_micros(row.get(6));
        let columns = (0..table.relation.columns.len())
            .map(|i| match row.get::<_, Option<&str>>(7 + i) {
                Some(text) => ColumnValue::Text(Bytes::copy_from_slice(text.as_bytes())),
                None => ColumnValue::Null,
            })
            .collect();
        claimed.push(ClaimedRow {
            seq,
            attempts: row.get(3),
            aggregate,
            tuple: TupleData { columns },
            created,
        });
    }
    Ok(claimed)
}

/// Step 3: published rows go (or are marked, with the dead letter's
/// reason if they went there); failed rows count an attempt, and their
/// aggregate's later rows wait with them.
pub async fn settle(
    tx: &Transaction<'_>,
    table: &OutboxTable,
    on_published: OnPublished,
    published: &[(i64, Option<String>)],
    failed: &[FailedRow],
) -> Result<(), tokio_postgres::Error> {
    let target = table.target();
    let seq = quote_ident(SEQ);
    if !published.is_empty() {
        let seqs: Vec<i64> = published.iter().map(|(s, _)| *s).collect();
        match on_published {
            OnPublished::Delete => {
                tx.execute(
                    &format!("DELETE FROM {target} WHERE {seq} = ANY($1)"),
                    &[&seqs],
                )
                .await?;
            }
            OnPublished::Mark => {
                let notes: Vec<Option<&str>> =
                    published.iter().map(|(_, note)| note.as_deref()).collect();
                tx.execute(
                    &format!(
                        "UPDATE {target} t SET {published} = now(), {attempts} = t.{attempts} + 1,
                                {last_error} = p.note, {next} = NULL
                         FROM unnest($1::int8[], $2::text[]) AS p(seq, note) WHERE t.{seq} = p.seq",
                        published = quote_ident(PUBLISHED_AT),
                        attempts = quote_ident(ATTEMPTS),
                        last_error = quote_ident(LAST_ERROR),
                        next = quote_ident(NEXT_ATTEMPT_AT),
                    ),
                    &[&seqs, &notes],
                )
                .await?;
            }
        }
    }
    for row in failed {
        let retry_ms = row.retry_in.as_secs_f64() * 1000.0;
        tx.execute(
            &format!(
                "UPDATE {target} SET {attempts} = {attempts} + 1, {last_error} = $2,
                        {next} = now() + $3::float8 * interval '1 millisecond'
                 WHERE {seq} = $1",
                attempts = quote_ident(ATTEMPTS),
                last_error = quote_ident(LAST_ERROR),
                next = quote_ident(NEXT_ATTEMPT_AT),
            ),
            &[&row.seq, &row.error, &retry_ms],
        )
        .await?;
        // The aggregate's later rows wait as long, so they neither overtake
        // it nor crowd the oldest rows the next claim looks at.
        tx.execute(
            &format!(
                "UPDATE {target} SET {next} = now() + $4::float8 * interval '1 millisecond'
                 WHERE {seq} > $1 AND {published} IS NULL
                   AND {agg_type}::text IS NOT DISTINCT FROM $2 AND {agg_id}::text IS NOT DISTINCT FROM $3
                   AND ({next} IS NULL OR {next} < now() + $4::float8 * interval '1 millisecond')",
                next = quote_ident(NEXT_ATTEMPT_AT),
                published = quote_ident(PUBLISHED_AT),
                agg_type = quote_ident(&table.columns.aggregate_type),
                agg_id = quote_ident(&table.columns.aggregate_id),
            ),
            &[&row.seq, &row.aggregate.0, &row.aggregate.1, &retry_ms],
        )
        .await?;
    }
    Ok(())
}

/// Rows not yet published, failing rows, and the age of the oldest
/// unpublished row, for the metrics and the dashboard.
pub async fn backlog(client: &SqlClient, table: &OutboxTable) -> Result<Backlog, SqlError> {
    let created = if table.has_created_at {
        format!(
            "extract(epoch FROM now() - min({}))::float8",
            quote_ident(&table.columns.created_at)
        )
    } else {
        "NULL::float8".to_owned()
    };
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), count(*) FILTER (WHERE {attempts} > 0), {created}
                 FROM {target} WHERE {published} IS NULL",
                attempts = quote_ident(ATTEMPTS),
                target = table.target(),
                published = quote_ident(PUBLISHED_AT),
            ),
            &[],
        )
        .await?;
    Ok(Backlog {
        pending_rows: row.get(0),
        failing_rows: row.get(1),
        oldest_pending_seconds: row.get(2),
    })
}
