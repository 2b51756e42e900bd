//! Latencies and durations as the dashboard shows them: a window of recent
//! values, a histogram for quantiles, and per-second means and maxima.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{lock, unix_ms};

/// Durations of something done several times a second (the polling
/// source's claims), as the mean and the longest since the last `take`.
#[derive(Debug, Default)]
pub struct IntervalTimer {
    /// Sum (µs), count, longest (µs).
    acc: Mutex<(u64, u32, u64)>,
}

impl IntervalTimer {
    pub fn record(&self, took: Duration) {
        let micros = took.as_micros().min(u128::from(u64::MAX)) as u64;
        let mut acc = lock(&self.acc);
        acc.0 = acc.0.saturating_add(micros);
        acc.1 = acc.1.saturating_add(1);
        acc.2 = acc.2.max(micros);
    }

    /// Mean and longest in milliseconds (NaN when nothing happened), and a
    /// fresh start.
    pub fn take(&self) -> (f32, f32) {
        let (sum, count, max) = std::mem::take(&mut *lock(&self.acc));
        if count == 0 {
            return (f32::NAN, f32::NAN);
        }
        (
            (sum as f64 / f64::from(count) / 1000.0) as f32,
            (max as f64 / 1000.0) as f32,
        )
    }
}

/// Percentiles of the latencies settled in one interval.
#[derive(Clone, Copy, Debug)]
pub struct IntervalLatency {
    pub count: u64,
    pub p50_ms: f32,
    pub p99_ms: f32,
}

/// Recent commit-to-ack latencies: the last minute's (at most the last
/// [`LatencyWindow::CAPACITY`] events) for the dashboard's cards, and those
/// since the last sample for its chart.
#[derive(Debug)]
pub struct LatencyWindow {
    /// (Unix ms when settled, seconds).
    recent: Mutex<VecDeque<(u64, f32)>>,
    interval: LatencyHistogram,
}

impl Default for LatencyWindow {
    fn default() -> Self {
        LatencyWindow {
            recent: Mutex::new(VecDeque::with_capacity(Self::CAPACITY)),
            interval: LatencyHistogram::default(),
        }
    }
}

impl LatencyWindow {
    pub const CAPACITY: usize = 4096;

    /// How far back the cards' percentiles look.
    pub const RECENT: Duration = Duration::from_secs(60);

    pub fn record(&self, seconds: f64) {
        self.interval.record(seconds);
        let mut recent = lock(&self.recent);
        if recent.len() == Self::CAPACITY {
            recent.pop_front();
        }
        recent.push_back((unix_ms(), seconds as f32));
    }

    /// The q-quantile (0..=1) of the last minute's latencies, in seconds.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let since = unix_ms().saturating_sub(Self::RECENT.as_millis() as u64);
        let recent = lock(&self.recent);
        let mut sorted: Vec<f32> = recent
            .iter()
            .filter(|(at, _)| *at >= since)
            .map(|(_, s)| *s)
            .collect();
        drop(recent);
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(|a, b| a.total_cmp(b));
        let index = ((sorted.len() - 1) as f64 * q).round() as usize;
        Some(f64::from(sorted[index]))
    }

    /// The latencies recorded since the last call, and a fresh start.
    pub fn take_interval(&self) -> IntervalLatency {
        let counts = self.interval.drain();
        let ms =
            |q| LatencyHistogram::quantile_of(&counts, q).map_or(f32::NAN, |s| (s * 1000.0) as f32);
        IntervalLatency {
            count: counts.iter().sum(),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
        }
    }

    pub(super) fn heap_bytes(&self) -> usize {
        lock(&self.recent).capacity() * std::mem::size_of::<(u64, f32)>()
            + self.interval.heap_bytes()
    }
}

/// Commit-to-ack latencies over the whole run, in log-linear buckets (16
/// per power of two, so any quantile is within about 6%), for benchmarks
/// and the dashboard. Lock-free; fixed size.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    max_micros: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: (0..Self::BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            max_micros: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    const SUB: u64 = 16;
    const BUCKETS: usize = 64 * 16;

    pub(super) fn index(micros: u64) -> usize {
        if micros < Self::SUB {
            return micros as usize;
        }
        let power = 63 - u64::from(micros.leading_zeros());
        let shift = power - 4;
        let mantissa = (micros >> shift) & (Self::SUB - 1);
        ((power - 3) * Self::SUB + mantissa) as usize
    }

    /// The smallest value of a bucket.
    pub(super) fn lower_bound(index: usize) -> u64 {
        let index = index as u64;
        if index < Self::SUB {
            return index;
        }
        let power = index / Self::SUB + 3;
        let mantissa = index % Self::SUB;
        (Self::SUB + mantissa) << (power - 4)
    }

    pub fn record(&self, seconds: f64) {
        let micros = (seconds * 1e6).max(0.0) as u64;
        self.buckets[Self::index(micros).min(Self::BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.max_micros.fetch_max(micros, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn max_seconds(&self) -> f64 {
        self.max_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// The q-quantile (0..=1) in seconds, `None` before the first value.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        Self::quantile_of(&counts, q).map(|v| v.min(self.max_seconds()))
    }

    /// The bucket counts, each reset to zero as it is read (so nothing
    /// recorded meanwhile is lost or counted twice).
    pub fn drain(&self) -> Vec<u64> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.swap(0, Ordering::Relaxed))
            .collect();
        self.count.store(0, Ordering::Relaxed);
        self.max_micros.store(0, Ordering::Relaxed);
        counts
    }

    /// The q-quantile in seconds of bucket `counts` (a bucket's midpoint).
    pub fn quantile_of(counts: &[u64], q: f64) -> Option<f64> {
        let count: u64 = counts.iter().sum();
        if count == 0 {
            return None;
        }
        let rank = ((count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, bucket) in counts.iter().enumerate() {
            seen += bucket;
            if seen >= rank {
                let low = Self::lower_bound(i);
                let high = Self::lower_bound(i + 1).max(low + 1);
                return Some((low + high) as f64 / 2.0 / 1e6);
            }
        }
        None
    }

    pub(super) fn heap_bytes(&self) -> usize {
        self.buckets.len() * std::mem::size_of::<AtomicU64>()
    }
}
