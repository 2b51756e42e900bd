//! The outbox router: a row inserted into an outbox table, or a logical
//! decoding message with walrelay's prefix, becomes one Kafka record.
//!
//! Pure functions over decoded values: no I/O, so every rule of the record
//! contract (DESIGN.md, "Kafka record") is unit-tested here. What cannot
//! become a record (a NULL key, a payload type we cannot encode, a
//! non-transactional message) becomes a dead letter that carries the
//! original data and the reason; nothing is dropped silently.

use bytes::Bytes;
use serde_json::Value;

use crate::lsn::Lsn;
use crate::pgoutput::{ColumnValue, Message, PgTimestamp, TupleData};
use crate::relation_cache::RelationInfo;

/// Type OIDs of the payload types we can encode.
mod oid {
    pub const BYTEA: u32 = 17;
    pub const TEXT: u32 = 25;
    pub const JSON: u32 = 114;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const JSONB: u32 = 3802;
}

/// Header naming why a record is a dead letter.
pub const ERROR_HEADER: &str = "walrelay_error";

/// One Kafka record, ready for the producer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaRecord {
    pub topic: String,
    pub key: Option<Bytes>,
    /// `None` is a tombstone (a NULL payload).
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Bytes)>,
}

impl KafkaRecord {
    /// Bytes this record holds, for the in-flight window.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Bytes::len)
            + self.value.as_ref().map_or(0, Bytes::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    /// A header's value, if present.
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

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
        reason: String,
    },
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
        Ok(HeaderColumn {
            column: column.into(),
            header: header.into(),
        })
    }
}

/// A topic template: `outbox.event.{aggregate_type}` and the like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<TemplatePart>,
    text: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum TemplatePart {
    Literal(String),
    AggregateType,
    EventType,
    Schema,
    Table,
}

impl std::str::FromStr for TopicTemplate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(TemplatePart::Literal(rest[..open].into()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("{text:?}: unclosed '{{'"))?
                + open;
            parts.push(match &rest[open + 1..close] {
                "aggregate_type" => TemplatePart::AggregateType,
                "event_type" => TemplatePart::EventType,
                "schema" => TemplatePart::Schema,
                "table" => TemplatePart::Table,
                other => {
                    return Err(format!(
                        "{text:?}: unknown placeholder {{{other}}}; use {{aggregate_type}}, {{event_type}}, {{schema}} or {{table}}"
                    ));
                }
            });
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Literal(rest.into()));
        }
        let template = TopicTemplate {
            parts,
            text: text.into(),
        };
        // The literal parts alone must already be a legal topic name.
        let sample = template.render("a", "e", "s", "t");
        check_topic_name(&sample).map_err(|e| format!("{text:?}: {e}"))?;
        Ok(template)
    }
}

impl TopicTemplate {
    fn render(&self, aggregate_type: &str, event_type: &str, schema: &str, table: &str) -> String {
        let mut out = String::with_capacity(self.text.len() + aggregate_type.len());
        for part in &self.parts {
            out.push_str(match part {
                TemplatePart::Literal(s) => s,
                TemplatePart::AggregateType => aggregate_type,
                TemplatePart::EventType => event_type,
                TemplatePart::Schema => schema,
                TemplatePart::Table => table,
            });
        }
        out
    }
}

impl std::fmt::Display for TopicTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Kafka's rule for topic names.
pub fn check_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 249 {
        return Err(format!(
            "topic name {name:?} must be 1 to 249 characters long"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("topic name {name:?} is reserved"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic name {name:?} contains {c:?}; only ASCII letters, digits, '.', '_' and '-' are allowed"
        ));
    }
    Ok(())
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

/// Where a change sits in the stream.
#[derive(Clone, Copy, Debug)]
pub struct ChangeContext {
    /// The change's WAL position.
    pub lsn: Lsn,
    /// Its transaction's commit time.
    pub commit_time: PgTimestamp,
}

pub struct Router {
    config: RouterConfig,
    /// The server's system identifier, so LSN-derived ids differ between
    /// clusters.
    system_id: String,
}

/// Namespace of the UUIDs derived from a message's LSN.
const MESSAGE_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6b1f_39d6_4a8e_4c1e_9e5c_2f0d_7a3b_8c41);

