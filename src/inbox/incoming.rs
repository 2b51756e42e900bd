//! A consumed record, and what the inbox makes of it: its row (the id
//! to de-duplicate on, the key, the headers as JSON, the CloudEvents
//! attributes), or the reason it goes to the dead-letter table instead.
//! Pure: the store writes what this prepares.

/// A record as consumed from Kafka.
#[derive(Clone, Debug)]
pub struct Incoming {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub payload: Option<Vec<u8>>,
    /// The record's timestamp, in milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
}

impl Incoming {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn header_text(&self, name: &str) -> Option<String> {
        self.header(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// Headers as a JSON object: UTF-8 values as strings, others in
    /// bytea's hex form (`\x…`), a header without a value as null. A name
    /// that repeats keeps its last value.
    pub(super) fn headers_json(&self) -> String {
        let object: serde_json::Map<String, serde_json::Value> = self
            .headers
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    None => serde_json::Value::Null,
                    Some(bytes) => match std::str::from_utf8(bytes) {
                        Ok(text) => serde_json::Value::String(text.to_owned()),
                        Err(_) => serde_json::Value::String(hex(bytes)),
                    },
                };
                (k.clone(), value)
            })
            .collect();
        serde_json::Value::Object(object).to_string()
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(2 + bytes.len() * 2);
    out.push_str("\\x");
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Why a record went to the dead-letter table instead of the inbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadLetterKind {
    /// No `id` header: nothing to de-duplicate on.
    MissingId,
    /// The key is not UTF-8 text (the key column is text).
    KeyNotText,
    /// The payload is not UTF-8 text, and the payload column is not bytea.
    PayloadNotText,
    /// PostgreSQL refused the row (payload not valid for its column,
    /// a `ce_time` that is not a timestamp, a constraint of the user's).
    InvalidRow,
}

impl DeadLetterKind {
    pub const ALL: [DeadLetterKind; 4] = [
        DeadLetterKind::MissingId,
        DeadLetterKind::KeyNotText,
        DeadLetterKind::PayloadNotText,
        DeadLetterKind::InvalidRow,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterKind::MissingId => "missing_id",
            DeadLetterKind::KeyNotText => "key_not_text",
            DeadLetterKind::PayloadNotText => "payload_not_text",
            DeadLetterKind::InvalidRow => "invalid_row",
        }
    }
}

/// A row for the inbox table.
pub(super) struct Row<'a> {
    pub(super) record: &'a Incoming,
    pub(super) id: String,
    pub(super) key: Option<String>,
    pub(super) headers: String,
    pub(super) ce_source: Option<String>,
    pub(super) ce_type: Option<String>,
    pub(super) ce_time: Option<String>,
    /// The payload as text, when the column is not bytea.
    pub(super) payload_text: Option<&'a str>,
}

/// The inbox row of a record, or why it cannot have one.
pub(super) fn prepare(
    record: &Incoming,
    payload_is_bytea: bool,
) -> Result<Row<'_>, DeadLetterKind> {
    let id = match record.header("id").or_else(|| record.header("ce_id")) {
        Some(id) if !id.is_empty() => String::from_utf8_lossy(id).into_owned(),
        _ => return Err(DeadLetterKind::MissingId),
    };
    let key = match &record.key {
        None => None,
        Some(k) => Some(String::from_utf8(k.clone()).map_err(|_| DeadLetterKind::KeyNotText)?),
    };
    let payload_text = match (&record.payload, payload_is_bytea) {
        (Some(p), false) => {
            Some(std::str::from_utf8(p).map_err(|_| DeadLetterKind::PayloadNotText)?)
        }
        _ => None,
    };
    Ok(Row {
        record,
        payload_text,
        id,
        key,
        headers: record.headers_json(),
        ce_source: record.header_text("ce_source"),
        ce_type: record
            .header_text("ce_type")
            .or_else(|| record.header_text("event_type")),
        ce_time: record.header_text("ce_time"),
    })
}

pub(super) fn describe(kind: DeadLetterKind) -> &'static str {
    match kind {
        DeadLetterKind::MissingId => {
            "the record has no id header: the inbox de-duplicates on it; have the producer set one (walrelay always does)"
        }
        DeadLetterKind::KeyNotText => {
            "the record's key is not UTF-8 text; the inbox's key column is text"
        }
        DeadLetterKind::PayloadNotText => {
            "the record's value is not UTF-8 text; make the inbox's payload column bytea to keep such values"
        }
        DeadLetterKind::InvalidRow => "PostgreSQL refused the row",
    }
}
