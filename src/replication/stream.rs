//! CopyBoth: XLogData and keepalives in, standby status updates out.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::message::{backend, frontend};

use super::error::ReplicationError;
use super::wire::{BackendMessage, Wire, copy_data};
use crate::lsn::Lsn;
use crate::timestamp::PgTimestamp;

/// What the walsender sends while streaming.
#[derive(Clone, Debug, PartialEq)]
pub enum ReplicationEvent {
    /// One pgoutput message.
    XLogData {
        /// Where the message's WAL starts.
        wal_start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        send_time: PgTimestamp,
        data: Bytes,
    },
    /// The server is alive; it wants an answer at once when `reply_requested`.
    Keepalive {
        wal_end: Lsn,
        send_time: PgTimestamp,
        reply_requested: bool,
    },
}

/// Positions reported to the server in a standby status update (the
/// "feedback" of the protocol).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FeedbackPositions {
    pub written: Lsn,
    pub flushed: Lsn,
    pub applied: Lsn,
}

impl FeedbackPositions {
    /// Everything up to `lsn` is durably handled.
    pub fn all(lsn: Lsn) -> Self {
        FeedbackPositions {
            written: lsn,
            flushed: lsn,
            applied: lsn,
        }
    }
}

/// A replication connection in CopyBoth mode.
pub struct ReplicationStream {
    wire: Wire,
    proto_version: u32,
    /// CopyDone sent by us; the server's remaining data is drained.
    copy_done_sent: bool,
}

impl ReplicationStream {
    pub(crate) fn new(wire: Wire, proto_version: u32) -> Self {
        ReplicationStream {
            wire,
            proto_version,
            copy_done_sent: false,
        }
    }

    /// The pgoutput protocol version in use.
    pub fn proto_version(&self) -> u32 {
        self.proto_version
    }

    /// The next event, or `None` once the server has ended the stream.
    /// Cancel-safe, so it can sit in a `select!` beside other work.
    pub async fn recv(&mut self) -> Result<Option<ReplicationEvent>, ReplicationError> {
        loop {
            let message = match self.wire.read_message().await? {
                BackendMessage::Other(message) => message,
                BackendMessage::CopyBothResponse => {
                    return Err(ReplicationError::Protocol("second CopyBothResponse".into()));
                }
            };
            match message {
                backend::Message::CopyData(body) => {
                    return parse_copy_data(body.into_bytes()).map(Some);
                }
                backend::Message::CopyDone => return Ok(None),
                backend::Message::ErrorResponse(body) => {
                    return Err(self.wire.server_error(body.fields()));
                }
                backend::Message::NoticeResponse(_) | backend::Message::ParameterStatus(_) => {}
                backend::Message::CommandComplete(_) | backend::Message::ReadyForQuery(_) => {
                    return Ok(None);
                }
                _ => {
                    return Err(ReplicationError::Protocol(
                        "unexpected message in CopyBoth mode".into(),
                    ));
                }
            }
        }
    }

    /// Sends a standby status update. Positions are "handled up to here": the
    /// server may recycle WAL before `flushed` and will restart decoding there.
    pub async fn send_feedback(
        &mut self,
        positions: FeedbackPositions,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        let mut payload = BytesMut::with_capacity(34);
        payload.put_u8(b'r');
        payload.put_u64(positions.written.0);
        payload.put_u64(positions.flushed.0);
        payload.put_u64(positions.applied.0);
        payload.put_i64(PgTimestamp::now().0);
        payload.put_u8(u8::from(reply_requested));
        copy_data(payload.freeze(), self.wire.out())?;
        self.wire.flush().await
    }

    /// Ends streaming cleanly: sends CopyDone and reads until the server has
    /// finished (its CopyDone, CommandComplete and ReadyForQuery).
    pub async fn finish(mut self) -> Result<(), ReplicationError> {
        if !self.copy_done_sent {
            frontend::copy_done(self.wire.out());
            self.wire.flush().await?;
            self.copy_done_sent = true;
        }
        loop {
            match self.wire.read_message().await? {
                BackendMessage::Other(backend::Message::ReadyForQuery(_)) => break,
                BackendMessage::Other(backend::Message::ErrorResponse(body)) => {
                    return Err(self.wire.server_error(body.fields()));
                }
                _ => {}
            }
        }
        frontend::terminate(self.wire.out());
        self.wire.flush().await
    }
}

fn parse_copy_data(mut data: Bytes) -> Result<ReplicationEvent, ReplicationError> {
    let short = || ReplicationError::Protocol("replication message shorter than its header".into());
    if data.is_empty() {
        return Err(short());
    }
    match data.get_u8() {
        b'w' => {
            if data.len() < 24 {
                return Err(short());
            }
            let wal_start = Lsn(data.get_u64());
            let wal_end = Lsn(data.get_u64());
            let send_time = PgTimestamp(data.get_i64());
            Ok(ReplicationEvent::XLogData {
                wal_start,
                wal_end,
                send_time,
                data,
            })
        }
        b'k' => {
            if data.len() < 17 {
                return Err(short());
            }
            Ok(ReplicationEvent::Keepalive {
                wal_end: Lsn(data.get_u64()),
                send_time: PgTimestamp(data.get_i64()),
                reply_requested: data.get_u8() == 1,
            })
        }
        other => Err(ReplicationError::Protocol(format!(
            "unknown replication message tag {:?}",
            other as char
        ))),
    }
}