impl Router {
    pub fn new(config: RouterConfig, system_id: impl Into<String>) -> Self {
        Router {
            config,
            system_id: system_id.into(),
        }
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
        tuple: &TupleData,
        ctx: ChangeContext,
    ) -> Routed {
        if !self.is_outbox(relation) {
            return Routed::Ignored;
        }
        match self.insert_record(relation, tuple, ctx) {
            Ok(record) => Routed::Event(record),
            Err(reason) => Routed::DeadLetter {
                record: self.row_dead_letter(relation, tuple, ctx, &reason),
                reason,
            },
        }
    }

    fn insert_record(
        &self,
        relation: &RelationInfo,
        tuple: &TupleData,
        ctx: ChangeContext,
    ) -> Result<KafkaRecord, String> {
        let c = &self.config.columns;
        let row = relation.row(tuple).map_err(|e| e.to_string())?;
        let table = relation.qualified_name();
        let column = |name: &str| -> Result<&ColumnValue, String> {
            row.get(name).ok_or_else(|| {
                format!("{table} has no column {name:?}; add it or name the right column with the --*-column flags")
            })
        };
        let required_text = |name: &str| -> Result<&str, String> {
            match column(name)? {
                ColumnValue::Text(t) => {
                    std::str::from_utf8(t).map_err(|_| format!("column {name:?} is not UTF-8"))
                }
                ColumnValue::Null => Err(format!("column {name:?} is NULL")),
                ColumnValue::UnchangedToast => Err(format!(
                    "column {name:?} arrived as an unchanged TOAST value"
                )),
                ColumnValue::Binary(_) => Err(format!("column {name:?} arrived in binary format")),
            }
        };
        let id = required_text(&c.id)?;
        let aggregate_type = required_text(&c.aggregate_type)?;
        let aggregate_id = required_text(&c.aggregate_id)?;
        let event_type = required_text(&c.event_type)?;

        let payload_index = relation
            .column_index(&c.payload)
            .ok_or_else(|| format!("{table} has no column {:?}", c.payload))?;
        let payload_type = relation.columns[payload_index].type_oid;
        let (value, content_type) =
            encode_payload(&tuple.columns[payload_index], payload_type, &c.payload)?;

        let topic = self.config.topic_template.render(
            aggregate_type,
            event_type,
            &relation.schema,
            &relation.table,
        );
        check_topic_name(&topic)?;

        let mut headers: Vec<(String, Bytes)> = Vec::with_capacity(10);
        headers.push(("id".into(), Bytes::copy_from_slice(id.as_bytes())));
        headers.push((
            "event_type".into(),
            Bytes::copy_from_slice(event_type.as_bytes()),
        ));
        if let Some(ColumnValue::Text(json)) = row.get(&c.headers) {
            headers_from_json(json, &mut headers)?;
        }
        // A header column that this table lacks, or that is NULL, is left
        // out: with several outbox tables, not every one has every column.
        for extra in &self.config.header_columns {
            if let Some(ColumnValue::Text(value)) = row.get(&extra.column) {
                headers.push((extra.header.clone(), value.clone()));
            }
        }
        if self.config.cloudevents {
            let time = match row.get(&c.created_at) {
                Some(ColumnValue::Text(t)) => std::str::from_utf8(t)
                    .ok()
                    .and_then(timestamp_text_to_rfc3339),
                _ => None,
            }
            .unwrap_or_else(|| ctx.commit_time.to_rfc3339());
            let source = self.source(&relation.schema, &relation.table);
            push_cloudevents(&mut headers, id, event_type, &source, &time, content_type);
        }
        Ok(KafkaRecord {
            topic,
            key: Some(Bytes::copy_from_slice(aggregate_id.as_bytes())),
            value,
            headers,
        })
    }

    fn source(&self, schema: &str, table: &str) -> String {
        match &self.config.cloudevents_source {
            Some(source) => source.replace("{schema}", schema).replace("{table}", table),
            None => format!("/walrelay/{schema}/{table}"),
        }
    }

