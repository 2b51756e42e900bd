//! The broker I/O the publisher waits for: topics being prepared, and the
//! I/O of a session (tail reads, the producer's takeover, commits, aborts).
//!
//! Each session's I/O is tagged with the session it was started in, so a
//! result that arrives after its session ended (the source discarded its
//! records, or began again) is told apart and ignored. Topic preparation
//! and questions about partitions' leaders are tied to no session: their
//! results are always used.

use std::collections::HashSet;
use std::future::Future;
use std::task::{Context, Poll};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;

use super::ledgers::PartitionKey;
use super::scan::LedgerScan;
use super::sink::{BrokerError, LocalBoxFuture, TopicError};

/// Broker I/O that finished.
pub enum Io {
    Prepared(String, Result<i32, TopicError>),
    /// Which of the partitions asked after have no leader.
    Asked(
        HashSet<PartitionKey>,
        Result<Vec<PartitionKey>, BrokerError>,
    ),
    /// Of the current session.
    Session(SessionIo),
    /// Of a session that has ended: ignored.
    Ended,
}

pub enum SessionIo {
    Scanned(PartitionKey, Instant, Result<Box<LedgerScan>, BrokerError>),
    /// A transactional id's takeover finished.
    Initialized(String, Result<(), BrokerError>),
    Committed(Result<(), BrokerError>),
    Aborted(Result<(), BrokerError>),
    /// A cleanup's time to have its records written is up (its round).
    CleanupWaited(u16),
    /// Time to read again a partition whose tail an open transaction hid.
    ReadHiddenAgain(PartitionKey),
}

enum Tagged {
    Prepared(String, Result<i32, TopicError>),
    Asked(
        HashSet<PartitionKey>,
        Result<Vec<PartitionKey>, BrokerError>,
    ),
    /// Of the session it was started in.
    Session(u64, SessionIo),
}

/// The broker I/O under way, and the session new I/O belongs to.
pub struct BrokerIo {
    pending: FuturesUnordered<LocalBoxFuture<Tagged>>,
    /// Counts sessions, so I/O of an ended one is ignored.
    session: u64,
}

impl BrokerIo {
    pub fn new() -> Self {
        BrokerIo {
            pending: FuturesUnordered::new(),
            session: 0,
        }
    }

    /// A new session: what earlier ones' I/O returns is ignored from now on.
    pub fn new_session(&mut self) {
        self.session += 1;
    }

    /// Waits for broker I/O of this session.
    pub fn watch(&mut self, io: impl Future<Output = SessionIo> + 'static) {
        let session = self.session;
        self.pending
            .push(Box::pin(async move { Tagged::Session(session, io.await) }));
    }

    /// Waits for `topic` to be prepared.
    pub fn watch_topic(&mut self, topic: String, prepare: LocalBoxFuture<Result<i32, TopicError>>) {
        self.pending.push(Box::pin(
            async move { Tagged::Prepared(topic, prepare.await) },
        ));
    }

    /// Waits for the answer to which of `asked` have no leader.
    pub fn watch_leaders(
        &mut self,
        asked: HashSet<PartitionKey>,
        answer: LocalBoxFuture<Result<Vec<(String, i32)>, BrokerError>>,
    ) {
        self.pending.push(Box::pin(async move {
            let leaderless = answer.await.map(|partitions| {
                partitions
                    .into_iter()
                    .map(|(topic, partition)| PartitionKey::new(topic, partition))
                    .collect()
            });
            Tagged::Asked(asked, leaderless)
        }));
    }

    /// The next I/O that finished.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Io>> {
        self.pending.poll_next_unpin(cx).map(|io| {
            io.map(|io| match io {
                Tagged::Prepared(topic, result) => Io::Prepared(topic, result),
                Tagged::Asked(asked, result) => Io::Asked(asked, result),
                Tagged::Session(session, io) if session == self.session => Io::Session(io),
                Tagged::Session(..) => Io::Ended,
            })
        })
    }
}
