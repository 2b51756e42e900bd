//! Claiming rows and settling them: the polling source's SQL.
//!
//! A claim runs in the transaction ([`BEGIN_CLAIM`] on the relay's connection)
//! that later deletes (or marks) the rows,
//! so a relay that dies mid-batch rolls back and leaves its rows for the
//! next claim. In that transaction:
//!
//! 1. [`claim`]: the oldest rows due for publishing, `FOR UPDATE SKIP
//!    LOCKED` (rows another relay holds are passed over, so relays work
//!    side by side), each with whether an older unpublished row of its
//!    aggregate is outside the claim: held by another relay until its
//!    commit, or waiting for its next attempt. Per aggregate, the batch
//!    stops at the first such row: nothing is published before an older
//!    row of its aggregate.
//! 2. settling (`settle.rs`): delete or mark what the broker acknowledged;
//!    count an attempt on what failed and hold its aggregate until the
//!    next try.

use std::collections::HashSet;

use bytes::Bytes;

use super::schema::{ATTEMPTS, NEXT_ATTEMPT_AT, PUBLISHED_AT, SEQ};
use crate::catalog::{self, qualified, quote_ident};
use crate::live::Backlog;
use crate::router::OutboxColumns;
use crate::sql::{SqlClient, SqlError};
use crate::table::{ColumnValue, RelationInfo};
use crate::timestamp::PgTimestamp;

/// An outbox table as the polling source reads it.
#[derive(Clone, Debug)]
pub struct OutboxTable {
    pub schema: String,
    pub table: String,
    /// Its columns, as the router reads a row.
    pub relation: RelationInfo,
    pub(super) columns: OutboxColumns,
    has_created_at: bool,
    /// The id setup gave its rows (see `schema::source_id`): the system
    /// id of their records' origin.
    pub source_id: String,
}

