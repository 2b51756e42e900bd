//! The publication check of the slot monitor: whether the publication
//! still publishes every insert of the outbox tables, whole, and the
//! tables are still the ones first seen. Each problem it finds names its
//! fix; `check` asks the same questions once.

use crate::catalog::{self, quote_ident};
use crate::slot_health;
use crate::sql::{SqlClient, SqlError};

/// A dropped outbox table or publication, a table the publication no
/// longer covers or publishes only in part, or a table renamed or
/// replaced: its inserts are not streamed, so relaying on would silently
/// skip events.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OutboxProblem {
    #[error(
        "publication {publication:?} was dropped: recreate it (walrelay setup, or CREATE PUBLICATION {} FOR TABLE ...); events committed while it was missing were not streamed and are still in the outbox table unless deleted",
        quote_ident(publication)
    )]
    PublicationDropped { publication: String },
    #[error(
        "outbox table {schema}.{table} was dropped (or renamed while the relay was not running): rename it back, or recreate it (walrelay setup) and add it to the publication, or remove it from --table"
    )]
    TableDropped { schema: String, table: String },
    #[error(
        "publication {publication:?} no longer covers outbox table {schema}.{table}: ALTER PUBLICATION {} ADD TABLE {}",
        quote_ident(publication),
        catalog::qualified(schema, table)
    )]
    TableNotCovered {
        publication: String,
        schema: String,
        table: String,
    },
    #[error(
        "publication {publication:?} no longer publishes inserts: pgoutput decodes every insert into the outbox away, so their events would be lost. The relay stopped before confirming past the change. Restore it: ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate'). {}",
        quote_ident(publication),
        after_the_fix(slot)
    )]
    NoInserts { publication: String, slot: String },
    #[error(
        "publication {publication:?} publishes outbox table {schema}.{table} only WHERE {filter}: pgoutput decodes the other inserts away, so their events would be lost. The relay stopped before confirming past the change. Remove the row filter: BEGIN; ALTER PUBLICATION {p} DROP TABLE {t}; ALTER PUBLICATION {p} ADD TABLE {t}; COMMIT. {}",
        after_the_fix(slot),
        p = quote_ident(publication),
        t = catalog::qualified(schema, table)
    )]
    RowFilter {
        publication: String,
        schema: String,
        table: String,
        filter: String,
        slot: String,
    },
    #[error(
        "publication {publication:?} publishes only some columns of outbox table {schema}.{table}, not {}: events would go out without them. The relay stopped before confirming past the change. Publish every column: BEGIN; ALTER PUBLICATION {p} DROP TABLE {t}; ALTER PUBLICATION {p} ADD TABLE {t}; COMMIT. {}",
        missing.join(", "),
        after_the_fix(slot),
        p = quote_ident(publication),
        t = catalog::qualified(schema, table)
    )]
    ColumnList {
        publication: String,
        schema: String,
        table: String,
        missing: Vec<String>,
        slot: String,
    },
    #[error(
        "outbox table {schema}.{table} was renamed to {now}: its inserts now arrive under a name the relay does not route. Rename it back (ALTER TABLE {now} RENAME TO {}) or point --table at {now}. {}",
        quote_ident(table),
        after_the_fix(slot)
    )]
    TableRenamed {
        schema: String,
        table: String,
        now: String,
        slot: String,
    },
    #[error(
        "outbox table {schema}.{table} is another table now (OID {was}, now {now}): it was dropped and made again, or swapped by renames, while the relay streamed. Make sure publication {publication:?} covers the new one (ALTER PUBLICATION {} ADD TABLE {}), then start the relay again. {}",
        quote_ident(publication),
        catalog::qualified(schema, table),
        after_the_fix(slot)
    )]
    TableReplaced {
        publication: String,
        schema: String,
        table: String,
        was: u32,
        now: u32,
        slot: String,
    },
}

/// What to say after the fix of a changed publication or table.
fn after_the_fix(slot: &str) -> String {
    format!(
        "Inserts committed while it was changed are not streamed even after the fix (pgoutput reads the publication as it was when each change was written): if there were any, bring them back from the outbox table with `{}`. See docs/runbooks/publication-changed.md",
        slot_health::recover_command(slot)
    )
}

