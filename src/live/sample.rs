//! One second of the process as the dashboard charts it: the [`Sample`]
//! the history keeps, the [`State`] marked on the time axis and its
//! [`Transition`]s, and each source's columns (what a sample's fields are
//! called in the JSON of that source). The ring that keeps them is
//! `history.rs`.

use super::Source;

/// What the process is doing, as the dashboard marks it on the time axis.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum State {
    /// Not connected yet.
    #[default]
    Starting,
    /// Streaming from the slot, polling the table, or consuming.
    Active,
    /// Another relay holds the slot; this one waits to take over.
    Standby,
    /// Nothing was acknowledged for the stall timeout: the slot (or the
    /// claim) is let go until the broker answers.
    WaitingForBroker,
    /// Connected before, or failed: trying again.
    Reconnecting,
}

impl State {
    /// Every state, in the order of their codes in
    /// [`History::to_json`](super::History::to_json).
    pub const ALL: [State; 5] = [
        State::Starting,
        State::Active,
        State::Standby,
        State::WaitingForBroker,
        State::Reconnecting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Active => "active",
            State::Standby => "standby",
            State::WaitingForBroker => "waiting_for_broker",
            State::Reconnecting => "reconnecting",
        }
    }
}

/// One second of the process. Readings that were not available are NaN
/// (sent as `null`); counts are of this interval, not since start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub unix_ms: u64,
    pub state: State,
    /// The slot: `pg_current_wal_lsn() - confirmed_flush_lsn`.
    pub lag_bytes: f64,
    /// The slot: `pg_current_wal_lsn() - restart_lsn`.
    pub retained_wal_bytes: f64,
    /// The slot's `safe_wal_size`: WAL that may still be written before
    /// the slot is invalidated (NaN when `max_slot_wal_keep_size` is -1).
    pub safe_wal_bytes: f64,
    /// Events acknowledged (rows published, records stored).
    pub published: u32,
    /// Events sent to the dead-letter topic (or the inbox's table).
    pub dead_lettered: u32,
    /// Events already in their partition (exactly once), or records
    /// already in the inbox (duplicates).
    pub skipped: u32,
    /// The most in flight during the interval.
    pub in_flight_events: u32,
    pub in_flight_bytes: f64,
    /// Commit (created, produced) to acknowledgement (stored), of the
    /// events settled in this interval.
    pub p50_ms: f32,
    pub p99_ms: f32,
    /// The polling source's rows not yet published.
    pub pending_rows: f64,
    pub oldest_pending_seconds: f32,
    /// The polling source's claims and settles in this interval: mean and
    /// longest.
    pub claim_ms: f32,
    pub claim_max_ms: f32,
    pub settle_ms: f32,
    pub settle_max_ms: f32,
    /// The inbox's lag, summed over its partitions.
    pub consumer_lag: f64,
}

impl Default for Sample {
    fn default() -> Self {
        Sample {
            unix_ms: 0,
            state: State::Starting,
            lag_bytes: f64::NAN,
            retained_wal_bytes: f64::NAN,
            safe_wal_bytes: f64::NAN,
            published: 0,
            dead_lettered: 0,
            skipped: 0,
            in_flight_events: 0,
            in_flight_bytes: f64::NAN,
            p50_ms: f32::NAN,
            p99_ms: f32::NAN,
            pending_rows: f64::NAN,
            oldest_pending_seconds: f32::NAN,
            claim_ms: f32::NAN,
            claim_max_ms: f32::NAN,
            settle_ms: f32::NAN,
            settle_max_ms: f32::NAN,
            consumer_lag: f64::NAN,
        }
    }
}

/// A change of [`State`], at the moment it happened (between samples too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Transition {
    pub unix_ms: u64,
    pub state: State,
}

/// One column of the JSON the dashboard reads: its name and its value in
/// a sample.
pub struct Column {
    pub name: &'static str,
    pub value: fn(&Sample) -> f64,
}

macro_rules! columns {
    ($($name:literal => $get:expr),* $(,)?) => {
        &[$(Column { name: $name, value: $get }),*]
    };
}

/// Each source's columns, named for what they are in that source.
pub fn columns(source: Source) -> &'static [Column] {
    match source {
        Source::Wal => columns![
            "lag_bytes" => |s| s.lag_bytes,
            "retained_wal_bytes" => |s| s.retained_wal_bytes,
            "safe_wal_bytes" => |s| s.safe_wal_bytes,
            "published" => |s| f64::from(s.published),
            "dead_lettered" => |s| f64::from(s.dead_lettered),
            "skipped" => |s| f64::from(s.skipped),
            "p50_ms" => |s| f64::from(s.p50_ms),
            "p99_ms" => |s| f64::from(s.p99_ms),
            "in_flight_events" => |s| f64::from(s.in_flight_events),
            "in_flight_bytes" => |s| s.in_flight_bytes,
        ],
        Source::Poll => columns![
            "pending_rows" => |s| s.pending_rows,
            "oldest_pending_seconds" => |s| f64::from(s.oldest_pending_seconds),
            "published" => |s| f64::from(s.published),
            "dead_lettered" => |s| f64::from(s.dead_lettered),
            "skipped" => |s| f64::from(s.skipped),
            "p50_ms" => |s| f64::from(s.p50_ms),
            "p99_ms" => |s| f64::from(s.p99_ms),
            "claim_ms" => |s| f64::from(s.claim_ms),
            "claim_max_ms" => |s| f64::from(s.claim_max_ms),
            "settle_ms" => |s| f64::from(s.settle_ms),
            "settle_max_ms" => |s| f64::from(s.settle_max_ms),
            "in_flight_events" => |s| f64::from(s.in_flight_events),
            "in_flight_bytes" => |s| s.in_flight_bytes,
        ],
        Source::Inbox => columns![
            "consumer_lag" => |s| s.consumer_lag,
            "stored" => |s| f64::from(s.published),
            "duplicates" => |s| f64::from(s.skipped),
            "dead_lettered" => |s| f64::from(s.dead_lettered),
            "p50_ms" => |s| f64::from(s.p50_ms),
            "p99_ms" => |s| f64::from(s.p99_ms),
            "in_flight_events" => |s| f64::from(s.in_flight_events),
        ],
    }
}
