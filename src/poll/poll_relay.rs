//! The polling source's loop: one `select!` over what can happen, driven by
//! the phases of its lanes (`lane.rs`). Every wait, SQL included, sits in
//! the `select!` beside shutdown, so a stop request is never slept through.
//!
//! Claims go one at a time, in turn over the lanes; the batches they
//! claimed are published and settled side by side. A full batch lets the
//! next lane claim at once; an empty one sends the lanes idle until a
//! notification (the insert trigger's NOTIFY) or the poll timer, whose wait
//! doubles up to `--poll-interval`.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::batch::{Batch, RowTag};
use super::claim::{self, Claim, LaneShare, OutboxTable};
use super::lane::{Lane, Phase};
use super::{PollConfig, PollError, load_tables, schema};
use crate::live::{LiveState, Role};
use crate::lsn::Lsn;
use crate::metrics as m;
use crate::publish::{
    Origin, Outcome, Publisher, PublisherConfig, Replay, ScanSettings, Sink, TopicFailures, backoff,
};
use crate::replication::TimelineHistory;
use crate::router::Router;
use crate::shutdown::{Shutdown, sleep_until};
use crate::sql::{self, SqlClient, SqlError};

/// Shortest wait between polls of an idle outbox; it doubles up to
/// `--poll-interval` while nothing comes, and a notification ends it.
const MIN_IDLE_WAIT: Duration = Duration::from_millis(50);

/// How long rows in doubt wait before their partitions are read: the time
/// for requests a dead relay had already sent to land.
const IN_DOUBT_GRACE: Duration = Duration::from_secs(2);
/// Longest a lane's work (connect, claim, note, settle) may wait on
/// PostgreSQL: a server that froze while its host still answers TCP would
/// otherwise hold the lane for good. The lane then connects again.
const LANE_WORK_TIMEOUT: Duration = Duration::from_secs(60);

type Wakeups = (SqlClient, mpsc::UnboundedReceiver<String>);

/// SQL work of a lane, and what it finished with.
type Work = std::pin::Pin<Box<dyn Future<Output = (usize, Result<Done, PollError>)>>>;

enum Done {
    Connected {
        client: Arc<SqlClient>,
        marks: Option<Arc<SqlClient>>,
        tables: Vec<OutboxTable>,
        wakeups: Option<Box<Wakeups>>,
    },
    Claimed(Claim),
    Marked,
    Settled,
}

pub struct PollRelay<S: Sink> {
    config: PollConfig,
    router: Router,
    publisher: Publisher<S, RowTag>,
    live: Arc<LiveState>,
    tables: Vec<OutboxTable>,
    /// Exactly once: the lowest `seq` in doubt of the batches in flight,
    /// which the publisher's partition scans look back to.
    doubt_start: Option<i64>,
    lanes: Vec<Lane>,
    work: FuturesUnordered<Work>,
    wakeups: Option<Wakeups>,
    /// When an idle lane claims next (a notification brings it forward);
    /// `None` while a claim is under way.
    claim_at: Option<Instant>,
    /// Failed rounds in a row.
    failures: u32,
    idle_wait: Duration,
    /// The table and the lane of the next claim (in turn), and how many
    /// claims in a row found nothing.
    next_table: usize,
    next_lane: usize,
    empty_claims: usize,
    batches: u64,
    delivered: crate::live::Delivered,
}

