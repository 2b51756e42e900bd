//! Writing a batch of consumed records into PostgreSQL: the inbox rows,
//! the dead letters and the group's next offsets, in one transaction. A
//! crash before the commit leaves nothing and the offsets where they were;
//! after it, everything and the new offsets. Either way the next consumer
//! resumes from exactly what is stored.

use std::collections::{BTreeMap, HashMap};

use tokio_postgres::Transaction;

use super::incoming::{DeadLetterKind, Incoming, Row, describe, prepare};
use super::schema::{self, InboxTables};
use crate::postgres::ConnectionConfig;
use crate::sql::{self, SqlClient, SqlError};

/// A partition of a topic.
pub type TopicPartition = (String, i32);

/// What the offsets table holds for a partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredOffset {
    /// Every record below it is stored.
    pub next: i64,
    /// The id of the topic the offset is of; `None` when stored by an
    /// older walrelay, or from a broker that keeps no topic ids.
    pub topic_id: Option<String>,
}

/// What one batch did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// New rows in the inbox.
    pub stored: u64,
    /// Records whose id was already there.
    pub duplicates: u64,
    pub dead_letters: Vec<(DeadLetterKind, String)>,
    /// Each partition's next offset, as now stored.
    pub next_offsets: BTreeMap<TopicPartition, i64>,
    /// Each stored record's timestamp (produced-to-stored latency).
    pub stored_timestamps_ms: Vec<i64>,
}

/// The SQL connection of one inbox consumer.
pub struct Store {
    config: ConnectionConfig,
    tables: InboxTables,
    group: String,
    client: SqlClient,
    /// The payload column takes bytes (bytea) rather than text.
    payload_is_bytea: bool,
    insert_sql: String,
}

