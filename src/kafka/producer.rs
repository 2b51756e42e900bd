//! The producer: rdkafka with its bundled librdkafka, idempotent,
//! acks=all, as the relay's [`Sink`].
//!
//! Each record carries an [`EventTicket`] through librdkafka; the delivery
//! callback returns it on a channel, and only then does the relay count the
//! event as acknowledged. librdkafka's errors are classified here, once,
//! into [`BrokerError`]s; what to do about them is decided in
//! `relay::error::decide`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use tokio::sync::mpsc;

use super::config::SinkSettings;
use super::tail::TailReader;
use super::topics::TopicCreator;
use crate::ledger::LedgerScan;
use crate::record::KafkaRecord;
use crate::sink::{
    BrokerError, BrokerErrorClass, Delivery, DeliveryFailure, EventTicket, LocalBoxFuture,
    SendRefused, Sink, TopicError,
};

/// librdkafka's error, classified by what sending again can do.
pub fn classify(error: &KafkaError) -> BrokerError {
    use RDKafkaErrorCode as C;
    let class = match error.rdkafka_error_code() {
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize) => BrokerErrorClass::TooLarge,
        Some(C::InvalidRecord | C::InvalidMessage | C::PolicyViolation | C::InvalidTopic) => {
            BrokerErrorClass::InvalidRecord
        }
        Some(C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed) => {
            BrokerErrorClass::NotAuthorized
        }
        _ => BrokerErrorClass::Transient,
    };
    BrokerError {
        class,
        message: error.to_string(),
    }
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
                    error: classify(error),
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

/// The producer, its delivery reports, topic preparation and tail scans.
pub struct KafkaSink {
    producer: Arc<ThreadedProducer<DeliveryContext>>,
    deliveries: mpsc::UnboundedReceiver<Delivery>,
    topics: Arc<TopicCreator>,
    tails: Arc<TailReader>,
}

impl KafkaSink {
    /// Creates the producer (nothing connects yet).
    pub fn new(settings: &SinkSettings) -> Result<Self, KafkaError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let config = settings
            .producer
            .client_config()
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
        let producer: ThreadedProducer<DeliveryContext> =
            config.create_with_context(DeliveryContext { deliveries: tx })?;
        let producer = Arc::new(producer);
        let topics = TopicCreator::new(
            &config,
            Arc::clone(&producer),
            settings.create_topics,
            settings.topic_partitions,
            settings.topic_replication_factor,
        )?;
        Ok(KafkaSink {
            producer,
            deliveries: rx,
            topics: Arc::new(topics),
            tails: Arc::new(TailReader::new(&config)),
        })
    }

    /// A handle for connecting from a blocking task.
    pub fn connector(&self) -> impl FnOnce(Duration) -> bool + Send + 'static {
        let producer = Arc::clone(&self.producer);
        move |timeout| producer.client().fetch_metadata(None, timeout).is_ok()
    }
}

impl Sink for KafkaSink {
    fn send(
        &mut self,
        record: KafkaRecord,
        partition: Option<i32>,
        ticket: EventTicket,
    ) -> Result<(), SendRefused> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_ref()),
            });
        }
        let mut base: BaseRecord<'_, [u8], [u8], Box<EventTicket>> =
            BaseRecord::with_opaque_to(&record.topic, Box::new(ticket)).headers(headers);
        if let Some(partition) = partition {
            base = base.partition(partition);
        }
        if let Some(key) = &record.key {
            base = base.key(key.as_ref());
        }
        if let Some(value) = &record.value {
            base = base.payload(value.as_ref());
        }
        let result = self.producer.send(base).map_err(|(error, _)| error);
        match result {
            Ok(()) => Ok(()),
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                Err(SendRefused::QueueFull(Box::new(record)))
            }
            Err(error) => Err(SendRefused::Rejected {
                error: classify(&error),
                record: Box::new(record),
            }),
        }
    }

    fn deliveries(&mut self) -> &mut mpsc::UnboundedReceiver<Delivery> {
        &mut self.deliveries
    }

    fn prepare_topic(&self, topic: &str) -> LocalBoxFuture<Result<i32, TopicError>> {
        let topics = Arc::clone(&self.topics);
        let topic = topic.to_owned();
        Box::pin(async move { topics.prepare(&topic).await })
    }

    fn scan_tail(
        &self,
        topic: &str,
        partition: i32,
        scan: LedgerScan,
    ) -> LocalBoxFuture<Result<LedgerScan, BrokerError>> {
        let tails = Arc::clone(&self.tails);
        let topic = topic.to_owned();
        Box::pin(async move { tails.scan(topic, partition, scan).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_and_authorization_errors_are_classified_others_are_transient() {
        let class = |code| classify(&KafkaError::MessageProduction(code)).class;
        assert_eq!(
            class(RDKafkaErrorCode::MessageSizeTooLarge),
            BrokerErrorClass::TooLarge
        );
        assert_eq!(
            class(RDKafkaErrorCode::TopicAuthorizationFailed),
            BrokerErrorClass::NotAuthorized
        );
        assert_eq!(
            class(RDKafkaErrorCode::MessageTimedOut),
            BrokerErrorClass::Transient
        );
        assert_eq!(
            class(RDKafkaErrorCode::BrokerTransportFailure),
            BrokerErrorClass::Transient
        );
    }
}
