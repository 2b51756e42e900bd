//! `walrelay recover`: after a slot was lost (invalidated by
//! `max_slot_wal_keep_size`), a new slot, and every event the lost one had
//! not confirmed published from the outbox table, so that `run` streams
//! on from the new slot with no gap and no duplicate.
//!
//! # Which rows the lost slot had not confirmed
//!
//! A row does not carry the LSN of its commit, so "committed after the
//! lost slot's confirmed LSN" cannot be asked of the table. What can be
//! asked is the outcome that matters: is the row's event in Kafka? Every
//! event at or below the confirmed LSN is (nothing is confirmed before the
//! broker has it), and so are the lost slot's last unconfirmed sends. So
//! recover reads each topic back (`read_committed`, by the `id` header,
//! from the oldest candidate row's `created_at` less a margin: a record is
//! produced after its row was written) and publishes exactly the rows
//! whose ids it does not find, in `(created_at, id)` order.
//!
//! # The boundary with the new slot
//!
//! The new slot is made with `EXPORT_SNAPSHOT` and the rows are read in
//! that snapshot: a row is in it if and only if its transaction committed
//! before the slot's consistent point, and every later commit is decoded
//! from the new slot by `run`. Nothing falls between, nothing is on both
//! sides.
//!
//! # Rows that are gone
//!
//! If rows were deleted (deleted in the inserting transaction, or pruned)
//! the events between the lost slot's confirmed LSN and the new slot exist
//! nowhere. The table must reach back past the loss: at least one of its
//! rows must already be in Kafka (as delivered by the lost slot). If none
//! is, recover stops before touching any slot, names the LSNs and times of
//! the gap, and goes on only with `--accept-loss`.

use std::collections::HashSet;

use bytes::Bytes;

use super::ReplayError;
use super::backfill::{Bar, system_identifier};
use super::rows::{After, RoutedRow, Selection, TableReader, stamp};
use super::send::Sender;
use super::state;
use crate::catalog::quote_ident;
use crate::kafka::{KafkaSink, SinkSettings};
use crate::postgres::ConnectionConfig;
use crate::publish::Origin;
use crate::replication::ReplicationConnection;
use crate::router::{Router, RouterConfig};
use crate::sql::{self, SqlClient};

/// Read back this much before the oldest row: the clocks of the database
/// and of the relay that produced the records may differ.
const CLOCK_MARGIN_MS: i64 = 10 * 60_000;
const PAGE: i64 = 5_000;

pub struct RecoverOptions {
    pub pg: ConnectionConfig,
    pub router: RouterConfig,
    pub kafka: SinkSettings,
    pub exactly_once: bool,
    /// The lost slot, and the name of the new one.
    pub slot: String,
    /// Only rows created at or after this are candidates (bounds the
    /// reading back of old topics).
    pub since: Option<String>,
    pub accept_loss: bool,
    /// The publication `run` streams (for walrelay's record of its slots).
    pub publication: String,
    /// Where the stream keeps events Kafka refused for good: passed over,
    /// as they are kept whole there already.
    pub dead_letter_table: (String, String),
    /// There was no slot before (the outbox was published by a polling
    /// relay, now stopped): make the slot and publish every row of its
    /// snapshot not in Kafka.
    pub first_slot: bool,
    /// `--primary-url`: when `pg` is a standby, the new slot is made there
    /// and recover's progress and walrelay's record are kept here.
    pub primary: Option<ConnectionConfig>,
}

/// What a recovery did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub published: usize,
    /// In Kafka already, or kept in the dead-letter table (Kafka refused
    /// them for good when the stream sent them).
    pub already_in_kafka: usize,
}

/// The lost slot, as the server still lists it.
struct LostSlot {
    confirmed: String,
    wal_status: String,
    /// Invalidated (PostgreSQL 17+'s invalidation_reason, 16's
    /// conflicting), whatever its wal_status says.
    invalidated: bool,
    active: bool,
    /// Synchronized to standbys (PostgreSQL 17+): the new slot is too.
    failover: bool,
}

