//! The WAL relay: one biased `select!` over everything that can happen,
//! in this order of priority, and the handlers of each:
//!
//! 1. shutdown: stop reading WAL, drain what is in flight, confirm, end;
//! 2. a finding of the slot monitor (a dropped outbox table ends the relay);
//! 3. the publisher: what became of records (they free the window and move
//!    the watermark);
//! 4. the timers: a status update due to PostgreSQL (periodic, or
//!    coalesced after the watermark moved), the server's silence, the
//!    broker stall (events wait and nothing was acknowledged for
//!    `--broker-stall-timeout`), reconnecting (only once nothing is in
//!    flight) and the shutdown deadline;
//! 5. the replication link: a connection attempt finishing, or new WAL
//!    while the window has room. It comes last because under continuous
//!    WAL it is always ready: anything below it would wait for the
//!    window to fill.
//!
//! No branch waits on anything but its own future, so shutdown, deliveries
//! and the walsender are answered whatever else is going on.
//!
//! Handing events to the publisher and settling what became of them is
//! `outbound.rs`'s; the loop decides when to read, and what each item
//! means is `wal_relay/apply.rs`'s.
//!
//! `relay/mod.rs` says why the relay lets go of the slot when the broker
//! stalls, and where each session starts.

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::RelayConfig;
use super::ack_tracker::TxnTicket;
use super::confirmer::Confirmer;
use super::error::{RelayError, StreamError, decide};
use super::link::{Link, LinkEvent, Release, report_connected, report_waiting_for_broker};
use super::monitor::Finding;
use super::outbound::{Outbound, Settling};
use super::reconnect::{Next, ReconnectPolicy};
use super::session::{Connector, Session, SessionStart};
use crate::dead_letters::DeadLetterStore;
use crate::live::{LiveState, Role};
use crate::metrics as m;
use crate::publish::Sink;
use crate::router::Router;
use crate::shutdown::Shutdown;
use crate::timestamp::PgTimestamp;

mod apply;

/// How long a clean stop waits for the monitor to check the publication
/// past the last acknowledged event (it checks every second).
const STOP_CAP_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// When each timed thing is due, if it is.
#[derive(Clone, Copy)]
struct Deadlines {
    /// A status update to PostgreSQL.
    feedback: Option<Instant>,
    /// The server has been silent too long.
    silent: Option<Instant>,
    /// The broker has acknowledged nothing too long.
    stall: Option<Instant>,
    /// Connect again.
    reconnect: Option<Instant>,
    /// Stop whatever is still in flight.
    stop: Option<Instant>,
}

