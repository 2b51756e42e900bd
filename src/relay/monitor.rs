//! The slot monitor: every second, on its own SQL connection, reads the
//! slot's lag and retained WAL and exports them, checks that the slot can
//! still stream every event, and checks that the publication still
//! publishes every insert of the outbox tables. A failed reading is logged
//! and counted and never stops the stream; a slot or publication that
//! loses events is a [`Finding`] the relay stops on. What the publication
//! check asks of the catalog is `outbox_watch.rs`'s.
//!
//! # Confirming only what was checked
//!
//! pgoutput decides with the publication as it was when each change was
//! written (it reads the catalog through a historic snapshot), so a change
//! to the publication takes effect in the stream at its commit LSN. Each
//! check reads the server's WAL position first, then the publication: if
//! the publication is still right, every commit below that position was
//! decoded with a right publication, and the position is published as the
//! *verified LSN*. The relay never confirms past it (`relay/confirmer.rs`).
//! Once a check fails the verified LSN never moves again, so the slot keeps
//! every change from before the alteration and the relay stops.
//!
//! What stays racy, and is documented in docs/runbooks/publication-changed.md:
//! an ALTER whose commit record is written but not yet visible when the
//! check reads the catalog (microseconds) is first seen by the next check,
//! which is still before the cap moves past it except in that window; and
//! a change undone between two checks (within a second) is never seen, so
//! the inserts committed meanwhile are decoded away unnoticed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::outbox_watch::{OutboxProblem, OutboxWatch};
use crate::catalog::{self, SlotSnapshot};
use crate::live::LiveState;
use crate::lsn::Lsn;
use crate::metrics as m;
use crate::replication::ConnectionConfig;
use crate::shutdown::Shutdown;
use crate::slot_health::{self, LastConfirmed, SlotProblem};
use crate::sql::{SqlError, SqlSession};

/// How often the slot is read: the dashboard's history has a sample a
/// second.
pub const INTERVAL: Duration = Duration::from_secs(1);

const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

/// What the monitor tells the relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// The outbox can no longer be streamed: the relay stops with the fix.
    Outbox(OutboxProblem),
    /// The slot is missing or invalidated: the relay stops with the
    /// recover command.
    Slot(SlotProblem),
    /// PostgreSQL is shutting down (it ended the monitor's session and
    /// refuses new ones): the relay ends its replication session at once,
    /// so the walsender does not hold the shutdown while events drain.
    ServerStopping,
}

/// What the monitor watches.
#[derive(Clone, Debug)]
pub struct MonitorConfig {
    pub pg: ConnectionConfig,
    pub slot: String,
    pub outbox: OutboxWatch,
    /// The schema of walrelay's record of its slots, if it has one there.
    pub record_schema: Option<String>,
    /// The slot's last confirmed position as the record had it at start.
    pub last_confirmed: LastConfirmed,
    /// `--primary-url`: where the record is written while `pg` is a standby.
    pub primary: Option<ConnectionConfig>,
}

