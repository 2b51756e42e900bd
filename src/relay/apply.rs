//! The relay's loop: one biased `select!` over everything that can happen,
//! in this order of priority:
//!
//! 1. shutdown: stop reading WAL, drain what is in flight, confirm, end;
//! 2. a finding of the slot monitor (a dropped outbox table ends the relay);
//! 3. the publisher: delivery reports (they free the window and move the
//!    watermark) and topics that became ready;
//! 4. records due to be offered to the sink again;
//! 5. a status update due to PostgreSQL (periodic, or coalesced after the
//!    watermark moved);
//! 6. the replication link: a connection attempt finishing, or new WAL
//!    while the window has room;
//! 7. the timers: the broker stall (events wait and nothing was
//!    acknowledged for `--broker-stall-timeout`), reconnecting (only once
//!    nothing is in flight) and the shutdown deadline.
//!
//! No branch waits on anything but its own future, so shutdown, deliveries
//! and the walsender are answered whatever else is going on.
//!
//! # Never holding the database
//!
//! At shutdown a walsender waits until its client has confirmed everything
//! it sent, and walrelay confirms only what the broker acknowledged. So
//! while the broker is away, or while a long backlog drains, a connected
//! relay would hold PostgreSQL's shutdown. Two rules prevent that: when
//! events wait and nothing has been acknowledged for the stall timeout,
//! the relay ends its session cleanly (the walsender exits) and keeps
//! waiting on the producer, streaming again once everything in flight is
//! acknowledged; and when the slot monitor sees the server shutting down,
//! the relay ends its session at once. Either way the slot keeps its
//! confirmed position, so nothing is lost.

use std::future::pending;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use bytes::Bytes;

use super::ack_tracker::TxnTicket;
use super::confirmer::Confirmer;
use super::error::RelayError;
use super::link::{Link, LinkEvent, Release};
use super::partitions::{PartitionLedgers, ScanSettings};
use super::publisher::{Outcome, Outgoing, Publisher, PublisherEvent};
use super::session::{Connector, Session, WalItem};
use super::window::InFlightWindow;
use super::{DeliveryGuarantee, RelayConfig};
use crate::ledger::{ORIGIN_HEADER, POSITION_HEADER, Position};
use crate::live::LiveState;
use crate::lsn::Lsn;
use crate::metrics as m;
use crate::monitor::Finding;
use crate::pgoutput::PgTimestamp;
use crate::router::{Routed, Router};
use crate::sink::{EventTicket, Sink};

/// The transaction being applied.
pub(super) struct OpenTxn {
    ticket: TxnTicket,
    commit_time: PgTimestamp,
    /// When a heartbeat in this transaction was emitted (Unix microseconds).
    heartbeat_emitted_at: Option<i64>,
}

pub struct Relay<C: Connector, S: Sink> {
    pub(super) config: RelayConfig,
    pub(super) connector: C,
    /// Built when the first session tells the system identifier.
    pub(super) router: Option<Router>,
    pub(super) window: InFlightWindow,
    pub(super) confirmer: Confirmer,
    pub(super) publisher: Publisher<S>,
    pub(super) live: Arc<LiveState>,
    pub(super) findings: mpsc::Receiver<Finding>,
    pub(super) open: Option<OpenTxn>,
    /// Failed sessions in a row, towards giving up on a permanent error.
    pub(super) attempt: u32,
    pub(super) session_began: Instant,
    pub(super) confirmed_at_session_start: Lsn,
    /// The last acknowledgement, or when events started to wait.
    pub(super) last_progress: Instant,
    /// Exactly once: this session's origin as the header every record
    /// carries (formatted once per session, not per record).
    pub(super) origin_header: Option<Bytes>,
}

