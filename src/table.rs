//! A table's shape and a row's values, as any source reads them: the WAL
//! relay from Relation and Insert messages (`relay/relation_cache.rs`), the
//! polling source and `replay/` from the catalog and a query. The router
//! takes these, so it depends on no source.

use std::collections::HashMap;

use bytes::Bytes;

/// One column of a row, as sent.
#[derive(Clone, Debug, PartialEq)]
pub enum ColumnValue {
    Null,
    /// A TOASTed value that did not change; its content is not sent.
    UnchangedToast,
    /// The type's text output.
    Text(Bytes),
    /// The type's binary send output (only with the `binary` option).
    Binary(Bytes),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnInfo {
    pub name: String,
    pub type_oid: u32,
    /// Part of the replica identity (normally the primary key).
    pub is_key: bool,
}

/// One table's shape, as last sent by the server.
#[derive(Clone, Debug)]
pub struct RelationInfo {
    /// The table's object id.
    pub id: u32,
    pub schema: String,
    pub table: String,
    pub columns: Vec<ColumnInfo>,
    index_by_name: HashMap<String, usize>,
}

impl RelationInfo {
    /// A table's shape: its columns in order.
    pub fn new(id: u32, schema: String, table: String, columns: Vec<ColumnInfo>) -> Self {
        let index_by_name = columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.clone(), i))
            .collect();
        RelationInfo {
            id,
            schema,
            table,
            columns,
            index_by_name,
        }
    }

    /// A table as the catalog gives it (no relation id): its columns'
    /// names and type oids in order, `key` the one that identifies a row.
    pub fn from_catalog<'a>(
        schema: &str,
        table: &str,
        columns: impl IntoIterator<Item = (&'a str, u32)>,
        key: &str,
    ) -> Self {
        let columns = columns
            .into_iter()
            .map(|(name, type_oid)| ColumnInfo {
                is_key: name == key,
                name: name.to_owned(),
                type_oid,
            })
            .collect();
        RelationInfo::new(0, schema.to_owned(), table.to_owned(), columns)
    }

    /// `schema.table`.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// The position of a column, by name.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.index_by_name.get(name).copied()
    }

    /// Pairs a row's values with this relation so they can be read by name.
    pub fn row<'a>(&'a self, values: &'a [ColumnValue]) -> Result<Row<'a>, RowShapeError> {
        if values.len() != self.columns.len() {
            return Err(RowShapeError {
                relation: self.qualified_name(),
                expected: self.columns.len(),
                got: values.len(),
            });
        }
        Ok(Row {
            relation: self,
            values,
        })
    }
}

/// A row whose column count differs from its relation's: the stream and the
/// cache disagree, which only a protocol bug can cause.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("row of {relation} has {got} columns but its Relation message lists {expected}")]
pub struct RowShapeError {
    pub relation: String,
    pub expected: usize,
    pub got: usize,
}

/// A decoded row, readable by column name.
#[derive(Clone, Copy, Debug)]
pub struct Row<'a> {
    pub relation: &'a RelationInfo,
    values: &'a [ColumnValue],
}

impl<'a> Row<'a> {
    /// The value of a column, or `None` when the relation has no such column.
    pub fn get(&self, name: &str) -> Option<&'a ColumnValue> {
        let index = self.relation.column_index(name)?;
        self.values.get(index)
    }

    /// The column's info and value, in column order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a ColumnInfo, &'a ColumnValue)> + use<'a> {
        self.relation.columns.iter().zip(self.values.iter())
    }
}