impl Deadlines {
    fn earliest(&self) -> Option<Instant> {
        [
            self.feedback,
            self.silent,
            self.stall,
            self.reconnect,
            self.stop,
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// The transaction being applied.
struct ApplyingTxn {
    ticket: TxnTicket,
    commit_time: PgTimestamp,
    /// When a heartbeat in this transaction was emitted (Unix microseconds).
    heartbeat_emitted_at: Option<i64>,
}

pub struct WalRelay<C: Connector, S: Sink> {
    config: RelayConfig,
    connector: C,
    /// Built when the first session tells the system identifier.
    router: Option<Router>,
    confirmer: Confirmer,
    /// Events handed to the publisher, and what became of them.
    out: Outbound<S>,
    live: Arc<LiveState>,
    findings: mpsc::Receiver<Finding>,
    open: Option<ApplyingTxn>,
    reconnect: ReconnectPolicy,
    /// Since when the relay has been reading the stream without pause:
    /// silence counts only while it reads.
    reading_since: Option<Instant>,
    transactions: metrics::Counter,
}

impl<C: Connector, S: Sink> WalRelay<C, S> {
    pub fn new(
        config: RelayConfig,
        connector: C,
        sink: S,
        live: Arc<LiveState>,
        findings: mpsc::Receiver<Finding>,
    ) -> Self {
        WalRelay {
            out: Outbound::new(&config, sink, Arc::clone(&live)),
            confirmer: Confirmer::new(config.status_interval),
            reconnect: ReconnectPolicy::new(
                config.max_backoff,
                config.permanent_error_attempts,
                config.standby_retry,
            ),
            router: None,
            connector,
            live,
            findings,
            open: None,
            reading_since: None,
            transactions: metrics::counter!(m::TRANSACTIONS_TOTAL),
            config,
        }
    }

    /// Confirms nothing past the slot monitor's verified LSN (see
    /// `monitor.rs`).
    pub fn with_confirm_cap(mut self, cap: tokio::sync::watch::Receiver<crate::lsn::Lsn>) -> Self {
        self.confirmer.set_cap(cap);
        self
    }

    /// Keeps refused events in `store` instead of the dead-letter table.
    pub fn with_dead_letter_store(mut self, store: Rc<dyn DeadLetterStore>) -> Self {
        self.out.set_dead_letter_store(store);
        self
    }

    /// Runs until shutdown (then drains and returns `Ok`) or a permanent
    /// error.
    pub async fn run(mut self, mut shutdown: Shutdown) -> Result<(), RelayError> {
        let mut link: Link<C::Stream> = Link::Idle {
            reconnect_at: Instant::now(),
        };
        let mut stop_deadline: Option<Instant> = None;
        // One timer for every deadline, reset only when the earliest moves:
        // a timer made anew per turn of the loop costs more than the event.
        let mut timer = std::pin::pin!(tokio::time::sleep_until(Instant::now()));
        loop {
            if let Some(deadline) = stop_deadline {
                if self.out.is_empty() || Instant::now() >= deadline {
                    return self.stop(link).await;
                }
            }
            let streaming = link.is_streaming();
            let reading = streaming && stop_deadline.is_none() && self.out.takes_more();
            let feedback_at = streaming.then(|| self.confirmer.due_at());
            // A server that sends nothing, though every status update asks
            // it to answer once it has been quiet, is gone.
            if !reading {
                self.reading_since = None;
            } else if self.reading_since.is_none() {
                self.reading_since = Some(Instant::now());
            }
            let silent_at = match (&link, self.reading_since) {
                (Link::Streaming(session), Some(since)) => {
                    Some(session.last_received().max(since) + self.config.replication_timeout)
                }
                _ => None,
            };
            let stall_at = (streaming && stop_deadline.is_none() && !self.out.is_empty())
                .then(|| self.out.last_progress() + self.config.broker_stall_timeout);
            // A new session waits for the events in flight, unless they all
            // wait for partitions with no leader: those are read again.
            let reconnect_at = match &link {
                Link::Idle { reconnect_at }
                    if stop_deadline.is_none()
                        && (self.out.is_empty() || self.out.waits_only_for_offline()) =>
                {
                    Some(*reconnect_at)
                }
                _ => None,
            };
            let deadlines = Deadlines {
                feedback: feedback_at,
                silent: silent_at,
                stall: stall_at,
                reconnect: reconnect_at,
                stop: stop_deadline,
            };
            let wake_at = deadlines.earliest();
            if let Some(at) = wake_at {
                if timer.deadline() != at {
                    timer.as_mut().reset(at);
                }
            }
            let outcome: Result<(), RelayError> = tokio::select! {
                biased;
                () = shutdown.wait(), if stop_deadline.is_none() => {
                    tracing::info!(in_flight = self.out.events(), "stopping: draining in-flight events");
                    stop_deadline = Some(Instant::now() + self.config.shutdown_timeout);
                    Ok(())
                }
                Some(finding) = self.findings.recv() => match finding {
                    Finding::Outbox(problem) => Err(problem.into()),
                    Finding::Slot(problem) => Err(problem.into()),
                    Finding::ServerStopping => self.release(&mut link, Release::ServerStopping).await,
                },
                settling = self.out.next() => match settling {
                    Settling::Outcomes(Ok(outcomes)) => self.out.settle(outcomes, &mut self.confirmer),
                    Settling::Outcomes(Err(error)) => Err(error.into()),
                    Settling::Stored(tag, notice) => self.out.stored(tag, notice, &mut self.confirmer),
                },
                // Before the link: under continuous WAL the link is always
                // ready, and the status update must still go out on time.
                () = timer.as_mut(), if wake_at.is_some() => {
                    self.on_deadline(deadlines, &mut link).await
                }
                event = link.next(reading) => match event {
                    LinkEvent::Connected(Ok((stream, start))) => {
                        self.on_connected(start);
                        link = Link::Streaming(Session::new(stream));
                        Ok(())
                    }
                    LinkEvent::Connected(Err(error)) => Err(error),
                    LinkEvent::Item(Ok(item)) => self.apply_ready(item, &mut link).await,
                    LinkEvent::Item(Err(error)) => Err(error),
                },
            };
            if let Err(error) = outcome {
                self.on_error(error, &mut link)?;
            }
        }
    }

    /// A deadline passed: the most urgent one is handled (the others, if
    /// also due, on the next turn).
    async fn on_deadline(
        &mut self,
        deadlines: Deadlines,
        link: &mut Link<C::Stream>,
    ) -> Result<(), RelayError> {
        let now = Instant::now();
        let due = |at: Option<Instant>| at.is_some_and(|at| at <= now);
        if due(deadlines.feedback) {
            self.send_feedback(link, false).await
        } else if due(deadlines.silent) {
            Err(StreamError::Silent(self.config.replication_timeout).into())
        } else if due(deadlines.stall) {
            if self.out.waits_only_for_offline() {
                // The broker answers: only partitions with no leader wait,
                // and the events of every other one go on.
                self.out.not_stalled();
                return Ok(());
            }
            self.release(link, Release::BrokerStalled).await
        } else if due(deadlines.reconnect) {
            if !self.out.is_empty() {
                let dropped = self.out.discard();
                tracing::info!(
                    dropped,
                    "every event in flight waits for a partition with no leader: streaming again, and those events are read again from the slot"
                );
                self.confirmer.abandon_in_flight();
            }
            *link = Link::Connecting(self.connector.connect());
            Ok(())
        } else {
            Ok(()) // the stop deadline: the loop's head ends the relay
        }
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
        // Quiet for a while: ask the server to answer, which proves it is
        // still there.
        let reply = reply || session.last_received().elapsed() >= self.config.status_interval;
        session.send_feedback(lsn, reply).await?;
        self.confirmer.reported(lsn);
        self.live.set_confirmed(lsn);
        Ok(())
    }

    fn on_connected(&mut self, start: SessionStart) {
        if self.router.is_none() {
            self.router = Some(Router::new(
                self.config.router.clone(),
                start.system_id.clone(),
            ));
        }
        if let Some(router) = &mut self.router {
            router.set_history(start.history.clone());
        }
        // The server streams from the slot's position: the watermark starts
        // there (see "Where a session starts").
        self.confirmer.restart(start.slot_confirmed);
        self.open = None;
        self.reconnect.session_started(self.confirmer.confirmed());
        self.out.begin_session(&self.config, &start);
        tracing::info!(slot = %self.config.slot, host = %start.host, start = %start.slot_confirmed, timeline = start.history.current, "streaming");
        self.live.set_host(Some(start.host));
        report_waiting_for_broker(&self.live, false);
        report_connected(&self.live, true);
    }

    /// Ends the session on purpose, cleanly, so the walsender exits and
    /// PostgreSQL is not held: the watermark is confirmed first, events in
    /// flight are still waited for, and streaming starts again after them.
    async fn release(
        &mut self,
        link: &mut Link<C::Stream>,
        why: Release,
    ) -> Result<(), RelayError> {
        if !link.is_streaming() {
            return Ok(());
        }
        self.send_feedback(link, false).await?;
        let reconnect_at = match why {
            Release::BrokerStalled => {
                tracing::warn!(
                    in_flight = self.out.events(),
                    stall_timeout = ?self.config.broker_stall_timeout,
                    "the broker acknowledged nothing: letting go of the slot so PostgreSQL is not held; streaming again once the broker answers"
                );
                report_waiting_for_broker(&self.live, true);
                Instant::now()
            }
            Release::ServerStopping => {
                tracing::info!("PostgreSQL is shutting down: letting go of the slot");
                Instant::now() + crate::publish::backoff(1, self.config.max_backoff)
            }
        };
        metrics::counter!(m::SLOT_RELEASES_TOTAL, "reason" => why.label()).increment(1);
        link.let_go(reconnect_at).await;
        self.open = None;
        report_connected(&self.live, false);
        self.live.set_role(Role::Starting);
        Ok(())
    }

    /// A session (or the relay) failed: decide whether to reconnect, stand
    /// by, or stop.
    fn on_error(
        &mut self,
        error: RelayError,
        link: &mut Link<C::Stream>,
    ) -> Result<(), RelayError> {
        report_connected(&self.live, false);
        self.open = None;
        self.live.set_last_error(&error.to_string());
        if let RelayError::Publish(_) = error {
            // The producer is made anew: what was in flight is read again
            // from the slot (exactly once, what already landed is skipped).
            let dropped = self.out.discard();
            tracing::warn!(error = %error, dropped, "the producer failed; reading the events in flight again from the slot");
            self.confirmer.abandon_in_flight();
        }
        let wait = match self
            .reconnect
            .after(decide(&error), self.confirmer.confirmed())
        {
            Next::Stop => return Err(error),
            Next::StandBy(wait) => {
                // High availability: another relay streams from the slot.
                // Stand by and ask again soon, so a takeover takes seconds.
                if self.live.role() != Role::Standby {
                    tracing::info!(slot = %self.config.slot, "the slot is held by another process; standing by");
                    self.live.set_role(Role::Standby);
                }
                // A relay that let go for a stalled broker and found the slot
                // taken over waits for the slot now, not the broker: left at
                // 1, the gauge would page WalrelayBrokerDown for good.
                if self.live.waiting_for_broker() {
                    report_waiting_for_broker(&self.live, false);
                }
                wait
            }
            Next::Reconnect(wait) => {
                self.live.set_role(Role::Starting);
                tracing::warn!(error = %error, attempt = self.reconnect.attempt(), retry_in = ?wait, "replication interrupted");
                metrics::counter!(m::RECONNECTS_TOTAL).increment(1);
                self.live
                    .counters
                    .reconnects
                    .fetch_add(1, Ordering::Relaxed);
                wait
            }
        };
        // Dropping the session closes its connection; events still in
        // flight are waited for before the next one starts.
        *link = Link::Idle {
            reconnect_at: Instant::now() + wait,
        };
        Ok(())
    }

    /// Confirms what was acknowledged and ends the session cleanly.
    async fn stop(mut self, mut link: Link<C::Stream>) -> Result<(), RelayError> {
        if !self.out.is_empty() {
            tracing::warn!(
                in_flight = self.out.events(),
                "shutdown timeout: unacknowledged events will be sent again on restart"
            );
        }
        // Everything acknowledged is confirmed once the monitor has checked
        // the publication past it (within a second).
        if link.is_streaming() && !self.confirmer.wait_for_cap(STOP_CAP_WAIT).await {
            tracing::info!(
                "the publication was not checked past the last acknowledged events; they will be sent again on restart"
            );
        }
        self.send_feedback(&mut link, false).await?;
        link.finish().await?;
        report_connected(&self.live, false);
        tracing::info!(confirmed = %self.confirmer.confirmed(), "stopped");
        Ok(())
    }
}