impl<C: Connector, S: Sink> Relay<C, S> {
    pub fn new(
        config: RelayConfig,
        connector: C,
        sink: S,
        live: Arc<LiveState>,
        findings: mpsc::Receiver<Finding>,
    ) -> Self {
        let ledgers = (config.delivery == DeliveryGuarantee::ExactlyOnce).then(|| {
            PartitionLedgers::new(ScanSettings {
                lookback: config.exactly_once_lookback,
                dead_letter_topic: config.router.dead_letter_topic.clone(),
                window: config.max_in_flight_events,
            })
        });
        let mut publisher = Publisher::new(sink, config.router.dead_letter_topic.clone(), ledgers);
        // The dead-letter topic is made ready before the first event needs it.
        publisher.warm_up(&config.router.dead_letter_topic);
        Relay {
            window: InFlightWindow::new(config.max_in_flight_events, config.max_in_flight_bytes),
            confirmer: Confirmer::new(config.status_interval),
            publisher,
            router: None,
            connector,
            live,
            findings,
            open: None,
            attempt: 0,
            session_began: Instant::now(),
            confirmed_at_session_start: Lsn::ZERO,
            last_progress: Instant::now(),
            origin_header: None,
            config,
        }
    }

    /// Runs until `shutdown` turns true (then drains and returns `Ok`) or a
    /// permanent error.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), RelayError> {
        let mut link: Link<C::Stream> = Link::Idle {
            reconnect_at: Instant::now(),
        };
        let mut stop_deadline: Option<Instant> = None;
        loop {
            if let Some(deadline) = stop_deadline {
                if self.window.is_empty() || Instant::now() >= deadline {
                    return self.stop(link).await;
                }
            }
            let streaming = link.is_streaming();
            let reading = streaming
                && stop_deadline.is_none()
                && self.publisher.accepting()
                && self.window.has_room();
            let feedback_at = streaming.then(|| self.confirmer.due_at());
            let resend_at = self.publisher.due_at();
            let stall_at = (streaming && stop_deadline.is_none() && !self.window.is_empty())
                .then(|| self.last_progress + self.config.broker_stall_timeout);
            let reconnect_at = match &link {
                Link::Idle { reconnect_at }
                    if stop_deadline.is_none() && self.window.is_empty() =>
                {
                    Some(*reconnect_at)
                }
                _ => None,
            };
            let outcome: Result<(), RelayError> = tokio::select! {
                biased;
                _ = shutdown.changed(), if stop_deadline.is_none() => {
                    tracing::info!(in_flight = self.window.events(), "stopping: draining in-flight events");
                    stop_deadline = Some(Instant::now() + self.config.shutdown_timeout);
                    Ok(())
                }
                Some(finding) = self.findings.recv() => match finding {
                    Finding::Outbox(problem) => Err(RelayError::Outbox(problem)),
                    Finding::ServerStopping => self.release(&mut link, Release::ServerStopping).await,
                },
                event = self.publisher.next_event() => match event {
                    PublisherEvent::Delivery(delivery) => {
                        self.publisher.on_delivery(delivery);
                        while let Some(delivery) = self.publisher.try_delivery() {
                            self.publisher.on_delivery(delivery);
                        }
                        self.settle()
                    }
                    PublisherEvent::Prepared(topic, result) => {
                        self.publisher.on_prepared(topic, result).and_then(|()| self.settle())
                    }
                    PublisherEvent::Scanned(key, started, result) => {
                        self.publisher.on_scanned(key, started, result);
                        self.settle()
                    }
                },
                _ = sleep_until(resend_at), if resend_at.is_some() => {
                    self.publisher.resend_due();
                    self.settle()
                }
                _ = sleep_until(feedback_at), if feedback_at.is_some() => {
                    self.send_feedback(&mut link, false).await
                }
                event = link.next(reading) => match event {
                    LinkEvent::Connected(Ok((stream, start))) => {
                        self.on_connected(start);
                        link = Link::Streaming(Session::new(stream));
                        Ok(())
                    }
                    LinkEvent::Connected(Err(error)) => Err(error),
                    LinkEvent::Item(Ok(item)) => self.apply(item, &mut link).await,
                    LinkEvent::Item(Err(error)) => Err(error),
                },
                _ = sleep_until(stall_at), if stall_at.is_some() => {
                    self.release(&mut link, Release::BrokerStalled).await
                }
                _ = sleep_until(reconnect_at), if reconnect_at.is_some() => {
                    link = Link::Connecting(self.connector.connect(self.confirmer.confirmed()));
                    Ok(())
                }
                _ = sleep_until(stop_deadline), if stop_deadline.is_some() => Ok(()),
            };
            if let Err(error) = outcome {
                self.on_error(error, &mut link)?;
            }
        }
    }

    /// Applies one item of the stream.
    async fn apply(&mut self, item: WalItem, link: &mut Link<C::Stream>) -> Result<(), RelayError> {
        match item {
            WalItem::Begin { commit_time, .. } => {
                self.open = Some(OpenTxn {
                    ticket: self.confirmer.begin(),
                    commit_time,
                    heartbeat_emitted_at: None,
                });
                metrics::counter!(m::TRANSACTIONS_TOTAL).increment(1);
            }
            WalItem::Commit { end_lsn } => {
                let txn = self
                    .open
                    .take()
                    .expect("the session pairs Begin and Commit");
                self.confirmer
                    .commit(txn.ticket, end_lsn, txn.heartbeat_emitted_at)?;
            }
            WalItem::Insert {
                relation,
                tuple,
                ctx,
                position,
            } => {
                let txn = self
                    .open
                    .as_ref()
                    .expect("the session checks inserts are in a transaction");
                let (ticket, commit_time) = (txn.ticket, txn.commit_time);
                let routed = self.router().route_insert(&relation, &tuple, ctx);
                self.publish(routed, ticket, commit_time, position)?;
            }
            WalItem::Message {
                message,
                ctx,
                in_transaction,
                position,
            } => {
                if message.prefix == self.config.heartbeat_prefix {
                    // Our own heartbeat: never published. Its transaction
                    // has no events, so it is confirmed as soon as
                    // everything before it is, which measures latency.
                    if let (Some(txn), true) = (self.open.as_mut(), in_transaction) {
                        txn.heartbeat_emitted_at = crate::heartbeat::emitted_at(&message.content);
                    }
                    return Ok(());
                }
                let routed = self.router().route_message(&message, ctx);
                if routed == Routed::Ignored {
                    return Ok(());
                }
                match self.open.as_ref() {
                    Some(txn) if in_transaction => {
                        let (ticket, commit_time) = (txn.ticket, txn.commit_time);
                        self.publish(routed, ticket, commit_time, position)?;
                    }
                    _ => {
                        // A non-transactional message stands alone in the
                        // stream: it gets a transaction of its own in the
                        // tracker, ending at its LSN, so it is confirmed in
                        // stream order.
                        let ticket = self.confirmer.begin();
                        self.publish(routed, ticket, ctx.commit_time, position)?;
                        self.confirmer.commit(ticket, message.lsn, None)?;
                    }
                }
            }
            WalItem::Keepalive {
                wal_end,
                reply_requested,
            } => {
                self.confirmer.server_idle_at(wal_end);
                if reply_requested {
                    self.send_feedback(link, false).await?;
                }
            }
            WalItem::Other => {}
        }
        Ok(())
    }

    fn router(&self) -> &Router {
        self.router
            .as_ref()
            .expect("the router is built when the first session starts")
    }

    /// Hands a routed change to the publisher, if it is one.
    fn publish(
        &mut self,
        routed: Routed,
        txn: TxnTicket,
        commit_time: PgTimestamp,
        position: Position,
    ) -> Result<(), RelayError> {
        let (mut record, dead_letter) = match routed {
            Routed::Ignored => return Ok(()),
            Routed::Event(record) => (record, false),
            Routed::DeadLetter { record, error } => {
                tracing::warn!(reason = %error, kind = error.kind(), "unroutable change sent to the dead-letter topic");
                metrics::counter!(m::DEAD_LETTERS_TOTAL, "kind" => "unroutable").increment(1);
                (record, true)
            }
        };
        self.confirmer.event_sent(txn)?;
        if self.window.is_empty() {
            // Events start to wait: the stall clock starts now.
            self.last_progress = Instant::now();
        }
        // Exactly once: the record says where it comes from, so a later
        // process can tell it is already in the log.
        let position = match &self.origin_header {
            Some(origin) => {
                record.headers.push((
                    POSITION_HEADER.to_owned(),
                    Bytes::from(position.to_string()),
                ));
                record
                    .headers
                    .push((ORIGIN_HEADER.to_owned(), origin.clone()));
                Some(position)
            }
            None => None,
        };
        let ticket = EventTicket {
            txn,
            commit_time,
            bytes: record.size(),
            dead_letter,
            position,
        };
        self.window.admit(ticket.bytes);
        self.publisher.publish(Outgoing::new(record, ticket));
        self.settle()
    }

    /// Applies what became of records to the window and the watermark.
    fn settle(&mut self) -> Result<(), RelayError> {
        for outcome in self.publisher.take_outcomes() {
            match outcome {
                Outcome::Acked { ticket, topic } => {
                    self.last_progress = Instant::now();
                    self.count_ack(&ticket, topic);
                    self.window.release(ticket.bytes);
                    self.confirmer.ack(ticket.txn)?;
                }
                Outcome::GaveUp { ticket } => {
                    self.last_progress = Instant::now();
                    self.window.release(ticket.bytes);
                    self.confirmer.ack(ticket.txn)?;
                }
                Outcome::Skipped { ticket } => {
                    self.last_progress = Instant::now();
                    self.live
                        .counters
                        .events_skipped
                        .fetch_add(1, Ordering::Relaxed);
                    self.window.release(ticket.bytes);
                    self.confirmer.ack(ticket.txn)?;
                }
                Outcome::Resized { from, to } => self.window.resize(from, to),
                Outcome::Failed { .. } => {
                    unreachable!("the WAL relay's publisher stops on topic errors")
                }
            }
        }
        self.live
            .record_in_flight(self.window.events(), self.window.bytes());
        Ok(())
    }

    fn count_ack(&self, ticket: &EventTicket, topic: String) {
        count_ack(&self.live, ticket, topic);
    }

    /// Sends a status update with the watermark, if streaming.
    pub(super) async fn send_feedback(
        &mut self,
        link: &mut Link<C::Stream>,
        reply: bool,
    ) -> Result<(), RelayError> {
        let Link::Streaming(session) = link else {
            return Ok(());
        };
        let lsn = self.confirmer.to_report();
        session.send_feedback(lsn, reply).await?;
        self.confirmer.reported(lsn);
        self.live.set_confirmed(lsn);
        Ok(())
    }
}

/// Counts an acknowledged record: the metrics, the live counters and the
/// commit-to-ack latency.
pub fn count_ack(live: &LiveState, ticket: &EventTicket, topic: String) {
    let now = PgTimestamp::now();
    if ticket.dead_letter {
        live.counters.dead_letters.fetch_add(1, Ordering::Relaxed);
    } else {
        let latency = (now.0 - ticket.commit_time.0).max(0) as f64 / 1e6;
        metrics::counter!(m::EVENTS_PUBLISHED_TOTAL, "topic" => topic).increment(1);
        live.counters
            .events_published
            .fetch_add(1, Ordering::Relaxed);
        metrics::histogram!(m::COMMIT_TO_ACK_SECONDS).record(latency);
        live.latency.record(latency);
        live.latency_histogram.record(latency);
    }
    metrics::gauge!(m::LAST_ACK_TIMESTAMP_SECONDS).set(now.unix_micros() as f64 / 1e6);
    live.record_ack();
}

/// Sleeps until `deadline`, or forever without one.
pub async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => pending().await,
    }
}
