//! The publisher: hands records to the sink, in order, and deals with what
//! comes back.
//!
//! - A topic is prepared (created if missing) before its first record;
//!   records for it wait, in order, meanwhile.
//! - A full producer queue is backpressure: the record waits at the head
//!   of a backlog, everything after it queues behind, and the relay stops
//!   reading WAL until the backlog is gone.
//! - A failed delivery is sent again after a backoff and stays in flight
//!   meanwhile; a record the broker refuses for good becomes a dead letter;
//!   a dead letter refused for good is logged and given up.
//!
//! Nothing here waits: every wait is a timer or a future the relay's loop
//! polls beside everything else, so shutdown and the walsender are always
//! answered.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

use super::error::{Decision, Failure, RelayError, decide};
use super::partitions::{PartitionLedgers, Replay, Route};
use crate::ledger::LedgerScan;
use crate::metrics as m;
use crate::record::KafkaRecord;
use crate::sink::{
    BrokerError, Delivery, EventTicket, LocalBoxFuture, SendRefused, Sink, TopicError,
};

/// How long a record that met a full producer queue waits before it is
/// offered again (deliveries free the queue meanwhile).
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(5);

/// The longest pause before sending a failed record again.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(5);

/// A record on its way, with what travels with it.
#[derive(Debug)]
pub struct Outgoing {
    pub record: KafkaRecord,
    pub ticket: EventTicket,
    /// The partition walrelay chose (exactly-once), or `None` for the
    /// client's partitioner.
    pub partition: Option<i32>,
}

impl Outgoing {
    pub fn new(record: KafkaRecord, ticket: EventTicket) -> Self {
        Outgoing {
            record,
            ticket,
            partition: None,
        }
    }
}

/// What became of records: the relay applies these to its window and its
/// watermark.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The broker acknowledged the record.
    Acked { ticket: EventTicket, topic: String },
    /// A dead letter that could not be delivered either: logged, released.
    GaveUp { ticket: EventTicket },
    /// Already in the log (exactly-once): not sent again.
    Skipped { ticket: EventTicket },
    /// A record was replaced by its dead letter, of another size.
    Resized { from: usize, to: usize },
    /// Its topic cannot be used and someone must fix that (the polling
    /// source counts an attempt; the WAL relay stops instead).
    Failed { ticket: EventTicket, error: String },
}

/// What a topic that cannot be used (missing under --no-create-topics,
/// not creatable) means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopicFailures {
    /// The relay stops with the fix: the WAL cannot move past the record.
    Stop,
    /// Each waiting record fails on its own ([`Outcome::Failed`]): a
    /// polled row can wait for its next attempt while others go on.
    FailRecords,
}

/// Something the publisher's sink, topic preparations or tail scans
/// produced.
pub enum PublisherEvent {
    Delivery(Delivery),
    Prepared(String, Result<i32, TopicError>),
    Scanned((String, i32), Instant, Result<LedgerScan, BrokerError>),
}

enum TopicState {
    /// Being prepared; these records wait for it, in order.
    Preparing(VecDeque<Outgoing>),
    Ready {
        partitions: i32,
    },
}

pub struct Publisher<S: Sink> {
    sink: S,
    dead_letter_topic: String,
    topics: HashMap<String, TopicState>,
    preparing: Vec<(String, LocalBoxFuture<Result<i32, TopicError>>)>,
    /// Records the producer's full queue turned away, oldest first.
    backlog: VecDeque<Outgoing>,
    backlog_retry_at: Option<Instant>,
    /// Records whose delivery failed, with when to send them again.
    retries: VecDeque<(Outgoing, Instant)>,
    /// Failures since the last success, for the backoff.
    failures: u32,
    outcomes: Vec<Outcome>,
    /// Exactly-once: partitions and what they already hold.
    ledgers: Option<PartitionLedgers>,
    topic_failures: TopicFailures,
}

