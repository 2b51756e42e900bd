//! `walrelay run`: the apply loop that moves events from the slot to Kafka.
//!
//! ```text
//!  slot ──XLogData──> decode ──> relation cache ──> router ──> producer ──> broker
//!   ^                                                            │ delivery reports
//!   └──── standby status (flush = ack tracker watermark) <── ack tracker
//! ```
//!
//! The guarantee: the flush LSN sent to PostgreSQL never passes an event the
//! broker has not acknowledged (see `ack_tracker`). A crash at any moment
//! loses nothing; events after the last confirmed LSN are sent again, with
//! the same `id` header.
//!
//! Backpressure: at most `max_in_flight_events` / `max_in_flight_bytes` are
//! unacknowledged at once. When the window is full the loop stops reading
//! WAL, but it keeps handling delivery reports and sending status updates,
//! so the walsender's `wal_sender_timeout` never fires on a slow broker.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::ack_tracker::{AckTracker, TxnTicket};
use crate::kafka::{
    Delivery, EventTicket, KafkaSink, ProducerSettings, SendError, TopicError, TopicManager,
};
use crate::lsn::Lsn;
use crate::metrics as m;
use crate::pgoutput::{LogicalMessage, PgTimestamp, StreamDecoder};
use crate::relation_cache::RelationCache;
use crate::replication::{
    ConnectionConfig, ReplicationConnection, ReplicationError, ReplicationEvent, ReplicationStream,
    StartOptions, StatusPositions,
};
use crate::router::{ChangeContext, KafkaRecord, Routed, Router, RouterConfig};
use crate::status::{RelayStatus, Role};

/// Everything `run` needs, validated.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    pub pg: ConnectionConfig,
    pub slot: String,
    pub publication: String,
    pub router: RouterConfig,
    pub producer: ProducerSettings,
    pub create_topics: bool,
    pub topic_partitions: i32,
    pub topic_replication_factor: i32,
    pub max_in_flight_events: usize,
    pub max_in_flight_bytes: usize,
    pub status_interval: Duration,
    pub shutdown_timeout: Duration,
    pub proto_version: Option<u32>,
    /// Longest wait between reconnect attempts.
    pub max_backoff: Duration,
    /// Consecutive failed attempts after which a permanent error ends the relay.
    pub permanent_error_attempts: u32,
    /// How often a standby asks for the slot held by another relay.
    pub standby_retry: Duration,
    /// Prefix of walrelay's own heartbeat messages: never published, used
    /// to measure replication latency.
    pub heartbeat_prefix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error("cannot create the Kafka producer: {0}")]
    Producer(#[from] rdkafka::error::KafkaError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("{0}")]
    Fatal(String),
}

impl RelayError {
    fn is_transient(&self) -> bool {
        match self {
            RelayError::Replication(e) => e.is_transient(),
            RelayError::Topic(TopicError::Metadata { .. }) => true,
            RelayError::Topic(_)
            | RelayError::Producer(_)
            | RelayError::Protocol(_)
            | RelayError::Fatal(_) => false,
        }
    }

    /// Another walsender holds the slot: another relay is active.
    fn is_slot_busy(&self) -> bool {
        matches!(self, RelayError::Replication(e) if e.sqlstate() == Some("55006"))
    }
}

/// How a streaming session ended.
enum SessionEnd {
    /// Shutdown was requested and in-flight events were drained.
    Shutdown,
}

