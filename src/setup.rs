//! `walrelay setup`: create the outbox table, the publication and the slot
//! if they are missing. Idempotent: run twice, the second run changes
//! nothing and says so.

use tokio_postgres::Client;

use crate::replication::connection::quote_ident;
use crate::router::OutboxColumns;

/// What setup needs.
#[derive(Clone, Debug)]
pub struct SetupOptions {
    pub tables: Vec<(String, String)>,
    pub columns: OutboxColumns,
    pub publication: String,
    pub slot: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(
        "replication slot {slot:?} exists but uses output plugin {plugin:?}; walrelay needs pgoutput: drop it (SELECT pg_drop_replication_slot('{slot}')) or choose another --slot"
    )]
    WrongPlugin { slot: String, plugin: String },
    #[error(
        "replication slot {slot:?} belongs to database {database:?}, not this one; use another --slot or connect to {database:?}"
    )]
    WrongDatabase { slot: String, database: String },
}

/// Runs setup and returns one line per step, saying what it did.
pub async fn setup(client: &Client, options: &SetupOptions) -> Result<Vec<String>, SetupError> {
    let mut report = Vec::new();
    for (schema, table) in &options.tables {
        let name = format!("{}.{}", quote_ident(schema), quote_ident(table));
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
            .await?
            .get(0);
        if exists {
            report.push(format!("table {schema}.{table} exists"));
        } else {
            client
                .batch_execute(&create_table_sql(schema, table, &options.columns))
                .await?;
            report.push(format!("created table {schema}.{table}"));
        }
    }

    let publication_exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&options.publication],
        )
        .await?
        .get(0);
    let table_list = options
        .tables
        .iter()
        .map(|(s, t)| format!("{}.{}", quote_ident(s), quote_ident(t)))
        .collect::<Vec<_>>()
        .join(", ");
    if !publication_exists {
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
            let covered: bool = client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)",
                    &[&options.publication, schema, table],
                )
                .await?
                .get(0);
            if !covered {
                client
                    .batch_execute(&format!(
                        "ALTER PUBLICATION {} ADD TABLE {}.{}",
                        quote_ident(&options.publication),
                        quote_ident(schema),
                        quote_ident(table)
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

    let slot = client
        .query_opt(
            "SELECT plugin::text, database::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&options.slot],
        )
        .await?;
    match slot {
        None => {
            let row = client
                .query_one(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&options.slot],
                )
                .await?;
            let lsn: String = row.get(0);
            report.push(format!(
                "created replication slot {} at {lsn}",
                options.slot
            ));
        }
        Some(row) => {
            let plugin: Option<String> = row.get(0);
            let database: Option<String> = row.get(1);
            let plugin = plugin.unwrap_or_default();
            if plugin != "pgoutput" {
                return Err(SetupError::WrongPlugin {
                    slot: options.slot.clone(),
                    plugin,
                });
            }
            let current: String = client
                .query_one("SELECT current_database()::text", &[])
                .await?
                .get(0);
            let database = database.unwrap_or_default();
            if database != current {
                return Err(SetupError::WrongDatabase {
                    slot: options.slot.clone(),
                    database,
                });
            }
            report.push(format!("replication slot {} exists", options.slot));
        }
    }
    Ok(report)
}

fn tables_text(tables: &[(String, String)]) -> String {
    tables
        .iter()
        .map(|(s, t)| format!("{s}.{t}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The default outbox table (DESIGN.md), with the configured column names.
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
