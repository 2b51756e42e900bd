//! An outbox row to a Kafka record: the columns by name, the payload as
//! stored, the headers column, the extra header columns.

use bytes::Bytes;
use serde_json::Value;

use super::cloudevents::{CloudEvent, timestamp_text_to_rfc3339};
use super::{ChangeContext, RouteError, RouterConfig, check_topic_name};
use crate::record::{HeaderName, KafkaRecord};
use crate::table::{ColumnValue, RelationInfo};

/// Type OIDs of the payload types we can encode.
mod oid {
    pub const BYTEA: u32 = 17;
    pub const TEXT: u32 = 25;
    pub const JSON: u32 = 114;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const JSONB: u32 = 3802;
}

pub(super) fn record(
    config: &RouterConfig,
    relation: &RelationInfo,
    values: &[ColumnValue],
    ctx: ChangeContext,
) -> Result<KafkaRecord, RouteError> {
    let c = &config.columns;
    let row = relation.row(values)?;
    let column = |name: &str| -> Result<&ColumnValue, RouteError> {
        row.get(name).ok_or_else(|| RouteError::MissingColumn {
            table: relation.qualified_name(),
            column: name.to_owned(),
        })
    };
    let required_text = |name: &str| -> Result<&str, RouteError> {
        match column(name)? {
            ColumnValue::Text(t) => {
                std::str::from_utf8(t).map_err(|_| RouteError::NotUtf8(name.to_owned()))
            }
            ColumnValue::Null => Err(RouteError::NullColumn(name.to_owned())),
            ColumnValue::UnchangedToast => Err(RouteError::UnchangedToast(name.to_owned())),
            ColumnValue::Binary(_) => Err(RouteError::BinaryFormat(name.to_owned())),
        }
    };
    let id = required_text(&c.id)?;
    let aggregate_type = required_text(&c.aggregate_type)?;
    let aggregate_id = required_text(&c.aggregate_id)?;
    let event_type = required_text(&c.event_type)?;

    let payload_index =
        relation
            .column_index(&c.payload)
            .ok_or_else(|| RouteError::MissingColumn {
                table: relation.qualified_name(),
                column: c.payload.clone(),
            })?;
    let payload_type = relation.columns[payload_index].type_oid;
    let (value, content_type) = encode_payload(&values[payload_index], payload_type, &c.payload)?;

    let topic = config.topic_template.render(
        aggregate_type,
        event_type,
        &relation.schema,
        &relation.table,
    );
    check_topic_name(&topic).map_err(RouteError::IllegalTopic)?;

    let mut headers: Vec<(HeaderName, Bytes)> = Vec::with_capacity(10);
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
    for extra in &config.header_columns {
        if let Some(ColumnValue::Text(value)) = row.get(&extra.column) {
            headers.push((extra.header.clone().into(), value.clone()));
        }
    }
    if config.cloudevents {
        let time = match row.get(&c.created_at) {
            Some(ColumnValue::Text(t)) => std::str::from_utf8(t)
                .ok()
                .and_then(timestamp_text_to_rfc3339),
            _ => None,
        }
        .unwrap_or_else(|| ctx.commit_time.to_rfc3339());
        let source = match &config.cloudevents_source {
            Some(source) => source
                .replace("{schema}", &relation.schema)
                .replace("{table}", &relation.table),
            None => format!("/walrelay/{}/{}", relation.schema, relation.table),
        };
        CloudEvent {
            id,
            event_type,
            source: &source,
            time: &time,
            content_type,
        }
        .push_headers(&mut headers);
    }
    Ok(KafkaRecord {
        topic,
        key: Some(Bytes::copy_from_slice(aggregate_id.as_bytes())),
        value,
        headers,
    })
}

