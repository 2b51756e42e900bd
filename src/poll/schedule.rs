//! When the next claim starts, and on which lane and table: claims go one
//! at a time, in turn over the lanes and the tables. A full batch lets the
//! next lane claim at once; when every lane found nothing in every table
//! the lanes idle until a notification or the poll timer, whose wait
//! doubles from [`MIN_IDLE_WAIT`] up to `--poll-interval`.

use std::time::Duration;

use tokio::time::Instant;

/// Shortest wait between polls of an idle outbox; it doubles up to
/// `--poll-interval` while nothing comes, and a notification ends it.
pub const MIN_IDLE_WAIT: Duration = Duration::from_millis(50);

pub struct ClaimSchedule {
    /// When an idle lane claims next (a notification brings it forward);
    /// `None` while a claim is under way.
    pub at: Option<Instant>,
    idle_wait: Duration,
    poll_interval: Duration,
    /// The table and the lane of the next claim (in turn), and how many
    /// claims in a row found nothing.
    next_table: usize,
    next_lane: usize,
    empty_claims: usize,
}

impl ClaimSchedule {
    pub fn new(poll_interval: Duration) -> Self {
        ClaimSchedule {
            at: Some(Instant::now()),
            idle_wait: MIN_IDLE_WAIT,
            poll_interval,
            next_table: 0,
            next_lane: 0,
            empty_claims: 0,
        }
    }

    /// Whether a claim is due (none is under way).
    pub fn due(&self, now: Instant) -> bool {
        self.at.is_some_and(|at| at <= now)
    }

    /// The lane that claims next, of those `idle`, in turn; the claim's
    /// table (of `tables`) with it. The claim is then under way.
    pub fn start(&mut self, idle: &[bool], tables: usize) -> Option<(usize, usize)> {
        let count = idle.len();
        let index = (0..count)
            .map(|i| (self.next_lane + i) % count)
            .find(|&i| idle[i])?;
        self.next_lane = index + 1;
        self.at = None;
        Some((index, self.next_table % tables.max(1)))
    }

    /// A notification: rows came, claim at once.
    pub fn notified(&mut self) {
        self.idle_wait = MIN_IDLE_WAIT;
        self.at = Some(Instant::now());
    }

    /// The poll timer fired with nothing claimed since: the next wait is
    /// longer.
    pub fn timer_fired(&mut self) {
        self.idle_wait = (self.idle_wait * 2).min(self.poll_interval);
    }

    /// The claim failed: the next one waits for the lane's reconnect.
    pub fn failed(&mut self, retry_at: Instant) {
        self.at = Some(retry_at);
    }

    /// A claim of `table` took `rows` and left `stopped` behind older rows
    /// outside it, of `lanes` lanes and `tables` tables.
    pub fn claimed(
        &mut self,
        table: usize,
        rows: usize,
        stopped: usize,
        lanes: usize,
        tables: usize,
    ) {
        self.next_table = table + 1;
        let now = Instant::now();
        if rows > 0 {
            self.empty_claims = 0;
            self.idle_wait = MIN_IDLE_WAIT;
            // More may wait (this lane's, or another lane's share): the
            // next lane claims now.
            self.at = Some(now);
        } else if stopped > 0 {
            // Rows wait behind older ones another relay holds: claim again
            // shortly, without backing off.
            self.at = Some(now + MIN_IDLE_WAIT);
        } else {
            // The next lane or table tries at once, until every lane found
            // nothing in every table; then the lanes wait for a
            // notification or the poll timer.
            self.empty_claims += 1;
            self.at = Some(if self.empty_claims < lanes * tables.max(1) {
                now
            } else {
                self.empty_claims = 0;
                now + self.idle_wait
            });
        }
    }
}
