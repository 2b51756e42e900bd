//! walrelay: transactional-outbox events from PostgreSQL to Kafka through
//! logical replication. `docs/architecture.md` maps the modules to the
//! pipeline and says where each guarantee is enforced.

pub(crate) mod catalog;
pub mod cli;
pub(crate) mod commands;
pub mod dead_letters;
pub(crate) mod http;
pub(crate) mod inbox;
pub mod kafka;
pub mod live;
pub mod lsn;
pub mod metrics;
pub mod pgoutput;
pub(crate) mod poll;
pub mod postgres;
pub mod publish;
pub(crate) mod record;
pub mod relay;
pub(crate) mod replay;
pub mod replication;
pub(crate) mod retention;
pub mod router;
pub mod shutdown;
pub(crate) mod slot_health;
pub(crate) mod slot_record;
pub mod sql;
pub(crate) mod standby;
pub(crate) mod table;
pub(crate) mod timeline;
pub(crate) mod timestamp;
