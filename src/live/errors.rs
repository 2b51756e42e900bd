//! The last errors, each with when it happened and whether it still holds.
//!
//! An error is current from the moment it is reported until the process
//! shows it recovered, and past from then on, with when and how it was
//! seen to recover:
//!
//! - it connected again after being disconnected (a new replication
//!   session, a new connection to the outbox table, the inbox's store back);
//! - events were acknowledged (or stored) while connected, after it;
//! - the broker acknowledged again after a stall (waiting for the broker
//!   is itself reported as an error);
//! - it did not recur for [`QUIET`] while the process was active and the
//!   broker answered (an idle consumer's transient Kafka error has no
//!   other sign of recovery).
//!
//! The same message reported again while current counts as one error seen
//! several times; the page never shows a past error as current.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Errors kept.
pub const MAX_ERRORS: usize = 10;

/// Longest message kept, in bytes.
const MAX_MESSAGE: usize = 2048;

/// How long a current error must stay away, while the process is active
/// and the broker answers, before it counts as past.
pub const QUIET: Duration = Duration::from_secs(15);

/// How an error was seen to be over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Recovery {
    /// Connected again.
    Reconnected,
    /// Events were acknowledged since.
    Acknowledged,
    /// Not seen again for [`QUIET`] while active, with the broker answering.
    Quiet,
    /// The broker acknowledged again after a stall.
    BrokerAnswered,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ErrorRecord {
    pub message: String,
    /// When it was first and last reported (Unix milliseconds).
    pub first_ms: u64,
    pub last_ms: u64,
    /// Times reported while current.
    pub count: u32,
    /// When it was seen to be over; `None` while it holds.
    pub resolved_ms: Option<u64>,
    pub resolved_by: Option<Recovery>,
}

impl ErrorRecord {
    pub fn holds(&self) -> bool {
        self.resolved_ms.is_none()
    }
}

#[derive(Debug, Default)]
pub struct ErrorLog {
    errors: Mutex<VecDeque<ErrorRecord>>,
    /// Some error holds: a cheap check on the acknowledgement path.
    current: AtomicBool,
}

impl ErrorLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<ErrorRecord>> {
        self.errors.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn report(&self, message: &str, now_ms: u64) {
        let mut message = message.to_owned();
        if message.len() > MAX_MESSAGE {
            let mut end = MAX_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push('…');
            message.shrink_to_fit();
        }
        let mut errors = self.lock();
        // A current error reported again (even between others: librdkafka
        // alternates two messages for one outage) is one error seen again,
        // and the newest.
        match errors
            .iter()
            .position(|e| e.holds() && e.message == message)
            .and_then(|i| errors.remove(i))
        {
            Some(mut again) => {
                again.last_ms = now_ms;
                again.count = again.count.saturating_add(1);
                errors.push_back(again);
            }
            None => {
                if errors.len() == MAX_ERRORS {
                    errors.pop_front();
                }
                errors.push_back(ErrorRecord {
                    message,
                    first_ms: now_ms,
                    last_ms: now_ms,
                    count: 1,
                    resolved_ms: None,
                    resolved_by: None,
                });
            }
        }
        self.current.store(true, Ordering::Relaxed);
    }

    /// Marks every current error past.
    pub fn recovered(&self, by: Recovery, now_ms: u64) {
        if !self.current.load(Ordering::Relaxed) {
            return;
        }
        let mut errors = self.lock();
        for error in errors.iter_mut().filter(|e| e.holds()) {
            error.resolved_ms = Some(now_ms);
            error.resolved_by = Some(by);
        }
        self.current.store(false, Ordering::Relaxed);
    }

    /// Marks current errors past that were not reported for [`QUIET`].
    pub fn recovered_if_quiet(&self, now_ms: u64) {
        if !self.current.load(Ordering::Relaxed) {
            return;
        }
        let quiet = QUIET.as_millis() as u64;
        let mut errors = self.lock();
        for error in errors.iter_mut().filter(|e| e.holds()) {
            if now_ms.saturating_sub(error.last_ms) >= quiet {
                error.resolved_ms = Some(now_ms);
                error.resolved_by = Some(Recovery::Quiet);
            }
        }
        self.current
            .store(errors.iter().any(ErrorRecord::holds), Ordering::Relaxed);
    }

    /// Whether some error holds.
    pub fn any_current(&self) -> bool {
        self.current.load(Ordering::Relaxed)
    }

    /// The newest error, current or past.
    pub fn last(&self) -> Option<ErrorRecord> {
        self.lock().back().cloned()
    }

    /// The errors kept, newest first.
    pub fn all(&self) -> Vec<ErrorRecord> {
        self.lock().iter().rev().cloned().collect()
    }

    pub fn heap_bytes(&self) -> usize {
        let errors = self.lock();
        errors.capacity() * std::mem::size_of::<ErrorRecord>()
            + errors.iter().map(|e| e.message.capacity()).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_holds_until_recovery_and_is_then_past_with_its_time() {
        let log = ErrorLog::default();
        log.report("connection refused", 1000);
        log.report("connection refused", 2000);
        let e = log.last().unwrap();
        assert!(e.holds());
        assert_eq!((e.first_ms, e.last_ms, e.count), (1000, 2000, 2));
        log.recovered(Recovery::Reconnected, 3000);
        let e = log.last().unwrap();
        assert!(!e.holds());
        assert_eq!(e.resolved_ms, Some(3000));
        assert_eq!(e.resolved_by, Some(Recovery::Reconnected));
        assert!(!log.any_current());
        // The same message after recovery is a new error.
        log.report("connection refused", 4000);
        assert_eq!(log.all().len(), 2);
        assert!(log.last().unwrap().holds());
    }

    #[test]
    fn two_messages_alternating_for_one_outage_are_two_errors_seen_often() {
        let log = ErrorLog::default();
        for i in 0..20 {
            log.report("Kafka: AllBrokersDown", i * 2);
            log.report("Kafka: 2/2 brokers are down", i * 2 + 1);
        }
        let all = log.all();
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!((all[0].count, all[0].first_ms, all[0].last_ms), (20, 1, 39));
    }

    #[test]
    fn a_quiet_error_becomes_past_only_after_the_quiet_time() {
        let log = ErrorLog::default();
        log.report("UnknownTopicOrPartition", 1000);
        log.recovered_if_quiet(1000 + QUIET.as_millis() as u64 - 1);
        assert!(log.last().unwrap().holds());
        log.recovered_if_quiet(1000 + QUIET.as_millis() as u64);
        assert_eq!(log.last().unwrap().resolved_by, Some(Recovery::Quiet));
        assert!(!log.any_current());
    }

    #[test]
    fn the_log_is_bounded_and_long_messages_are_cut() {
        let log = ErrorLog::default();
        for i in 0..(MAX_ERRORS + 5) {
            log.report(&format!("error {i}"), i as u64);
        }
        assert_eq!(log.all().len(), MAX_ERRORS);
        assert_eq!(log.all()[0].message, format!("error {}", MAX_ERRORS + 4));
        log.report(&"é".repeat(MAX_MESSAGE), 99);
        assert!(log.last().unwrap().message.len() <= MAX_MESSAGE + '…'.len_utf8());
    }
}
