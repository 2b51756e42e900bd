//! `walrelay setup`: create the outbox table, the publication and the slot
//! if they are missing. Idempotent: run twice, the second run changes
//! nothing and says so.
//!
//! It never re-makes a slot walrelay streamed from (its record in
//! `walrelay_slots` says so): that slot's loss means events were not
//! streamed, and a new slot would skip them silently. It refuses and names
//! `walrelay recover`, unless `--new-slot` accepts the loss.

use crate::catalog::{self, qualified, quote_ident};
use crate::postgres::ConnectionConfig;
use crate::replication::ReplicationConnection;
use crate::router::OutboxColumns;
use crate::slot_record;
use crate::sql::{SqlClient as Client, SqlError};

/// What walrelay needs in the database: `setup` makes it, `check` looks
/// for it. One struct, so the two cannot drift apart.
#[derive(Clone, Debug)]
pub struct SetupOptions {
    pub tables: Vec<(String, String)>,
    pub columns: OutboxColumns,
    pub publication: String,
    pub slot: String,
    /// Make the slot a failover slot (PostgreSQL 17+), kept on standbys;
    /// `check` checks what a failover needs.
    pub failover: bool,
    /// For `run --source poll`: the polling pieces instead of the
    /// publication and the slot.
    pub poll: bool,
    /// Where events the broker refuses for good are kept.
    pub dead_letter_table: (String, String),
    /// Make the slot even if walrelay streamed from one of that name that
    /// is gone (`--new-slot`): the operator accepts that events since were
    /// not streamed. `check` makes nothing, so it does not read it.
    pub new_slot: bool,
    /// `--retain`: the index retention's pruning walks.
    pub retain: bool,
    /// `--primary-url`: when the server is a standby, the table, the
    /// publication and walrelay's record are made (and checked) here, and
    /// the slot on the standby (PostgreSQL 16+).
    pub primary: Option<ConnectionConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Postgres(#[from] SqlError),
    #[error(
        "replication slot {slot:?} exists but uses output plugin {plugin:?}; walrelay needs pgoutput: drop it (SELECT pg_drop_replication_slot('{slot}')) or choose another --slot"
    )]
    WrongPlugin { slot: String, plugin: String },
    #[error(
        "replication slot {slot:?} belongs to database {database:?}, not this one; use another --slot or connect to {database:?}"
    )]
    WrongDatabase { slot: String, database: String },
    #[error(transparent)]
    Replication(#[from] crate::replication::ReplicationError),
    #[error(transparent)]
    SlotWasInUse(#[from] crate::slot_record::SlotWasInUse),
    #[error(transparent)]
    Standby(#[from] crate::standby::StandbyError),
}

/// Runs setup and returns one line per step, saying what it did. `pg`
/// reaches the same server for the replication command that makes an
/// existing slot a failover slot. When `server` is a standby, everything
/// but the slot is made on the primary (`options.primary`).
pub async fn setup(
    server: &Client,
    pg: &ConnectionConfig,
    options: &SetupOptions,
) -> Result<Vec<String>, SetupError> {
    let mut report = Vec::new();
    let primary = crate::standby::primary_for(
        server,
        options.primary.as_ref(),
        "setup makes the outbox table, the publication and walrelay's record on the primary",
    )
    .await?;
    let on_standby = primary.is_some();
    // Writes go to the primary; the slot is made where it is decoded.
    let client = primary.as_ref().unwrap_or(server);
    if on_standby {
        report.push(format!(
            "{} is a standby: the slot is made there, everything else on the primary {}",
            server.address(),
            client.address()
        ));
    }
    for (schema, table) in &options.tables {
        if catalog::table_exists(client, schema, table).await? {
            report.push(format!("table {schema}.{table} exists"));
        } else {
            client
                .batch_execute(&create_table_sql(schema, table, &options.columns))
                .await?;
            report.push(format!("created table {schema}.{table}"));
        }
    }
    report.push(dead_letter_table(client, options).await?);
    if options.retain {
        report.extend(retention_indexes(client, options).await?);
    }

    let table_list = options
        .tables
        .iter()
        .map(|(s, t)| qualified(s, t))
        .collect::<Vec<_>>()
        .join(", ");
    if !catalog::publication_exists(client, &options.publication).await? {
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {table_list}",
                quote_ident(&options.publication)
            ))
            .await?;
        report.push(format!(
            "created publication {} for {}",
            options.publication,
            tables_text(&options.tables)
        ));
    } else {
        let mut added = Vec::new();
        for (schema, table) in &options.tables {
            if !catalog::publication_covers(client, &options.publication, schema, table).await? {
                client
                    .batch_execute(&format!(
                        "ALTER PUBLICATION {} ADD TABLE {}",
                        quote_ident(&options.publication),
                        qualified(schema, table)
                    ))
                    .await?;
                added.push(format!("{schema}.{table}"));
            }
        }
        if added.is_empty() {
            report.push(format!(
                "publication {} exists and covers {}",
                options.publication,
                tables_text(&options.tables)
            ));
        } else {
            report.push(format!(
                "added {} to publication {}",
                added.join(", "),
                options.publication
            ));
        }
    }

    let schema = crate::commands::run::record_schema(&options.tables);
    slot_record::ensure_table(client, &schema).await?;
    let slot = catalog::slot(server, &options.slot).await?;
    let failover = match slot {
        None => {
            slot_record::may_create(client, &schema, &options.slot, options.new_slot).await??;
            let lsn = match &options.primary {
                Some(primary) if on_standby => {
                    // A standby cannot make a failover slot.
                    crate::standby::with_standby_snapshots(
                        primary,
                        catalog::create_logical_slot(server, &options.slot, false),
                    )
                    .await?
                }
                _ => catalog::create_logical_slot(server, &options.slot, options.failover).await?,
            };
            slot_record::created(
                client,
                &schema,
                &options.slot,
                &options.publication,
                &options.tables,
                &lsn,
            )
            .await?;
            report.push(format!(
                "created replication slot {} at {lsn}",
                options.slot
            ));
            options.failover && !on_standby
        }
        Some(slot) => {
            if slot.plugin != "pgoutput" {
                return Err(SetupError::WrongPlugin {
                    slot: options.slot.clone(),
                    plugin: slot.plugin,
                });
            }
            if slot.database != catalog::current_database(server).await? {
                return Err(SetupError::WrongDatabase {
                    slot: options.slot.clone(),
                    database: slot.database,
                });
            }
            slot_record::used(
                client,
                &schema,
                &options.slot,
                &options.publication,
                &options.tables,
            )
            .await?;
            report.push(format!("replication slot {} exists", options.slot));
            slot.failover.unwrap_or(false)
        }
    };
    report.push(if on_standby {
        format!(
            "replication slot {} is on a standby: PostgreSQL makes failover slots on the primary only; if this standby is lost, see docs/runbooks/standby-decoding.md",
            options.slot
        )
    } else {
        failover_line(client, pg, options, failover).await?
    });
    Ok(report)
}

