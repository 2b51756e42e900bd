//! Broker I/O that finished (tail reads, takeovers, commits, aborts, topics
//! prepared), and what the publisher does after what the transaction
//! decided.

use std::time::Duration;

use tokio::time::Instant;

use super::Publisher;
use super::cleanup::{HIDDEN_RETRY, HIDDEN_WAIT, clean_up};
use crate::metrics as m;
use crate::publish::broker_io::{Io, SessionIo};
use crate::publish::error::PublishError;
use crate::publish::outcome::{Outcome, TopicFailures};
use crate::publish::sink::{BrokerErrorClass, Sink, TopicError};
use crate::publish::topics::Prepared;
use crate::publish::transaction::Next;

impl<S: Sink, T: Copy> Publisher<S, T> {
    pub(super) fn on_io(&mut self, io: Io, outcomes: &mut Vec<Outcome<T>>) {
        let io = match io {
            Io::Prepared(topic, result) => return self.on_prepared(topic, result, outcomes),
            Io::Asked(asked, result) => return self.on_asked(asked, result, outcomes),
            Io::Session(io) => io,
            Io::Ended => return,
        };
        match io {
            SessionIo::Scanned(key, started, result) => {
                let Some(ledgers) = self.ledgers.as_mut() else {
                    return;
                };
                match result {
                    // The broker is away, or reading is not allowed yet:
                    // publishing blind would duplicate what the partition
                    // holds, and nothing can be sent meanwhile anyway. Its
                    // records wait; the tail is read again.
                    Err(error)
                        if matches!(
                            error.class,
                            BrokerErrorClass::Transient | BrokerErrorClass::NotAuthorized
                        ) =>
                    {
                        let wait = self.pause.failed();
                        self.offline.read_failed(&key);
                        if error.class == BrokerErrorClass::NotAuthorized {
                            tracing::error!(topic = %key.topic, partition = key.partition, %error, "exactly once reads each partition's tail, and this principal may not: grant it READ on the topic (or run --delivery at-least-once); its records wait");
                        } else {
                            tracing::warn!(topic = %key.topic, partition = key.partition, %error, retry_in = ?wait, "cannot read the partition's tail yet; its records wait");
                        }
                        let scan = ledgers.rescan(&key);
                        let read = self.read_tail(&key, scan);
                        self.io.watch(async move {
                            tokio::time::sleep(wait).await;
                            SessionIo::Scanned(key, started, read.await.map(Box::new))
                        });
                    }
                    // An open transaction hides the tail: it may be one of
                    // this relay's ids, left open by a partition that had no
                    // leader. Clean up once, then read it again.
                    Ok(scan)
                        if scan.is_hidden()
                            && self.txn.is_on()
                            && clean_up(
                                &mut self.txn,
                                &mut self.cleaned,
                                &self.used_in_session,
                                self.replayed_from,
                                &key,
                                &scan,
                            ) => {}
                    // No id of this session may end it: Kafka does, once
                    // the transaction times out (an abandoned producer's) or
                    // its markers are written. Read again until then; only
                    // past that is the tail taken as unsure (published
                    // again, at least once).
                    Ok(scan)
                        if scan.is_hidden()
                            && self.txn.is_on()
                            && self
                                .hidden
                                .entry(key.clone())
                                .or_insert_with(Instant::now)
                                .elapsed()
                                < HIDDEN_WAIT =>
                    {
                        tracing::info!(topic = %key.topic, partition = key.partition, "an open transaction hides the partition's newest records: reading it again until Kafka ends it");
                        self.io.watch(async move {
                            tokio::time::sleep(HIDDEN_RETRY).await;
                            SessionIo::ReadHiddenAgain(key)
                        });
                    }
                    result => {
                        self.hidden.remove(&key);
                        self.offline.read_done(&key);
                        let result = result.map(|scan| *scan).map_err(|e| e.to_string());
                        ledgers.scanned(key, started.elapsed().as_secs_f64(), result);
                    }
                }
            }
            SessionIo::Initialized(id, result) => {
                let next = self.txn.initialized(&id, result);
                self.follow(next, outcomes);
            }
            SessionIo::Committed(result) => {
                // The commit of the transaction before the open one went
                // through that one's id: an error ending it names that id.
                let committing = self.txn.committing_id();
                tracing::debug!(?result, id = ?committing.as_ref().or(self.txn.id.as_ref()), "commit finished");
                let next = self.txn.committed(result);
                self.follow_under(next, committing, outcomes);
                if let Some(next) = self.txn.rest_if_stuck() {
                    self.follow(next, outcomes);
                }
            }
            SessionIo::Aborted(result) if self.txn.is_cleaning() => {
                tracing::debug!(?result, written = ?self.cleanup.written, "cleanup abort finished");
                match self.txn.cleaned(result, &self.cleanup.written) {
                    Next::Pause(wait) => {
                        let abort = self.sink.abort();
                        self.io.watch(async move {
                            tokio::time::sleep(wait).await;
                            SessionIo::Aborted(abort.await)
                        });
                    }
                    next => {
                        self.follow(next, outcomes);
                        if let Some(next) = self.txn.rest_if_stuck() {
                            self.follow(next, outcomes);
                        }
                    }
                }
            }
            SessionIo::Aborted(result) => {
                let committing = self.txn.committing_id();
                tracing::debug!(?result, id = ?committing.as_ref().or(self.txn.id.as_ref()), written = self.records.any_written(), "abort finished");
                let next = self.txn.aborted(result, self.records.any_written());
                self.follow_under(next, committing, outcomes);
            }
            SessionIo::ReadHiddenAgain(key) => {
                if let Some(ledgers) = self.ledgers.as_mut() {
                    let scan = ledgers.rescan(&key);
                    let read = self.read_tail(&key, scan);
                    let started = Instant::now();
                    self.io.watch(async move {
                        SessionIo::Scanned(key, started, read.await.map(Box::new))
                    });
                }
            }
            SessionIo::CleanupWaited(round) => {
                if round == self.cleanup.round
                    && self.cleanup.outstanding > 0
                    && self.txn.is_cleaning()
                {
                    tracing::warn!(waiting = ?self.cleanup.partitions, "cleanup records not written in time: aborting without them");
                    self.cleanup.outstanding = 0;
                    self.abort_cleanup();
                }
            }
        }
    }

