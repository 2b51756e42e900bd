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
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pos(commit: u64, change: u64, rank: u16) -> Position {
        Position {
            commit: Lsn(commit),
            change: Lsn(change),
            rank,
        }
    }

    fn record(origin: &str, position: Position, offset: i64) -> TailRecord {
        TailRecord {
            offset,
            origin: Some(origin.into()),
            position: Some(position.to_string()),
        }
    }

    fn request(start: u64, margin: usize, lookback: usize) -> ScanRequest {
        ScanRequest {
            origin: Origin::parse("7/walrelay/2").unwrap(),
            history: TimelineHistory::parse(2, "1\t0/5000\treason"),
            start: Lsn(start),
            margin,
            lookback,
        }
    }

    #[test]
    fn a_scan_collects_own_records_from_the_start_on_and_stops_after_the_margin() {
        let mut scan = LedgerScan::new(request(0x4000, 2, 1000));
        let log = [
            record("7/walrelay/2", pos(0x6000, 0x5F00, 0), 9),
            record("9/other/1", pos(0x7000, 0x7000, 0), 8),
            record("7/walrelay/2", pos(0x4100, 0x4000, 1), 7),
            record("7/walrelay/2", pos(0x4100, 0x4000, 0), 6),
            record("7/walrelay/1", pos(0x3000, 0x3000, 0), 5),
            record("7/walrelay/1", pos(0x2000, 0x2000, 0), 4),
            record("7/walrelay/1", pos(0x4500, 0x4500, 0), 3),
        ];
        let mut wanted = 0;
        for r in &log {
            wanted += 1;
            if scan.push(r) == Scan::Enough {
                break;
            }
        }
        assert_eq!(wanted, 6, "two own records before the start end the scan");
        let (ledger, end) = scan.finish();
        assert_eq!(end, ScanEnd::Complete);
        assert!(ledger.contains(&pos(0x6000, 0x5F00, 0)));
        assert!(ledger.contains(&pos(0x4100, 0x4000, 0)));
        assert!(ledger.contains(&pos(0x4100, 0x4000, 1)));
        assert!(!ledger.contains(&pos(0x7000, 0x7000, 0)), "another source");
        assert_eq!(ledger.len(), 3);
    }

    #[test]
    fn a_record_written_after_the_fork_on_a_lost_branch_is_not_counted() {
        let mut scan = LedgerScan::new(request(0x100, 1, 1000));
        // Timeline 1 ended at 0/5000: a phantom at 0/5100 on timeline 1.
        scan.push(&record("7/walrelay/1", pos(0x5100, 0x5100, 0), 2));
        scan.push(&record("7/walrelay/1", pos(0x4F00, 0x4F00, 0), 1));
        let (ledger, _) = scan.finish();
        assert!(!ledger.contains(&pos(0x5100, 0x5100, 0)));
        assert!(ledger.contains(&pos(0x4F00, 0x4F00, 0)));
    }

    #[test]
    fn a_scan_that_reads_its_lookback_first_says_so() {
        let mut scan = LedgerScan::new(request(0x100, 5, 3));
        for offset in 0..3 {
            if scan.push(&record("9/other/1", pos(1, 1, 0), offset)) == Scan::Enough {
                break;
            }
        }
        assert_eq!(scan.read(), 3);
        assert_eq!(scan.finish().1, ScanEnd::LookbackExceeded);
    }

    #[test]
    fn a_hidden_tail_counts_as_replayed_only_when_every_hidden_record_is_an_own_event_from_the_start_on()
     {
        let own_new = record("7/walrelay/2", pos(0x6000, 0x5F00, 0), 9);
        let own_old = record("7/walrelay/2", pos(0x3000, 0x3000, 0), 8);
        let other = record("9/other/1", pos(0x7000, 0x7000, 0), 7);
        let case = |hidden: &[TailRecord], is_hidden: bool| {
            let mut scan = LedgerScan::new(request(0x4000, 2, 1000));
            if is_hidden {
                scan.hidden_by_open_transaction();
            }
            scan.hidden_records(hidden);
            scan.hides_only_replayed(Lsn(0x4000))
        };
        assert!(case(std::slice::from_ref(&own_new), true));
        assert!(!case(&[], true), "nothing read: nothing known");
        let mut scan = LedgerScan::new(request(0x4000, 2, 1000));
        scan.hidden_by_open_transaction();
        scan.hidden_records(std::slice::from_ref(&own_new));
        assert!(
            !scan.hides_only_replayed(Lsn(0x6001)),
            "the session's first event came later: the start read may be stale"
        );
        assert!(
            !case(&[own_new.clone(), own_old], true),
            "an event before the start may be confirmed"
        );
        assert!(
            !case(&[own_new.clone(), other], true),
            "another source's record: what became of it is not known"
        );
        assert!(!case(&[own_new], false), "nothing hidden");
    }

    #[test]
    fn a_scan_says_when_it_cannot_be_sure() {
        let own = |c: u64, offset| record("7/walrelay/2", pos(c, c, 0), offset);
        // Reached the first record of a trimmed log before the margin.
        let mut trimmed = LedgerScan::new(request(0x4000, 2, 1000));
        trimmed.push(&own(0x4100, 101));
        trimmed.reached_log_start(100);
        assert_eq!(trimmed.finish().1, ScanEnd::Truncated);
        // The same at offset 0 is the whole log.
        let mut whole = LedgerScan::new(request(0x4000, 2, 1000));
        whole.push(&own(0x4100, 1));
        whole.reached_log_start(0);
        assert_eq!(whole.finish().1, ScanEnd::Complete);
        // An open transaction of another producer hid the rest.
        let mut hidden = LedgerScan::new(request(0x4000, 2, 1000));
        hidden.hidden_by_open_transaction();
        assert_eq!(hidden.finish().1, ScanEnd::Hidden);
        // Own records out of order by as many as the margin.
        let mut disordered = LedgerScan::new(request(0x4000, 4, 1000));
        for (i, c) in [0x5000, 0x4900, 0x4800, 0x5100, 0x3000].iter().enumerate() {
            disordered.push(&own(*c, 10 - i as i64));
        }
        assert_eq!(disordered.finish().1, ScanEnd::Disordered);
        assert_eq!(ScanEnd::Disordered.reason(), Some("disorder"));
        assert_eq!(ScanEnd::Complete.reason(), None);
    }

    #[derive(Debug, Clone)]
    enum Entry {
        Own(u64, u64, u16, u32),
        Other(u64),
        Garbage,
    }

    fn entry() -> impl Strategy<Value = Entry> {
        prop_oneof![
            4 => (1u64..200, 0u64..200, 0u16..3, 1u32..4).prop_map(|(c, d, r, t)| Entry::Own(c, d, r, t)),
            1 => (1u64..200).prop_map(Entry::Other),
            1 => Just(Entry::Garbage),
        ]
    }

    proptest! {
        /// Whatever the tail holds (own records in any order, other
        /// sources, records of forgotten branches, garbage) and wherever
        /// the scan stops, the ledger never claims a position that is not
        /// in the log as an own record on the current history.
        #[test]
        fn the_ledger_never_skips_an_event_that_is_not_in_the_log(
            log in proptest::collection::vec(entry(), 0..80),
            start in 0u64..200,
            margin in 0usize..10,
            lookback in 1usize..100,
            fork1 in 0u64..200,
            fork2 in 0u64..200,
        ) {
            let history = TimelineHistory::parse(3, &format!("1\t0/{fork1:X}\tx\n2\t0/{fork2:X}\tx\n"));
            let req = ScanRequest {
                origin: Origin::parse("7/walrelay/3").unwrap(),
                history: history.clone(),
                start: Lsn(start),
                margin,
                lookback,
            };
            let mut in_log = HashSet::new();
            let records: Vec<TailRecord> = log.iter().enumerate().map(|(i, e)| match e {
                Entry::Own(c, d, r, t) => {
                    let p = pos(*c, *d, *r);
                    if history.contains(*t, p.commit) {
                        in_log.insert(p);
                    }
                    record(&format!("7/walrelay/{t}"), p, i as i64)
                }
                Entry::Other(c) => record("8/walrelay/3", pos(*c, *c, 0), i as i64),
                Entry::Garbage => TailRecord { offset: i as i64, origin: Some("7/walrelay/3".into()), position: Some("nonsense".into()) },
            }).collect();
            let mut scan = LedgerScan::new(req);
            for r in records.iter().rev() {
                if scan.push(r) == Scan::Enough {
                    break;
                }
            }
            let (ledger, _) = scan.finish();
            for p in &ledger.present {
                prop_assert!(in_log.contains(p), "{p} skipped but not in the log");
                prop_assert!(p.commit >= Lsn(start));
            }
        }

        /// With own records in position order and a complete scan, every
        /// own record from the start on is in the ledger: no duplicate.
        #[test]
        fn an_ordered_log_scanned_to_completion_yields_every_own_record_from_the_start(
            commits in proptest::collection::vec(1u64..1000, 1..60),
            start in 0u64..1000,
        ) {
            let mut commits = commits;
            commits.sort();
            let req = ScanRequest {
                origin: Origin::parse("7/walrelay/1").unwrap(),
                history: TimelineHistory::new(1),
                start: Lsn(start),
                margin: 1,
                lookback: 10_000,
            };
            let records: Vec<TailRecord> = commits.iter().enumerate()
                .map(|(i, c)| record("7/walrelay/1", pos(*c, *c, i as u16), i as i64))
                .collect();
            let mut scan = LedgerScan::new(req);
            for r in records.iter().rev() {
                if scan.push(r) == Scan::Enough {
                    break;
                }
            }
            let (ledger, end) = scan.finish();
            prop_assert_eq!(end, ScanEnd::Complete);
            for (i, c) in commits.iter().enumerate() {
                if *c >= start {
                    prop_assert!(ledger.contains(&pos(*c, *c, i as u16)));
                }
            }
        }
    }
}