/// One claimed row.
#[derive(Clone, Debug)]
pub struct ClaimedRow {
    pub seq: i64,
    /// Where the row is (its `ctid`, as text): the claim holds its lock, so
    /// it stays there until the settle, which finds it by this without an
    /// index (and so without the planner's estimates of the table).
    pub row_id: String,
    pub attempts: i32,
    /// The aggregate, as the lock key sees it.
    pub aggregate: (Option<String>, Option<String>),
    /// Every column, in text format, in the table's column order.
    pub values: Vec<ColumnValue>,
    /// `created_at`, or the claim's time when the table has none.
    pub created: PgTimestamp,
    /// A relay claimed it before and may have sent its record (it is in
    /// the in-flight table): exactly once, its partition's tail is read
    /// before it is sent again.
    pub in_doubt: bool,
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
        let source_id = super::schema::source_id(client, schema, table)
            .await?
            .unwrap_or_default();
        let shape: Vec<(&str, u32)> = shape.iter().map(|(n, o)| (n.as_str(), *o)).collect();
        Ok(OutboxTable::of_shape(
            schema, table, &shape, columns, source_id,
        ))
    }

    /// A table of these columns (`(name, type oid)`), as the in-memory
    /// outbox of the tests has it.
    #[cfg(test)]
    pub fn for_test(schema: &str, table: &str, shape: &[(&str, u32)]) -> Self {
        let source_id = "5f0c6a52-0000-4000-8000-000000000001".into();
        OutboxTable::of_shape(schema, table, shape, &OutboxColumns::default(), source_id)
    }

    fn of_shape(
        schema: &str,
        table: &str,
        shape: &[(&str, u32)],
        columns: &OutboxColumns,
        source_id: String,
    ) -> Self {
        let relation =
            RelationInfo::from_catalog(schema, table, shape.iter().copied(), &columns.id);
        OutboxTable {
            schema: schema.to_owned(),
            table: table.to_owned(),
            has_created_at: relation.column_index(&columns.created_at).is_some(),
            relation,
            columns: columns.clone(),
            source_id,
        }
    }

    pub(super) fn target(&self) -> String {
        qualified(&self.schema, &self.table)
    }

    pub(super) fn in_flight(&self) -> String {
        qualified(
            &self.schema,
            &super::schema::PollObjects::of(&self.table).in_flight,
        )
    }

    pub fn name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// Rows still to publish (and not waiting for their next attempt).
    fn pending(&self, alias: &str) -> String {
        format!(
            "{alias}.{} IS NULL AND {alias}.{} IS NOT NULL AND ({alias}.{next} IS NULL OR {alias}.{next} <= now())",
            quote_ident(PUBLISHED_AT),
            quote_ident(SEQ),
            next = quote_ident(NEXT_ATTEMPT_AT)
        )
    }

    /// The claim: the oldest `$1` rows due that no one else holds, in
    /// `seq` order, each with whether an older unpublished row of its
    /// aggregate is outside the claim (`blocked`).
    ///
    /// The lane's share is stated as "not another lane's" (`$3`, the other
    /// lanes): the planner guesses that an expression equals a value for
    /// 0.5% of rows, so with `= lane` it expected fewer matching rows than
    /// the batch below about 100,000 rows pending, and scanned and sorted
    /// the whole table on every claim instead of walking the seq index
    /// (measured: 67-110 ms a claim against 22 ms). "Not equal" it
    /// guesses true for most rows, which is about right.
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
        let agg_type = quote_ident(&self.columns.aggregate_type);
        let agg_id = quote_ident(&self.columns.aggregate_id);
        // An older unpublished row of the same aggregate that this claim
        // does not hold (NOT IN: one hash of the claim, not a scan of it per
        // row). `=` lets the aggregate index answer; aggregates
        // with a NULL part (rare, and unordered in Kafka anyway) take the
        // slower IS NOT DISTINCT FROM.
        let older_outside = |same: &str| {
            format!(
                "EXISTS (SELECT 1 FROM {target} o
                         WHERE o.{published} IS NULL AND o.{seq} < c.{seq} AND {same}
                           AND o.{seq} NOT IN (SELECT x.{seq} FROM claimed x WHERE x.{seq} IS NOT NULL))",
                target = self.target(),
                published = quote_ident(PUBLISHED_AT),
                seq = quote_ident(SEQ),
            )
        };
        let by_value = older_outside(&format!(
            "o.{agg_type} = c.{agg_type} AND o.{agg_id} = c.{agg_id}"
        ));
        let by_null = older_outside(&format!(
            "o.{agg_type} IS NOT DISTINCT FROM c.{agg_type} AND o.{agg_id} IS NOT DISTINCT FROM c.{agg_id}"
        ));
        format!(
            "WITH claimed AS MATERIALIZED (
               SELECT c.*, c.ctid AS \"walrelay ctid\" FROM {target} c WHERE {pending}
                 AND ({lane_key} & 2147483647) % $2 <> ALL($3::int4[])
               ORDER BY c.{seq} LIMIT $1 FOR UPDATE SKIP LOCKED)
             SELECT c.{seq},
                    {by_value} OR ((c.{agg_type} IS NULL OR c.{agg_id} IS NULL) AND {by_null}),
                    c.{attempts}, c.{agg_type}::text, c.{agg_id}::text, {created},
                    EXISTS (SELECT 1 FROM {in_flight} f WHERE f.seq = c.{seq}),
                    c.\"walrelay ctid\"::text,
                    {values}
             FROM claimed c
             ORDER BY c.{seq}",
            target = self.target(),
            in_flight = self.in_flight(),
            pending = self.pending("c"),
            lane_key = super::schema::aggregate_key_sql("c", &self.columns),
            seq = quote_ident(SEQ),
            attempts = quote_ident(ATTEMPTS),
            values = values.join(", "),
        )
    }
}

/// How a claim's transaction begins: its plans walk indexes, and nothing
/// is JIT-compiled. The claim must walk the `seq` index in order and stop
/// at the batch's size, but where the table's statistics are missing or
/// stale (a backlog written since autovacuum last analyzed it) PostgreSQL
/// estimated a few hundred pending rows, read every pending row with a
/// bitmap scan and sorted them on disk: 150 ms a claim over 200,000 rows,
/// against 8 ms walking the index (measured). The claim's subqueries and
/// the settle of published rows have an index or a `ctid` to go by; the
/// settle of failed rows plans freely again (`settle.rs`). The claim's
/// cost estimate is high (a subquery per row), which made PostgreSQL
/// JIT-compile it on every batch: about half of each claim's time,
/// measured. `SET LOCAL` ends with the transaction, also behind a pooler.
pub(super) const BEGIN_CLAIM: &str = "BEGIN; SET LOCAL jit = off; \
     SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off";

