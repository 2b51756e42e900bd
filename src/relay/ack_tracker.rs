//! The ack tracker: which LSN may be confirmed to PostgreSQL.
//!
//! The guarantee: the flush LSN we report is the end LSN of the newest
//! transaction such that it and every transaction before it have had all
//! their events acknowledged by the broker. Commit order is the only total
//! order in the stream (several changes can share an LSN; only commit end
//! LSNs are safe to report), so progress is tracked per transaction, in
//! commit order, and the watermark only moves over a contiguous acknowledged
//! prefix. Transactions without events (other tables, empty ones) pass as
//! soon as everything before them has.
//!
//! When nothing is open or in flight, the server's WAL end from a keepalive
//! may be confirmed too: every commit before it has already been streamed to
//! us and handled, so an idle outbox on a busy database does not pin WAL.
//!
//! The watermark never goes backwards.

use std::collections::VecDeque;

use crate::lsn::Lsn;

/// Identifies a transaction inside the ack tracker; events carry it so
/// their acknowledgements find their transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TxnTicket(pub(crate) u64);

#[derive(Debug)]
struct TxnState {
    /// Events produced and not yet acknowledged.
    pending: u64,
    /// The commit's end LSN, once the Commit has been seen.
    end_lsn: Option<Lsn>,
}

#[derive(Debug, Default)]
pub struct AckTracker {
    /// Open and committed-but-unacknowledged transactions, in commit order.
    txns: VecDeque<TxnState>,
    /// Ticket number of `txns[0]`.
    first_ticket: u64,
    confirmed: Lsn,
}

/// A bug in the caller: an ack or commit for a transaction that is not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("transaction {0:?} is not tracked")]
    UnknownTransaction(TxnTicket),
    #[error("transaction {0:?} has no event in flight to acknowledge")]
    NothingInFlight(TxnTicket),
    #[error("transaction {0:?} was committed twice")]
    AlreadyCommitted(TxnTicket),
}

impl AckTracker {
    /// Starts from a position already confirmed (the slot's).
    pub fn new(confirmed: Lsn) -> Self {
        AckTracker {
            confirmed,
            ..Default::default()
        }
    }

    /// A transaction began. Transactions must begin in commit order, which
    /// is the order the walsender sends them.
    pub fn begin(&mut self) -> TxnTicket {
        let ticket = TxnTicket(self.first_ticket + self.txns.len() as u64);
        self.txns.push_back(TxnState {
            pending: 0,
            end_lsn: None,
        });
        ticket
    }

    /// An event of the transaction was handed to the producer.
    pub fn event_sent(&mut self, ticket: TxnTicket) -> Result<(), AckError> {
        self.state(ticket)?.pending += 1;
        Ok(())
    }

    /// The transaction's Commit arrived; `end_lsn` is what to confirm.
    pub fn commit(&mut self, ticket: TxnTicket, end_lsn: Lsn) -> Result<(), AckError> {
        let state = self.state(ticket)?;
        if state.end_lsn.is_some() {
            return Err(AckError::AlreadyCommitted(ticket));
        }
        state.end_lsn = Some(end_lsn);
        self.advance();
        Ok(())
    }

    /// The broker acknowledged one event of the transaction.
    pub fn ack(&mut self, ticket: TxnTicket) -> Result<(), AckError> {
        let state = self.state(ticket)?;
        if state.pending == 0 {
            return Err(AckError::NothingInFlight(ticket));
        }
        state.pending -= 1;
        self.advance();
        Ok(())
    }

    /// The server's WAL end (from a keepalive): confirmable when nothing is
    /// open or in flight.
    pub fn server_idle_at(&mut self, wal_end: Lsn) {
        if self.txns.is_empty() && wal_end > self.confirmed {
            self.confirmed = wal_end;
        }
    }

    /// The LSN that may be reported as flushed.
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// Transactions begun and not yet confirmed.
    pub fn open_transactions(&self) -> usize {
        self.txns.len()
    }

    /// Events produced and not yet acknowledged, across all transactions.
    pub fn events_in_flight(&self) -> u64 {
        self.txns.iter().map(|t| t.pending).sum()
    }

    fn state(&mut self, ticket: TxnTicket) -> Result<&mut TxnState, AckError> {
        let index = ticket
            .0
            .checked_sub(self.first_ticket)
            .ok_or(AckError::UnknownTransaction(ticket))?;
        self.txns
            .get_mut(index as usize)
            .ok_or(AckError::UnknownTransaction(ticket))
    }

