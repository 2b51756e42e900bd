//! One replication session: the walsender stream, the pgoutput decoder, the
//! relation cache and the transaction being received. It turns the byte
//! stream into [`WalItem`]s that are already checked against the protocol
//! (Begin and Commit pair up, rows belong to a transaction, relations are
//! known before their rows), so the relay's loop only applies them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::error::{RelayError, StreamError};
use super::relation_cache::{RelationCache, RelationInfo};
use crate::lsn::Lsn;
use crate::pgoutput::{LogicalMessage, Message, StreamDecoder, TupleData};
use crate::publish::{LocalBoxFuture, Position};
use crate::replication::{
    ConnectionConfig, FeedbackPositions, ReplicationConnection, ReplicationError, ReplicationEvent,
    ReplicationStream, StartOptions, TimelineHistory,
};
use crate::router::{ChangeAt, ChangeContext};
use crate::timestamp::PgTimestamp;

/// The replication stream as the relay uses it. `ReplicationStream`
/// implements it; the relay's tests use a scripted one.
pub trait WalStream {
    /// The next event, or `None` once the server ended the stream.
    /// Must be cancel-safe: it sits in a `select!`.
    fn recv(&mut self) -> impl Future<Output = Result<Option<ReplicationEvent>, ReplicationError>>;
    /// Sends a standby status update: everything before `flushed` is done.
    fn send_feedback(
        &mut self,
        flushed: Lsn,
        reply_requested: bool,
    ) -> impl Future<Output = Result<(), ReplicationError>>;
    /// Ends streaming cleanly (CopyDone), freeing the walsender.
    fn finish(self) -> impl Future<Output = Result<(), ReplicationError>>;
}

impl WalStream for ReplicationStream {
    fn recv(&mut self) -> impl Future<Output = Result<Option<ReplicationEvent>, ReplicationError>> {
        ReplicationStream::recv(self)
    }

    fn send_feedback(
        &mut self,
        flushed: Lsn,
        reply_requested: bool,
    ) -> impl Future<Output = Result<(), ReplicationError>> {
        ReplicationStream::send_feedback(self, FeedbackPositions::all(flushed), reply_requested)
    }

    fn finish(self) -> impl Future<Output = Result<(), ReplicationError>> {
        ReplicationStream::finish(self)
    }
}

/// What the server told us when the session started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionStart {
    /// The cluster's system identifier.
    pub system_id: String,
    /// The server's timeline and its ancestors.
    pub history: TimelineHistory,
    /// The slot's confirmed position, where the stream starts.
    pub slot_confirmed: Lsn,
    /// The host streaming, for the dashboard.
    pub host: String,
}

/// Opens replication sessions. The real one connects to PostgreSQL; the
/// relay's tests hand out scripted streams.
pub trait Connector {
    type Stream: WalStream;
    /// Connects and starts streaming from the slot's own position.
    fn connect(&mut self) -> LocalBoxFuture<Result<(Self::Stream, SessionStart), RelayError>>;
}

/// A decoded, checked item of the stream.
#[derive(Debug)]
pub enum WalItem {
    Begin {
        commit_time: PgTimestamp,
    },
    Insert {
        relation: Arc<RelationInfo>,
        tuple: TupleData,
        ctx: ChangeContext,
        position: Position,
    },
    /// A logical decoding message; `ctx.commit_time` is its transaction's,
    /// or now for a non-transactional one.
    Message {
        message: Message,
        ctx: ChangeContext,
        in_transaction: bool,
        position: Position,
    },
    Commit {
        end_lsn: Lsn,
    },
    Keepalive {
        wal_end: Lsn,
        reply_requested: bool,
    },
    /// Anything the relay does not act on: relations (cached here),
    /// updates, deletes, truncates, origins, types.
    Other,
}

/// The transaction being received.
#[derive(Clone, Copy, Debug)]
struct IncomingTxn {
    commit_time: PgTimestamp,
    /// Where its commit record is (Begin's final LSN).
    commit_lsn: Lsn,
    /// The last change's LSN and rank, to rank changes sharing an LSN.
    last_change: Option<(Lsn, u16)>,
}

impl IncomingTxn {
    /// The position of the next change, at `lsn`.
    fn position(&mut self, lsn: Lsn) -> Position {
        let rank = match self.last_change {
            Some((last, rank)) if last == lsn => rank.saturating_add(1),
            _ => 0,
        };
        self.last_change = Some((lsn, rank));
        Position {
            commit: self.commit_lsn,
            change: lsn,
            rank,
        }
    }
}

pub struct Session<W> {
    stream: W,
    decoder: StreamDecoder,
    relations: RelationCache,
    open: Option<IncomingTxn>,
    /// When the server last sent anything.
    last_received: tokio::time::Instant,
}

impl<W: WalStream> Session<W> {
    pub fn new(stream: W) -> Self {
        Session {
            stream,
            decoder: StreamDecoder::new(),
            relations: RelationCache::new(),
            open: None,
            last_received: tokio::time::Instant::now(),
        }
    }

    /// When the server last sent anything (data or a keepalive).
    pub fn last_received(&self) -> tokio::time::Instant {
        self.last_received
    }

    /// The next item. Cancel-safe: an event is either fully handled or not
    /// read at all.
    pub async fn next(&mut self) -> Result<WalItem, RelayError> {
        let event = self.stream.recv().await?.ok_or(StreamError::Ended)?;
        self.last_received = tokio::time::Instant::now();
        match event {
            ReplicationEvent::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => Ok(WalItem::Keepalive {
                wal_end,
                reply_requested,
            }),
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => {
                let message =
                    self.decoder
                        .decode(&data)
                        .map_err(|error| ReplicationError::Decode {
                            lsn: wal_start,
                            error,
                        })?;
                self.check(message, wal_start)
            }
        }
    }

