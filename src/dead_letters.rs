//! The dead-letter table: where an event the broker will never take (too
//! large, invalid) is kept whole, in the source database, before its
//! position is confirmed or its row deleted. The dead-letter topic gets a
//! notice of it, but the table is what keeps it: a notice can lose the
//! value (too large to travel), and the topic can refuse it too.
//!
//! Each event has one row, keyed by where it came from (`event_key`: its
//! origin and WAL position, or its table and `seq`), so storing it again
//! after a replay changes nothing.

use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use serde_json::{Map, Value};

use crate::catalog::{qualified, quote_ident};
use crate::record::KafkaRecord;
use crate::sql::{SqlClient, SqlError};

/// Longest a store may wait on PostgreSQL before it is tried again.
const STORE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The default table, `--dead-letter-table`.
pub const DEFAULT_TABLE: &str = "public.walrelay_dead_letters";

/// An event kept in the table.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// Where the event came from; one row per key.
    pub event_key: String,
    /// The record the broker refused, whole.
    pub record: KafkaRecord,
    /// Why: `too_large`, `invalid_record`, ...
    pub kind: String,
    pub error: String,
}

/// Where the WAL relay keeps refused events: the table in PostgreSQL, or
/// (in tests) memory.
pub trait DeadLetterStore {
    fn store(&self, letter: DeadLetter) -> LocalBoxFuture<'static, Result<(), String>>;
}

/// The dead-letter table, through a connection of its own for each store
/// (refusals are rare).
pub struct PgDeadLetters {
    pub pg: crate::postgres::ConnectionConfig,
    /// Where letters go while `pg` is a standby (`--primary-url`).
    pub primary: Option<crate::postgres::ConnectionConfig>,
    pub table: (String, String),
}

impl DeadLetterStore for PgDeadLetters {
    fn store(&self, letter: DeadLetter) -> LocalBoxFuture<'static, Result<(), String>> {
        let (pg, table) = (self.pg.clone(), self.table.clone());
        let mut route = crate::standby::WriteRoute::new(self.primary.clone());
        Box::pin(async move {
            // A server that froze while its host still answers TCP must not
            // hold the event (and the relay's window) for good: the store is
            // tried again.
            let attempt = async {
                let client = crate::sql::connect(&pg).await.map_err(|e| e.to_string())?;
                let writer = route.client(&client).await.map_err(|e| e.to_string())?;
                store(writer, &table, &letter)
                    .await
                    .map_err(|e| e.to_string())
            };
            tokio::time::timeout(STORE_TIMEOUT, attempt)
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "{}: PostgreSQL answered nothing for {STORE_TIMEOUT:?}",
                        pg.address()
                    ))
                })
        })
    }
}

/// Keeps letters in memory, for tests.
#[cfg(any(test, feature = "bench-support"))]
#[derive(Clone, Default)]
pub struct MemoryDeadLetters(pub std::sync::Arc<std::sync::Mutex<Vec<DeadLetter>>>);

#[cfg(any(test, feature = "bench-support"))]
impl DeadLetterStore for MemoryDeadLetters {
    fn store(&self, letter: DeadLetter) -> LocalBoxFuture<'static, Result<(), String>> {
        let letters = self.0.clone();
        Box::pin(async move {
            let mut letters = letters.lock().unwrap();
            if !letters.iter().any(|l| l.event_key == letter.event_key) {
                letters.push(letter);
            }
            Ok(())
        })
    }
}

/// `CREATE TABLE IF NOT EXISTS` for the table.
pub fn create_sql(schema: &str, table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (
  event_key  text PRIMARY KEY,
  id         text,
  topic      text NOT NULL,
  key        bytea,
  value      bytea,
  headers    jsonb NOT NULL,
  kind       text NOT NULL,
  error      text NOT NULL,
  stored_at  timestamptz NOT NULL DEFAULT now()
)",
        qualified(schema, table)
    )
}

/// Stores `letter` (or nothing, if its event is already there).
pub async fn store(
    client: &SqlClient,
    (schema, table): &(String, String),
    letter: &DeadLetter,
) -> Result<(), SqlError> {
    let record = &letter.record;
    let id = record
        .header("id")
        .map(|v| String::from_utf8_lossy(v).into_owned());
    let headers: Map<String, Value> = record
        .headers
        .iter()
        .map(|(k, v)| {
            let value = match std::str::from_utf8(v) {
                Ok(text) => text.to_owned(),
                Err(_) => format!("\\x{}", hex(v)),
            };
            (k.to_string(), Value::String(value))
        })
        .collect();
    client
        .execute(
            &format!(
                "INSERT INTO {} (event_key, id, topic, key, value, headers, kind, error)
                 VALUES ($1, $2, $3, $4, $5, CAST($6::text AS jsonb), $7, $8)
                 ON CONFLICT (event_key) DO NOTHING",
                qualified(schema, table)
            ),
            &[
                &letter.event_key,
                &id,
                &record.topic,
                &record.key.as_deref(),
                &record.value.as_deref(),
                &Value::Object(headers).to_string(),
                &letter.kind,
                &letter.error,
            ],
        )
        .await?;
    Ok(())
}

/// The event ids the table holds (none when it does not exist): events
/// Kafka refused for good and the stream kept here, which a replay passes
/// over rather than have Kafka refuse them again.
pub async fn ids(
    client: &SqlClient,
    (schema, table): &(String, String),
) -> Result<std::collections::HashSet<String>, SqlError> {
    if !crate::catalog::table_exists(client, schema, table).await? {
        return Ok(Default::default());
    }
    let rows = client
        .query(
            &format!(
                "SELECT id FROM {} WHERE id IS NOT NULL",
                qualified(schema, table)
            ),
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Whether the table exists, and the fix if not.
pub async fn check(client: &SqlClient, (schema, table): &(String, String)) -> Result<(), String> {
    match crate::catalog::table_exists(client, schema, table).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "the dead-letter table {schema}.{table} does not exist: run `walrelay setup` (it creates it), or create it with: {}",
            create_sql(schema, table).replace('\n', " ")
        )),
        Err(error) => Err(error.to_string()),
    }
}

fn hex(bytes: &Bytes) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The name of the table in messages: `schema.table`, quoted as needed.
pub fn display((schema, table): &(String, String)) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}
