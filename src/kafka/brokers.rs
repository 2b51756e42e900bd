//! Asking a client's cluster for its brokers and nothing else.
//!
//! rust-rdkafka 0.38's metadata call asks for every topic of the cluster
//! (or for one named topic); librdkafka can ask for only the topics the
//! client already uses, none for a new producer, which is a request for
//! the broker list alone. One blocking call on the client's own handle;
//! the metadata it returns is destroyed before the call returns.

use std::time::Duration;

use rdkafka::bindings as rdsys;
use rdkafka::client::{Client, ClientContext};
use rdkafka::error::{KafkaError, KafkaResult};

/// Asks the cluster for its brokers (and the topics the client uses);
/// waits at most `timeout`.
pub fn read_brokers<C: ClientContext>(client: &Client<C>, timeout: Duration) -> KafkaResult<()> {
    let timeout_ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    let mut metadata: *const rdsys::rd_kafka_metadata = std::ptr::null();
    // SAFETY: the handle is the live client `client` borrows; with
    // `all_topics` 0 and no topic handle librdkafka reads no pointer of
    // ours, and the metadata it hands back (only on success) is ours to
    // destroy, here, and read by nothing else.
    let error = unsafe {
        rdsys::rd_kafka_metadata(
            client.native_ptr(),
            0,
            std::ptr::null_mut(),
            &mut metadata,
            timeout_ms,
        )
    };
    if error != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        return Err(KafkaError::MetadataFetch(error.into()));
    }
    if !metadata.is_null() {
        // SAFETY: returned by the successful call above, destroyed once.
        unsafe { rdsys::rd_kafka_metadata_destroy(metadata) };
    }
    Ok(())
}
