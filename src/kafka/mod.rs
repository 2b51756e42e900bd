//! The Kafka side: the librdkafka client configuration, the producer as a
//! [`crate::relay::Sink`], and topic preparation.

pub mod config;
pub mod producer;
pub mod topics;

pub use config::{ProducerSettings, SinkSettings};
pub use producer::KafkaSink;
