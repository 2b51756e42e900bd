//! Reading a partition's tail, newest records first, for exactly-once
//! delivery (`publish::scan` says what is looked for).
//!
//! Only committed records count: the readers are `read_committed`, so a
//! record of an aborted transaction (a fenced relay's, or one killed
//! mid-transaction) is never taken for delivered. Kafka is read forwards,
//! so the tail is read in chunks stepping back from the last stable
//! offset: each chunk is fetched from its start offset up to the oldest
//! record the previous chunk saw, and handed to the scan newest first.
//!
//! Another producer's open transaction holds the last stable offset below
//! the high watermark and hides what was written after it; the reader
//! waits a little for it to end, then tells the scan it could not see
//! everything.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::Semaphore;

use crate::publish::scan::{LedgerScan, Scan, TailRecord};
use crate::publish::{BrokerError, BrokerErrorClass};
use crate::publish::{CLEANUP_HEADER, ORIGIN_HEADER, POSITION_HEADER};

/// Records fetched per step back.
const CHUNK: i64 = 1000;
/// Longest wait for the broker's next answer (a chunk that keeps arriving,
/// however slowly, is read to its end: large records on a slow link).
const CHUNK_TIMEOUT: Duration = Duration::from_secs(15);
/// Scans running at once, each with its own consumers. Each waits mostly on
/// round trips (two watermark queries, a fetch), so a restart at 800
/// partitions read 16 at a time took 2.6-3.5 s to reach every partition
/// against 3.2-7.5 s at 8 (`docs/performance.md`).
const CONCURRENT_SCANS: usize = 16;
/// Pooled clients unused this long are closed: a restart at hundreds of
/// partitions makes sixteen pairs, which steady streaming never needs, and
/// each holds threads and a connection to every broker.
const IDLE_CLOSE: Duration = Duration::from_secs(60);
/// How long a scan waits for another producer's open transaction to end.
const OPEN_TRANSACTION_WAIT: Duration = Duration::from_secs(5);
/// Most records read of what an open transaction hides.
const HIDDEN_READ: i64 = 10 * CHUNK;

/// librdkafka options that only producers know; left out of the scanning
/// consumers' configuration.
const PRODUCER_ONLY: &[&str] = &[
    "enable.idempotence",
    "acks",
    "compression.type",
    "partitioner",
    "message.timeout.ms",
    "linger.ms",
    "batch.num.messages",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "message.max.bytes",
    "transactional.id",
    "transaction.timeout.ms",
];

/// A consumer context that does not report reaching a partition's end,
/// which every scan does, as an error.
pub struct ScanContext;

impl ClientContext for ScanContext {
    fn error(&self, error: KafkaError, reason: &str) {
        // librdkafka reports it both ways, per partition and as a client
        // error.
        let end_of_partition = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if end_of_partition {
            return;
        }
        // Idle consumers of the pool keep meeting a broker that is away;
        // the scans themselves say when that matters.
        if kafka_error(&error).class == BrokerErrorClass::Transient {
            tracing::debug!(error = %error, reason, "kafka tail scan");
        } else {
            tracing::warn!(error = %error, reason, "kafka tail scan");
        }
    }
}

impl ConsumerContext for ScanContext {}

type ScanConsumer = BaseConsumer<ScanContext>;

/// One scan's clients, kept for the next scan.
struct ScanClients {
    /// Reads the tail: committed records only.
    committed: ScanConsumer,
    /// Reads the high watermark, which the `read_committed` reader does not
    /// see past an open transaction; made when first needed. One per scan,
    /// not one shared: every scan asks it, and at hundreds of partitions a
    /// shared one made the scans take turns.
    uncommitted: Option<ScanConsumer>,
    /// When the last scan gave them back.
    idle_since: Instant,
}

type Pool = Mutex<Vec<ScanClients>>;

/// Scans partition tails with a small pool of consumers.
pub struct TailReader {
    config: ClientConfig,
    idle: Arc<Pool>,
    permits: Arc<Semaphore>,
}

