//! A lane: one connection to PostgreSQL and the batch on it, through its
//! phases. The relay runs a few lanes, so one batch is claimed while
//! another is published and a third is settled.
//!
//! ```text
//!   Disconnected ─connect─> Connecting ─> Idle ─claim─> Claiming ─rows─> (Marking) ─> Publishing ─all settled─> Settling ─commit─> Idle
//!                                          ^                                │ a lost connection
//!                                          └──────── Draining <─────────────┘
//! ```
//!
//! Lanes never reorder an aggregate: a claim stops each aggregate at an
//! older row outside it, and another lane's rows are outside it (locked
//! until that lane's batch is settled and committed), exactly as another
//! relay's are.

use tokio::time::Instant;

use super::batch::Batch;

pub enum Phase {
    Disconnected {
        retry_at: Instant,
    },
    Connecting,
    /// Connected, nothing claimed: it claims when the relay says.
    Idle,
    Claiming {
        table: usize,
    },
    /// Exactly once: noting the batch's rows as possibly sent, before they
    /// are.
    Marking {
        batch: Batch,
    },
    Publishing {
        batch: Batch,
        last_progress: Instant,
        /// The broker acknowledged nothing for the stall timeout.
        stalled: bool,
    },
    Settling {
        batch: Batch,
    },
    /// Its connection was lost (the server rolled the claim back): waiting
    /// for the records the producer already has, so a later batch does not
    /// overtake them.
    Draining {
        batch: Batch,
    },
}

pub struct Lane<C> {
    /// Its connection(s) (`store.rs`): the one whose transaction claims and
    /// settles, and exactly once the one the in-flight notes commit on.
    pub conn: Option<C>,
    pub phase: Phase,
}

impl<C> Lane<C> {
    pub fn new() -> Self {
        Lane {
            conn: None,
            phase: Phase::Disconnected {
                retry_at: Instant::now(),
            },
        }
    }

    /// The batch on this lane, if it has one.
    pub fn batch(&self) -> Option<&Batch> {
        match &self.phase {
            Phase::Marking { batch }
            | Phase::Publishing { batch, .. }
            | Phase::Settling { batch }
            | Phase::Draining { batch } => Some(batch),
            _ => None,
        }
    }

    /// Whether it holds a batch the broker may still be writing.
    pub fn busy(&self) -> bool {
        self.batch().is_some()
    }

    pub fn is_idle(&self) -> bool {
        matches!(self.phase, Phase::Idle)
    }
}
