//! `walrelay run`: moves events from the slot to Kafka.
//!
//! ```text
//!   PostgreSQL walsender ──XLogData──> session ──WalItem──> WAL relay ──Outgoing──> publisher (crate::publish) ──> Kafka
//!         ^                          (decoder, relations,   (router, window,                                      │
//!         │                           open transaction)      tracker tickets)                                     │
//!         └──── standby status update (flush = watermark) <── confirmer (ack tracker) <── outcomes ──────────────┘
//! ```
//!
//! | file | role |
//! | --- | --- |
//! | `session.rs` | one replication session: stream, decoder, relation cache, open transaction |
//! | `wal_relay.rs` | the loop, one biased `select!` over everything that can happen, and its handlers |
//! | `outbound.rs` | events handed to the publisher, and what became of them settled (window, tracker, dead letters) |
//! | `link.rs` | the replication link's state: idle, connecting, streaming |
//! | `reconnect.rs` | when to connect again: backoff, standing by, giving up |
//! | `refused.rs` | events the broker refused for good, on their way into the dead-letter table |
//! | `window.rs` | the in-flight window (events and bytes): when to stop reading WAL |
//! | `confirmer.rs` | the ack tracker, when to send status updates, heartbeat latency |
//! | `ack_tracker.rs` | which LSN may be confirmed |
//! | `error.rs` | the error taxonomy and the one function that decides what to do |
//! | `relation_cache.rs` | each table's shape from its latest Relation message |
//! | `monitor.rs` | beside the loop: the slot monitor and its findings |
//! | `heartbeat.rs` | beside the loop: the idle-WAL heartbeat |
//!
//! # The guarantee, and how progress is tracked
//!
//! The flush LSN sent to PostgreSQL never passes an event the broker has
//! not acknowledged. PostgreSQL resumes a slot from the last flush LSN it
//! was told, so telling it a position is a promise that everything before
//! it is safe in Kafka. Only commit LSNs are totally ordered (several
//! changes can share an LSN), so progress is tracked per transaction, in
//! commit order, and the watermark is the end LSN of the newest
//! transaction such that it and every earlier one have all their events
//! acknowledged (`ack_tracker.rs`). A crash at any moment loses nothing;
//! the events after the last confirmed LSN are sent again, with the same
//! `id` header.
//!
//! Keepalive WAL ends are confirmed too, but only when nothing is open or
//! in flight: every commit before them has then been streamed and handled,
//! and without them an idle outbox on a busy database pins WAL forever.
//!
//! # Backpressure
//!
//! At most `--max-in-flight-events` / `--max-in-flight-bytes` are
//! unacknowledged at once, and a full producer queue holds everything
//! behind it. Either way the loop stops reading WAL, but it keeps handling
//! delivery reports and sending status updates, so `wal_sender_timeout`
//! never fires on a slow broker.
//!
//! # Sessions
//!
//! A lost connection, a restart of PostgreSQL or another relay holding the
//! slot ends a session. The next one starts only once nothing is in flight
//! (the producer never gives up on a record), at the slot's own position,
//! with a fresh tracker. A producer that failed for good (another relay
//! took over its transactional id) abandons what it had in flight: the
//! next session reads it again from the slot.
//!
//! # Never holding the database
//!
//! At shutdown a walsender waits until its client has confirmed everything
//! it sent, and walrelay confirms only what the broker acknowledged. So
//! while the broker is away, or while a long backlog drains, a connected
//! relay would hold PostgreSQL's shutdown. Two rules prevent that: when
//! events wait and nothing has been acknowledged for the stall timeout,
//! the relay ends its session cleanly (the walsender exits) and keeps
//! waiting on the producer, streaming again once everything in flight is
//! acknowledged; and when the slot monitor sees the server shutting down,
//! the relay ends its session at once. Either way the slot keeps its
//! confirmed position, so nothing is lost.
//!
//! # Where a session starts
//!
//! Always at the slot's own position, as the server reports it: never at a
//! position learned from another server. After a failover to a standby
//! that lagged, the promoted server's slot may be behind the watermark
//! confirmed to the old primary; starting there, not at the watermark,
//! streams the new primary's first commits instead of skipping them.

mod ack_tracker;
mod confirmer;
mod error;
pub(crate) mod heartbeat;
mod link;
pub(crate) mod monitor;
mod outbound;
pub(crate) mod outbox_watch;
mod reconnect;
mod refused;
pub mod relation_cache;
mod session;
mod wal_relay;
mod window;

/// A scripted walsender: the in-process tests' and `benches/relay.rs`'.
#[cfg(any(test, feature = "bench-support"))]
pub mod scripted;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub use ack_tracker::{AckError, AckTracker, TxnTicket};
pub use error::{Decision, RelayError, StreamError, decide};
pub use session::{Connector, PgConnector, SessionStart, WalStream};
pub use wal_relay::WalRelay;

use crate::postgres::ConnectionConfig;
use crate::router::RouterConfig;

pub use crate::publish::DeliveryGuarantee;

/// Everything `run` needs, validated.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    pub pg: ConnectionConfig,
    pub slot: String,
    pub publication: String,
    pub router: RouterConfig,
    pub max_in_flight_events: usize,
    pub max_in_flight_bytes: usize,
    /// How often a status update goes to PostgreSQL even when nothing moved
    /// (`--status-interval`).
    pub status_interval: Duration,
    pub shutdown_timeout: Duration,
    pub proto_version: Option<u32>,
    /// Longest wait between reconnect attempts.
    pub max_backoff: Duration,
    /// Consecutive failed attempts after which a permanent error ends the relay.
    pub permanent_error_attempts: u32,
    /// How often a standby asks for the slot held by another relay.
    pub standby_retry: Duration,
    /// How long events may wait with nothing acknowledged before the relay
    /// lets go of the slot, so PostgreSQL is not held by a broker outage.
    pub broker_stall_timeout: Duration,
    pub delivery: DeliveryGuarantee,
    /// Exactly once: records a partition scan reads at most.
    pub exactly_once_lookback: usize,
    /// Prefix of walrelay's own heartbeat messages: never published, used
    /// to measure replication latency.
    pub heartbeat_prefix: String,
    /// Exactly once: the Kafka transactional id; `None` for
    /// `walrelay.<system identifier>.<slot>`.
    pub transactional_id: Option<String>,
    /// Where events the broker will never take are kept whole.
    pub dead_letter_table: (String, String),
    /// A session from which nothing arrives this long, though the relay
    /// asks the server to answer, is taken for lost.
    pub replication_timeout: Duration,
    /// `--primary-url`: where what a standby cannot write goes while `pg`
    /// is a standby (PostgreSQL 16+; see `standby.rs`).
    pub primary: Option<ConnectionConfig>,
}
