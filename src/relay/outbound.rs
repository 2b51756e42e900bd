//! The WAL relay's side of the publisher: events handed over (ticketed in
//! the tracker, admitted to the in-flight window, stamped with the
//! session's origin), and what became of them settled (the window
//! released, the tracker acknowledged, the live state counted). An event
//! the broker refuses for good is kept whole in the dead-letter table
//! first (`refused.rs`), and settles only once its notice is on the
//! dead-letter topic.
//!
//! Kept apart from the loop (`wal_relay.rs`), which decides when to read
//! WAL and what each item means; this decides nothing, it keeps count.

use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::ack_tracker::TxnTicket;
use super::confirmer::Confirmer;
use super::error::RelayError;
use super::refused::Refused;
use super::session::SessionStart;
use super::window::InFlightWindow;
use super::{DeliveryGuarantee, RelayConfig};
use crate::dead_letters::{DeadLetterStore, PgDeadLetters};
use crate::live::{Delivered, LiveState};
use crate::metrics as m;
use crate::publish::{
    Origin, OriginStamp, Outcome, Outgoing, Position, PublishError, Publisher, PublisherConfig,
    RefusalKind, RefusedRecord, Replay, ScanSettings, Sink, ToSend, TopicFailures,
};
use crate::record::KafkaRecord;
use crate::router::Routed;
use crate::timeline::TimelineHistory;
use crate::timestamp::PgTimestamp;

/// What travels with each record through the publisher and back.
#[derive(Clone, Copy, Debug)]
pub(super) struct EventTag {
    txn: TxnTicket,
    commit_time: PgTimestamp,
    /// The record's size, released from the window when it is settled.
    bytes: usize,
    position: Position,
    /// Kept whole in the dead-letter table already: a refusal of its
    /// record now only loses a notice.
    stored: bool,
}

/// What the publisher side has to settle.
pub(super) enum Settling {
    /// What became of records.
    Outcomes(Result<Vec<Outcome<EventTag>>, PublishError>),
    /// A refused event is kept whole in the table: its notice goes to the
    /// dead-letter topic now.
    Stored(EventTag, KafkaRecord),
}

pub(super) struct Outbound<S: Sink> {
    publisher: Publisher<S, EventTag>,
    window: InFlightWindow,
    /// Refused events being kept in the dead-letter table.
    refused: Refused<EventTag>,
    live: Arc<LiveState>,
    delivered: Delivered,
    /// The last acknowledgement, or when events started to wait.
    last_progress: Instant,
    /// Exactly once: the headers every record of this session carries.
    stamp: Option<OriginStamp>,
    /// This session's origin, for the dead-letter table's keys.
    origin: Option<Origin>,
    /// This session's timelines, for the dead-letter table's keys.
    history: Option<TimelineHistory>,
    dead_letter_topic: String,
    dead_letter_table: (String, String),
}

impl<S: Sink> Outbound<S> {
    pub(super) fn new(config: &RelayConfig, sink: S, live: Arc<LiveState>) -> Self {
        let exactly_once =
            (config.delivery == DeliveryGuarantee::ExactlyOnce).then(|| ScanSettings {
                lookback: config.exactly_once_lookback,
                dead_letter_topic: config.router.dead_letter_topic.clone(),
                window: config.max_in_flight_events,
                margin: crate::publish::EVENT_MARGIN,
            });
        let mut publisher = Publisher::new(
            sink,
            PublisherConfig {
                dead_letter_topic: config.router.dead_letter_topic.clone(),
                topic_failures: TopicFailures::Stop,
                exactly_once,
            },
        );
        publisher.share_held_partitions(live.held_partitions.clone());
        publisher.limit_transactions(
            config.max_in_flight_events / 2,
            config.max_in_flight_bytes / 2,
        );
        Outbound {
            window: InFlightWindow::new(config.max_in_flight_events, config.max_in_flight_bytes),
            publisher,
            live,
            last_progress: Instant::now(),
            stamp: None,
            origin: None,
            history: None,
            delivered: Delivered::default(),
            refused: Refused::new(
                Rc::new(PgDeadLetters {
                    pg: config.pg.clone(),
                    primary: config.primary.clone(),
                    table: config.dead_letter_table.clone(),
                }),
                config.max_backoff,
            ),
            dead_letter_topic: config.router.dead_letter_topic.clone(),
            dead_letter_table: config.dead_letter_table.clone(),
        }
    }

