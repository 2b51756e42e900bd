//! The producer: rdkafka with its bundled librdkafka, idempotent, acks=all.
//!
//! Each record carries an [`EventTicket`] through librdkafka; the delivery
//! callback returns it on a channel, and only then does the relay count the
//! event as acknowledged. A full local queue is backpressure (the caller
//! waits and retries), never an error. Deliveries that fail for good
//! (message too large, not authorized) come back with the record so it can
//! go to the dead-letter topic; others are sent again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use tokio::sync::mpsc;

use crate::ack_tracker::TxnTicket;
use crate::pgoutput::PgTimestamp;
use crate::router::KafkaRecord;

/// What travels with a record through librdkafka and back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventTicket {
    pub txn: TxnTicket,
    pub commit_time: PgTimestamp,
    /// The record's size, released from the in-flight window on delivery.
    pub bytes: usize,
    pub dead_letter: bool,
}

/// A delivery report.
#[derive(Debug)]
pub struct Delivery {
    pub ticket: EventTicket,
    pub topic: String,
    pub result: Result<(), DeliveryFailure>,
}

/// A record the broker did not take, and the record itself.
#[derive(Debug)]
pub struct DeliveryFailure {
    pub error: KafkaError,
    pub record: KafkaRecord,
}

impl DeliveryFailure {
    /// True when sending the same record again cannot succeed.
    pub fn is_permanent(&self) -> bool {
        is_permanent(&self.error)
    }
}

/// Errors that no retry can fix: the record must go to the dead letters.
pub fn is_permanent(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::PolicyViolation
                | RDKafkaErrorCode::InvalidTopic
        )
    )
}

struct DeliveryContext {
    deliveries: mpsc::UnboundedSender<Delivery>,
}