pub async fn run(options: RecoverOptions) -> Result<Summary, ReplayError> {
    let client = sql::connect(&options.pg).await?;
    let system_id = system_identifier(&client).await?;
    let router = Router::new(options.router.clone(), system_id.clone());
    let producer = options
        .kafka
        .producer
        .client_config()
        .map_err(ReplayError::Kafka)?;
    let selection = Selection {
        since: options.since.clone(),
        ..Selection::default()
    };
    // On a standby, the progress is written on the primary; the rows are
    // read, and the slot made, on the standby.
    let primary = crate::standby::primary_for(
        &client,
        options.primary.as_ref(),
        "recover keeps its progress on the primary",
    )
    .await
    .map_err(|e| ReplayError::Refused(e.to_string()))?;
    let writer = primary.as_ref().unwrap_or(&client);
    // Where the rows come from depends on the slot, and on whether an
    // earlier recovery of it died midway.
    state::ensure_recover_table(writer).await?;
    let underway = state::recovery_underway(writer, &options.slot).await?;
    let mut found = slot_state(&client, &options.slot).await?;
    // A slot walrelay streamed from that is gone (dropped, or a promotion
    // without it): recovered as a lost one, from its recorded position.
    let record_schema = crate::slot_record::record_schema(&options.router.tables);
    if found.is_none() && underway.is_none() && !options.first_slot {
        if let Ok(Some(record)) =
            crate::slot_record::find(writer, &record_schema, &options.slot).await
        {
            found = Some(LostSlot {
                confirmed: record.last.lsn.unwrap_or_else(|| "?".into()),
                wal_status: "dropped".into(),
                invalidated: true,
                active: false,
                failover: false,
            });
        }
    }
    let exists = |slot: &str| {
        ReplayError::Refused(format!(
            "slot {slot} exists: --first-slot makes a slot where there was none (moving off a polling relay); for a lost slot leave --first-slot out"
        ))
    };
    let rows = match (found, underway) {
        (Some(lost), _) if lost.active => {
            return Err(ReplayError::Refused(format!(
                "slot {} is in use by a walsender: stop the relay first",
                options.slot
            )));
        }
        (Some(_), _) if options.first_slot => return Err(exists(&options.slot)),
        (Some(lost), _) if lost.wal_status == "lost" || lost.invalidated => {
            if underway.is_none() {
                check_reaches_back(&client, &router, &options, &selection, &producer, &lost)
                    .await?;
            }
            state::begin_recovery(writer, &options.slot, &lost.confirmed, lost.failover).await?;
            if lost.wal_status != "dropped" {
                client
                    .execute("SELECT pg_drop_replication_slot($1)", &[&options.slot])
                    .await?;
            }
            snapshot_rows(&client, &router, &options, &selection, lost.failover).await?
        }
        (Some(_), Some(failover)) => {
            // A recovery died after it made the new slot, and its snapshot
            // is gone. No relay has streamed from that slot (`run` refuses
            // while a recovery is under way), so it is made again, with a
            // new snapshot: nothing falls between the two, nothing is on
            // both sides.
            tracing::info!(
                slot = %options.slot,
                "a recovery of this slot died after making the new slot: making it again for a new snapshot"
            );
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&options.slot])
                .await?;
            snapshot_rows(&client, &router, &options, &selection, failover).await?
        }
        (Some(healthy), None) => {
            return Err(ReplayError::Refused(format!(
                "slot {} is not lost (wal_status {}): `walrelay run` resumes it without loss",
                options.slot, healthy.wal_status
            )));
        }
        (None, Some(failover)) => {
            // Died between dropping the lost slot and making the new one.
            snapshot_rows(&client, &router, &options, &selection, failover).await?
        }
        (None, None) if options.first_slot => {
            state::begin_recovery(writer, &options.slot, "none", false).await?;
            snapshot_rows(&client, &router, &options, &selection, false).await?
        }
        (None, None) => {
            return Err(ReplayError::Refused(format!(
                "slot {0} does not exist and walrelay has no record of streaming from it: recover replaces a lost, invalidated or dropped slot walrelay used. If walrelay never streamed this outbox (moving off a polling relay), use `walrelay recover --first-slot`; to send events again use `walrelay backfill`",
                options.slot
            )));
        }
    };

    // What is not in Kafka goes out, in order.
    let in_kafka = ids_in_kafka(&producer, &rows).await?;
    let origin = Origin {
        system_id,
        slot: format!("recover:{}", options.slot),
        timeline: 0,
    };
    let origin_bytes = Bytes::from(origin.to_string());
    let sink = KafkaSink::new(&options.kafka).map_err(|e| ReplayError::Kafka(e.to_string()))?;
    let mut sender = Sender::new(
        sink,
        &options.router.dead_letter_topic,
        options.exactly_once,
        origin,
        options
            .exactly_once
            .then(|| format!("walrelay-recover-{}", options.slot)),
    );
    let mut summary = Summary::default();
    let dead_lettered = crate::dead_letters::ids(&client, &options.dead_letter_table).await?;
    let missing: Vec<RoutedRow> = rows
        .into_iter()
        .filter(|r| {
            let found = in_kafka.contains(&r.id) || dead_lettered.contains(&r.id);
            summary.already_in_kafka += usize::from(found);
            !found
        })
        .collect();
    let bar = Bar::new(&format!("recover {}", options.slot), missing.len() as i64);
    for chunk in missing.chunks(PAGE as usize) {
        let records = chunk
            .iter()
            .map(|row| {
                let mut record = row.record.clone();
                stamp(&mut record, &origin_bytes, row.created_micros as u64);
                (record, row.dead_letter)
            })
            .collect();
        sender.send_all(records).await?;
        summary.published += chunk.len();
        metrics::counter!(super::EVENTS_REPLAYED_TOTAL, "job" => "recover")
            .increment(chunk.len() as u64);
        bar.show(summary.published as i64);
    }
    bar.finish();
    state::end_recovery(writer, &options.slot).await?;
    // The new slot is the one walrelay streams from now.
    if let Err(e) = crate::slot_record::used(
        writer,
        &record_schema,
        &options.slot,
        &options.publication,
        &options.router.tables,
    )
    .await
    {
        tracing::warn!(error = %e, "cannot note the new slot in walrelay's record of its slots");
    }
    println!(
        "recovered slot {}: {} events published from the table, {} already in Kafka: `walrelay run` streams on from the new slot",
        options.slot, summary.published, summary.already_in_kafka
    );
    Ok(summary)
}

