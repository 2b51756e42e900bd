//! walrelay: transactional-outbox events from PostgreSQL to Kafka through
//! logical replication.

pub mod lsn;
pub mod pgoutput;
pub mod replication;
pub mod relation_cache;
pub mod tail;
pub mod cli;
pub mod ack_tracker;
pub mod router;
pub mod kafka;
pub mod metrics;
pub mod relay;
pub mod status;
pub mod setup;
pub mod monitor;
pub mod http;
