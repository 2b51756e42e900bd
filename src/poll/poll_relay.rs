//! The polling source's loop: one `select!` over what can happen, driven by
//! the phases of its lanes (`lane.rs`). Every wait, SQL included, sits in
//! the `select!` beside shutdown, so a stop request is never slept through.
//!
//! Claims go one at a time (when: `schedule.rs`); the batches they claimed
//! are published and settled side by side. The lanes' SQL is the store's
//! (`store.rs`), so the tests run this loop on an in-memory outbox. A
//! batch's way through the publisher is `poll_relay/publishing.rs`'s.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::batch::{Batch, RowTag};
use super::claim::{LaneShare, OutboxTable};
use super::doubt::Doubt;
use super::lane::{Lane, Phase};
use super::schedule::ClaimSchedule;
use super::store::{Connected, OutboxStore, Wakeups};
use super::work::{Done, LaneWork};
use super::{PollConfig, PollError};
use crate::live::{LiveState, Role};
use crate::metrics as m;
use crate::publish::{Publisher, PublisherConfig, ScanSettings, Sink, TopicFailures, backoff};
use crate::router::Router;
use crate::shutdown::{Shutdown, sleep_until};

mod publishing;

/// How long rows in doubt wait before their partitions are read: the time
/// for requests a dead relay had already sent to land.
const IN_DOUBT_GRACE: Duration = Duration::from_secs(2);

pub struct PollRelay<S: Sink, St: OutboxStore> {
    config: PollConfig,
    store: St,
    router: Router,
    publisher: Publisher<S, RowTag>,
    live: Arc<LiveState>,
    tables: Vec<OutboxTable>,
    /// Exactly once: the records' origin, and the partition scans for rows
    /// in doubt.
    doubt: Doubt,
    lanes: Vec<Lane<St::Conn>>,
    work: LaneWork<St::Conn>,
    wakeups: Option<Wakeups>,
    schedule: ClaimSchedule,
    /// Failed rounds in a row.
    failures: u32,
    batches: u64,
    delivered: crate::live::Delivered,
}

impl<S: Sink, St: OutboxStore> PollRelay<S, St> {
    pub fn new(config: PollConfig, store: St, sink: S, live: Arc<LiveState>) -> Self {
        // Rows in doubt may lie behind the batches of every lane (and of
        // other relays): the scan's margin covers several relays' worth.
        let in_flight = 4 * config.lanes.max(1) * config.batch_size;
        let mut publisher = Publisher::new(
            sink,
            PublisherConfig {
                dead_letter_topic: config.router.dead_letter_topic.clone(),
                topic_failures: TopicFailures::FailRecords,
                exactly_once: config.delivery.is_exactly_once().then(|| ScanSettings {
                    lookback: config.exactly_once_lookback,
                    dead_letter_topic: config.router.dead_letter_topic.clone(),
                    window: in_flight,
                    margin: in_flight.max(crate::publish::EVENT_MARGIN),
                }),
            },
        );
        publisher.share_held_partitions(live.held_partitions.clone());
        PollRelay {
            router: Router::new(config.router.clone(), String::new()),
            publisher,
            live,
            tables: Vec::new(),
            doubt: Doubt::new(config.delivery.is_exactly_once()),
            lanes: (0..config.lanes.max(1)).map(|_| Lane::new()).collect(),
            work: LaneWork::new(config.pg.address()),
            wakeups: None,
            schedule: ClaimSchedule::new(config.poll_interval),
            failures: 0,
            batches: 0,
            delivered: crate::live::Delivered::default(),
            store,
            config,
        }
    }

