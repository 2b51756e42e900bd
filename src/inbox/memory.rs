//! In-memory stand-ins for the inbox's Kafka consumer and PostgreSQL
//! store, for testing the consumer loop in-process (`tests.rs`).
//!
//! [`MemoryConsumer`] reads the in-memory broker's per-partition logs
//! (`publish::memory`, `read_committed`) and honours assignment, seek,
//! pause and resume. The test changes its assignment through a
//! [`MemberHandle`]; the change happens inside the loop's next `poll`,
//! through the same [`InboxContext::rebalanced`] that librdkafka's
//! callback calls (cooperative: only the partitions named move). It does
//! not model prefetching: a paused partition delivers nothing. As
//! librdkafka with `auto.offset.reset=earliest`, a partition read past
//! its log's end (its topic made again) starts again from the log's
//! start; it reports the broker's topic ids and watermarks.
//!
//! [`MemoryStore`] keeps the inbox's rows by id and each partition's next
//! offset and topic id, a batch all or nothing, and can lose its
//! connection, refuse for good, or hang.

mod consumer;
mod store;

pub use consumer::{MemberHandle, MemoryConsumer};
pub use store::{Call, Fault, MemoryStore};
