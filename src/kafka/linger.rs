//! Sending at once what a producer holds back to batch.
//!
//! librdkafka sends a batch before its `linger.ms` only while a flush call
//! is under way: the call marks the producer as flushing, wakes its broker
//! threads, and waits for every record it holds to be delivered. rust-rdkafka
//! 0.38's flush calls it with no wait (the mark may be gone before a
//! broker thread looks) and then polls 100 ms at a time; so one call that
//! waits, made here, on the caller's (blocking) thread.

use std::time::Duration;

use rdkafka::bindings as rdsys;
use rdkafka::client::ClientContext;
use rdkafka::producer::{Producer, ProducerContext, ThreadedProducer};

/// Sends what `producer` lingers on at once, and keeps sending so until
/// everything it holds is delivered or `wait` is over. Blocks.
pub fn send_lingering<C>(producer: &ThreadedProducer<C>, wait: Duration)
where
    C: ProducerContext + ClientContext,
{
    let wait_ms = wait.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: the handle is the live producer `producer` borrows. Its
    // delivery reports come as events its polling thread serves, so
    // librdkafka's flush only waits for their count to reach zero.
    unsafe { rdsys::rd_kafka_flush(producer.client().native_ptr(), wait_ms) };
}
