//! The process's live state, shared with the HTTP endpoints (`/readyz`,
//! the dashboard): whether it streams and from which host, what it
//! confirmed, its errors, and an hour of history. Written by the relay (or
//! the polling source, or the inbox), the monitors and the sampler; read by
//! the HTTP server. Nothing reads it back to decide anything.
//!
//! The sampler ([`spawn_sampler`]) turns the readings into one
//! [`Sample`] a second in the [`History`] ring; state changes are recorded
//! the moment they happen, by the setters.
//!
//! The shapes it serves (where the events come from, the role, the
//! monitors' readings, the counters) are in `live/readings.rs`; the
//! history ring in `live/history.rs`, the errors in `live/errors.rs`, the
//! latency windows in `live/latency.rs`.

mod delivered;
mod errors;
mod history;
mod latency;
mod readings;
mod sample;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::catalog::SlotSnapshot;
use crate::lsn::Lsn;
use crate::metrics as m;
pub use delivered::Delivered;
pub use errors::{ErrorLog, ErrorRecord, Recovery};
pub use history::{CAPACITY, History, INTERVAL, MAX_PARTITIONS};
pub use latency::{IntervalLatency, IntervalTimer, LatencyHistogram, LatencyWindow};
use readings::Reading;
pub use readings::{
    Backlog, HeldPartition, HeldPartitions, InboxPartition, InboxSnapshot, LiveCounters, Role,
    Source, Subject,
};
pub use sample::{Sample, State, Transition};

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
    /// Partitions with no leader whose records wait (the publisher's).
    pub held_partitions: HeldPartitions,
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
            held_partitions: HeldPartitions::default(),
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
            metrics::gauge!(m::IN_FLIGHT_BYTES).set(bytes as f64);
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

    /// The broker probe's latest answer, for `/readyz`.
    pub fn set_broker_reachable(&self, reachable: bool) {
        self.counters
            .broker_reachable
            .store(reachable, Ordering::Relaxed);
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
        let now = crate::timestamp::PgTimestamp::now().unix_micros();
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

/// Takes a sample once a second until `shutdown`.
pub fn spawn_sampler(live: Arc<LiveState>, mut shutdown: crate::shutdown::Shutdown) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while shutdown.unless(tick.tick()).await.is_some() {
            live.record_sample();
        }
    });
}
