//! The producer: rdkafka with its bundled librdkafka, idempotent,
//! acks=all, as the publisher's [`Sink`]; transactional for exactly-once
//! delivery.
//!
//! Each record carries its [`RecordId`] through librdkafka; the delivery
//! callback returns it on a channel. librdkafka's errors are classified
//! here, once, into [`BrokerError`]s; what to do about them is decided in
//! `publish::error`.
//!
//! Transactions: the producer is made with the transactional id when a
//! session takes it over (`init`), which fences every earlier producer of
//! that id. Begin, commit and abort are librdkafka calls that block, so
//! commit and abort run on blocking threads while the publisher holds new
//! records back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use tokio::sync::mpsc;

use super::config::SinkSettings;
use super::errors::classify;
use super::tail::TailReader;
use super::topics::TopicCreator;
use crate::publish::scan::LedgerScan;
use crate::publish::{
    BrokerError, Delivery, LocalBoxFuture, RecordId, SendRefused, Sink, TopicError,
};
use crate::record::KafkaRecord;

struct DeliveryContext {
    deliveries: mpsc::UnboundedSender<Delivery>,
    /// librdkafka raised a fatal error: the producer must be made anew.
    fatal: Arc<AtomicBool>,
}

impl ClientContext for DeliveryContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            self.fatal.store(true, Ordering::Relaxed);
            tracing::error!(error = %error, reason, "the Kafka producer failed for good");
        } else {
            tracing::warn!(error = %error, reason, "kafka client error");
        }
    }
}

impl ProducerContext for DeliveryContext {
    /// The record's id itself (no allocation per record).
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, id: usize) {
        let result = match result {
            Ok(_) => Ok(()),
            Err((error, _)) => Err(classify(error)),
        };
        // The receiver is gone only when the relay is shutting down.
        let _ = self.deliveries.send(Delivery {
            id: RecordId(id as u64),
            result,
        });
    }
}

type KafkaProducer = ThreadedProducer<DeliveryContext>;

/// The producer, its delivery reports, topic preparation and tail scans.
pub struct KafkaSink {
    settings: SinkSettings,
    producer: Arc<KafkaProducer>,
    fatal: Arc<AtomicBool>,
    deliveries_tx: mpsc::UnboundedSender<Delivery>,
    deliveries: mpsc::UnboundedReceiver<Delivery>,
    topics: Arc<TopicCreator>,
    tails: Arc<TailReader>,
    /// The transactional id the current producer was made with.
    transactional_id: Option<String>,
}

impl KafkaSink {
    /// Creates the producer (nothing connects yet).
    pub fn new(settings: &SinkSettings) -> Result<Self, KafkaError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let config = settings
            .producer
            .client_config()
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
        let fatal = Arc::new(AtomicBool::new(false));
        let producer = make_producer(settings, None, &tx, &fatal)?;
        let topics = TopicCreator::new(
            &config,
            settings.create_topics,
            settings.topics,
            &settings.producer.brokers,
        )?;
        Ok(KafkaSink {
            settings: settings.clone(),
            producer,
            fatal,
            deliveries_tx: tx,
            deliveries: rx,
            topics: Arc::new(topics),
            tails: Arc::new(TailReader::new(&config)),
            transactional_id: None,
        })
    }

    /// A handle for connecting from a blocking task.
    pub fn connector(&self) -> impl FnOnce(Duration) -> bool + Send + 'static {
        let producer = Arc::clone(&self.producer);
        move |timeout| producer.client().fetch_metadata(None, timeout).is_ok()
    }

    /// Makes the producer anew (with `transactional_id`, if any).
    fn renew(&mut self, transactional_id: Option<&str>) -> Result<(), BrokerError> {
        self.fatal = Arc::new(AtomicBool::new(false));
        let producer = make_producer(
            &self.settings,
            transactional_id,
            &self.deliveries_tx,
            &self.fatal,
        )
        .map_err(|e| classify(&e))?;
        let old = std::mem::replace(&mut self.producer, producer);
        // Dropping a producer purges and waits for its threads.
        tokio::task::spawn_blocking(move || drop(old));
        self.transactional_id = transactional_id.map(str::to_owned);
        Ok(())
    }
}