impl<S: Sink> Publisher<S> {
    /// A publisher; with `ledgers`, exactly once.
    pub fn new(sink: S, dead_letter_topic: String, ledgers: Option<PartitionLedgers>) -> Self {
        Publisher {
            ledgers,
            sink,
            dead_letter_topic,
            topics: HashMap::new(),
            preparing: Vec::new(),
            backlog: VecDeque::new(),
            backlog_retry_at: None,
            retries: VecDeque::new(),
            failures: 0,
            outcomes: Vec::new(),
            topic_failures: TopicFailures::Stop,
        }
    }

    /// What an unusable topic means (default: stop).
    pub fn with_topic_failures(mut self, policy: TopicFailures) -> Self {
        self.topic_failures = policy;
        self
    }

    /// What became of records since the last call.
    pub fn take_outcomes(&mut self) -> Vec<Outcome> {
        std::mem::take(&mut self.outcomes)
    }

    /// Whether new records can go out now; false while the producer's queue
    /// is full, so the relay stops reading WAL.
    pub fn accepting(&self) -> bool {
        self.backlog.is_empty()
    }

    /// Starts preparing a topic ahead of its first record (the dead-letter
    /// topic, at start), so that record does not wait for it.
    pub fn warm_up(&mut self, topic: &str) {
        if !self.topics.contains_key(topic) {
            self.start_preparing(topic.to_owned(), Duration::ZERO);
            self.topics
                .insert(topic.to_owned(), TopicState::Preparing(VecDeque::new()));
        }
    }

    /// Exactly-once: a session starts (see `PartitionLedgers::begin`).
    pub fn begin_replay(&mut self, replay: Replay) {
        if let Some(ledgers) = self.ledgers.as_mut() {
            ledgers.begin(replay);
        }
    }

