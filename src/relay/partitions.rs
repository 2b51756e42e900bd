//! Exactly-once routing: each record's partition, chosen by walrelay, and
//! whether the partition already holds it (`crate::ledger` explains why
//! that is enough). A partition's tail is scanned on its first use in a
//! process (or after another relay may have written to it); records for it
//! wait in order meanwhile.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::task::Poll;

use tokio::time::Instant;

use super::publisher::Outgoing;
use crate::ledger::{
    Ledger, LedgerScan, Origin, ScanEnd, ScanRequest, TimelineHistory, partition_for,
};
use crate::lsn::Lsn;
use crate::metrics as m;
use crate::sink::{BrokerError, LocalBoxFuture, Sink};

/// Own records from before the replay's start a scan must see, for event
/// topics (one producer keeps a partition in position order) and for the
/// dead-letter topic (a rejected record's dead letter can land behind up
/// to a window of later ones).
const MARGIN: usize = 100;

/// What scans of this session look for.
#[derive(Clone, Debug)]
pub struct Replay {
    pub origin: Origin,
    pub history: TimelineHistory,
    /// The slot's position this session started from.
    pub start: Lsn,
}

/// Scan settings that do not change.
#[derive(Clone, Debug)]
pub struct ScanSettings {
    pub lookback: usize,
    pub dead_letter_topic: String,
    /// The in-flight window, the dead-letter topic's margin.
    pub window: usize,
}

enum State {
    Scanning(VecDeque<Outgoing>),
    Known(Ledger),
}

/// Where a record goes.
pub enum Route {
    /// To the sink, to `out.partition`.
    Send(Outgoing),
    /// Already in the log.
    Skip(Outgoing),
    /// Queued until its partition's tail is scanned.
    Waiting,
}

type ScanResult = Result<LedgerScan, BrokerError>;

pub struct PartitionLedgers {
    settings: ScanSettings,
    /// `None` while no session has started.
    replay: Option<Replay>,
    states: HashMap<(String, i32), State>,
    scanning: Vec<((String, i32), Instant, LocalBoxFuture<ScanResult>)>,
}

impl PartitionLedgers {
    pub fn new(settings: ScanSettings) -> Self {
        PartitionLedgers {
            settings,
            replay: None,
            states: HashMap::new(),
            scanning: Vec::new(),
        }
    }

    /// A session starts (nothing is in flight then). What was known of the
    /// partitions is dropped and each is scanned again on first use:
    /// another relay may have written to them since, or the history changed.
    pub fn begin(&mut self, replay: Replay) {
        self.states
            .retain(|_, state| matches!(state, State::Scanning(_)));
        self.replay = Some(replay);
    }

    /// Routes a record of a topic with `partitions` partitions.
    pub fn route<S: Sink>(&mut self, sink: &S, mut out: Outgoing, partitions: i32) -> Route {
        let Some(position) = out.ticket.position else {
            return Route::Send(out);
        };
        let partition = partition_for(out.record.key.as_deref(), &position, partitions);
        out.partition = Some(partition);
        let key = (out.record.topic.clone(), partition);
        match self.states.get_mut(&key) {
            Some(State::Known(ledger)) if ledger.contains(&position) => Route::Skip(out),
            Some(State::Known(_)) => Route::Send(out),
            Some(State::Scanning(waiting)) => {
                waiting.push_back(out);
                Route::Waiting
            }
            None => {
                let scan = LedgerScan::new(self.request(&key.0));
                self.scanning.push((
                    key.clone(),
                    Instant::now(),
                    sink.scan_tail(&key.0, partition, scan),
                ));
                self.states
                    .insert(key, State::Scanning(VecDeque::from([out])));
                Route::Waiting
            }
        }
    }

    fn request(&self, topic: &str) -> ScanRequest {
        let replay = self
            .replay
            .clone()
            .expect("records are routed only while a session runs");
        ScanRequest {
            origin: replay.origin,
            history: replay.history,
            start: replay.start,
            margin: if topic == self.settings.dead_letter_topic {
                self.settings.window.max(MARGIN)
            } else {
                MARGIN
            },
            lookback: self.settings.lookback,
        }
    }

    pub fn is_scanning(&self) -> bool {
        !self.scanning.is_empty()
    }

    /// The next scan to finish. Cancel-safe.
    pub async fn next_scanned(&mut self) -> ((String, i32), Instant, ScanResult) {
        poll_fn(|cx| {
            for i in 0..self.scanning.len() {
                if let Poll::Ready(result) = self.scanning[i].2.as_mut().poll(cx) {
                    let (key, started, _) = self.scanning.swap_remove(i);
                    return Poll::Ready((key, started, result));
                }
            }
            Poll::Pending
        })
        .await
    }

    /// A scan finished: the partition's ledger is known; its waiting
    /// records come back, in order, to be routed again.
    pub fn on_scanned(
        &mut self,
        key: (String, i32),
        started: Instant,
        result: ScanResult,
    ) -> VecDeque<Outgoing> {
        let (topic, partition) = (&key.0, key.1);
        let elapsed = started.elapsed().as_secs_f64();
        metrics::histogram!(m::PARTITION_RECOVERY_SECONDS).record(elapsed);
        metrics::counter!(m::PARTITION_RECOVERIES_TOTAL).increment(1);
        let ledger = match result {
            Ok(scan) => {
                let read = scan.read();
                let (ledger, end) = scan.finish();
                tracing::debug!(
                    topic,
                    partition,
                    read,
                    present = ledger.len(),
                    seconds = elapsed,
                    "partition tail scanned"
                );
                if end == ScanEnd::LookbackExceeded {
                    tracing::warn!(
                        topic,
                        partition,
                        read,
                        "the partition's tail holds more records of other sources than the look-back: events not seen in it are published again (at least once)"
                    );
                    metrics::counter!(m::PARTITIONS_AT_LEAST_ONCE_TOTAL, "reason" => "lookback")
                        .increment(1);
                }
                ledger
            }
            Err(error) => {
                tracing::warn!(topic, partition, error = %error, "cannot read the partition's tail: its events are published again (at least once)");
                metrics::counter!(m::PARTITIONS_AT_LEAST_ONCE_TOTAL, "reason" => "unreadable")
                    .increment(1);
                Ledger::default()
            }
        };
        match self.states.insert(key, State::Known(ledger)) {
            Some(State::Scanning(waiting)) => waiting,
            _ => VecDeque::new(),
        }
    }
}