/// Starts the monitor task, which runs until `shutdown`. Its findings
/// arrive on the returned channel; the verified LSN (see the module's doc)
/// on the watch.
pub fn spawn(
    config: MonitorConfig,
    live: Arc<LiveState>,
    mut shutdown: Shutdown,
) -> (mpsc::Receiver<Finding>, watch::Receiver<Lsn>) {
    let (tx, rx) = mpsc::channel(4);
    let (verified_tx, verified_rx) = watch::channel(Lsn::ZERO);
    let MonitorConfig {
        pg,
        slot,
        mut outbox,
        record_schema,
        mut last_confirmed,
        primary,
    } = config;
    tokio::spawn(async move {
        let mut recorder = record_schema
            .map(|schema| crate::slot_record::Recorder::new(schema, slot.clone(), primary));
        let mut session = SqlSession::new(pg);
        let mut tick = tokio::time::interval(INTERVAL);
        let mut last_failure = None;
        // Once anything loses events, the verified LSN stays where it is.
        let mut stopped = false;
        loop {
            tokio::select! {
                () = shutdown.wait() => return,
                _ = tick.tick() => {}
                reason = session.closed() => {
                    // The server ended the session: a fast shutdown does
                    // that first, then refuses new connections.
                    tracing::debug!(reason = %reason.message, "slot monitor session ended");
                    if let Err(e) = session.client().await {
                        if is_shutting_down(&e) {
                            tracing::info!("PostgreSQL is shutting down");
                            let _ = tx.try_send(Finding::ServerStopping);
                        }
                    }
                    continue;
                }
            }
            let client = match session.client().await {
                Ok(c) => c,
                Err(e) => {
                    if is_shutting_down(&e) {
                        let _ = tx.try_send(Finding::ServerStopping);
                    }
                    failed(
                        &live,
                        &mut last_failure,
                        format!("slot monitor cannot connect: {e}"),
                    );
                    continue;
                }
            };
            // A query that waits (a lock on walrelay's record, say) must not
            // hold the verified LSN, and with it every confirmation, for
            // good: it fails, is counted, and the next pass tries again.
            if let Err(e) = client
                .batch_execute("SET statement_timeout = '10s'; SET lock_timeout = '2s'")
                .await
            {
                failed(
                    &live,
                    &mut last_failure,
                    format!("slot monitor query failed: {e}"),
                );
                continue;
            }
            // The WAL position before the catalog is read: see the module's doc.
            let (position, now) = match catalog::wal_position(client).await {
                Ok((lsn, now)) => (lsn.parse::<Lsn>().ok(), now),
                Err(e) => {
                    failed(
                        &live,
                        &mut last_failure,
                        format!("slot monitor query failed: {e}"),
                    );
                    continue;
                }
            };
            match catalog::slots(client, Some(&slot)).await {
                Ok(slots) => {
                    let snapshot = slots.into_iter().next();
                    export(&slot, snapshot.as_ref());
                    if let Some(lsn) = snapshot
                        .as_ref()
                        .and_then(|s| s.confirmed_flush_lsn.clone())
                    {
                        if last_confirmed.lsn.as_ref() != Some(&lsn) {
                            last_confirmed = LastConfirmed::seen(lsn, now.clone());
                        }
                    }
                    if let Some(recorder) = &mut recorder {
                        recorder.note(client, &last_confirmed).await;
                    }
                    let problem =
                        slot_health::assess(&slot, snapshot.as_ref(), last_confirmed.clone());
                    live.set_slot(snapshot);
                    if let Ok(limit) = catalog::max_slot_wal_keep_size(client).await {
                        live.set_wal_keep_limit(limit);
                        metrics::gauge!(m::MAX_SLOT_WAL_KEEP_SIZE_BYTES)
                            .set(limit.map_or(-1.0, |v| v as f64));
                    }
                    if let Some(problem) = problem {
                        stopped = true;
                        let _ = tx.try_send(Finding::Slot(problem));
                    }
                }
                Err(e) => failed(
                    &live,
                    &mut last_failure,
                    format!("slot monitor query failed: {e}"),
                ),
            }
            match outbox.check(client).await {
                Ok(Some(problem)) => {
                    stopped = true;
                    // The relay ends on the first; a full channel means it has one.
                    let _ = tx.try_send(Finding::Outbox(problem));
                }
                Ok(None) => {
                    last_failure = None;
                    if let (false, Some(lsn)) = (stopped, position) {
                        verified_tx.send_if_modified(|v| {
                            let moved = lsn > *v;
                            *v = (*v).max(lsn);
                            moved
                        });
                        metrics::gauge!(m::VERIFIED_LSN).set(verified_tx.borrow().0 as f64);
                    }
                }
                Err(e) => failed(
                    &live,
                    &mut last_failure,
                    format!("outbox check failed: {e}"),
                ),
            }
        }
    });
    (rx, verified_rx)
}

/// The server refuses connections because it is shutting down.
fn is_shutting_down(error: &SqlError) -> bool {
    error
        .server()
        .is_some_and(|e| e.code == "57P03" && e.message.contains("shutting down"))
}

/// Counts a failed reading; logs it when it differs from the last one, so
/// a server that is down for a while does not flood the log.
fn failed(live: &LiveState, last: &mut Option<String>, message: String) {
    if last.as_deref() != Some(message.as_str()) {
        tracing::warn!(error = %message, "slot monitor: until a check succeeds, nothing is confirmed to PostgreSQL past the position last verified, and the slot keeps its WAL");
    } else {
        tracing::debug!(error = %message, "slot monitor");
    }
    *last = Some(message);
    metrics::counter!(m::MONITOR_ERRORS_TOTAL).increment(1);
    live.counters.monitor_errors.fetch_add(1, Ordering::Relaxed);
}

fn export(slot: &str, snapshot: Option<&SlotSnapshot>) {
    let Some(s) = snapshot else {
        metrics::gauge!(m::SLOT_ACTIVE, "slot" => slot.to_owned()).set(0.0);
        return;
    };
    metrics::gauge!(m::SLOT_ACTIVE, "slot" => slot.to_owned()).set(if s.active {
        1.0
    } else {
        0.0
    });
    if let Some(v) = s.lag_bytes {
        metrics::gauge!(m::SLOT_LAG_BYTES, "slot" => slot.to_owned()).set(v as f64);
    }
    if let Some(v) = s.retained_wal_bytes {
        metrics::gauge!(m::SLOT_RETAINED_WAL_BYTES, "slot" => slot.to_owned()).set(v as f64);
    }
    metrics::gauge!(m::SLOT_SAFE_WAL_SIZE_BYTES, "slot" => slot.to_owned())
        .set(s.safe_wal_size.map_or(-1.0, |v| v as f64));
    for state in WAL_STATUSES {
        let value = if s.wal_status.as_deref() == Some(state) {
            1.0
        } else {
            0.0
        };
        metrics::gauge!(m::SLOT_WAL_STATUS, "slot" => slot.to_owned(), "wal_status" => state)
            .set(value);
    }
    metrics::gauge!(m::SLOT_WRITE_LAG_SECONDS, "slot" => slot.to_owned())
        .set(s.write_lag_seconds.unwrap_or(0.0));
    metrics::gauge!(m::SLOT_FLUSH_LAG_SECONDS, "slot" => slot.to_owned())
        .set(s.flush_lag_seconds.unwrap_or(0.0));
}
