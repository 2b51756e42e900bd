//! Events sent again from the outbox table: `walrelay backfill` (on
//! demand) and `walrelay recover` (after the slot was lost).
//!
//! ```text
//!   outbox table ──pages, (created_at, id) order──> router ──> publisher ──> Kafka
//!        │                                                         │
//!        └── what is already in Kafka (ids read back) ── skipped ──┘
//!   state table: where each backfill / recovery got to, written after the
//!   broker acknowledged (and its transaction committed) every row before it
//! ```
//!
//! | file | role |
//! | --- | --- |
//! | `rows.rs` | the table read in pages, each row routed as the stream routes it |
//! | `ids.rs` | the event ids a set of topics already holds, read back `read_committed` |
//! | `send.rs` | records through the publisher, waited for until in Kafka |
//! | `state.rs` | each backfill's progress, and recoveries under way |
//! | `backfill.rs` | `walrelay backfill` |
//! | `recover.rs` | `walrelay recover` |
//!
//! Records are the stream's: the same router builds them (topic, key,
//! value, `id` and CloudEvents headers) and, exactly once, the publisher
//! picks the partition with the Java client's murmur2 as the stream does.
//! They carry an origin of their own (`walrelay_origin`), so a resumed
//! run finds its own earlier sends and the stream's exactly-once scans
//! pass over them.

pub mod backfill;
mod ids;
pub mod recover;
mod rows;

pub use rows::Selection;
mod send;
pub(crate) mod state;

use crate::publish::PublishError;
use crate::sql::SqlError;

/// Events a backfill or recovery has put in Kafka (counter, `job`:
/// backfill or recover).
pub const EVENTS_REPLAYED_TOTAL: &str = "walrelay_replay_events_total";
/// Events a backfill or recovery found already in Kafka and did not send.
pub const EVENTS_REPLAY_SKIPPED_TOTAL: &str = "walrelay_replay_skipped_total";
/// Rows of the table still to go (gauge).
pub const REPLAY_REMAINING: &str = "walrelay_replay_remaining_events";

/// Why a backfill or a recovery stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Sql(#[from] Box<SqlError>),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("{0}")]
    Kafka(String),
    /// Bad input or a state that needs the operator: the message says
    /// what to do.
    #[error("{0}")]
    Refused(String),
}

impl From<SqlError> for ReplayError {
    fn from(error: SqlError) -> Self {
        ReplayError::Sql(Box::new(error))
    }
}

/// A selection of rows from the flags.
pub fn rows_selection(
    since: Option<String>,
    until: Option<String>,
    predicate: Option<String>,
) -> Selection {
    Selection {
        since,
        until,
        predicate,
    }
}