/// Claims up to `limit` rows of lane `share`'s aggregates to publish, in
/// `seq` order. Per aggregate,
/// rows stop at the first one with an older row outside the claim (another
/// relay holds it, or it waits for its next attempt), so nothing overtakes
/// that row. Rows past the stop stay locked until the transaction ends and
/// go to the next claim.
/// What a claim took.
pub struct Claim {
    pub rows: Vec<ClaimedRow>,
    /// Rows it locked but left, behind an older row outside the claim:
    /// more is waiting, for when that row is settled.
    pub stopped: usize,
}

/// The lanes of a relay share the aggregates: lane `index` of `count`
/// claims only the aggregates that hash to it, so lanes never hold each
/// other up.
#[derive(Clone, Copy, Debug)]
pub struct LaneShare {
    pub index: i32,
    pub count: i32,
}

pub async fn claim(
    tx: &SqlClient,
    table: &OutboxTable,
    limit: i64,
    share: LaneShare,
) -> Result<Claim, SqlError> {
    let other_lanes: Vec<i32> = (0..share.count).filter(|&i| i != share.index).collect();
    let rows = tx
        .query(&table.claim_sql(), &[&limit, &share.count, &other_lanes])
        .await?;
    let mut stopped: HashSet<(Option<String>, Option<String>)> = HashSet::new();
    let mut left = 0;
    let mut claimed = Vec::new();
    for row in rows {
        let seq: i64 = row.get(0);
        let blocked: bool = row.get(1);
        let aggregate = (
            row.get::<_, Option<String>>(3),
            row.get::<_, Option<String>>(4),
        );
        if stopped.contains(&aggregate) {
            left += 1;
            continue;
        }
        if blocked {
            tracing::debug!(seq, "an aggregate's share of the batch ends here");
            stopped.insert(aggregate);
            left += 1;
            continue;
        }
        let created = PgTimestamp::from_unix_micros(row.get(5));
        let values = (0..table.relation.columns.len())
            .map(|i| match row.get::<_, Option<&str>>(8 + i) {
                Some(text) => ColumnValue::Text(Bytes::copy_from_slice(text.as_bytes())),
                None => ColumnValue::Null,
            })
            .collect();
        claimed.push(ClaimedRow {
            seq,
            row_id: row.get(7),
            attempts: row.get(2),
            aggregate,
            values,
            created,
            in_doubt: row.get(6),
        });
    }
    Ok(Claim {
        rows: claimed,
        stopped: left,
    })
}

/// Exactly once: notes that the batch's rows may be sent from now on, in a
/// transaction of its own (on a connection other than the claim's), before
/// they are: a relay that dies before its batch settles leaves them in
/// doubt for the next claim.
pub async fn mark_in_flight(
    client: &SqlClient,
    table: &OutboxTable,
    seqs: &[i64],
) -> Result<(), SqlError> {
    client
        .execute(
            &format!(
                "INSERT INTO {} (seq) SELECT unnest($1::int8[]) ON CONFLICT (seq) DO NOTHING",
                table.in_flight()
            ),
            &[&seqs],
        )
        .await?;
    Ok(())
}

/// Numbers rows that came in without a `seq` (the insert trigger bypassed,
/// by `session_replication_role = replica` or a disabled trigger), as the
/// trigger would have: each aggregate's writer lock first, so no writer of
/// it is mid-transaction, then the next number. Until numbered, a claim
/// passes them over (they hold nothing up). Returns how many it numbered.
pub async fn number_unsequenced(client: &SqlClient, table: &OutboxTable) -> Result<u64, SqlError> {
    let target = table.target();
    let seq = quote_ident(SEQ);
    let order = if table.has_created_at {
        format!("{}, ctid", quote_ident(&table.columns.created_at))
    } else {
        "ctid".to_owned()
    };
    let sequence = crate::catalog::quote_literal(&qualified(
        &table.schema,
        &super::schema::PollObjects::of(&table.table).sequence,
    ));
    client
        .execute(
            &format!(
                "WITH locked AS MATERIALIZED (
                   SELECT ctid AS row_id, pg_advisory_xact_lock({class}, {key})
                   FROM {target} t WHERE t.{seq} IS NULL AND t.{published} IS NULL ORDER BY {order})
                 UPDATE {target} t SET {seq} = nextval({sequence})
                 FROM locked WHERE t.ctid = locked.row_id AND t.{seq} IS NULL",
                class = super::schema::WRITER_LOCK_CLASS,
                key = super::schema::aggregate_key_sql("t", &table.columns),
                published = quote_ident(PUBLISHED_AT),
            ),
            &[],
        )
        .await
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