    /// Sends a record, or queues it behind what must go first.
    pub fn publish(&mut self, out: Outgoing) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(out);
            return;
        }
        self.route(out);
    }

    /// Sends a record once its topic is ready and, exactly once, its
    /// partition's ledger is known.
    fn route(&mut self, out: Outgoing) {
        match self.topics.get_mut(&out.record.topic) {
            Some(TopicState::Ready { partitions }) => {
                let partitions = *partitions;
                let route = match self.ledgers.as_mut() {
                    Some(ledgers) => ledgers.route(&self.sink, out, partitions),
                    None => Route::Send(out),
                };
                match route {
                    Route::Send(out) => self.send(out),
                    Route::Skip(out) => {
                        metrics::counter!(m::EVENTS_SKIPPED_TOTAL).increment(1);
                        self.outcomes.push(Outcome::Skipped { ticket: out.ticket });
                    }
                    Route::Waiting => {}
                }
            }
            Some(TopicState::Preparing(waiting)) => waiting.push_back(out),
            None => {
                let topic = out.record.topic.clone();
                self.start_preparing(topic.clone(), Duration::ZERO);
                self.topics
                    .insert(topic, TopicState::Preparing(VecDeque::from([out])));
            }
        }
    }

    fn start_preparing(&mut self, topic: String, after: Duration) {
        let prepare = self.sink.prepare_topic(&topic);
        let future: LocalBoxFuture<_> = if after.is_zero() {
            prepare
        } else {
            Box::pin(async move {
                tokio::time::sleep(after).await;
                prepare.await
            })
        };
        self.preparing.push((topic, future));
    }

    /// The next delivery report or finished topic preparation, reports
    /// first. Cancel-safe.
    pub async fn next_event(&mut self) -> PublisherEvent {
        poll_fn(|cx| {
            if let Poll::Ready(Some(delivery)) = self.sink.deliveries().poll_recv(cx) {
                return Poll::Ready(PublisherEvent::Delivery(delivery));
            }
            for i in 0..self.preparing.len() {
                if let Poll::Ready(result) = self.preparing[i].1.as_mut().poll(cx) {
                    let (topic, _) = self.preparing.swap_remove(i);
                    return Poll::Ready(PublisherEvent::Prepared(topic, result));
                }
            }
            if let Some(ledgers) = self.ledgers.as_mut().filter(|l| l.is_scanning()) {
                let scanned = std::pin::pin!(ledgers.next_scanned());
                if let Poll::Ready((key, started, result)) = scanned.poll(cx) {
                    return Poll::Ready(PublisherEvent::Scanned(key, started, result));
                }
            }
            Poll::Pending
        })
        .await
    }

    /// A partition's tail was scanned: its waiting records go on.
    pub fn on_scanned(
        &mut self,
        key: (String, i32),
        started: Instant,
        result: Result<LedgerScan, BrokerError>,
    ) {
        let Some(ledgers) = self.ledgers.as_mut() else {
            return;
        };
        for out in ledgers.on_scanned(key, started, result) {
            self.route(out);
        }
    }

    /// A topic preparation finished: release its records, retry it later,
    /// or stop the relay (a missing topic that may not be created).
    pub fn on_prepared(
        &mut self,
        topic: String,
        result: Result<i32, TopicError>,
    ) -> Result<(), RelayError> {
        match result {
            Ok(partitions) => {
                tracing::debug!(topic, partitions, "topic ready");
                let waiting = match self.topics.insert(topic, TopicState::Ready { partitions }) {
                    Some(TopicState::Preparing(waiting)) => waiting,
                    _ => VecDeque::new(),
                };
                for out in waiting {
                    self.publish(out);
                }
                Ok(())
            }
            Err(error) => {
                let waiting = matches!(
                    self.topics.get(&topic),
                    Some(TopicState::Preparing(w)) if !w.is_empty()
                );
                if !waiting {
                    // Prepared ahead of need (warm-up): not an error yet;
                    // the first record for it prepares it again.
                    tracing::warn!(topic, error = %error, "cannot prepare the topic yet");
                    self.topics.remove(&topic);
                    return Ok(());
                }
                let relay_error = RelayError::Topic(error);
                match decide(Failure::Session(&relay_error)) {
                    Decision::Retry => {
                        self.failures += 1;
                        let wait = backoff(self.failures, MAX_RETRY_BACKOFF);
                        tracing::warn!(topic, error = %relay_error, retry_in = ?wait, "topic not ready; retrying");
                        metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "metadata")
                            .increment(1);
                        self.start_preparing(topic, wait);
                        Ok(())
                    }
                    _ if self.topic_failures == TopicFailures::FailRecords => {
                        // Forgotten, so the next record for it prepares it
                        // again.
                        let waiting = match self.topics.remove(&topic) {
                            Some(TopicState::Preparing(waiting)) => waiting,
                            _ => VecDeque::new(),
                        };
                        tracing::warn!(topic, error = %relay_error, records = waiting.len(), "topic cannot be used");
                        metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "topic").increment(1);
                        for out in waiting {
                            self.outcomes.push(Outcome::Failed {
                                ticket: out.ticket,
                                error: relay_error.to_string(),
                            });
                        }
                        Ok(())
                    }
                    _ => Err(relay_error),
                }
            }
        }
    }

    fn send(&mut self, out: Outgoing) {
        let Outgoing {
            record,
            ticket,
            partition,
        } = out;
        match self.sink.send(record, partition, ticket) {
            Ok(()) => {}
            Err(SendRefused::QueueFull(record)) => {
                self.backlog.push_front(Outgoing {
                    record: *record,
                    ticket,
                    partition,
                });
                self.backlog_retry_at = Some(Instant::now() + QUEUE_FULL_PAUSE);
            }
            Err(SendRefused::Rejected { error, record }) => {
                self.on_failure(error, *record, ticket);
            }
        }
    }

    /// A delivery report without waiting, if one is there.
    pub fn try_delivery(&mut self) -> Option<Delivery> {
        self.sink.deliveries().try_recv().ok()
    }

    pub fn on_delivery(&mut self, delivery: Delivery) {
        match delivery.result {
            Ok(()) => {
                self.failures = 0;
                self.outcomes.push(Outcome::Acked {
                    ticket: delivery.ticket,
                    topic: delivery.topic,
                });
            }
            Err(failure) => self.on_failure(failure.error, failure.record, delivery.ticket),
        }
    }

    fn on_failure(&mut self, error: BrokerError, record: KafkaRecord, mut ticket: EventTicket) {
        match decide(Failure::Delivery {
            error: &error,
            dead_letter: ticket.dead_letter,
        }) {
            Decision::DeadLetter { kind, keep_value } => {
                let dead = crate::router::broker_dead_letter(
                    &self.dead_letter_topic,
                    &record,
                    &error.message,
                    kind,
                    keep_value,
                );
                tracing::warn!(topic = %record.topic, reason = %error, "broker refused a record; sending it to the dead-letter topic");
                metrics::counter!(m::DEAD_LETTERS_TOTAL, "kind" => "broker_rejected").increment(1);
                metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "rejected").increment(1);
                self.outcomes.push(Outcome::Resized {
                    from: ticket.bytes,
                    to: dead.size(),
                });
                ticket.bytes = dead.size();
                ticket.dead_letter = true;
                self.publish(Outgoing::new(dead, ticket));
            }
            Decision::GiveUp => {
                let id = record
                    .header("id")
                    .map(|v| String::from_utf8_lossy(v).into_owned());
                tracing::error!(topic = %record.topic, id = ?id, reason = %error, "the dead-letter topic refused a record; it is logged here and skipped");
                metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "dead_letter_rejected")
                    .increment(1);
                self.outcomes.push(Outcome::GaveUp { ticket });
            }
            _ => {
                // A broker error, or a finite -X message.timeout.ms: send it
                // again after a pause (never in a tight loop). It stays in
                // flight meanwhile, so nothing is confirmed past it.
                self.failures += 1;
                let wait = backoff(self.failures.min(8), MAX_RETRY_BACKOFF);
                if self.retries.is_empty() {
                    tracing::warn!(topic = %record.topic, error = %error, retry_in = ?wait, "delivery failed; will send again");
                }
                metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "delivery").increment(1);
                self.retries
                    .push_back((Outgoing::new(record, ticket), Instant::now() + wait));
            }
        }
    }

    /// When records are due to be offered again, if any wait.
    pub fn due_at(&self) -> Option<Instant> {
        let retry = self.retries.front().map(|(_, due)| *due);
        match (
            self.backlog_retry_at.filter(|_| !self.backlog.is_empty()),
            retry,
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Offers the backlog again, then every failed record that is due.
    pub fn resend_due(&mut self) {
        while let Some(out) = self.backlog.pop_front() {
            let before = self.backlog.len();
            self.send_from_backlog(out);
            if self.backlog.len() > before {
                break; // still full
            }
        }
        let now = Instant::now();
        while self.retries.front().is_some_and(|(_, due)| *due <= now) {
            let (out, _) = self.retries.pop_front().expect("checked above");
            self.publish(out);
        }
    }

    /// Like `send`, for the backlog's head: its topic is ready (it was
    /// sent once already) and nothing may overtake it.
    fn send_from_backlog(&mut self, out: Outgoing) {
        match self.topics.get_mut(&out.record.topic) {
            Some(TopicState::Ready { .. }) => self.send(out),
            Some(TopicState::Preparing(waiting)) => waiting.push_back(out),
            None => {
                let topic = out.record.topic.clone();
                self.start_preparing(topic.clone(), Duration::ZERO);
                self.topics
                    .insert(topic, TopicState::Preparing(VecDeque::from([out])));
            }
        }
    }
}

/// Capped exponential backoff with full jitter, starting at 250 ms.
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(250).saturating_mul(1 << attempt.min(16));
    let capped = base.min(max);
    let jitter = rand::random_range(0.5..=1.0);
    capped.mul_f64(jitter)
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
