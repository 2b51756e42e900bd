//! A transactional logical decoding message to a Kafka record: the
//! table-less outbox. The content is a JSON envelope with the outbox
//! table's fields.

use bytes::Bytes;
use serde_json::Value;

use super::cloudevents::CloudEvent;
use super::{ChangeContext, RouteError, RouterConfig, check_topic_name};
use crate::pgoutput::Message;
use crate::record::KafkaRecord;

/// Namespace of the UUIDs derived from a message's LSN.
const MESSAGE_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6b1f_39d6_4a8e_4c1e_9e5c_2f0d_7a3b_8c41);

pub(super) fn record(
    config: &RouterConfig,
    system_id: &str,
    timeline: u32,
    message: &Message,
    ctx: ChangeContext,
) -> Result<KafkaRecord, RouteError> {
    let envelope: Value = serde_json::from_slice(&message.content)
        .map_err(|e| RouteError::EnvelopeNotJson(format!(": {e}")))?;
    let Value::Object(fields) = envelope else {
        return Err(RouteError::EnvelopeNotJson(String::new()));
    };
    let text = |name: &'static str| -> Result<String, RouteError> {
        match fields.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) if name == "aggregate_id" => Ok(n.to_string()),
            Some(Value::Null) | None => Err(RouteError::EnvelopeFieldMissing(name)),
            Some(_) => Err(RouteError::EnvelopeFieldType(name, "a string")),
        }
    };
    let aggregate_type = text("aggregate_type")?;
    let aggregate_id = text("aggregate_id")?;
    let event_type = text("event_type")?;
    let id = match fields.get("id") {
        Some(Value::String(id)) => id.clone(),
        // Derived from the message's position: a replay carries the same
        // id. Past a failover's fork a position can be written again on the
        // new timeline, by another message: the timeline then tells them
        // apart (timeline 1 keeps the id it always had).
        Some(Value::Null) | None => {
            let name = match timeline {
                1 => format!("{system_id}/{}", message.lsn),
                _ => format!("{system_id}/{timeline}/{}", message.lsn),
            };
            uuid::Uuid::new_v5(&MESSAGE_ID_NAMESPACE, name.as_bytes()).to_string()
        }
        Some(_) => return Err(RouteError::EnvelopeFieldType("id", "a string")),
    };
    let value = match fields.get("payload") {
        None | Some(Value::Null) => None,
        Some(payload) => Some(Bytes::from(payload.to_string())),
    };
    let topic = config
        .topic_template
        .render(&aggregate_type, &event_type, "", "");
    check_topic_name(&topic).map_err(RouteError::IllegalTopic)?;
    let mut headers = vec![
        ("id".into(), Bytes::from(id.clone())),
        ("event_type".into(), Bytes::from(event_type.clone())),
    ];
    match fields.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (k, v) in map {
                if let Value::String(s) = v {
                    headers.push(super::user_header(k, Bytes::from(s.clone())));
                }
            }
        }
        Some(_) => return Err(RouteError::EnvelopeFieldType("headers", "an object")),
    }
    if config.cloudevents {
        let source = match &config.cloudevents_source {
            Some(source) => source.replace("{schema}", "").replace("{table}", ""),
            None => format!("/walrelay/message/{}", message.prefix),
        };
        CloudEvent {
            id: &id,
            event_type: &event_type,
            source: &source,
            time: &ctx.commit_time.to_rfc3339(),
            content_type: "application/json",
        }
        .push_headers(&mut headers);
    }
    Ok(KafkaRecord {
        topic,
        key: Some(Bytes::from(aggregate_id)),
        value,
        headers,
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::test_support::*;
    use super::super::{Routed, Router};
    use crate::lsn::Lsn;
    use crate::pgoutput::Message;

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
    fn a_position_written_again_past_a_failovers_fork_is_a_new_id() {
        let m = message(
            true,
            r#"{"aggregate_type":"order","aggregate_id":"7","event_type":"Paid","payload":null}"#,
        );
        let id_on = |history: &str, current: u32| {
            let mut router = Router::new(config(), "7000");
            router.set_history(crate::timeline::TimelineHistory::parse(current, history));
            let Routed::Event(record) = router.route_message(&m, ctx()) else {
                panic!()
            };
            header(&record, "id").to_owned()
        };
        let before = id_on("", 1);
        // Promoted past the message: it was written on timeline 1, so a
        // replay from the new primary carries the id it had.
        assert_eq!(
            id_on("1\t0/F0000\tno recovery target specified\n", 2),
            before
        );
        // Promoted before it (a lagging standby): the position now holds
        // another message of timeline 2, which must not pass for a copy.
        let forked = id_on("1\t0/A000\tno recovery target specified\n", 2);
        assert_ne!(forked, before);
        assert_eq!(
            id_on("1\t0/A000\tx\n2\t0/F0000\tx\n", 3),
            forked,
            "stable across a later failover"
        );
    }

    #[test]
    fn non_transactional_and_malformed_messages_are_dead_letters_and_other_prefixes_ignored() {
        let router = Router::new(config(), "7000");
        let Routed::DeadLetter { error, record } =
            router.route_message(&message(false, "{}"), ctx())
        else {
            panic!()
        };
        assert!(
            error.to_string().starts_with("non-transactional"),
            "{error}"
        );
        assert_eq!(error.kind(), "non_transactional");
        assert_eq!(record.value.as_deref(), Some(&b"{}"[..]));
        let Routed::DeadLetter { error, .. } =
            router.route_message(&message(true, "not json"), ctx())
        else {
            panic!()
        };
        assert!(error.to_string().contains("not a JSON object"), "{error}");
        let Routed::DeadLetter { error, .. } =
            router.route_message(&message(true, r#"{"aggregate_type":"a"}"#), ctx())
        else {
            panic!()
        };
        assert!(error.to_string().contains("aggregate_id"), "{error}");
        assert_eq!(error.kind(), "bad_envelope");
        let mut other = message(true, "{}");
        other.prefix = "someone-else".into();
        assert_eq!(router.route_message(&other, ctx()), Routed::Ignored);
    }
}