impl<S: Sink> PollRelay<S> {
    pub fn new(config: PollConfig, sink: S, live: Arc<LiveState>) -> Self {
        // Rows in doubt may lie behind the batches of every lane (and of
        // other relays): the scan's margin covers several relays' worth.
        let in_flight = 4 * config.lanes.max(1) * config.batch_size;
        let publisher = Publisher::new(
            sink,
            PublisherConfig {
                dead_letter_topic: config.router.dead_letter_topic.clone(),
                topic_failures: TopicFailures::FailRecords,
                exactly_once: config.exactly_once.then(|| ScanSettings {
                    lookback: config.exactly_once_lookback,
                    dead_letter_topic: config.router.dead_letter_topic.clone(),
                    window: in_flight,
                    margin: in_flight.max(crate::publish::EVENT_MARGIN),
                }),
            },
        );
        PollRelay {
            router: Router::new(config.router.clone(), String::new()),
            publisher,
            live,
            tables: Vec::new(),
            doubt_start: None,
            lanes: (0..config.lanes.max(1)).map(|_| Lane::new()).collect(),
            work: FuturesUnordered::new(),
            wakeups: None,
            claim_at: Some(Instant::now()),
            failures: 0,
            idle_wait: MIN_IDLE_WAIT,
            next_table: 0,
            next_lane: 0,
            empty_claims: 0,
            batches: 0,
            delivered: crate::live::Delivered::default(),
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
                && self.claim_at.is_none_or(|at| at > Instant::now())
                && self.lanes.iter().any(Lane::is_idle)
                && !self.claiming();
            let notified = async {
                match self.wakeups.as_mut() {
                    Some((_, rx)) if waiting_for_rows => {
                        if rx.recv().await.is_none() {
                            return std::future::pending().await;
                        }
                        // One claim serves every notification queued so far.
                        while rx.try_recv().is_ok() {}
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
                    Ok(done) => self.on_done(lane, done),
                    Err(error) => self.on_failure(lane, error)?,
                },
                () = notified => {
                    self.idle_wait = MIN_IDLE_WAIT;
                    self.claim_at = Some(Instant::now());
                }
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
        let lanes = self.lanes.iter().filter_map(|lane| match &lane.phase {
            Phase::Disconnected { retry_at } => Some(*retry_at),
            Phase::Publishing {
                last_progress,
                stalled: false,
                ..
            } => Some(*last_progress + self.config.broker_stall_timeout),
            _ => None,
        });
        let claim = self
            .claim_at
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
        if stopping || self.claiming() || self.claim_at.is_none_or(|at| at > now) {
            return;
        }
        // Each lane claims its own share of the aggregates: they take turns.
        let count = self.lanes.len();
        if let Some(index) = (0..count)
            .map(|i| (self.next_lane + i) % count)
            .find(|&i| self.lanes[i].is_idle())
        {
            self.next_lane = index + 1;
            self.claim_next(index);
        }
    }

    fn on_timer(&mut self, stop: Option<Instant>) {
        let now = Instant::now();
        for index in 0..self.lanes.len() {
            if let Phase::Publishing {
                last_progress,
                stalled,
                ..
            } = &mut self.lanes[index].phase
            {
                if !*stalled && *last_progress + self.config.broker_stall_timeout <= now {
                    // The batch stays claimed until the broker takes it:
                    // rolled back, its rows could be sent again by another
                    // relay while its records still wait in the producer,
                    // and land twice or out of order.
                    *stalled = true;
                    if stop.is_none() {
                        tracing::warn!(
                            timeout = ?self.config.broker_stall_timeout,
                            "the broker acknowledged nothing: waiting for the broker, the batch still claimed"
                        );
                        self.set_waiting_for_broker(true);
                    }
                }
            }
        }
        if self.claim_at.is_some_and(|at| at <= now) && !self.claiming() {
            // The poll timer: the next claim starts at the loop's head.
            self.idle_wait = (self.idle_wait * 2).min(self.config.poll_interval);
        }
    }

    /// Runs `work` for lane `index`.
    fn spawn(
        &mut self,
        index: usize,
        work: impl Future<Output = Result<Done, PollError>> + 'static,
    ) {
        let address = self.config.pg.address();
        self.work.push(Box::pin(async move {
            let done = tokio::time::timeout(LANE_WORK_TIMEOUT, work)
                .await
                .unwrap_or_else(|_| {
                    Err(SqlError::new(
                        &address,
                        sql::SqlCause::Os(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("PostgreSQL answered nothing for {LANE_WORK_TIMEOUT:?}"),
                        )),
                    )
                    .into())
                });
            (index, done)
        }));
    }

    fn connect(&mut self, index: usize) {
        let config = self.config.clone();
        let listening = self.wakeups.as_ref().is_some_and(|(c, _)| !c.is_closed());
        self.lanes[index].phase = Phase::Connecting;
        self.spawn(index, async move {
            let client = sql::connect(&config.pg).await?;
            // The claim's cost estimate is high (a subquery per row), which
            // would make PostgreSQL JIT-compile it on every batch: about
            // half of each claim's time, measured.
            client.batch_execute("SET jit = off").await?;
            // A batch's claim stays open while the broker is waited for: a
            // server-side idle timeout would roll it back and let another
            // relay send rows this relay's producer still holds.
            client
                .batch_execute("SET idle_in_transaction_session_timeout = 0")
                .await?;
            let tables = load_tables(&client, &config.router).await?;
            let marks = if config.exactly_once {
                Some(Arc::new(sql::connect(&config.pg).await?))
            } else {
                None
            };
            let wakeups = if listening {
                None
            } else {
                listen(&config).await.map(Box::new)
            };
            Ok(Done::Connected {
                client: Arc::new(client),
                marks,
                tables,
                wakeups,
            })
        });
    }

    /// Lane `index` claims the next table's rows.
    fn claim_next(&mut self, index: usize) {
        let Some(client) = self.lanes[index].client.clone() else {
            return;
        };
        let table = self.next_table % self.tables.len().max(1);
        let outbox = self.tables[table].clone();
        let limit = self.config.batch_size as i64;
        let share = LaneShare {
            index: index as i32,
            count: self.lanes.len() as i32,
        };
        self.claim_at = None;
        self.lanes[index].phase = Phase::Claiming { table };
        let live = Arc::clone(&self.live);
        self.spawn(index, async move {
            let started = Instant::now();
            client.batch_execute("BEGIN").await?;
            let claim = claim::claim(&client, &outbox, limit, share).await?;
            live.record_claim(started.elapsed());
            if claim.rows.is_empty() {
                // Nothing to hold: end the transaction now.
                client.batch_execute("ROLLBACK").await?;
            }
            Ok(Done::Claimed(claim))
        });
    }

    fn on_done(&mut self, index: usize, done: Done) {
        let phase = std::mem::replace(&mut self.lanes[index].phase, Phase::Idle);
        self.lanes[index].phase = match (done, phase) {
            (
                Done::Connected {
                    client,
                    marks,
                    tables,
                    wakeups,
                },
                _,
            ) => {
                self.tables = tables;
                self.lanes[index].marks = marks;
                if let Some(wakeups) = wakeups {
                    self.wakeups = Some(*wakeups);
                }
                self.live.set_host(Some(client.address().to_owned()));
                self.live.set_connected(true);
                metrics::gauge!(m::REPLICATION_CONNECTED).set(1.0);
                tracing::info!(
                    host = client.address(),
                    tables = self.tables.len(),
                    lane = index,
                    "polling the outbox"
                );
                self.lanes[index].client = Some(client);
                Phase::Idle
            }
            (Done::Claimed(Claim { rows, stopped }), Phase::Claiming { table }) => {
                self.next_table = table + 1;
                if rows.is_empty() {
                    if stopped > 0 {
                        // Rows wait behind older ones another relay holds:
                        // claim again shortly, without backing off.
                        self.claim_at = Some(Instant::now() + MIN_IDLE_WAIT);
                    } else {
                        self.found_nothing();
                    }
                    return;
                }
                self.empty_claims = 0;
                self.idle_wait = MIN_IDLE_WAIT;
                metrics::counter!(m::POLL_BATCHES_TOTAL).increment(1);
                self.batches += 1;
                let origin = self.origin(table);
                let batch = Batch::new(
                    self.batches,
                    self.tables[table].clone(),
                    rows,
                    &self.router,
                    origin.as_ref().map(|o| o.to_string().into()),
                );
                // More may wait (this lane's, or another lane's share): the
                // next lane claims now.
                self.claim_at = Some(Instant::now());
                match self.lanes[index].marks.clone() {
                    Some(marks) => {
                        // Exactly once: noted as possibly sent before it is.
                        let (outbox, seqs) = (batch.table.clone(), batch.seqs());
                        let in_doubt = batch.lowest_in_doubt().is_some();
                        self.spawn(index, async move {
                            claim::mark_in_flight(&marks, &outbox, &seqs).await?;
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
                    None => self.send(index, batch),
                }
            }
            (Done::Marked, Phase::Marking { batch }) => self.send(index, batch),
            (Done::Settled, Phase::Settling { .. }) => {
                self.failures = 0;
                Phase::Idle
            }
            (_, phase) => phase,
        };
    }

    /// Exactly once: the records' origin for rows of `table`.
    fn origin(&self, table: usize) -> Option<Origin> {
        self.config.exactly_once.then(|| Origin {
            system_id: self.tables[table].source_id.clone(),
            slot: format!("poll:{}", self.tables[table].name()),
            timeline: 0,
        })
    }

    /// Hands lane `index`'s batch to the publisher. Rows a relay may have
    /// sent before are looked for in their partitions first, read afresh
    /// from the lowest of them on.
    fn send(&mut self, index: usize, mut batch: Batch) -> Phase {
        let in_doubt_in_flight = self
            .lanes
            .iter()
            .filter_map(Lane::batch)
            .any(|b| b.lowest_in_doubt().is_some());
        if !in_doubt_in_flight {
            self.doubt_start = None;
        }
        if let Some(lowest) = batch.lowest_in_doubt() {
            tracing::info!(
                lowest,
                "rows a relay may have sent already: checking their partitions"
            );
            // Read afresh for every batch in doubt (what another relay
            // landed since the last scan must be seen), looking back to
            // the lowest row in doubt of every batch in flight.
            let start = self.doubt_start.map_or(lowest, |start| start.min(lowest));
            self.doubt_start = Some(start);
            let table = self
                .tables
                .iter()
                .position(|t| t.name() == batch.table.name())
                .unwrap_or(0);
            self.publisher.begin_session(
                self.origin(table).map(|origin| Replay {
                    origin,
                    history: TimelineHistory::new(0),
                    start: Lsn(start as u64),
                }),
                None,
            );
        }
        for out in batch.outgoing() {
            let outcomes = self.publisher.publish(out);
            self.apply(&mut batch, outcomes);
        }
        self.publishing(index, batch, Instant::now())
    }

    /// A claim found nothing: the next lane or table tries at once, until
    /// every lane found nothing in every table; then the lanes wait for a
    /// notification or the poll timer.
    fn found_nothing(&mut self) {
        self.empty_claims += 1;
        let now = Instant::now();
        self.claim_at = Some(
            if self.empty_claims < self.lanes.len() * self.tables.len().max(1) {
                now
            } else {
                self.empty_claims = 0;
                now + self.idle_wait
            },
        );
    }

    fn on_outcomes(&mut self, outcomes: Vec<Outcome<RowTag>>) {
        // Each outcome goes to the lane whose batch it belongs to.
        let mut by_lane: Vec<Vec<Outcome<RowTag>>> =
            self.lanes.iter().map(|_| Vec::new()).collect();
        for outcome in outcomes {
            let number = tag_of(&outcome).batch;
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
        let Some(client) = self.lanes[index].client.clone() else {
            return Phase::Draining { batch };
        };
        let settlement = batch.settlement(self.config.max_backoff);
        let table = batch.table.clone();
        let on_published = self.config.on_published;
        let dead_letter_table = self.config.dead_letter_table.clone();
        let live = Arc::clone(&self.live);
        let exactly_once = self.config.exactly_once;
        self.spawn(index, async move {
            let started = Instant::now();
            for letter in &settlement.dead_letters {
                crate::dead_letters::store(&client, &dead_letter_table, letter).await?;
            }
            claim::settle(
                &client,
                &table,
                on_published,
                &settlement.published,
                &settlement.failed,
                exactly_once,
            )
            .await?;
            client.batch_execute("COMMIT").await?;
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

    fn set_waiting_for_broker(&self, waiting: bool) {
        self.live.set_waiting_for_broker(waiting);
        metrics::gauge!(m::WAITING_FOR_BROKER).set(if waiting { 1.0 } else { 0.0 });
    }

    /// A lane's SQL failed: count it (a permanent error ends the relay
    /// after a few tries, with its fix), drop its connection, connect again
    /// later.
    fn on_failure(&mut self, index: usize, error: PollError) -> Result<(), PollError> {
        self.failures += 1;
        self.lanes[index].client = None;
        if !self.lanes.iter().any(|l| l.client.is_some()) {
            self.live.set_connected(false);
            metrics::gauge!(m::REPLICATION_CONNECTED).set(0.0);
        }
        self.live.set_last_error(&error.to_string());
        metrics::counter!(m::RECONNECTS_TOTAL).increment(1);
        let permanent = match &error {
            PollError::Sql(e) => !e.is_transient(),
            PollError::NotSetUp(_) | PollError::Publish(_) | PollError::Gave(_) => true,
        };
        tracing::warn!(%error, attempt = self.failures, lane = index, "polling failed");
        if permanent && self.failures >= self.config.permanent_error_attempts {
            return Err(PollError::Gave(error.to_string()));
        }
        let retry_at = Instant::now() + backoff(self.failures, self.config.max_backoff);
        let phase = std::mem::replace(&mut self.lanes[index].phase, Phase::Connecting);
        if matches!(phase, Phase::Claiming { .. }) {
            self.claim_at = Some(retry_at);
        }
        // The server rolled the claim back: another relay may take these
        // rows over while this relay's producer still holds their records,
        // so exactly once falls back to at least once for them (README,
        // "Known limits"); counted.
        if self.config.exactly_once
            && matches!(phase, Phase::Publishing { .. } | Phase::Settling { .. })
        {
            metrics::counter!(m::PARTITIONS_AT_LEAST_ONCE_TOTAL, "reason" => "claim_lost")
                .increment(1);
        }
        // Records already with the producer are waited for before the lane
        // claims again.
        self.lanes[index].phase = match phase {
            Phase::Publishing { batch, .. }
            | Phase::Settling { batch }
            | Phase::Draining { batch, .. }
                if batch.sending() > 0 =>
            {
                Phase::Draining { batch }
            }
            _ => Phase::Disconnected { retry_at },
        };
        Ok(())
    }
}

fn tag_of(outcome: &Outcome<RowTag>) -> RowTag {
    match outcome {
        Outcome::Delivered { tag, .. }
        | Outcome::Refused { tag, .. }
        | Outcome::Failed { tag, .. }
        | Outcome::Skipped { tag } => *tag,
    }
}

/// A connection for `LISTEN`; without one the relay polls on its timer.
async fn listen(config: &PollConfig) -> Option<Wakeups> {
    let listen = format!(
        "LISTEN {}",
        crate::catalog::quote_ident(schema::NOTIFY_CHANNEL)
    );
    let result = async {
        let (client, rx) = sql::connect_listening(&config.pg).await?;
        client.batch_execute(&listen).await?;
        Ok::<_, SqlError>((client, rx))
    }
    .await;
    result
        .inspect_err(
            |error| tracing::warn!(%error, "cannot LISTEN for new rows; polling on the timer"),
        )
        .ok()
}