impl TailReader {
    /// A reader with the producer's connection settings (brokers, TLS,
    /// SASL), as a consumer that reads without committing anything.
    pub fn new(producer: &ClientConfig) -> Self {
        let mut config = ClientConfig::new();
        for (key, value) in producer.config_map() {
            if !PRODUCER_ONLY.contains(&key.as_str()) {
                config.set(key, value);
            }
        }
        config
            .set("group.id", "walrelay-tail-scan")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "10")
            // A scan reads one chunk at a time; librdkafka's default
            // prefetch (64 MiB per consumer, sixteen scans) would hold
            // the rest of the tail in memory meanwhile.
            .set("queued.max.messages.kbytes", "1024")
            .set("fetch.max.bytes", "1048576")
            .set("isolation.level", "read_committed")
            // A scan never makes a topic (the producer's options have it
            // off too; this says so where the consumer is made).
            .set("allow.auto.create.topics", "false")
            .set("client.id", "walrelay-tail-scan");
        let idle = Arc::new(Mutex::new(Vec::new()));
        // Outside a runtime (a one-off command) nothing stays idle long.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(close_idle_clients(Arc::downgrade(&idle)));
        }
        TailReader {
            config,
            idle,
            permits: Arc::new(Semaphore::new(CONCURRENT_SCANS)),
        }
    }

    /// Feeds `partition`'s records to `scan`, newest first, until it has
    /// enough or the partition's beginning.
    pub async fn scan(
        &self,
        topic: String,
        partition: i32,
        scan: LedgerScan,
    ) -> Result<LedgerScan, BrokerError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| BrokerError::transient("the tail reader is closed"))?;
        let idle = Arc::clone(&self.idle);
        let config = self.config.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let (consumer, reader) = match pooled {
                Some(clients) => (clients.committed, clients.uncommitted),
                None => (
                    config
                        .create_with_context(ScanContext)
                        .map_err(|e| kafka_error(&e))?,
                    None,
                ),
            };
            let mut uncommitted = Uncommitted {
                reader,
                config: &config,
                topic: &topic,
                partition,
            };
            let result = scan_blocking(&consumer, &topic, partition, scan, &mut uncommitted);
            // After a broker died, a client can keep answering from its
            // stale view of the cluster (a partition "unknown" long after
            // another broker leads it): after an error, every later scan
            // starts with fresh clients. Clients are dropped outside the
            // lock (each waits for its threads).
            // Idle clients are kept for the next scan (trimming the pool
            // between scans made a restart at 800 partitions slower: they
            // were made again); a minute unused closes them.
            let dropped: Vec<ScanClients> = if result.is_ok() {
                let _ = consumer.unassign();
                idle.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(ScanClients {
                        committed: consumer,
                        uncommitted: uncommitted.reader,
                        idle_since: Instant::now(),
                    });
                Vec::new()
            } else {
                std::mem::take(&mut *idle.lock().unwrap_or_else(|e| e.into_inner()))
            };
            drop(dropped);
            result
        })
        .await
        .map_err(|e| BrokerError::transient(format!("the tail scan task failed: {e}")))?
    }
}

/// Closes the pooled clients no scan has used for [`IDLE_CLOSE`], until the
/// reader is gone.
async fn close_idle_clients(idle: Weak<Pool>) {
    let mut every = tokio::time::interval(IDLE_CLOSE / 4);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(pool) = idle.upgrade() else {
            return;
        };
        let stale: Vec<ScanClients> = {
            let mut pool = pool.lock().unwrap_or_else(|e| e.into_inner());
            let (stale, kept) = std::mem::take(&mut *pool)
                .into_iter()
                .partition(|clients| clients.idle_since.elapsed() >= IDLE_CLOSE);
            *pool = kept;
            stale
        };
        drop(pool);
        if !stale.is_empty() {
            tracing::debug!(pairs = stale.len(), "closing idle tail-scan clients");
            // Each client waits for its threads as it closes.
            let _ = tokio::task::spawn_blocking(move || drop(stale)).await;
        }
    }
}

/// The `read_uncommitted` reader of one partition: it sees the high
/// watermark past an open transaction, and what that transaction hides.
struct Uncommitted<'a> {
    reader: Option<ScanConsumer>,
    config: &'a ClientConfig,
    topic: &'a str,
    partition: i32,
}

impl Uncommitted<'_> {
    fn with_reader<T>(
        &mut self,
        read: impl FnOnce(&ScanConsumer) -> Result<T, BrokerError>,
    ) -> Result<T, BrokerError> {
        if self.reader.is_none() {
            let mut config = self.config.clone();
            config.set("isolation.level", "read_uncommitted");
            self.reader = Some(
                config
                    .create_with_context(ScanContext)
                    .map_err(|e| kafka_error(&e))?,
            );
        }
        read(self.reader.as_ref().expect("made above"))
    }

    fn high_watermark(&mut self) -> Result<i64, BrokerError> {
        let (topic, partition) = (self.topic, self.partition);
        self.with_reader(|reader| {
            reader
                .fetch_watermarks(topic, partition, CHUNK_TIMEOUT)
                .map(|(_, high)| high)
                .map_err(|e| kafka_error(&e))
        })
    }

    /// The records from `stable` up to `high`, whatever their transaction,
    /// cleanup records left out (they are only ever aborted); an error
    /// unless the read reached `high`.
    fn hidden(&mut self, stable: i64, high: i64) -> Result<Vec<TailRecord>, BrokerError> {
        let (topic, partition) = (self.topic, self.partition);
        let read = self.with_reader(|reader| {
            let records = read_chunk(reader, topic, partition, stable, high, true);
            let reached = reader
                .position()
                .ok()
                .and_then(|positions| {
                    positions
                        .find_partition(topic, partition)
                        .and_then(|p| p.offset().to_raw())
                })
                .is_some_and(|next| next >= high);
            let _ = reader.unassign();
            match records {
                Ok(_) if !reached => Err(BrokerError::transient(format!(
                    "{topic}/{partition}: the read of what an open transaction hides stopped before {high}"
                ))),
                records => records,
            }
        });
        if read.is_err() {
            // A fresh client next time (it may hold a stale view).
            self.reader = None;
        }
        read
    }
}

