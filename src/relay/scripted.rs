//! A scripted walsender for the relay's in-process tests: it sends what the
//! test pushes and records every status update; and `wire`, pgoutput
//! messages encoded as a walsender sends them.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::session::{Connector, SessionStart, WalStream};
use super::{RelayConfig, RelayError};
use crate::lsn::Lsn;
use crate::publish::LocalBoxFuture;
use crate::replication::{ConnectionConfig, ReplicationError, ReplicationEvent, TimelineHistory};
use crate::timestamp::PgTimestamp;

/// A relay of the default outbox, as the in-process tests and the
/// bench run it (exactly once).
pub fn relay_config() -> RelayConfig {
    RelayConfig {
        pg: ConnectionConfig::from_url("postgres://u@localhost/db").unwrap(),
        slot: "walrelay".into(),
        publication: "walrelay".into(),
        router: crate::router::example_config(),
        max_in_flight_events: 10_000,
        max_in_flight_bytes: 64 << 20,
        status_interval: Duration::from_secs(1),
        shutdown_timeout: Duration::from_secs(30),
        proto_version: None,
        max_backoff: Duration::from_secs(30),
        permanent_error_attempts: 3,
        standby_retry: Duration::from_secs(2),
        broker_stall_timeout: Duration::from_secs(5),
        delivery: super::DeliveryGuarantee::ExactlyOnce,
        exactly_once_lookback: 100_000,
        heartbeat_prefix: "walrelay.heartbeat".into(),
        transactional_id: None,
        dead_letter_table: ("public".into(), "walrelay_dead_letters".into()),
        replication_timeout: Duration::from_secs(30),
        primary: None,
    }
}

/// A walsender the test scripts: it sends what the test pushes and
/// records every status update.
pub struct ScriptedWal {
    events: mpsc::UnboundedReceiver<ReplicationEvent>,
    /// Answers status updates that ask for it, as a walsender does; `None`
    /// for a server that went silent.
    answers: Option<mpsc::UnboundedSender<ReplicationEvent>>,
    feedback: Arc<Mutex<Vec<(Lsn, Instant)>>>,
    finished: Arc<Mutex<bool>>,
}

impl WalStream for ScriptedWal {
    async fn recv(&mut self) -> Result<Option<ReplicationEvent>, ReplicationError> {
        Ok(self.events.recv().await)
    }

    async fn send_feedback(&mut self, flushed: Lsn, reply: bool) -> Result<(), ReplicationError> {
        self.feedback
            .lock()
            .unwrap()
            .push((flushed, Instant::now()));
        if let (true, Some(answers)) = (reply, &self.answers) {
            let _ = answers.send(ReplicationEvent::Keepalive {
                wal_end: flushed,
                send_time: PgTimestamp::now(),
                reply_requested: false,
            });
        }
        Ok(())
    }

    async fn finish(self) -> Result<(), ReplicationError> {
        *self.finished.lock().unwrap() = true;
        Ok(())
    }
}

/// The test's side of the scripted server.
#[derive(Clone, Default)]
pub struct ScriptedServer {
    sessions: Arc<Mutex<VecDeque<ScriptedWal>>>,
    /// Where every connection attempt started: the slot's position then.
    pub starts: Arc<Mutex<Vec<Lsn>>>,
    pub feedback: Arc<Mutex<Vec<(Lsn, Instant)>>>,
    pub finished: Arc<Mutex<bool>>,
    /// The slot's position the next session reports, if set; otherwise,
    /// as a server keeps it, the highest position reported so far.
    pub slot_confirmed: Arc<Mutex<Option<Lsn>>>,
}

impl ScriptedServer {
    /// A session the next connection attempt gets; push events into it.
    pub fn session(&self) -> mpsc::UnboundedSender<ReplicationEvent> {
        self.add_session(true)
    }

    /// A session whose server stops answering (a host gone without a
    /// reset): it sends only what the test pushes.
    pub fn silent_session(&self) -> mpsc::UnboundedSender<ReplicationEvent> {
        self.add_session(false)
    }

    fn add_session(&self, answers: bool) -> mpsc::UnboundedSender<ReplicationEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.sessions.lock().unwrap().push_back(ScriptedWal {
            events: rx,
            answers: answers.then(|| tx.clone()),
            feedback: Arc::clone(&self.feedback),
            finished: Arc::clone(&self.finished),
        });
        tx
    }

    /// The highest LSN reported so far.
    pub fn confirmed(&self) -> Lsn {
        self.feedback
            .lock()
            .unwrap()
            .iter()
            .map(|(lsn, _)| *lsn)
            .max()
            .unwrap_or(Lsn::ZERO)
    }

    pub fn connector(&self) -> ScriptedConnector {
        ScriptedConnector {
            server: self.clone(),
        }
    }
}

