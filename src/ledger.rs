//! Exactly once without broker transactions: the log is the ledger.
//!
//! Every record carries its **position** (`walrelay_position`): the commit
//! LSN of its transaction, the LSN of its own change, and its rank among
//! changes sharing that LSN (the rows of one multi-row INSERT). A replay
//! from the slot's confirmed LSN yields the same changes with the same
//! positions: they come from the WAL, not from walrelay's configuration or
//! the publication. Every record also carries its **origin**
//! (`walrelay_origin`: system identifier, slot and timeline).
//!
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

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::str::FromStr;

use crate::lsn::Lsn;

/// Header carrying a record's position.
pub const POSITION_HEADER: &str = "walrelay_position";
/// Header carrying a record's origin.
pub const ORIGIN_HEADER: &str = "walrelay_origin";

/// Where an event comes from in the WAL. Orders as the stream does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// The commit record of the event's transaction.
    pub commit: Lsn,
    /// The event's own change.
    pub change: Lsn,
    /// Its rank among the transaction's changes at the same LSN.
    pub rank: u16,
}

impl fmt::Display for Position {
    /// Fixed width, so the text sorts as the position compares.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:016X}/{:016X}/{:04X}",
            self.commit.0, self.change.0, self.rank
        )
    }
}

impl FromStr for Position {
    type Err = ();

    fn from_str(text: &str) -> Result<Self, ()> {
        let mut parts = text.split('/');
        let mut hex64 = || {
            let part = parts.next().ok_or(())?;
            (part.len() == 16)
                .then(|| u64::from_str_radix(part, 16).map_err(|_| ()))
                .ok_or(())?
        };
        let commit = Lsn(hex64()?);
        let change = Lsn(hex64()?);
        let rank = parts.next().ok_or(())?;
        if rank.len() != 4 || parts.next().is_some() {
            return Err(());
        }
        Ok(Position {
            commit,
            change,
            rank: u16::from_str_radix(rank, 16).map_err(|_| ())?,
        })
    }
}

/// Who wrote a record: a cluster (system identifier), a slot, a timeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub system_id: String,
    pub slot: String,
    pub timeline: u32,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.system_id, self.slot, self.timeline)
    }
}

impl Origin {
    /// Parses `SYSTEM_ID/SLOT/TIMELINE` (slot names never hold a '/').
    pub fn parse(text: &str) -> Option<Origin> {
        let (rest, timeline) = text.rsplit_once('/')?;
        let (system_id, slot) = rest.split_once('/')?;
        Some(Origin {
            system_id: system_id.to_owned(),
            slot: slot.to_owned(),
            timeline: timeline.parse().ok()?,
        })
    }

    /// The same source: cluster and slot, whatever the timeline.
    pub fn same_source(&self, other: &Origin) -> bool {
        self.system_id == other.system_id && self.slot == other.slot
    }
}

/// The current timeline and where each of its ancestors ended
/// (`TIMELINE_HISTORY`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TimelineHistory {
    pub current: u32,
    /// Ancestor timeline -> the LSN at which the history switched away
    /// from it.
    pub switch_points: BTreeMap<u32, Lsn>,
}

impl TimelineHistory {
    pub fn new(current: u32) -> Self {
        TimelineHistory {
            current,
            switch_points: BTreeMap::new(),
        }
    }

    /// Parses a timeline history file: `TLI<TAB>LSN<TAB>reason` lines.
    pub fn parse(current: u32, content: &str) -> TimelineHistory {
        let mut history = TimelineHistory::new(current);
        for line in content.lines() {
            let mut fields = line.split_whitespace();
            if let (Some(tli), Some(lsn)) = (fields.next(), fields.next())
                && let (Ok(tli), Ok(lsn)) = (tli.parse::<u32>(), lsn.parse::<Lsn>())
            {
                history.switch_points.insert(tli, lsn);
            }
        }
        history
    }

