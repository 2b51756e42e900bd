//! `walrelay tail`: a person's window on the stream.
//!
//! Opens a *temporary* slot, so it can never disturb a real one and leaves
//! nothing behind, and prints every decoded message as one JSON line.

use std::io::Write;

use serde_json::{Map, Value, json};

use crate::lsn::Lsn;
use crate::pgoutput::{ColumnValue, LogicalMessage, OldTuple, StreamDecoder, TupleData};
use crate::relay::relation_cache::RelationCache;
use crate::replication::{
    ConnectionConfig, FeedbackPositions, ReplicationConnection, ReplicationError, ReplicationEvent,
    StartOptions,
};

/// What `tail` needs to know.
#[derive(Clone, Debug)]
pub struct TailOptions {
    pub publications: Vec<String>,
    pub proto_version: Option<u32>,
}

/// Streams until `shutdown` is requested or the server ends the stream,
/// writing one JSON line per message to `out`.
pub async fn tail(
    config: &ConnectionConfig,
    options: &TailOptions,
    out: &mut (dyn Write + Send),
    mut shutdown: crate::shutdown::Shutdown,
) -> Result<(), TailError> {
    let mut conn = ReplicationConnection::connect(config).await?;
    let slot_name = format!("walrelay_tail_{}", std::process::id());
    let slot = conn.create_slot(&slot_name, true).await?;
    tracing::info!(slot = %slot.name, start = %slot.consistent_point, "temporary slot created");
    let mut stream = conn
        .start_replication(&StartOptions {
            slot: slot.name,
            start_lsn: slot.consistent_point,
            publications: options.publications.clone(),
            proto_version: options.proto_version,
            messages: true,
        })
        .await?;

    let mut decoder = StreamDecoder::new();
    let mut relations = RelationCache::new();
    let mut confirmed = slot.consistent_point;
    loop {
        let event = tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            event = stream.recv() => event?,
        };
        match event {
            None => return Ok(()),
            Some(ReplicationEvent::Keepalive {
                reply_requested, ..
            }) => {
                if reply_requested {
                    stream
                        .send_feedback(FeedbackPositions::all(confirmed), false)
                        .await?;
                }
            }
            Some(ReplicationEvent::XLogData {
                wal_start, data, ..
            }) => {
                let message = decoder
                    .decode(&data)
                    .map_err(|error| ReplicationError::Decode {
                        lsn: wal_start,
                        error,
                    })?;
                let line = to_json(wal_start, &message, &mut relations);
                writeln!(out, "{line}")?;
                out.flush()?;
                if let LogicalMessage::Commit(commit) = &message {
                    confirmed = commit.end_lsn;
                    stream
                        .send_feedback(FeedbackPositions::all(confirmed), false)
                        .await?;
                }
            }
        }
    }
    stream.finish().await?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error("cannot write to standard output: {0}")]
    Output(#[from] std::io::Error),
}

