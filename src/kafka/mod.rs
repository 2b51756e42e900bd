//! The Kafka side: the librdkafka client configuration, the producer as a
//! [`crate::sink::Sink`], topic preparation, what the cluster says of its
//! topics, partition tail scans, topic ids, the broker list, sending
//! what lingers, and the broker probe.

pub mod brokers;
pub mod cluster;
pub mod config;
pub mod errors;
pub mod linger;
pub mod probe;
pub mod producer;
pub mod tail;
pub mod topic_id;
pub mod topic_spec;
pub mod topics;

pub use config::{ProducerSettings, SinkSettings};
pub use producer::KafkaSink;
pub use topic_spec::{Replication, TopicSpec};
