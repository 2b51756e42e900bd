//! The live state's tests.
use super::*;

#[test]
fn histogram_quantiles_are_within_a_few_percent() {
    let h = LatencyHistogram::default();
    for ms in 1..=1000 {
        h.record(ms as f64 / 1000.0);
    }
    let p50 = h.quantile(0.5).unwrap();
    let p99 = h.quantile(0.99).unwrap();
    assert!((p50 - 0.5).abs() / 0.5 < 0.07, "p50 {p50}");
    assert!((p99 - 0.99).abs() / 0.99 < 0.07, "p99 {p99}");
    assert_eq!(h.count(), 1000);
    assert_eq!(h.max_seconds(), 1.0);
    assert_eq!(LatencyHistogram::default().quantile(0.5), None);
}

#[test]
fn interval_latency_counts_only_what_was_recorded_since_the_last_take() {
    let w = LatencyWindow::default();
    for ms in 1..=100 {
        w.record(ms as f64 / 1000.0);
    }
    let first = w.take_interval();
    assert_eq!(first.count, 100);
    assert!((first.p99_ms - 99.0).abs() < 7.0, "{first:?}");
    w.record(0.5);
    let second = w.take_interval();
    assert_eq!(second.count, 1);
    assert!((second.p50_ms - 500.0).abs() < 35.0, "{second:?}");
    assert!(w.take_interval().p50_ms.is_nan(), "nothing since");
    assert!(
        w.quantile(0.5).is_some(),
        "the cards still see the last minute"
    );
}

#[test]
fn the_state_follows_the_setters_and_each_change_is_marked() {
    let live = LiveState::new();
    assert_eq!(live.state(), State::Starting);
    live.set_connected(true);
    assert_eq!(live.state(), State::Active);
    live.set_waiting_for_broker(true);
    assert_eq!(live.state(), State::WaitingForBroker);
    live.set_waiting_for_broker(false);
    live.set_connected(false);
    assert_eq!(live.state(), State::Reconnecting);
    live.set_role(Role::Standby);
    assert_eq!(live.state(), State::Standby);
    let states: Vec<State> = live.history.transitions().iter().map(|t| t.state).collect();
    assert_eq!(
        states,
        [
            State::Active,
            State::WaitingForBroker,
            State::Active,
            State::Reconnecting,
            State::Standby
        ]
    );
}

#[test]
fn an_error_is_past_once_the_relay_reconnects_or_acknowledges_while_connected() {
    let live = LiveState::new();
    live.set_connected(true);
    live.set_connected(false);
    live.set_last_error("replication: connection reset");
    live.record_ack(); // draining while disconnected proves nothing
    assert!(live.errors()[0].holds());
    live.set_connected(true);
    assert_eq!(live.errors()[0].resolved_by, Some(Recovery::Reconnected));
    live.set_last_error("Kafka: UnknownTopicOrPartition");
    assert!(live.errors()[0].holds(), "reported while connected");
    live.record_ack();
    assert_eq!(live.errors()[0].resolved_by, Some(Recovery::Acknowledged));
    assert_eq!(
        live.last_error().as_deref(),
        Some("Kafka: UnknownTopicOrPartition")
    );
}

#[test]
fn waiting_for_the_broker_is_an_error_until_it_answers() {
    let live = LiveState::new();
    live.set_connected(true);
    live.set_waiting_for_broker(true);
    live.set_waiting_for_broker(true);
    let errors = live.errors();
    assert_eq!(errors.len(), 1, "reported once: {errors:?}");
    assert!(errors[0].holds());
    assert!(errors[0].message.contains("--broker-stall-timeout"));
    live.set_waiting_for_broker(false);
    assert_eq!(live.errors()[0].resolved_by, Some(Recovery::BrokerAnswered));
}

#[test]
fn a_sample_counts_the_interval_not_the_total() {
    let live = LiveState::new();
    live.counters.events_delivered.store(10, Ordering::Relaxed);
    live.record_sample();
    live.counters.events_delivered.store(25, Ordering::Relaxed);
    live.record_claim(Duration::from_millis(4));
    live.record_claim(Duration::from_millis(8));
    live.record_sample();
    let samples = live.history.samples();
    assert_eq!(samples[0].published, 10);
    assert_eq!(samples[1].published, 15);
    assert_eq!((samples[1].claim_ms, samples[1].claim_max_ms), (6.0, 8.0));
    assert!(samples[1].lag_bytes.is_nan(), "no slot reading");
}

#[test]
fn histogram_buckets_are_ordered_and_cover_their_values() {
    for micros in [0u64, 1, 15, 16, 17, 100, 1000, 123_456, 10_000_000] {
        let i = LatencyHistogram::index(micros);
        assert!(LatencyHistogram::lower_bound(i) <= micros, "{micros}");
        assert!(LatencyHistogram::lower_bound(i + 1) > micros, "{micros}");
    }
}
