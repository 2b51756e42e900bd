//! The in-flight window: how many events, and how many bytes of them, are
//! handed to the sink and not yet settled (acknowledged, skipped or given
//! up). While it is full the relay stops reading WAL; it never stops
//! answering the server, so `wal_sender_timeout` does not fire.

use crate::metrics as m;

#[derive(Debug)]
pub struct InFlightWindow {
    events: usize,
    bytes: usize,
    max_events: usize,
    max_bytes: usize,
    /// Whether the window was full at the last check, to count fillings once.
    was_full: bool,
    /// The gauges it sets on every change, looked up once.
    events_gauge: metrics::Gauge,
    bytes_gauge: metrics::Gauge,
}

impl InFlightWindow {
    pub fn new(max_events: usize, max_bytes: usize) -> Self {
        InFlightWindow {
            events: 0,
            bytes: 0,
            max_events,
            max_bytes,
            was_full: false,
            events_gauge: metrics::gauge!(m::EVENTS_IN_FLIGHT),
            bytes_gauge: metrics::gauge!(m::IN_FLIGHT_BYTES),
        }
    }

    /// Whether another event may be read. Counts each time the window fills.
    pub fn has_room(&mut self) -> bool {
        let full = self.events >= self.max_events || self.bytes >= self.max_bytes;
        if full && !self.was_full {
            metrics::counter!(m::WINDOW_FULL_TOTAL).increment(1);
        }
        self.was_full = full;
        !full
    }

    /// An event of `bytes` enters the window.
    pub fn admit(&mut self, bytes: usize) {
        self.events += 1;
        self.bytes += bytes;
        self.export();
    }

    pub fn release(&mut self, bytes: usize) {
        self.events -= 1;
        self.bytes -= bytes;
        self.export();
    }

    /// Forgets everything in flight (it will be read again).
    pub fn clear(&mut self) {
        self.events = 0;
        self.bytes = 0;
        // Left as it was, the gauge would show events in flight that no
        // longer are (and WalrelayPublishingStalled would page a standby).
        self.export();
    }

    pub fn events(&self) -> usize {
        self.events
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    fn export(&self) {
        self.events_gauge.set(self.events as f64);
        self.bytes_gauge.set(self.bytes as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_full_at_either_limit() {
        let mut w = InFlightWindow::new(2, 100);
        assert!(w.has_room());
        w.admit(10);
        w.admit(10);
        assert!(!w.has_room(), "two events");
        w.release(10);
        assert!(w.has_room());
        w.admit(95);
        assert!(!w.has_room(), "105 bytes");
        w.release(10);
        assert!(w.has_room());
        assert_eq!(w.events(), 1);
        w.release(95);
        assert!(w.is_empty());
        w.admit(7);
        w.clear();
        assert!(w.is_empty());
    }

    #[test]
    fn clearing_the_window_sets_its_gauges_to_zero() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let mut w = InFlightWindow::new(10, 1000);
            w.admit(7);
            w.admit(8);
            w.clear();
        });
        let text = handle.render();
        assert!(text.contains("walrelay_events_in_flight 0\n"), "{text}");
        assert!(text.contains("walrelay_in_flight_bytes 0\n"), "{text}");
    }
}