    /// Whether a commit at `commit` written on `timeline` is part of the
    /// current history.
    pub fn contains(&self, timeline: u32, commit: Lsn) -> bool {
        if timeline == self.current {
            return true;
        }
        match self.switch_points.get(&timeline) {
            Some(end) => commit < *end,
            None => false,
        }
    }
}

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
}

/// Whether a scan wants the next older record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scan {
    More,
    Enough,
}

/// How a scan ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// It saw `margin` own records from before the start, or the beginning.
    Complete,
    /// It read `lookback` records first: events it did not see are
    /// published, which may duplicate some (never lose any).
    LookbackExceeded,
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
        }
    }

    /// Takes the next older record.
    pub fn push(&mut self, record: &TailRecord) -> Scan {
        self.read += 1;
        if let Some(position) = self.own_position(record) {
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

    /// The ledger, and whether the scan was complete.
    pub fn finish(self) -> (Ledger, ScanEnd) {
        let end =
            if self.read >= self.request.lookback && self.older_seen < self.request.margin.max(1) {
                ScanEnd::LookbackExceeded
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

/// Kafka's murmur2, as the Java client computes it.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of a record: murmur2 of its key as the Java client (and
/// librdkafka's `murmur2_random`) pick it; a record without a key gets one
/// from its position, so a replay lands where the first try did.
pub fn partition_for(key: Option<&[u8]>, position: &Position, partitions: i32) -> i32 {
    let hash = match key {
        Some(key) => murmur2(key),
        None => murmur2(position.to_string().as_bytes()),
    };
    (hash & 0x7fff_ffff) % partitions.max(1)
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

    #[test]
    fn positions_print_fixed_width_sort_as_they_compare_and_parse_back() {
        let a = pos(0x16B3748, 0x16B3700, 0);
        let b = pos(0x16B3748, 0x16B3700, 1);
        let c = pos(0x1_0000_0000, 0x10, 0);
        assert_eq!(a.to_string(), "00000000016B3748/00000000016B3700/0000");
        let mut texts = [c.to_string(), b.to_string(), a.to_string()];
        texts.sort();
        assert_eq!(texts, [a.to_string(), b.to_string(), c.to_string()]);
        assert!(a < b && b < c);
        assert_eq!(a.to_string().parse::<Position>(), Ok(a));
        assert!("16B3748/0/0".parse::<Position>().is_err());
    }

    #[test]
    fn murmur2_matches_the_java_client() {
        // Values computed by Kafka's Utils.murmur2.
        for (key, hash) in [
            ("1", -1993445489),
            ("12", 126087238),
            ("123", -267702483),
            ("1234", -1614185708),
            ("12345", -1188365604),
        ] {
            assert_eq!(murmur2(key.as_bytes()), hash, "{key}");
        }
    }

    #[test]
    fn origins_round_trip_and_compare_by_cluster_and_slot() {
        let o = Origin {
            system_id: "7321".into(),
            slot: "walrelay".into(),
            timeline: 3,
        };
        assert_eq!(o.to_string(), "7321/walrelay/3");
        let back = Origin::parse("7321/walrelay/3").unwrap();
        assert_eq!(back, o);
        assert!(o.same_source(&Origin::parse("7321/walrelay/1").unwrap()));
        assert!(!o.same_source(&Origin::parse("7321/other/3").unwrap()));
        assert_eq!(Origin::parse("junk"), None);
    }

    #[test]
    fn a_record_past_the_fork_of_an_ancestor_timeline_is_not_in_the_history() {
        let h = TimelineHistory::parse(
            3,
            "1\t0/3000000\tno recovery target specified\n2\t0/5000000\tno recovery target specified\n",
        );
        assert!(h.contains(3, Lsn(0x9000000)));
        assert!(h.contains(1, Lsn(0x2FFFFFF)));
        assert!(
            !h.contains(1, Lsn(0x3000000)),
            "written after timeline 1 ended"
        );
        assert!(h.contains(2, Lsn(0x4000000)));
        assert!(!h.contains(2, Lsn(0x5000000)));
        assert!(!h.contains(4, Lsn(0x10)), "not an ancestor");
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