    /// A logical decoding message; `ctx.commit_time` is its transaction's
    /// (for a non-transactional message, the time it was received).
    pub fn route_message(&self, message: &Message, ctx: ChangeContext) -> Routed {
        if message.prefix != self.config.message_prefix {
            return Routed::Ignored;
        }
        let result = if message.transactional {
            self.message_record(message, ctx)
        } else {
            Err("non-transactional logical message: it is not atomic with the business write; emit it with pg_logical_emit_message(true, ...)".to_owned())
        };
        match result {
            Ok(record) => Routed::Event(record),
            Err(reason) => {
                let mut headers = vec![
                    (ERROR_HEADER.to_owned(), Bytes::from(reason.clone())),
                    (
                        "walrelay_source".to_owned(),
                        Bytes::from(format!("message:{}", message.prefix)),
                    ),
                    (
                        "walrelay_lsn".to_owned(),
                        Bytes::from(message.lsn.to_string()),
                    ),
                ];
                headers.shrink_to_fit();
                Routed::DeadLetter {
                    record: KafkaRecord {
                        topic: self.config.dead_letter_topic.clone(),
                        key: None,
                        value: Some(message.content.clone()),
                        headers,
                    },
                    reason,
                }
            }
        }
    }

    fn message_record(&self, message: &Message, ctx: ChangeContext) -> Result<KafkaRecord, String> {
        let envelope: Value = serde_json::from_slice(&message.content)
            .map_err(|e| format!("message content is not a JSON object: {e}"))?;
        let Value::Object(fields) = envelope else {
            return Err("message content is not a JSON object".into());
        };
        let text = |name: &str| -> Result<String, String> {
            match fields.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(Value::Number(n)) if name == "aggregate_id" => Ok(n.to_string()),
                Some(Value::Null) | None => Err(format!("message envelope has no {name:?}")),
                Some(_) => Err(format!("message envelope field {name:?} must be a string")),
            }
        };
        let aggregate_type = text("aggregate_type")?;
        let aggregate_id = text("aggregate_id")?;
        let event_type = text("event_type")?;
        let id = match fields.get("id") {
            Some(Value::String(id)) => id.clone(),
            Some(Value::Null) | None => uuid::Uuid::new_v5(
                &MESSAGE_ID_NAMESPACE,
                format!("{}/{}", self.system_id, message.lsn).as_bytes(),
            )
            .to_string(),
            Some(_) => return Err("message envelope field \"id\" must be a string".into()),
        };
        let value = match fields.get("payload") {
            None | Some(Value::Null) => None,
            Some(payload) => Some(Bytes::from(
                serde_json::to_vec(payload).map_err(|e| e.to_string())?,
            )),
        };
        let topic = self
            .config
            .topic_template
            .render(&aggregate_type, &event_type, "", "");
        check_topic_name(&topic)?;
        let mut headers = vec![
            ("id".to_owned(), Bytes::from(id.clone())),
            ("event_type".to_owned(), Bytes::from(event_type.clone())),
        ];
        match fields.get("headers") {
            None | Some(Value::Null) => {}
            Some(Value::Object(map)) => {
                for (k, v) in map {
                    if let Value::String(s) = v {
                        headers.push((k.clone(), Bytes::from(s.clone())));
                    }
                }
            }
            Some(_) => return Err("message envelope field \"headers\" must be an object".into()),
        }
        if self.config.cloudevents {
            let source = match &self.config.cloudevents_source {
                Some(source) => source.replace("{schema}", "").replace("{table}", ""),
                None => format!("/walrelay/message/{}", message.prefix),
            };
            let time = ctx.commit_time.to_rfc3339();
            push_cloudevents(
                &mut headers,
                &id,
                &event_type,
                &source,
                &time,
                "application/json",
            );
        }
        Ok(KafkaRecord {
            topic,
            key: Some(Bytes::from(aggregate_id)),
            value,
            headers,
        })
    }

    /// The dead letter for a row: every column as JSON text, the reason,
    /// and where the row came from.
    fn row_dead_letter(
        &self,
        relation: &RelationInfo,
        tuple: &TupleData,
        ctx: ChangeContext,
        reason: &str,
    ) -> KafkaRecord {
        let mut columns = serde_json::Map::new();
        for (info, value) in relation.columns.iter().zip(&tuple.columns) {
            columns.insert(
                info.name.clone(),
                match value {
                    ColumnValue::Null => Value::Null,
                    ColumnValue::Text(t) => Value::String(String::from_utf8_lossy(t).into_owned()),
                    ColumnValue::Binary(b) => Value::String(format!("\\x{}", hex(b))),
                    ColumnValue::UnchangedToast => Value::String("(unchanged toast)".into()),
                },
            );
        }
        let value = serde_json::json!({
            "schema": relation.schema,
            "table": relation.table,
            "lsn": ctx.lsn.to_string(),
            "columns": columns,
        });
        let key = relation
            .column_index(&self.config.columns.aggregate_id)
            .and_then(|i| match tuple.columns.get(i) {
                Some(ColumnValue::Text(t)) => Some(t.clone()),
                _ => None,
            });
        KafkaRecord {
            topic: self.config.dead_letter_topic.clone(),
            key,
            value: Some(Bytes::from(value.to_string())),
            headers: vec![
                (ERROR_HEADER.to_owned(), Bytes::from(reason.to_owned())),
                (
                    "walrelay_source".to_owned(),
                    Bytes::from(relation.qualified_name()),
                ),
                ("walrelay_lsn".to_owned(), Bytes::from(ctx.lsn.to_string())),
            ],
        }
    }

    /// The dead letter for a record the broker refused for good (too large,
    /// not authorized): its key and headers, the reason, and its value when
    /// that was not the problem. An oversize value cannot travel; the row is
    /// still in the outbox table under its `id` header.
    pub fn broker_dead_letter(
        &self,
        original: &KafkaRecord,
        reason: &str,
        keep_value: bool,
    ) -> KafkaRecord {
        let mut headers = original.headers.clone();
        headers.push((ERROR_HEADER.to_owned(), Bytes::from(reason.to_owned())));
        headers.push((
            "walrelay_original_topic".to_owned(),
            Bytes::from(original.topic.clone()),
        ));
        headers.push((
            "walrelay_original_size".to_owned(),
            Bytes::from(original.value.as_ref().map_or(0, Bytes::len).to_string()),
        ));
        KafkaRecord {
            topic: self.config.dead_letter_topic.clone(),
            key: original.key.clone(),
            value: if keep_value {
                original.value.clone()
            } else {
                None
            },
            headers,
        }
    }
}

