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
//! commit and abort run on blocking threads. A commit or an abort is of
//! the producer current when it is called: the publisher may switch to the
//! other id's producer at once and send the next transaction's records
//! through it while the call runs.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
};
use tokio::sync::mpsc;

use super::config::SinkSettings;
use super::errors::classify;
use super::tail::TailReader;
use super::topics::TopicCreator;
use crate::publish::scan::LedgerScan;
use crate::publish::{
    BrokerError, Delivery, LocalBoxFuture, RecordId, SendId, SendRefused, Sink, TopicError,
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
    /// The record's send itself (no allocation per record).
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let result = match result {
            Ok(_) => Ok(()),
            Err((error, _)) => Err(classify(error)),
        };
        // The receiver is gone only when the relay is shutting down.
        let _ = self.deliveries.send(Delivery {
            send: unpack(opaque),
            result,
        });
    }
}

/// A send travels through librdkafka as one word: the record id in the low
/// 48 bits (ids count records from 0), the attempt in the high 16.
const ID_BITS: u32 = 48;

fn pack(send: SendId) -> usize {
    let id = send.id.0 & ((1 << ID_BITS) - 1);
    (id | (u64::from(send.attempt) << ID_BITS)) as usize
}

fn unpack(opaque: usize) -> SendId {
    let word = opaque as u64;
    SendId {
        id: RecordId(word & ((1 << ID_BITS) - 1)),
        attempt: (word >> ID_BITS) as u16,
    }
}

type KafkaProducer = ThreadedProducer<DeliveryContext>;

/// The producer, its delivery reports, topic preparation and tail scans.
pub struct KafkaSink {
    settings: SinkSettings,
    /// The producer records go through now.
    producer: Arc<KafkaProducer>,
    /// Transactional: each id's producer, taken over in this session.
    by_id: HashMap<String, Arc<KafkaProducer>>,
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
            by_id: HashMap::new(),
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
        let old = std::mem::replace(&mut self.producer, Arc::clone(&producer));
        match transactional_id {
            Some(id) => {
                // This id's earlier producer goes; the current one (another
                // id's) stays with its id.
                if let Some(earlier) = self.by_id.insert(id.to_owned(), producer) {
                    drop_producer(earlier);
                }
                if !self.by_id.values().any(|p| Arc::ptr_eq(p, &old)) {
                    drop_producer(old);
                }
            }
            None => drop_producer(old),
        }
        self.transactional_id = transactional_id.map(str::to_owned);
        Ok(())
    }
}

/// Dropping a producer purges what it holds and waits for its threads: off
/// the async threads.
fn drop_producer(producer: Arc<KafkaProducer>) {
    tokio::task::spawn_blocking(move || {
        producer.purge(PurgeConfig::default().queue().inflight());
        drop(producer);
    });
}

/// How long asking which partitions have a leader may take.
const LEADERS_TIMEOUT: Duration = Duration::from_secs(5);

/// Of `partitions`, those the cluster's metadata shows without a leader.
fn leaderless(
    producer: &KafkaProducer,
    partitions: &[(String, i32)],
) -> Result<Vec<(String, i32)>, KafkaError> {
    let mut topics: Vec<&str> = partitions.iter().map(|(t, _)| t.as_str()).collect();
    topics.sort_unstable();
    topics.dedup();
    let mut leaderless = Vec::new();
    for topic in topics {
        let metadata = producer
            .client()
            .fetch_metadata(Some(topic), LEADERS_TIMEOUT)?;
        let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
            continue;
        };
        for (t, partition) in partitions.iter().filter(|(t, _)| t == topic) {
            let no_leader = found
                .partitions()
                .iter()
                .find(|p| p.id() == *partition)
                .is_some_and(|p| p.leader() < 0);
            if no_leader {
                leaderless.push((t.clone(), *partition));
            }
        }
    }
    Ok(leaderless)
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

/// How long a producer told to send what lingers keeps doing so, at most:
/// its transaction's records are usually delivered within milliseconds.
const SEND_LINGERING_FOR: Duration = Duration::from_secs(1);

/// How long a commit waits for librdkafka to let go of delivered records.
const DELIVERY_REPORTS_SETTLE: Duration = Duration::from_millis(20);

