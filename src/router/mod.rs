//! The outbox router: a row inserted into an outbox table, or a logical
//! decoding message with walrelay's prefix, becomes one Kafka record.
//!
//! Pure functions over decoded values: no I/O, so every rule of the record
//! contract (docs/architecture.md, "The Kafka record") is unit-tested here.
//! What cannot become a record (a NULL key, a payload type we cannot
//! encode, a non-transactional message) becomes a dead letter that carries
//! the original data and a [`RouteError`]; nothing is dropped silently.
//!
//! | file | concern |
//! | --- | --- |
//! | `row.rs` | an outbox row to a record |
//! | `message.rs` | a logical decoding message envelope to a record |
//! | `template.rs` | topic templates and topic-name rules |
//! | `cloudevents.rs` | the `ce_*` headers |
//! | `dead_letter.rs` | dead-letter records and their headers |

mod cloudevents;
mod dead_letter;
mod message;
mod row;
mod template;

pub use cloudevents::timestamp_text_to_rfc3339;
pub use dead_letter::{ERROR_HEADER, ERROR_KIND_HEADER};
pub use template::{TopicTemplate, check_topic_name};

use bytes::Bytes;

use crate::lsn::Lsn;
use crate::pgoutput::Message;
use crate::record::{HeaderName, KafkaRecord};
use crate::table::{ColumnValue, RelationInfo, RowShapeError};
use crate::timeline::TimelineHistory;
use crate::timestamp::PgTimestamp;

/// What the router made of a change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Routed {
    /// Not an event: another table, or a message with another prefix.
    Ignored,
    Event(KafkaRecord),
    /// Cannot be published as an event; this record goes to the dead-letter
    /// topic instead.
    DeadLetter {
        record: KafkaRecord,
        error: RouteError,
    },
}

/// Why a change cannot become an event. The variant is the dead letter's
/// kind (its `walrelay_error_kind` header); the text is its
/// `walrelay_error` header and names the fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error(
        "{table} has no column {column:?}; add it or name the right column with the --*-column flags"
    )]
    MissingColumn { table: String, column: String },
    #[error("column {0:?} is NULL")]
    NullColumn(String),
    #[error("column {0:?} is not UTF-8")]
    NotUtf8(String),
    #[error("column {0:?} arrived as an unchanged TOAST value")]
    UnchangedToast(String),
    #[error("column {0:?} arrived in binary format")]
    BinaryFormat(String),
    #[error(
        "payload column {column:?} has type oid {oid}, which walrelay cannot encode; use jsonb, json, text or bytea"
    )]
    PayloadType { column: String, oid: u32 },
    #[error("payload column {0:?}: bytea text is not in hex format")]
    BadBytea(String),
    #[error("{0}")]
    IllegalTopic(String),
    #[error("headers column is not JSON: {0}")]
    HeadersNotJson(String),
    #[error("headers column is not a JSON object")]
    HeadersNotObject,
    #[error(transparent)]
    RowShape(#[from] RowShapeError),
    #[error("message content is not a JSON object{0}")]
    EnvelopeNotJson(String),
    #[error("message envelope has no {0:?}")]
    EnvelopeFieldMissing(&'static str),
    #[error("message envelope field {0:?} must be {1}")]
    EnvelopeFieldType(&'static str, &'static str),
    #[error(
        "non-transactional logical message: it is not atomic with the business write; emit it with pg_logical_emit_message(true, ...)"
    )]
    NonTransactional,
}

impl RouteError {
    /// The dead letter's kind, a stable snake_case name.
    pub fn kind(&self) -> &'static str {
        match self {
            RouteError::MissingColumn { .. } => "missing_column",
            RouteError::NullColumn(_) => "null_column",
            RouteError::NotUtf8(_) => "not_utf8",
            RouteError::UnchangedToast(_) => "unchanged_toast",
            RouteError::BinaryFormat(_) => "binary_format",
            RouteError::PayloadType { .. } => "payload_type",
            RouteError::BadBytea(_) => "bad_bytea",
            RouteError::IllegalTopic(_) => "illegal_topic",
            RouteError::HeadersNotJson(_) | RouteError::HeadersNotObject => "bad_headers",
            RouteError::RowShape(_) => "row_shape",
            RouteError::EnvelopeNotJson(_)
            | RouteError::EnvelopeFieldMissing(_)
            | RouteError::EnvelopeFieldType(..) => "bad_envelope",
            RouteError::NonTransactional => "non_transactional",
        }
    }
}

