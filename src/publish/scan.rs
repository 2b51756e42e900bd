//! Exactly once: the log is the ledger.
//!
//! Every record carries its position and origin (`position.rs`).
//! walrelay picks each record's partition itself (murmur2 of the key, as
//! the Java client does), so on the first send to a partition in a process
//! it reads that partition's tail and collects the positions of its own
//! records there; an event whose position is among them is already in the
//! log and is skipped. The scan stops once it has seen enough of its own
//! records from before the replay's start, reaches the partition's
//! beginning, or has read its look-back.
//!
//! **Never lose to avoid a duplicate.** Only positions actually seen in the
//! partition are skipped, so reading too little can only publish again.
//! Records of other origins are passed over. A record written on a branch
//! of history the server no longer has (a timeline the current one forked
//! from, at or after the fork) does not count: the new history may hold a
//! different event at the same position.

use std::collections::HashSet;

use super::position::{Origin, Position};
use crate::lsn::Lsn;
use crate::timeline::TimelineHistory;

/// What a tail scan reads of one record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TailRecord {
    pub offset: i64,
    pub origin: Option<String>,
    pub position: Option<String>,
}

/// What to look for in a partition's tail.
#[derive(Clone, Debug)]
pub struct ScanRequest {
    /// This relay's origin (its timeline is the current one).
    pub origin: Origin,
    pub history: TimelineHistory,
    /// The replay's start: no event committed before it is published again.
    pub start: Lsn,
    /// Own records from before `start` to see before stopping: records of
    /// one partition are out of position order by at most this many.
    pub margin: usize,
    /// Records to read at most.
    pub lookback: usize,
}

/// Collects the positions of a partition's own records, newest first.
#[derive(Debug)]
pub struct LedgerScan {
    request: ScanRequest,
    present: HashSet<Position>,
    older_seen: usize,
    read: usize,
    /// Own records' positions, in the order read (newest first).
    own: Vec<Position>,
    /// The largest number of own records one record was out of order by.
    disorder: usize,
    /// Why the reader could not show the whole tail, if it could not.
    unsure: Option<ScanEnd>,
    /// The commit positions of what an open transaction hides, when every
    /// record of it is this relay's own (`None`: one is not, or it was not
    /// read).
    hidden_commits: Option<Vec<Lsn>>,
}

/// Whether a scan wants the next older record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scan {
    More,
    Enough,
}

/// How a scan ended. Every end but `Complete` means events not seen are
/// published again: duplicates are possible (never a loss), and the
/// relay counts it in `walrelay_partitions_at_least_once_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// It saw `margin` own records from before the start, or the beginning
    /// of a partition that was never trimmed.
    Complete,
    /// It read `lookback` records first.
    LookbackExceeded,
    /// It reached the partition's first record, but retention or
    /// compaction had removed older ones (the log starts past offset 0),
    /// before it saw `margin` own records from before the start.
    Truncated,
    /// Another producer's open transaction hides what was written after
    /// it (a `read_committed` reader stops there).
    Hidden,
    /// Own records were out of position order by more than half the
    /// margin, so older ones may lie past where the scan stopped.
    Disordered,
}

impl ScanEnd {
    /// The metric label of an unsure end.
    pub fn reason(self) -> Option<&'static str> {
        match self {
            ScanEnd::Complete => None,
            ScanEnd::LookbackExceeded => Some("lookback"),
            ScanEnd::Truncated => Some("truncated"),
            ScanEnd::Hidden => Some("open_transaction"),
            ScanEnd::Disordered => Some("disorder"),
        }
    }
}

/// A partition's ledger: the positions known to be in it.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    present: HashSet<Position>,
}

impl Ledger {
    /// Whether an event at `position` is already in the partition.
    pub fn contains(&self, position: &Position) -> bool {
        self.present.contains(position)
    }

    /// Forgets positions the replay has passed, to keep the set small.
    pub fn forget_before(&mut self, commit: Lsn) {
        self.present.retain(|p| p.commit >= commit);
    }

    pub fn len(&self) -> usize {
        self.present.len()
    }

    pub fn is_empty(&self) -> bool {
        self.present.is_empty()
    }
}

