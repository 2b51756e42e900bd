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
//! 7. the timers: reconnecting (only once nothing is in flight) and the
//!    shutdown deadline.
//!
//! No branch waits on anything but its own future, so shutdown, deliveries
//! and the walsender are answered whatever else is going on.

use std::future::pending;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::RelayConfig;
use super::ack_tracker::TxnTicket;
use super::confirmer::Confirmer;
use super::error::{Decision, Failure, RelayError, decide};
use super::publisher::{Outcome, Outgoing, Publisher, PublisherEvent, backoff};
use super::session::{Connector, Session, SessionStart, WalItem};
use super::window::InFlightWindow;
use crate::live::{LiveState, Role};
use crate::lsn::Lsn;
use crate::metrics as m;
use crate::monitor::Finding;
use crate::pgoutput::PgTimestamp;
use crate::router::{Routed, Router};
use crate::sink::{EventTicket, LocalBoxFuture, Sink};

/// A session that streamed this long counts as healthy for the retry count.
const HEALTHY_SESSION: Duration = Duration::from_secs(60);

/// How long ending a session cleanly may take before the connection is
/// simply dropped.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);

/// The transaction being applied.
struct OpenTxn {
    ticket: TxnTicket,
    commit_time: PgTimestamp,
    /// When a heartbeat in this transaction was emitted (Unix microseconds).
    heartbeat_emitted_at: Option<i64>,
}

/// The replication link's state.
enum Link<W> {
    /// Not connected; connect again at this time once nothing is in flight.
    Idle {
        reconnect_at: Instant,
    },
    Connecting(LocalBoxFuture<Result<(W, SessionStart), RelayError>>),
    Streaming(Session<W>),
}

enum LinkEvent<W> {
    Connected(Result<(W, SessionStart), RelayError>),
    Item(Result<WalItem, RelayError>),
}

impl<W: super::session::WalStream> Link<W> {
    /// The link's next event; never ready while idle, or while streaming
    /// when `reading` is false. Cancel-safe.
    async fn next(&mut self, reading: bool) -> LinkEvent<W> {
        match self {
            Link::Connecting(attempt) => LinkEvent::Connected(attempt.as_mut().await),
            Link::Streaming(session) if reading => LinkEvent::Item(session.next().await),
            _ => pending().await,
        }
    }

    fn is_streaming(&self) -> bool {
        matches!(self, Link::Streaming(_))
    }
}

pub struct Relay<C: Connector, S: Sink> {
    config: RelayConfig,
    connector: C,
    /// Built when the first session tells the system identifier.
    router: Option<Router>,
    window: InFlightWindow,
    confirmer: Confirmer,
    publisher: Publisher<S>,
    live: Arc<LiveState>,
    findings: mpsc::Receiver<Finding>,
    open: Option<OpenTxn>,
    /// Failed sessions in a row, towards giving up on a permanent error.
    attempt: u32,
    session_began: Instant,
    confirmed_at_session_start: Lsn,
}

