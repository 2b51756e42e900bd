//! The idle-WAL heartbeat: a periodic *transactional*
//! `pg_logical_emit_message` under walrelay's own prefix.
//!
//! When the outbox is quiet but the database (or another database of the
//! cluster) is busy, the slot must still advance. A transactional message
//! gives the stream a commit to confirm, which moves both the slot's
//! confirmed and restart positions (a non-transactional one does not
//! reliably move the restart point). The relay never publishes it; it
//! measures emit-to-confirm latency with it. Failures are logged and
//! counted, and never stop the stream.

use std::time::Duration;

use crate::metrics as m;
use crate::replication::ConnectionConfig;
use crate::shutdown::Shutdown;
use crate::sql::SqlSession;
use crate::standby::WriteRoute;
use crate::timestamp::PgTimestamp;

/// The default heartbeat prefix.
pub const DEFAULT_PREFIX: &str = "walrelay.heartbeat";

/// The message body: when it was emitted, in Unix microseconds.
pub fn content(now: PgTimestamp) -> String {
    format!("{{\"emitted_at_us\":{}}}", now.unix_micros())
}

/// The emit time in a heartbeat's body.
pub fn emitted_at(content: &[u8]) -> Option<i64> {
    let value: serde_json::Value = serde_json::from_slice(content).ok()?;
    value.get("emitted_at_us")?.as_i64()
}

/// Emits a heartbeat every `interval` until `shutdown`: on the
/// server decoded from, or on `primary` while that server is a standby (a
/// message written on the primary reaches the standby's slot through its
/// WAL).
pub fn spawn(
    decoding: ConnectionConfig,
    primary: Option<ConnectionConfig>,
    prefix: String,
    interval: Duration,
    mut shutdown: Shutdown,
) {
    tokio::spawn(async move {
        let mut session = SqlSession::new(decoding);
        let mut route = WriteRoute::new(primary);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if shutdown.unless(tick.tick()).await.is_none() {
                return;
            }
            let written = match session.client().await {
                Ok(decoding) => route.client(decoding).await,
                Err(e) => Err(e),
            };
            let c = match written {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "heartbeat cannot connect");
                    metrics::counter!(m::HEARTBEAT_ERRORS_TOTAL).increment(1);
                    continue;
                }
            };
            let body = content(PgTimestamp::now());
            if let Err(e) = c
                .execute(
                    "SELECT pg_logical_emit_message(true, $1::text, $2::text)",
                    &[&prefix, &body],
                )
                .await
            {
                tracing::warn!(error = %e, "heartbeat failed");
                metrics::counter!(m::HEARTBEAT_ERRORS_TOTAL).increment(1);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_content_carries_its_emit_time() {
        let now = PgTimestamp::from_unix_micros(1_795_422_723_123_456);
        assert_eq!(
            emitted_at(content(now).as_bytes()),
            Some(1_795_422_723_123_456)
        );
        assert_eq!(emitted_at(b"garbage"), None);
    }
}
