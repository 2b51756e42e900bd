//! walrelay: transactional-outbox events from PostgreSQL to Kafka through
//! logical replication.

pub mod ack_tracker;
pub mod check;
pub mod cli;
pub mod heartbeat;
pub mod http;
pub mod kafka;
pub mod lsn;
pub mod metrics;
pub mod monitor;
pub mod pgoutput;
pub mod relation_cache;
pub mod relay;
pub mod replication;
pub mod router;
pub mod setup;
pub mod status;
pub mod status_command;
pub mod tail;