    /// Polls until shutdown, or a permanent error.
    pub async fn run(mut self, mut shutdown: Shutdown) -> Result<(), PollError> {
        self.live.set_role(Role::Active);
        let mut stop_deadline: Option<Instant> = None;
        loop {
            if let Some(deadline) = stop_deadline {
                // Stopping: once no lane has a batch the broker may still
                // be writing (or at the deadline), the connections close
                // and the server rolls back what was claimed.
                if Instant::now() >= deadline || !self.lanes.iter().any(Lane::busy) {
                    return Ok(());
                }
            }
            self.start_due_work(stop_deadline.is_some());
            let timer = self.next_deadline(stop_deadline);
            // Idle lanes wait for rows: a notification ends the wait.
            let waiting_for_rows = stop_deadline.is_none()
                && !self.schedule.due(Instant::now())
                && self.lanes.iter().any(Lane::is_idle)
                && !self.claiming();
            let notified = async {
                match self.wakeups.as_mut() {
                    Some(wakeups) if waiting_for_rows => {
                        if wakeups.rx.recv().await.is_none() {
                            return std::future::pending().await;
                        }
                        // One claim serves every notification queued so far.
                        while wakeups.rx.try_recv().is_ok() {}
                    }
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = shutdown.wait(), if stop_deadline.is_none() => {
                    tracing::info!("stopping: finishing the batches in flight");
                    stop_deadline = Some(Instant::now() + self.config.shutdown_timeout);
                }
                outcomes = self.publisher.next() => self.on_outcomes(outcomes?),
                Some((lane, done)) = self.work.next(), if !self.work.is_empty() => match done {
                    Ok(done) => self.on_done(lane, done)?,
                    Err(error) => self.on_failure(lane, error)?,
                },
                () = notified => self.schedule.notified(),
                () = sleep_until(timer), if timer.is_some() => self.on_timer(stop_deadline),
            }
        }
    }

    fn claiming(&self) -> bool {
        self.lanes
            .iter()
            .any(|l| matches!(l.phase, Phase::Claiming { .. }))
    }

    /// The earliest of: a lane's reconnect, a batch's stall, the next
    /// claim (when the lanes idle on the poll timer), the stop deadline.
    fn next_deadline(&self, stop: Option<Instant>) -> Option<Instant> {
        let stall_timeout = self.config.broker_stall_timeout;
        let lanes = self.lanes.iter().filter_map(|l| l.wake_at(stall_timeout));
        let claim = self
            .schedule
            .at
            .filter(|_| self.lanes.iter().any(Lane::is_idle));
        lanes.chain(claim).chain(stop).min()
    }

    /// Starts what is due now: connecting lanes, and the next claim.
    fn start_due_work(&mut self, stopping: bool) {
        let now = Instant::now();
        for index in 0..self.lanes.len() {
            if matches!(self.lanes[index].phase, Phase::Disconnected { retry_at } if retry_at <= now)
            {
                self.connect(index);
            }
        }
        // Batches whose rows in doubt waited for another table's.
        for index in 0..self.lanes.len() {
            let Phase::Waiting { batch } = &self.lanes[index].phase else {
                continue;
            };
            if stopping
                || self
                    .doubt
                    .must_wait(batch, self.lanes.iter().filter_map(Lane::sent_batch))
            {
                continue;
            }
            if let Phase::Waiting { batch } =
                std::mem::replace(&mut self.lanes[index].phase, Phase::Idle)
            {
                self.lanes[index].phase = self.send(index, batch);
            }
        }
        if stopping || self.claiming() || !self.schedule.due(now) {
            return;
        }
        // Each lane claims its own share of the aggregates: they take turns.
        let idle: Vec<bool> = self.lanes.iter().map(Lane::is_idle).collect();
        if let Some((index, table)) = self.schedule.start(&idle, self.tables.len()) {
            self.claim(index, table);
        }
    }

    fn on_timer(&mut self, stop: Option<Instant>) {
        let now = Instant::now();
        let timeout = self.config.broker_stall_timeout;
        for index in 0..self.lanes.len() {
            if self.lanes[index].stalls(timeout, now) && stop.is_none() {
                tracing::warn!(
                    ?timeout,
                    "the broker acknowledged nothing: waiting for the broker, the batch still claimed"
                );
                self.set_waiting_for_broker(true);
            }
        }
        if self.schedule.due(now) && !self.claiming() {
            // The poll timer: the next claim starts at the loop's head.
            self.schedule.timer_fired();
        }
    }

    fn connect(&mut self, index: usize) {
        let listening = self.wakeups.as_ref().is_some_and(Wakeups::is_open);
        self.lanes[index].phase = Phase::Connecting;
        let connect = self.store.connect(!listening);
        self.work
            .push(index, async move { Ok(Done::Connected(connect.await?)) });
    }

    /// Lane `index` claims `table`'s rows.
    fn claim(&mut self, index: usize, table: usize) {
        let Some(conn) = self.lanes[index].conn.clone() else {
            return;
        };
        let share = LaneShare {
            index: index as i32,
            count: self.lanes.len() as i32,
        };
        let limit = self.config.batch_size as i64;
        self.lanes[index].phase = Phase::Claiming { table };
        let live = Arc::clone(&self.live);
        let started = Instant::now();
        let claim = self
            .store
            .claim(conn, self.tables[table].clone(), limit, share);
        self.work.push(index, async move {
            let claim = claim.await?;
            live.record_claim(started.elapsed());
            Ok(Done::Claimed(claim))
        });
    }

    /// Lane `index`'s work finished: its next phase. A result its phase
    /// cannot take is an error, never dropped.
    pub(super) fn on_done(&mut self, index: usize, done: Done<St::Conn>) -> Result<(), PollError> {
        let phase = std::mem::replace(&mut self.lanes[index].phase, Phase::Idle);
        self.lanes[index].phase = match (done, phase) {
            (
                Done::Connected(Connected {
                    conn,
                    host,
                    tables,
                    wakeups,
                }),
                _,
            ) => {
                self.tables = tables;
                if let Some(wakeups) = wakeups {
                    self.wakeups = Some(wakeups);
                }
                tracing::info!(
                    host,
                    tables = self.tables.len(),
                    lane = index,
                    "polling the outbox"
                );
                self.live.set_host(Some(host));
                self.live.set_connected(true);
                metrics::gauge!(m::REPLICATION_CONNECTED).set(1.0);
                self.lanes[index].conn = Some(conn);
                Phase::Idle
            }
            (Done::Claimed(claim), Phase::Claiming { table }) => {
                let (lanes, tables) = (self.lanes.len(), self.tables.len());
                self.schedule
                    .claimed(table, claim.rows.len(), claim.stopped, lanes, tables);
                if claim.rows.is_empty() {
                    return Ok(());
                }
                let rows = claim.rows;
                metrics::counter!(m::POLL_BATCHES_TOTAL).increment(1);
                self.batches += 1;
                let origin = self.doubt.origin(&self.tables[table]);
                let batch = Batch::new(
                    self.batches,
                    self.tables[table].clone(),
                    rows,
                    &self.router,
                    origin.as_ref().map(crate::publish::OriginStamp::new),
                );
                match self.lanes[index].conn.clone() {
                    Some(conn) if self.config.delivery.is_exactly_once() => {
                        // Exactly once: noted as possibly sent before it is.
                        let (outbox, seqs) = (batch.table.clone(), batch.seqs());
                        let in_doubt = batch.lowest_in_doubt().is_some();
                        let mark = self.store.mark_in_flight(conn, outbox, seqs);
                        self.work.push(index, async move {
                            mark.await?;
                            if in_doubt {
                                // What the relay before had already written
                                // to its socket still reaches the broker
                                // after it died: let it land before the
                                // partition is read.
                                tokio::time::sleep(IN_DOUBT_GRACE).await;
                            }
                            Ok(Done::Marked)
                        });
                        Phase::Marking { batch }
                    }
                    _ => self.send(index, batch),
                }
            }
            (Done::Marked, Phase::Marking { batch }) => {
                if self
                    .doubt
                    .must_wait(&batch, self.lanes.iter().filter_map(Lane::sent_batch))
                {
                    Phase::Waiting { batch }
                } else {
                    self.send(index, batch)
                }
            }
            (Done::Settled, Phase::Settling { .. }) => {
                self.failures = 0;
                Phase::Idle
            }
            (done, phase) => {
                let error = PollError::OutOfStep {
                    lane: index,
                    result: done.name(),
                    phase: phase.name(),
                };
                self.lanes[index].phase = phase;
                return Err(error);
            }
        };
        Ok(())
    }

    /// A lane's SQL failed: count it (a permanent error ends the relay
    /// after a few tries, with its fix), drop its connection, connect again
    /// later.
    fn on_failure(&mut self, index: usize, error: PollError) -> Result<(), PollError> {
        self.failures += 1;
        self.lanes[index].conn = None;
        if !self.lanes.iter().any(|l| l.conn.is_some()) {
            self.live.set_connected(false);
            metrics::gauge!(m::REPLICATION_CONNECTED).set(0.0);
        }
        self.live.set_last_error(&error.to_string());
        metrics::counter!(m::RECONNECTS_TOTAL).increment(1);
        let permanent = error.is_permanent();
        tracing::warn!(%error, attempt = self.failures, lane = index, "polling failed");
        if permanent && self.failures >= self.config.permanent_error_attempts {
            return Err(PollError::GaveUp(Box::new(error)));
        }
        let retry_at = Instant::now() + backoff(self.failures, self.config.max_backoff);
        let lost = self.lanes[index].connection_lost(retry_at);
        if lost.claiming {
            self.schedule.failed(retry_at);
        }
        // The server rolled the claim back: another relay may take these
        // rows over while this relay's producer still holds their records,
        // so exactly once falls back to at least once for them (docs/guarantees.md,
        // "Known limits"); counted.
        if self.config.delivery.is_exactly_once() && lost.claimed_batch {
            metrics::counter!(m::PARTITIONS_AT_LEAST_ONCE_TOTAL, "reason" => "claim_lost")
                .increment(1);
        }
        Ok(())
    }
}
