//! Relation metadata from Relation messages, so rows decode by column name.
//!
//! The server sends a Relation message before the first change to a table in
//! a session and again whenever the table's shape changes (ALTER TABLE). The
//! entry is replaced wholesale each time, so a column added, dropped or
//! reordered mid-stream is read by name, correctly, from the next row on.

use std::collections::HashMap;
use std::sync::Arc;

use crate::pgoutput::{ColumnValue, Relation, RelationId, TupleData, TypeOid};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnInfo {
    pub name: String,
    pub type_oid: TypeOid,
    /// Part of the replica identity (normally the primary key).
    pub is_key: bool,
}

/// One table's shape, as last sent by the server.
#[derive(Clone, Debug)]
pub struct RelationInfo {
    pub id: RelationId,
    pub schema: String,
    pub table: String,
    pub columns: Vec<ColumnInfo>,
    index_by_name: HashMap<String, usize>,
}

impl RelationInfo {
    pub fn from_message(relation: &Relation) -> Self {
        let columns: Vec<ColumnInfo> = relation
            .columns
            .iter()
            .map(|c| ColumnInfo {
                name: c.name.clone(),
                type_oid: c.type_oid,
                is_key: c.is_key,
            })
            .collect();
        let index_by_name = columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.clone(), i))
            .collect();
        RelationInfo {
            id: relation.id,
            schema: relation.namespace.clone(),
            table: relation.name.clone(),
            columns,
            index_by_name,
        }
    }

    /// `schema.table`.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// The position of a column, by name.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.index_by_name.get(name).copied()
    }

    /// Pairs a tuple with this relation so its values can be read by name.
    pub fn row<'a>(&'a self, tuple: &'a TupleData) -> Result<Row<'a>, RowShapeError> {
        if tuple.columns.len() != self.columns.len() {
            return Err(RowShapeError {
                relation: self.qualified_name(),
                expected: self.columns.len(),
                got: tuple.columns.len(),
            });
        }
        Ok(Row {
            relation: self,
            tuple,
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
    tuple: &'a TupleData,
}

impl<'a> Row<'a> {
    /// The value of a column, or `None` when the relation has no such column.
    pub fn get(&self, name: &str) -> Option<&'a ColumnValue> {
        let index = self.relation.column_index(name)?;
        self.tuple.columns.get(index)
    }

    /// The column's info and value, in column order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a ColumnInfo, &'a ColumnValue)> + use<'a> {
        self.relation.columns.iter().zip(self.tuple.columns.iter())
    }
}

/// Relation id to the relation's latest shape.
#[derive(Debug, Default)]
pub struct RelationCache {
    relations: HashMap<RelationId, Arc<RelationInfo>>,
}

impl RelationCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records (or replaces) a relation's shape.
    pub fn update(&mut self, relation: &Relation) -> Arc<RelationInfo> {
        let info = Arc::new(RelationInfo::from_message(relation));
        self.relations.insert(relation.id, Arc::clone(&info));
        info
    }

    pub fn get(&self, id: RelationId) -> Option<&Arc<RelationInfo>> {
        self.relations.get(&id)
    }

    pub fn len(&self) -> usize {
        self.relations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.relations.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::{Column, ReplicaIdentity};
    use bytes::Bytes;

    fn relation(columns: &[&str]) -> Relation {
        Relation {
            xid: None,
            id: 16384,
            namespace: "public".into(),
            name: "outbox".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: columns
                .iter()
                .map(|name| Column {
                    is_key: *name == "id",
                    name: (*name).into(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    fn text(s: &'static str) -> ColumnValue {
        ColumnValue::Text(Bytes::from_static(s.as_bytes()))
    }

    #[test]
    fn row_values_are_read_by_column_name() {
        let mut cache = RelationCache::new();
        let info = cache.update(&relation(&["id", "payload"]));
        let tuple = TupleData {
            columns: vec![text("1"), text("{}")],
        };
        let row = info.row(&tuple).unwrap();
        assert_eq!(row.get("payload"), Some(&text("{}")));
        assert_eq!(row.get("missing"), None);
        assert!(info.columns[0].is_key);
    }

    #[test]
    fn resent_relation_replaces_the_old_shape() {
        let mut cache = RelationCache::new();
        cache.update(&relation(&["id", "payload"]));
        cache.update(&relation(&["id", "tenant", "payload"]));
        let info = cache.get(16384).unwrap();
        let tuple = TupleData {
            columns: vec![text("1"), text("acme"), text("{}")],
        };
        let row = info.row(&tuple).unwrap();
        assert_eq!(row.get("payload"), Some(&text("{}")));
        assert_eq!(row.get("tenant"), Some(&text("acme")));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn row_with_wrong_column_count_is_an_error() {
        let info = RelationInfo::from_message(&relation(&["id", "payload"]));
        let tuple = TupleData {
            columns: vec![text("1")],
        };
        let err = info.row(&tuple).unwrap_err();
        assert_eq!(err.expected, 2);
        assert_eq!(err.got, 1);
    }
}
