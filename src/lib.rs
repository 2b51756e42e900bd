//! walrelay: transactional-outbox events from PostgreSQL to Kafka through
//! logical replication. `docs/architecture.md` maps the modules to the
//! pipeline and says where each guarantee is enforced.

pub mod catalog;
pub mod cli;
pub mod commands;
pub mod dead_letters;
pub mod heartbeat;
pub mod http;
pub mod inbox;
pub mod kafka;
pub mod live;
pub mod lsn;
pub mod metrics;
pub mod monitor;
pub mod pgoutput;
pub mod poll;
pub mod postgres;
pub mod publish;
pub mod record;
pub mod relation_cache;
pub mod relay;
pub mod replay;
pub mod replication;
pub mod retention;
pub mod router;
pub mod shutdown;
pub mod slot_health;
pub mod slot_record;
pub mod sql;
pub mod table;
pub mod timeline;
pub mod timestamp;