/// Makes the slot with an exported snapshot and reads the rows in it:
/// exactly those committed before the slot's consistent point.
async fn snapshot_rows(
    client: &SqlClient,
    router: &Router,
    options: &RecoverOptions,
    selection: &Selection,
    failover: bool,
) -> Result<Vec<RoutedRow>, ReplayError> {
    let mut replication = ReplicationConnection::connect(&options.pg)
        .await
        .map_err(|e| ReplayError::Refused(e.to_string()))?;
    let command = if failover {
        // PostgreSQL 17+ only: the option list syntax.
        format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export', FAILOVER true)",
            quote_ident(&options.slot)
        )
    } else {
        format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
            quote_ident(&options.slot)
        )
    };
    let create = replication.simple_query(&command);
    // On a standby the new slot waits for a running-transactions record.
    let created = match &options.primary {
        Some(primary) if crate::catalog::in_recovery(client).await? => {
            crate::standby::with_standby_snapshots(primary, create).await
        }
        _ => create.await,
    }
    .map_err(|e| ReplayError::Refused(e.to_string()))?;
    let row = created.first().cloned().unwrap_or_default();
    let consistent = row.get(1).cloned().flatten().unwrap_or_default();
    let snapshot = row.get(2).cloned().flatten().ok_or_else(|| {
        ReplayError::Refused("CREATE_REPLICATION_SLOT exported no snapshot".into())
    })?;
    tracing::info!(slot = %options.slot, consistent_point = %consistent, "new slot made");
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
            snapshot.replace('\'', "''")
        ))
        .await?;
    let rows = read_all(client, router, &options.router, selection).await?;
    client.batch_execute("COMMIT").await?;
    // The snapshot was needed only while the rows were read.
    let _ = replication.close().await;
    Ok(rows)
}

/// The slot as the server lists it, if it does.
async fn slot_state(client: &SqlClient, slot: &str) -> Result<Option<LostSlot>, ReplayError> {
    let row = client
        .query_opt(
            "SELECT coalesce(confirmed_flush_lsn::text, '?'), coalesce(wal_status, '?'), active,
                    coalesce((to_jsonb(s) ->> 'failover')::bool, false),
                    (to_jsonb(s) ->> 'invalidation_reason') IS NOT NULL
                      OR coalesce((to_jsonb(s) ->> 'conflicting')::bool, false)
             FROM pg_replication_slots s WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|row| LostSlot {
        confirmed: row.get(0),
        wal_status: row.get(1),
        active: row.get(2),
        failover: row.get(3),
        invalidated: row.get(4),
    }))
}

/// Every row of the selection, routed, in `(created_at, id)` order.
async fn read_all(
    client: &SqlClient,
    router: &Router,
    config: &RouterConfig,
    selection: &Selection,
) -> Result<Vec<RoutedRow>, ReplayError> {
    let mut all = Vec::new();
    for (schema, table) in &config.tables {
        let reader =
            TableReader::load(client, schema, table, &config.columns, selection.clone()).await?;
        let mut after = After::default();
        loop {
            let page = reader.page(client, router, &after, PAGE).await?;
            let Some(last) = page.last() else { break };
            after = After {
                created_at: Some(last.created_at.clone()),
                id: Some(last.id.clone()),
            };
            all.extend(page);
        }
    }
    Ok(all)
}

