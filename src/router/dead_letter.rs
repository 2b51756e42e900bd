//! Dead-letter records: what could not be published, with the original
//! data, the reason (`walrelay_error`) and its kind (`walrelay_error_kind`).

use bytes::Bytes;
use serde_json::Value;

use super::{ChangeAt, ChangeContext, RouteError, RouterConfig};
use crate::pgoutput::Message;
use crate::record::KafkaRecord;
use crate::table::{ColumnValue, RelationInfo};

/// Header naming why a record is a dead letter.
pub const ERROR_HEADER: &str = "walrelay_error";
/// Header naming the kind of failure, a stable snake_case name.
pub const ERROR_KIND_HEADER: &str = "walrelay_error_kind";

/// The dead letter for a row: every column as JSON text, the reason, and
/// where the row came from.
pub(super) fn for_row(
    config: &RouterConfig,
    relation: &RelationInfo,
    values: &[ColumnValue],
    ctx: ChangeContext,
    error: &RouteError,
) -> KafkaRecord {
    let mut columns = serde_json::Map::new();
    for (info, value) in relation.columns.iter().zip(values) {
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
    let mut value = serde_json::json!({
        "schema": relation.schema,
        "table": relation.table,
        "columns": columns,
    });
    let position = match ctx.at {
        ChangeAt::Lsn(lsn) => {
            value["lsn"] = Value::String(lsn.to_string());
            ("walrelay_lsn".into(), Bytes::from(lsn.to_string()))
        }
        ChangeAt::Seq(seq) => {
            value["seq"] = Value::from(seq);
            ("walrelay_seq".into(), Bytes::from(seq.to_string()))
        }
    };
    let key = relation
        .column_index(&config.columns.aggregate_id)
        .and_then(|i| match values.get(i) {
            Some(ColumnValue::Text(t)) => Some(t.clone()),
            _ => None,
        });
    KafkaRecord {
        topic: config.dead_letter_topic.clone(),
        key,
        value: Some(Bytes::from(value.to_string())),
        headers: vec![
            (ERROR_HEADER.into(), Bytes::from(error.to_string())),
            (
                ERROR_KIND_HEADER.into(),
                Bytes::from_static(error.kind().as_bytes()),
            ),
            (
                "walrelay_source".into(),
                Bytes::from(relation.qualified_name()),
            ),
            position,
        ],
    }
}

/// The dead letter for a logical decoding message: its content as sent.
pub(super) fn for_message(
    config: &RouterConfig,
    message: &Message,
    error: &RouteError,
) -> KafkaRecord {
    KafkaRecord {
        topic: config.dead_letter_topic.clone(),
        key: None,
        value: Some(message.content.clone()),
        headers: vec![
            (ERROR_HEADER.into(), Bytes::from(error.to_string())),
            (
                ERROR_KIND_HEADER.into(),
                Bytes::from_static(error.kind().as_bytes()),
            ),
            (
                "walrelay_source".into(),
                Bytes::from(format!("message:{}", message.prefix)),
            ),
            ("walrelay_lsn".into(), Bytes::from(message.lsn.to_string())),
        ],
    }
}

/// The dead letter for a record the broker refused for good (too large,
/// not authorized): its key and headers, the reason, and its value when
/// that was not the problem. An oversize value cannot travel; the row is
/// still in the outbox table under its `id` header.
pub(super) fn for_broker_rejection(
    dead_letter_topic: &str,
    original: &KafkaRecord,
    reason: &str,
    kind: &str,
    keep_value: bool,
) -> KafkaRecord {
    let mut headers = original.headers.clone();
    headers.push((ERROR_HEADER.into(), Bytes::from(reason.to_owned())));
    headers.push((ERROR_KIND_HEADER.into(), Bytes::from(kind.to_owned())));
    headers.push((
        "walrelay_original_topic".into(),
        Bytes::from(original.topic.clone()),
    ));
    headers.push((
        "walrelay_original_size".into(),
        Bytes::from(original.value.as_ref().map_or(0, Bytes::len).to_string()),
    ));
    KafkaRecord {
        topic: dead_letter_topic.to_owned(),
        key: original.key.clone(),
        value: if keep_value {
            original.value.clone()
        } else {
            None
        },
        headers,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::test_support::*;
    use super::*;

    #[test]
    fn broker_dead_letter_keeps_headers_and_says_why() {
        let original = KafkaRecord {
            topic: "outbox.event.a".into(),
            key: Some(Bytes::from_static(b"k")),
            value: Some(Bytes::from(vec![0u8; 100])),
            headers: vec![("id".into(), Bytes::from_static(b"x"))],
        };
        let dl = super::super::broker_dead_letter(
            "walrelay.dead-letter",
            &original,
            "message too large",
            "too_large",
            false,
        );
        assert_eq!(dl.topic, "walrelay.dead-letter");
        assert_eq!(dl.value, None);
        assert_eq!(header(&dl, "id"), "x");
        assert_eq!(header(&dl, ERROR_HEADER), "message too large");
        assert_eq!(header(&dl, ERROR_KIND_HEADER), "too_large");
        assert_eq!(header(&dl, "walrelay_original_topic"), "outbox.event.a");
        assert_eq!(header(&dl, "walrelay_original_size"), "100");
    }
}