impl ClientContext for DeliveryContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(error = %error, reason, "kafka client error");
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<EventTicket>;

    fn delivery(&self, result: &DeliveryResult<'_>, ticket: Box<EventTicket>) {
        let delivery = match result {
            Ok(message) => Delivery {
                ticket: *ticket,
                topic: message.topic().to_owned(),
                result: Ok(()),
            },
            Err((error, message)) => Delivery {
                ticket: *ticket,
                topic: message.topic().to_owned(),
                result: Err(DeliveryFailure {
                    error: error.clone(),
                    record: KafkaRecord {
                        topic: message.topic().to_owned(),
                        key: message.key().map(Bytes::copy_from_slice),
                        value: message.payload().map(Bytes::copy_from_slice),
                        headers: message
                            .headers()
                            .map(|h| {
                                h.iter()
                                    .map(|header| {
                                        (
                                            header.key.to_owned(),
                                            Bytes::copy_from_slice(
                                                header.value.unwrap_or_default(),
                                            ),
                                        )
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    },
                }),
            },
        };
        // The receiver is gone only when the relay is shutting down.
        let _ = self.deliveries.send(delivery);
    }
}

/// Producer settings: the brokers and librdkafka options.
#[derive(Clone, Debug)]
pub struct ProducerSettings {
    pub brokers: String,
    /// `-X key=value` options, applied over walrelay's defaults.
    pub overrides: Vec<(String, String)>,
}

impl ProducerSettings {
    /// The librdkafka configuration: walrelay's defaults, then the user's
    /// overrides, except the two that the delivery guarantee rests on.
    pub fn client_config(&self) -> Result<ClientConfig, String> {
        let mut options: BTreeMap<String, String> = [
            ("bootstrap.servers", self.brokers.as_str()),
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("compression.type", "lz4"),
            // Java clients' partitioner, so keys land where theirs do.
            ("partitioner", "murmur2_random"),
            // Never give up on a record: a broker outage of any length is
            // waited out; the in-flight window bounds what waits.
            ("message.timeout.ms", "0"),
            ("linger.ms", "5"),
            ("batch.num.messages", "10000"),
            ("queue.buffering.max.messages", "1000000"),
            ("queue.buffering.max.kbytes", "1048576"),
            ("message.max.bytes", "1000000"),
            ("client.id", "walrelay"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        for (key, value) in &self.overrides {
            match (key.as_str(), value.as_str()) {
                ("enable.idempotence", v) if v != "true" => {
                    return Err("-X enable.idempotence must stay true: without it a broker failover duplicates or reorders events".into());
                }
                ("acks", v) if v != "all" && v != "-1" => {
                    return Err("-X acks must stay all: with fewer acknowledgements a broker crash loses events that were already confirmed to PostgreSQL".into());
                }
                ("bootstrap.servers", _) => {
                    return Err("set the brokers with --brokers, not -X bootstrap.servers".into());
                }
                _ => {
                    options.insert(key.clone(), value.clone());
                }
            }
        }
        let mut config = ClientConfig::new();
        for (k, v) in options {
            config.set(k, v);
        }
        Ok(config)
    }
}

/// Why a record was not queued.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The local queue is full: wait for deliveries, then try again.
    #[error("the producer queue is full")]
    QueueFull(Box<KafkaRecord>),
    /// librdkafka refused the record itself (too large, say).
    #[error("the producer refused the record: {error}")]
    Refused {
        error: KafkaError,
        record: Box<KafkaRecord>,
    },
}

/// The producer, and the stream of its delivery reports.
pub struct KafkaSink {
    producer: Arc<ThreadedProducer<DeliveryContext>>,
}

/// A handle for the producer's blocking metadata requests, which run on
/// blocking threads. Metadata fetched through the producer itself warms its
/// cache, so the first record to a topic does not wait for a lookup.
#[derive(Clone)]
pub struct MetadataProbe {
    producer: Arc<ThreadedProducer<DeliveryContext>>,
}

impl MetadataProbe {
    /// Whether `topic` exists with at least one partition (blocking).
    pub fn topic_exists(&self, topic: &str, timeout: Duration) -> Result<bool, KafkaError> {
        let metadata = self
            .producer
            .client()
            .fetch_metadata(Some(topic), timeout)?;
        Ok(metadata
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()))
    }

    /// Connects to the cluster (blocking); true when a broker answered.
    pub fn connect(&self, timeout: Duration) -> bool {
        self.producer.client().fetch_metadata(None, timeout).is_ok()
    }
}

impl KafkaSink {
    /// Creates the producer. Delivery reports arrive on the returned channel.
    pub fn new(
        settings: &ProducerSettings,
    ) -> Result<(Self, mpsc::UnboundedReceiver<Delivery>), KafkaError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let config = settings
            .client_config()
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
        let producer: ThreadedProducer<DeliveryContext> =
            config.create_with_context(DeliveryContext { deliveries: tx })?;
        Ok((
            KafkaSink {
                producer: Arc::new(producer),
            },
            rx,
        ))
    }

    /// Queues one record. Its delivery report comes back with `ticket`.
    pub fn send(&self, record: KafkaRecord, ticket: EventTicket) -> Result<(), SendError> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_ref()),
            });
        }
        let mut base: BaseRecord<'_, [u8], [u8], Box<EventTicket>> =
            BaseRecord::with_opaque_to(&record.topic, Box::new(ticket)).headers(headers);
        if let Some(key) = &record.key {
            base = base.key(key.as_ref());
        }
        if let Some(value) = &record.value {
            base = base.payload(value.as_ref());
        }
        match self.producer.send(base) {
            Ok(()) => Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(SendError::QueueFull(Box::new(record)))
            }
            Err((error, _)) => Err(SendError::Refused {
                error,
                record: Box::new(record),
            }),
        }
    }

    /// A handle for metadata requests through this producer.
    pub fn probe(&self) -> MetadataProbe {
        MetadataProbe {
            producer: Arc::clone(&self.producer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(overrides: &[(&str, &str)]) -> ProducerSettings {
        ProducerSettings {
            brokers: "127.0.0.1:9092".into(),
            overrides: overrides
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn defaults_are_idempotent_acks_all_lz4_murmur2() {
        let config = settings(&[]).client_config().unwrap();
        assert_eq!(config.get("enable.idempotence"), Some("true"));
        assert_eq!(config.get("acks"), Some("all"));
        assert_eq!(config.get("compression.type"), Some("lz4"));
        assert_eq!(config.get("partitioner"), Some("murmur2_random"));
        assert_eq!(config.get("message.timeout.ms"), Some("0"));
    }

    #[test]
    fn overrides_apply_but_never_weaken_the_guarantee() {
        let config = settings(&[("linger.ms", "20"), ("security.protocol", "SASL_SSL")])
            .client_config()
            .unwrap();
        assert_eq!(config.get("linger.ms"), Some("20"));
        assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
        assert!(
            settings(&[("acks", "1")])
                .client_config()
                .unwrap_err()
                .contains("acks must stay all")
        );
        assert!(
            settings(&[("enable.idempotence", "false")])
                .client_config()
                .is_err()
        );
        assert!(settings(&[("acks", "-1")]).client_config().is_ok());
    }

    #[test]
    fn size_and_authorization_errors_are_permanent_others_are_not() {
        assert!(is_permanent(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge
        )));
        assert!(is_permanent(&KafkaError::MessageProduction(
            RDKafkaErrorCode::TopicAuthorizationFailed
        )));
        assert!(!is_permanent(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageTimedOut
        )));
        assert!(!is_permanent(&KafkaError::MessageProduction(
            RDKafkaErrorCode::BrokerTransportFailure
        )));
    }
}