/// Runs until `shutdown` turns true (then drains and returns `Ok`) or a
/// permanent error.
pub async fn run(
    config: RelayConfig,
    shutdown: watch::Receiver<bool>,
    status: Arc<RelayStatus>,
) -> Result<(), RelayError> {
    let (sink, deliveries) = KafkaSink::new(&config.producer)?;
    let client_config = config
        .producer
        .client_config()
        .map_err(|e| RelayError::Protocol(e.to_string()))?;
    let topics = TopicManager::new(
        &client_config,
        config.create_topics,
        config.topic_partitions,
        config.topic_replication_factor,
    )?;
    let probe = sink.probe();
    // Warm up: connect the producer and make sure the dead-letter topic
    // exists before the first event, so early events do not wait for it.
    // Failures here are not fatal: the same steps are retried when needed.
    let warm = probe.clone();
    if tokio::task::spawn_blocking(move || warm.connect(Duration::from_secs(10)))
        .await
        .unwrap_or(false)
    {
        let mut topics = topics;
        if let Err(e) = topics
            .ensure(&config.router.dead_letter_topic, &probe)
            .await
        {
            tracing::warn!(error = %e, "cannot prepare the dead-letter topic yet");
        }
        return run_relay(config, sink, probe, deliveries, topics, shutdown, status).await;
    }
    tracing::warn!("no broker answered yet; events wait until one does");
    run_relay(config, sink, probe, deliveries, topics, shutdown, status).await
}

async fn run_relay(
    config: RelayConfig,
    sink: KafkaSink,
    probe: crate::kafka::MetadataProbe,
    deliveries: mpsc::UnboundedReceiver<Delivery>,
    topics: TopicManager,
    mut shutdown: watch::Receiver<bool>,
    status: Arc<RelayStatus>,
) -> Result<(), RelayError> {
    let mut relay = Relay {
        config,
        sink,
        probe,
        deliveries,
        topics,
        tracker: AckTracker::new(Lsn::ZERO),
        router: None,
        in_flight_events: 0,
        in_flight_bytes: 0,
        status,
        last_reported: Lsn::ZERO,
        last_report_at: Instant::now(),
        heartbeats: std::collections::VecDeque::new(),
        retries: std::collections::VecDeque::new(),
        retry_failures: 0,
    };
    let mut attempt: u32 = 0;
    let mut fatal = relay.status.fatal();
    loop {
        let session_started = Instant::now();
        let confirmed_before = relay.tracker.confirmed();
        let result = tokio::select! {
            result = relay.session(&mut shutdown) => result,
            _ = fatal.changed() => Err(RelayError::Fatal(fatal.borrow().clone().unwrap_or_default())),
        };
        relay.set_connected(false);
        let err = match result {
            Ok(SessionEnd::Shutdown) => return Ok(()),
            Err(err) => err,
        };
        relay.status.set_last_error(&err.to_string());
        let wait = if err.is_slot_busy() {
            // High availability: another relay streams from the slot. Stand
            // by and ask again soon, so a takeover takes seconds.
            if relay.status.role() != Role::Standby {
                tracing::info!(slot = %relay.config.slot, "the slot is held by another process; standing by");
                relay.status.set_role(Role::Standby);
            }
            attempt = 0;
            relay.config.standby_retry
        } else {
            relay.status.set_role(Role::Starting);
            // A session that made progress (or lasted) starts the count of
            // failed attempts afresh; one that failed on the same change
            // again counts towards giving up on a permanent error.
            if relay.tracker.confirmed() > confirmed_before
                || session_started.elapsed() > HEALTHY_SESSION
            {
                attempt = 0;
            }
            attempt += 1;
            if matches!(err, RelayError::Fatal(_))
                || (!err.is_transient() && attempt >= relay.config.permanent_error_attempts)
            {
                return Err(err);
            }
            let wait = backoff(attempt, relay.config.max_backoff);
            tracing::warn!(error = %err, attempt, retry_in = ?wait, "replication interrupted");
            metrics::counter!(m::RECONNECTS_TOTAL).increment(1);
            relay
                .status
                .counters
                .reconnects
                .fetch_add(1, Ordering::Relaxed);
            wait
        };
        // Wait, while still taking delivery reports.
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    let limit = relay.config.shutdown_timeout;
                    relay.drain(&mut shutdown, Some(limit)).await?;
                    return Ok(());
                }
                Some(delivery) = relay.deliveries.recv() => relay.handle_delivery(delivery).await?,
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
    }
}

