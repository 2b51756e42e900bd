//! The dashboard's history: one [`Sample`] a second for the last hour, in a
//! ring allocated once at start, so a reload or a second viewer sees the
//! same hour at once and the process's memory does not grow with uptime.
//!
//! # What it costs
//!
//! A sample is a fixed-size, heap-free struct (104 bytes); the ring holds
//! [`CAPACITY`] of them (366 KiB). The inbox adds one `f32` a second per
//! partition it consumes, for at most [`MAX_PARTITIONS`] partitions
//! (14 KiB each, 450 KiB at most); the others count in the total lag only.
//! State changes keep their last [`MAX_TRANSITIONS`] (16 bytes each).
//! [`History::heap_bytes`] adds these up from the capacities actually
//! allocated, and `tests/history_memory.rs` checks the figure against a
//! counting allocator. With the errors and the latency windows of
//! [`super::LiveState`], measured there: about 475 KiB for the WAL relay or the
//! polling source after an hour, 929 KiB for an inbox charting 32
//! partitions.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use super::Source;
use super::sample::{Sample, State, Transition, columns};

/// Samples kept: one hour at one a second.
pub const CAPACITY: usize = 3600;

/// How often a sample is taken.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Partitions of the inbox with a lag series of their own.
pub const MAX_PARTITIONS: usize = 32;

/// State changes kept (a relay flapping every second still shows its
/// last minutes of changes, and every sample keeps its state).
pub const MAX_TRANSITIONS: usize = 512;

/// A partition's lag, one value per sample, aligned with the samples.
#[derive(Debug)]
struct PartitionSeries {
    lag: VecDeque<f32>,
    /// Values in `lag` that are not NaN: the series is dropped at zero.
    readings: usize,
}

#[derive(Debug)]
struct Ring {
    samples: VecDeque<Sample>,
    partitions: BTreeMap<String, PartitionSeries>,
    /// Partitions in the last sample beyond [`MAX_PARTITIONS`].
    partitions_omitted: usize,
    transitions: VecDeque<Transition>,
}

/// The ring of samples, the inbox's partition series and the state
/// changes. Written by the sampler once a second and by the state setters;
/// read by the HTTP handler.
#[derive(Debug)]
pub struct History {
    ring: Mutex<Ring>,
}

impl Default for History {
    fn default() -> Self {
        History {
            ring: Mutex::new(Ring {
                samples: VecDeque::with_capacity(CAPACITY),
                partitions: BTreeMap::new(),
                partitions_omitted: 0,
                transitions: VecDeque::with_capacity(MAX_TRANSITIONS),
            }),
        }
    }
}

impl History {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a sample, with the lag of each partition at that moment
    /// (`None`: not known yet); the oldest falls out when the ring is full.
    pub fn push(&self, sample: Sample, partitions: &[(String, Option<i64>)]) {
        let mut ring = self.lock();
        let ring = &mut *ring;
        if ring.samples.len() == CAPACITY {
            ring.samples.pop_front();
            ring.partitions.retain(|_, series| {
                if series.lag.pop_front().is_some_and(|v| !v.is_nan()) {
                    series.readings -= 1;
                }
                series.readings > 0
            });
        }
        let before = ring.samples.len();
        ring.samples.push_back(sample);
        ring.partitions_omitted = 0;
        for (name, lag) in partitions {
            if !ring.partitions.contains_key(name) {
                if ring.partitions.len() >= MAX_PARTITIONS {
                    ring.partitions_omitted += 1;
                    continue;
                }
                let mut lag = VecDeque::with_capacity(CAPACITY);
                lag.resize(before, f32::NAN);
                ring.partitions
                    .insert(name.clone(), PartitionSeries { lag, readings: 0 });
            }
            let series = ring.partitions.get_mut(name).expect("inserted above");
            if series.lag.len() == before {
                let value = lag.map_or(f32::NAN, |v| v as f32);
                series.readings += usize::from(!value.is_nan());
                series.lag.push_back(value);
            }
        }
        // Partitions not reported this time (revoked) get a gap.
        for series in ring.partitions.values_mut() {
            if series.lag.len() == before {
                series.lag.push_back(f32::NAN);
            }
        }
    }

