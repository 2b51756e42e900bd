//! `walrelay inbox`: Kafka topics into an inbox table in PostgreSQL, each
//! event once.
//!
//! The consumer's offsets live in PostgreSQL, not in Kafka: each batch is
//! written in one transaction together with each partition's next offset
//! ([`store`]), and a partition handed to this consumer (at start, or in a
//! rebalance of its group) starts from the offset stored for it. So a
//! crash at any moment neither loses nor doubles a row; a record whose
//! `id` is already in the inbox (a producer that sent it twice) is
//! skipped by the primary key.
//!
//! The group protocol assigns partitions across instances. librdkafka
//! serves the rebalance callbacks inside `poll`, on the consumer's own
//! thread ([`context`]); they do no I/O: a partition assigned waits,
//! paused, until the loop ([`consumer`]) has read its stored offset and
//! moved there ([`positions`]), and the records in hand for a partition
//! given up are dropped, for the next owner to read again from the stored
//! offset.
//!
//! A stored offset is of one log: the topic's id (KIP-516) is stored
//! beside it, and a partition whose topic was deleted and made again (or
//! whose log was truncated) is noticed before it is read, never read from
//! the old log's position; `--on-topic-reset` says what then ([`reset`]).
//!
//! The loop reaches the consumer and the store through two traits
//! ([`seams`]), so its rules are tested in-process (`tests.rs`) with an
//! in-memory consumer and store (`memory.rs`).

mod config;
mod consumer;
mod context;
pub mod counters;
pub mod incoming;
#[cfg(test)]
mod memory;
mod positions;
pub mod reset;
pub mod schema;
mod seams;
pub mod store;
#[cfg(test)]
mod tests;

pub use config::InboxConfig;
pub use consumer::run;

use crate::live::LiveState;

/// The inbox's readiness from the broker probe's answer. It has no stall
/// timeout of its own: while the broker does not answer, it waits for it.
pub fn broker_answered(live: &LiveState, reachable: bool) {
    live.set_broker_reachable(reachable);
    if live.waiting_for_broker() == reachable {
        live.set_waiting_for_broker(!reachable);
        metrics::gauge!(crate::metrics::WAITING_FOR_BROKER).set(if reachable { 0.0 } else { 1.0 });
    }
}
pub use reset::OnTopicReset;
pub use schema::InboxTables;