/// The payload column as the record value, and its content type.
fn encode_payload(
    value: &ColumnValue,
    type_oid: u32,
    column: &str,
) -> Result<(Option<Bytes>, &'static str), RouteError> {
    let content_type = match type_oid {
        oid::JSON | oid::JSONB => "application/json",
        oid::TEXT | oid::VARCHAR | oid::BPCHAR => "text/plain; charset=utf-8",
        oid::BYTEA => "application/octet-stream",
        other => {
            return Err(RouteError::PayloadType {
                column: column.to_owned(),
                oid: other,
            });
        }
    };
    let bytes = match value {
        ColumnValue::Null => return Ok((None, content_type)),
        ColumnValue::Text(t) if type_oid == oid::BYTEA => {
            decode_bytea_hex(t).ok_or_else(|| RouteError::BadBytea(column.to_owned()))?
        }
        ColumnValue::Text(t) => t.clone(),
        ColumnValue::Binary(_) => return Err(RouteError::BinaryFormat(column.to_owned())),
        ColumnValue::UnchangedToast => return Err(RouteError::UnchangedToast(column.to_owned())),
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

/// Each top-level string member of the `headers` JSON object.
fn headers_from_json(
    json: &[u8],
    headers: &mut Vec<(HeaderName, Bytes)>,
) -> Result<(), RouteError> {
    let value: Value =
        serde_json::from_slice(json).map_err(|e| RouteError::HeadersNotJson(e.to_string()))?;
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if let Value::String(s) = v {
                    headers.push(super::user_header(&k, Bytes::from(s)));
                }
            }
            Ok(())
        }
        Value::Null => Ok(()),
        _ => Err(RouteError::HeadersNotObject),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::super::test_support::*;
    use super::super::{ERROR_HEADER, Routed, Router};

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
        let names: Vec<&str> = record.headers.iter().map(|(k, _)| k.as_ref()).collect();
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
    fn a_users_copy_of_a_reserved_header_goes_out_renamed_and_the_relays_own_once() {
        let router = Router::new(config(), "7000");
        let forged = r#"{"id": "an-earlier-event", "ce_type": "Forged", "walrelay_position": "x", "content-type": "text/x", "event_type": "E", "tenant": "acme"}"#;
        let row = tuple(&[
            Some(ID),
            Some("order"),
            Some("order-42"),
            Some("OrderCreated"),
            Some("{}"),
            Some(forged),
            Some("2026-11-23 08:32:03.5+00"),
        ]);
        let Routed::Event(record) = router.route_insert(&outbox_relation(3802, &[]), &row, ctx())
        else {
            panic!("expected an event")
        };
        for name in ["id", "ce_type", "event_type", "content-type"] {
            let copies = record.headers.iter().filter(|(k, _)| k == name).count();
            assert_eq!(copies, 1, "{name}");
        }
        assert_eq!(header(&record, "id"), ID);
        assert_eq!(header(&record, "ce_type"), "OrderCreated");
        assert!(record.header("walrelay_position").is_none());
        assert_eq!(header(&record, "user.id"), "an-earlier-event");
        assert_eq!(header(&record, "user.ce_type"), "Forged");
        assert_eq!(header(&record, "user.walrelay_position"), "x");
        assert_eq!(header(&record, "tenant"), "acme");
        assert!(
            "id_col:id".parse::<crate::router::HeaderColumn>().is_err(),
            "a header column may not take a reserved name"
        );
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
        let Routed::DeadLetter { error, record } = route(23, Some("42")) else {
            panic!()
        };
        assert!(error.to_string().contains("type oid 23"), "{error}");
        assert_eq!(error.kind(), "payload_type");
        assert_eq!(record.topic, "walrelay.dead-letter");
        let Routed::DeadLetter { error, .. } = route(17, Some("not hex")) else {
            panic!()
        };
        assert_eq!(error.kind(), "bad_bytea");
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
        let Routed::DeadLetter { record, error } =
            router.route_insert(&outbox_relation(3802, &[]), &row, ctx())
        else {
            panic!()
        };
        assert_eq!(error.to_string(), "column \"aggregate_id\" is NULL");
        assert_eq!(record.topic, "walrelay.dead-letter");
        assert_eq!(header(&record, ERROR_HEADER), error.to_string());
        assert_eq!(header(&record, "walrelay_error_kind"), "null_column");
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
        let Routed::DeadLetter { error, .. } =
            router.route_insert(&outbox_relation(3802, &[]), &row, ctx())
        else {
            panic!()
        };
        assert!(
            error.to_string().contains("outbox.event.has space"),
            "{error}"
        );
        assert_eq!(error.kind(), "illegal_topic");
    }

    #[test]
    fn a_headers_column_that_is_not_an_object_is_a_dead_letter() {
        let router = Router::new(config(), "7000");
        let row = tuple(&[
            Some(ID),
            Some("a"),
            Some("k"),
            Some("E"),
            Some("{}"),
            Some("[1]"),
            Some("x"),
        ]);
        let Routed::DeadLetter { error, .. } =
            router.route_insert(&outbox_relation(3802, &[]), &row, ctx())
        else {
            panic!()
        };
        assert_eq!(error, super::RouteError::HeadersNotObject);
    }
}
