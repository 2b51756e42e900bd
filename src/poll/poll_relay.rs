//! The polling source's loop: one `select!` over what can happen, driven by
//! the batch's phase. Every wait, SQL included, sits in the `select!` beside
//! shutdown, so a stop request is never slept through.
//!
//! ```text
//!   Disconnected ─connect─> Idle ─claim─> Claiming ─rows─> Publishing ─all settled─> Settling ─commit─> Idle
//!                            ^                                 │ broker stalled / stop deadline            │
//!                            └──────────── Draining <─rollback─┘                                          (next table)
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::batch::{Batch, RowTag};
use super::claim::{self, ClaimedRow, OutboxTable};
use super::{PollConfig, PollError, load_tables, schema};
use crate::live::{LiveState, Role};
use crate::metrics as m;
use crate::publish::{Outcome, Publisher, PublisherConfig, Sink, TopicFailures, backoff};
use crate::router::Router;
use crate::shutdown::{Shutdown, sleep_until};
use crate::sql::{self, SqlClient, SqlError};

/// Shortest wait between polls of an idle outbox; it doubles up to
/// `--poll-interval` while nothing comes, and a notification ends it.
const MIN_IDLE_WAIT: Duration = Duration::from_millis(50);

type Work = std::pin::Pin<Box<dyn Future<Output = Result<Done, PollError>>>>;

type Wakeups = (SqlClient, mpsc::UnboundedReceiver<String>);

/// What a piece of SQL work finished with.
enum Done {
    Connected {
        client: Arc<SqlClient>,
        tables: Vec<OutboxTable>,
        wakeups: Option<Box<Wakeups>>,
    },
    Claimed(Vec<ClaimedRow>),
    Settled,
    RolledBack,
}

enum Phase {
    Disconnected {
        retry_at: Instant,
    },
    Connecting,
    /// Waiting for rows: a notification, or the poll timer.
    Idle {
        poll_at: Instant,
    },
    Claiming {
        table: usize,
    },
    Publishing {
        batch: Batch,
        last_progress: Instant,
    },
    Settling {
        batch: Batch,
    },
    /// Rolled back: waiting for the records the producer already has, so
    /// the next batch does not overtake them.
    Draining {
        batch: Batch,
    },
}

pub struct PollRelay<S: Sink> {
    config: PollConfig,
    router: Router,
    publisher: Publisher<S, RowTag>,
    live: Arc<LiveState>,
    tables: Vec<OutboxTable>,
    client: Option<Arc<SqlClient>>,
    wakeups: Option<Wakeups>,
    /// Failed rounds in a row.
    failures: u32,
    idle_wait: Duration,
    /// The table the next claim reads, and whether this round over the
    /// tables found a full batch.
    next_table: usize,
    round_full: bool,
    batches: u64,
}

impl<S: Sink> PollRelay<S> {
    pub fn new(config: PollConfig, sink: S, live: Arc<LiveState>) -> Self {
        let publisher = Publisher::new(
            sink,
            PublisherConfig {
                dead_letter_topic: config.router.dead_letter_topic.clone(),
                topic_failures: TopicFailures::FailRecords,
                exactly_once: None,
            },
        );
        PollRelay {
            router: Router::new(config.router.clone(), String::new()),
            publisher,
            live,
            tables: Vec::new(),
            client: None,
            wakeups: None,
            failures: 0,
            idle_wait: MIN_IDLE_WAIT,
            next_table: 0,
            round_full: false,
            batches: 0,
            config,
        }
    }

