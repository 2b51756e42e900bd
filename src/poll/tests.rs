//! The polling loop's rules, in-process: an in-memory outbox
//! (`memory.rs`), the in-memory broker and tokio's paused time. The
//! integration tests (`tests/poll.rs`) check the same rules against real
//! servers; these pin down timing and ordering exactly.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::memory::{Call, MemoryOutbox};
use super::work::LANE_WORK_TIMEOUT;
use super::{OnPublished, PollConfig, PollError, PollRelay};
use crate::live::LiveState;
use crate::postgres::ConnectionConfig;
use crate::publish::DeliveryGuarantee;
use crate::publish::memory::MemoryBroker;
use crate::record::KafkaRecord;
use crate::shutdown::{Shutdown, ShutdownTrigger, local_loop};

pub(super) const TOPIC: &str = "outbox.event.order";
pub(super) const DEAD_LETTER_TOPIC: &str = "walrelay.dead-letter";

pub(super) fn config() -> PollConfig {
    PollConfig {
        pg: ConnectionConfig::from_url("postgres://u@localhost/db").unwrap(),
        router: crate::router::test_support::config(),
        batch_size: 100,
        lanes: 1,
        delivery: DeliveryGuarantee::AtLeastOnce,
        exactly_once_lookback: 100_000,
        poll_interval: Duration::from_secs(1),
        on_published: OnPublished::Delete,
        max_attempts: 5,
        max_backoff: Duration::from_secs(30),
        broker_stall_timeout: Duration::from_secs(5),
        shutdown_timeout: Duration::from_secs(10),
        permanent_error_attempts: 3,
        dead_letter_table: ("public".into(), "walrelay_dead_letters".into()),
    }
}

/// A relay running on a local task, with its handles.
struct Harness {
    stop: ShutdownTrigger,
    live: Arc<LiveState>,
    relay: tokio::task::JoinHandle<Result<(), PollError>>,
}

impl Harness {
    /// Stops the relay and checks that it ended without an error.
    async fn finish(self) {
        local_loop::finish(&self.stop, self.relay).await;
    }
}

fn start(config: PollConfig, outbox: &MemoryOutbox, broker: &MemoryBroker) -> Harness {
    let (stop, shutdown) = Shutdown::new();
    let live = Arc::new(LiveState::new());
    let relay = PollRelay::new(config, outbox.clone(), broker.sink(), Arc::clone(&live));
    Harness {
        stop,
        live,
        relay: tokio::task::spawn_local(relay.run(shutdown)),
    }
}

/// Lets the relay run for `d` of (paused, virtual) time.
async fn run_for(d: Duration) {
    tokio::time::sleep(d).await;
}

/// Waits (in virtual time, a minute at most) until `done`.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        run_for(Duration::from_millis(5)).await;
    }
}

pub(super) fn ids(records: &[KafkaRecord]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8(r.header("id").unwrap().to_vec()).unwrap())
        .collect()
}

/// An empty in-memory outbox and broker, as every test starts.
fn fresh() -> (MemoryOutbox, MemoryBroker) {
    (MemoryOutbox::default(), MemoryBroker::default())
}

/// Each settle checks that its rows' records are in the event topic's log.
fn check_settles(outbox: &MemoryOutbox, broker: &MemoryBroker) {
    let broker = broker.clone();
    outbox.check_acked(move |id| ids(&broker.log(TOPIC)).iter().any(|i| i == id));
}

pub(super) fn id(n: usize) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

