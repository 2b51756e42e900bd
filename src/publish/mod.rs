//! The publishing layer: records into Kafka, below both sources.
//!
//! ```text
//!   WAL relay ─┐                        ┌─ topics.rs      prepared, counted, read again
//!              ├─ Outgoing ─> Publisher ┼─ ledgers.rs     exactly once: what a partition holds (scan.rs)
//!   poll ──────┘  <─ Outcome ─          ├─ partitioner.rs Java's murmur2
//!                                       └─ Sink ─> kafka::KafkaSink (or memory.rs in tests)
//! ```
//!
//! | file | role |
//! | --- | --- |
//! | `publisher.rs` | order, waiting, retries, outcomes (`publisher/`: delivery reports, broker I/O that finished, partitions and their leaders, cleanups) |
//! | `broker_io.rs` | the broker I/O waited for, each session's told apart |
//! | `pause.rs` | waiting out failures: the backoff, the pause, the timer |
//! | `outcome.rs` | what sources hand over and get back |
//! | `outgoing.rs` | the source-independent half: a routed change to its record, the origin headers, a refused record kept |
//! | `records.rs` | the records in hand, in order, and what holds them back |
//! | `transaction.rs` | the Kafka transaction's life, and its three transactional ids (`transaction/`: who they are, the next transaction open while one commits, an id stuck on an offline partition, a transaction left open) |
//! | `offline.rs` | partitions with no leader: their records wait outside transactions |
//! | `sink.rs` | the broker as the publisher sees it: the `Sink` trait, classified errors |
//! | `error.rs` | `PublishError`, and what a failed delivery means |
//! | `topics.rs` | each topic's state and partition count |
//! | `ledgers.rs`, `scan.rs` | exactly once: which positions each partition already holds |
//! | `position.rs` | the position and origin every exactly-once record carries |
//! | `partitioner.rs` | where a key goes |
//! | `memory.rs` | an in-memory broker with transactions, for in-process tests (`memory/`: its sink, its logs) |
//!
//! A source hands over [`Outgoing`] records with a tag of its own and gets
//! [`Outcome`]s back, from [`Publisher::publish`] and [`Publisher::next`];
//! it imports nothing of the other source, and the publisher nothing of
//! either.

mod broker_io;
mod error;
mod ledgers;
#[cfg(any(test, feature = "bench-support"))]
pub mod memory;
mod offline;
mod outcome;
mod outgoing;
mod partitioner;
mod pause;
pub mod position;
mod publisher;
mod records;
pub mod scan;
pub mod sink;
#[cfg(test)]
mod tests;
mod topics;
mod transaction;

pub use error::{DeliveryDecision, PublishError, RefusalKind, decide};
pub use ledgers::{MARGIN as EVENT_MARGIN, Replay, ScanSettings};
pub use offline::HeldPartition;
pub use outcome::{DeliveryGuarantee, Outcome, Outgoing, PublisherConfig, TopicFailures, backoff};
pub use outgoing::{OriginStamp, RefusedRecord, ToSend, refused, to_send};
pub use partitioner::{murmur2, partition_for};
pub use position::{ORIGIN_HEADER, Origin, POSITION_HEADER, Position};
pub use publisher::{CLEANUP_HEADER, Publisher};
pub use sink::{
    BrokerError, BrokerErrorClass, Delivery, LocalBoxFuture, RecordId, SendId, SendRefused, Sink,
    TopicError,
};