/// One message as a JSON object; Relation messages also update `relations`
/// so later rows print their columns by name.
pub fn to_json(lsn: Lsn, message: &LogicalMessage, relations: &mut RelationCache) -> Value {
    let mut obj = Map::new();
    obj.insert("lsn".into(), json!(lsn.to_string()));
    obj.insert("kind".into(), json!(message.kind()));
    let row = |relations: &RelationCache, relation_id: u32, tuple: &TupleData| -> Value {
        match relations.get(relation_id) {
            Some(info) => {
                let mut values = Map::new();
                for (i, value) in tuple.columns.iter().enumerate() {
                    let name = info
                        .columns
                        .get(i)
                        .map(|c| c.name.clone())
                        .unwrap_or_else(|| format!("column_{i}"));
                    values.insert(name, column_json(value));
                }
                Value::Object(values)
            }
            None => Value::Array(tuple.columns.iter().map(column_json).collect()),
        }
    };
    let relation_name = |relations: &RelationCache, id: u32| -> Value {
        relations
            .get(id)
            .map(|r| json!(r.qualified_name()))
            .unwrap_or_else(|| json!(id))
    };
    let mut put = |key: &str, value: Value| {
        obj.insert(key.into(), value);
    };
    match message {
        LogicalMessage::Begin(b) => {
            put("xid", json!(b.xid));
            put("final_lsn", json!(b.final_lsn.to_string()));
            put("commit_time", json!(b.commit_time.to_rfc3339()));
        }
        LogicalMessage::Commit(c) => {
            put("commit_lsn", json!(c.commit_lsn.to_string()));
            put("end_lsn", json!(c.end_lsn.to_string()));
            put("commit_time", json!(c.commit_time.to_rfc3339()));
        }
        LogicalMessage::Origin(o) => {
            put("origin", json!(o.name));
            put("commit_lsn", json!(o.commit_lsn.to_string()));
        }
        LogicalMessage::Relation(r) => {
            let info = relations.update(r);
            put("relation", json!(info.qualified_name()));
            put("relation_id", json!(r.id));
            put(
                "columns",
                Value::Array(
                    r.columns
                        .iter()
                        .map(|c| json!({"name": c.name, "type_oid": c.type_oid, "key": c.is_key}))
                        .collect(),
                ),
            );
        }
        LogicalMessage::Type(t) => {
            put("type", json!(format!("{}.{}", t.namespace, t.name)));
            put("oid", json!(t.oid));
        }
        LogicalMessage::Insert(i) => {
            put("xid", json!(i.xid));
            put("relation", relation_name(relations, i.relation_id));
            put("new", row(relations, i.relation_id, &i.new));
        }
        LogicalMessage::Update(u) => {
            put("xid", json!(u.xid));
            put("relation", relation_name(relations, u.relation_id));
            if let Some(old) = &u.old {
                let (kind, tuple) = old_tuple(old);
                put(kind, row(relations, u.relation_id, tuple));
            }
            put("new", row(relations, u.relation_id, &u.new));
        }
        LogicalMessage::Delete(d) => {
            put("xid", json!(d.xid));
            put("relation", relation_name(relations, d.relation_id));
            let (kind, tuple) = old_tuple(&d.old);
            put(kind, row(relations, d.relation_id, tuple));
        }
        LogicalMessage::Truncate(t) => {
            put(
                "relations",
                Value::Array(
                    t.relation_ids
                        .iter()
                        .map(|id| relation_name(relations, *id))
                        .collect(),
                ),
            );
            put("cascade", json!(t.cascade));
            put("restart_identity", json!(t.restart_identity));
        }
        LogicalMessage::Message(m) => {
            put("xid", json!(m.xid));
            put("transactional", json!(m.transactional));
            put("message_lsn", json!(m.lsn.to_string()));
            put("prefix", json!(m.prefix));
            put("content", bytes_json(&m.content));
        }
        LogicalMessage::StreamStart(s) => {
            put("xid", json!(s.xid));
            put("first_segment", json!(s.first_segment));
        }
        LogicalMessage::StreamStop => {}
        LogicalMessage::StreamCommit(c) => {
            put("xid", json!(c.xid));
            put("end_lsn", json!(c.end_lsn.to_string()));
        }
        LogicalMessage::StreamAbort(a) => {
            put("xid", json!(a.xid));
            put("subtransaction_xid", json!(a.subtransaction_xid));
        }
        LogicalMessage::BeginPrepare(b) => {
            put("xid", json!(b.xid));
            put("gid", json!(b.gid));
        }
        LogicalMessage::Prepare(p) | LogicalMessage::StreamPrepare(p) => {
            put("xid", json!(p.xid));
            put("gid", json!(p.gid));
            put("end_lsn", json!(p.end_lsn.to_string()));
        }
        LogicalMessage::CommitPrepared(c) => {
            put("xid", json!(c.xid));
            put("gid", json!(c.gid));
            put("end_lsn", json!(c.end_lsn.to_string()));
        }
        LogicalMessage::RollbackPrepared(r) => {
            put("xid", json!(r.xid));
            put("gid", json!(r.gid));
        }
    }
    Value::Object(obj)
}

fn old_tuple(old: &OldTuple) -> (&'static str, &TupleData) {
    match old {
        OldTuple::Key(t) => ("old_key", t),
        OldTuple::Full(t) => ("old", t),
    }
}

fn column_json(value: &ColumnValue) -> Value {
    match value {
        ColumnValue::Null => Value::Null,
        ColumnValue::UnchangedToast => json!({"unchanged_toast": true}),
        ColumnValue::Text(t) => bytes_json(t),
        ColumnValue::Binary(b) => json!({"binary_hex": hex(b)}),
    }
}

/// UTF-8 text as a JSON string; anything else as hex.
fn bytes_json(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => json!(text),
        Err(_) => json!({"hex": hex(bytes)}),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