impl<C: Connector, S: Sink> Relay<C, S> {
    pub fn new(
        config: RelayConfig,
        connector: C,
        sink: S,
        live: Arc<LiveState>,
        findings: mpsc::Receiver<Finding>,
    ) -> Self {
        let mut publisher = Publisher::new(sink, config.router.dead_letter_topic.clone());
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

    fn on_connected(&mut self, start: SessionStart) {
        if self.router.is_none() {
            self.router = Some(Router::new(
                self.config.router.clone(),
                start.system_id.clone(),
            ));
        }
        self.confirmer.restart();
        self.open = None;
        self.session_began = Instant::now();
        self.confirmed_at_session_start = self.confirmer.confirmed();
        tracing::info!(slot = %self.config.slot, host = %start.host, start = %self.confirmer.confirmed(), "streaming");
        self.live.set_host(Some(start.host));
        self.set_connected(true);
    }

    /// A session (or the relay) failed: decide whether to reconnect, stand
    /// by, or stop.
    fn on_error(
        &mut self,
        error: RelayError,
        link: &mut Link<C::Stream>,
    ) -> Result<(), RelayError> {
        self.set_connected(false);
        self.open = None;
        self.live.set_last_error(&error.to_string());
        let decision = decide(Failure::Session(&error));
        let wait = match decision {
            Decision::StandBy => {
                // High availability: another relay streams from the slot.
                // Stand by and ask again soon, so a takeover takes seconds.
                if self.live.role() != Role::Standby {
                    tracing::info!(slot = %self.config.slot, "the slot is held by another process; standing by");
                    self.live.set_role(Role::Standby);
                }
                self.attempt = 0;
                self.config.standby_retry
            }
            Decision::Stop => return Err(error),
            _ => {
                self.live.set_role(Role::Starting);
                // A session that made progress (or lasted) starts the count
                // of failed attempts afresh; one that failed on the same
                // change again counts towards giving up.
                if self.confirmer.confirmed() > self.confirmed_at_session_start
                    || self.session_began.elapsed() > HEALTHY_SESSION
                {
                    self.attempt = 0;
                }
                self.attempt += 1;
                if decision == Decision::StopAfterRetries
                    && self.attempt >= self.config.permanent_error_attempts
                {
                    return Err(error);
                }
                let wait = backoff(self.attempt, self.config.max_backoff);
                tracing::warn!(error = %error, attempt = self.attempt, retry_in = ?wait, "replication interrupted");
                metrics::counter!(m::RECONNECTS_TOTAL).increment(1);
                self.live
                    .counters
                    .reconnects
                    .fetch_add(1, Ordering::Relaxed);
                wait
            }
        };
        self.session_began = Instant::now();
        self.confirmed_at_session_start = self.confirmer.confirmed();
        // Dropping the session closes its connection; events still in
        // flight are waited for before the next one starts.
        *link = Link::Idle {
            reconnect_at: Instant::now() + wait,
        };
        Ok(())
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
            } => {
                let txn = self
                    .open
                    .as_ref()
                    .expect("the session checks inserts are in a transaction");
                let (ticket, commit_time) = (txn.ticket, txn.commit_time);
                let routed = self.router().route_insert(&relation, &tuple, ctx);
                self.publish(routed, ticket, commit_time)?;
            }
            WalItem::Message {
                message,
                ctx,
                in_transaction,
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
                        self.publish(routed, ticket, commit_time)?;
                    }
                    _ => {
                        // A non-transactional message stands alone in the
                        // stream: it gets a transaction of its own in the
                        // tracker, ending at its LSN, so it is confirmed in
                        // stream order.
                        let ticket = self.confirmer.begin();
                        self.publish(routed, ticket, ctx.commit_time)?;
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
    ) -> Result<(), RelayError> {
        let (record, dead_letter) = match routed {
            Routed::Ignored => return Ok(()),
            Routed::Event(record) => (record, false),
            Routed::DeadLetter { record, error } => {
                tracing::warn!(reason = %error, kind = error.kind(), "unroutable change sent to the dead-letter topic");
                metrics::counter!(m::DEAD_LETTERS_TOTAL, "kind" => "unroutable").increment(1);
                (record, true)
            }
        };
        self.confirmer.event_sent(txn)?;
        let ticket = EventTicket {
            txn,
            commit_time,
            bytes: record.size(),
            dead_letter,
        };
        self.window.admit(ticket.bytes);
        self.publisher.publish(Outgoing { record, ticket });
        self.settle()
    }

    /// Applies what became of records to the window and the watermark.
    fn settle(&mut self) -> Result<(), RelayError> {
        for outcome in self.publisher.take_outcomes() {
            match outcome {
                Outcome::Acked { ticket, topic } => {
                    self.count_ack(&ticket, topic);
                    self.window.release(ticket.bytes);
                    self.confirmer.ack(ticket.txn)?;
                }
                Outcome::GaveUp { ticket } => {
                    self.window.release(ticket.bytes);
                    self.confirmer.ack(ticket.txn)?;
                }
                Outcome::Resized { from, to } => self.window.resize(from, to),
            }
        }
        self.live
            .counters
            .in_flight
            .store(self.window.events() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn count_ack(&self, ticket: &EventTicket, topic: String) {
        let now = PgTimestamp::now();
        if ticket.dead_letter {
            self.live
                .counters
                .dead_letters
                .fetch_add(1, Ordering::Relaxed);
        } else {
            let latency = (now.0 - ticket.commit_time.0).max(0) as f64 / 1e6;
            metrics::counter!(m::EVENTS_PUBLISHED_TOTAL, "topic" => topic).increment(1);
            self.live
                .counters
                .events_published
                .fetch_add(1, Ordering::Relaxed);
            metrics::histogram!(m::COMMIT_TO_ACK_SECONDS).record(latency);
            self.live.latency.record(latency);
            self.live.latency_histogram.record(latency);
        }
        metrics::gauge!(m::LAST_ACK_TIMESTAMP_SECONDS).set(now.unix_micros() as f64 / 1e6);
        self.live.record_ack();
    }

    /// Sends a status update with the watermark, if streaming.
    async fn send_feedback(
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

    /// Confirms what was acknowledged and ends the session cleanly.
    async fn stop(mut self, mut link: Link<C::Stream>) -> Result<(), RelayError> {
        if !self.window.is_empty() {
            tracing::warn!(
                in_flight = self.window.events(),
                "shutdown timeout: unacknowledged events will be sent again on restart"
            );
        }
        self.send_feedback(&mut link, false).await?;
        if let Link::Streaming(session) = link {
            match tokio::time::timeout(FINISH_TIMEOUT, session.finish()).await {
                Ok(result) => result?,
                Err(_) => tracing::warn!("the server did not end the stream in time; closing"),
            }
        }
        self.set_connected(false);
        tracing::info!(confirmed = %self.confirmer.confirmed(), "stopped");
        Ok(())
    }

    fn set_connected(&self, connected: bool) {
        metrics::gauge!(m::REPLICATION_CONNECTED).set(if connected { 1.0 } else { 0.0 });
        self.live.set_connected(connected);
        if !connected {
            self.live.set_host(None);
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => pending().await,
    }
}
