//! Typed pgoutput messages.

use bytes::Bytes;

use crate::lsn::Lsn;

pub use crate::table::ColumnValue;
pub use crate::timestamp::PgTimestamp;

/// A transaction id.
pub type Xid = u32;
/// A relation's object id.
pub type RelationId = u32;
/// A type's object id.
pub type TypeOid = u32;

/// One decoded pgoutput message.
#[derive(Clone, Debug, PartialEq)]
pub enum LogicalMessage {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(Type),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(Message),
    StreamStart(StreamStart),
    StreamStop,
    StreamCommit(StreamCommit),
    StreamAbort(StreamAbort),
    BeginPrepare(BeginPrepare),
    Prepare(Prepare),
    CommitPrepared(CommitPrepared),
    RollbackPrepared(RollbackPrepared),
    StreamPrepare(Prepare),
}

impl LogicalMessage {
    /// The message's name, as the PostgreSQL documentation spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            LogicalMessage::Begin(_) => "Begin",
            LogicalMessage::Commit(_) => "Commit",
            LogicalMessage::Origin(_) => "Origin",
            LogicalMessage::Relation(_) => "Relation",
            LogicalMessage::Type(_) => "Type",
            LogicalMessage::Insert(_) => "Insert",
            LogicalMessage::Update(_) => "Update",
            LogicalMessage::Delete(_) => "Delete",
            LogicalMessage::Truncate(_) => "Truncate",
            LogicalMessage::Message(_) => "Message",
            LogicalMessage::StreamStart(_) => "StreamStart",
            LogicalMessage::StreamStop => "StreamStop",
            LogicalMessage::StreamCommit(_) => "StreamCommit",
            LogicalMessage::StreamAbort(_) => "StreamAbort",
            LogicalMessage::BeginPrepare(_) => "BeginPrepare",
            LogicalMessage::Prepare(_) => "Prepare",
            LogicalMessage::CommitPrepared(_) => "CommitPrepared",
            LogicalMessage::RollbackPrepared(_) => "RollbackPrepared",
            LogicalMessage::StreamPrepare(_) => "StreamPrepare",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Begin {
    /// The LSN of the commit record: where this transaction ends.
    pub final_lsn: Lsn,
    pub commit_time: PgTimestamp,
    pub xid: Xid,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Commit {
    pub flags: u8,
    /// The LSN of the commit record.
    pub commit_lsn: Lsn,
    /// The end of the commit record: the position to confirm once the
    /// transaction has been handled.
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Origin {
    pub commit_lsn: Lsn,
    pub name: String,
}

/// Replica identity of a relation (`relreplident`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// `d`: the primary key.
    Default,
    /// `n`: none.
    Nothing,
    /// `f`: all columns.
    Full,
    /// `i`: a chosen unique index.
    Index,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Relation {
    /// Set when the message arrives inside a streamed transaction block.
    pub xid: Option<Xid>,
    pub id: RelationId,
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Column {
    /// Part of the replica identity key.
    pub is_key: bool,
    pub name: String,
    pub type_oid: TypeOid,
    pub type_modifier: i32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Type {
    pub xid: Option<Xid>,
    pub oid: TypeOid,
    pub namespace: String,
    pub name: String,
}

/// A row's column values, in the relation's column order.
#[derive(Clone, Debug, PartialEq)]
pub struct TupleData {
    pub columns: Vec<ColumnValue>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Insert {
    pub xid: Option<Xid>,
    pub relation_id: RelationId,
    pub new: TupleData,
}

/// The old row an Update or Delete carries.
#[derive(Clone, Debug, PartialEq)]
pub enum OldTuple {
    /// `K`: only the replica identity key columns (others are null).
    Key(TupleData),
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full(TupleData),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    pub xid: Option<Xid>,
    pub relation_id: RelationId,
    pub old: Option<OldTuple>,
    pub new: TupleData,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Delete {
    pub xid: Option<Xid>,
    pub relation_id: RelationId,
    pub old: OldTuple,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Truncate {
    pub xid: Option<Xid>,
    pub cascade: bool,
    pub restart_identity: bool,
    pub relation_ids: Vec<RelationId>,
}

/// A logical decoding message (`pg_logical_emit_message`).
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub xid: Option<Xid>,
    /// Emitted with `transactional => true`: it is part of a transaction and
    /// arrives between that transaction's Begin and Commit.
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StreamStart {
    pub xid: Xid,
    pub first_segment: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StreamCommit {
    pub xid: Xid,
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StreamAbort {
    pub xid: Xid,
    pub subtransaction_xid: Xid,
    /// Present only with `streaming = parallel` (protocol version 4).
    pub abort_lsn: Option<Lsn>,
    pub abort_time: Option<PgTimestamp>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BeginPrepare {
    pub prepare_lsn: Lsn,
    pub end_lsn: Lsn,
    pub prepare_time: PgTimestamp,
    pub xid: Xid,
    pub gid: String,
}

/// Prepare and Stream Prepare share one layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Prepare {
    pub flags: u8,
    pub prepare_lsn: Lsn,
    pub end_lsn: Lsn,
    pub prepare_time: PgTimestamp,
    pub xid: Xid,
    pub gid: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CommitPrepared {
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
    pub xid: Xid,
    pub gid: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RollbackPrepared {
    pub flags: u8,
    pub prepare_end_lsn: Lsn,
    pub rollback_end_lsn: Lsn,
    pub prepare_time: PgTimestamp,
    pub rollback_time: PgTimestamp,
    pub xid: Xid,
    pub gid: String,
}
