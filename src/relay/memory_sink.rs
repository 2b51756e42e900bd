//! An in-memory broker and a scripted walsender, for testing the relay's
//! loop in-process with tokio's paused time. The broker keeps a real log
//! per partition; the test decides when deliveries are acknowledged, which
//! fail, and which records are too large.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, BytesMut};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::RelayError;
use super::session::{Connector, SessionStart, WalStream};
use crate::ledger::{
    LedgerScan, ORIGIN_HEADER, POSITION_HEADER, Scan, TailRecord, TimelineHistory,
};
use crate::lsn::Lsn;
use crate::pgoutput::PgTimestamp;
use crate::record::KafkaRecord;
use crate::replication::{ReplicationError, ReplicationEvent};
use crate::sink::{
    BrokerError, BrokerErrorClass, Delivery, DeliveryFailure, EventTicket, LocalBoxFuture,
    SendRefused, Sink, TopicError,
};

#[derive(Default)]
struct BrokerState {
    /// Acknowledged records per (topic, partition), in log order.
    logs: HashMap<(String, i32), Vec<KafkaRecord>>,
    /// Partition counts of topics that have more than one.
    partitions: HashMap<String, i32>,
    /// Records sent and not yet acknowledged, in send order.
    held: VecDeque<(KafkaRecord, i32, EventTicket)>,
    paused: bool,
    /// The next deliveries fail with these errors.
    fail_next: VecDeque<BrokerError>,
    /// Records larger than this are refused as too large.
    max_record_bytes: Option<usize>,
    /// Every send, in order.
    sent: usize,
    /// Topics that do not exist and may not be created.
    missing_topics: Vec<String>,
}

/// The test's handle on the in-memory broker.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    state: Arc<Mutex<BrokerState>>,
    deliveries: Arc<Mutex<Option<mpsc::UnboundedSender<Delivery>>>>,
}

impl MemoryBroker {
    pub fn sink(&self) -> MemorySink {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.deliveries.lock().unwrap() = Some(tx);
        MemorySink {
            broker: self.clone(),
            deliveries: rx,
        }
    }

    /// Holds every delivery until `resume` or `release`.
    pub fn pause(&self) {
        self.state.lock().unwrap().paused = true;
    }

    /// Acknowledges everything held, in order, and what comes after.
    pub fn resume(&self) {
        self.state.lock().unwrap().paused = false;
        while !self.state.lock().unwrap().held.is_empty() {
            self.release(0);
        }
    }

    /// Acknowledges (or fails) the `index`-th held record.
    pub fn release(&self, index: usize) {
        let mut state = self.state.lock().unwrap();
        let (record, partition, ticket) = state.held.remove(index).expect("a held record");
        let result = match state.fail_next.pop_front() {
            Some(error) => Err(DeliveryFailure {
                error,
                record: record.clone(),
            }),
            None => match state.max_record_bytes {
                Some(max) if record.size() > max => Err(DeliveryFailure {
                    error: BrokerError {
                        class: BrokerErrorClass::TooLarge,
                        message: "Broker: Message size too large".into(),
                    },
                    record: record.clone(),
                }),
                _ => {
                    state
                        .logs
                        .entry((record.topic.clone(), partition))
                        .or_default()
                        .push(record.clone());
                    Ok(())
                }
            },
        };
        drop(state);
        let delivery = Delivery {
            ticket,
            topic: record.topic,
            result,
        };
        if let Some(tx) = self.deliveries.lock().unwrap().as_ref() {
            let _ = tx.send(delivery);
        }
    }

    pub fn fail_next(&self, error: BrokerError) {
        self.state.lock().unwrap().fail_next.push_back(error);
    }

    /// `topic` does not exist and may not be created.
    pub fn without_topic(&self, topic: &str) {
        self.state
            .lock()
            .unwrap()
            .missing_topics
            .push(topic.to_owned());
    }

    pub fn refuse_records_over(&self, bytes: usize) {
        self.state.lock().unwrap().max_record_bytes = Some(bytes);
    }

    /// Records acknowledged to `topic`, partition after partition.
    pub fn log(&self, topic: &str) -> Vec<KafkaRecord> {
        let state = self.state.lock().unwrap();
        let mut keys: Vec<&(String, i32)> = state.logs.keys().filter(|(t, _)| t == topic).collect();
        keys.sort();
        keys.iter()
            .flat_map(|k| state.logs[*k].iter().cloned())
            .collect()
    }