fn push_cloudevents(
    headers: &mut Vec<(String, Bytes)>,
    id: &str,
    event_type: &str,
    source: &str,
    time: &str,
    content_type: &str,
) {
    headers.push(("ce_specversion".into(), Bytes::from_static(b"1.0")));
    headers.push(("ce_id".into(), Bytes::copy_from_slice(id.as_bytes())));
    headers.push((
        "ce_type".into(),
        Bytes::copy_from_slice(event_type.as_bytes()),
    ));
    headers.push((
        "ce_source".into(),
        Bytes::copy_from_slice(source.as_bytes()),
    ));
    headers.push(("ce_time".into(), Bytes::copy_from_slice(time.as_bytes())));
    headers.push((
        "content-type".into(),
        Bytes::copy_from_slice(content_type.as_bytes()),
    ));
}

/// The payload column as the record value, and its content type.
fn encode_payload(
    value: &ColumnValue,
    type_oid: u32,
    column: &str,
) -> Result<(Option<Bytes>, &'static str), String> {
    let content_type = match type_oid {
        oid::JSON | oid::JSONB => "application/json",
        oid::TEXT | oid::VARCHAR | oid::BPCHAR => "text/plain; charset=utf-8",
        oid::BYTEA => "application/octet-stream",
        other => {
            return Err(format!(
                "payload column {column:?} has type oid {other}, which walrelay cannot encode; use jsonb, json, text or bytea"
            ));
        }
    };
    let bytes = match value {
        ColumnValue::Null => return Ok((None, content_type)),
        ColumnValue::Text(t) if type_oid == oid::BYTEA => decode_bytea_hex(t)
            .ok_or_else(|| format!("payload column {column:?}: bytea text is not in hex format"))?,
        ColumnValue::Text(t) => t.clone(),
        ColumnValue::Binary(_) => {
            return Err(format!(
                "payload column {column:?} arrived in binary format"
            ));
        }
        ColumnValue::UnchangedToast => {
            return Err(format!(
                "payload column {column:?} arrived as an unchanged TOAST value"
            ));
        }
    };
    Ok((Some(bytes), content_type))
}

