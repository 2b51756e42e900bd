//! Settling a claimed batch, the second step of the claim's transaction
//! (`claim.rs` has the first): what the broker has is deleted or marked,
//! what failed counts an attempt and holds its aggregate's later rows
//! until its next try. Then the lane commits.

use std::time::Duration;

use super::claim::OutboxTable;
use super::schema::{ATTEMPTS, LAST_ERROR, NEXT_ATTEMPT_AT, PUBLISHED_AT, SEQ};
use crate::catalog::quote_ident;
use crate::sql::{SqlClient, SqlError};

/// What to do with a published row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnPublished {
    /// Delete it (the table holds only what is still to publish).
    Delete,
    /// Set `published_at` and keep it (prune it yourself).
    Mark,
}

/// A claimed row in Kafka (as itself or as its dead letter), to delete or
/// mark.
#[derive(Clone, Debug)]
pub struct PublishedRow {
    pub seq: i64,
    /// `ClaimedRow::row_id`.
    pub row_id: String,
    /// Why it went to the dead-letter topic, if it did (`--on-published
    /// mark` keeps it in `last_error`).
    pub dead_letter: Option<String>,
}

/// A claimed row that could not be published, and when to try again.
#[derive(Clone, Debug)]
pub struct FailedRow {
    pub seq: i64,
    pub aggregate: (Option<String>, Option<String>),
    pub error: String,
    pub retry_in: Duration,
}

/// Step 2: published rows go (or are marked, with the dead letter's
/// reason if they went there); failed rows count an attempt, and their
/// aggregate's later rows wait with them.
pub async fn settle(
    tx: &SqlClient,
    table: &OutboxTable,
    on_published: OnPublished,
    published: &[PublishedRow],
    failed: &[FailedRow],
    exactly_once: bool,
) -> Result<(), SqlError> {
    let target = table.target();
    let seq = quote_ident(SEQ);
    if exactly_once {
        // Settled: no longer in doubt.
        let settled: Vec<i64> = published
            .iter()
            .map(|row| row.seq)
            .chain(failed.iter().map(|f| f.seq))
            .collect();
        tx.execute(
            &format!("DELETE FROM {} WHERE seq = ANY($1)", table.in_flight()),
            &[&settled],
        )
        .await?;
    }
    if !published.is_empty() {
        let changed = write_published(tx, table, on_published, published, false).await?;
        if changed < published.len() as u64 {
            // Something rewrites the statement (an ON DELETE DO INSTEAD
            // rule, say, which reports no rows): the rows are looked for by
            // seq as well, as they were before ctids; nothing already
            // settled is found twice.
            tracing::debug!(changed, rows = published.len(), "settling by seq as well");
            write_published(tx, table, on_published, published, true).await?;
        }
    }
    if !failed.is_empty() {
        // Holding an aggregate's later rows compares the aggregate as text
        // (whatever the columns' types), which no index answers: a pass
        // over the pending rows, in the order the planner finds cheapest,
        // not the index walks the claim began the transaction with.
        tx.batch_execute("SET LOCAL enable_seqscan = on; SET LOCAL enable_bitmapscan = on")
            .await?;
    }
    for row in failed {
        let retry_ms = row.retry_in.as_secs_f64() * 1000.0;
        tx.execute(
            &format!(
                "UPDATE {target} SET {attempts} = {attempts} + 1, {last_error} = $2,
                        {next} = now() + $3::float8 * interval '1 millisecond'
                 WHERE {seq} = $1 AND {published} IS NULL",
                published = quote_ident(PUBLISHED_AT),
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

/// Deletes or marks the published rows, found by where the claim found
/// them (a TID scan; the claim's row locks kept them there), checked by
/// `seq` (which also tells apart the partitions of a partitioned table,
/// whose ctids repeat); or, `by_seq`, by `seq` alone through the partial
/// index. Returns how many rows it changed.
async fn write_published(
    tx: &SqlClient,
    table: &OutboxTable,
    on_published: OnPublished,
    published: &[PublishedRow],
    by_seq: bool,
) -> Result<u64, SqlError> {
    let (target, seq) = (table.target(), quote_ident(SEQ));
    let published_at = quote_ident(PUBLISHED_AT);
    let find = if by_seq {
        format!("t.{seq} = p.seq AND t.{published_at} IS NULL")
    } else {
        format!("t.ctid = p.row_id AND t.{seq} = p.seq")
    };
    let row_ids: Vec<&str> = published.iter().map(|row| row.row_id.as_str()).collect();
    let seqs: Vec<i64> = published.iter().map(|row| row.seq).collect();
    match on_published {
        OnPublished::Delete => {
            tx.execute(
                &format!(
                    "DELETE FROM {target} t USING unnest($1::text[]::tid[], $2::int8[]) AS p(row_id, seq)
                     WHERE {find}"
                ),
                &[&row_ids, &seqs],
            )
            .await
        }
        OnPublished::Mark => {
            let notes: Vec<Option<&str>> = published
                .iter()
                .map(|row| row.dead_letter.as_deref())
                .collect();
            tx.execute(
                &format!(
                    "UPDATE {target} t SET {published_at} = now(), {attempts} = t.{attempts} + 1,
                            {last_error} = p.note, {next} = NULL
                     FROM unnest($1::text[]::tid[], $2::int8[], $3::text[]) AS p(row_id, seq, note)
                     WHERE {find}",
                    attempts = quote_ident(ATTEMPTS),
                    last_error = quote_ident(LAST_ERROR),
                    next = quote_ident(NEXT_ATTEMPT_AT),
                ),
                &[&row_ids, &seqs, &notes],
            )
            .await
        }
    }
}
