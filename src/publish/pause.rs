//! Waiting out failures: how many came since the last success (for the
//! backoff), until when waiting records are held back, and the timer that
//! wakes the publisher when that pause ends or the open transaction stops
//! taking records.
//!
//! A pause holds back every record, not one partition's: the publisher
//! marks everything held while it lasts (a full queue, a failed delivery,
//! a topic not ready, a takeover or an abort to try again).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::outcome::backoff;

/// The longest pause before sending failed records again.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(5);

pub struct Pause {
    /// When waiting records may be tried again.
    until: Option<Instant>,
    timer: Pin<Box<Sleep>>,
    /// When the timer is set to fire, if it is.
    armed_for: Option<Instant>,
    /// Failures since the last success, for the backoff.
    failures: u32,
}

impl Pause {
    pub fn new() -> Self {
        Pause {
            until: None,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed_for: None,
            failures: 0,
        }
    }

    /// Whether records are held back now.
    pub fn is_on(&self) -> bool {
        self.until.is_some()
    }

    /// Holds records back for at least `wait`.
    pub fn extend(&mut self, wait: Duration) {
        let until = Instant::now() + wait;
        self.until = Some(self.until.map_or(until, |u| u.max(until)));
    }

    pub fn clear(&mut self) {
        self.until = None;
    }

    /// Counts a failure; returns how long to wait before trying again.
    pub fn failed(&mut self) -> Duration {
        self.failures += 1;
        backoff(self.failures.min(8), MAX_RETRY_BACKOFF)
    }

    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Whether the timer fired: the pause ended (it is cleared) or the
    /// time it was set for came. Arms it for whichever of the pause's end
    /// and `closes_at` comes first.
    pub fn poll_timer(&mut self, cx: &mut Context<'_>, closes_at: Option<Instant>) -> bool {
        let now = Instant::now();
        // What set the timer may no longer say so once its time came (a
        // transaction's close is reported only while ahead).
        let mut fired = self.armed_for.is_some_and(|at| at <= now);
        if self.until.is_some_and(|p| p <= now) {
            self.until = None;
            fired = true;
        }
        let wake_at = match (self.until, closes_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.armed_for = wake_at;
        let Some(at) = wake_at else {
            return fired;
        };
        if self.timer.deadline() != at {
            self.timer.as_mut().reset(at);
        }
        if let Poll::Ready(()) = self.timer.as_mut().poll(cx) {
            self.armed_for = None;
            if self.until.is_some_and(|p| p <= Instant::now()) {
                self.until = None;
            }
            return true;
        }
        fired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_timer_fires_once_when_its_time_comes_though_what_set_it_is_past() {
        let mut pause = Pause::new();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let closes_at = Instant::now() + Duration::from_millis(3);
        assert!(!pause.poll_timer(&mut cx, Some(closes_at)));
        tokio::time::advance(Duration::from_millis(3)).await;
        // The transaction's close is no longer reported once reached.
        assert!(pause.poll_timer(&mut cx, None), "its time came");
        assert!(!pause.poll_timer(&mut cx, None), "once");
        // A pause that ends fires too, and is cleared.
        pause.extend(Duration::from_millis(5));
        assert!(pause.is_on() && !pause.poll_timer(&mut cx, None));
        tokio::time::advance(Duration::from_millis(5)).await;
        assert!(pause.poll_timer(&mut cx, None));
        assert!(!pause.is_on());
        assert!(!pause.poll_timer(&mut cx, None));
    }
}
