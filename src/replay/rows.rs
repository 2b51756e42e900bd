//! The outbox table read in pages, in `(created_at, id)` order, each row
//! routed to the record the stream would have made of its INSERT.
//!
//! `created_at` is the nearest thing to commit order a row carries (its
//! transaction's start time), so an aggregate's events go out in the order
//! they were written, as far as the table can tell. Pages are keyset
//! pages: each starts after the last row of the one before, so a resumed
//! run starts after the last row it had in Kafka, whatever was inserted
//! meanwhile.

use bytes::Bytes;

use crate::catalog::{qualified, quote_ident};
use crate::postgres::quote_literal;
use crate::publish::{ORIGIN_HEADER, POSITION_HEADER, Position};
use crate::record::KafkaRecord;
use crate::router::{ChangeAt, ChangeContext, OutboxColumns, Routed, Router};
use crate::sql::{SqlClient, SqlError};
use crate::table::{ColumnValue, RelationInfo};
use crate::timestamp::PgTimestamp;

use super::ReplayError;

/// Where a page starts: after this row (`created_at` as the server
/// prints it, and the id as text).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct After {
    pub created_at: Option<String>,
    pub id: Option<String>,
}

/// Which rows: a time range of `created_at` and a predicate of the user's.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub since: Option<String>,
    pub until: Option<String>,
    pub predicate: Option<String>,
}

/// One row, routed.
#[derive(Clone, Debug)]
pub struct RoutedRow {
    pub id: String,
    pub created_at: String,
    /// `created_at` in microseconds since 1970.
    pub created_micros: i64,
    pub record: KafkaRecord,
    /// It cannot be an event and goes to the dead-letter topic.
    pub dead_letter: bool,
}

/// An outbox table as a backfill reads it.
pub struct TableReader {
    relation: RelationInfo,
    columns: OutboxColumns,
    selection: Selection,
}

impl TableReader {
    /// Reads the table's shape, and checks the selection against it (a
    /// bad `--where` fails here, with the server's words).
    pub async fn load(
        client: &SqlClient,
        schema: &str,
        table: &str,
        columns: &OutboxColumns,
        selection: Selection,
    ) -> Result<Self, ReplayError> {
        if !crate::catalog::table_exists(client, schema, table).await? {
            return Err(ReplayError::Refused(format!(
                "outbox table {schema}.{table} does not exist: name it with --table schema.table"
            )));
        }
        let shape = crate::catalog::table_column_oids(client, schema, table).await?;
        for needed in [&columns.id, &columns.created_at] {
            if !shape.iter().any(|(name, _)| name == needed) {
                return Err(ReplayError::Refused(format!(
                    "outbox table {schema}.{table} has no column {needed}: rows are read in (created_at, id) order; name the columns with --created-at-column and --id-column"
                )));
            }
        }
        let shape = shape.iter().map(|(name, oid)| (name.as_str(), *oid));
        let relation = RelationInfo::from_catalog(schema, table, shape, &columns.id);
        let reader = TableReader {
            relation,
            columns: columns.clone(),
            selection,
        };
        if let Err(error) = reader.count(client, &After::default()).await {
            return Err(ReplayError::Refused(format!(
                "the selection of rows does not run ({}): check --where, --since and --until (timestamps such as 2026-01-31T00:00:00Z)",
                error.to_string().trim()
            )));
        }
        Ok(reader)
    }

    fn table(&self) -> String {
        qualified(&self.relation.schema, &self.relation.table)
    }

    /// The WHERE clause: the selection, and after `$1`/`$2`.
    fn filter(&self) -> String {
        let created = format!("t.{}", quote_ident(&self.columns.created_at));
        let id = format!("t.{}::text COLLATE \"C\"", quote_ident(&self.columns.id));
        let mut parts = vec![format!(
            "($1::text IS NULL OR ({created}, {id}) > ($1::text::timestamptz, $2::text COLLATE \"C\"))"
        )];
        if let Some(since) = &self.selection.since {
            parts.push(format!(
                "{created} >= {}::timestamptz",
                quote_literal(since)
            ));
        }
        if let Some(until) = &self.selection.until {
            parts.push(format!("{created} < {}::timestamptz", quote_literal(until)));
        }
        if let Some(predicate) = &self.selection.predicate {
            parts.push(format!("({predicate})"));
        }
        parts.join(" AND ")
    }