impl LedgerScan {
    pub fn new(request: ScanRequest) -> Self {
        LedgerScan {
            request,
            present: HashSet::new(),
            older_seen: 0,
            read: 0,
            own: Vec::new(),
            disorder: 0,
            unsure: None,
            hidden_commits: None,
        }
    }

    /// Takes the next older record.
    pub fn push(&mut self, record: &TailRecord) -> Scan {
        self.read += 1;
        if let Some(position) = self.own_position(record) {
            // Newest first, positions should only fall; one that rises is
            // out of order by the records read before it that are lower.
            if self.own.last().is_some_and(|last| position > *last) {
                let depth = self.own.iter().filter(|p| **p < position).count();
                self.disorder = self.disorder.max(depth);
            }
            self.own.push(position);
            if position.commit >= self.request.start {
                self.present.insert(position);
            } else {
                self.older_seen += 1;
            }
        }
        if self.older_seen >= self.request.margin.max(1) || self.read >= self.request.lookback {
            Scan::Enough
        } else {
            Scan::More
        }
    }

    /// The position of a record of this relay's source written on the
    /// current history, if it is one.
    fn own_position(&self, record: &TailRecord) -> Option<Position> {
        let origin = Origin::parse(record.origin.as_deref()?)?;
        if !origin.same_source(&self.request.origin) {
            return None;
        }
        let position: Position = record.position.as_deref()?.parse().ok()?;
        self.request
            .history
            .contains(origin.timeline, position.commit)
            .then_some(position)
    }

    /// The reader reached the partition's first record, at `log_start`:
    /// past 0, older records were removed.
    pub fn reached_log_start(&mut self, log_start: i64) {
        if log_start > 0 && self.older_seen < self.request.margin.max(1) {
            self.unsure.get_or_insert(ScanEnd::Truncated);
        }
    }

    /// The reader could only see up to the last stable offset, below the
    /// high watermark: an open transaction hides the rest.
    /// Whether an open transaction hid the partition's newest records.
    pub fn is_hidden(&self) -> bool {
        self.unsure == Some(ScanEnd::Hidden)
    }

    pub fn hidden_by_open_transaction(&mut self) {
        self.unsure = Some(ScanEnd::Hidden);
    }

    /// Everything the open transaction hides (from the last stable offset
    /// to the high watermark, read uncommitted, cleanup records left out).
    pub fn hidden_records(&mut self, records: &[TailRecord]) {
        self.hidden_commits = records
            .iter()
            .map(|record| self.own_position(record).map(|position| position.commit))
            .collect();
    }

    /// Whether an open transaction hides the newest records and they are
    /// all own records of events committed at or after `replayed_from` (and
    /// the replay's start): events this session streams again, so none of
    /// them was confirmed before it. Ending the transaction with an abort
    /// then takes back nothing confirmed, and the session sends again
    /// whatever the tail lacks.
    pub fn hides_only_replayed(&self, replayed_from: Lsn) -> bool {
        let from = replayed_from.max(self.request.start);
        self.is_hidden()
            && self
                .hidden_commits
                .as_ref()
                .is_some_and(|commits| !commits.is_empty() && commits.iter().all(|c| *c >= from))
    }

    /// The ledger, and whether the scan was complete.
    pub fn finish(self) -> (Ledger, ScanEnd) {
        let margin = self.request.margin.max(1);
        let end = if self.read >= self.request.lookback && self.older_seen < margin {
            ScanEnd::LookbackExceeded
        } else if let Some(unsure) = self.unsure {
            unsure
        } else if self.disorder * 2 >= margin {
            ScanEnd::Disordered
        } else {
            ScanEnd::Complete
        };
        (
            Ledger {
                present: self.present,
            },
            end,
        )
    }

    /// Records read so far.
    pub fn read(&self) -> usize {
        self.read
    }

    /// The reader gives up before the scan had enough (the partition is
    /// too long to step back through): the scan ends as if its look-back
    /// were read.
    pub fn exhaust(&mut self) {
        self.read = self.read.max(self.request.lookback);
    }

    /// The records a scan may read.
    pub fn lookback(&self) -> usize {
        self.request.lookback
    }
}

#[cfg(test)]
mod tests;