    /// Records a change of state, unless it is the state already recorded.
    pub fn note_state(&self, unix_ms: u64, state: State) {
        let mut ring = self.lock();
        if ring.transitions.back().map(|t| t.state) == Some(state) {
            return;
        }
        if ring.transitions.len() == MAX_TRANSITIONS {
            ring.transitions.pop_front();
        }
        ring.transitions.push_back(Transition { unix_ms, state });
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.lock().samples.iter().copied().collect()
    }

    pub fn transitions(&self) -> Vec<Transition> {
        self.lock().transitions.iter().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Heap bytes the history holds, from the capacities allocated.
    pub fn heap_bytes(&self) -> usize {
        let ring = self.lock();
        let samples = ring.samples.capacity() * std::mem::size_of::<Sample>();
        let transitions = ring.transitions.capacity() * std::mem::size_of::<Transition>();
        // A B-tree leaf holds up to 11 entries; count one per entry's
        // share, which is what the allocator sees for small maps.
        let entry = std::mem::size_of::<String>() + std::mem::size_of::<PartitionSeries>();
        let partitions: usize = ring
            .partitions
            .iter()
            .map(|(name, s)| {
                name.capacity() + s.lag.capacity() * std::mem::size_of::<f32>() + entry * 11 / 10
            })
            .sum();
        samples + transitions + partitions
    }

    /// The history as the dashboard reads it: one array per column (`t`
    /// in Unix milliseconds, then the source's columns), samples taken
    /// after `since_ms` only, the state changes after it, and the lag of
    /// each partition (the inbox).
    pub fn to_json(&self, source: Source, since_ms: u64) -> String {
        let ring = self.lock();
        let start = ring.samples.partition_point(|s| s.unix_ms <= since_ms);
        let rows = ring.samples.range(start..);
        let mut out = String::with_capacity(64 + (ring.samples.len() - start) * 128);
        out.push_str("{\"interval_ms\":");
        let _ = write!(out, "{}", INTERVAL.as_millis());
        let _ = write!(out, ",\"capacity\":{CAPACITY},\"states\":[");
        for (i, state) in State::ALL.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "\"{}\"", state.as_str());
        }
        out.push_str("],\"columns\":{\"t\":");
        write_array(&mut out, rows.clone().map(|s| s.unix_ms as f64));
        out.push_str(",\"state\":");
        write_array(&mut out, rows.clone().map(|s| s.state as u8 as f64));
        for column in columns(source) {
            let _ = write!(out, ",\"{}\":", column.name);
            write_array(&mut out, rows.clone().map(column.value));
        }
        out.push_str("},\"partitions\":{");
        for (i, (name, series)) in ring.partitions.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&serde_json::to_string(name).unwrap_or_default());
            out.push(':');
            write_array(&mut out, series.lag.range(start..).map(|&v| f64::from(v)));
        }
        let _ = write!(
            out,
            "}},\"partitions_omitted\":{},\"transitions\":",
            ring.partitions_omitted
        );
        let transitions: Vec<&Transition> = ring
            .transitions
            .iter()
            .filter(|t| t.unix_ms > since_ms)
            .collect();
        out.push_str(&serde_json::to_string(&transitions).unwrap_or_default());
        out.push('}');
        out
    }
}

