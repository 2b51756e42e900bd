//! The replication link's life: connecting, failing (retry, stand by or
//! stop), letting go of the slot on purpose so PostgreSQL is not held, and
//! stopping.

use std::future::pending;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::DeliveryGuarantee;
use super::apply::Relay;
use super::error::{Decision, Failure, RelayError, decide};
use super::partitions::Replay;
use super::publisher::backoff;
use super::session::{Connector, Session, SessionStart, WalItem, WalStream};
use crate::ledger::Origin;
use crate::live::Role;
use crate::metrics as m;
use crate::router::Router;
use crate::sink::{LocalBoxFuture, Sink};

/// A session that streamed this long counts as healthy for the retry count.
const HEALTHY_SESSION: Duration = Duration::from_secs(60);

/// How long ending a session cleanly may take before the connection is
/// simply dropped.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);

/// The replication link's state.
pub(super) enum Link<W> {
    /// Not connected; connect again at this time once nothing is in flight.
    Idle {
        reconnect_at: Instant,
    },
    Connecting(LocalBoxFuture<Result<(W, SessionStart), RelayError>>),
    Streaming(Session<W>),
}

pub(super) enum LinkEvent<W> {
    Connected(Result<(W, SessionStart), RelayError>),
    Item(Result<WalItem, RelayError>),
}

impl<W: WalStream> Link<W> {
    /// The link's next event; never ready while idle, or while streaming
    /// when `reading` is false. Cancel-safe.
    pub(super) async fn next(&mut self, reading: bool) -> LinkEvent<W> {
        match self {
            Link::Connecting(attempt) => LinkEvent::Connected(attempt.as_mut().await),
            Link::Streaming(session) if reading => LinkEvent::Item(session.next().await),
            _ => pending().await,
        }
    }

    pub(super) fn is_streaming(&self) -> bool {
        matches!(self, Link::Streaming(_))
    }
}

/// Why the relay let go of the slot on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Release {
    /// Events wait and the broker acknowledged nothing for the stall timeout.
    BrokerStalled,
    /// PostgreSQL is shutting down.
    ServerStopping,
}

impl<C: Connector, S: Sink> Relay<C, S> {
    pub(super) fn on_connected(&mut self, start: SessionStart) {
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
        let replay_start = start.slot_confirmed.max(self.confirmer.confirmed());
        if self.config.delivery == DeliveryGuarantee::ExactlyOnce {
            let origin = Origin {
                system_id: start.system_id.clone(),
                slot: self.config.slot.clone(),
                timeline: start.history.current,
            };
            self.publisher.begin_replay(Replay {
                origin: origin.clone(),
                history: start.history.clone(),
                start: replay_start,
            });
            self.origin_header = Some(Bytes::from(origin.to_string()));
        }
        tracing::info!(slot = %self.config.slot, host = %start.host, start = %replay_start, timeline = start.history.current, "streaming");
        self.live.set_host(Some(start.host));
        self.set_waiting_for_broker(false);
        self.set_connected(true);
    }

    /// Ends the session on purpose, cleanly, so the walsender exits and
    /// PostgreSQL is not held: the watermark is confirmed first, events in
    /// flight are still waited for, and streaming starts again after them.
    pub(super) async fn release(
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
                    in_flight = self.window.events(),
                    stall_timeout = ?self.config.broker_stall_timeout,
                    "the broker acknowledged nothing: letting go of the slot so PostgreSQL is not held; streaming again once the broker answers"
                );
                self.set_waiting_for_broker(true);
                Instant::now()
            }
            Release::ServerStopping => {
                tracing::info!("PostgreSQL is shutting down: letting go of the slot");
                Instant::now() + backoff(1, self.config.max_backoff)
            }
        };
        metrics::counter!(m::SLOT_RELEASES_TOTAL, "reason" => match why {
            Release::BrokerStalled => "broker",
            Release::ServerStopping => "server_stopping",
        })
        .increment(1);
        if let Link::Streaming(session) = std::mem::replace(link, Link::Idle { reconnect_at }) {
            match tokio::time::timeout(FINISH_TIMEOUT, session.finish()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(error = %error, "ending the session"),
                Err(_) => tracing::debug!("the server did not end the stream in time; closed"),
            }
        }
        self.open = None;
        self.set_connected(false);
        self.live.set_role(Role::Starting);
        Ok(())
    }

    fn set_waiting_for_broker(&self, waiting: bool) {
        metrics::gauge!(m::WAITING_FOR_BROKER).set(if waiting { 1.0 } else { 0.0 });
        self.live.set_waiting_for_broker(waiting);
    }

    /// A session (or the relay) failed: decide whether to reconnect, stand
    /// by, or stop.
    pub(super) fn on_error(
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

    /// Confirms what was acknowledged and ends the session cleanly.
    pub(super) async fn stop(mut self, mut link: Link<C::Stream>) -> Result<(), RelayError> {
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
