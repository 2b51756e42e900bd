//! The sink: where records go. The Kafka producer implements it
//! (`kafka::KafkaSink`); the relay's own tests use an in-memory one. Its
//! own module, so the relay and the Kafka side meet here and depend on
//! neither each other.
//!
//! A record goes in with an [`EventTicket`]; its [`Delivery`] report comes
//! back on a channel with the same ticket, and only then is the event
//! acknowledged. Errors arrive classified ([`BrokerError`]), so the policy
//! (retry, dead-letter, stop) lives in one place: `relay::error::decide`.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::mpsc;

use crate::ledger::{LedgerScan, Position};
use crate::pgoutput::PgTimestamp;
use crate::record::KafkaRecord;

/// A future the relay polls beside its loop.
pub type LocalBoxFuture<T> = Pin<Box<dyn Future<Output = T>>>;

/// Identifies a transaction inside the relay's ack tracker; events carry
/// it so their acknowledgements find their transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TxnTicket(pub(crate) u64);

/// What travels with a record through the sink and back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventTicket {
    pub txn: TxnTicket,
    pub commit_time: PgTimestamp,
    /// The record's size, released from the in-flight window when settled.
    pub bytes: usize,
    /// The record is a dead letter (of this event).
    pub dead_letter: bool,
    /// The event's position in the WAL (exactly-once delivery).
    pub position: Option<Position>,
}

/// A delivery report.
#[derive(Debug)]
pub struct Delivery {
    pub ticket: EventTicket,
    pub topic: String,
    pub result: Result<(), DeliveryFailure>,
}

/// A record the broker did not take, and the record itself.
#[derive(Debug)]
pub struct DeliveryFailure {
    pub error: BrokerError,
    pub record: KafkaRecord,
}

/// A broker or client error, classified by what sending again can do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BrokerError {
    pub class: BrokerErrorClass,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerErrorClass {
    /// The broker is away, busy, electing a leader: sending again can work.
    Transient,
    /// The record is larger than the producer or the broker accepts.
    TooLarge,
    /// The broker refuses the record's content.
    InvalidRecord,
    /// The client is not allowed to write there.
    NotAuthorized,
}

impl BrokerError {
    pub fn transient(message: impl Into<String>) -> Self {
        BrokerError {
            class: BrokerErrorClass::Transient,
            message: message.into(),
        }
    }
}

/// Why `send` did not queue a record; the record comes back.
#[derive(Debug)]
pub enum SendRefused {
    /// The client's queue is full: backpressure, try again shortly.
    QueueFull(Box<KafkaRecord>),
    /// The client refused the record itself.
    Rejected {
        error: BrokerError,
        record: Box<KafkaRecord>,
    },
}

/// A topic cannot be used (yet).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error(
        "topic {0:?} does not exist and --no-create-topics is set: create it, or drop --no-create-topics"
    )]
    Missing(String),
    #[error("cannot create topic {topic:?}: {reason}")]
    Create {
        topic: String,
        reason: String,
        /// Retrying cannot help (not authorized, invalid name or settings).
        permanent: bool,
    },
    #[error("cannot read metadata for topic {topic:?} (is the broker reachable?): {reason}")]
    Metadata { topic: String, reason: String },
}

/// Where records go.
pub trait Sink {
    /// Queues one record (to `partition`, or where the sink's partitioner
    /// puts it). Its delivery report comes back on [`Sink::deliveries`].
    fn send(
        &mut self,
        record: KafkaRecord,
        partition: Option<i32>,
        ticket: EventTicket,
    ) -> Result<(), SendRefused>;

    /// Delivery reports, in the order the sink produces them.
    fn deliveries(&mut self) -> &mut mpsc::UnboundedReceiver<Delivery>;

    /// Makes sure `topic` exists (creating it when allowed) and returns its
    /// partition count. The relay polls the future beside its loop.
    fn prepare_topic(&self, topic: &str) -> LocalBoxFuture<Result<i32, TopicError>>;

    /// Reads `partition`'s records newest first into `scan` until it has
    /// enough (or the partition's beginning), and gives it back.
    fn scan_tail(
        &self,
        topic: &str,
        partition: i32,
        scan: LedgerScan,
    ) -> LocalBoxFuture<Result<LedgerScan, BrokerError>>;
}