    /// Polls until shutdown, or a permanent error.
    pub async fn run(mut self, mut shutdown: Shutdown) -> Result<(), PollError> {
        self.live.set_role(Role::Active);
        let mut phase = Phase::Disconnected {
            retry_at: Instant::now(),
        };
        let mut work: Option<Work> = None;
        let mut stop_deadline: Option<Instant> = None;
        loop {
            if stop_deadline.is_some() && work.is_none() {
                match &phase {
                    Phase::Publishing { .. } | Phase::Draining { .. } => {}
                    _ => return Ok(()),
                }
            }
            let timer = match &phase {
                Phase::Disconnected { retry_at } => Some(*retry_at),
                Phase::Idle { poll_at } => Some(*poll_at),
                Phase::Publishing { last_progress, .. } => {
                    let stall = *last_progress + self.config.broker_stall_timeout;
                    Some(stop_deadline.map_or(stall, |d| d.min(stall)))
                }
                _ => None,
            };
            let idle = matches!(phase, Phase::Idle { .. });
            let notified = async {
                match self.wakeups.as_mut() {
                    Some((_, rx)) if idle => {
                        if rx.recv().await.is_none() {
                            return std::future::pending().await;
                        }
                        // One poll serves every notification queued so far.
                        while rx.try_recv().is_ok() {}
                    }
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = shutdown.wait(), if stop_deadline.is_none() => {
                    tracing::info!("stopping: finishing the batch in flight");
                    stop_deadline = Some(Instant::now() + self.config.shutdown_timeout);
                    if !matches!(phase, Phase::Publishing { .. } | Phase::Settling { .. } | Phase::Draining { .. }) {
                        return Ok(());
                    }
                }
                outcomes = self.publisher.next() => {
                    let outcomes = outcomes?;
                    phase = self.on_outcomes(outcomes, phase, &mut work);
                }
                done = run_work(&mut work) => {
                    work = None;
                    phase = match done {
                        Ok(done) => self.on_done(done, phase, &mut work)?,
                        Err(error) => self.on_failure(error, phase, &mut work)?,
                    };
                }
                () = notified => {
                    self.idle_wait = MIN_IDLE_WAIT;
                    phase = self.claim_next(&mut work);
                }
                () = sleep_until(timer), if timer.is_some() => {
                    phase = self.on_timer(phase, &mut work, stop_deadline);
                }
            }
        }
    }

    fn on_timer(&mut self, phase: Phase, work: &mut Option<Work>, stop: Option<Instant>) -> Phase {
        match phase {
            Phase::Disconnected { .. } => {
                let config = self.config.clone();
                let listening = self.wakeups.as_ref().is_some_and(|(c, _)| !c.is_closed());
                *work = Some(Box::pin(async move {
                    let client = sql::connect(&config.pg).await?;
                    // The claim's cost estimate is high (a subquery per
                    // row), which would make PostgreSQL JIT-compile it on
                    // every batch: about half of each claim's time, measured.
                    client.batch_execute("SET jit = off").await?;
                    let tables = load_tables(&client, &config.router).await?;
                    let wakeups = if listening {
                        None
                    } else {
                        listen(&config).await.map(Box::new)
                    };
                    Ok(Done::Connected {
                        client: Arc::new(client),
                        tables,
                        wakeups,
                    })
                }));
                Phase::Connecting
            }
            Phase::Idle { .. } => {
                self.idle_wait = (self.idle_wait * 2).min(self.config.poll_interval);
                self.claim_next(work)
            }
            Phase::Publishing { batch, .. } => {
                if stop.is_none() {
                    tracing::warn!(
                        timeout = ?self.config.broker_stall_timeout,
                        "the broker acknowledged nothing: the claim is rolled back; waiting for the broker"
                    );
                    self.set_waiting_for_broker(true);
                }
                self.rollback(work);
                Phase::Draining { batch }
            }
            other => other,
        }
    }

    /// Claims the next table's rows.
    fn claim_next(&mut self, work: &mut Option<Work>) -> Phase {
        let Some(client) = self.client.clone() else {
            return Phase::Disconnected {
                retry_at: Instant::now(),
            };
        };
        let table = self.next_table;
        let outbox = self.tables[table].clone();
        let limit = self.config.batch_size as i64;
        let live = Arc::clone(&self.live);
        *work = Some(Box::pin(async move {
            let started = Instant::now();
            client.batch_execute("BEGIN").await?;
            let rows = claim::claim(&client, &outbox, limit).await?;
            live.record_claim(started.elapsed());
            Ok(Done::Claimed(rows))
        }));
        Phase::Claiming { table }
    }

    fn rollback(&mut self, work: &mut Option<Work>) {
        if let Some(client) = self.client.clone() {
            *work = Some(Box::pin(async move {
                if let Err(error) = client.batch_execute("ROLLBACK").await {
                    tracing::debug!(%error, "rollback of the claim failed; the server rolls it back");
                }
                Ok(Done::RolledBack)
            }));
        }
    }

    fn on_done(
        &mut self,
        done: Done,
        phase: Phase,
        work: &mut Option<Work>,
    ) -> Result<Phase, PollError> {
        Ok(match (done, phase) {
            (
                Done::Connected {
                    client,
                    tables,
                    wakeups,
                },
                _,
            ) => {
                self.tables = tables;
                if let Some(wakeups) = wakeups {
                    self.wakeups = Some(*wakeups);
                }
                self.live.set_host(Some(client.address().to_owned()));
                self.live.set_connected(true);
                metrics::gauge!(m::REPLICATION_CONNECTED).set(1.0);
                tracing::info!(
                    host = client.address(),
                    tables = self.tables.len(),
                    "polling the outbox"
                );
                self.client = Some(client);
                self.claim_next(work)
            }
            (Done::Claimed(rows), Phase::Claiming { table }) => {
                if rows.is_empty() {
                    self.rollback(work);
                    return Ok(self.after_batch(table, 0));
                }
                metrics::counter!(m::POLL_BATCHES_TOTAL).increment(1);
                self.batches += 1;
                let mut batch =
                    Batch::new(self.batches, self.tables[table].clone(), rows, &self.router);
                for out in batch.outgoing() {
                    let outcomes = self.publisher.publish(out);
                    self.apply(&mut batch, outcomes);
                }
                self.publishing(batch, Instant::now(), work)
            }
            (Done::Settled, Phase::Settling { batch }) => {
                self.failures = 0;
                let table = self
                    .tables
                    .iter()
                    .position(|t| t.name() == batch.table.name())
                    .unwrap_or(0);
                self.after_batch(table, batch.len())
            }
            (Done::RolledBack, Phase::Draining { batch }) => self.draining(batch),
            (Done::RolledBack, phase) => phase,
            (_, phase) => phase,
        })
    }

    /// A batch of `table` ended with `claimed` rows: the next table, or a
    /// new round, at once if a batch was full, else after the idle wait.
    fn after_batch(&mut self, table: usize, claimed: usize) -> Phase {
        if claimed > 0 {
            self.idle_wait = MIN_IDLE_WAIT;
        }
        self.round_full |= claimed >= self.config.batch_size;
        self.next_table = (table + 1) % self.tables.len().max(1);
        let now = Instant::now();
        if self.next_table != 0 || std::mem::take(&mut self.round_full) {
            Phase::Idle { poll_at: now }
        } else {
            Phase::Idle {
                poll_at: now + self.idle_wait,
            }
        }
    }

    fn on_outcomes(
        &mut self,
        outcomes: Vec<Outcome<RowTag>>,
        phase: Phase,
        work: &mut Option<Work>,
    ) -> Phase {
        match phase {
            Phase::Publishing {
                mut batch,
                last_progress,
            } => {
                let progressed = self.apply(&mut batch, outcomes);
                let last_progress = if progressed {
                    Instant::now()
                } else {
                    last_progress
                };
                self.publishing(batch, last_progress, work)
            }
            Phase::Draining { mut batch } => {
                self.apply(&mut batch, outcomes);
                if work.is_none() {
                    self.draining(batch)
                } else {
                    Phase::Draining { batch }
                }
            }
            other => other,
        }
    }

    /// Applies outcomes to the batch, handing over the dead letters they
    /// ask for; true if a row settled.
    fn apply(&mut self, batch: &mut Batch, outcomes: Vec<Outcome<RowTag>>) -> bool {
        let mut any = false;
        let mut outcomes = std::collections::VecDeque::from(outcomes);
        while let Some(outcome) = outcomes.pop_front() {
            if let Outcome::Delivered {
                tag,
                ref topic,
                dead_letter,
            } = outcome
            {
                if tag.batch == batch.number {
                    m::count_delivered(&self.live, topic.clone(), batch.created(tag), dead_letter);
                }
            }
            let (settled, instead) = batch.apply(outcome, &self.config.router.dead_letter_topic);
            any |= settled;
            if let Some(out) = instead {
                outcomes.extend(self.publisher.publish(out));
            }
        }
        self.live
            .record_in_flight(batch.sending(), batch.sending_bytes());
        any
    }

    /// A batch whose records are on their way: settle it once every row
    /// settled (after the last tries of rows out of attempts).
    fn publishing(
        &mut self,
        mut batch: Batch,
        last_progress: Instant,
        work: &mut Option<Work>,
    ) -> Phase {
        if batch.sending() > 0 {
            return Phase::Publishing {
                batch,
                last_progress,
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
            return self.publishing(batch, last_progress, work);
        }
        let Some(client) = self.client.clone() else {
            return Phase::Draining { batch };
        };
        let settlement = batch.settlement(self.config.max_backoff);
        let table = batch.table.clone();
        let on_published = self.config.on_published;
        let dead_letter_table = self.config.dead_letter_table.clone();
        let live = Arc::clone(&self.live);
        *work = Some(Box::pin(async move {
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
            )
            .await?;
            client.batch_execute("COMMIT").await?;
            live.record_settle(started.elapsed());
            Ok(Done::Settled)
        }));
        Phase::Settling { batch }
    }

    /// Rolled back: once nothing of the batch is with the producer, the
    /// next claim may go.
    fn draining(&mut self, batch: Batch) -> Phase {
        if batch.sending() > 0 {
            return Phase::Draining { batch };
        }
        self.set_waiting_for_broker(false);
        Phase::Idle {
            poll_at: Instant::now(),
        }
    }

    fn set_waiting_for_broker(&self, waiting: bool) {
        self.live.set_waiting_for_broker(waiting);
        metrics::gauge!(m::WAITING_FOR_BROKER).set(if waiting { 1.0 } else { 0.0 });
    }

    /// SQL failed: count it (a permanent error ends the relay after a few
    /// tries, with its fix), drop the connection, connect again later.
    fn on_failure(
        &mut self,
        error: PollError,
        phase: Phase,
        _work: &mut Option<Work>,
    ) -> Result<Phase, PollError> {
        self.failures += 1;
        self.client = None;
        self.live.set_connected(false);
        self.live.set_last_error(&error.to_string());
        metrics::gauge!(m::REPLICATION_CONNECTED).set(0.0);
        metrics::counter!(m::RECONNECTS_TOTAL).increment(1);
        let permanent = match &error {
            PollError::Sql(e) => !e.is_transient(),
            PollError::NotSetUp(_) | PollError::Publish(_) | PollError::Gave(_) => true,
        };
        tracing::warn!(%error, attempt = self.failures, "polling failed");
        if permanent && self.failures >= self.config.permanent_error_attempts {
            return Err(PollError::Gave(error.to_string()));
        }
        // The server rolled the claim back; records already with the
        // producer are waited for before the next claim.
        if let Phase::Publishing { batch, .. }
        | Phase::Settling { batch }
        | Phase::Draining { batch } = phase
        {
            if batch.sending() > 0 {
                return Ok(Phase::Draining { batch });
            }
        }
        Ok(Phase::Disconnected {
            retry_at: Instant::now() + backoff(self.failures, self.config.max_backoff),
        })
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

/// The SQL work under way, or never.
async fn run_work(work: &mut Option<Work>) -> Result<Done, PollError> {
    match work.as_mut() {
        Some(work) => work.await,
        None => std::future::pending().await,
    }
}
