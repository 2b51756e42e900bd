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
//! thread ([`consumer`]); the batch in hand is stored before a partition
//! is given up, so the next owner starts where this one stopped.

mod consumer;
pub mod schema;
pub mod store;

pub use consumer::{InboxConfig, InboxError, run};
pub use schema::InboxTables;
