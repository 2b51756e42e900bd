//! The scan's rules, and property tests: wherever it stops, nothing that is
//! not in the log is skipped.

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
