//! The replication link's state: idle (waiting to connect), connecting, or
//! streaming a session.

use std::future::pending;

use tokio::time::Instant;

use super::error::RelayError;
use super::session::{Session, SessionStart, WalItem, WalStream};
use crate::publish::LocalBoxFuture;

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