#[tokio::test(start_paused = true)]
async fn every_row_is_published_once_in_aggregate_order_and_settled_only_after_its_ack() {
    local_loop::run(async {
        let (outbox, broker) = fresh();
        check_settles(&outbox, &broker);
        // Four aggregates, their rows interleaved.
        let mut written = Vec::new();
        for n in 0..24 {
            let aggregate = format!("agg-{}", n % 4);
            outbox.insert(&id(n), &aggregate, "{}");
            written.push((aggregate, id(n)));
        }
        let mut cfg = config();
        cfg.lanes = 2;
        cfg.batch_size = 5;
        broker.pause();
        let h = start(cfg, &outbox, &broker);
        until("records are with the broker", || broker.held() > 0).await;
        run_for(Duration::from_secs(1)).await;
        assert!(
            outbox.settled().is_empty(),
            "nothing acknowledged, nothing settled"
        );
        assert_eq!(outbox.pending(), 24);
        // Acknowledged one at a time: each settle comes after its acks.
        for _ in 0..200 {
            if outbox.pending() == 0 {
                break;
            }
            if broker.held() > 0 {
                broker.release(0);
            }
            run_for(Duration::from_millis(10)).await;
        }
        assert_eq!(outbox.pending(), 0, "every row settled");
        assert_eq!(outbox.settled_unacked(), Vec::<String>::new());
        let log = ids(&broker.log(TOPIC));
        assert_eq!(log.len(), 24, "each row once: {log:?}");
        for aggregate in (0..4).map(|a| format!("agg-{a}")) {
            let expected: Vec<&String> = written
                .iter()
                .filter(|(a, _)| *a == aggregate)
                .map(|(_, id)| id)
                .collect();
            let sent: Vec<&String> = log.iter().filter(|id| expected.contains(id)).collect();
            assert_eq!(sent, expected, "{aggregate} in seq order");
        }
        h.finish().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_paused_broker_settles_nothing_and_the_claim_is_held_until_it_resumes() {
    local_loop::run(async {
        let (outbox, broker) = fresh();
        check_settles(&outbox, &broker);
        broker.pause();
        for n in 0..3 {
            outbox.insert(&id(n), "agg", "{}");
        }
        let h = start(config(), &outbox, &broker);
        // Past the stall timeout (5 s).
        run_for(Duration::from_secs(30)).await;
        assert!(outbox.settled().is_empty());
        assert_eq!(outbox.locked(), 3, "the batch stays claimed");
        assert!(h.live.waiting_for_broker());
        assert_eq!(broker.sent(), 3, "sent once, not claimed again");
        broker.resume();
        until("every row settled", || outbox.pending() == 0).await;
        assert_eq!(ids(&broker.log(TOPIC)), [id(0), id(1), id(2)]);
        assert_eq!(outbox.settled_unacked(), Vec::<String>::new());
        assert!(!h.live.waiting_for_broker());
        assert_eq!(outbox.locked(), 0, "committed");
        h.finish().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn exactly_once_a_takeover_skips_rows_in_doubt_already_in_kafka_and_sends_the_others() {
    local_loop::run(async {
        let (outbox, broker) = fresh();
        let mut cfg = config();
        cfg.delivery = DeliveryGuarantee::ExactlyOnce;
        broker.pause();
        let seqs: Vec<i64> = (0..4).map(|n| outbox.insert(&id(n), "agg", "{}")).collect();
        let first = start(cfg.clone(), &outbox, &broker);
        until("the batch is with the broker", || broker.held() == 4).await;
        assert_eq!(outbox.in_doubt(), seqs, "noted in flight before sent");
        // Two records land; the relay dies with the other two.
        broker.release(0);
        broker.release(0);
        first.relay.abort();
        assert!(first.relay.await.unwrap_err().is_cancelled());
        broker.discard_held();
        assert_eq!(outbox.locked(), 0, "its claim rolled back");
        assert_eq!(outbox.in_doubt(), seqs);
        assert_eq!(ids(&broker.log(TOPIC)), [id(0), id(1)]);
        broker.resume();
        outbox.insert(&id(4), "agg", "{}");
        let sent_before = broker.sent();
        check_settles(&outbox, &broker);
        let h = start(cfg, &outbox, &broker);
        until("every row settled", || outbox.pending() == 0).await;
        assert_eq!(
            ids(&broker.log(TOPIC)),
            [id(0), id(1), id(2), id(3), id(4)],
            "no duplicates, nothing lost, in order"
        );
        assert_eq!(
            broker.sent() - sent_before,
            3,
            "only what was not there is sent"
        );
        assert_eq!(outbox.in_doubt(), Vec::<i64>::new());
        assert_eq!(outbox.settled_unacked(), Vec::<String>::new());
        h.finish().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_claim_that_never_answers_is_abandoned_after_the_lane_timeout_and_the_lane_reconnects() {
    local_loop::run(async {
        let (outbox, broker) = fresh();
        outbox.insert(&id(0), "agg", "{}");
        outbox.hang(Call::Claim);
        let started = Instant::now();
        let h = start(config(), &outbox, &broker);
        until("connected", || outbox.connects() == 1).await;
        run_for(LANE_WORK_TIMEOUT - Duration::from_secs(1)).await;
        assert_eq!(outbox.connects(), 1, "the lane waits out its timeout");
        assert_eq!(broker.sent(), 0);
        // The server answers again, but not the claim under way.
        outbox.answer(Call::Claim);
        until("the lane connected again", || outbox.connects() == 2).await;
        assert!(started.elapsed() >= LANE_WORK_TIMEOUT);
        until("the row settled", || outbox.pending() == 0).await;
        assert_eq!(ids(&broker.log(TOPIC)), [id(0)]);
        h.finish().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_during_a_claim_that_never_answers_returns_at_once() {
    local_loop::run(async {
        let (outbox, broker) = fresh();
        outbox.hang(Call::Claim);
        let h = start(config(), &outbox, &broker);
        until("a claim is under way", || !outbox.claims().is_empty()).await;
        h.stop.trigger();
        let stopped = tokio::time::timeout(Duration::from_millis(1), h.relay).await;
        stopped.expect("stops at once").unwrap().unwrap();
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_with_a_stalled_broker_returns_at_the_shutdown_timeout_leaving_the_rows() {
    local_loop::run(async {
        let (outbox, broker) = fresh();
        broker.pause();
        outbox.insert(&id(0), "agg", "{}");
        let cfg = config();
        let timeout = cfg.shutdown_timeout;
        let h = start(cfg, &outbox, &broker);
        until("the record is with the broker", || broker.held() == 1).await;
        let stopping = Instant::now();
        h.stop.trigger();
        let stopped = tokio::time::timeout(timeout + Duration::from_secs(1), h.relay).await;
        stopped.expect("stops by its timeout").unwrap().unwrap();
        assert!(
            stopping.elapsed() >= timeout,
            "the batch in flight is waited for until the timeout"
        );
        assert!(outbox.settled().is_empty());
        assert_eq!(outbox.pending(), 1, "the row is left for the next claim");
        assert_eq!(outbox.locked(), 0, "its claim rolled back");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn idle_polls_back_off_to_the_poll_interval_and_a_notification_claims_at_once() {
    local_loop::run(async {
        let (outbox, broker) = fresh();
        let h = start(config(), &outbox, &broker);
        run_for(Duration::from_secs(5)).await;
        let gaps = |claims: &[Instant]| -> Vec<u64> {
            claims
                .windows(2)
                .map(|w| (w[1] - w[0]).as_millis() as u64)
                .collect()
        };
        let waits = gaps(&outbox.claims());
        assert_eq!(
            waits,
            [50, 100, 200, 400, 800, 1000, 1000, 1000],
            "the wait doubles from 50 ms up to --poll-interval"
        );
        // A row mid-wait: its notification claims it at once.
        run_for(Duration::from_millis(300)).await;
        let claims_before = outbox.claims().len();
        let inserted = Instant::now();
        outbox.insert(&id(0), "agg", "{}");
        until("the row is in Kafka", || !broker.log(TOPIC).is_empty()).await;
        let claims = outbox.claims();
        assert_eq!(claims[claims_before], inserted, "claimed when notified");
        until("settled", || outbox.pending() == 0).await;
        // The wait starts over from 50 ms.
        until("two idle claims after the batch", || {
            outbox.claims().len() >= claims_before + 3
        })
        .await;
        let claims = outbox.claims();
        assert_eq!(
            gaps(&claims[claims_before + 1..claims_before + 3]),
            [50],
            "backoff reset by the rows"
        );
        h.finish().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_record_refused_as_too_large_is_kept_whole_and_its_notice_goes_to_the_dead_letter_topic()
{
    local_loop::run(async {
        let (outbox, broker) = fresh();
        broker.refuse_records_over(2_000);
        let big = format!("{{\"blob\": \"{}\"}}", "x".repeat(5_000));
        outbox.insert(&id(0), "agg-a", "{}");
        let refused = outbox.insert(&id(1), "agg-b", &big);
        outbox.insert(&id(2), "agg-a", "{}");
        let h = start(config(), &outbox, &broker);
        until("every row settled", || outbox.pending() == 0).await;
        assert_eq!(ids(&broker.log(TOPIC)), [id(0), id(2)]);
        let letters = outbox.dead_letters();
        assert_eq!(letters.len(), 1, "kept whole in the dead-letter table");
        assert_eq!(
            letters[0].event_key,
            format!("poll/public.outbox/{refused}")
        );
        assert_eq!(letters[0].kind, "too_large");
        let kept = letters[0].record.value.as_ref().unwrap();
        assert!(kept.len() > 5_000, "the whole record");
        let notices = broker.log(DEAD_LETTER_TOPIC);
        assert_eq!(notices.len(), 1, "its notice in the dead-letter topic");
        assert!(notices[0].size() <= 2_000);
        assert!(outbox.settled().contains(&id(1)), "the row settled");
        h.finish().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_settle_whose_connection_is_lost_leaves_the_rows_to_the_next_claim() {
    local_loop::run(async {
        let (outbox, broker) = fresh();
        outbox.insert(&id(0), "agg", "{}");
        outbox.fail_next(Call::Settle);
        let h = start(config(), &outbox, &broker);
        until("settled", || outbox.pending() == 0).await;
        assert_eq!(outbox.connects(), 2, "the lane connected again");
        assert_eq!(
            ids(&broker.log(TOPIC)),
            [id(0), id(0)],
            "at least once: the rolled back row is sent again"
        );
        assert_eq!(outbox.settled(), [id(0)]);
        h.finish().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_lane_result_its_phase_cannot_take_is_an_error_not_dropped() {
    let (outbox, broker) = fresh();
    let live = Arc::new(LiveState::new());
    let mut relay = PollRelay::new(config(), outbox, broker.sink(), live);
    // A lane that never connected settled nothing: such a result is a bug,
    // and the relay stops with it instead of going on as if it had not come.
    let error = relay
        .on_done(0, super::work::Done::Settled)
        .expect_err("a settle finished on a disconnected lane");
    assert!(
        matches!(
            error,
            PollError::OutOfStep {
                lane: 0,
                result: "settle",
                phase: "disconnected",
            }
        ),
        "{error}"
    );
}