/// The ids of `rows` found in their topics, read from the oldest row on.
async fn ids_in_kafka(
    producer: &rdkafka::ClientConfig,
    rows: &[RoutedRow],
) -> Result<HashSet<String>, ReplayError> {
    let Some(oldest) = rows.iter().map(|r| r.created_micros).min() else {
        return Ok(HashSet::new());
    };
    let topics: Vec<String> = rows
        .iter()
        .map(|r| r.record.topic.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let producer = producer.clone();
    let since = oldest / 1000 - CLOCK_MARGIN_MS;
    // Events whose records Kafka no longer keeps cannot be told from
    // events never sent: publishing them again would double them (and put
    // old values after new ones on a compacted topic).
    let (check_producer, check_topics) = (producer.clone(), topics.clone());
    let not_kept = tokio::task::spawn_blocking(move || {
        super::ids::not_kept_since(&check_producer, &check_topics, since)
    })
    .await
    .map_err(|e| ReplayError::Kafka(e.to_string()))?
    .map_err(|e| {
        ReplayError::Kafka(format!(
            "cannot read the topics back ({e}): is the broker up? run recover again once it is; it goes on where it stopped"
        ))
    })?;
    if !not_kept.is_empty() {
        return Err(ReplayError::Refused(format!(
            "the outbox rows reach back further than the topics keep: {} no longer hold every record since the oldest row's time, so events found missing may have been delivered long ago, and publishing them would double them. Run recover again with --since set to a time the topics still hold in full (within their retention.ms), or delete or archive the older rows",
            not_kept.join(", ")
        )));
    }
    tokio::task::spawn_blocking(move || super::ids::ids_since(&producer, &topics, since, None))
        .await
        .map_err(|e| ReplayError::Kafka(e.to_string()))?
        .map_err(|e| {
            ReplayError::Kafka(format!(
                "cannot read the topics back ({e}): is the broker up? run recover again once it is; it goes on where it stopped"
            ))
        })
}

/// The time span of the table's rows, for the gap's report.
fn table_span(rows: &[RoutedRow]) -> String {
    match (rows.first(), rows.last()) {
        (Some(oldest), Some(newest)) => format!(
            " (its rows were created from {} to {})",
            oldest.created_at, newest.created_at
        ),
        _ => " (it is empty)".to_owned(),
    }
}

/// Before any slot is touched: does the table reach back past the loss?
/// (Rows read now; the snapshot read later sees these and any committed
/// since.)
async fn check_reaches_back(
    client: &SqlClient,
    router: &Router,
    options: &RecoverOptions,
    selection: &Selection,
    producer: &rdkafka::ClientConfig,
    lost: &LostSlot,
) -> Result<(), ReplayError> {
    let rows = read_all(client, router, &options.router, selection).await?;
    let in_kafka = ids_in_kafka(producer, &rows).await?;
    let overlap = rows.iter().filter(|r| in_kafka.contains(&r.id)).count();
    if overlap == 0 && !options.accept_loss {
        let now: String = client
            .query_one(
                "SELECT pg_current_wal_lsn()::text || ' at ' || now()::text",
                &[],
            )
            .await?
            .get(0);
        let span = table_span(&rows);
        // None of the rows there is in Kafka, so each was inserted after
        // the confirmation: the others inserted since are the lost ones.
        let schema = crate::slot_record::record_schema(&options.router.tables);
        let count = match crate::slot_record::inserts_since_confirm(client, &schema, &options.slot)
            .await
        {
            Ok(Some((inserted, at))) => format!(
                "at most {} events (PostgreSQL's statistics count {inserted} rows inserted into the outbox since walrelay recorded the slot's confirmation at {at}, and {} of them are still in the table; the statistics count rolled-back inserts too)",
                (inserted - rows.len() as i64).max(0),
                rows.len()
            ),
            _ => "an unknown number of events (walrelay has no record of the slot's statistics, and the WAL that held them is gone)".to_owned(),
        };
        return Err(ReplayError::Refused(format!(
            "slot {slot} was lost (wal_status {status}) after confirming {confirmed}; the events committed between {confirmed} and {now} are not all in the table any more: \
             of its {n} rows none is already in Kafka, so it does not reach back to where the slot stopped{span}, and the events whose rows were deleted (or pruned) in that range cannot be accounted for: {count}. \
             Nothing was changed. Restore the rows (from a backup) and run `walrelay recover` again, or accept the loss with `walrelay recover --accept-loss`, which publishes the {n} rows still there and makes a new slot",
            slot = options.slot,
            status = lost.wal_status,
            confirmed = lost.confirmed,
            n = rows.len(),
        )));
    }
    if overlap == 0 {
        tracing::warn!(slot = %options.slot, confirmed = %lost.confirmed, "--accept-loss: events whose rows were deleted since the slot's confirmed LSN are lost");
    }
    Ok(())
}