    /// Does what the transaction decided after the I/O of `id`'s
    /// transaction (the one before the open one, if `Some`): an error that
    /// ends the producer names that id.
    fn follow_under(&mut self, next: Next, id: Option<String>, outcomes: &mut Vec<Outcome<T>>) {
        match (next, id) {
            (Next::EndProducer(error), Some(id)) => {
                self.failed = Some(PublishError::ending(error, Some(&id)));
            }
            (next, _) => self.follow(next, outcomes),
        }
    }

    /// Does what the transaction decided after its I/O.
    pub(super) fn follow(&mut self, next: Next, outcomes: &mut Vec<Outcome<T>>) {
        self.follow_next(next, outcomes);
        // A cleanup dropped (its id rests): the tail is read again, and may
        // be cleaned up by another id.
        for key in self.txn.take_dropped_cleanups() {
            self.cleaned.remove(&key);
            if let Some(ledgers) = self.ledgers.as_mut() {
                ledgers.forget_partition(&key);
            }
        }
    }

    fn follow_next(&mut self, next: Next, outcomes: &mut Vec<Outcome<T>>) {
        match next {
            Next::Go => {}
            Next::Use(id) => self.sink.switch_to(&id),
            Next::CleanUp(id, partitions) => self.clean_up_under(&id, &partitions),
            Next::CleanupGivenUp(abandon, partitions) => {
                self.sink.abandon(&abandon);
                if let Some(id) = self.txn.id.clone() {
                    self.sink.switch_to(&id);
                }
                if let Some(ledgers) = self.ledgers.as_mut() {
                    for key in &partitions {
                        ledgers.forget_partition(key);
                    }
                }
            }
            Next::Cleaned(id, partitions) => {
                if let Some(id) = id {
                    self.sink.switch_to(&id);
                }
                if let Some(ledgers) = self.ledgers.as_mut() {
                    for key in &partitions {
                        ledgers.forget_partition(key);
                    }
                }
            }
            Next::Rest { abandon, next } => {
                metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "partition_offline")
                    .increment(1);
                self.sink.abandon(&abandon);
                self.records.requeue_all();
                match next {
                    Some(id) => {
                        tracing::info!(stuck = %abandon, now = %id, "records go on under the spare transactional id");
                        self.sink.switch_to(&id);
                    }
                    None => {
                        tracing::warn!(stuck = %abandon, "every transactional id waits for an offline partition: records wait until one is back")
                    }
                }
            }
            Next::Deliver => {
                for entry in self.records.take_sealed() {
                    outcomes.push(Outcome::Delivered {
                        tag: entry.tag,
                        topic: entry.record.topic,
                        dead_letter: entry.dead_letter,
                    });
                }
            }
            Next::SendAgain => self.records.requeue_all(),
            Next::CommitAgain => {
                let commit = self.under_committing(|sink| sink.commit());
                self.io.watch(async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    super::timed_commit(commit).await
                });
            }
            Next::BackOff => {
                let wait = self.pause.failed();
                self.pause(wait);
            }
            Next::Pause(wait) => self.pause(wait),
            Next::EndProducer(error) => {
                self.failed = Some(PublishError::ending(error, self.txn.id.as_deref()));
            }
        }
    }

    pub(super) fn on_prepared(
        &mut self,
        topic: String,
        result: Result<i32, TopicError>,
        outcomes: &mut Vec<Outcome<T>>,
    ) {
        let first_time = self.topics.is_preparing(&topic);
        let error = match result.map(|p| self.topics.prepared(&topic, p)) {
            Ok(Ok(Prepared::Ready)) => return,
            Ok(Ok(Prepared::Grew)) => {
                if let Some(ledgers) = self.ledgers.as_mut() {
                    ledgers.forget_topic(&topic);
                }
                return;
            }
            Ok(Err(error)) | Err(error) => error,
        };
        if !first_time {
            if let TopicError::Shrank { .. } = error {
                self.failed = Some(PublishError::Topic(error));
            } else {
                // A refresh that failed: the known count stands.
                tracing::debug!(topic, %error, "cannot read the topic's partition count again");
                self.topics.refresh_failed(&topic);
            }
            return;
        }
        self.topics.forget(&topic);
        let waiting = self.records.waiting_for(&topic);
        if waiting.is_empty() && topic == self.config.dead_letter_topic {
            // Prepared ahead of need: the first dead letter prepares it again.
            tracing::warn!(topic, %error, "cannot prepare the dead-letter topic yet");
            return;
        }
        let retry = matches!(
            error,
            TopicError::Metadata { .. }
                | TopicError::Create {
                    permanent: false,
                    ..
                }
        );
        if retry {
            let wait = self.pause.failed();
            tracing::warn!(topic, %error, retry_in = ?wait, "topic not ready; retrying");
            metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "metadata").increment(1);
            self.pause(wait);
            return;
        }
        match self.config.topic_failures {
            TopicFailures::Stop => self.failed = Some(PublishError::Topic(error)),
            TopicFailures::FailRecords => {
                tracing::warn!(topic, %error, records = waiting.len(), "topic cannot be used");
                metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "topic").increment(1);
                for id in waiting {
                    let entry = self.records.remove(id).expect("waiting");
                    outcomes.push(Outcome::Failed {
                        tag: entry.tag,
                        error: error.to_string(),
                    });
                }
            }
        }
    }

    /// Prepares `topic` (creating it when `create`), or reads its count
    /// again.
    pub(super) fn prepare(&mut self, topic: &str, create: bool) {
        if create {
            self.topics.preparing(topic);
        } else {
            self.topics.refreshing(topic);
        }
        let prepare = self.sink.prepare_topic(topic, create);
        self.io.watch_topic(topic.to_owned(), prepare);
    }
}