    /// Pops the acknowledged, committed prefix and moves the watermark.
    fn advance(&mut self) {
        while let Some(front) = self.txns.front() {
            match front.end_lsn {
                Some(end_lsn) if front.pending == 0 => {
                    // Never backwards: a keepalive may have moved us further.
                    self.confirmed = self.confirmed.max(end_lsn);
                    self.txns.pop_front();
                    self.first_ticket += 1;
                }
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn watermark_waits_for_every_event_of_the_oldest_transaction() {
        let mut t = AckTracker::new(Lsn(10));
        let a = t.begin();
        t.event_sent(a).unwrap();
        t.event_sent(a).unwrap();
        t.commit(a, Lsn(100)).unwrap();
        let b = t.begin();
        t.event_sent(b).unwrap();
        t.commit(b, Lsn(200)).unwrap();

        t.ack(b).unwrap();
        assert_eq!(t.confirmed(), Lsn(10), "b is acked but a is not");
        t.ack(a).unwrap();
        assert_eq!(t.confirmed(), Lsn(10));
        t.ack(a).unwrap();
        assert_eq!(t.confirmed(), Lsn(200), "a and b are both done");
        assert_eq!(t.open_transactions(), 0);
    }

    #[test]
    fn transaction_without_events_passes_once_everything_before_it_has() {
        let mut t = AckTracker::new(Lsn(0));
        let a = t.begin();
        t.event_sent(a).unwrap();
        t.commit(a, Lsn(100)).unwrap();
        let empty = t.begin();
        t.commit(empty, Lsn(150)).unwrap();
        assert_eq!(t.confirmed(), Lsn(0));
        t.ack(a).unwrap();
        assert_eq!(t.confirmed(), Lsn(150));
        let alone = t.begin();
        t.commit(alone, Lsn(170)).unwrap();
        assert_eq!(t.confirmed(), Lsn(170));
    }

    #[test]
    fn an_uncommitted_transaction_is_never_confirmed_even_when_acknowledged() {
        let mut t = AckTracker::new(Lsn(0));
        let a = t.begin();
        t.event_sent(a).unwrap();
        t.ack(a).unwrap();
        assert_eq!(t.confirmed(), Lsn(0));
        t.server_idle_at(Lsn(500));
        assert_eq!(t.confirmed(), Lsn(0), "a transaction is open");
        t.commit(a, Lsn(90)).unwrap();
        assert_eq!(t.confirmed(), Lsn(90));
    }

    #[test]
    fn keepalive_wal_end_is_confirmed_only_when_idle_and_never_backwards() {
        let mut t = AckTracker::new(Lsn(100));
        t.server_idle_at(Lsn(50));
        assert_eq!(t.confirmed(), Lsn(100));
        t.server_idle_at(Lsn(300));
        assert_eq!(t.confirmed(), Lsn(300));
        let a = t.begin();
        t.commit(a, Lsn(250)).unwrap();
        assert_eq!(
            t.confirmed(),
            Lsn(300),
            "an older commit does not move it back"
        );
    }

    #[test]
    fn misuse_is_reported_not_ignored() {
        let mut t = AckTracker::new(Lsn(0));
        let a = t.begin();
        assert_eq!(t.ack(a), Err(AckError::NothingInFlight(a)));
        t.commit(a, Lsn(1)).unwrap();
        assert_eq!(
            t.ack(a),
            Err(AckError::UnknownTransaction(a)),
            "already confirmed and gone"
        );
        let b = t.begin();
        t.event_sent(b).unwrap();
        t.commit(b, Lsn(2)).unwrap();
        assert_eq!(t.commit(b, Lsn(3)), Err(AckError::AlreadyCommitted(b)));
    }

    /// A random workload: transactions with 0-4 events, acknowledged in a
    /// random order, with keepalives sprinkled in.
    #[derive(Debug, Clone)]
    enum Step {
        Ack(usize),
        Keepalive,
    }

    proptest! {
        #[test]
        fn random_ack_interleavings_never_confirm_past_an_unacknowledged_event(
            events_per_txn in proptest::collection::vec(0u64..5, 1..30),
            picks in proptest::collection::vec(any::<usize>(), 0..200),
            keepalive_every in 1usize..10,
        ) {
            let mut t = AckTracker::new(Lsn(0));
            // (ticket, end_lsn) and one entry per unacknowledged event.
            let mut unacked: Vec<(TxnTicket, Lsn)> = Vec::new();
            let mut end_lsns = Vec::new();
            for (i, &n) in events_per_txn.iter().enumerate() {
                let ticket = t.begin();
                let end = Lsn(100 * (i as u64 + 1));
                for _ in 0..n {
                    t.event_sent(ticket).unwrap();
                    unacked.push((ticket, end));
                }
                t.commit(ticket, end).unwrap();
                end_lsns.push(end);
            }
            let last_commit = *end_lsns.last().unwrap();
            let mut steps: Vec<Step> = picks.iter().map(|&p| Step::Ack(p)).collect();
            for i in (0..steps.len()).step_by(keepalive_every) {
                steps.insert(i, Step::Keepalive);
            }
            let mut previous = t.confirmed();
            for step in steps {
                match step {
                    Step::Ack(p) if !unacked.is_empty() => {
                        let (ticket, _) = unacked.swap_remove(p % unacked.len());
                        t.ack(ticket).unwrap();
                    }
                    Step::Ack(_) => {}
                    Step::Keepalive => t.server_idle_at(Lsn(last_commit.0 + 50)),
                }
                let confirmed = t.confirmed();
                prop_assert!(confirmed >= previous, "never backwards");
                previous = confirmed;
                // The oldest unacknowledged event's transaction is not confirmed.
                if let Some(oldest) = unacked.iter().map(|(_, end)| *end).min() {
                    prop_assert!(confirmed < oldest, "confirmed {confirmed} past unacked commit {oldest}");
                    // And everything strictly before it is.
                    let before = end_lsns.iter().filter(|e| **e < oldest).max().copied().unwrap_or(Lsn(0));
                    prop_assert_eq!(confirmed, before);
                }
            }
            // Acknowledge the rest: everything is confirmed.
            for (ticket, _) in unacked.drain(..) {
                t.ack(ticket).unwrap();
            }
            // (A keepalive after the last ack may have confirmed past it.)
            prop_assert!(t.confirmed() >= last_commit);
            prop_assert_eq!(t.events_in_flight(), 0);
        }
    }
}