    /// `topic` has `n` partitions.
    pub fn set_partitions(&self, topic: &str, n: i32) {
        self.state
            .lock()
            .unwrap()
            .partitions
            .insert(topic.to_owned(), n);
    }

    /// Another producer writes `record` to `partition`.
    pub fn append(&self, partition: i32, record: KafkaRecord) {
        self.state
            .lock()
            .unwrap()
            .logs
            .entry((record.topic.clone(), partition))
            .or_default()
            .push(record);
    }

    /// Records handed to the broker and not yet acknowledged.
    pub fn held(&self) -> usize {
        self.state.lock().unwrap().held.len()
    }

    /// Every send so far (retries included).
    pub fn sent(&self) -> usize {
        self.state.lock().unwrap().sent
    }
}

pub struct MemorySink {
    broker: MemoryBroker,
    deliveries: mpsc::UnboundedReceiver<Delivery>,
}

impl Sink for MemorySink {
    fn send(
        &mut self,
        record: KafkaRecord,
        partition: Option<i32>,
        ticket: EventTicket,
    ) -> Result<(), SendRefused> {
        let paused = {
            let mut state = self.broker.state.lock().unwrap();
            state.sent += 1;
            state
                .held
                .push_back((record, partition.unwrap_or(0), ticket));
            state.paused
        };
        if !paused {
            self.broker.release(0);
        }
        Ok(())
    }

    fn deliveries(&mut self) -> &mut mpsc::UnboundedReceiver<Delivery> {
        &mut self.deliveries
    }

    fn prepare_topic(&self, topic: &str) -> LocalBoxFuture<Result<i32, TopicError>> {
        let missing = self
            .broker
            .state
            .lock()
            .unwrap()
            .missing_topics
            .iter()
            .any(|t| t == topic);
        let partitions = self
            .broker
            .state
            .lock()
            .unwrap()
            .partitions
            .get(topic)
            .copied()
            .unwrap_or(1);
        let topic = topic.to_owned();
        Box::pin(async move {
            if missing {
                Err(TopicError::Missing(topic))
            } else {
                Ok(partitions)
            }
        })
    }

    fn scan_tail(
        &self,
        topic: &str,
        partition: i32,
        mut scan: LedgerScan,
    ) -> LocalBoxFuture<Result<LedgerScan, BrokerError>> {
        let log = self
            .broker
            .state
            .lock()
            .unwrap()
            .logs
            .get(&(topic.to_owned(), partition))
            .cloned()
            .unwrap_or_default();
        Box::pin(async move {
            for (offset, record) in log.iter().enumerate().rev() {
                let header = |name: &str| {
                    record
                        .header(name)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                };
                let tail = TailRecord {
                    offset: offset as i64,
                    origin: header(ORIGIN_HEADER),
                    position: header(POSITION_HEADER),
                };
                if scan.push(&tail) == Scan::Enough {
                    break;
                }
            }
            Ok(scan)
        })
    }
}

/// A walsender the test scripts: it sends what the test pushes and
/// records every status update.
pub struct ScriptedWal {
    events: mpsc::UnboundedReceiver<ReplicationEvent>,
    feedback: Arc<Mutex<Vec<(Lsn, Instant)>>>,
    finished: Arc<Mutex<bool>>,
}

impl WalStream for ScriptedWal {
    async fn recv(&mut self) -> Result<Option<ReplicationEvent>, ReplicationError> {
        Ok(self.events.recv().await)
    }

    async fn send_feedback(&mut self, flushed: Lsn, _reply: bool) -> Result<(), ReplicationError> {
        self.feedback
            .lock()
            .unwrap()
            .push((flushed, Instant::now()));
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
    /// The start LSN of every connection attempt.
    pub starts: Arc<Mutex<Vec<Lsn>>>,
    pub feedback: Arc<Mutex<Vec<(Lsn, Instant)>>>,
    pub finished: Arc<Mutex<bool>>,
    /// The slot's confirmed LSN the next session reports.
    pub slot_confirmed: Arc<Mutex<Lsn>>,
}

impl ScriptedServer {
    /// A session the next connection attempt gets; push events into it.
    pub fn session(&self) -> mpsc::UnboundedSender<ReplicationEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.sessions.lock().unwrap().push_back(ScriptedWal {
            events: rx,
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

    fn connect(
        &mut self,
        start: Lsn,
    ) -> LocalBoxFuture<Result<(ScriptedWal, SessionStart), RelayError>> {
        self.server.starts.lock().unwrap().push(start);
        let session = self.server.sessions.lock().unwrap().pop_front();
        let slot_confirmed = *self.server.slot_confirmed.lock().unwrap();
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