/// Column names of an outbox table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxColumns {
    pub id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub payload: String,
    pub headers: String,
    pub created_at: String,
}

impl Default for OutboxColumns {
    fn default() -> Self {
        OutboxColumns {
            id: "id".into(),
            aggregate_type: "aggregate_type".into(),
            aggregate_id: "aggregate_id".into(),
            event_type: "event_type".into(),
            payload: "payload".into(),
            headers: "headers".into(),
            created_at: "created_at".into(),
        }
    }
}

/// Whether a header name is the relay's own: `id`, `event_type`,
/// `content-type`, `ce_*` and `walrelay_*`. A record carries exactly one of
/// each, the relay's; a user's copy (from the `headers` column or a
/// message's `headers`) goes out renamed with [`USER_HEADER_PREFIX`].
pub fn is_reserved_header(name: &str) -> bool {
    matches!(name, "id" | "event_type" | "content-type")
        || name.starts_with("ce_")
        || name.starts_with("walrelay_")
}

/// What a user's header with a reserved name is renamed to: `user.id`,
/// `user.ce_type`, ...
pub const USER_HEADER_PREFIX: &str = "user.";

/// A user's header, renamed if its name is reserved.
fn user_header(name: &str, value: Bytes) -> (HeaderName, Bytes) {
    if is_reserved_header(name) {
        (format!("{USER_HEADER_PREFIX}{name}").into(), value)
    } else {
        (name.to_owned().into(), value)
    }
}

/// An extra column placed in a header (`--header-column tenant_id[:alias]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderColumn {
    pub column: String,
    pub header: String,
}

impl std::str::FromStr for HeaderColumn {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (column, header) = text.split_once(':').unwrap_or((text, text));
        if column.is_empty() || header.is_empty() {
            return Err(format!(
                "{text:?}: expected COLUMN or COLUMN:HEADER, such as tenant_id:tenant"
            ));
        }
        if is_reserved_header(header) {
            return Err(format!(
                "{text:?}: header {header:?} is walrelay's own (id, event_type, content-type, ce_* and walrelay_* are): name the header differently, such as {column}:app_{header}"
            ));
        }
        Ok(HeaderColumn {
            column: column.into(),
            header: header.into(),
        })
    }
}

/// How to route.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// Outbox tables as `(schema, table)`.
    pub tables: Vec<(String, String)>,
    pub columns: OutboxColumns,
    pub header_columns: Vec<HeaderColumn>,
    pub topic_template: TopicTemplate,
    /// Logical decoding messages with this prefix are events.
    pub message_prefix: String,
    pub dead_letter_topic: String,
    pub cloudevents: bool,
    /// The CloudEvents `source`; default `/walrelay/{schema}/{table}`.
    pub cloudevents_source: Option<String>,
}

/// Where a change sits in its source.
#[derive(Clone, Copy, Debug)]
pub struct ChangeContext {
    pub at: ChangeAt,
    /// Its transaction's commit time (the polling source: the row's
    /// creation time).
    pub commit_time: PgTimestamp,
}

/// A change's place: in the WAL, or in the outbox table's sequence (the
/// polling source).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeAt {
    Lsn(Lsn),
    Seq(i64),
}

pub struct Router {
    config: RouterConfig,
    /// The server's system identifier, so LSN-derived ids differ between
    /// clusters.
    system_id: String,
    /// The server's timelines: a message's id names the timeline it was
    /// written on when that is not the first, so a position reused past a
    /// failover's fork is a new id.
    history: TimelineHistory,
}

impl Router {
    pub fn new(config: RouterConfig, system_id: impl Into<String>) -> Self {
        Router {
            config,
            system_id: system_id.into(),
            history: TimelineHistory::new(1),
        }
    }

    /// The timelines of the server the session streams from.
    pub fn set_history(&mut self, history: TimelineHistory) {
        self.history = history;
    }

