//! The confirmer: what to tell PostgreSQL, and when.
//!
//! It owns the ack tracker (which LSN may be confirmed) and decides when a
//! standby status update is due: every feedback interval whatever happens,
//! and soon after the watermark moves, coalesced so that a busy stream of
//! small transactions does not cost a write per commit. It also measures
//! heartbeat latency: a heartbeat transaction is confirmed once everything
//! before it is, so emit-to-confirm is the relay's end-to-end delay.
//!
//! What it reports is also capped at the slot monitor's verified LSN, when
//! there is one: the position up to which the publication was seen
//! publishing every insert (`monitor.rs` says why and where that is racy).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::ack_tracker::{AckError, AckTracker, TxnTicket};
use crate::lsn::Lsn;
use crate::metrics as m;
use crate::timestamp::PgTimestamp;

/// Shortest time between two status updates sent because the watermark
/// moved (the periodic update and replies to the server are not held back).
const COALESCE: Duration = Duration::from_millis(10);

#[derive(Debug)]
pub struct Confirmer {
    tracker: AckTracker,
    interval: Duration,
    last_reported: Lsn,
    last_report_at: Instant,
    /// Heartbeat transactions not yet confirmed: (end LSN, emitted at, in
    /// Unix microseconds).
    heartbeats: VecDeque<(Lsn, i64)>,
    /// Nothing past it is reported (the verified LSN); `None`: no cap.
    cap: Option<watch::Receiver<Lsn>>,
    /// Where the session started: the slot is there already, so a report
    /// never goes below it whatever the cap.
    floor: Lsn,
}

impl Confirmer {
    pub fn new(interval: Duration) -> Self {
        Confirmer {
            tracker: AckTracker::new(Lsn::ZERO),
            interval,
            last_reported: Lsn::ZERO,
            last_report_at: Instant::now(),
            heartbeats: VecDeque::new(),
            cap: None,
            floor: Lsn::ZERO,
        }
    }

    /// Reports nothing past what `cap` holds.
    pub fn set_cap(&mut self, cap: watch::Receiver<Lsn>) {
        self.cap = Some(cap);
    }

    /// Waits up to `timeout` for the cap to reach the watermark, so a clean
    /// stop confirms everything acknowledged (the monitor checks every
    /// second). False when it did not.
    pub async fn wait_for_cap(&mut self, timeout: Duration) -> bool {
        let target = self.tracker.confirmed();
        let Some(cap) = &mut self.cap else {
            return true;
        };
        matches!(
            tokio::time::timeout(timeout, cap.wait_for(|v| *v >= target)).await,
            Ok(Ok(_))
        )
    }

    /// Starts a new session at `from`, the slot's position as the server
    /// reports it: nothing may be in flight (the relay waits for that, or
    /// abandons it, before it reconnects).
    pub fn restart(&mut self, from: Lsn) {
        debug_assert_eq!(self.tracker.events_in_flight(), 0);
        self.tracker = AckTracker::new(from);
        self.floor = from;
        self.heartbeats.clear();
        // The first update of a session goes out at once.
        self.last_report_at = Instant::now() - self.interval;
    }

    /// Forgets the events in flight: they will be read again from the slot.
    pub fn abandon_in_flight(&mut self) {
        self.tracker = AckTracker::new(self.tracker.confirmed());
        self.heartbeats.clear();
    }

    /// The highest LSN everything before which is acknowledged.
    pub fn confirmed(&self) -> Lsn {
        self.tracker.confirmed()
    }

    pub fn begin(&mut self) -> TxnTicket {
        self.tracker.begin()
    }

    pub fn event_sent(&mut self, txn: TxnTicket) -> Result<(), AckError> {
        self.tracker.event_sent(txn)
    }

    pub fn ack(&mut self, txn: TxnTicket) -> Result<(), AckError> {
        self.tracker.ack(txn)
    }