    fn check(&mut self, message: LogicalMessage, lsn: Lsn) -> Result<WalItem, RelayError> {
        Ok(match message {
            LogicalMessage::Begin(begin) => {
                if self.open.is_some() {
                    return Err(StreamError::BeginInTransaction.into());
                }
                self.open = Some(IncomingTxn {
                    commit_time: begin.commit_time,
                    commit_lsn: begin.final_lsn,
                    last_change: None,
                });
                WalItem::Begin {
                    commit_time: begin.commit_time,
                }
            }
            LogicalMessage::Commit(commit) => {
                self.open.take().ok_or(StreamError::CommitWithoutBegin)?;
                WalItem::Commit {
                    end_lsn: commit.end_lsn,
                }
            }
            LogicalMessage::Relation(relation) => {
                self.relations.update(&relation);
                WalItem::Other
            }
            LogicalMessage::Insert(insert) => {
                let txn = self
                    .open
                    .as_mut()
                    .ok_or(StreamError::InsertOutsideTransaction)?;
                let relation = self
                    .relations
                    .get(insert.relation_id)
                    .cloned()
                    .ok_or(StreamError::UnknownRelation(insert.relation_id))?;
                WalItem::Insert {
                    relation,
                    tuple: insert.new,
                    ctx: ChangeContext {
                        at: ChangeAt::Lsn(lsn),
                        commit_time: txn.commit_time,
                    },
                    position: txn.position(lsn),
                }
            }
            LogicalMessage::Message(message) => {
                let in_transaction = message.transactional && self.open.is_some();
                let (commit_time, position) = match self.open.as_mut() {
                    Some(txn) if in_transaction => (txn.commit_time, txn.position(lsn)),
                    // A non-transactional message stands alone at its LSN.
                    _ => (
                        PgTimestamp::now(),
                        Position {
                            commit: message.lsn,
                            change: message.lsn,
                            rank: 0,
                        },
                    ),
                };
                WalItem::Message {
                    ctx: ChangeContext {
                        at: ChangeAt::Lsn(lsn),
                        commit_time,
                    },
                    message,
                    in_transaction,
                    position,
                }
            }
            LogicalMessage::Update(_) | LogicalMessage::Delete(_) | LogicalMessage::Truncate(_) => {
                // Not events, but changes: they keep the ranks of later
                // changes at the same LSN what a replay gives them.
                if let Some(txn) = self.open.as_mut() {
                    txn.position(lsn);
                }
                WalItem::Other
            }
            LogicalMessage::Origin(_) | LogicalMessage::Type(_) => WalItem::Other,
            other => return Err(StreamError::Unexpected(other.kind()).into()),
        })
    }

    pub async fn send_feedback(&mut self, flushed: Lsn, reply: bool) -> Result<(), RelayError> {
        Ok(self.stream.send_feedback(flushed, reply).await?)
    }

    /// Ends the session cleanly.
    pub async fn finish(self) -> Result<(), RelayError> {
        Ok(self.stream.finish().await?)
    }
}

/// Connects to PostgreSQL's walsender and starts streaming from the slot.
pub struct PgConnector {
    pub pg: ConnectionConfig,
    pub slot: String,
    pub publication: String,
    /// `None`: the highest pgoutput version the server speaks.
    pub proto_version: Option<u32>,
    /// How long the server may take over the queries that start a session
    /// (`--replication-timeout`): a host that accepts the connection and
    /// then freezes must not hold the relay, so it tries the next host.
    pub setup_timeout: Duration,
}

impl Connector for PgConnector {
    type Stream = ReplicationStream;

    fn connect(&mut self) -> LocalBoxFuture<Result<(ReplicationStream, SessionStart), RelayError>> {
        let pg = self.pg.clone();
        let options = StartOptions {
            slot: self.slot.clone(),
            // 0/0: the server starts at the slot's confirmed position.
            start_lsn: Lsn::ZERO,
            publications: vec![self.publication.clone()],
            proto_version: self.proto_version,
            messages: true,
        };
        let setup_timeout = self.setup_timeout;
        Box::pin(async move {
            let conn = ReplicationConnection::connect(&pg).await?;
            tokio::time::timeout(setup_timeout, start_session(conn, options))
                .await
                .map_err(|_| StreamError::Silent(setup_timeout))?
        })
    }
}

/// Reads what a session needs to know (the system, its timeline history,
/// the slot's position) and starts streaming.
async fn start_session(
    mut conn: ReplicationConnection,
    options: StartOptions,
) -> Result<(ReplicationStream, SessionStart), RelayError> {
    let identity = conn.identify_system().await?;
    let history = if identity.timeline > 1 {
        let content = conn.timeline_history(identity.timeline).await?;
        TimelineHistory::parse(identity.timeline, &content)
    } else {
        TimelineHistory::new(identity.timeline)
    };
    let slot_confirmed = conn.slot_confirmed_lsn(&options.slot).await?;
    let host = conn.address().to_owned();
    let stream = conn.start_replication(&options).await?;
    tracing::debug!(
        proto_version = stream.proto_version(),
        "replication started"
    );
    Ok((
        stream,
        SessionStart {
            system_id: identity.system_id,
            history,
            slot_confirmed: slot_confirmed.unwrap_or(Lsn::ZERO),
            host,
        },
    ))
}
