//! A claimed batch's way through the publisher: handed over (rows in
//! doubt looked for first), its outcomes applied row by row (dead letters
//! handed over in their place), then settled in the claim's transaction,
//! or drained when its connection was lost. The loop's half that talks to
//! the publisher, apart from the lanes' SQL and the schedule.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::time::Instant;

use super::super::batch::{Batch, RowTag};
use super::super::lane::{Lane, Phase};
use super::super::store::OutboxStore;
use super::super::work::Done;
use super::PollRelay;
use crate::metrics as m;
use crate::publish::{Outcome, Sink};

impl<S: Sink, St: OutboxStore> PollRelay<S, St> {
    /// Hands lane `index`'s batch to the publisher, rows in doubt looked
    /// for in their partitions first.
    pub(super) fn send(&mut self, index: usize, mut batch: Batch) -> Phase {
        let in_doubt_in_flight = self
            .lanes
            .iter()
            .filter_map(Lane::batch)
            .any(|b| b.lowest_in_doubt().is_some());
        self.doubt.before_send(
            &mut self.publisher,
            &batch,
            &self.tables,
            in_doubt_in_flight,
        );
        // Outcomes known at once are applied together: `apply` counts what
        // is in flight over every row, once per call.
        let mut outcomes = Vec::new();
        for out in batch.outgoing() {
            outcomes.extend(self.publisher.publish(out));
        }
        self.apply(&mut batch, outcomes);
        self.publishing(index, batch, Instant::now())
    }

    pub(super) fn on_outcomes(&mut self, outcomes: Vec<Outcome<RowTag>>) {
        // Each outcome goes to the lane whose batch it belongs to.
        let mut by_lane: Vec<Vec<Outcome<RowTag>>> =
            self.lanes.iter().map(|_| Vec::new()).collect();
        for outcome in outcomes {
            let number = RowTag::of(&outcome).batch;
            if let Some(index) = self
                .lanes
                .iter()
                .position(|l| l.batch().is_some_and(|b| b.number == number))
            {
                by_lane[index].push(outcome);
            }
        }
        for (index, outcomes) in by_lane.into_iter().enumerate() {
            if outcomes.is_empty() {
                continue;
            }
            let phase = std::mem::replace(&mut self.lanes[index].phase, Phase::Idle);
            self.lanes[index].phase = match phase {
                Phase::Publishing {
                    mut batch,
                    last_progress,
                    stalled,
                } => {
                    let progressed = self.apply(&mut batch, outcomes);
                    if progressed && stalled {
                        self.set_waiting_for_broker(false);
                    }
                    let last_progress = if progressed {
                        Instant::now()
                    } else {
                        last_progress
                    };
                    let mut next = self.publishing(index, batch, last_progress);
                    if let Phase::Publishing { stalled: still, .. } = &mut next {
                        *still = stalled && !progressed;
                    }
                    next
                }
                Phase::Draining { mut batch } => {
                    self.apply(&mut batch, outcomes);
                    self.draining(batch)
                }
                other => other,
            };
        }
    }

    /// Applies outcomes to a batch, handing over the dead letters they ask
    /// for; true if a row settled.
    fn apply(&mut self, batch: &mut Batch, outcomes: Vec<Outcome<RowTag>>) -> bool {
        let mut any = false;
        let mut outcomes = VecDeque::from(outcomes);
        while let Some(outcome) = outcomes.pop_front() {
            if let Outcome::Delivered {
                tag,
                ref topic,
                dead_letter,
            } = outcome
            {
                if tag.batch == batch.number {
                    self.delivered
                        .count(&self.live, topic, batch.created(tag), dead_letter);
                }
            }
            if let Outcome::Skipped { tag } = outcome
                && tag.batch == batch.number
            {
                self.live.record_skipped();
            }
            let (settled, instead) = batch.apply(outcome, &self.config.router.dead_letter_topic);
            any |= settled;
            if let Some(out) = instead {
                outcomes.extend(self.publisher.publish(out));
            }
        }
        let in_lanes = self.lanes.iter().filter_map(Lane::batch);
        let (sending, bytes) = in_lanes
            .fold((batch.sending(), batch.sending_bytes()), |(n, b), other| {
                (n + other.sending(), b + other.sending_bytes())
            });
        self.live.record_in_flight(sending, bytes);
        any
    }

    /// Lane `index`'s batch is on its way: settle it once every row
    /// settled (after the last tries of rows out of attempts).
    fn publishing(&mut self, index: usize, mut batch: Batch, last_progress: Instant) -> Phase {
        if batch.sending() > 0 {
            return Phase::Publishing {
                batch,
                last_progress,
                stalled: false,
            };
        }
        let last_tries = batch.last_tries(
            self.config.max_attempts,
            &self.config.router.dead_letter_topic,
        );
        if !last_tries.is_empty() {
            for out in last_tries {
                let outcomes = self.publisher.publish(out);
                self.apply(&mut batch, outcomes);
            }
            return self.publishing(index, batch, last_progress);
        }
        let Some(conn) = self.lanes[index].conn.clone() else {
            return Phase::Draining { batch };
        };
        let settlement = batch.settlement(self.config.max_backoff);
        let settle = self.store.settle(conn, batch.table.clone(), settlement);
        let live = Arc::clone(&self.live);
        let started = Instant::now();
        self.work.push(index, async move {
            settle.await?;
            live.record_settle(started.elapsed());
            Ok(Done::Settled)
        });
        Phase::Settling { batch }
    }

    /// Once nothing of the batch (rolled back by the server when its
    /// connection went) is with the producer, the lane may claim again.
    fn draining(&mut self, batch: Batch) -> Phase {
        if batch.sending() > 0 {
            return Phase::Draining { batch };
        }
        if !self
            .lanes
            .iter()
            .any(|l| matches!(l.phase, Phase::Draining { .. }))
        {
            self.set_waiting_for_broker(false);
        }
        // Draining follows a lost connection: the lane connects again.
        Phase::Disconnected {
            retry_at: Instant::now(),
        }
    }

    pub(super) fn set_waiting_for_broker(&self, waiting: bool) {
        self.live.set_waiting_for_broker(waiting);
        metrics::gauge!(m::WAITING_FOR_BROKER).set(if waiting { 1.0 } else { 0.0 });
    }
}