    /// The transaction's commit arrived; `heartbeat` is when it was emitted
    /// if it carried walrelay's heartbeat.
    pub fn commit(
        &mut self,
        txn: TxnTicket,
        end_lsn: Lsn,
        heartbeat: Option<i64>,
    ) -> Result<(), AckError> {
        if let Some(emitted_at) = heartbeat {
            self.heartbeats.push_back((end_lsn, emitted_at));
        }
        self.tracker.commit(txn, end_lsn)
    }

    /// The server's WAL end from a keepalive: confirmable when idle.
    pub fn server_idle_at(&mut self, wal_end: Lsn) {
        self.tracker.server_idle_at(wal_end);
    }

    /// When the next status update is due.
    pub fn due_at(&self) -> Instant {
        let periodic = self.last_report_at + self.interval;
        if self.to_report() > self.last_reported {
            periodic.min(self.last_report_at + COALESCE)
        } else {
            periodic
        }
    }

    /// The LSN to report now: the watermark, capped at the verified LSN;
    /// call [`Confirmer::reported`] once it is sent.
    pub fn to_report(&self) -> Lsn {
        let watermark = self.tracker.confirmed();
        match &self.cap {
            Some(cap) => watermark.min(*cap.borrow()).max(self.floor),
            None => watermark,
        }
    }

    /// A status update with `lsn` went out.
    pub fn reported(&mut self, lsn: Lsn) {
        if lsn != self.last_reported {
            tracing::debug!(lsn = %lsn, "confirmed");
        }
        self.last_reported = lsn;
        self.last_report_at = Instant::now();
        while let Some(&(end_lsn, emitted_at)) = self.heartbeats.front() {
            if end_lsn > lsn {
                break;
            }
            self.heartbeats.pop_front();
            let latency = (PgTimestamp::now().unix_micros() - emitted_at).max(0) as f64 / 1e6;
            metrics::gauge!(m::HEARTBEAT_LATENCY_SECONDS).set(latency);
        }
        metrics::gauge!(m::CONFIRMED_LSN).set(lsn.0 as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_moved_watermark_is_reported_soon_and_an_idle_one_every_interval() {
        let mut c = Confirmer::new(Duration::from_secs(1));
        c.restart(Lsn::ZERO);
        assert!(
            c.due_at() <= Instant::now(),
            "the first update goes out at once"
        );
        c.reported(c.to_report());
        assert_eq!(c.due_at(), Instant::now() + Duration::from_secs(1));
        let t = c.begin();
        c.commit(t, Lsn(100), None).unwrap();
        assert_eq!(c.to_report(), Lsn(100));
        assert_eq!(
            c.due_at(),
            Instant::now() + COALESCE,
            "coalesced, not periodic"
        );
        tokio::time::advance(COALESCE).await;
        c.reported(c.to_report());
        assert_eq!(c.last_reported, Lsn(100));
        assert_eq!(c.due_at(), Instant::now() + Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_past_the_verified_lsn_is_reported_nor_below_the_session_start() {
        let (verified, cap) = watch::channel(Lsn(50));
        let mut c = Confirmer::new(Duration::from_secs(1));
        c.set_cap(cap);
        c.restart(Lsn(100));
        assert_eq!(c.to_report(), Lsn(100), "never below the slot's position");
        verified.send_replace(Lsn(150));
        let t = c.begin();
        c.commit(t, Lsn(200), None).unwrap();
        assert_eq!(c.confirmed(), Lsn(200));
        assert_eq!(c.to_report(), Lsn(150), "capped at the verified LSN");
        c.reported(c.to_report());
        assert_eq!(
            c.due_at(),
            Instant::now() + Duration::from_secs(1),
            "a capped watermark is not reported again and again"
        );
        verified.send_replace(Lsn(300));
        assert_eq!(c.to_report(), Lsn(200));
        assert!(c.wait_for_cap(Duration::from_secs(1)).await);
    }
}