/// `[1,2.5,null]`: NaN is `null`; integers print without a fraction.
fn write_array(out: &mut String, values: impl Iterator<Item = f64>) {
    out.push('[');
    for (i, v) in values.enumerate() {
        if i > 0 {
            out.push(',');
        }
        if v.is_nan() || v.is_infinite() {
            out.push_str("null");
        } else if v.fract() == 0.0 && v.abs() < 1e15 {
            let _ = write!(out, "{}", v as i64);
        } else {
            // Three decimals are more than a chart can show.
            let _ = write!(out, "{}", (v * 1000.0).round() / 1000.0);
        }
    }
    out.push(']');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(unix_ms: u64) -> Sample {
        Sample {
            unix_ms,
            state: State::Active,
            lag_bytes: unix_ms as f64,
            ..Sample::default()
        }
    }

    #[test]
    fn the_ring_keeps_the_last_hour_and_never_grows_past_it() {
        assert_eq!(
            std::mem::size_of::<Sample>(),
            104,
            "the figure in the module's docs"
        );
        let history = History::default();
        let bytes = history.heap_bytes();
        for i in 0..(CAPACITY as u64 + 10) {
            history.push(sample(i * 1000), &[]);
        }
        let samples = history.samples();
        assert_eq!(samples.len(), CAPACITY);
        assert_eq!(samples[0].unix_ms, 10_000, "the oldest ten fell out");
        assert_eq!(history.heap_bytes(), bytes, "allocated once, at start");
    }

    #[test]
    fn json_has_one_array_per_column_and_only_samples_after_since() {
        let history = History::default();
        for i in 1..=5 {
            history.push(sample(i * 1000), &[]);
        }
        history.note_state(1500, State::Active);
        history.note_state(3500, State::Reconnecting);
        let v: serde_json::Value =
            serde_json::from_str(&history.to_json(Source::Wal, 3000)).unwrap();
        assert_eq!(v["columns"]["t"], serde_json::json!([4000, 5000]));
        assert_eq!(v["columns"]["lag_bytes"], serde_json::json!([4000, 5000]));
        assert_eq!(
            v["columns"]["retained_wal_bytes"],
            serde_json::json!([null, null])
        );
        assert_eq!(v["columns"]["state"], serde_json::json!([1, 1]));
        assert_eq!(v["states"][1], "active");
        assert_eq!(
            v["transitions"],
            serde_json::json!([{"unix_ms": 3500, "state": "reconnecting"}])
        );
        let inbox: serde_json::Value =
            serde_json::from_str(&history.to_json(Source::Inbox, 0)).unwrap();
        assert!(inbox["columns"]["stored"].is_array());
        assert!(inbox["columns"].get("lag_bytes").is_none());
    }

    #[test]
    fn a_state_change_is_recorded_once() {
        let history = History::default();
        history.note_state(1, State::Starting);
        history.note_state(2, State::Starting);
        history.note_state(3, State::Active);
        assert_eq!(history.transitions().len(), 2);
    }

    #[test]
    fn partition_series_stay_aligned_and_are_capped() {
        let history = History::default();
        history.push(sample(1000), &[("t/0".into(), Some(3))]);
        history.push(
            sample(2000),
            &[("t/0".into(), Some(2)), ("t/1".into(), None)],
        );
        history.push(sample(3000), &[("t/1".into(), Some(7))]);
        let v: serde_json::Value =
            serde_json::from_str(&history.to_json(Source::Inbox, 0)).unwrap();
        assert_eq!(v["partitions"]["t/0"], serde_json::json!([3, 2, null]));
        assert_eq!(v["partitions"]["t/1"], serde_json::json!([null, null, 7]));
        let many: Vec<(String, Option<i64>)> = (0..MAX_PARTITIONS + 3)
            .map(|p| (format!("t/{p}"), Some(1)))
            .collect();
        history.push(sample(4000), &many);
        let v: serde_json::Value =
            serde_json::from_str(&history.to_json(Source::Inbox, 0)).unwrap();
        assert_eq!(v["partitions"].as_object().unwrap().len(), MAX_PARTITIONS);
        assert_eq!(v["partitions_omitted"], 3);
    }

    #[test]
    fn a_partition_gone_for_an_hour_is_dropped() {
        let history = History::default();
        history.push(sample(0), &[("t/0".into(), Some(1))]);
        for i in 1..=CAPACITY as u64 {
            history.push(sample(i * 1000), &[]);
        }
        let v: serde_json::Value =
            serde_json::from_str(&history.to_json(Source::Inbox, 0)).unwrap();
        assert!(
            v["partitions"].as_object().unwrap().is_empty(),
            "{}",
            v["partitions"]
        );
    }
}