    /// Rows of the selection after `after`.
    pub async fn count(&self, client: &SqlClient, after: &After) -> Result<i64, SqlError> {
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {} t WHERE {}",
                    self.table(),
                    self.filter()
                ),
                &[&after.created_at, &after.id],
            )
            .await?;
        Ok(row.get(0))
    }

    /// The next `limit` rows after `after`, routed.
    pub async fn page(
        &self,
        client: &SqlClient,
        router: &Router,
        after: &After,
        limit: i64,
    ) -> Result<Vec<RoutedRow>, SqlError> {
        let created = format!("t.{}", quote_ident(&self.columns.created_at));
        let id = format!("t.{}::text", quote_ident(&self.columns.id));
        let values: Vec<String> = self
            .relation
            .columns
            .iter()
            .map(|c| format!("t.{}::text", quote_ident(&c.name)))
            .collect();
        let sql = format!(
            "SELECT {created}::text, {id}, (extract(epoch FROM {created}) * 1000000)::int8, {values}
             FROM {table} t WHERE {filter}
             ORDER BY {created}, {id} COLLATE \"C\" LIMIT $3",
            values = values.join(", "),
            table = self.table(),
            filter = self.filter(),
        );
        let rows = client
            .query(&sql, &[&after.created_at, &after.id, &limit])
            .await?;
        Ok(rows
            .iter()
            .map(|row| {
                let micros: i64 = row.get(2);
                let columns: Vec<ColumnValue> = (0..self.relation.columns.len())
                    .map(|i| match row.get::<_, Option<&str>>(3 + i) {
                        Some(text) => ColumnValue::Text(Bytes::copy_from_slice(text.as_bytes())),
                        None => ColumnValue::Null,
                    })
                    .collect();
                let ctx = ChangeContext {
                    at: ChangeAt::Seq(0),
                    commit_time: PgTimestamp::from_unix_micros(micros),
                };
                let (record, dead_letter) =
                    match router.route_insert(&self.relation, &columns, ctx) {
                        Routed::Event(record) => (record, false),
                        Routed::DeadLetter { record, error } => {
                            tracing::warn!(reason = %error, "unroutable row sent to the dead-letter topic");
                            (record, true)
                        }
                        Routed::Ignored => unreachable!("the table is an outbox table"),
                    };
                RoutedRow {
                    created_at: row.get(0),
                    id: row.get(1),
                    created_micros: micros,
                    record,
                    dead_letter,
                }
            })
            .collect())
    }
}

/// Marks a record as this job's: its origin, and a position from the row's
/// creation time (so it sorts, and prints, as the stream's positions do).
pub fn stamp(record: &mut KafkaRecord, origin: &Bytes, created_micros: u64) {
    let position = Position {
        commit: crate::lsn::Lsn(created_micros),
        change: crate::lsn::Lsn(created_micros),
        rank: 0,
    };
    record
        .headers
        .retain(|(name, _)| name != POSITION_HEADER && name != ORIGIN_HEADER);
    record
        .headers
        .push((POSITION_HEADER.into(), position.to_bytes()));
    record.headers.push((ORIGIN_HEADER.into(), origin.clone()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(selection: Selection) -> TableReader {
        TableReader {
            relation: RelationInfo::new(0, "public".into(), "outbox".into(), Vec::new()),
            columns: OutboxColumns::default(),
            selection,
        }
    }

    #[test]
    fn the_selection_is_the_keyset_start_and_each_given_bound_joined_with_and() {
        let all = reader(Selection::default()).filter();
        assert!(all.starts_with("($1::text IS NULL OR"), "{all}");
        assert!(!all.contains(" AND t."), "{all}");
        let some = reader(Selection {
            since: Some("2026-01-01".into()),
            until: Some("it's".into()),
            predicate: Some("aggregate_type = 'order'".into()),
        })
        .filter();
        assert!(
            some.contains("t.\"created_at\" >= '2026-01-01'::timestamptz"),
            "{some}"
        );
        assert!(
            some.contains("t.\"created_at\" < 'it''s'::timestamptz"),
            "{some}"
        );
        assert!(some.ends_with(" AND (aggregate_type = 'order')"), "{some}");
    }

    #[test]
    fn a_stamp_replaces_any_position_and_origin_with_the_jobs() {
        let mut record = KafkaRecord {
            topic: "t".into(),
            key: None,
            value: None,
            headers: vec![
                (ORIGIN_HEADER.into(), Bytes::from_static(b"old")),
                ("id".into(), Bytes::from_static(b"1")),
            ],
        };
        stamp(&mut record, &Bytes::from_static(b"7/backfill:x/0"), 0x10);
        assert_eq!(record.header(ORIGIN_HEADER).unwrap(), "7/backfill:x/0");
        assert_eq!(
            record.header(POSITION_HEADER).unwrap(),
            "0000000000000010/0000000000000010/0000"
        );
        assert_eq!(record.headers.len(), 3);
    }
}