/// Setup for the polling source: each table, and what polling needs in it.
pub async fn setup_poll(
    client: &mut Client,
    options: &SetupOptions,
) -> Result<Vec<String>, SetupError> {
    let mut report = Vec::new();
    for (schema, table) in &options.tables {
        if catalog::table_exists(client, schema, table).await? {
            report.push(format!("table {schema}.{table} exists"));
        } else {
            client
                .batch_execute(&create_table_sql(schema, table, &options.columns))
                .await?;
            report.push(format!("created table {schema}.{table}"));
        }
        report.extend(crate::poll::schema::setup(client, schema, table, &options.columns).await?);
    }
    report.push(dead_letter_table(client, options).await?);
    Ok(report)
}

/// The index on the created-at column of each table (`--retain`).
async fn retention_indexes(
    client: &Client,
    options: &SetupOptions,
) -> Result<Vec<String>, SetupError> {
    let column = &options.columns.created_at;
    let mut report = Vec::new();
    for (schema, table) in &options.tables {
        if crate::retention::has_index(client, schema, table, column).await? {
            report.push(format!(
                "{schema}.{table} has an index on {column} (for --retain)"
            ));
        } else {
            client
                .batch_execute(&crate::retention::create_index_sql(schema, table, column))
                .await?;
            report.push(format!(
                "created index {} on {schema}.{table} ({column}) for --retain",
                crate::retention::index_name(table, column)
            ));
        }
    }
    Ok(report)
}

/// The dead-letter table (`--dead-letter-table`).
async fn dead_letter_table(client: &Client, options: &SetupOptions) -> Result<String, SetupError> {
    let (schema, table) = &options.dead_letter_table;
    Ok(if catalog::table_exists(client, schema, table).await? {
        format!("dead-letter table {schema}.{table} exists")
    } else {
        client
            .batch_execute(&crate::dead_letters::create_sql(schema, table))
            .await?;
        format!("created dead-letter table {schema}.{table}")
    })
}

/// What setup says (and does) about failover: a slot on 17+ becomes a
/// failover slot; on older servers it cannot be one, and that is said.
async fn failover_line(
    client: &Client,
    pg: &ConnectionConfig,
    options: &SetupOptions,
    failover: bool,
) -> Result<String, SetupError> {
    let major = catalog::server_major(client).await?;
    let slot = &options.slot;
    Ok(if !options.failover {
        format!("replication slot {slot} is not a failover slot (--no-failover)")
    } else if major < catalog::FAILOVER_SLOTS_SINCE {
        format!(
            "failover slots need PostgreSQL {}, and this server is {major}: after a primary failover the new primary has no slot {slot}; upgrade to keep it on standbys",
            catalog::FAILOVER_SLOTS_SINCE
        )
    } else if failover {
        format!(
            "replication slot {slot} is a failover slot: standbys with sync_replication_slots = on keep it (walrelay check verifies the rest)"
        )
    } else {
        // An existing slot made before: ALTER_REPLICATION_SLOT is a
        // replication command.
        let mut conn = ReplicationConnection::connect(pg).await?;
        conn.simple_query(&format!(
            "ALTER_REPLICATION_SLOT {} ( FAILOVER true )",
            quote_ident(slot)
        ))
        .await?;
        conn.close().await?;
        format!("made replication slot {slot} a failover slot")
    })
}

fn tables_text(tables: &[(String, String)]) -> String {
    tables
        .iter()
        .map(|(s, t)| format!("{s}.{t}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The default outbox table (docs/configuration.md, "The outbox"), with the configured column names.
pub fn create_table_sql(schema: &str, table: &str, c: &OutboxColumns) -> String {
    let q = quote_ident;
    format!(
        "CREATE TABLE IF NOT EXISTS {}.{} (
  {} uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  {} text NOT NULL,
  {} text NOT NULL,
  {} text NOT NULL,
  {} jsonb,
  {} jsonb NOT NULL DEFAULT '{{}}',
  {} timestamptz NOT NULL DEFAULT now()
)",
        q(schema),
        q(table),
        q(&c.id),
        q(&c.aggregate_type),
        q(&c.aggregate_id),
        q(&c.event_type),
        q(&c.payload),
        q(&c.headers),
        q(&c.created_at),
    )
}
