//! The Kafka side: a producer whose delivery reports feed the ack tracker,
//! and topic management.

pub mod producer;
pub mod topics;

pub use producer::{
    Delivery, DeliveryFailure, EventTicket, KafkaSink, MetadataProbe, ProducerSettings, SendError,
};
pub use topics::{TopicError, TopicManager};