impl Store {
    /// Connects and checks the tables; a missing piece is an error that
    /// names `setup --inbox`.
    pub async fn connect(
        config: &ConnectionConfig,
        tables: &InboxTables,
        group: &str,
    ) -> Result<Self, StoreError> {
        let client = sql::connect(config).await?;
        let missing = schema::missing_pieces(&client, tables).await?;
        if !missing.is_empty() {
            return Err(StoreError::NotSetUp(missing.join("; ")));
        }
        let payload_type = schema::payload_type(&client, tables)
            .await?
            .ok_or_else(|| {
                StoreError::NotSetUp(format!(
                    "{} has no payload column: ALTER TABLE {} ADD COLUMN payload jsonb",
                    tables.name(),
                    tables.inbox()
                ))
            })?;
        let payload_is_bytea = payload_type == "bytea";
        let mut client = client;
        match schema::add_topic_id(&mut client, tables).await {
            Ok(false) => {}
            Ok(true) => tracing::info!(
                table = %tables.offsets(),
                "added column topic_id: the inbox keeps each topic's id beside its offsets"
            ),
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) => {
                return Err(StoreError::NotSetUp(format!(
                    "{0} has no topic_id column (made by an older walrelay) and this role cannot add it ({e}): run `walrelay setup --inbox {1}` as the table's owner, or ALTER TABLE {0} ADD COLUMN topic_id text",
                    tables.offsets(),
                    tables.name()
                )));
            }
        }
        Ok(Store {
            config: config.clone(),
            tables: tables.clone(),
            group: group.to_owned(),
            client,
            payload_is_bytea,
            insert_sql: insert_sql(tables, &payload_type, payload_is_bytea),
        })
    }

    /// A fresh connection after a failure.
    pub async fn reconnect(&mut self) -> Result<(), StoreError> {
        *self = Store::connect(&self.config, &self.tables, &self.group).await?;
        Ok(())
    }

    /// The stored next offset (and topic id) of each of these partitions
    /// that has one.
    pub async fn offsets(
        &self,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, StoredOffset>, SqlError> {
        let topics: Vec<&str> = partitions.iter().map(|(t, _)| t.as_str()).collect();
        let numbers: Vec<i32> = partitions.iter().map(|(_, p)| *p).collect();
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT o.topic, o.\"partition\", o.next_offset, o.topic_id FROM {} o
                     JOIN unnest($2::text[], $3::int4[]) AS w(topic, p)
                       ON o.topic = w.topic AND o.\"partition\" = w.p
                     WHERE o.consumer_group = $1",
                    self.tables.offsets()
                ),
                &[&self.group, &topics, &numbers],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let stored = StoredOffset {
                    next: r.get(2),
                    topic_id: r.get(3),
                };
                ((r.get(0), r.get(1)), stored)
            })
            .collect())
    }

    /// Moves a partition's stored offset to the start of a new log (its
    /// topic made again), if it still is `from`; returns whether it did.
    /// (Storing a batch never moves an offset back; this does, once, on
    /// purpose.)
    pub async fn reset(
        &self,
        tp: &TopicPartition,
        from: &StoredOffset,
        to: &StoredOffset,
    ) -> Result<bool, SqlError> {
        let moved = self
            .client
            .execute(
                &format!(
                    "UPDATE {} SET next_offset = $5, topic_id = $6, updated_at = now()
                     WHERE consumer_group = $1 AND topic = $2 AND \"partition\" = $3
                       AND next_offset = $4 AND topic_id IS NOT DISTINCT FROM $7",
                    self.tables.offsets()
                ),
                &[
                    &self.group,
                    &tp.0,
                    &tp.1,
                    &from.next,
                    &to.next,
                    &to.topic_id,
                    &from.topic_id,
                ],
            )
            .await?;
        Ok(moved == 1)
    }

    /// Stores a batch: each record in the inbox unless its id is there
    /// already, or in the dead-letter table when it cannot be stored, and
    /// each partition's next offset with its topic's id (from `topic_ids`,
    /// when known), all in one transaction.
    pub async fn write(
        &mut self,
        batch: &[Incoming],
        topic_ids: &HashMap<TopicPartition, String>,
    ) -> Result<Written, SqlError> {
        let address = self.client.address().to_owned();
        let at = |e| SqlError::from_postgres(&address, e);
        let mut written = Written::default();
        let mut rows = Vec::new();
        let mut dead = Vec::new();
        for record in batch {
            let key = written
                .next_offsets
                .entry((record.topic.clone(), record.partition))
                .or_insert(record.offset + 1);
            *key = (*key).max(record.offset + 1);
            match prepare(record, self.payload_is_bytea) {
                Ok(row) => rows.push(row),
                Err(kind) => dead.push((record, kind, describe(kind).to_owned())),
            }
        }
        let payload_is_bytea = self.payload_is_bytea;
        let mut tx = self.client.inner().transaction().await.map_err(at)?;
        // The whole batch in one statement; when PostgreSQL refuses a row,
        // row by row, each in a savepoint, to find the ones it refuses.
        let fast = {
            let inner = tx.transaction().await.map_err(at)?;
            let all: Vec<&Row> = rows.iter().collect();
            match insert(&inner, &self.insert_sql, &all, payload_is_bytea).await {
                Ok(n) => {
                    inner.commit().await.map_err(at)?;
                    Ok(n)
                }
                Err(e) if is_row_error(&e) => {
                    inner.rollback().await.map_err(at)?;
                    Err(e)
                }
                Err(e) => return Err(at(e)),
            }
        };
        let stored_rows: Vec<&Row> = match fast {
            Ok(n) => {
                written.stored = n;
                rows.iter().collect()
            }
            Err(_) => {
                let mut kept = Vec::new();
                for row in &rows {
                    let one = tx.transaction().await.map_err(at)?;
                    match insert(&one, &self.insert_sql, &[row], payload_is_bytea).await {
                        Ok(n) => {
                            one.commit().await.map_err(at)?;
                            written.stored += n;
                            kept.push(row);
                        }
                        Err(e) if is_row_error(&e) => {
                            one.rollback().await.map_err(at)?;
                            let reason = e
                                .as_db_error()
                                .map(|d| d.message().to_owned())
                                .unwrap_or_else(|| e.to_string());
                            dead.push((row.record, DeadLetterKind::InvalidRow, reason));
                        }
                        Err(e) => return Err(at(e)),
                    }
                }
                kept
            }
        };
        written.duplicates = stored_rows.len() as u64 - written.stored;
        written.stored_timestamps_ms = stored_rows
            .iter()
            .filter_map(|r| r.record.timestamp_ms)
            .collect();
        for (record, kind, reason) in &dead {
            tx.execute(
                &format!(
                    "INSERT INTO {} (topic, \"partition\", \"offset\", key, headers, payload, kind, error)
                     VALUES ($1, $2, $3, $4, $5::text::jsonb, $6, $7, $8)
                     ON CONFLICT (topic, \"partition\", \"offset\") DO NOTHING",
                    self.tables.dead_letters()
                ),
                &[
                    &record.topic,
                    &record.partition,
                    &record.offset,
                    &record.key,
                    &record.headers_json(),
                    &record.payload,
                    &kind.as_str(),
                    reason,
                ],
            )
            .await
            .map_err(at)?;
            written.dead_letters.push((*kind, reason.clone()));
        }
        let topics: Vec<&str> = written
            .next_offsets
            .keys()
            .map(|(t, _)| t.as_str())
            .collect();
        let partitions: Vec<i32> = written.next_offsets.keys().map(|(_, p)| *p).collect();
        let offsets: Vec<i64> = written.next_offsets.values().copied().collect();
        let ids: Vec<Option<&str>> = written
            .next_offsets
            .keys()
            .map(|tp| topic_ids.get(tp).map(String::as_str))
            .collect();
        // GREATEST: a consumer that lost its partition in a rebalance and
        // did not know yet never moves the next owner's offset back. Nor
        // does one that read the topic before it was made again: an offset
        // of another topic id is left alone.
        tx.execute(
            &format!(
                "INSERT INTO {t} AS o (consumer_group, topic, \"partition\", next_offset, topic_id)
                 SELECT $1, w.topic, w.p, w.n, w.id
                 FROM unnest($2::text[], $3::int4[], $4::int8[], $5::text[]) AS w(topic, p, n, id)
                 ON CONFLICT (consumer_group, topic, \"partition\")
                 DO UPDATE SET next_offset = GREATEST(o.next_offset, EXCLUDED.next_offset),
                               topic_id = COALESCE(EXCLUDED.topic_id, o.topic_id), updated_at = now()
                 WHERE o.topic_id IS NULL OR EXCLUDED.topic_id IS NULL OR o.topic_id = EXCLUDED.topic_id",
                t = self.tables.offsets()
            ),
            &[&self.group, &topics, &partitions, &offsets, &ids],
        )
        .await
        .map_err(at)?;
        tx.commit().await.map_err(at)?;
        Ok(written)
    }
}

/// A refusal of the data (class 22, data exception; class 23, a
/// constraint), as opposed to a refusal of the statement or the session.
fn is_row_error(error: &tokio_postgres::Error) -> bool {
    error
        .as_db_error()
        .is_some_and(|d| matches!(&d.code().code()[..2], "22" | "23"))
}

fn insert_sql(tables: &InboxTables, payload_type: &str, payload_is_bytea: bool) -> String {
    let payload = if payload_is_bytea {
        "u.payload".to_owned()
    } else {
        format!("u.payload::{payload_type}")
    };
    format!(
        "INSERT INTO {inbox} (id, topic, \"partition\", \"offset\", key, headers, payload,
                              ce_source, ce_type, ce_time, produced_at)
         SELECT u.id, u.topic, u.p, u.o, u.key, u.headers::jsonb, {payload},
                u.ce_source, u.ce_type, u.ce_time::timestamptz,
                to_timestamp(u.produced_ms / 1000.0)
         FROM unnest($1::text[], $2::text[], $3::int4[], $4::int8[], $5::text[], $6::text[],
                     $7::{payload_array}, $8::text[], $9::text[], $10::text[], $11::int8[])
              AS u(id, topic, p, o, key, headers, payload, ce_source, ce_type, ce_time, produced_ms)
         ON CONFLICT (id) DO NOTHING",
        inbox = tables.inbox(),
        payload_array = if payload_is_bytea {
            "bytea[]"
        } else {
            "text[]"
        },
    )
}