/// A session that streamed this long counts as healthy for the retry count.
const HEALTHY_SESSION: Duration = Duration::from_secs(60);

/// Shortest time between two status updates sent because the watermark
/// moved (the periodic update and replies to the server are not held back).
const CONFIRM_COALESCE: Duration = Duration::from_millis(10);

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Capped exponential backoff with full jitter.
fn backoff(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(250).saturating_mul(1 << attempt.min(16));
    let capped = base.min(max);
    let jitter = rand::random_range(0.5..=1.0);
    capped.mul_f64(jitter)
}

struct Relay {
    config: RelayConfig,
    sink: KafkaSink,
    probe: crate::kafka::MetadataProbe,
    deliveries: mpsc::UnboundedReceiver<Delivery>,
    topics: TopicManager,
    tracker: AckTracker,
    router: Option<Router>,
    in_flight_events: usize,
    in_flight_bytes: usize,
    status: Arc<RelayStatus>,
    last_reported: Lsn,
    last_report_at: Instant,
    /// Heartbeat transactions not yet confirmed: (end LSN, emitted at).
    heartbeats: std::collections::VecDeque<(Lsn, i64)>,
    /// Records whose delivery failed transiently, in failure order, with
    /// when to send them again.
    retries: std::collections::VecDeque<(KafkaRecord, EventTicket, tokio::time::Instant)>,
    /// Consecutive transient delivery failures, for the retry backoff.
    retry_failures: u32,
}

/// The open transaction.
struct OpenTxn {
    ticket: TxnTicket,
    commit_time: PgTimestamp,
    /// When a heartbeat in this transaction was emitted (Unix microseconds).
    heartbeat_emitted_at: Option<i64>,
}

impl Relay {
    fn window_full(&self) -> bool {
        self.in_flight_events >= self.config.max_in_flight_events
            || self.in_flight_bytes >= self.config.max_in_flight_bytes
    }

    fn set_connected(&self, connected: bool) {
        metrics::gauge!(m::REPLICATION_CONNECTED).set(if connected { 1.0 } else { 0.0 });
        self.status.set_connected(connected);
    }

