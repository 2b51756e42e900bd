//! Delivery reports: a record acknowledged, failed, or purged by an abort.

use super::Publisher;
use super::cleanup::cleanup_index;
use crate::metrics as m;
use crate::publish::error::{DeliveryDecision, PublishError, decide};
use crate::publish::outcome::Outcome;
use crate::publish::sink::{BrokerError, Delivery, RecordId, Sink};

impl<S: Sink, T: Copy> Publisher<S, T> {
    pub(super) fn on_delivery(&mut self, delivery: Delivery, outcomes: &mut Vec<Outcome<T>>) {
        if let Some(index) = cleanup_index(delivery.send.id) {
            let current = delivery.send.attempt == self.cleanup.round
                && self.cleanup.outstanding > 0
                && self.txn.is_cleaning();
            if let Some(key) = self.cleanup.partitions.get(index).filter(|_| current) {
                match &delivery.result {
                    Ok(()) => self.cleanup.written.push(key.clone()),
                    Err(error) => {
                        tracing::warn!(%error, topic = %key.topic, partition = key.partition, "a cleanup record was not written: what was left open there stays")
                    }
                }
                self.cleanup.outstanding -= 1;
                if self.cleanup.outstanding == 0 {
                    self.abort_cleanup();
                }
            }
            return;
        }
        if !self.records.reported(delivery.send) {
            return; // discarded, settled, or a report of an earlier send
        }
        let id = delivery.send.id;
        match delivery.result {
            Ok(()) => {
                self.pause.succeeded();
                if self.txn.is_on() {
                    self.records.mark_acked(id);
                } else {
                    let entry = self.records.remove(id).expect("reported");
                    outcomes.push(Outcome::Delivered {
                        tag: entry.tag,
                        topic: entry.record.topic,
                        dead_letter: entry.dead_letter,
                    });
                }
            }
            // The transaction is being aborted: its records not yet
            // written are purged, and go again once it ends.
            Err(_) if self.txn.is_aborting() => self.records.requeue(id),
            Err(error) => self.on_failure(id, error, outcomes),
        }
    }

    /// A record was not taken: send it again later, refuse it, or give up
    /// on the producer.
    pub(super) fn on_failure(
        &mut self,
        id: RecordId,
        error: BrokerError,
        outcomes: &mut Vec<Outcome<T>>,
    ) {
        // The transaction cannot commit now: it is aborted and its records
        // sent again (a refused one goes back to its source).
        self.txn.fail();
        match decide(&error) {
            DeliveryDecision::EndProducer => {
                self.failed = Some(PublishError::ending(error, self.txn.id.as_deref()));
            }
            DeliveryDecision::Refuse { kind } => {
                let entry = self.records.remove(id).expect("a record in flight");
                tracing::warn!(topic = %entry.record.topic, reason = %error, kind = kind.as_str(), "the broker refused a record for good");
                metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "refused").increment(1);
                outcomes.push(Outcome::Refused {
                    tag: entry.tag,
                    record: entry.record,
                    error,
                    kind,
                    dead_letter: entry.dead_letter,
                });
            }
            DeliveryDecision::Retry => {
                let wait = self.pause.failed();
                tracing::warn!(error = %error, retry_in = ?wait, "delivery failed; will send again");
                metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "delivery").increment(1);
                self.records.requeue(id);
                self.pause(wait);
            }
        }
    }
}
