//! walrelay: transactional-outbox events from PostgreSQL to Kafka through
//! logical replication.

pub mod lsn;
pub mod pgoutput;