/// A reading error, classified as the producer's are (not authorized to
/// read is told apart from a broker away).
fn kafka_error(error: &KafkaError) -> BrokerError {
    super::errors::classify(error)
}

fn scan_blocking(
    consumer: &ScanConsumer,
    topic: &str,
    partition: i32,
    mut scan: LedgerScan,
    uncommitted: &mut Uncommitted,
) -> Result<LedgerScan, BrokerError> {
    // A `read_committed` consumer's high watermark is the last stable
    // offset.
    let deadline = Instant::now() + OPEN_TRANSACTION_WAIT;
    let (low, high) = loop {
        let (low, stable) = consumer
            .fetch_watermarks(topic, partition, CHUNK_TIMEOUT)
            .map_err(|e| kafka_error(&e))?;
        let high = uncommitted.high_watermark()?;
        if stable >= high {
            break (low, stable);
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                topic,
                partition,
                "another producer's open transaction hides the partition's newest records"
            );
            scan.hidden_by_open_transaction();
            // What it hides, if little enough to read: whether any of it
            // may have been confirmed decides whether it may be aborted.
            if high - stable <= HIDDEN_READ {
                match uncommitted.hidden(stable, high) {
                    Ok(records) => scan.hidden_records(&records),
                    Err(error) => {
                        tracing::debug!(%error, "cannot read what the open transaction hides")
                    }
                }
            }
            break (low, stable);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if high <= low {
        scan.reached_log_start(low);
        return Ok(scan);
    }
    // Records at or past `upper` were handed to the scan already.
    let mut upper = i64::MAX;
    let mut start = (high - CHUNK).max(low);
    loop {
        let chunk = read_chunk(consumer, topic, partition, start, upper, false)?;
        if let Some(first) = chunk.first() {
            upper = first.offset;
        }
        for record in chunk.iter().rev() {
            if scan.push(record) == Scan::Enough {
                return Ok(scan);
            }
        }
        if start <= low {
            scan.reached_log_start(low);
            return Ok(scan);
        }
        if (high - start) as usize > scan.lookback().saturating_mul(2) {
            // Stepped back twice the look-back without the scan having
            // enough (its own records are that far back, if anywhere).
            scan.exhaust();
            return Ok(scan);
        }
        start = (start - CHUNK).max(low);
    }
}

/// The records (committed ones, for a `read_committed` consumer) from
/// `start` up to `upper`, exclusive, or to the partition's end;
/// `skip_cleanup`: cleanup records left out.
fn read_chunk(
    consumer: &ScanConsumer,
    topic: &str,
    partition: i32,
    start: i64,
    upper: i64,
    skip_cleanup: bool,
) -> Result<Vec<TailRecord>, BrokerError> {
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, partition, Offset::Offset(start))
        .map_err(|e| kafka_error(&e))?;
    consumer.assign(&assignment).map_err(|e| kafka_error(&e))?;
    let mut deadline = Instant::now() + CHUNK_TIMEOUT;
    let mut records = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(BrokerError::transient(format!(
                "{topic}/{partition}: no record for {CHUNK_TIMEOUT:?}"
            )));
        }
        match consumer.poll(left.min(Duration::from_millis(500))) {
            Some(Ok(message)) => {
                deadline = Instant::now() + CHUNK_TIMEOUT;
                if message.topic() != topic || message.partition() != partition {
                    continue;
                }
                if message.offset() >= upper {
                    return Ok(records);
                }
                if message.offset() < start {
                    continue;
                }
                let is_cleanup = message
                    .headers()
                    .is_some_and(|headers| headers.iter().any(|h| h.key == CLEANUP_HEADER));
                if skip_cleanup && is_cleanup {
                    continue;
                }
                let header = |name: &str| {
                    message.headers().and_then(|headers| {
                        headers
                            .iter()
                            .find(|h| h.key == name)
                            .and_then(|h| h.value)
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                    })
                };
                records.push(TailRecord {
                    offset: message.offset(),
                    origin: header(ORIGIN_HEADER),
                    position: header(POSITION_HEADER),
                });
            }
            Some(Err(KafkaError::PartitionEOF(p))) if p == partition => return Ok(records),
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            // A pooled consumer holds the errors it met while idle (the
            // broker was away): they say nothing about this read, which
            // goes on until it ends or its time is up.
            Some(Err(error)) if kafka_error(&error).class == BrokerErrorClass::Transient => {
                tracing::debug!(%error, "tail scan: a passing client error");
            }
            Some(Err(error)) => return Err(kafka_error(&error)),
            None => {}
        }
    }
}
