//! The in-memory broker's producer side: the `Sink` the publisher writes
//! through, with transactional ids, epochs and fencing.

use std::collections::{HashMap, VecDeque};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{BrokerState, Held, MemoryBroker};
use crate::publish::position::{ORIGIN_HEADER, POSITION_HEADER};
use crate::publish::publisher::CLEANUP_HEADER;
use crate::publish::scan::{LedgerScan, Scan, TailRecord};
use crate::publish::sink::{
    BrokerError, BrokerErrorClass, Delivery, LocalBoxFuture, SendId, SendRefused, Sink, TopicError,
};
use crate::record::KafkaRecord;

pub struct MemorySink {
    pub(super) broker: MemoryBroker,
    pub(super) index: usize,
    pub(super) deliveries: mpsc::UnboundedReceiver<Delivery>,
    pub(super) transactional: bool,
    /// Each transactional id this sink took over: its epoch and open
    /// transaction.
    pub(super) producers: HashMap<String, Producer>,
    /// The id records go through now.
    pub(super) current: Option<String>,
}

pub(super) struct Producer {
    epoch: u32,
    txn: Option<u64>,
}

impl MemorySink {
    fn holder(&self) -> Option<(String, u32)> {
        let id = self.current.as_ref()?;
        Some((id.clone(), self.producers.get(id)?.epoch))
    }

    fn txn(&self) -> Option<u64> {
        self.current
            .as_ref()
            .and_then(|id| self.producers.get(id))
            .and_then(|p| p.txn)
    }

    /// Whether another sink took this one's transactional id over.
    fn fenced(&self, state: &BrokerState) -> bool {
        self.holder()
            .as_ref()
            .is_some_and(|(id, epoch)| state.epochs.get(id) != Some(epoch))
    }
}

pub(super) fn fenced_error() -> BrokerError {
    BrokerError {
        class: BrokerErrorClass::Fenced,
        message: "Broker: Producer fenced by a newer instance".into(),
    }
}

fn purged_error() -> BrokerError {
    BrokerError {
        class: BrokerErrorClass::Abortable,
        message: "Local: Purged in queue".into(),
    }
}

impl Sink for MemorySink {
    fn transactional(&self) -> bool {
        self.transactional
    }

    fn send(
        &mut self,
        record: &KafkaRecord,
        partition: Option<i32>,
        send: SendId,
    ) -> Result<(), SendRefused> {
        let txn = self.txn();
        let release = {
            let mut state = self.broker.state.lock().unwrap();
            if self.transactional && (txn.is_none() || self.fenced(&state)) {
                return Err(SendRefused::Rejected(fenced_error()));
            }
            let partition = partition.unwrap_or(0);
            if let Some(txn) = txn {
                state
                    .touched
                    .entry(txn)
                    .or_default()
                    .insert((record.topic.clone(), partition));
            }
            state.sent += 1;
            let held = Held {
                record: record.clone(),
                partition,
                send,
                sink: self.index,
                txn,
                holder: self.holder(),
            };
            let release = !state.paused && state.writable(&held);
            state.held.push_back(held);
            release
        };
        if release {
            let last = self.broker.held() - 1;
            self.broker.release(last);
        }
        Ok(())
    }

    fn poll_delivery(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.deliveries.poll_recv(cx)
    }

    fn prepare_topic(&self, topic: &str, _create: bool) -> LocalBoxFuture<Result<i32, TopicError>> {
        let state = self.broker.state.lock().unwrap();
        let missing = state.missing_topics.iter().any(|t| t == topic);
        let partitions = state.partitions.get(topic).copied().unwrap_or(1);
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
        let state = self.broker.state.lock().unwrap();
        if state.offline.contains(&(topic.to_owned(), partition)) {
            // As Kafka: no leader to fetch from.
            return Box::pin(async {
                Err(BrokerError {
                    class: BrokerErrorClass::Transient,
                    message: "Local: Unknown partition (no leader)".into(),
                })
            });
        }
        let hidden = state.left_open.contains_key(&(topic.to_owned(), partition));
        // What the open transaction hides, as a read_uncommitted reader
        // sees it (cleanup records left out).
        let hidden_records: Vec<TailRecord> = state
            .open_from
            .get(&(topic.to_owned(), partition))
            .and_then(|from| {
                let log = state.logs.get(&(topic.to_owned(), partition))?;
                Some(
                    log.iter()
                        .enumerate()
                        .skip(*from)
                        .filter(|(_, l)| l.record.header(CLEANUP_HEADER).is_none())
                        .map(|(offset, l)| tail_record(offset, &l.record))
                        .collect(),
                )
            })
            .unwrap_or_default();
        let log: Vec<(usize, KafkaRecord)> = state
            .logs
            .get(&(topic.to_owned(), partition))
            .map(|log| {
                log.iter()
                    .enumerate()
                    .filter(|(_, l)| state.visible(l))
                    .map(|(offset, l)| (offset, l.record.clone()))
                    .collect()
            })
            .unwrap_or_default();
        drop(state);
        Box::pin(async move {
            if hidden {
                scan.hidden_by_open_transaction();
                scan.hidden_records(&hidden_records);
            }
            for (offset, record) in log.iter().rev() {
                if scan.push(&tail_record(*offset, record)) == Scan::Enough {
                    break;
                }
            }
            Ok(scan)
        })
    }

    fn leaderless(
        &self,
        partitions: Vec<(String, i32)>,
    ) -> LocalBoxFuture<Result<Vec<(String, i32)>, BrokerError>> {
        let state = self.broker.state.lock().unwrap();
        let leaderless = partitions
            .into_iter()
            .filter(|p| state.offline.contains(p))
            .collect();
        Box::pin(async move { Ok(leaderless) })
    }

