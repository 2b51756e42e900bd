//! Relation metadata from Relation messages, so rows decode by column name.
//!
//! The server sends a Relation message before the first change to a table in
//! a session and again whenever the table's shape changes (ALTER TABLE). The
//! entry is replaced wholesale each time, so a column added, dropped or
//! reordered mid-stream is read by name, correctly, from the next row on.

use std::collections::HashMap;
use std::sync::Arc;

use crate::pgoutput::{Relation, RelationId};
pub use crate::table::{ColumnInfo, RelationInfo, Row, RowShapeError};

impl RelationInfo {
    /// The shape a Relation message gives.
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
        RelationInfo::new(
            relation.id,
            relation.namespace.clone(),
            relation.name.clone(),
            columns,
        )
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
    use crate::pgoutput::{Column, ColumnValue, ReplicaIdentity, TupleData};
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
        let row = info.row(&tuple.columns).unwrap();
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
        let row = info.row(&tuple.columns).unwrap();
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
        let err = info.row(&tuple.columns).unwrap_err();
        assert_eq!(err.expected, 2);
        assert_eq!(err.got, 1);
    }
}