    /// Keeps refused events in `store` instead of the dead-letter table.
    pub(super) fn set_dead_letter_store(&mut self, store: Rc<dyn DeadLetterStore>) {
        self.refused.set_store(store);
    }

    /// A session starts: its origin is what records carry from now on
    /// (exactly once), and the publisher begins a session of its own.
    pub(super) fn begin_session(&mut self, config: &RelayConfig, start: &SessionStart) {
        let origin = Origin {
            system_id: start.system_id.clone(),
            slot: config.slot.clone(),
            timeline: start.history.current,
        };
        let exactly_once = config.delivery == DeliveryGuarantee::ExactlyOnce;
        let replay = exactly_once.then(|| Replay {
            origin: origin.clone(),
            history: start.history.clone(),
            start: start.slot_confirmed,
        });
        let transactional_id = config
            .transactional_id
            .clone()
            .unwrap_or_else(|| format!("walrelay.{}.{}", start.system_id, config.slot));
        self.publisher
            .begin_session(replay, exactly_once.then_some(transactional_id));
        self.stamp = exactly_once.then(|| OriginStamp::new(&origin));
        self.origin = Some(origin);
        self.history = Some(start.history.clone());
    }

    /// Whether more events may be handed over now: the publisher takes
    /// them and the window has room.
    pub(super) fn takes_more(&mut self) -> bool {
        self.publisher.accepting() && self.window.has_room()
    }

    /// Whether nothing is in flight.
    pub(super) fn is_empty(&self) -> bool {
        self.window.is_empty()
    }

    /// Events in flight.
    pub(super) fn events(&self) -> usize {
        self.window.events()
    }

    /// The last acknowledgement, or when events started to wait.
    pub(super) fn last_progress(&self) -> Instant {
        self.last_progress
    }

    /// Whether every event in flight waits for a partition with no leader
    /// (`publish/offline.rs`): no broker stall, and nothing else to wait
    /// for before a new session.
    pub(super) fn waits_only_for_offline(&self) -> bool {
        self.refused.is_empty() && self.publisher.waits_only_for_offline()
    }

    /// Counts as progress: the stall clock starts again.
    pub(super) fn not_stalled(&mut self) {
        self.last_progress = Instant::now();
    }

    /// Forgets everything in flight (it will be read again from the slot);
    /// returns how many records were dropped.
    pub(super) fn discard(&mut self) -> usize {
        let dropped = self.publisher.discard() + self.refused.clear();
        self.window.clear();
        self.live.record_in_flight(0, 0);
        dropped
    }

    /// The next thing to settle. Cancel-safe.
    pub(super) async fn next(&mut self) -> Settling {
        tokio::select! {
            biased;
            outcomes = self.publisher.next() => Settling::Outcomes(outcomes),
            (tag, notice) = self.refused.next() => Settling::Stored(tag, notice),
        }
    }

    /// A refused event is kept whole in the table: its notice goes to the
    /// dead-letter topic, and settles the event.
    pub(super) fn stored(
        &mut self,
        mut tag: EventTag,
        notice: KafkaRecord,
        confirmer: &mut Confirmer,
    ) -> Result<(), RelayError> {
        tag.stored = true;
        let position = self.stamp.is_some().then_some(tag.position);
        let outcomes = self.publisher.publish(Outgoing {
            record: notice,
            tag,
            position,
            dead_letter: true,
        });
        self.settle(outcomes, confirmer)
    }