    pub fn history(&self) -> &TimelineHistory {
        &self.history
    }

    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// Whether inserts into this relation are events.
    pub fn is_outbox(&self, relation: &RelationInfo) -> bool {
        self.config
            .tables
            .iter()
            .any(|(schema, table)| *schema == relation.schema && *table == relation.table)
    }

    /// An INSERT into `relation`.
    pub fn route_insert(
        &self,
        relation: &RelationInfo,
        values: &[ColumnValue],
        ctx: ChangeContext,
    ) -> Routed {
        if !self.is_outbox(relation) {
            return Routed::Ignored;
        }
        match row::record(&self.config, relation, values, ctx) {
            Ok(record) => Routed::Event(record),
            Err(error) => Routed::DeadLetter {
                record: dead_letter::for_row(&self.config, relation, values, ctx, &error),
                error,
            },
        }
    }

    /// A logical decoding message; `ctx.commit_time` is its transaction's
    /// (for a non-transactional message, the time it was received).
    pub fn route_message(&self, message: &Message, ctx: ChangeContext) -> Routed {
        if message.prefix != self.config.message_prefix {
            return Routed::Ignored;
        }
        let result = if message.transactional {
            let timeline = self.history.timeline_of(message.lsn);
            message::record(&self.config, &self.system_id, timeline, message, ctx)
        } else {
            Err(RouteError::NonTransactional)
        };
        match result {
            Ok(record) => Routed::Event(record),
            Err(error) => Routed::DeadLetter {
                record: dead_letter::for_message(&self.config, message, &error),
                error,
            },
        }
    }
}

/// The dead letter for a record the broker refused for good (too large,
/// not authorized): its key and headers, the reason and its kind, and its
/// value when that was not the problem.
pub fn broker_dead_letter(
    dead_letter_topic: &str,
    original: &KafkaRecord,
    reason: &str,
    kind: &str,
    keep_value: bool,
) -> KafkaRecord {
    dead_letter::for_broker_rejection(dead_letter_topic, original, reason, kind, keep_value)
}

/// The default outbox's routing, for the in-process tests and benches.
#[cfg(any(test, feature = "bench-support"))]
pub fn example_config() -> RouterConfig {
    RouterConfig {
        tables: vec![("public".into(), "outbox".into())],
        columns: OutboxColumns::default(),
        header_columns: vec![],
        topic_template: "outbox.event.{aggregate_type}".parse().unwrap(),
        message_prefix: "walrelay".into(),
        dead_letter_topic: "walrelay.dead-letter".into(),
        cloudevents: true,
        cloudevents_source: None,
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use bytes::Bytes;

    use super::*;
    use crate::table::ColumnInfo;

    pub fn outbox_relation(payload_oid: u32, extra: &[&str]) -> RelationInfo {
        let mut columns = vec![
            ("id", 2950),
            ("aggregate_type", 25),
            ("aggregate_id", 25),
            ("event_type", 25),
            ("payload", payload_oid),
            ("headers", 3802),
            ("created_at", 1184),
        ];
        columns.extend(extra.iter().map(|e| (*e, 25)));
        RelationInfo::new(
            1,
            "public".into(),
            "outbox".into(),
            columns
                .into_iter()
                .map(|(name, type_oid)| ColumnInfo {
                    is_key: name == "id",
                    name: name.into(),
                    type_oid,
                })
                .collect(),
        )
    }

    pub fn tuple(values: &[Option<&str>]) -> Vec<ColumnValue> {
        values
            .iter()
            .map(|v| match v {
                Some(s) => ColumnValue::Text(Bytes::copy_from_slice(s.as_bytes())),
                None => ColumnValue::Null,
            })
            .collect()
    }

    pub use super::example_config as config;

    pub fn ctx() -> ChangeContext {
        ChangeContext {
            at: ChangeAt::Lsn(Lsn(0x1_0000_0000)),
            commit_time: PgTimestamp::from_unix_micros(1_795_422_723_000_000),
        }
    }

    pub fn header<'a>(record: &'a KafkaRecord, name: &str) -> &'a str {
        std::str::from_utf8(
            record
                .header(name)
                .unwrap_or_else(|| panic!("no header {name}")),
        )
        .unwrap()
    }

    pub const ID: &str = "6f1c1a52-8d7b-4f3e-9a51-2b0c7e4d9f10";
}
