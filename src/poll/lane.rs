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

use std::time::Duration;

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
    /// Exactly once: marked, its rows in doubt waiting while those of
    /// another table are looked for (`doubt.rs`).
    Waiting {
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

impl Phase {
    /// The phase, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Disconnected { .. } => "disconnected",
            Phase::Connecting => "connecting",
            Phase::Idle => "idle",
            Phase::Claiming { .. } => "claiming",
            Phase::Marking { .. } => "marking",
            Phase::Waiting { .. } => "waiting",
            Phase::Publishing { .. } => "publishing",
            Phase::Settling { .. } => "settling",
            Phase::Draining { .. } => "draining",
        }
    }
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
            | Phase::Waiting { batch }
            | Phase::Publishing { batch, .. }
            | Phase::Settling { batch }
            | Phase::Draining { batch } => Some(batch),
            _ => None,
        }
    }

    /// Its batch, once handed to the publisher.
    pub fn sent_batch(&self) -> Option<&Batch> {
        match &self.phase {
            Phase::Publishing { batch, .. }
            | Phase::Settling { batch }
            | Phase::Draining { batch } => Some(batch),
            _ => None,
        }
    }

    /// Whether it holds a batch the broker may still be writing.
    pub fn busy(&self) -> bool {
        self.batch().is_some() && !matches!(self.phase, Phase::Waiting { .. })
    }

    pub fn is_idle(&self) -> bool {
        matches!(self.phase, Phase::Idle)
    }

    /// When the loop must look at this lane again: its reconnect, or its
    /// batch's stall (nothing acknowledged for `stall_timeout`).
    pub fn wake_at(&self, stall_timeout: Duration) -> Option<Instant> {
        match &self.phase {
            Phase::Disconnected { retry_at } => Some(*retry_at),
            Phase::Publishing {
                last_progress,
                stalled: false,
                ..
            } => Some(*last_progress + stall_timeout),
            _ => None,
        }
    }

    /// Whether its batch stalls now: the broker acknowledged nothing for
    /// `stall_timeout`. The batch stays claimed until the broker takes it:
    /// rolled back, its rows could be sent again by another relay while
    /// their records still wait in the producer, and land twice or out of
    /// order.
    pub fn stalls(&mut self, stall_timeout: Duration, now: Instant) -> bool {
        match &mut self.phase {
            Phase::Publishing {
                last_progress,
                stalled,
                ..
            } if !*stalled && *last_progress + stall_timeout <= now => {
                *stalled = true;
                true
            }
            _ => false,
        }
    }

    /// Its connection went, and with it the claim (the server rolled it
    /// back): records already with the producer are waited for (draining)
    /// before it connects again, at `retry_at`.
    pub fn connection_lost(&mut self, retry_at: Instant) -> Lost {
        let phase = std::mem::replace(&mut self.phase, Phase::Connecting);
        let lost = Lost {
            claiming: matches!(phase, Phase::Claiming { .. }),
            claimed_batch: matches!(phase, Phase::Publishing { .. } | Phase::Settling { .. }),
        };
        self.phase = match phase {
            Phase::Publishing { batch, .. }
            | Phase::Settling { batch }
            | Phase::Draining { batch }
                if batch.sending() > 0 =>
            {
                Phase::Draining { batch }
            }
            _ => Phase::Disconnected { retry_at },
        };
        lost
    }
}

/// What a lane was doing when its connection went.
pub struct Lost {
    /// A claim was under way.
    pub claiming: bool,
    /// It held a claimed batch being published or settled.
    pub claimed_batch: bool,
}