    async fn session(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<SessionEnd, RelayError> {
        let mut conn = ReplicationConnection::connect(&self.config.pg).await?;
        let identity = conn.identify_system().await?;
        if self.router.is_none() {
            self.router = Some(Router::new(
                self.config.router.clone(),
                identity.system_id.clone(),
            ));
        }
        // Events still in flight from a previous session are waited for (as
        // long as it takes: the producer never gives up on them), so the
        // tracker starts clean, with no stale ticket, and streaming resumes
        // after our own watermark.
        if !self.drain(shutdown, None).await? {
            return Ok(SessionEnd::Shutdown);
        }
        self.tracker = AckTracker::new(self.tracker.confirmed());
        let start_lsn = self.tracker.confirmed();
        let mut stream = conn
            .start_replication(&StartOptions {
                slot: self.config.slot.clone(),
                start_lsn,
                publications: vec![self.config.publication.clone()],
                proto_version: self.config.proto_version,
                messages: true,
            })
            .await?;
        tracing::info!(slot = %self.config.slot, start = %start_lsn, proto_version = stream.proto_version(), "streaming");
        self.set_connected(true);

        let mut decoder = StreamDecoder::new();
        let mut relations = RelationCache::new();
        let mut open: Option<OpenTxn> = None;
        let mut status_tick = tokio::time::interval(self.config.status_interval);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut window_was_full = false;

        loop {
            let reading = !self.window_full();
            if !reading && !window_was_full {
                metrics::counter!(m::WINDOW_FULL_TOTAL).increment(1);
            }
            window_was_full = !reading;
            let next_retry = self.next_retry();
            let confirm_due = self.confirm_due();
            // Branch order: 1. shutdown, 2. delivery reports (they free the
            // window and move the watermark), 3. the periodic status update,
            // 4. a coalesced report of a moved watermark, 5. records due to
            // be sent again, 6. new WAL, only while the window has room.
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    self.shutdown(stream).await?;
                    return Ok(SessionEnd::Shutdown);
                }
                Some(delivery) = self.deliveries.recv() => {
                    self.handle_delivery(delivery).await?;
                    while let Ok(delivery) = self.deliveries.try_recv() {
                        self.handle_delivery(delivery).await?;
                    }
                    if self.confirm_due().is_some_and(|due| due <= Instant::now()) {
                        self.report(&mut stream, false).await?;
                    }
                }
                _ = status_tick.tick() => self.report(&mut stream, false).await?,
                _ = sleep_until_opt(confirm_due.map(Into::into)), if confirm_due.is_some() => {
                    self.report(&mut stream, false).await?;
                }
                _ = sleep_until_opt(next_retry), if next_retry.is_some() => {
                    self.send_due_retries(Some(&mut stream)).await?;
                }
                event = stream.recv(), if reading => {
                    match event? {
                        None => return Err(ReplicationError::Closed.into()),
                        Some(ReplicationEvent::Keepalive { wal_end, reply_requested, .. }) => {
                            self.tracker.server_idle_at(wal_end);
                            if reply_requested || self.confirm_due().is_some_and(|due| due <= Instant::now()) {
                                self.report(&mut stream, false).await?;
                            }
                        }
                        Some(ReplicationEvent::XLogData { wal_start, data, .. }) => {
                            let message = decoder
                                .decode(&data)
                                .map_err(|source| ReplicationError::Decode { lsn: wal_start, source })?;
                            self.apply(message, wal_start, &mut relations, &mut open, &mut stream).await?;
                        }
                    }
                }
            }
        }
    }

    /// Handles one decoded message.
    async fn apply(
        &mut self,
        message: LogicalMessage,
        lsn: Lsn,
        relations: &mut RelationCache,
        open: &mut Option<OpenTxn>,
        stream: &mut ReplicationStream,
    ) -> Result<(), RelayError> {
        match message {
            LogicalMessage::Begin(begin) => {
                if open.is_some() {
                    return Err(RelayError::Protocol(
                        "Begin inside an open transaction".into(),
                    ));
                }
                *open = Some(OpenTxn {
                    ticket: self.tracker.begin(),
                    commit_time: begin.commit_time,
                    heartbeat_emitted_at: None,
                });
                metrics::counter!(m::TRANSACTIONS_TOTAL).increment(1);
            }
            LogicalMessage::Commit(commit) => {
                let txn = open
                    .take()
                    .ok_or_else(|| RelayError::Protocol("Commit without Begin".into()))?;
                if let Some(emitted_at) = txn.heartbeat_emitted_at {
                    self.heartbeats.push_back((commit.end_lsn, emitted_at));
                }
                self.commit(txn.ticket, commit.end_lsn)?;
            }
            LogicalMessage::Relation(relation) => {
                relations.update(&relation);
            }
            LogicalMessage::Insert(insert) => {
                let txn = open
                    .as_ref()
                    .ok_or_else(|| RelayError::Protocol("Insert outside a transaction".into()))?;
                let (ticket, commit_time) = (txn.ticket, txn.commit_time);
                let relation = relations.get(insert.relation_id).cloned().ok_or_else(|| {
                    RelayError::Protocol(format!(
                        "Insert into relation {} before its Relation message",
                        insert.relation_id
                    ))
                })?;
                let routed = self.router().route_insert(
                    &relation,
                    &insert.new,
                    ChangeContext { lsn, commit_time },
                );
                self.publish(routed, ticket, commit_time, stream).await?;
            }
            LogicalMessage::Message(message) if message.prefix == self.config.heartbeat_prefix => {
                // Our own heartbeat: never published. Its transaction has
                // no events, so it is confirmed as soon as everything
                // before it is, which measures end-to-end latency.
                if let (Some(txn), true) = (open.as_mut(), message.transactional) {
                    txn.heartbeat_emitted_at = crate::heartbeat::emitted_at(&message.content);
                }
            }
            LogicalMessage::Message(message) => match open.as_ref() {
                Some(txn) if message.transactional => {
                    let (ticket, commit_time) = (txn.ticket, txn.commit_time);
                    let routed = self
                        .router()
                        .route_message(&message, ChangeContext { lsn, commit_time });
                    self.publish(routed, ticket, commit_time, stream).await?;
                }
                _ => {
                    // A non-transactional message stands alone in the stream:
                    // it gets a transaction of its own in the tracker, ending
                    // at its LSN, so it is confirmed in stream order.
                    let now = PgTimestamp::now();
                    let routed = self.router().route_message(
                        &message,
                        ChangeContext {
                            lsn,
                            commit_time: now,
                        },
                    );
                    if routed != Routed::Ignored {
                        let ticket = self.tracker.begin();
                        self.publish(routed, ticket, now, stream).await?;
                        self.commit(ticket, message.lsn)?;
                    }
                }
            },
            // Changes that are not outbox inserts, and metadata we do not need.
            LogicalMessage::Update(_)
            | LogicalMessage::Delete(_)
            | LogicalMessage::Truncate(_)
            | LogicalMessage::Origin(_)
            | LogicalMessage::Type(_) => {}
            other => {
                // Streaming and two-phase messages are never requested.
                return Err(RelayError::Protocol(format!(
                    "unexpected {} message",
                    other.kind()
                )));
            }
        }
        Ok(())
    }

    fn router(&self) -> &Router {
        self.router
            .as_ref()
            .expect("the router is built before streaming starts")
    }

    fn commit(&mut self, ticket: TxnTicket, end_lsn: Lsn) -> Result<(), RelayError> {
        self.tracker
            .commit(ticket, end_lsn)
            .map_err(|e| RelayError::Protocol(e.to_string()))
    }

    /// Produces a routed change, if it is one.
    async fn publish(
        &mut self,
        routed: Routed,
        txn: TxnTicket,
        commit_time: PgTimestamp,
        stream: &mut ReplicationStream,
    ) -> Result<(), RelayError> {
        let (record, dead_letter) = match routed {
            Routed::Ignored => return Ok(()),
            Routed::Event(record) => (record, false),
            Routed::DeadLetter { record, reason } => {
                tracing::warn!(reason = %reason, "unroutable change sent to the dead-letter topic");
                metrics::counter!(m::DEAD_LETTERS_TOTAL, "kind" => "unroutable").increment(1);
                (record, true)
            }
        };
        self.tracker
            .event_sent(txn)
            .map_err(|e| RelayError::Protocol(e.to_string()))?;
        let ticket = EventTicket {
            txn,
            commit_time,
            bytes: record.size(),
            dead_letter,
        };
        self.in_flight_events += 1;
        self.in_flight_bytes += ticket.bytes;
        self.update_in_flight_gauges();
        let result = self.produce(record, ticket, Some(stream)).await;
        if result.is_err() {
            // The producer never took it: it is not in flight. (The session
            // ends with this error; the transaction is streamed again.)
            self.release(ticket);
        }
        result
    }

    /// Hands a record to the producer, waiting out a full queue or an
    /// unreachable broker while keeping the replication connection fed.
    async fn produce(
        &mut self,
        mut record: KafkaRecord,
        mut ticket: EventTicket,
        mut stream: Option<&mut ReplicationStream>,
    ) -> Result<(), RelayError> {
        let mut attempt = 0u32;
        loop {
            match self.topics.ensure(&record.topic, &self.probe).await {
                Ok(()) => {}
                Err(TopicError::Metadata { topic, source }) => {
                    attempt += 1;
                    tracing::warn!(topic, error = %source, "broker unreachable; waiting");
                    metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "metadata").increment(1);
                    self.wait_feeding(
                        backoff(attempt, Duration::from_secs(5)),
                        stream.as_deref_mut(),
                    )
                    .await?;
                    continue;
                }
                Err(TopicError::Create { topic, source })
                    if !self.is_fatal_create_error(&source) =>
                {
                    attempt += 1;
                    tracing::warn!(topic, error = %source, "cannot create topic yet; retrying");
                    self.wait_feeding(
                        backoff(attempt, Duration::from_secs(5)),
                        stream.as_deref_mut(),
                    )
                    .await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            match self.sink.send(record, ticket) {
                Ok(()) => return Ok(()),
                Err(SendError::QueueFull(r)) => {
                    record = *r;
                    self.wait_feeding(Duration::from_millis(5), stream.as_deref_mut())
                        .await?;
                }
                Err(SendError::Refused { error, record: r }) => {
                    if crate::kafka::producer::is_permanent(&error) && !ticket.dead_letter {
                        record = self.dead_letter_for(&r, &error.to_string(), &mut ticket);
                    } else if ticket.dead_letter && crate::kafka::producer::is_permanent(&error) {
                        self.give_up(&r, &error.to_string(), ticket);
                        return Ok(());
                    } else {
                        record = *r;
                        attempt += 1;
                        metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "produce")
                            .increment(1);
                        self.wait_feeding(
                            backoff(attempt, Duration::from_secs(5)),
                            stream.as_deref_mut(),
                        )
                        .await?;
                    }
                }
            }
        }
    }

    fn is_fatal_create_error(&self, error: &rdkafka::error::KafkaError) -> bool {
        use rdkafka::types::RDKafkaErrorCode as C;
        matches!(
            error,
            rdkafka::error::KafkaError::AdminOp(
                C::TopicAuthorizationFailed
                    | C::ClusterAuthorizationFailed
                    | C::InvalidTopic
                    | C::PolicyViolation
                    | C::InvalidReplicationFactor
                    | C::InvalidPartitions
            )
        )
    }

    /// Replaces a record the broker refused for good with its dead letter.
    fn dead_letter_for(
        &mut self,
        original: &KafkaRecord,
        reason: &str,
        ticket: &mut EventTicket,
    ) -> KafkaRecord {
        let too_large = reason.contains("too large") || reason.contains("Message size");
        let dead = self
            .router()
            .broker_dead_letter(original, reason, !too_large);
        tracing::warn!(topic = %original.topic, reason, "broker refused a record; sending it to the dead-letter topic");
        metrics::counter!(m::DEAD_LETTERS_TOTAL, "kind" => "broker_rejected").increment(1);
        metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "rejected").increment(1);
        self.in_flight_bytes = self.in_flight_bytes - ticket.bytes + dead.size();
        ticket.bytes = dead.size();
        ticket.dead_letter = true;
        dead
    }

    /// A dead letter that itself cannot be delivered: log every detail we
    /// have and let the slot move on, rather than wedge it forever.
    fn give_up(&mut self, record: &KafkaRecord, reason: &str, ticket: EventTicket) {
        let id = record
            .header("id")
            .map(|v| String::from_utf8_lossy(v).into_owned());
        tracing::error!(topic = %record.topic, id = ?id, reason, "the dead-letter topic refused a record; it is logged here and skipped");
        metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "dead_letter_rejected").increment(1);
        self.release(ticket);
        let _ = self.tracker.ack(ticket.txn);
    }

    fn release(&mut self, ticket: EventTicket) {
        self.in_flight_events -= 1;
        self.in_flight_bytes -= ticket.bytes;
        self.update_in_flight_gauges();
    }

    fn update_in_flight_gauges(&self) {
        self.status
            .counters
            .in_flight
            .store(self.in_flight_events as u64, Ordering::Relaxed);
        metrics::gauge!(m::EVENTS_IN_FLIGHT).set(self.in_flight_events as f64);
        metrics::gauge!(m::BYTES_IN_FLIGHT).set(self.in_flight_bytes as f64);
    }

    /// Sleeps for `duration` while handling delivery reports and keeping the
    /// walsender answered.
    async fn wait_feeding(
        &mut self,
        duration: Duration,
        stream: Option<&mut ReplicationStream>,
    ) -> Result<(), RelayError> {
        let deadline = tokio::time::Instant::now() + duration;
        loop {
            tokio::select! {
                Some(delivery) = self.deliveries.recv() => Box::pin(self.handle_delivery(delivery)).await?,
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if let Some(stream) = stream {
            if self.last_report_at.elapsed() >= self.config.status_interval
                || self.tracker.confirmed() > self.last_reported
            {
                self.report(stream, false).await?;
            }
        }
        Ok(())
    }

    async fn handle_delivery(&mut self, delivery: Delivery) -> Result<(), RelayError> {
        let ticket = delivery.ticket;
        match delivery.result {
            Ok(()) => {
                self.retry_failures = 0;
                let now = PgTimestamp::now();
                let latency = (now.0 - ticket.commit_time.0).max(0) as f64 / 1e6;
                if ticket.dead_letter {
                    self.status
                        .counters
                        .dead_letters
                        .fetch_add(1, Ordering::Relaxed);
                } else {
                    metrics::counter!(m::EVENTS_PUBLISHED_TOTAL, "topic" => delivery.topic)
                        .increment(1);
                    self.status
                        .counters
                        .events_published
                        .fetch_add(1, Ordering::Relaxed);
                    metrics::histogram!(m::COMMIT_TO_ACK_SECONDS).record(latency);
                    self.status.latency.record(latency);
                    self.status.latency_histogram.record(latency);
                }
                metrics::gauge!(m::LAST_ACK_TIMESTAMP_SECONDS).set(now.unix_micros() as f64 / 1e6);
                self.status.record_ack();
                self.release(ticket);
                self.tracker
                    .ack(ticket.txn)
                    .map_err(|e| RelayError::Protocol(e.to_string()))?;
            }
            Err(failure) => {
                let reason = failure.error.to_string();
                if failure.is_permanent() && !ticket.dead_letter {
                    let mut ticket = ticket;
                    let dead = self.dead_letter_for(&failure.record, &reason, &mut ticket);
                    Box::pin(self.produce(dead, ticket, None)).await?;
                } else if failure.is_permanent() {
                    self.give_up(&failure.record, &reason, ticket);
                } else {
                    // A broker error, or a finite -X message.timeout.ms: send
                    // it again after a pause (never in a tight loop). It stays
                    // in flight meanwhile, so nothing is confirmed past it.
                    self.retry_failures += 1;
                    let wait = backoff(self.retry_failures.min(8), Duration::from_secs(5));
                    if self.retries.is_empty() {
                        tracing::warn!(topic = %failure.record.topic, error = %reason, retry_in = ?wait, "delivery failed; will send again");
                    }
                    metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "delivery").increment(1);
                    self.retries.push_back((
                        failure.record,
                        ticket,
                        tokio::time::Instant::now() + wait,
                    ));
                }
            }
        }
        Ok(())
    }

    /// When a moved watermark should be reported: at once, unless a report
    /// went out in the last few milliseconds. Coalescing keeps a busy
    /// stream of small transactions from costing a write per commit.
    fn confirm_due(&self) -> Option<Instant> {
        (self.tracker.confirmed() > self.last_reported)
            .then(|| self.last_report_at + CONFIRM_COALESCE)
    }

    /// When the next failed record is due to be sent again.
    fn next_retry(&self) -> Option<tokio::time::Instant> {
        self.retries.front().map(|(_, _, due)| *due)
    }

    /// Sends again every failed record that is due.
    async fn send_due_retries(
        &mut self,
        mut stream: Option<&mut ReplicationStream>,
    ) -> Result<(), RelayError> {
        let now = tokio::time::Instant::now();
        while self.retries.front().is_some_and(|(_, _, due)| *due <= now) {
            let (record, ticket, _) = self.retries.pop_front().expect("checked above");
            Box::pin(self.produce(record, ticket, stream.as_deref_mut())).await?;
        }
        Ok(())
    }

    /// Sends a status update with the tracker's watermark.
    async fn report(
        &mut self,
        stream: &mut ReplicationStream,
        reply: bool,
    ) -> Result<(), RelayError> {
        let confirmed = self.tracker.confirmed();
        stream
            .send_status(StatusPositions::all(confirmed), reply)
            .await?;
        if confirmed != self.last_reported {
            tracing::debug!(lsn = %confirmed, "confirmed");
        }
        self.last_reported = confirmed;
        self.last_report_at = Instant::now();
        while let Some(&(end_lsn, emitted_at)) = self.heartbeats.front() {
            if end_lsn > confirmed {
                break;
            }
            self.heartbeats.pop_front();
            let latency = (PgTimestamp::now().unix_micros() - emitted_at).max(0) as f64 / 1e6;
            metrics::gauge!(m::HEARTBEAT_LATENCY_SECONDS).set(latency);
        }
        self.status.set_confirmed(confirmed);
        metrics::gauge!(m::CONFIRMED_LSN).set(confirmed.0 as f64);
        Ok(())
    }

    /// Stops reading, waits for in-flight acknowledgements (bounded by the
    /// shutdown timeout), confirms, and ends the stream cleanly.
    async fn shutdown(&mut self, mut stream: ReplicationStream) -> Result<(), RelayError> {
        tracing::info!(
            in_flight = self.in_flight_events,
            "stopping: draining in-flight events"
        );
        let deadline = Instant::now() + self.config.shutdown_timeout;
        let mut status_tick = tokio::time::interval(self.config.status_interval);
        while self.in_flight_events > 0 && Instant::now() < deadline {
            let next_retry = self.next_retry();
            tokio::select! {
                Some(delivery) = self.deliveries.recv() => self.handle_delivery(delivery).await?,
                _ = status_tick.tick() => self.report(&mut stream, false).await?,
                _ = sleep_until_opt(next_retry), if next_retry.is_some() => {
                    self.send_due_retries(Some(&mut stream)).await?;
                }
                _ = tokio::time::sleep_until(deadline.into()) => break,
            }
        }
        if self.in_flight_events > 0 {
            tracing::warn!(
                in_flight = self.in_flight_events,
                "shutdown timeout: unacknowledged events will be sent again on restart"
            );
        }
        self.report(&mut stream, false).await?;
        tracing::info!(confirmed = %self.tracker.confirmed(), "stopped");
        stream.finish().await?;
        Ok(())
    }

    /// Waits for every in-flight event without a stream to report to
    /// (after a disconnect), up to `limit` if given. Returns whether all
    /// were acknowledged; false also when shutdown interrupted the wait.
    async fn drain(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        limit: Option<Duration>,
    ) -> Result<bool, RelayError> {
        let deadline = limit.map(|l| tokio::time::Instant::now() + l);
        while self.in_flight_events > 0 {
            let timeout = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let next_retry = self.next_retry();
            tokio::select! {
                Some(delivery) = self.deliveries.recv() => self.handle_delivery(delivery).await?,
                _ = sleep_until_opt(next_retry), if next_retry.is_some() => {
                    self.send_due_retries(None).await?;
                }
                _ = shutdown.changed(), if limit.is_none() => return Ok(false),
                _ = timeout => return Ok(false),
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let max = Duration::from_secs(30);
        assert!(backoff(1, max) <= Duration::from_millis(500));
        assert!(backoff(1, max) >= Duration::from_millis(250));
        assert!(backoff(20, max) <= max);
        assert!(backoff(20, max) >= max / 2);
    }
}
