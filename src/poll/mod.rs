//! `walrelay run --source poll`: the outbox without logical replication.
//!
//! ```text
//!   outbox table ──claim (one transaction)──> router ──Outgoing──> publisher ──> Kafka
//!        ^                                                                  │ acks
//!        └───────── delete / mark, attempts (same transaction, commit) <────┘
//! ```
//!
//! | file | role |
//! | --- | --- |
//! | `schema.rs` | the columns, triggers and index `setup --source poll` makes |
//! | `claim.rs` | the claim, settle and backlog SQL |
//! | `poll_relay.rs` | the loop: claim a batch, publish it, settle it, wait for more |
//! | `lane.rs` | one connection and the batch on it: batches are claimed, published and settled side by side |
//! | `doubt.rs` | exactly once: the records' origin, and how far back partitions are read for rows in doubt |
//! | `batch.rs` | one claimed batch: its records, their outcomes, what to write back |
//! | `backlog.rs` | the backlog monitor (metrics and the dashboard) |
//!
//! # Per-aggregate order
//!
//! The classic trap of polling relays is a row with a lower sequence
//! number that commits after one with a higher number: a relay that has
//! already published the higher one publishes the lower one after it. Two
//! rules close it:
//!
//! 1. Writers: the insert trigger takes an advisory lock on the row's
//!    aggregate, held to commit, before it numbers the row. A second writer
//!    of the same aggregate waits at its insert until the first commits,
//!    so per aggregate, rows become visible in `seq` order: a lower number
//!    can never appear later. Different aggregates never wait for each
//!    other.
//! 2. Relays: a batch claims the oldest rows no one else holds, `FOR
//!    UPDATE SKIP LOCKED` in `seq` order, and, per aggregate, stops at the
//!    first row that has an older unpublished row outside the claim. The
//!    rows a relay holds stay locked, and unpublished to everyone else,
//!    until the transaction that deletes or marks them commits, after the
//!    broker acknowledged them; so another relay only ever publishes an
//!    aggregate's next rows after the previous ones are in Kafka, while it
//!    publishes other aggregates side by side. Within a batch, rows go out
//!    in `seq` order through one idempotent producer; a row that failed
//!    holds its aggregate's later rows until its next attempt.
//!
//! A relay that dies after the broker took a batch and before its commit
//! leaves the rows for the next claim. At least once, that claim publishes
//! them again (with the same `id` header); exactly once (the default), the
//! rows were noted in flight before they went out, and the claim reads the
//! partitions' tails for them and skips what is there (`doubt.rs`).

mod backlog;
mod batch;
mod claim;
mod doubt;
mod lane;
#[cfg(test)]
mod memory;
mod poll_relay;
mod schedule;
pub mod schema;
mod settle;
mod store;
#[cfg(test)]
mod tests;
mod work;

pub use backlog::spawn_backlog_monitor;
pub use claim::OutboxTable;
pub use poll_relay::PollRelay;
pub use settle::OnPublished;
pub use store::PgStore;

use std::time::Duration;

use crate::postgres::ConnectionConfig;
use crate::publish::{DeliveryGuarantee, PublishError};
use crate::router::RouterConfig;
use crate::sql::{SqlClient, SqlError};

/// Everything `run --source poll` needs, validated.
#[derive(Clone, Debug)]
pub struct PollConfig {
    pub pg: ConnectionConfig,
    pub router: RouterConfig,
    /// Rows claimed at most per batch (`--poll-batch-size`).
    pub batch_size: usize,
    /// Batches in flight at once, each on a connection of its own
    /// (`--poll-connections`).
    pub lanes: usize,
    /// Exactly once: records carry their position (`seq`) and origin, and
    /// rows a relay may have sent before are checked against their
    /// partition's tail before they are sent again.
    pub delivery: DeliveryGuarantee,
    /// Exactly once: records of a partition's tail read at most.
    pub exactly_once_lookback: usize,
    /// Longest wait between polls of an idle outbox (`--poll-interval`).
    pub poll_interval: Duration,
    pub on_published: OnPublished,
    /// A row that failed this many times goes to the dead-letter topic.
    pub max_attempts: u32,
    /// Cap of the wait before a failed row's next attempt, and of the
    /// reconnect backoff.
    pub max_backoff: Duration,
    /// Nothing acknowledged this long: roll the claim back (so the rows
    /// are not held) and wait for the broker.
    pub broker_stall_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// Consecutive failures of a permanent kind before the relay stops.
    pub permanent_error_attempts: u32,
    /// Where rows the broker will never take are kept whole, in the
    /// transaction that deletes (or marks) them.
    pub dead_letter_table: (String, String),
}

/// Why the polling source stopped.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error(transparent)]
    Sql(Box<SqlError>),
    #[error("{0}")]
    NotSetUp(String),
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// A permanent error, tried a few times: the relay stops with it.
    #[error(transparent)]
    GaveUp(Box<PollError>),
    /// A lane's work finished in a phase that cannot take its result: a
    /// bug. The relay stops rather than drop the result (the claim rolls
    /// back; nothing was deleted).
    #[error(
        "lane {lane}: its {result} work finished while it was {phase}; this is a bug in walrelay"
    )]
    OutOfStep {
        lane: usize,
        result: &'static str,
        phase: &'static str,
    },
}

impl PollError {
    /// Whether trying again cannot help: after a few tries the relay stops
    /// with it.
    pub fn is_permanent(&self) -> bool {
        match self {
            PollError::Sql(e) => !e.is_transient(),
            PollError::NotSetUp(_)
            | PollError::Publish(_)
            | PollError::GaveUp(_)
            | PollError::OutOfStep { .. } => true,
        }
    }
}

impl From<SqlError> for PollError {
    fn from(error: SqlError) -> Self {
        PollError::Sql(Box::new(error))
    }
}

/// The outbox tables of `router`, checked to be set up for polling.
pub async fn load_tables(
    client: &SqlClient,
    router: &RouterConfig,
) -> Result<Vec<OutboxTable>, PollError> {
    let mut tables = Vec::new();
    for (schema, table) in &router.tables {
        if !crate::catalog::table_exists(client, schema, table).await? {
            return Err(PollError::NotSetUp(format!(
                "outbox table {schema}.{table} does not exist: run `walrelay setup --source poll`"
            )));
        }
        let missing = schema::missing_pieces(client, schema, table).await?;
        if !missing.is_empty() {
            return Err(PollError::NotSetUp(format!(
                "outbox table {schema}.{table} is not set up for polling (it has no {}): run `walrelay setup --source poll`",
                missing.join(", no ")
            )));
        }
        tables.push(OutboxTable::load(client, schema, table, &router.columns).await?);
    }
    Ok(tables)
}
