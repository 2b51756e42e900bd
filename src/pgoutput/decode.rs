//! Decoding: one checked read at a time, so no input can index past the end.

use bytes::Bytes;

use super::message::*;
use crate::lsn::Lsn;

/// Why a pgoutput message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty pgoutput message")]
    Empty,
    #[error("unknown pgoutput message tag {0:?}")]
    UnknownTag(char),
    #[error("{message}: truncated at byte {offset}, needed {needed} more")]
    Truncated {
        message: &'static str,
        offset: usize,
        needed: usize,
    },
    #[error("{message}: a string at byte {offset} has no terminating NUL")]
    UnterminatedString {
        message: &'static str,
        offset: usize,
    },
    #[error("{message}: a string at byte {offset} is not valid UTF-8")]
    InvalidUtf8 {
        message: &'static str,
        offset: usize,
    },
    #[error("{message}: invalid {field} {value} at byte {offset}")]
    InvalidValue {
        message: &'static str,
        field: &'static str,
        value: i64,
        offset: usize,
    },
    #[error("{message}: {extra} unexpected bytes after the end of the message")]
    TrailingBytes { message: &'static str, extra: usize },
}

/// Decodes one pgoutput message.
///
/// `in_stream` says whether the message arrived between a Stream Start and a
/// Stream Stop: there, data messages carry the streamed transaction's xid.
pub fn decode(body: &Bytes, in_stream: bool) -> Result<LogicalMessage, DecodeError> {
    let tag = *body.first().ok_or(DecodeError::Empty)?;
    let name = tag_name(tag).ok_or(DecodeError::UnknownTag(tag as char))?;
    let mut r = Reader {
        buf: body,
        pos: 1,
        message: name,
    };
    let stream_xid = |r: &mut Reader| -> Result<Option<Xid>, DecodeError> {
        if in_stream {
            r.u32().map(Some)
        } else {
            Ok(None)
        }
    };
    let message = match tag {
        b'B' => LogicalMessage::Begin(Begin {
            final_lsn: r.lsn()?,
            commit_time: r.timestamp()?,
            xid: r.u32()?,
        }),
        b'C' => LogicalMessage::Commit(Commit {
            flags: r.u8()?,
            commit_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            commit_time: r.timestamp()?,
        }),
        b'O' => LogicalMessage::Origin(Origin {
            commit_lsn: r.lsn()?,
            name: r.string()?,
        }),
        b'R' => {
            let xid = stream_xid(&mut r)?;
            let id = r.u32()?;
            let namespace = r.string()?;
            let name = r.string()?;
            let replica_identity = r.replica_identity()?;
            let count = r.count()?;
            let mut columns = Vec::with_capacity(count.min(r.remaining()));
            for _ in 0..count {
                columns.push(Column {
                    is_key: r.u8()? & 1 == 1,
                    name: r.string()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            LogicalMessage::Relation(Relation {
                xid,
                id,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => LogicalMessage::Type(Type {
            xid: stream_xid(&mut r)?,
            oid: r.u32()?,
            namespace: r.string()?,
            name: r.string()?,
        }),
        b'I' => {
            let xid = stream_xid(&mut r)?;
            let relation_id = r.u32()?;
            r.expect_tuple_kind(b"N")?;
            LogicalMessage::Insert(Insert {
                xid,
                relation_id,
                new: r.tuple()?,
            })
        }
        b'U' => {
            let xid = stream_xid(&mut r)?;
            let relation_id = r.u32()?;
            let old = match r.expect_tuple_kind(b"KON")? {
                b'K' => Some(OldTuple::Key(r.tuple()?)),
                b'O' => Some(OldTuple::Full(r.tuple()?)),
                _ => None,
            };
            if old.is_some() {
                r.expect_tuple_kind(b"N")?;
            }
            LogicalMessage::Update(Update {
                xid,
                relation_id,
                old,
                new: r.tuple()?,
            })
        }
        b'D' => {
            let xid = stream_xid(&mut r)?;
            let relation_id = r.u32()?;
            let old = match r.expect_tuple_kind(b"KO")? {
                b'K' => OldTuple::Key(r.tuple()?),
                _ => OldTuple::Full(r.tuple()?),
            };
            LogicalMessage::Delete(Delete {
                xid,
                relation_id,
                old,
            })
        }
        b'T' => {
            let xid = stream_xid(&mut r)?;
            let count = r.u32()? as usize;
            let options = r.u8()?;
            let mut relation_ids = Vec::with_capacity(count.min(r.remaining() / 4));
            for _ in 0..count {
                relation_ids.push(r.u32()?);
            }
            LogicalMessage::Truncate(Truncate {
                xid,
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
                relation_ids,
            })
        }
        b'M' => {
            let xid = stream_xid(&mut r)?;
            let transactional = r.u8()? & 1 == 1;
            let lsn = r.lsn()?;
            let prefix = r.string()?;
            let len = r.len32()?;
            LogicalMessage::Message(Message {
                xid,
                transactional,
                lsn,
                prefix,
                content: r.bytes(len)?,
            })
        }
        b'S' => LogicalMessage::StreamStart(StreamStart {
            xid: r.u32()?,
            first_segment: r.u8()? == 1,
        }),
        b'E' => LogicalMessage::StreamStop,
        b'c' => LogicalMessage::StreamCommit(StreamCommit {
            xid: r.u32()?,
            flags: r.u8()?,
            commit_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            commit_time: r.timestamp()?,
        }),
        b'A' => {
            let xid = r.u32()?;
            let subtransaction_xid = r.u32()?;
            // The abort LSN and time follow only with streaming = parallel.
            let (abort_lsn, abort_time) = if r.remaining() == 0 {
                (None, None)
            } else {
                (Some(r.lsn()?), Some(r.timestamp()?))
            };
            LogicalMessage::StreamAbort(StreamAbort {
                xid,
                subtransaction_xid,
                abort_lsn,
                abort_time,
            })
        }
        b'b' => LogicalMessage::BeginPrepare(BeginPrepare {
            prepare_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            prepare_time: r.timestamp()?,
            xid: r.u32()?,
            gid: r.string()?,
        }),
        b'P' => LogicalMessage::Prepare(r.prepare()?),
        b'p' => LogicalMessage::StreamPrepare(r.prepare()?),
        b'K' => LogicalMessage::CommitPrepared(CommitPrepared {
            flags: r.u8()?,
            commit_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            commit_time: r.timestamp()?,
            xid: r.u32()?,
            gid: r.string()?,
        }),
        b'r' => LogicalMessage::RollbackPrepared(RollbackPrepared {
            flags: r.u8()?,
            prepare_end_lsn: r.lsn()?,
            rollback_end_lsn: r.lsn()?,
            prepare_time: r.timestamp()?,
            rollback_time: r.timestamp()?,
            xid: r.u32()?,
            gid: r.string()?,
        }),
        _ => unreachable!("tag_name accepted only the tags above"),
    };
    r.finish()?;
    Ok(message)
}

/// Decodes a stream of messages, tracking Stream Start / Stream Stop so the
/// streamed transaction's xid is read where the protocol puts it.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    in_stream: bool,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the next message is inside a streamed transaction block.
    pub fn in_stream(&self) -> bool {
        self.in_stream
    }

    pub fn decode(&mut self, body: &Bytes) -> Result<LogicalMessage, DecodeError> {
        let message = decode(body, self.in_stream)?;
        match message {
            LogicalMessage::StreamStart(_) => self.in_stream = true,
            LogicalMessage::StreamStop => self.in_stream = false,
            _ => {}
        }
        Ok(message)
    }
}

fn tag_name(tag: u8) -> Option<&'static str> {
    Some(match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        b'S' => "Stream Start",
        b'E' => "Stream Stop",
        b'c' => "Stream Commit",
        b'A' => "Stream Abort",
        b'b' => "Begin Prepare",
        b'P' => "Prepare",
        b'p' => "Stream Prepare",
        b'K' => "Commit Prepared",
        b'r' => "Rollback Prepared",
        _ => return None,
    })
}

/// A bounds-checked cursor over one message body.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    message: &'static str,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let slice = self
            .buf
            .get(self.pos..self.pos + N)
            .ok_or(self.truncated(N))?;
        self.pos += N;
        // The slice has exactly N bytes.
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    fn truncated(&self, wanted: usize) -> DecodeError {
        DecodeError::Truncated {
            message: self.message,
            offset: self.pos,
            needed: wanted - self.remaining().min(wanted),
        }
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.take()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.take()?))
    }

    fn lsn(&mut self) -> Result<Lsn, DecodeError> {
        Ok(Lsn(u64::from_be_bytes(self.take()?)))
    }

    fn timestamp(&mut self) -> Result<PgTimestamp, DecodeError> {
        Ok(PgTimestamp(self.i64()?))
    }

    fn invalid(&self, field: &'static str, value: i64, offset: usize) -> DecodeError {
        DecodeError::InvalidValue {
            message: self.message,
            field,
            value,
            offset,
        }
    }

    /// An Int16 count that must not be negative.
    fn count(&mut self) -> Result<usize, DecodeError> {
        let offset = self.pos;
        let n = self.i16()?;
        usize::try_from(n).map_err(|_| self.invalid("count", n.into(), offset))
    }

    /// An Int32 byte length that must not be negative.
    fn len32(&mut self) -> Result<usize, DecodeError> {
        let offset = self.pos;
        let n = self.i32()?;
        usize::try_from(n).map_err(|_| self.invalid("length", n.into(), offset))
    }

    /// A zero-copy slice of the input.
    fn bytes(&mut self, len: usize) -> Result<Bytes, DecodeError> {
        if len > self.remaining() {
            return Err(self.truncated(len));
        }
        let out = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(out)
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self) -> Result<String, DecodeError> {
        let offset = self.pos;
        let rest = &self.buf[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::UnterminatedString {
                message: self.message,
                offset,
            })?;
        let text = std::str::from_utf8(&rest[..end]).map_err(|_| DecodeError::InvalidUtf8 {
            message: self.message,
            offset,
        })?;
        self.pos += end + 1;
        Ok(text.to_owned())
    }

    fn replica_identity(&mut self) -> Result<ReplicaIdentity, DecodeError> {
        let offset = self.pos;
        Ok(match self.u8()? {
            b'd' => ReplicaIdentity::Default,
            b'n' => ReplicaIdentity::Nothing,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            other => return Err(self.invalid("replica identity", other.into(), offset)),
        })
    }

    /// Reads a tuple-kind byte (`N`, `K` or `O`) that must be one of `allowed`.
    fn expect_tuple_kind(&mut self, allowed: &[u8]) -> Result<u8, DecodeError> {
        let offset = self.pos;
        let kind = self.u8()?;
        if allowed.contains(&kind) {
            Ok(kind)
        } else {
            Err(self.invalid("tuple kind", kind.into(), offset))
        }
    }

    fn tuple(&mut self) -> Result<TupleData, DecodeError> {
        let count = self.count()?;
        // Each column takes at least one byte: never trust the count for capacity.
        let mut columns = Vec::with_capacity(count.min(self.remaining()));
        for _ in 0..count {
            let offset = self.pos;
            let value = match self.u8()? {
                b'n' => ColumnValue::Null,
                b'u' => ColumnValue::UnchangedToast,
                b't' => {
                    let len = self.len32()?;
                    ColumnValue::Text(self.bytes(len)?)
                }
                b'b' => {
                    let len = self.len32()?;
                    ColumnValue::Binary(self.bytes(len)?)
                }
                other => return Err(self.invalid("column kind", other.into(), offset)),
            };
            columns.push(value);
        }
        Ok(TupleData { columns })
    }

    fn prepare(&mut self) -> Result<Prepare, DecodeError> {
        Ok(Prepare {
            flags: self.u8()?,
            prepare_lsn: self.lsn()?,
            end_lsn: self.lsn()?,
            prepare_time: self.timestamp()?,
            xid: self.u32()?,
            gid: self.string()?,
        })
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes {
                message: self.message,
                extra,
            }),
        }
    }
}
