//! The replication link's state: idle (waiting to connect), connecting, or
//! streaming a session.

use std::future::pending;
use std::time::Duration;

use tokio::time::Instant;

use super::error::RelayError;
use super::session::{Session, SessionStart, WalItem, WalStream};
use crate::live::LiveState;
use crate::metrics as m;
use crate::publish::LocalBoxFuture;

/// How long ending a session cleanly may take before the connection is
/// simply dropped.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);

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

    /// Ends the session cleanly (the walsender exits) and waits to connect
    /// again at `reconnect_at`.
    pub(super) async fn let_go(&mut self, reconnect_at: Instant) {
        if let Link::Streaming(session) = std::mem::replace(self, Link::Idle { reconnect_at }) {
            match tokio::time::timeout(FINISH_TIMEOUT, session.finish()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(error = %error, "ending the session"),
                Err(_) => tracing::debug!("the server did not end the stream in time; closed"),
            }
        }
    }

    /// Ends the session cleanly, for good.
    pub(super) async fn finish(self) -> Result<(), RelayError> {
        if let Link::Streaming(session) = self {
            match tokio::time::timeout(FINISH_TIMEOUT, session.finish()).await {
                Ok(result) => result?,
                Err(_) => tracing::warn!("the server did not end the stream in time; closing"),
            }
        }
        Ok(())
    }
}

/// Says whether the relay streams, in the metrics and the live state.
pub(super) fn report_connected(live: &LiveState, connected: bool) {
    metrics::gauge!(m::REPLICATION_CONNECTED).set(if connected { 1.0 } else { 0.0 });
    live.set_connected(connected);
    if !connected {
        live.set_host(None);
    }
}

/// Says whether the relay let go of the slot to wait for the broker.
pub(super) fn report_waiting_for_broker(live: &LiveState, waiting: bool) {
    metrics::gauge!(m::WAITING_FOR_BROKER).set(if waiting { 1.0 } else { 0.0 });
    live.set_waiting_for_broker(waiting);
}

/// Why the relay let go of the slot on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Release {
    /// Events wait and the broker acknowledged nothing for the stall timeout.
    BrokerStalled,
    /// PostgreSQL is shutting down.
    ServerStopping,
}

impl Release {
    /// The `reason` label of `walrelay_slot_releases_total`.
    pub(super) fn label(self) -> &'static str {
        match self {
            Release::BrokerStalled => "broker",
            Release::ServerStopping => "server_stopping",
        }
    }
}
