//! What the live state holds, as the HTTP endpoints show it: where the
//! events come from and what the dashboard names (set once at start), the
//! relay's role, the readings the monitors take (the polling source's
//! backlog, the inbox's partitions), and the counters the page and
//! `/readyz` read. Kept apart from `live.rs`, which writes and samples
//! them, so the shapes served as JSON are in one place.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};

/// A reading older than this is not charted (its monitor fails or stopped).
const STALE: Duration = Duration::from_secs(10);

/// Where the events come from (or, for the inbox, go).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `run`: the replication slot.
    #[default]
    Wal,
    /// `run --source poll`: the outbox table, polled.
    Poll,
    /// `inbox`: Kafka into an inbox table.
    Inbox,
}

/// What the dashboard names in its header, and the limits it draws: set
/// once at start.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Subject {
    /// The slot (WAL), the outbox tables (poll), or the topics and
    /// patterns (inbox).
    pub name: String,
    /// `exactly-once` or `at-least-once`.
    pub delivery: &'static str,
    /// The in-flight window (WAL) or the batch (poll, inbox), in events.
    pub max_in_flight_events: Option<u64>,
    /// The in-flight window, in bytes (WAL).
    pub max_in_flight_bytes: Option<u64>,
    /// The table written: the inbox's.
    pub table: Option<String>,
    /// The inbox's consumer group.
    pub group: Option<String>,
}

/// One reading of the outbox table's backlog (the polling source).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Backlog {
    /// Rows not yet published.
    pub pending_rows: i64,
    /// Of those, rows that failed at least once.
    pub failing_rows: i64,
    /// Age of the oldest row not yet published.
    pub oldest_pending_seconds: Option<f64>,
}

/// The inbox's view of its group: what it holds and how far behind.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct InboxSnapshot {
    pub group: String,
    pub partitions: Vec<InboxPartition>,
    /// Records skipped since start because their id was already stored.
    pub duplicates: u64,
}

/// A partition with no leader whose records wait, and since when.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct HeldPartition {
    pub topic: String,
    pub partition: i32,
    pub since_unix_ms: u64,
}

/// The partitions whose records wait, as the publisher last found them:
/// it writes, the HTTP endpoints read.
#[derive(Clone, Debug, Default)]
pub struct HeldPartitions(std::sync::Arc<std::sync::Mutex<Vec<HeldPartition>>>);

impl HeldPartitions {
    pub fn set(&self, held: Vec<HeldPartition>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = held;
    }

    pub fn get(&self) -> Vec<HeldPartition> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct InboxPartition {
    pub topic: String,
    pub partition: i32,
    /// The next offset to consume; `None` before the first record.
    pub next_offset: Option<i64>,
    /// Records behind the partition's high watermark.
    pub lag: Option<i64>,
}

/// What this relay instance is doing with its slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Not streaming yet, or reconnecting after an error.
    Starting,
    /// Streaming from the slot.
    Active,
    /// Another process holds the slot; this one waits to take over.
    Standby,
}

/// A reading and when it was taken.
#[derive(Debug)]
pub struct Reading<T> {
    value: Option<T>,
    at: Option<Instant>,
}

impl<T: Clone> Reading<T> {
    pub fn set(&mut self, value: Option<T>) {
        self.value = value;
        self.at = Some(Instant::now());
    }

    /// The value, unless it is older than [`STALE`].
    pub fn fresh(&self) -> Option<T> {
        self.at
            .filter(|at| at.elapsed() < STALE)
            .and(self.value.clone())
    }
}

impl<T> Default for Reading<T> {
    fn default() -> Self {
        Reading {
            value: None,
            at: None,
        }
    }
}

/// Live counters the dashboard reads (Prometheus gets the same through the
/// `metrics` crate; these are for the page and `/readyz`).
#[derive(Debug, Default)]
pub struct LiveCounters {
    /// Events delivered where this process delivers them: into Kafka (the
    /// WAL and polling sources) or into the inbox table (the inbox).
    pub events_delivered: AtomicU64,
    pub events_skipped: AtomicU64,
    pub dead_letters: AtomicU64,
    pub in_flight: AtomicU64,
    pub in_flight_bytes: AtomicU64,
    pub reconnects: AtomicU64,
    pub broker_reachable: AtomicBool,
    pub monitor_errors: AtomicU64,
}