fn make_producer(
    settings: &SinkSettings,
    transactional_id: Option<&str>,
    deliveries: &mpsc::UnboundedSender<Delivery>,
    fatal: &Arc<AtomicBool>,
) -> Result<Arc<KafkaProducer>, KafkaError> {
    let mut config = settings
        .producer
        .client_config()
        .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
    if let Some(id) = transactional_id {
        super::config::make_transactional(&mut config, id);
    }
    let producer: KafkaProducer = config.create_with_context(DeliveryContext {
        deliveries: deliveries.clone(),
        fatal: Arc::clone(fatal),
    })?;
    Ok(Arc::new(producer))
}

/// How long a transactional call (takeover, commit, abort) may block
/// before it returns a retriable error; the publisher calls it again.
const TRANSACTION_CALL: Duration = Duration::from_secs(30);

/// Runs a blocking librdkafka call off the async threads.
fn blocking(
    producer: &Arc<KafkaProducer>,
    call: fn(&KafkaProducer) -> Result<(), KafkaError>,
) -> LocalBoxFuture<Result<(), BrokerError>> {
    let producer = Arc::clone(producer);
    Box::pin(async move {
        tokio::task::spawn_blocking(move || call(&producer).map_err(|e| classify(&e)))
            .await
            .unwrap_or_else(|e| {
                Err(BrokerError::transient(format!(
                    "the producer task failed: {e}"
                )))
            })
    })
}

impl Sink for KafkaSink {
    fn transactional(&self) -> bool {
        self.settings.transactional
    }

    fn send(
        &mut self,
        record: &KafkaRecord,
        partition: Option<i32>,
        id: RecordId,
    ) -> Result<(), SendRefused> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key: key.as_ref(),
                value: Some(value.as_ref()),
            });
        }
        // Ids count records from 0: they fit a usize on every 64-bit target.
        let mut base: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(&record.topic, id.0 as usize).headers(headers);
        if let Some(partition) = partition {
            base = base.partition(partition);
        }
        if let Some(key) = &record.key {
            base = base.key(key.as_ref());
        }
        if let Some(value) = &record.value {
            base = base.payload(value.as_ref());
        }
        match self.producer.send(base).map_err(|(error, _)| error) {
            Ok(()) => Ok(()),
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                Err(SendRefused::QueueFull)
            }
            Err(error) => Err(SendRefused::Rejected(classify(&error))),
        }
    }

    fn poll_delivery(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.deliveries.poll_recv(cx)
    }

    fn prepare_topic(&self, topic: &str, create: bool) -> LocalBoxFuture<Result<i32, TopicError>> {
        let topics = Arc::clone(&self.topics);
        let producer = Arc::clone(&self.producer);
        let topic = topic.to_owned();
        Box::pin(async move { topics.prepare(producer, &topic, create).await })
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

    fn init(&mut self, transactional_id: &str) -> LocalBoxFuture<Result<(), BrokerError>> {
        // A fenced or failed producer cannot be reused; taking over the id
        // again (a new session) needs a fresh one anyway.
        if let Err(error) = self.renew(Some(transactional_id)) {
            return Box::pin(async move { Err(error) });
        }
        blocking(&self.producer, |p| p.init_transactions(TRANSACTION_CALL))
    }

    fn begin(&mut self) -> Result<(), BrokerError> {
        self.producer.begin_transaction().map_err(|e| classify(&e))
    }

    fn commit(&mut self) -> LocalBoxFuture<Result<(), BrokerError>> {
        blocking(&self.producer, |p| p.commit_transaction(TRANSACTION_CALL))
    }

    fn abort(&mut self) -> LocalBoxFuture<Result<(), BrokerError>> {
        blocking(&self.producer, |p| p.abort_transaction(TRANSACTION_CALL))
    }

    fn renew_if_failed(&mut self) {
        if self.fatal.load(Ordering::Relaxed) && !self.settings.transactional {
            if let Err(error) = self.renew(None) {
                tracing::error!(%error, "cannot make the Kafka producer anew");
            }
        }
    }
}