/// The columns the relay reads from an outbox row (a publication's column
/// list must keep them).
pub fn relay_columns(c: &crate::router::OutboxColumns) -> Vec<String> {
    vec![
        c.id.clone(),
        c.aggregate_type.clone(),
        c.aggregate_id.clone(),
        c.event_type.clone(),
        c.payload.clone(),
        c.headers.clone(),
        c.created_at.clone(),
    ]
}

/// What the publication must do for the relay, and the outbox tables'
/// identities (OIDs) as first seen, to notice a table renamed or replaced.
#[derive(Clone, Debug)]
pub struct OutboxWatch {
    slot: String,
    publication: String,
    tables: Vec<(String, String)>,
    /// The columns the relay reads (the configured outbox columns).
    columns: Vec<String>,
    oids: Vec<Option<u32>>,
}

impl OutboxWatch {
    pub fn new(
        slot: &str,
        publication: &str,
        tables: &[(String, String)],
        columns: Vec<String>,
    ) -> Self {
        OutboxWatch {
            slot: slot.to_owned(),
            publication: publication.to_owned(),
            tables: tables.to_vec(),
            columns,
            oids: vec![None; tables.len()],
        }
    }

    /// Checks the publication and the tables now; the first problem found.
    pub async fn check(&mut self, client: &SqlClient) -> Result<Option<OutboxProblem>, SqlError> {
        let publication = self.publication.clone();
        if !catalog::publication_exists(client, &publication).await? {
            return Ok(Some(OutboxProblem::PublicationDropped { publication }));
        }
        for i in 0..self.tables.len() {
            if let Some(problem) = self.check_table(client, i).await? {
                return Ok(Some(problem));
            }
        }
        Ok(None)
    }

    async fn check_table(
        &mut self,
        client: &SqlClient,
        i: usize,
    ) -> Result<Option<OutboxProblem>, SqlError> {
        let (schema, table) = self.tables[i].clone();
        let (publication, slot) = (self.publication.clone(), self.slot.clone());
        let oid = catalog::table_oid(client, &schema, &table).await?;
        match (self.oids[i], oid) {
            (Some(was), None) => {
                if let Some(now) = catalog::table_name_of(client, was).await? {
                    return Ok(Some(OutboxProblem::TableRenamed {
                        schema,
                        table,
                        now,
                        slot,
                    }));
                }
                return Ok(Some(OutboxProblem::TableDropped { schema, table }));
            }
            (None, None) => return Ok(Some(OutboxProblem::TableDropped { schema, table })),
            (Some(was), Some(now)) if was != now => {
                return Ok(Some(OutboxProblem::TableReplaced {
                    publication,
                    schema,
                    table,
                    was,
                    now,
                    slot,
                }));
            }
            (None, Some(now)) => self.oids[i] = Some(now),
            _ => {}
        }
        let Some(published) =
            catalog::published_table(client, &publication, &schema, &table).await?
        else {
            return Ok(Some(OutboxProblem::PublicationDropped { publication }));
        };
        if !published.inserts {
            return Ok(Some(OutboxProblem::NoInserts { publication, slot }));
        }
        if !published.covered {
            return Ok(Some(OutboxProblem::TableNotCovered {
                publication,
                schema,
                table,
            }));
        }
        if let Some(filter) = published.row_filter {
            return Ok(Some(OutboxProblem::RowFilter {
                publication,
                schema,
                table,
                filter,
                slot,
            }));
        }
        if let Some(published_columns) = published.columns {
            let unpublished: Vec<&String> = self
                .columns
                .iter()
                .filter(|c| !published_columns.contains(c))
                .collect();
            if !unpublished.is_empty() {
                // Only columns the table has: an optional column the table
                // lacks is not missing from the publication.
                let existing = catalog::table_columns(client, &schema, &table).await?;
                let missing: Vec<String> = unpublished
                    .into_iter()
                    .filter(|c| existing.iter().any(|(name, _)| name == *c))
                    .cloned()
                    .collect();
                if !missing.is_empty() {
                    return Ok(Some(OutboxProblem::ColumnList {
                        publication,
                        schema,
                        table,
                        missing,
                        slot,
                    }));
                }
            }
        }
        Ok(None)
    }
}
