//! Shared steps of the end-to-end tests: setup, the slot's position, and
//! the ground truth of commit order read from a twin slot.

use std::time::Duration;

use super::PgCluster;

/// Runs `walrelay setup` with `args` and returns its output lines.
pub fn setup(pg_url: &str, args: &[&str]) -> Vec<String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walrelay"))
        .args(["setup", "--pg-url", pg_url])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "setup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

pub async fn confirmed_flush_lsn(client: &tokio_postgres::Client, slot: &str) -> String {
    client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0)
}

/// Creates the slot `twin` beside the relay's, so `commit_order` can read
/// the same changes as ground truth.
pub async fn create_twin_slot(client: &tokio_postgres::Client) {
    client
        .batch_execute("SELECT pg_create_logical_replication_slot('twin', 'pgoutput')")
        .await
        .unwrap();
}

/// Reads a twin slot with walrelay's own decoder and returns, in commit
/// order, every outbox insert as (id, aggregate_id, commit end LSN).
pub async fn commit_order(
    pg: &PgCluster,
    db: &str,
    slot: &str,
    expected: usize,
) -> Vec<(String, String, walrelay::lsn::Lsn)> {
    use walrelay::pgoutput::{ColumnValue, LogicalMessage, StreamDecoder};
    use walrelay::relation_cache::RelationCache;
    use walrelay::replication::{
        ConnectionConfig, ReplicationConnection, ReplicationEvent, StartOptions,
    };
    let conn = ReplicationConnection::connect(&ConnectionConfig::from_url(&pg.url(db)).unwrap())
        .await
        .unwrap();
    let mut stream = conn
        .start_replication(&StartOptions {
            slot: slot.into(),
            start_lsn: walrelay::lsn::Lsn::ZERO,
            publications: vec!["walrelay".into()],
            proto_version: None,
            messages: false,
        })
        .await
        .unwrap();
    let mut decoder = StreamDecoder::new();
    let mut relations = RelationCache::new();
    let mut pending = Vec::new();
    let mut out = Vec::new();
    let text = |v: Option<&ColumnValue>| match v {
        Some(ColumnValue::Text(t)) => String::from_utf8(t.to_vec()).unwrap(),
        other => panic!("{other:?}"),
    };
    while out.len() < expected {
        let event = tokio::time::timeout(Duration::from_secs(60), stream.recv())
            .await
            .expect("twin slot stalled")
            .unwrap()
            .unwrap();
        if let ReplicationEvent::XLogData { data, .. } = event {
            match decoder.decode(&data).unwrap() {
                LogicalMessage::Relation(r) => {
                    relations.update(&r);
                }
                LogicalMessage::Insert(i) => {
                    let info = relations.get(i.relation_id).unwrap();
                    let row = info.row(&i.new).unwrap();
                    pending.push((text(row.get("id")), text(row.get("aggregate_id"))));
                }
                LogicalMessage::Commit(c) => {
                    out.extend(pending.drain(..).map(|(id, key)| (id, key, c.end_lsn)))
                }
                _ => {}
            }
        }
    }
    out
}