pub struct ScriptedConnector {
    server: ScriptedServer,
}

impl Connector for ScriptedConnector {
    type Stream = ScriptedWal;

    fn connect(&mut self) -> LocalBoxFuture<Result<(ScriptedWal, SessionStart), RelayError>> {
        let slot_confirmed = self
            .server
            .slot_confirmed
            .lock()
            .unwrap()
            .unwrap_or_else(|| self.server.confirmed());
        self.server.starts.lock().unwrap().push(slot_confirmed);
        let session = self.server.sessions.lock().unwrap().pop_front();
        Box::pin(async move {
            let stream = session.ok_or(ReplicationError::Closed {
                address: "memory".into(),
            })?;
            Ok((
                stream,
                SessionStart {
                    system_id: "7000".into(),
                    history: TimelineHistory::new(1),
                    slot_confirmed,
                    host: "memory".into(),
                },
            ))
        })
    }
}

/// pgoutput messages, encoded as a walsender sends them (protocol 1).
pub mod wire {
    use super::*;

    fn cstring(out: &mut BytesMut, text: &str) {
        out.put_slice(text.as_bytes());
        out.put_u8(0);
    }

    fn xlog(lsn: u64, body: BytesMut) -> ReplicationEvent {
        ReplicationEvent::XLogData {
            wal_start: Lsn(lsn),
            wal_end: Lsn(lsn),
            send_time: PgTimestamp::now(),
            data: body.freeze(),
        }
    }

    /// The outbox table's Relation message (id 1).
    pub fn outbox_relation(lsn: u64) -> ReplicationEvent {
        let mut b = BytesMut::new();
        b.put_u8(b'R');
        b.put_u32(1);
        cstring(&mut b, "public");
        cstring(&mut b, "outbox");
        b.put_u8(b'd');
        let columns = [
            ("id", 2950u32),
            ("aggregate_type", 25),
            ("aggregate_id", 25),
            ("event_type", 25),
            ("payload", 3802),
            ("headers", 3802),
            ("created_at", 1184),
        ];
        b.put_i16(columns.len() as i16);
        for (name, oid) in columns {
            b.put_u8(u8::from(name == "id"));
            cstring(&mut b, name);
            b.put_u32(oid);
            b.put_i32(-1);
        }
        xlog(lsn, b)
    }

    /// A transaction of outbox rows `(id, aggregate_id, payload)`, its
    /// commit ending at `end_lsn`; the Relation message goes first. Each
    /// row has its own change LSN; an aggregate_id "NULL" is SQL NULL.
    pub fn transaction(end_lsn: u64, rows: &[(&str, &str, &str)]) -> Vec<ReplicationEvent> {
        let commit_lsn = end_lsn - 8;
        let start = end_lsn - 100;
        let time = PgTimestamp::now();
        let mut events = vec![];
        let mut b = BytesMut::new();
        b.put_u8(b'B');
        b.put_u64(commit_lsn);
        b.put_i64(time.0);
        b.put_u32(700);
        events.push(xlog(start, b));
        events.push(outbox_relation(start));
        for (i, (id, key, payload)) in rows.iter().enumerate() {
            let mut b = BytesMut::new();
            b.put_u8(b'I');
            b.put_u32(1);
            b.put_u8(b'N');
            let values = [
                *id,
                "order",
                key,
                "Placed",
                payload,
                "{}",
                "2026-11-25 08:00:00+00",
            ];
            b.put_i16(values.len() as i16);
            for v in values {
                // The key "NULL" is SQL NULL: a row that becomes a dead letter.
                if v == "NULL" {
                    b.put_u8(b'n');
                    continue;
                }
                b.put_u8(b't');
                b.put_i32(v.len() as i32);
                b.put_slice(v.as_bytes());
            }
            events.push(xlog(start + 10 + i as u64, b));
        }
        let mut b = BytesMut::new();
        b.put_u8(b'C');
        b.put_u8(0);
        b.put_u64(commit_lsn);
        b.put_u64(end_lsn);
        b.put_i64(time.0);
        events.push(xlog(commit_lsn, b));
        events
    }

    pub fn keepalive(wal_end: u64, reply_requested: bool) -> ReplicationEvent {
        ReplicationEvent::Keepalive {
            wal_end: Lsn(wal_end),
            send_time: PgTimestamp::now(),
            reply_requested,
        }
    }

    /// A payload of `n` bytes of JSON.
    pub fn payload(n: usize) -> String {
        format!("{{\"pad\": \"{}\"}}", "x".repeat(n.saturating_sub(12)))
    }
}
