//! What the dashboard's hour of history costs in memory, measured: a
//! counting allocator sees every byte the live state asks for while it is
//! filled as a busy process fills it in an hour (and more), and the total
//! must match what `/api/status` reports (`history.heap_bytes`) and stay
//! under the bound docs/metrics.md states.
//!
//! Run with `--nocapture` to see the figures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use walrelay::live::{CAPACITY, LiveState, MAX_PARTITIONS, Sample, Source, State};

/// Counts the bytes allocated and not yet freed (the sizes asked for; the
/// allocator's own bookkeeping is not included).
struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::SeqCst);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::SeqCst);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as isize - layout.size() as isize, Ordering::SeqCst);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocated() -> isize {
    LIVE_BYTES.load(Ordering::SeqCst)
}

/// Fills `live` as an hour and a bit of a busy process would: a sample a
/// second with every reading, `partitions` partitions, a state change every
/// few seconds, long errors, and more latencies than the window keeps.
fn fill(live: &LiveState, partitions: usize) {
    let names: Vec<(String, Option<i64>)> = (0..partitions)
        .map(|p| (format!("outbox.event.order/{p}"), Some(p as i64)))
        .collect();
    for i in 0..(CAPACITY as u64 + 600) {
        live.history.push(
            Sample {
                unix_ms: 1_700_000_000_000 + i * 1000,
                state: State::Active,
                lag_bytes: 1.0,
                retained_wal_bytes: 2.0,
                safe_wal_bytes: 3.0,
                published: 100,
                in_flight_bytes: 4.0,
                p50_ms: 1.0,
                p99_ms: 2.0,
                pending_rows: 5.0,
                consumer_lag: 6.0,
                ..Sample::default()
            },
            &names,
        );
        if i % 3 == 0 {
            let state = if i % 2 == 0 {
                State::Reconnecting
            } else {
                State::Active
            };
            live.history.note_state(i, state);
        }
    }
    for i in 0..40 {
        live.set_last_error(&format!("{i}: {}", "x".repeat(4000)));
    }
    for i in 0..10_000 {
        live.latency.record(i as f64 / 1e4);
    }
}

fn measure(source: Source, partitions: usize) -> (isize, isize, usize) {
    let before = allocated();
    let live = Box::new(LiveState::with_source(source));
    let at_start = allocated() - before - std::mem::size_of::<LiveState>() as isize;
    fill(&live, partitions);
    // The sampler drains the interval histogram; nothing else grows.
    let full = allocated() - before - std::mem::size_of::<LiveState>() as isize;
    let reported = live.heap_bytes();
    drop(live);
    (at_start, full, reported)
}

#[test]
fn an_hour_of_history_costs_under_half_a_mebibyte_and_a_mebibyte_with_every_partition_series() {
    let (wal_start, wal_full, wal_reported) = measure(Source::Wal, 0);
    let (inbox_start, inbox_full, inbox_reported) = measure(Source::Inbox, MAX_PARTITIONS + 8);
    println!(
        "WAL relay: {wal_start} bytes at start, {wal_full} bytes full ({:.0} KiB), reported {wal_reported}",
        wal_full as f64 / 1024.0
    );
    println!(
        "inbox with {} partitions charted: {inbox_start} bytes at start, {inbox_full} bytes full ({:.0} KiB), reported {inbox_reported}",
        MAX_PARTITIONS,
        inbox_full as f64 / 1024.0
    );
    let json = {
        let live = LiveState::with_source(Source::Wal);
        fill(&live, 0);
        live.history.to_json(Source::Wal, 0).len()
    };
    println!(
        "a full hour as JSON (the WAL dashboard's first load): {json} bytes ({:.0} KiB)",
        json as f64 / 1024.0
    );
    // The ring and the latency window are allocated once: a full hour
    // costs what the start did, but for the errors' text (10 of 2 KiB).
    assert!(
        wal_full - wal_start < 24 * 1024,
        "grew from {wal_start} to {wal_full}"
    );
    assert!(wal_full < 512 * 1024, "{wal_full} bytes");
    assert!(inbox_full < 1024 * 1024, "{inbox_full} bytes");
    // What /api/status reports is what the allocator saw, within 5%.
    for (measured, reported) in [(wal_full, wal_reported), (inbox_full, inbox_reported)] {
        let off = (reported as f64 - measured as f64).abs() / measured as f64;
        assert!(off < 0.05, "reported {reported}, measured {measured}");
    }
}
