//! The inbox's three tables: the inbox itself (one row per event id), the
//! consumer's offsets, and the records that could not be stored.
//! `setup --inbox` creates them; `inbox` and `check --inbox` look for them.

use crate::catalog::{self, qualified};
use crate::sql::{SqlClient, SqlError};

/// An inbox table and the two tables named after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboxTables {
    pub schema: String,
    pub table: String,
}

impl InboxTables {
    pub fn new(schema: &str, table: &str) -> Self {
        InboxTables {
            schema: schema.to_owned(),
            table: table.to_owned(),
        }
    }

    /// `schema.table`, as the user wrote it.
    pub fn name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    pub fn inbox(&self) -> String {
        qualified(&self.schema, &self.table)
    }

    /// Where each group's next offset per partition lives.
    pub fn offsets(&self) -> String {
        qualified(&self.schema, &self.offsets_name())
    }

    pub fn dead_letters(&self) -> String {
        qualified(&self.schema, &self.dead_letters_name())
    }

    /// `schema.table_offsets`, as the user would write it.
    pub fn offsets_table_name(&self) -> String {
        format!("{}.{}", self.schema, self.offsets_name())
    }

    fn offsets_name(&self) -> String {
        format!("{}_offsets", self.table)
    }

    fn dead_letters_name(&self) -> String {
        format!("{}_dead_letters", self.table)
    }

    /// The three tables, unquoted, as `(schema, table)`.
    fn all(&self) -> [(String, String); 3] {
        [
            (self.schema.clone(), self.table.clone()),
            (self.schema.clone(), self.offsets_name()),
            (self.schema.clone(), self.dead_letters_name()),
        ]
    }

    fn add_topic_id_sql(&self) -> String {
        format!(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS topic_id text",
            self.offsets()
        )
    }

    fn create_sql(&self) -> [String; 3] {
        [
            format!(
                "CREATE TABLE IF NOT EXISTS {} (
                   id          text PRIMARY KEY,           -- the record's `id` header
                   topic       text NOT NULL,
                   \"partition\" integer NOT NULL,
                   \"offset\"    bigint NOT NULL,
                   key         text,
                   headers     jsonb NOT NULL DEFAULT '{{}}',
                   payload     jsonb,
                   ce_source   text,
                   ce_type     text,
                   ce_time     timestamptz,
                   produced_at timestamptz,                -- the record's timestamp
                   received_at timestamptz NOT NULL DEFAULT now())",
                self.inbox()
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (
                   consumer_group text NOT NULL,
                   topic          text NOT NULL,
                   \"partition\"    integer NOT NULL,
                   next_offset    bigint NOT NULL,        -- everything below is stored
                   topic_id       text,                   -- the topic's id (KIP-516) the offset is of
                   updated_at     timestamptz NOT NULL DEFAULT now(),
                   PRIMARY KEY (consumer_group, topic, \"partition\"))",
                self.offsets()
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (
                   topic       text NOT NULL,
                   \"partition\" integer NOT NULL,
                   \"offset\"    bigint NOT NULL,
                   key         bytea,
                   headers     jsonb NOT NULL DEFAULT '{{}}',
                   payload     bytea,
                   kind        text NOT NULL,              -- why it is here
                   error       text NOT NULL,
                   received_at timestamptz NOT NULL DEFAULT now(),
                   PRIMARY KEY (topic, \"partition\", \"offset\"))",
                self.dead_letters()
            ),
        ]
    }
}

/// Creates whichever of the three tables is missing, in one transaction;
/// one line per table, saying what it did.
pub async fn setup(client: &mut SqlClient, tables: &InboxTables) -> Result<Vec<String>, SqlError> {
    let address = client.address().to_owned();
    let at = |e| SqlError::from_postgres(&address, e);
    let mut existed = Vec::new();
    for (schema, table) in tables.all() {
        existed.push(catalog::table_exists(client, &schema, &table).await?);
    }
    let add_topic_id = existed[1] && !has_topic_id(client, tables).await?;
    let tx = client.inner().transaction().await.map_err(at)?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {}",
        catalog::quote_ident(&tables.schema)
    ))
    .await
    .map_err(at)?;
    for sql in tables.create_sql() {
        tx.batch_execute(&sql).await.map_err(at)?;
    }
    if add_topic_id {
        tx.batch_execute(&tables.add_topic_id_sql())
            .await
            .map_err(at)?;
    }
    tx.commit().await.map_err(at)?;
    let mut done: Vec<String> = tables
        .all()
        .iter()
        .zip(existed)
        .map(|((schema, table), existed)| {
            if existed {
                format!("table {schema}.{table} exists")
            } else {
                format!("created table {schema}.{table}")
            }
        })
        .collect();
    if add_topic_id {
        done.push(format!(
            "added column topic_id to table {}",
            tables.offsets_table_name()
        ));
    }
    Ok(done)
}

/// Whether the offsets table has the `topic_id` column (tables made before
/// walrelay kept topic ids have not).
async fn has_topic_id(client: &SqlClient, tables: &InboxTables) -> Result<bool, SqlError> {
    let columns = catalog::table_columns(client, &tables.schema, &tables.offsets_name()).await?;
    Ok(columns.iter().any(|(name, _)| name == "topic_id"))
}

/// Adds the `topic_id` column to an offsets table made by an older
/// walrelay (nullable, no default: no rewrite, a moment's lock, waited for
/// at most 10 s). Returns whether it did. An offset stored without a topic
/// id takes the topic's current id on trust (see `reset.rs`).
pub async fn add_topic_id(client: &mut SqlClient, tables: &InboxTables) -> Result<bool, SqlError> {
    if has_topic_id(client, tables).await? {
        return Ok(false);
    }
    let address = client.address().to_owned();
    let at = |e| SqlError::from_postgres(&address, e);
    let tx = client.inner().transaction().await.map_err(at)?;
    tx.batch_execute("SET LOCAL lock_timeout = '10s'")
        .await
        .map_err(at)?;
    tx.batch_execute(&tables.add_topic_id_sql())
        .await
        .map_err(at)?;
    tx.commit().await.map_err(at)?;
    Ok(true)
}

/// What is missing for `walrelay inbox`, each with its fix.
pub async fn missing_pieces(
    client: &SqlClient,
    tables: &InboxTables,
) -> Result<Vec<String>, SqlError> {
    let mut missing = Vec::new();
    for (schema, table) in tables.all() {
        if !catalog::table_exists(client, &schema, &table).await? {
            missing.push(format!(
                "table {schema}.{table} does not exist: run `walrelay setup --inbox {}`",
                tables.name()
            ));
        }
    }
    if missing.is_empty()
        && !catalog::has_primary_key(client, &tables.schema, &tables.table).await?
    {
        missing.push(format!(
            "{} has no primary key on id: the inbox skips a record whose id is already there through it; ALTER TABLE {} ADD PRIMARY KEY (id)",
            tables.name(),
            tables.inbox()
        ));
    }
    Ok(missing)
}

/// The payload column's type, as SQL (`jsonb` unless the user changed
/// it); `None` when the table has no payload column.
pub async fn payload_type(
    client: &SqlClient,
    tables: &InboxTables,
) -> Result<Option<String>, SqlError> {
    let row = client
        .query_opt(
            "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
             WHERE a.attrelid = $1::text::regclass AND a.attname = 'payload' AND NOT a.attisdropped",
            &[&tables.inbox()],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}
