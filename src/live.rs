//! The process's live state, shared with the HTTP endpoints (`/readyz`,
//! the dashboard): whether it streams and from which host, what it
//! confirmed, its errors, and an hour of history. Written by the relay (or
//! the polling source, or the inbox), the monitors and the sampler; read by
//! the HTTP server. Nothing reads it back to decide anything.
//!
//! The sampler ([`spawn_sampler`]) turns the readings into one
//! [`Sample`] a second in the [`History`] ring; state changes are recorded
//! the moment they happen, by the setters.

mod delivered;
mod errors;
mod history;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use crate::catalog::SlotSnapshot;
use crate::lsn::Lsn;
use crate::metrics as m;
pub use delivered::Delivered;
pub use errors::{ErrorLog, ErrorRecord, Recovery};
pub use history::{CAPACITY, History, INTERVAL, MAX_PARTITIONS, Sample, State, Transition};

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
struct Reading<T> {
    value: Option<T>,
    at: Option<Instant>,
}

impl<T: Clone> Reading<T> {
    fn set(&mut self, value: Option<T>) {
        self.value = value;
        self.at = Some(Instant::now());
    }

    /// The value, unless it is older than [`STALE`].
    fn fresh(&self) -> Option<T> {
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

/// Counts since start at the last sample, for the sample's per-interval
/// counts.
#[derive(Debug, Default)]
struct Totals {
    published: u64,
    dead_letters: u64,
    skipped: u64,
}

#[derive(Debug)]
pub struct LiveState {
    connected: AtomicBool,
    /// Connected at least once: not connected now means reconnecting.
    was_connected: AtomicBool,
    role: Mutex<Role>,
    /// The PostgreSQL host streaming, while connected.
    host: Mutex<Option<String>>,
    /// The relay let go of the slot because the broker does not answer.
    waiting_for_broker: AtomicBool,
    confirmed: AtomicU64,
    last_ack_unix_micros: AtomicU64,
    errors: ErrorLog,
    slot: Mutex<Reading<SlotSnapshot>>,
    /// `max_slot_wal_keep_size` in bytes; `None` when -1 (unlimited).
    wal_keep_limit: Mutex<Option<i64>>,
    source: Source,
    backlog: Mutex<Reading<Backlog>>,
    /// The inbox's consumer lag, summed over its partitions.
    consumer_lag: Mutex<Option<i64>>,
    inbox: Mutex<Option<InboxSnapshot>>,
    totals: Mutex<Totals>,
    /// The most in flight since the last sample: a batch that comes and
    /// goes between two samples still shows.
    in_flight_peak: AtomicU64,
    in_flight_bytes_peak: AtomicU64,
    pub counters: LiveCounters,
    pub latency: LatencyWindow,
    /// Every commit-to-ack latency since start.
    pub latency_histogram: LatencyHistogram,
    /// The polling source's claims and settles since the last sample.
    pub claim_time: IntervalTimer,
    pub settle_time: IntervalTimer,
    pub history: History,
}

impl Default for LiveState {
    fn default() -> Self {
        LiveState {
            connected: AtomicBool::new(false),
            was_connected: AtomicBool::new(false),
            role: Mutex::new(Role::Starting),
            host: Mutex::new(None),
            waiting_for_broker: AtomicBool::new(false),
            confirmed: AtomicU64::new(0),
            last_ack_unix_micros: AtomicU64::new(0),
            errors: ErrorLog::default(),
            slot: Mutex::new(Reading::default()),
            wal_keep_limit: Mutex::new(None),
            source: Source::Wal,
            backlog: Mutex::new(Reading::default()),
            consumer_lag: Mutex::new(None),
            inbox: Mutex::new(None),
            totals: Mutex::new(Totals::default()),
            in_flight_peak: AtomicU64::new(0),
            in_flight_bytes_peak: AtomicU64::new(0),
            counters: LiveCounters::default(),
            latency: LatencyWindow::default(),
            latency_histogram: LatencyHistogram::default(),
            claim_time: IntervalTimer::default(),
            settle_time: IntervalTimer::default(),
            history: History::default(),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Now, in Unix milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl LiveState {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_source(source: Source) -> Self {
        LiveState {
            source,
            ..Self::default()
        }
    }

    pub fn source(&self) -> Source {
        self.source
    }

    pub fn set_backlog(&self, backlog: Option<Backlog>) {
        lock(&self.backlog).set(backlog);
    }

    /// The polling source's last backlog reading, unless it is stale.
    pub fn backlog(&self) -> Option<Backlog> {
        lock(&self.backlog).fresh()
    }

    pub fn set_inbox(&self, inbox: Option<InboxSnapshot>) {
        *lock(&self.inbox) = inbox;
    }

    pub fn inbox(&self) -> Option<InboxSnapshot> {
        lock(&self.inbox).clone()
    }

    pub fn set_consumer_lag(&self, lag: Option<i64>) {
        *lock(&self.consumer_lag) = lag;
    }

    pub fn consumer_lag(&self) -> Option<i64> {
        *lock(&self.consumer_lag)
    }

    /// Events (rows, records) handed on and not yet settled, and their
    /// bytes.
    pub fn record_in_flight(&self, events: usize, bytes: usize) {
        if self.source != Source::Wal {
            // The WAL relay's window exports these itself.
            metrics::gauge!(m::EVENTS_IN_FLIGHT).set(events as f64);
            metrics::gauge!(m::BYTES_IN_FLIGHT).set(bytes as f64);
        }
        let (events, bytes) = (events as u64, bytes as u64);
        self.counters.in_flight.store(events, Ordering::Relaxed);
        self.counters
            .in_flight_bytes
            .store(bytes, Ordering::Relaxed);
        self.in_flight_peak.fetch_max(events, Ordering::Relaxed);
        self.in_flight_bytes_peak
            .fetch_max(bytes, Ordering::Relaxed);
    }

    /// An event was not sent again: its partition holds it (exactly once).
    pub fn record_skipped(&self) {
        self.counters.events_skipped.fetch_add(1, Ordering::Relaxed);
    }

    /// The polling source claimed a batch in `took`.
    pub fn record_claim(&self, took: Duration) {
        metrics::histogram!(m::POLL_CLAIM_SECONDS).record(took.as_secs_f64());
        self.claim_time.record(took);
    }

    /// The polling source settled a batch (deleted or marked its rows and
    /// committed) in `took`.
    pub fn record_settle(&self, took: Duration) {
        metrics::histogram!(m::POLL_SETTLE_SECONDS).record(took.as_secs_f64());
        self.settle_time.record(took);
    }

    /// Adds a point to the history, from the latest readings. The sampler
    /// calls it once a second.
    pub fn record_sample(&self) {
        let now = unix_ms();
        let state = self.state();
        if state == State::Active
            && !self.waiting_for_broker()
            && self.counters.broker_reachable.load(Ordering::Relaxed)
        {
            self.errors.recovered_if_quiet(now);
        }
        let slot = self.slot();
        let backlog = self.backlog();
        let inbox = self.inbox();
        let c = &self.counters;
        let now_totals = Totals {
            published: c.events_delivered.load(Ordering::Relaxed),
            dead_letters: c.dead_letters.load(Ordering::Relaxed),
            skipped: match self.source {
                Source::Inbox => inbox.as_ref().map_or(0, |i| i.duplicates),
                _ => c.events_skipped.load(Ordering::Relaxed),
            },
        };
        let delta = {
            let mut totals = lock(&self.totals);
            let delta =
                |now: u64, before: u64| now.saturating_sub(before).min(u64::from(u32::MAX)) as u32;
            let d = (
                delta(now_totals.published, totals.published),
                delta(now_totals.dead_letters, totals.dead_letters),
                delta(now_totals.skipped, totals.skipped),
            );
            *totals = now_totals;
            d
        };
        let latency = self.latency.take_interval();
        let (claim_ms, claim_max_ms) = self.claim_time.take();
        let (settle_ms, settle_max_ms) = self.settle_time.take();
        let bytes = |v: Option<i64>| v.map_or(f64::NAN, |v| v as f64);
        let sample = Sample {
            unix_ms: now,
            state,
            lag_bytes: bytes(slot.as_ref().and_then(|s| s.lag_bytes)),
            retained_wal_bytes: bytes(slot.as_ref().and_then(|s| s.retained_wal_bytes)),
            safe_wal_bytes: bytes(slot.as_ref().and_then(|s| s.safe_wal_size)),
            published: delta.0,
            dead_lettered: delta.1,
            skipped: delta.2,
            in_flight_events: peak(&self.in_flight_peak, &c.in_flight).min(u64::from(u32::MAX))
                as u32,
            in_flight_bytes: peak(&self.in_flight_bytes_peak, &c.in_flight_bytes) as f64,
            p50_ms: latency.p50_ms,
            p99_ms: latency.p99_ms,
            pending_rows: bytes(backlog.as_ref().map(|b| b.pending_rows)),
            oldest_pending_seconds: backlog
                .as_ref()
                .and_then(|b| b.oldest_pending_seconds)
                .map_or(f32::NAN, |v| v as f32),
            claim_ms,
            claim_max_ms,
            settle_ms,
            settle_max_ms,
            consumer_lag: bytes(self.consumer_lag()),
        };
        let partitions: Vec<(String, Option<i64>)> = inbox
            .map(|i| {
                i.partitions
                    .into_iter()
                    .map(|p| (format!("{}/{}", p.topic, p.partition), p.lag))
                    .collect()
            })
            .unwrap_or_default();
        self.history.push(sample, &partitions);
        for s in State::ALL {
            metrics::gauge!(m::STATE, "state" => s.as_str()).set(if s == state {
                1.0
            } else {
                0.0
            });
        }
    }

    /// What the process is doing now.
    pub fn state(&self) -> State {
        if self.waiting_for_broker() {
            State::WaitingForBroker
        } else if self.connected() {
            State::Active
        } else if self.role() == Role::Standby {
            State::Standby
        } else if self.was_connected.load(Ordering::Relaxed) || self.errors.any_current() {
            State::Reconnecting
        } else {
            State::Starting
        }
    }

    /// Records the state in the history if it changed.
    fn note_state(&self) {
        self.history.note_state(unix_ms(), self.state());
    }

    pub fn set_connected(&self, connected: bool) {
        let was = self.connected.swap(connected, Ordering::Relaxed);
        if connected {
            self.was_connected.store(true, Ordering::Relaxed);
            if !was {
                self.errors.recovered(Recovery::Reconnected, unix_ms());
            }
            self.set_role(Role::Active);
        }
        self.note_state();
    }

    pub fn set_role(&self, role: Role) {
        *lock(&self.role) = role;
        self.note_state();
    }

    pub fn role(&self) -> Role {
        *lock(&self.role)
    }

    /// The broker acknowledged nothing for the stall timeout (or answers
    /// again): an error that holds until it answers.
    pub fn set_waiting_for_broker(&self, waiting: bool) {
        let was = self.waiting_for_broker.swap(waiting, Ordering::Relaxed);
        match (was, waiting) {
            (false, true) => self.errors.report(
                match self.source {
                    Source::Poll => "the broker acknowledged nothing for --broker-stall-timeout: the batch stays claimed and nothing new is claimed until it answers",
                    Source::Wal => "the broker acknowledged nothing for --broker-stall-timeout: the slot is let go (PostgreSQL is not held) until it answers",
                    Source::Inbox => "the broker does not answer: nothing is consumed until it does (the stored offsets stay where they are)",
                },
                unix_ms(),
            ),
            (true, false) => self.errors.recovered(Recovery::BrokerAnswered, unix_ms()),
            _ => {}
        }
        self.note_state();
    }

    pub fn waiting_for_broker(&self) -> bool {
        self.waiting_for_broker.load(Ordering::Relaxed)
    }

    /// Why the relay is not streaming, for people: `None` while it streams.
    pub fn reason(&self) -> Option<String> {
        if self.waiting_for_broker() {
            // Checked before `connected`: the WAL relay says it waits as it
            // starts letting go of the slot, before the session has ended.
            return Some(match self.source {
                Source::Poll => "waiting for the broker: nothing was acknowledged for --broker-stall-timeout, so walrelay holds the batch it claimed and claims nothing new; it polls again once the broker answers",
                Source::Inbox => "waiting for the broker: it does not answer, so nothing is consumed; the inbox goes on from its stored offsets once it does",
                Source::Wal => "waiting for the broker: nothing was acknowledged for --broker-stall-timeout, so walrelay let go of the slot (PostgreSQL is not held); it streams again once the broker answers",
            }
            .to_owned());
        }
        if self.connected() {
            return None;
        }
        Some(match self.role() {
            Role::Standby => "standing by: another relay holds the slot".to_owned(),
            _ => match self.last_error() {
                Some(error) => format!("reconnecting after: {error}"),
                None => "starting".to_owned(),
            },
        })
    }

    pub fn set_host(&self, host: Option<String>) {
        *lock(&self.host) = host;
    }

    /// The PostgreSQL host streaming, while connected.
    pub fn host(&self) -> Option<String> {
        lock(&self.host).clone()
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn set_confirmed(&self, lsn: Lsn) {
        self.confirmed.store(lsn.0, Ordering::Relaxed);
    }

    pub fn confirmed(&self) -> Lsn {
        Lsn(self.confirmed.load(Ordering::Relaxed))
    }

    /// An event was acknowledged (stored): while connected, whatever went
    /// wrong before is over.
    pub fn record_ack(&self) {
        let now = crate::pgoutput::PgTimestamp::now().unix_micros();
        self.last_ack_unix_micros
            .store(now.max(0) as u64, Ordering::Relaxed);
        if self.errors.any_current() && self.connected() && !self.waiting_for_broker() {
            self.errors
                .recovered(Recovery::Acknowledged, now.max(0) as u64 / 1000);
        }
    }

    /// Unix time in microseconds of the last acknowledged event (0: none yet).
    pub fn last_ack_unix_micros(&self) -> u64 {
        self.last_ack_unix_micros.load(Ordering::Relaxed)
    }

    /// Reports an error: it holds until the process shows it recovered.
    pub fn set_last_error(&self, error: &str) {
        self.errors.report(error, unix_ms());
        self.note_state();
    }

    /// The newest error's message, whether it holds or not.
    pub fn last_error(&self) -> Option<String> {
        self.errors.last().map(|e| e.message)
    }

    /// The errors kept, newest first, each with its times and whether it
    /// still holds.
    pub fn errors(&self) -> Vec<ErrorRecord> {
        self.errors.all()
    }

    pub fn set_slot(&self, slot: Option<SlotSnapshot>) {
        lock(&self.slot).set(slot);
    }

    /// The slot's last reading, unless it is stale.
    pub fn slot(&self) -> Option<SlotSnapshot> {
        lock(&self.slot).fresh()
    }

    pub fn set_wal_keep_limit(&self, bytes: Option<i64>) {
        *lock(&self.wal_keep_limit) = bytes;
    }

    /// `max_slot_wal_keep_size` in bytes; `None` when unlimited or unknown.
    pub fn wal_keep_limit(&self) -> Option<i64> {
        *lock(&self.wal_keep_limit)
    }

    /// Heap bytes of the dashboard's state: the history, the errors and
    /// the latency windows.
    pub fn heap_bytes(&self) -> usize {
        self.history.heap_bytes()
            + self.errors.heap_bytes()
            + self.latency.heap_bytes()
            + 2 * self.latency_histogram.heap_bytes()
    }
}

/// The most since the last call (at least what is there now), and a
/// fresh start.
fn peak(peak: &AtomicU64, now: &AtomicU64) -> u64 {
    let now = now.load(Ordering::Relaxed);
    peak.swap(now, Ordering::Relaxed).max(now)
}

/// Takes a sample once a second until the process ends.
pub fn spawn_sampler(live: Arc<LiveState>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            live.record_sample();
        }
    });
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

/// Durations of something done several times a second (the polling
/// source's claims), as the mean and the longest since the last `take`.
#[derive(Debug, Default)]
pub struct IntervalTimer {
    /// Sum (µs), count, longest (µs).
    acc: Mutex<(u64, u32, u64)>,
}

impl IntervalTimer {
    pub fn record(&self, took: Duration) {
        let micros = took.as_micros().min(u128::from(u64::MAX)) as u64;
        let mut acc = lock(&self.acc);
        acc.0 = acc.0.saturating_add(micros);
        acc.1 = acc.1.saturating_add(1);
        acc.2 = acc.2.max(micros);
    }

    /// Mean and longest in milliseconds (NaN when nothing happened), and a
    /// fresh start.
    pub fn take(&self) -> (f32, f32) {
        let (sum, count, max) = std::mem::take(&mut *lock(&self.acc));
        if count == 0 {
            return (f32::NAN, f32::NAN);
        }
        (
            (sum as f64 / f64::from(count) / 1000.0) as f32,
            (max as f64 / 1000.0) as f32,
        )
    }
}

/// Percentiles of the latencies settled in one interval.
#[derive(Clone, Copy, Debug)]
pub struct IntervalLatency {
    pub count: u64,
    pub p50_ms: f32,
    pub p99_ms: f32,
}

/// Recent commit-to-ack latencies: the last minute's (at most the last
/// [`LatencyWindow::CAPACITY`] events) for the dashboard's cards, and those
/// since the last sample for its chart.
#[derive(Debug)]
pub struct LatencyWindow {
    /// (Unix ms when settled, seconds).
    recent: Mutex<VecDeque<(u64, f32)>>,
    interval: LatencyHistogram,
}

impl Default for LatencyWindow {
    fn default() -> Self {
        LatencyWindow {
            recent: Mutex::new(VecDeque::with_capacity(Self::CAPACITY)),
            interval: LatencyHistogram::default(),
        }
    }
}

impl LatencyWindow {
    pub const CAPACITY: usize = 4096;

    /// How far back the cards' percentiles look.
    pub const RECENT: Duration = Duration::from_secs(60);

    pub fn record(&self, seconds: f64) {
        self.interval.record(seconds);
        let mut recent = lock(&self.recent);
        if recent.len() == Self::CAPACITY {
            recent.pop_front();
        }
        recent.push_back((unix_ms(), seconds as f32));
    }

    /// The q-quantile (0..=1) of the last minute's latencies, in seconds.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let since = unix_ms().saturating_sub(Self::RECENT.as_millis() as u64);
        let recent = lock(&self.recent);
        let mut sorted: Vec<f32> = recent
            .iter()
            .filter(|(at, _)| *at >= since)
            .map(|(_, s)| *s)
            .collect();
        drop(recent);
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(|a, b| a.total_cmp(b));
        let index = ((sorted.len() - 1) as f64 * q).round() as usize;
        Some(f64::from(sorted[index]))
    }

    /// The latencies recorded since the last call, and a fresh start.
    pub fn take_interval(&self) -> IntervalLatency {
        let counts = self.interval.drain();
        let ms =
            |q| LatencyHistogram::quantile_of(&counts, q).map_or(f32::NAN, |s| (s * 1000.0) as f32);
        IntervalLatency {
            count: counts.iter().sum(),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
        }
    }

    fn heap_bytes(&self) -> usize {
        lock(&self.recent).capacity() * std::mem::size_of::<(u64, f32)>()
            + self.interval.heap_bytes()
    }
}

/// Commit-to-ack latencies over the whole run, in log-linear buckets (16
/// per power of two, so any quantile is within about 6%), for benchmarks
/// and the dashboard. Lock-free; fixed size.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    max_micros: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: (0..Self::BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            max_micros: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    const SUB: u64 = 16;
    const BUCKETS: usize = 64 * 16;

    fn index(micros: u64) -> usize {
        if micros < Self::SUB {
            return micros as usize;
        }
        let power = 63 - u64::from(micros.leading_zeros());
        let shift = power - 4;
        let mantissa = (micros >> shift) & (Self::SUB - 1);
        ((power - 3) * Self::SUB + mantissa) as usize
    }

    /// The smallest value of a bucket.
    fn lower_bound(index: usize) -> u64 {
        let index = index as u64;
        if index < Self::SUB {
            return index;
        }
        let power = index / Self::SUB + 3;
        let mantissa = index % Self::SUB;
        (Self::SUB + mantissa) << (power - 4)
    }

    pub fn record(&self, seconds: f64) {
        let micros = (seconds * 1e6).max(0.0) as u64;
        self.buckets[Self::index(micros).min(Self::BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.max_micros.fetch_max(micros, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn max_seconds(&self) -> f64 {
        self.max_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// The q-quantile (0..=1) in seconds, `None` before the first value.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        Self::quantile_of(&counts, q).map(|v| v.min(self.max_seconds()))
    }

    /// The bucket counts, each reset to zero as it is read (so nothing
    /// recorded meanwhile is lost or counted twice).
    pub fn drain(&self) -> Vec<u64> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.swap(0, Ordering::Relaxed))
            .collect();
        self.count.store(0, Ordering::Relaxed);
        self.max_micros.store(0, Ordering::Relaxed);
        counts
    }

    /// The q-quantile in seconds of bucket `counts` (a bucket's midpoint).
    pub fn quantile_of(counts: &[u64], q: f64) -> Option<f64> {
        let count: u64 = counts.iter().sum();
        if count == 0 {
            return None;
        }
        let rank = ((count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, bucket) in counts.iter().enumerate() {
            seen += bucket;
            if seen >= rank {
                let low = Self::lower_bound(i);
                let high = Self::lower_bound(i + 1).max(low + 1);
                return Some((low + high) as f64 / 2.0 / 1e6);
            }
        }
        None
    }

    fn heap_bytes(&self) -> usize {
        self.buckets.len() * std::mem::size_of::<AtomicU64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_within_a_few_percent() {
        let h = LatencyHistogram::default();
        for ms in 1..=1000 {
            h.record(ms as f64 / 1000.0);
        }
        let p50 = h.quantile(0.5).unwrap();
        let p99 = h.quantile(0.99).unwrap();
        assert!((p50 - 0.5).abs() / 0.5 < 0.07, "p50 {p50}");
        assert!((p99 - 0.99).abs() / 0.99 < 0.07, "p99 {p99}");
        assert_eq!(h.count(), 1000);
        assert_eq!(h.max_seconds(), 1.0);
        assert_eq!(LatencyHistogram::default().quantile(0.5), None);
    }

    #[test]
    fn interval_latency_counts_only_what_was_recorded_since_the_last_take() {
        let w = LatencyWindow::default();
        for ms in 1..=100 {
            w.record(ms as f64 / 1000.0);
        }
        let first = w.take_interval();
        assert_eq!(first.count, 100);
        assert!((first.p99_ms - 99.0).abs() < 7.0, "{first:?}");
        w.record(0.5);
        let second = w.take_interval();
        assert_eq!(second.count, 1);
        assert!((second.p50_ms - 500.0).abs() < 35.0, "{second:?}");
        assert!(w.take_interval().p50_ms.is_nan(), "nothing since");
        assert!(
            w.quantile(0.5).is_some(),
            "the cards still see the last minute"
        );
    }

    #[test]
    fn the_state_follows_the_setters_and_each_change_is_marked() {
        let live = LiveState::new();
        assert_eq!(live.state(), State::Starting);
        live.set_connected(true);
        assert_eq!(live.state(), State::Active);
        live.set_waiting_for_broker(true);
        assert_eq!(live.state(), State::WaitingForBroker);
        live.set_waiting_for_broker(false);
        live.set_connected(false);
        assert_eq!(live.state(), State::Reconnecting);
        live.set_role(Role::Standby);
        assert_eq!(live.state(), State::Standby);
        let states: Vec<State> = live.history.transitions().iter().map(|t| t.state).collect();
        assert_eq!(
            states,
            [
                State::Active,
                State::WaitingForBroker,
                State::Active,
                State::Reconnecting,
                State::Standby
            ]
        );
    }

    #[test]
    fn an_error_is_past_once_the_relay_reconnects_or_acknowledges_while_connected() {
        let live = LiveState::new();
        live.set_connected(true);
        live.set_connected(false);
        live.set_last_error("replication: connection reset");
        live.record_ack(); // draining while disconnected proves nothing
        assert!(live.errors()[0].holds());
        live.set_connected(true);
        assert_eq!(live.errors()[0].resolved_by, Some(Recovery::Reconnected));
        live.set_last_error("Kafka: UnknownTopicOrPartition");
        assert!(live.errors()[0].holds(), "reported while connected");
        live.record_ack();
        assert_eq!(live.errors()[0].resolved_by, Some(Recovery::Acknowledged));
        assert_eq!(
            live.last_error().as_deref(),
            Some("Kafka: UnknownTopicOrPartition")
        );
    }

    #[test]
    fn waiting_for_the_broker_is_an_error_until_it_answers() {
        let live = LiveState::new();
        live.set_connected(true);
        live.set_waiting_for_broker(true);
        live.set_waiting_for_broker(true);
        let errors = live.errors();
        assert_eq!(errors.len(), 1, "reported once: {errors:?}");
        assert!(errors[0].holds());
        assert!(errors[0].message.contains("--broker-stall-timeout"));
        live.set_waiting_for_broker(false);
        assert_eq!(live.errors()[0].resolved_by, Some(Recovery::BrokerAnswered));
    }

    #[test]
    fn a_sample_counts_the_interval_not_the_total() {
        let live = LiveState::new();
        live.counters.events_delivered.store(10, Ordering::Relaxed);
        live.record_sample();
        live.counters.events_delivered.store(25, Ordering::Relaxed);
        live.record_claim(Duration::from_millis(4));
        live.record_claim(Duration::from_millis(8));
        live.record_sample();
        let samples = live.history.samples();
        assert_eq!(samples[0].published, 10);
        assert_eq!(samples[1].published, 15);
        assert_eq!((samples[1].claim_ms, samples[1].claim_max_ms), (6.0, 8.0));
        assert!(samples[1].lag_bytes.is_nan(), "no slot reading");
    }

    #[test]
    fn histogram_buckets_are_ordered_and_cover_their_values() {
        for micros in [0u64, 1, 15, 16, 17, 100, 1000, 123_456, 10_000_000] {
            let i = LatencyHistogram::index(micros);
            assert!(LatencyHistogram::lower_bound(i) <= micros, "{micros}");
            assert!(LatencyHistogram::lower_bound(i + 1) > micros, "{micros}");
        }
    }
}
