//! The sink: the broker as the publisher sees it. The Kafka producer
//! implements it (`kafka::KafkaSink`); the in-process tests use an
//! in-memory broker (`publish::memory`).
//!
//! A record goes in with a [`RecordId`]; its [`Delivery`] report comes back
//! with the same id. Errors arrive classified ([`BrokerError`]), so the
//! policy (retry, refuse, stop) lives in one place: `publish::error`.
//!
//! A transactional sink (the default on Apache Kafka) makes records visible
//! to `read_committed` readers only once their transaction commits, and
//! [`Sink::init`] fences every earlier producer of the same transactional
//! id: their open transactions are aborted and they can write no more.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::scan::LedgerScan;
use crate::record::KafkaRecord;

/// A future the publisher polls beside its loop.
pub type LocalBoxFuture<T> = Pin<Box<dyn Future<Output = T>>>;

/// Identifies a record inside the publisher, through the sink and back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordId(pub u64);

/// One send of a record: a record sent again (after an abort) is a new
/// attempt, so a late report of an earlier one is told apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SendId {
    pub id: RecordId,
    /// Wraps around: a report 65,536 sends old is long gone.
    pub attempt: u16,
}

/// A delivery report.
#[derive(Debug)]
pub struct Delivery {
    pub send: SendId,
    pub result: Result<(), BrokerError>,
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
    /// The client is not allowed to write there. An outage to wait out (an
    /// ACL being rotated), never a reason to drop an event.
    NotAuthorized,
    /// Another producer with the same transactional id took over: this one
    /// may write no more.
    Fenced,
    /// The producer cannot go on (a broken idempotent sequence, a fatal
    /// client error): it must be made anew.
    Fatal,
    /// The open transaction cannot commit: abort it and send its records
    /// again.
    Abortable,
}

impl BrokerError {
    pub fn transient(message: impl Into<String>) -> Self {
        BrokerError {
            class: BrokerErrorClass::Transient,
            message: message.into(),
        }
    }

    /// Whether the producer as a whole is done for.
    pub fn ends_producer(&self) -> bool {
        matches!(
            self.class,
            BrokerErrorClass::Fenced | BrokerErrorClass::Fatal
        )
    }
}

/// Why `send` did not queue a record.
#[derive(Debug)]
pub enum SendRefused {
    /// The client's queue is full: backpressure, try again shortly.
    QueueFull,
    /// The client refused the record itself.
    Rejected(BrokerError),
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
    #[error(
        "topic {topic:?} now has {now} partitions where it had {before}: it was deleted and created again with fewer. Keys would move and exactly once could not hold; restore its partition count (or point the relay elsewhere) and start the relay again"
    )]
    Shrank {
        topic: String,
        before: i32,
        now: i32,
    },
}

/// Where records go.
pub trait Sink {
    /// Whether records go out in transactions ([`Sink::init`] before the
    /// first, [`Sink::begin`] / [`Sink::commit`] around them).
    fn transactional(&self) -> bool {
        false
    }

    /// Queues one record (to `partition`, or where the sink's partitioner
    /// puts it). Its delivery report comes back from
    /// [`Sink::poll_delivery`] with the same `send`.
    fn send(
        &mut self,
        record: &KafkaRecord,
        partition: Option<i32>,
        send: SendId,
    ) -> Result<(), SendRefused>;

    /// The next delivery report, in the order the sink produces them.
    fn poll_delivery(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>>;

    /// Makes sure `topic` exists (creating it when allowed) and returns its
    /// partition count; with `create` false, only reads the count.
    fn prepare_topic(&self, topic: &str, create: bool) -> LocalBoxFuture<Result<i32, TopicError>>;

    /// Reads `partition`'s committed records newest first into `scan`
    /// until it has enough (or the partition's beginning), and gives it
    /// back.
    fn scan_tail(
        &self,
        topic: &str,
        partition: i32,
        scan: LedgerScan,
    ) -> LocalBoxFuture<Result<LedgerScan, BrokerError>>;

    /// Of `partitions`, those that have no leader now: they cannot take
    /// writes until a broker holding a replica of them is back.
    fn leaderless(
        &self,
        _partitions: Vec<(String, i32)>,
    ) -> LocalBoxFuture<Result<Vec<(String, i32)>, BrokerError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Transactional sinks: takes over `transactional_id` with a producer
    /// made anew, fencing every earlier producer of it (their open
    /// transactions are aborted). What is sent next goes through it.
    fn init(&mut self, _transactional_id: &str) -> LocalBoxFuture<Result<(), BrokerError>> {
        Box::pin(async { Ok(()) })
    }

    /// Transactional sinks: what is sent next, and `begin`, `commit` and
    /// `abort`, go through the producer of `transactional_id` (taken over
    /// by [`Sink::init`] in this session).
    fn switch_to(&mut self, _transactional_id: &str) {}

    /// Transactional sinks: drops the producer of `transactional_id`. What
    /// it still holds is never committed: its open transaction is aborted
    /// by the broker's transaction timeout, or by the next takeover of the
    /// id.
    fn abandon(&mut self, _transactional_id: &str) {}

    /// Opens a transaction for the records sent next.
    fn begin(&mut self) -> Result<(), BrokerError> {
        Ok(())
    }

    /// Transactional sinks: sends at once what the current producer holds
    /// back to batch (the open transaction takes no more records, and
    /// commits once they are delivered). Returns at once.
    fn send_lingering(&mut self) {}

    /// Commits the open transaction once every record sent in it is
    /// delivered.
    fn commit(&mut self) -> LocalBoxFuture<Result<(), BrokerError>> {
        Box::pin(async { Ok(()) })
    }

    /// Aborts the open transaction: none of its records will be visible.
    fn abort(&mut self) -> LocalBoxFuture<Result<(), BrokerError>> {
        Box::pin(async { Ok(()) })
    }

    /// Makes the producer anew if it failed for good (everything in flight
    /// was abandoned).
    fn renew_if_failed(&mut self) {}
}
