//! Topic ids (KIP-516): the id Kafka gives a topic when it is created. A
//! topic deleted and created again under the same name gets a new one, so
//! the id tells a recreated topic from the old one where offsets cannot.
//!
//! rust-rdkafka 0.38 has no safe wrapper for librdkafka's DescribeTopics
//! admin call, the one public way to read a topic's id (the metadata
//! structs it wraps leave the id out). This module and `brokers.rs` hold
//! walrelay's only `unsafe` code: one blocking call on a client's own
//! handle (a consumer may make admin calls), each pointer used only while
//! the object that owns it lives. DescribeTopics is a metadata request that never creates
//! a topic.

use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char};
use std::time::Duration;

use rdkafka::bindings as rdsys;
use rdkafka::client::{Client, ClientContext};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};

/// Each topic's id, as Kafka's tools print it (URL-safe base64 of its 16
/// bytes, unpadded); `Ok(None)` when the broker keeps no topic ids (older
/// than Kafka 2.8), an error for a topic the broker could not describe
/// (unknown, not authorized). Waits at most `timeout`.
pub fn topic_ids<C: ClientContext>(
    client: &Client<C>,
    topics: &[&str],
    timeout: Duration,
) -> KafkaResult<HashMap<String, KafkaResult<Option<String>>>> {
    let names: Vec<CString> = topics
        .iter()
        .map(|t| CString::new(*t))
        .collect::<Result<_, _>>()
        .map_err(|_| KafkaError::AdminOpCreation("a topic name holds a NUL byte".into()))?;
    let mut pointers: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
    let timeout_ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    let rk = client.native_ptr();
    // SAFETY: `rk` is the live client `client` borrows. librdkafka copies
    // the topic names and the options into the request, so the collection
    // and the options are destroyed right after the call; the queue is
    // ours until destroyed, and the request keeps its own reference to it
    // (an answer arriving after the timeout is dropped with it). The event
    // and everything read from it are used only before it is destroyed.
    unsafe {
        let collection =
            rdsys::rd_kafka_TopicCollection_of_topic_names(pointers.as_mut_ptr(), pointers.len());
        let options = rdsys::rd_kafka_AdminOptions_new(
            rk,
            rdsys::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS,
        );
        let mut errstr = [0 as c_char; 256];
        rdsys::rd_kafka_AdminOptions_set_request_timeout(
            options,
            timeout_ms,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        let queue = rdsys::rd_kafka_queue_new(rk);
        rdsys::rd_kafka_DescribeTopics(rk, collection, options, queue);
        rdsys::rd_kafka_TopicCollection_destroy(collection);
        rdsys::rd_kafka_AdminOptions_destroy(options);
        let event = rdsys::rd_kafka_queue_poll(queue, timeout_ms);
        rdsys::rd_kafka_queue_destroy(queue);
        if event.is_null() {
            return Err(KafkaError::AdminOp(RDKafkaErrorCode::OperationTimedOut));
        }
        let result = described(event);
        rdsys::rd_kafka_event_destroy(event);
        result
    }
}

/// The topics a DescribeTopics result event describes.
///
/// # Safety
/// `event` must be a live event from `rd_kafka_DescribeTopics`' queue.
unsafe fn described(
    event: *mut rdsys::rd_kafka_event_t,
) -> KafkaResult<HashMap<String, KafkaResult<Option<String>>>> {
    // SAFETY: `event` is live (the caller's promise); every pointer read
    // here belongs to it and is copied out before it returns.
    unsafe {
        let error = rdsys::rd_kafka_event_error(event);
        if error != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(KafkaError::AdminOp(error.into()));
        }
        let result = rdsys::rd_kafka_event_DescribeTopics_result(event);
        if result.is_null() {
            return Err(KafkaError::AdminOpCreation(
                "DescribeTopics answered with another event".into(),
            ));
        }
        let mut count = 0;
        let descriptions = rdsys::rd_kafka_DescribeTopics_result_topics(result, &mut count);
        let mut ids = HashMap::new();
        for i in 0..count {
            let description = *descriptions.add(i);
            let name = CStr::from_ptr(rdsys::rd_kafka_TopicDescription_name(description))
                .to_string_lossy()
                .into_owned();
            let error = rdsys::rd_kafka_TopicDescription_error(description);
            let id = if error.is_null() {
                let uuid = rdsys::rd_kafka_TopicDescription_topic_id(description);
                Ok((!uuid.is_null())
                    .then(|| {
                        format_topic_id(
                            rdsys::rd_kafka_Uuid_most_significant_bits(uuid),
                            rdsys::rd_kafka_Uuid_least_significant_bits(uuid),
                        )
                    })
                    .flatten())
            } else {
                Err(KafkaError::AdminOp(
                    rdsys::rd_kafka_error_code(error).into(),
                ))
            };
            ids.insert(name, id);
        }
        Ok(ids)
    }
}

/// A topic id as Kafka's tools print it (Java's `Uuid.toString`: URL-safe
/// base64, no padding); `None` for the zero id a broker without topic ids
/// sends.
pub fn format_topic_id(most: i64, least: i64) -> Option<String> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    if most == 0 && least == 0 {
        return None;
    }
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&most.to_be_bytes());
    bytes[8..].copy_from_slice(&least.to_be_bytes());
    let mut out = String::with_capacity(22);
    for chunk in bytes.chunks(3) {
        let mut group = [0u8; 3];
        group[..chunk.len()].copy_from_slice(chunk);
        let n = u32::from_be_bytes([0, group[0], group[1], group[2]]);
        for k in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * k)) & 63) as usize] as char);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topic_id_reads_as_kafkas_tools_print_it() {
        // Kafka's `Uuid.ONE_UUID` (the metadata topic's id), and the id
        // of all ones bits.
        assert_eq!(
            format_topic_id(0, 1).as_deref(),
            Some("AAAAAAAAAAAAAAAAAAAAAQ")
        );
        assert_eq!(
            format_topic_id(-1, -1).as_deref(),
            Some("_____________________w")
        );
        assert_eq!(format_topic_id(0, 0), None, "the zero id is no id");
    }
}