/// Waits, briefly, until librdkafka counts nothing of the producer as
/// outstanding (records, and events its polling thread has yet to serve);
/// returns what it still counts.
///
/// rdkafka's commit flushes first, and while librdkafka still counts a
/// record whose delivery report the polling thread is handing over, that
/// flush waits up to 100 ms on an event queue the polling thread has
/// already emptied: one commit in a few hundred lost 100 ms, and every
/// record behind it waited too (exactly once's p99). The publisher commits
/// only once every record of the transaction is reported delivered, so the
/// count reaches zero within microseconds (at most a few hundred, measured).
fn wait_for_delivery_reports(producer: &KafkaProducer) -> i32 {
    let deadline = std::time::Instant::now() + DELIVERY_REPORTS_SETTLE;
    loop {
        let outstanding = producer.in_flight_count();
        if outstanding == 0 || std::time::Instant::now() >= deadline {
            return outstanding;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// How long each read of the broker list before a takeover may take.
const BROKERS_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads the cluster's broker list twice before a takeover: the first
/// answer, from a bootstrap address, names the brokers, and librdkafka
/// drops its bootstrap connection on reading it; the second connects to a
/// named broker. A takeover begun with only the bootstrap connection up
/// could send its coordinator query there just before that connection was
/// dropped, and librdkafka asks again only 500 ms later: one takeover in a
/// few, so most sessions' starts waited half a second.
fn connect_to_named_broker(producer: &KafkaProducer) {
    for _ in 0..2 {
        if let Err(error) = super::brokers::read_brokers(producer.client(), BROKERS_TIMEOUT) {
            // The takeover asks for itself, and reports what fails.
            tracing::debug!(%error, "cannot read the cluster's metadata before a takeover");
            return;
        }
    }
}

/// Runs a blocking librdkafka call off the async threads.
fn blocking(
    producer: &Arc<KafkaProducer>,
    call: impl FnOnce(&KafkaProducer) -> Result<(), KafkaError> + Send + 'static,
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
        send: SendId,
    ) -> Result<(), SendRefused> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key: key.as_ref(),
                value: Some(value.as_ref()),
            });
        }
        let mut base: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(&record.topic, pack(send)).headers(headers);
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

    fn leaderless(
        &self,
        partitions: Vec<(String, i32)>,
    ) -> LocalBoxFuture<Result<Vec<(String, i32)>, BrokerError>> {
        let producer = Arc::clone(&self.producer);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                leaderless(&producer, &partitions).map_err(|e| classify(&e))
            })
            .await
            .unwrap_or_else(|e| {
                Err(BrokerError::transient(format!(
                    "the metadata task failed: {e}"
                )))
            })
        })
    }

    fn switch_to(&mut self, transactional_id: &str) {
        if let Some(producer) = self.by_id.get(transactional_id) {
            self.producer = Arc::clone(producer);
            self.transactional_id = Some(transactional_id.to_owned());
        }
    }

    fn abandon(&mut self, transactional_id: &str) {
        if let Some(producer) = self.by_id.remove(transactional_id) {
            drop_producer(producer);
        }
    }

    fn init(&mut self, transactional_id: &str) -> LocalBoxFuture<Result<(), BrokerError>> {
        // A fenced or failed producer cannot be reused; taking over the id
        // again (a new session) needs a fresh one anyway.
        if let Err(error) = self.renew(Some(transactional_id)) {
            return Box::pin(async move { Err(error) });
        }
        blocking(&self.producer, |p| {
            connect_to_named_broker(p);
            p.init_transactions(TRANSACTION_CALL)
        })
    }

    fn begin(&mut self) -> Result<(), BrokerError> {
        self.producer.begin_transaction().map_err(|e| classify(&e))
    }

    fn send_lingering(&mut self) {
        let producer = Arc::clone(&self.producer);
        tokio::task::spawn_blocking(move || {
            super::linger::send_lingering(&producer, SEND_LINGERING_FOR);
        });
    }

    fn commit(&mut self) -> LocalBoxFuture<Result<(), BrokerError>> {
        blocking(&self.producer, |p| {
            let outstanding = wait_for_delivery_reports(p);
            if outstanding > 0 {
                tracing::debug!(
                    outstanding,
                    "librdkafka still counts records outstanding at commit"
                );
            }
            p.commit_transaction(TRANSACTION_CALL)
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_survives_its_trip_through_librdkafka_as_one_word() {
        for send in [
            SendId {
                id: RecordId(0),
                attempt: 0,
            },
            SendId {
                id: RecordId(123_456_789),
                attempt: 7,
            },
            SendId {
                id: RecordId((1 << ID_BITS) - 1),
                attempt: 0xffff,
            },
        ] {
            assert_eq!(unpack(pack(send)), send);
        }
    }
}
