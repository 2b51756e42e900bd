//! The Kafka side: the librdkafka client configuration, the producer as a
//! [`crate::sink::Sink`], topic preparation, partition tail scans, and
//! topic ids.

pub mod config;
pub mod errors;
pub mod producer;
pub mod tail;
pub mod topic_id;
pub mod topics;

pub use config::{ProducerSettings, SinkSettings};
pub use producer::KafkaSink;