    /// Hands a routed change to the publisher, if it is one.
    pub(super) fn publish(
        &mut self,
        routed: Routed,
        txn: TxnTicket,
        commit_time: PgTimestamp,
        position: Position,
        confirmer: &mut Confirmer,
    ) -> Result<(), RelayError> {
        let Some(ToSend {
            mut record,
            unroutable,
        }) = crate::publish::to_send(routed, position)
        else {
            return Ok(());
        };
        confirmer.event_sent(txn)?;
        if self.window.is_empty() {
            // Events start to wait: the stall clock starts now.
            self.last_progress = Instant::now();
        }
        if let Some(stamp) = &self.stamp {
            stamp.stamp(&mut record, position);
        }
        let tag = EventTag {
            txn,
            commit_time,
            bytes: record.size(),
            position,
            stored: false,
        };
        self.window.admit(tag.bytes);
        let outcomes = self.publisher.publish(Outgoing {
            record,
            tag,
            position: self.stamp.is_some().then_some(position),
            dead_letter: unroutable.is_some(),
        });
        self.settle(outcomes, confirmer)
    }

    /// Applies what became of records to the window and the watermark.
    pub(super) fn settle(
        &mut self,
        outcomes: Vec<Outcome<EventTag>>,
        confirmer: &mut Confirmer,
    ) -> Result<(), RelayError> {
        let mut outcomes = VecDeque::from(outcomes);
        while let Some(outcome) = outcomes.pop_front() {
            let tag = match outcome {
                Outcome::Delivered {
                    tag,
                    topic,
                    dead_letter,
                } => {
                    self.delivered
                        .count(&self.live, &topic, tag.commit_time, dead_letter);
                    tag
                }
                Outcome::Skipped { tag } => {
                    self.live
                        .counters
                        .events_skipped
                        .fetch_add(1, Ordering::Relaxed);
                    tag
                }
                Outcome::Refused {
                    tag,
                    record,
                    error,
                    kind,
                    dead_letter,
                } if !dead_letter || !tag.stored => {
                    // The broker will never take it (an event, or an
                    // unroutable change's dead letter: every column, so it
                    // can be large): it is kept whole in the dead-letter
                    // table first, then its notice goes to the dead-letter
                    // topic; only then is it settled.
                    self.store_dead_letter(tag, record, kind, error.message);
                    continue;
                }
                Outcome::Refused {
                    tag, record, error, ..
                } => {
                    // Its notice was refused too; the event itself is in
                    // the dead-letter table.
                    let id = record
                        .header("id")
                        .map(|v| String::from_utf8_lossy(v).into_owned());
                    tracing::error!(topic = %record.topic, id = ?id, reason = %error, table = %crate::dead_letters::display(&self.dead_letter_table), "the dead-letter topic refused a notice; the event is kept in the dead-letter table");
                    metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => "dead_letter_rejected")
                        .increment(1);
                    tag
                }
                Outcome::Failed { error, .. } => {
                    unreachable!("the WAL relay's publisher stops on topic errors: {error}")
                }
            };
            self.last_progress = Instant::now();
            self.window.release(tag.bytes);
            confirmer.ack(tag.txn)?;
        }
        self.live
            .record_in_flight(self.window.events(), self.window.bytes());
        Ok(())
    }

    /// Keeps a refused event whole in the dead-letter table (trying again
    /// until PostgreSQL takes it; the event stays in flight meanwhile).
    fn store_dead_letter(
        &mut self,
        tag: EventTag,
        record: KafkaRecord,
        kind: RefusalKind,
        error: String,
    ) {
        // Keyed by the timeline the event was written on, not the
        // session's: a replay after a failover is the same row.
        let origin = self.origin.as_ref().map_or_else(String::new, |origin| {
            let timeline = self.history.as_ref().map_or(origin.timeline, |history| {
                history.timeline_of(tag.position.commit)
            });
            Origin {
                timeline,
                ..origin.clone()
            }
            .to_string()
        });
        let RefusedRecord { letter, notice } = crate::publish::refused(
            &self.dead_letter_topic,
            format!("{origin}/{}", tag.position),
            record,
            error,
            kind,
        );
        self.refused.keep(tag, letter, notice);
    }
}
