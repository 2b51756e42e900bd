//! The replication transport: a walsender connection spoken over tokio with
//! `postgres-protocol` (upstream tokio-postgres has no CopyBoth support).
//!
//! ```text
//!   connect ──> startup (replication=database) ──> auth (trust, password, md5, SCRAM)
//!      │
//!      ├─ IDENTIFY_SYSTEM / CREATE_REPLICATION_SLOT / simple queries
//!      v
//!   START_REPLICATION SLOT s LOGICAL lsn (proto_version, publication_names, messages)
//!      │   CopyBoth
//!      ├── in:  XLogData (one pgoutput message each), primary keepalive
//!      └── out: standby status update (written / flushed / applied LSN)
//! ```
//!
//! Progress: the server keeps a slot's `confirmed_flush_lsn` at the flush
//! position we last reported, and on reconnect resumes decoding from there,
//! skipping every transaction that committed before it. So reporting a
//! position is a promise that everything before it is safe elsewhere; this
//! module only carries the positions, the ack tracker decides them.

pub mod connection;
pub mod error;
mod handshake;
pub mod stream;
mod wire;

pub use crate::postgres::{ConnectionConfig, Password, SslMode};
pub use crate::timeline::TimelineHistory;
pub use connection::{CreatedSlot, ReplicationConnection, StartOptions, SystemIdentity};
pub use error::{ReplicationError, ServerError};
pub use stream::{FeedbackPositions, ReplicationEvent, ReplicationStream};
