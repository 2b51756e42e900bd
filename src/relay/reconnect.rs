//! When to connect again after a session ended: at once for a healthy
//! session's hiccup, with a growing backoff when sessions keep failing, on
//! a short timer as a standby, and never for an error that retrying cannot
//! mend (after a few tries, for errors that may be a passing mistake).

use std::time::Duration;

use tokio::time::Instant;

use super::error::Decision;
use crate::lsn::Lsn;
use crate::publish::backoff;

/// A session that streamed this long counts as healthy for the retry count.
const HEALTHY_SESSION: Duration = Duration::from_secs(60);

/// What to do after a failed session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Connect again after this long.
    Reconnect(Duration),
    /// Another relay streams from the slot: ask again after this long.
    StandBy(Duration),
    /// Stop the relay with the error.
    Stop,
}

#[derive(Debug)]
pub struct ReconnectPolicy {
    max_backoff: Duration,
    permanent_error_attempts: u32,
    standby_retry: Duration,
    /// Failed sessions in a row, towards giving up on a permanent error.
    attempt: u32,
    session_began: Instant,
    confirmed_at_session_start: Lsn,
}

impl ReconnectPolicy {
    pub fn new(
        max_backoff: Duration,
        permanent_error_attempts: u32,
        standby_retry: Duration,
    ) -> Self {
        ReconnectPolicy {
            max_backoff,
            permanent_error_attempts,
            standby_retry,
            attempt: 0,
            session_began: Instant::now(),
            confirmed_at_session_start: Lsn::ZERO,
        }
    }

    /// A session started with the watermark at `confirmed`.
    pub fn session_started(&mut self, confirmed: Lsn) {
        self.session_began = Instant::now();
        self.confirmed_at_session_start = confirmed;
    }

    /// A session ended with an error `decide` judged; `confirmed` is the
    /// watermark now.
    pub fn after(&mut self, decision: Decision, confirmed: Lsn) -> Next {
        let next = match decision {
            Decision::StandBy => {
                self.attempt = 0;
                Next::StandBy(self.standby_retry)
            }
            Decision::Stop => Next::Stop,
            Decision::Retry | Decision::StopAfterRetries => {
                // A session that made progress (or lasted) starts the count
                // afresh; one that failed on the same change again counts
                // towards giving up.
                if confirmed > self.confirmed_at_session_start
                    || self.session_began.elapsed() > HEALTHY_SESSION
                {
                    self.attempt = 0;
                }
                self.attempt += 1;
                if decision == Decision::StopAfterRetries
                    && self.attempt >= self.permanent_error_attempts
                {
                    Next::Stop
                } else {
                    Next::Reconnect(backoff(self.attempt, self.max_backoff))
                }
            }
        };
        self.session_started(confirmed);
        next
    }

    /// Failed sessions in a row.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_stops_after_its_tries_unless_the_session_made_progress() {
        let mut p = ReconnectPolicy::new(Duration::from_secs(30), 3, Duration::from_secs(2));
        assert!(matches!(
            p.after(Decision::StopAfterRetries, Lsn(0)),
            Next::Reconnect(_)
        ));
        assert!(matches!(
            p.after(Decision::StopAfterRetries, Lsn(10)),
            Next::Reconnect(_)
        ));
        assert_eq!(p.attempt(), 1, "progress starts the count afresh");
        assert!(matches!(
            p.after(Decision::StopAfterRetries, Lsn(10)),
            Next::Reconnect(_)
        ));
        assert_eq!(p.after(Decision::StopAfterRetries, Lsn(10)), Next::Stop);
        assert_eq!(
            p.after(Decision::StandBy, Lsn(10)),
            Next::StandBy(Duration::from_secs(2))
        );
        assert_eq!(p.after(Decision::Stop, Lsn(10)), Next::Stop);
    }
}