/// `\x0a0b` to bytes.
fn decode_bytea_hex(text: &[u8]) -> Option<Bytes> {
    let hex = text.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    hex.chunks_exact(2)
        .map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect::<Option<Vec<u8>>>()
        .map(Bytes::from)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Each top-level string member of the `headers` JSON object.
fn headers_from_json(json: &[u8], headers: &mut Vec<(String, Bytes)>) -> Result<(), String> {
    let value: Value =
        serde_json::from_slice(json).map_err(|e| format!("headers column is not JSON: {e}"))?;
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if let Value::String(s) = v {
                    headers.push((k, Bytes::from(s)));
                }
            }
            Ok(())
        }
        Value::Null => Ok(()),
        _ => Err("headers column is not a JSON object".into()),
    }
}

/// PostgreSQL's ISO timestamp text (`2026-11-23 08:32:03.123456+00`) as
/// RFC 3339 (`2026-11-23T08:32:03.123456Z`). The replication session runs
/// with TimeZone=UTC, so timestamptz values arrive with offset `+00`.
pub fn timestamp_text_to_rfc3339(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    if bytes.len() < 19 || bytes[10] != b' ' || !bytes[..4].iter().all(u8::is_ascii_digit) {
        return None; // infinity, BC dates and the like
    }
    let (datetime, offset) = match text[19..].find(['+', '-']) {
        Some(i) => (&text[..19 + i], &text[19 + i..]),
        None => (text, ""),
    };
    let offset = match offset {
        "" | "+00" | "+00:00" | "-00" => "Z".to_owned(),
        o if o.len() == 3 => format!("{o}:00"),
        o => o.to_owned(),
    };
    Some(format!("{}T{}{offset}", &datetime[..10], &datetime[11..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::{Column, Relation, ReplicaIdentity};

    fn outbox_relation(payload_oid: u32, extra: &[&str]) -> RelationInfo {
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
        RelationInfo::from_message(&Relation {
            xid: None,
            id: 1,
            namespace: "public".into(),
            name: "outbox".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: columns
                .into_iter()
                .map(|(name, type_oid)| Column {
                    is_key: name == "id",
                    name: name.into(),
                    type_oid,
                    type_modifier: -1,
                })
                .collect(),
        })
    }

    fn tuple(values: &[Option<&str>]) -> TupleData {
        TupleData {
            columns: values
                .iter()
                .map(|v| match v {
                    Some(s) => ColumnValue::Text(Bytes::copy_from_slice(s.as_bytes())),
                    None => ColumnValue::Null,
                })
                .collect(),
        }
    }

    fn config() -> RouterConfig {
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

    fn ctx() -> ChangeContext {
        ChangeContext {
            lsn: Lsn(0x1_0000_0000),
            commit_time: PgTimestamp::from_unix_micros(1_795_422_723_000_000),
        }
    }

    fn header<'a>(record: &'a KafkaRecord, name: &str) -> &'a str {
        std::str::from_utf8(
            record
                .header(name)
                .unwrap_or_else(|| panic!("no header {name}")),
        )
        .unwrap()
    }

    const ID: &str = "6f1c1a52-8d7b-4f3e-9a51-2b0c7e4d9f10";

    #[test]
    fn outbox_insert_becomes_the_contract_record() {
        let router = Router::new(config(), "7000");
        let row = tuple(&[
            Some(ID),
            Some("order"),
            Some("order-42"),
            Some("OrderCreated"),
            Some(r#"{"total": 12.5}"#),
            Some(r#"{"traceparent": "00-abc-01", "n": 1}"#),
            Some("2026-11-23 08:32:03.5+00"),
        ]);
        let Routed::Event(record) = router.route_insert(&outbox_relation(3802, &[]), &row, ctx())
        else {
            panic!("expected an event")
        };
        assert_eq!(record.topic, "outbox.event.order");
        assert_eq!(record.key.as_deref(), Some(&b"order-42"[..]));
        assert_eq!(record.value.as_deref(), Some(&br#"{"total": 12.5}"#[..]));
        let names: Vec<&str> = record.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "id",
                "event_type",
                "traceparent",
                "ce_specversion",
                "ce_id",
                "ce_type",
                "ce_source",
                "ce_time",
                "content-type"
            ],
            "non-string members of headers are skipped"
        );
        assert_eq!(header(&record, "id"), ID);
        assert_eq!(header(&record, "event_type"), "OrderCreated");
        assert_eq!(header(&record, "traceparent"), "00-abc-01");
        assert_eq!(header(&record, "ce_specversion"), "1.0");
        assert_eq!(header(&record, "ce_id"), ID);
        assert_eq!(header(&record, "ce_type"), "OrderCreated");
        assert_eq!(header(&record, "ce_source"), "/walrelay/public/outbox");
        assert_eq!(header(&record, "ce_time"), "2026-11-23T08:32:03.5Z");
        assert_eq!(header(&record, "content-type"), "application/json");
    }

    #[test]
    fn payload_types_map_to_values_and_content_types() {
        let router = Router::new(config(), "7000");
        let route = |oid: u32, payload: Option<&str>| {
            let row = tuple(&[
                Some(ID),
                Some("a"),
                Some("k"),
                Some("E"),
                payload,
                Some("{}"),
                Some("2026-01-01 00:00:00+00"),
            ]);
            router.route_insert(&outbox_relation(oid, &[]), &row, ctx())
        };
        let Routed::Event(bytea) = route(17, Some("\\x00ff41")) else {
            panic!()
        };
        assert_eq!(bytea.value.as_deref(), Some(&[0x00, 0xff, 0x41][..]));
        assert_eq!(header(&bytea, "content-type"), "application/octet-stream");
        let Routed::Event(text) = route(25, Some("plain ü")) else {
            panic!()
        };
        assert_eq!(text.value.as_deref(), Some("plain ü".as_bytes()));
        assert_eq!(header(&text, "content-type"), "text/plain; charset=utf-8");
        let Routed::Event(json) = route(114, Some("[1, 2]")) else {
            panic!()
        };
        assert_eq!(json.value.as_deref(), Some(&b"[1, 2]"[..]));
        let Routed::Event(tombstone) = route(3802, None) else {
            panic!()
        };
        assert_eq!(tombstone.value, None, "a NULL payload is a tombstone");
        let Routed::DeadLetter { reason, record } = route(23, Some("42")) else {
            panic!()
        };
        assert!(reason.contains("type oid 23"), "{reason}");
        assert_eq!(record.topic, "walrelay.dead-letter");
    }

    #[test]
    fn null_key_becomes_a_dead_letter_with_the_original_row() {
        let router = Router::new(config(), "7000");
        let row = tuple(&[
            Some(ID),
            Some("order"),
            None,
            Some("E"),
            Some("{}"),
            Some("{}"),
            Some("2026-01-01 00:00:00+00"),
        ]);
        let Routed::DeadLetter { record, reason } =
            router.route_insert(&outbox_relation(3802, &[]), &row, ctx())
        else {
            panic!()
        };
        assert_eq!(reason, "column \"aggregate_id\" is NULL");
        assert_eq!(record.topic, "walrelay.dead-letter");
        assert_eq!(header(&record, ERROR_HEADER), reason);
        assert_eq!(header(&record, "walrelay_source"), "public.outbox");
        let value: Value = serde_json::from_slice(record.value.as_ref().unwrap()).unwrap();
        assert_eq!(value["columns"]["id"], ID);
        assert_eq!(value["columns"]["aggregate_id"], Value::Null);
        assert_eq!(value["lsn"], "1/0");
    }

    #[test]
    fn other_tables_are_ignored() {
        let router = Router::new(config(), "7000");
        let mut relation = outbox_relation(3802, &[]);
        relation.table = "orders".into();
        let row = tuple(&[
            Some(ID),
            Some("a"),
            Some("k"),
            Some("E"),
            Some("{}"),
            Some("{}"),
            Some("x"),
        ]);
        assert_eq!(router.route_insert(&relation, &row, ctx()), Routed::Ignored);
    }

    #[test]
    fn header_columns_template_placeholders_and_custom_source() {
        let mut cfg = config();
        cfg.header_columns = vec![
            "tenant_id:tenant".parse().unwrap(),
            "region".parse().unwrap(),
        ];
        cfg.topic_template = "{schema}.{table}.{aggregate_type}.{event_type}"
            .parse()
            .unwrap();
        cfg.cloudevents_source = Some("urn:shop:{table}".into());
        let router = Router::new(cfg, "7000");
        let row = tuple(&[
            Some(ID),
            Some("order"),
            Some("k"),
            Some("Paid"),
            Some("{}"),
            Some("{}"),
            Some("2026-01-01 00:00:00+00"),
            Some("acme"),
            None,
        ]);
        let Routed::Event(record) = router.route_insert(
            &outbox_relation(3802, &["tenant_id", "region"]),
            &row,
            ctx(),
        ) else {
            panic!()
        };
        assert_eq!(record.topic, "public.outbox.order.Paid");
        assert_eq!(header(&record, "tenant"), "acme");
        assert!(
            record.header("region").is_none(),
            "a NULL header column is omitted"
        );
        assert_eq!(header(&record, "ce_source"), "urn:shop:outbox");
    }

    #[test]
    fn cloudevents_can_be_turned_off() {
        let mut cfg = config();
        cfg.cloudevents = false;
        let router = Router::new(cfg, "7000");
        let row = tuple(&[
            Some(ID),
            Some("a"),
            Some("k"),
            Some("E"),
            Some("{}"),
            Some("{}"),
            Some("2026-01-01 00:00:00+00"),
        ]);
        let Routed::Event(record) = router.route_insert(&outbox_relation(3802, &[]), &row, ctx())
        else {
            panic!()
        };
        assert_eq!(record.headers.len(), 2);
    }

    #[test]
    fn an_aggregate_type_that_makes_an_illegal_topic_is_a_dead_letter() {
        let router = Router::new(config(), "7000");
        let row = tuple(&[
            Some(ID),
            Some("has space"),
            Some("k"),
            Some("E"),
            Some("{}"),
            Some("{}"),
            Some("x"),
        ]);
        let Routed::DeadLetter { reason, .. } =
            router.route_insert(&outbox_relation(3802, &[]), &row, ctx())
        else {
            panic!()
        };
        assert!(reason.contains("outbox.event.has space"), "{reason}");
    }

    fn message(transactional: bool, content: &str) -> Message {
        Message {
            xid: None,
            transactional,
            lsn: Lsn(0xABCD),
            prefix: "walrelay".into(),
            content: Bytes::copy_from_slice(content.as_bytes()),
        }
    }

    #[test]
    fn transactional_message_envelope_becomes_a_record_with_a_stable_lsn_derived_id() {
        let router = Router::new(config(), "7000");
        let m = message(
            true,
            r#"{"aggregate_type":"order","aggregate_id":"7","event_type":"Paid","payload":{"a":[1,2]},"headers":{"traceparent":"t"}}"#,
        );
        let Routed::Event(record) = router.route_message(&m, ctx()) else {
            panic!()
        };
        assert_eq!(record.topic, "outbox.event.order");
        assert_eq!(record.key.as_deref(), Some(&b"7"[..]));
        assert_eq!(record.value.as_deref(), Some(&br#"{"a":[1,2]}"#[..]));
        assert_eq!(header(&record, "traceparent"), "t");
        assert_eq!(header(&record, "ce_time"), "2026-11-23T08:32:03.000000Z");
        let id = header(&record, "id").to_owned();
        assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 5);
        let Routed::Event(again) = router.route_message(&m, ctx()) else {
            panic!()
        };
        assert_eq!(header(&again, "id"), id, "a replay carries the same id");
        let other_cluster = Router::new(config(), "8000");
        let Routed::Event(elsewhere) = other_cluster.route_message(&m, ctx()) else {
            panic!()
        };
        assert_ne!(header(&elsewhere, "id"), id);
        let with_id = message(
            true,
            r#"{"id":"given","aggregate_type":"a","aggregate_id":"k","event_type":"E","payload":null}"#,
        );
        let Routed::Event(record) = router.route_message(&with_id, ctx()) else {
            panic!()
        };
        assert_eq!(header(&record, "id"), "given");
        assert_eq!(record.value, None);
    }

    #[test]
    fn non_transactional_and_malformed_messages_are_dead_letters_and_other_prefixes_ignored() {
        let router = Router::new(config(), "7000");
        let Routed::DeadLetter { reason, record } =
            router.route_message(&message(false, "{}"), ctx())
        else {
            panic!()
        };
        assert!(reason.starts_with("non-transactional"), "{reason}");
        assert_eq!(record.value.as_deref(), Some(&b"{}"[..]));
        let Routed::DeadLetter { reason, .. } =
            router.route_message(&message(true, "not json"), ctx())
        else {
            panic!()
        };
        assert!(reason.contains("not a JSON object"), "{reason}");
        let Routed::DeadLetter { reason, .. } =
            router.route_message(&message(true, r#"{"aggregate_type":"a"}"#), ctx())
        else {
            panic!()
        };
        assert!(reason.contains("aggregate_id"), "{reason}");
        let mut other = message(true, "{}");
        other.prefix = "someone-else".into();
        assert_eq!(router.route_message(&other, ctx()), Routed::Ignored);
    }

    #[test]
    fn topic_templates_are_validated() {
        assert!(
            "outbox.{nope}"
                .parse::<TopicTemplate>()
                .unwrap_err()
                .contains("unknown placeholder {nope}")
        );
        assert!("outbox.{aggregate_type".parse::<TopicTemplate>().is_err());
        assert!(
            "bad topic {table}"
                .parse::<TopicTemplate>()
                .unwrap_err()
                .contains("' '")
        );
        assert!("events".parse::<TopicTemplate>().is_ok());
    }

    #[test]
    fn timestamps_convert_to_rfc3339() {
        assert_eq!(
            timestamp_text_to_rfc3339("2026-11-23 08:32:03.123456+00").as_deref(),
            Some("2026-11-23T08:32:03.123456Z")
        );
        assert_eq!(
            timestamp_text_to_rfc3339("2026-11-23 08:32:03+05:30").as_deref(),
            Some("2026-11-23T08:32:03+05:30")
        );
        assert_eq!(
            timestamp_text_to_rfc3339("2026-11-23 08:32:03-02").as_deref(),
            Some("2026-11-23T08:32:03-02:00")
        );
        assert_eq!(
            timestamp_text_to_rfc3339("2026-11-23 08:32:03").as_deref(),
            Some("2026-11-23T08:32:03Z")
        );
        assert_eq!(timestamp_text_to_rfc3339("infinity"), None);
    }

    #[test]
    fn broker_dead_letter_keeps_headers_and_says_why() {
        let router = Router::new(config(), "7000");
        let original = KafkaRecord {
            topic: "outbox.event.a".into(),
            key: Some(Bytes::from_static(b"k")),
            value: Some(Bytes::from(vec![0u8; 100])),
            headers: vec![("id".into(), Bytes::from_static(b"x"))],
        };
        let dl = router.broker_dead_letter(&original, "message too large", false);
        assert_eq!(dl.topic, "walrelay.dead-letter");
        assert_eq!(dl.value, None);
        assert_eq!(header(&dl, "id"), "x");
        assert_eq!(header(&dl, ERROR_HEADER), "message too large");
        assert_eq!(header(&dl, "walrelay_original_topic"), "outbox.event.a");
        assert_eq!(header(&dl, "walrelay_original_size"), "100");
    }
}