    fn init(&mut self, transactional_id: &str) -> LocalBoxFuture<Result<(), BrokerError>> {
        // The takeover waits while the id's last transaction cannot end.
        let broker = self.broker.clone();
        let id = transactional_id.to_owned();
        let epoch = {
            let mut state = broker.state.lock().unwrap();
            let epoch = state.epochs.get(&id).map_or(0, |e| e + 1);
            // The previous holder is fenced: its open transaction never
            // commits (its records stay invisible) and what it still sends
            // is refused.
            state.epochs.insert(id.clone(), epoch);
            epoch
        };
        self.producers
            .insert(id.clone(), Producer { epoch, txn: None });
        self.current = Some(id.clone());
        Box::pin(async move {
            while broker.is_blocked(&id) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(())
        })
    }

    fn switch_to(&mut self, transactional_id: &str) {
        // The publisher only ever switches to an id it took over and did
        // not abandon: records sent through another producer than the one
        // that commits would be lost with its transaction.
        assert!(
            self.producers.contains_key(transactional_id),
            "switched to {transactional_id}, which this sink does not hold"
        );
        self.current = Some(transactional_id.to_owned());
    }

    fn abandon(&mut self, transactional_id: &str) {
        let Some(producer) = self.producers.remove(transactional_id) else {
            return;
        };
        // What it held is purged, reported as such, and never committed.
        let mut state = self.broker.state.lock().unwrap();
        let (purged, kept): (VecDeque<Held>, VecDeque<Held>) = std::mem::take(&mut state.held)
            .into_iter()
            .partition(|h| h.sink == self.index && h.txn.is_some() && h.txn == producer.txn);
        state.held = kept;
        for held in purged {
            let _ = state.deliveries[held.sink].send(Delivery {
                send: held.send,
                result: Err(purged_error()),
            });
        }
        state.end(Some(transactional_id), producer.txn);
    }

    fn begin(&mut self) -> Result<(), BrokerError> {
        let mut state = self.broker.state.lock().unwrap();
        if self.fenced(&state) {
            return Err(fenced_error());
        }
        state.next_txn += 1;
        let txn = state.next_txn;
        if let Some(producer) = self
            .current
            .as_ref()
            .and_then(|id| self.producers.get_mut(id))
        {
            producer.txn = Some(txn);
        }
        Ok(())
    }

    fn send_lingering(&mut self) {
        // Records here wait for the test's acknowledgement, not a linger:
        // the call is only noted.
        if let Some(id) = &self.current {
            let mut state = self.broker.state.lock().unwrap();
            state.sent_lingering.push(id.clone());
        }
    }

    fn commit(&mut self) -> LocalBoxFuture<Result<(), BrokerError>> {
        let broker = self.broker.clone();
        let holder = self.holder();
        let mut txn = self.take_txn();
        {
            let mut state = broker.state.lock().unwrap();
            state.commits_waiting += 1;
            // A commit again after one failed transiently: the same
            // transaction.
            if let (None, Some((id, _))) = (txn, &holder) {
                txn = state.retry_commit.remove(id);
            }
        }
        Box::pin(async move {
            loop {
                {
                    let mut state = broker.state.lock().unwrap();
                    let fenced = holder
                        .as_ref()
                        .is_some_and(|(id, epoch)| state.epochs.get(id) != Some(epoch));
                    if fenced {
                        state.commits_waiting -= 1;
                        return Err(fenced_error());
                    }
                    // A commit flushes: it waits for its records (and for
                    // the test, while it holds commits).
                    let passes = !state.commits_held || state.commit_passes > 0;
                    if passes && !state.held.iter().any(|h| h.txn == txn) {
                        if state.commits_held {
                            state.commit_passes -= 1;
                        }
                        state.commits_waiting -= 1;
                        if let Some(error) = state.commit_failures.pop_front() {
                            // Not committed: its records stay invisible;
                            // a transient failure may be committed again.
                            if error.class == BrokerErrorClass::Transient {
                                if let (Some((id, _)), Some(t)) = (&holder, txn) {
                                    state.retry_commit.insert(id.clone(), t);
                                }
                            }
                            return Err(error);
                        }
                        if let Some(txn) = txn {
                            state.committed.insert(txn);
                        }
                        let id = holder.as_ref().map(|(id, _)| id.as_str());
                        state.end(id, txn);
                        return Ok(());
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    }

    fn abort(&mut self) -> LocalBoxFuture<Result<(), BrokerError>> {
        let holder = self.holder();
        let txn = self.take_txn();
        let mut state = self.broker.state.lock().unwrap();
        // Records not yet written are purged, and reported so.
        let (purged, kept): (VecDeque<Held>, VecDeque<Held>) = std::mem::take(&mut state.held)
            .into_iter()
            .partition(|h| txn.is_some() && h.txn == txn);
        state.held = kept;
        for held in purged {
            let _ = state.deliveries[held.sink].send(Delivery {
                send: held.send,
                result: Err(purged_error()),
            });
        }
        let id = holder.as_ref().map(|(id, _)| id.as_str());
        state.abort_ends_left_open(id, txn);
        state.end(id, txn);
        Box::pin(async { Ok(()) })
    }
}

impl MemorySink {
    /// Ends the current producer's transaction on the client's side.
    fn take_txn(&mut self) -> Option<u64> {
        self.current
            .as_ref()
            .and_then(|id| self.producers.get_mut(id))
            .and_then(|p| p.txn.take())
    }
}

/// What a tail scan reads of a logged record.
fn tail_record(offset: usize, record: &KafkaRecord) -> TailRecord {
    let header = |name: &str| {
        record
            .header(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    TailRecord {
        offset: offset as i64,
        origin: header(ORIGIN_HEADER),
        position: header(POSITION_HEADER),
    }
}