/// Inserts rows; returns how many were new.
async fn insert(
    tx: &Transaction<'_>,
    sql: &str,
    rows: &[&Row<'_>],
    payload_is_bytea: bool,
) -> Result<u64, tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let topics: Vec<&str> = rows.iter().map(|r| r.record.topic.as_str()).collect();
    let partitions: Vec<i32> = rows.iter().map(|r| r.record.partition).collect();
    let offsets: Vec<i64> = rows.iter().map(|r| r.record.offset).collect();
    let keys: Vec<Option<&str>> = rows.iter().map(|r| r.key.as_deref()).collect();
    let headers: Vec<&str> = rows.iter().map(|r| r.headers.as_str()).collect();
    let sources: Vec<Option<&str>> = rows.iter().map(|r| r.ce_source.as_deref()).collect();
    let types: Vec<Option<&str>> = rows.iter().map(|r| r.ce_type.as_deref()).collect();
    let times: Vec<Option<&str>> = rows.iter().map(|r| r.ce_time.as_deref()).collect();
    let produced: Vec<Option<i64>> = rows.iter().map(|r| r.record.timestamp_ms).collect();
    // Text payloads go as text: PostgreSQL casts them to the column's
    // type, and says so when it cannot.
    let bytes: Vec<Option<&[u8]>> = rows.iter().map(|r| r.record.payload.as_deref()).collect();
    let texts: Vec<Option<&str>> = rows.iter().map(|r| r.payload_text).collect();
    let payload: &(dyn tokio_postgres::types::ToSql + Sync) =
        if payload_is_bytea { &bytes } else { &texts };
    tx.execute(
        sql,
        &[
            &ids,
            &topics,
            &partitions,
            &offsets,
            &keys,
            &headers,
            payload,
            &sources,
            &types,
            &times,
            &produced,
        ],
    )
    .await
}

/// Why the store could not start.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Sql(Box<SqlError>),
    #[error("the inbox is not set up: {0}")]
    NotSetUp(String),
}

impl From<SqlError> for StoreError {
    fn from(error: SqlError) -> Self {
        StoreError::Sql(Box::new(error))
    }
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Sql(e) => e.is_transient(),
            StoreError::NotSetUp(_) => false,
        }
    }
}
