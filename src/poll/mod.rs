//! `walrelay run --source poll`: the outbox without logical replication.
//!
//! ```text
//!   outbox table ──claim (one transaction)──> router ──Outgoing──> publisher ──> Kafka
//!        ^                                                                  │ acks
//!        └───────── delete / mark, attempts (same transaction, commit) <────┘
//! ```
//!
//! | file | role |
//! | --- | --- |
//! | `schema.rs` | the columns, triggers and index `setup --source poll` makes |
//! | `claim.rs` | the claim, settle and backlog SQL |
//! | `mod.rs` | the loop: claim a batch, publish it, settle it, wait for more |
//!
//! # Per-aggregate order
//!
//! The classic trap of polling relays is a row with a lower sequence
//! number that commits after one with a higher number: a relay that has
//! already published the higher one publishes the lower one after it. Two
//! rules close it:
//!
//! 1. Writers: the insert trigger takes an advisory lock on the row's
//!    aggregate, held to commit, before it numbers the row. A second writer
//!    of the same aggregate waits at its insert until the first commits,
//!    so per aggregate, rows become visible in `seq` order: a lower number
//!    can never appear later. Different aggregates never wait for each
//!    other.
//! 2. Relays: a batch claims the oldest rows no one else holds, `FOR
//!    UPDATE SKIP LOCKED` in `seq` order, and, per aggregate, stops at the
//!    first row that has an older unpublished row outside the claim. The
//!    rows a relay holds stay locked, and unpublished to everyone else,
//!    until the transaction that deletes or marks them commits, after the
//!    broker acknowledged them; so another relay only ever publishes an
//!    aggregate's next rows after the previous ones are in Kafka, while it
//!    publishes other aggregates side by side. Within a batch, rows go out
//!    in `seq` order through one idempotent producer; a row that failed
//!    holds its aggregate's later rows until its next attempt.
//!
//! Delivery is at least once: a relay that dies after the broker took a
//! batch and before its commit leaves the rows for the next claim, which
//! publishes them again with the same `id` header.

mod claim;
pub mod schema;

pub use claim::{OnPublished, OutboxTable};

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::live::{Backlog, LiveState, Role};
use crate::metrics as m;
use crate::postgres::ConnectionConfig;
use crate::record::KafkaRecord;
use crate::relay::{
    Outcome, Outgoing, Publisher, PublisherEvent, RelayError, TopicFailures, backoff, count_ack,
    sleep_until,
};
use crate::router::{ChangeAt, ChangeContext, Routed, Router, RouterConfig};
use crate::sink::{EventTicket, Sink, TxnTicket};
use crate::sql::{self, SqlClient, SqlError};
use claim::{ClaimedRow, FailedRow};

/// Shortest wait between polls of an idle outbox; it doubles up to
/// `--poll-interval` while nothing comes, and a notification ends it.
const MIN_IDLE_WAIT: Duration = Duration::from_millis(50);

/// Everything `run --source poll` needs, validated.
#[derive(Clone, Debug)]
pub struct PollConfig {
    pub pg: ConnectionConfig,
    pub router: RouterConfig,
    /// Rows claimed at most per batch (`--poll-batch-size`).
    pub batch_size: usize,
    /// Longest wait between polls of an idle outbox (`--poll-interval`).
    pub poll_interval: Duration,
    pub on_published: OnPublished,
    /// A row that failed this many times goes to the dead-letter topic.
    pub max_attempts: u32,
    /// Cap of the wait before a failed row's next attempt, and of the
    /// reconnect backoff.
    pub max_backoff: Duration,
    /// Nothing acknowledged this long: roll the claim back (so the rows
    /// are not held) and wait for the broker.
    pub broker_stall_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// Consecutive failures of a permanent kind before the relay stops.
    pub permanent_error_attempts: u32,
}

/// Why the polling source stopped.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error(transparent)]
    Sql(Box<SqlError>),
    #[error("{0}")]
    NotSetUp(String),
    #[error(transparent)]
    Relay(#[from] RelayError),
    /// A permanent error, tried a few times: the relay stops with it.
    #[error("{0}")]
    Gave(String),
}

impl From<SqlError> for PollError {
    fn from(error: SqlError) -> Self {
        PollError::Sql(Box::new(error))
    }
}

/// A claimed row on its way.
struct InFlight {
    row: ClaimedRow,
    /// What was sent: the event's record, or its dead letter.
    record: KafkaRecord,
    /// Why the row went to the dead-letter topic, if it did.
    dead_letter: Option<String>,
    state: RowState,
}

#[derive(Clone, Debug, PartialEq)]
enum RowState {
    Sending,
    /// In Kafka (as itself or as its dead letter).
    Published,
    Failed {
        error: String,
    },
}

/// How a batch ended.
enum BatchEnd {
    /// Settled and committed: this many rows claimed.
    Committed(usize),
    /// Rolled back: the broker acknowledged nothing for the stall timeout.
    Stalled,
    /// Rolled back at the shutdown deadline.
    ShutDown,
}

pub struct PollRelay<S: Sink> {
    config: PollConfig,
    router: Router,
    publisher: Publisher<S>,
    live: Arc<LiveState>,
    tables: Vec<OutboxTable>,
}

impl<S: Sink> PollRelay<S> {
    pub fn new(config: PollConfig, sink: S, live: Arc<LiveState>) -> Self {
        let mut publisher = Publisher::new(sink, config.router.dead_letter_topic.clone(), None)
            .with_topic_failures(TopicFailures::FailRecords);
        publisher.warm_up(&config.router.dead_letter_topic);
        PollRelay {
            router: Router::new(config.router.clone(), String::new()),
            publisher,
            live,
            tables: Vec::new(),
            config,
        }
    }

    /// Checks each table is set up for polling and reads its shape.
    pub async fn prepare(&mut self, client: &SqlClient) -> Result<(), PollError> {
        self.tables = load_tables(client, &self.config.router).await?;
        Ok(())
    }

    /// Polls until `shutdown` turns true, or a permanent error.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), PollError> {
        self.live.set_role(Role::Active);
        let mut client: Option<SqlClient> = None;
        let mut wakeups: Option<(SqlClient, mpsc::UnboundedReceiver<String>)> = None;
        let mut failures = 0u32;
        let mut idle_wait = MIN_IDLE_WAIT;
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            if client.as_ref().is_none_or(SqlClient::is_closed) {
                match self.connect().await {
                    Ok(c) => client = Some(c),
                    Err(error) => {
                        self.on_failure(&error, &mut failures)?;
                        if wait_or_shutdown(
                            backoff(failures, self.config.max_backoff),
                            &mut shutdown,
                        )
                        .await
                        {
                            return Ok(());
                        }
                        continue;
                    }
                }
            }
            if wakeups.as_ref().is_none_or(|(c, _)| c.is_closed()) {
                wakeups = self.listen().await;
            }
            let c = client.as_mut().expect("connected above");
            let mut claimed = 0usize;
            let mut full = false;
            let mut failed = None;
            for i in 0..self.tables.len() {
                match self.batch(c, i, &mut shutdown).await {
                    Ok(BatchEnd::Committed(n)) => {
                        claimed += n;
                        full |= n >= self.config.batch_size;
                    }
                    Ok(BatchEnd::Stalled) => {}
                    Ok(BatchEnd::ShutDown) => return Ok(()),
                    Err(error) => {
                        failed = Some(error);
                        break;
                    }
                }
            }
            if let Some(error) = failed {
                self.on_failure(&error, &mut failures)?;
                client = None;
                if wait_or_shutdown(backoff(failures, self.config.max_backoff), &mut shutdown).await
                {
                    return Ok(());
                }
                continue;
            }
            failures = 0;
            if claimed > 0 {
                idle_wait = MIN_IDLE_WAIT;
            }
            if full {
                continue; // more is waiting
            }
            let notified = async {
                let Some((_, rx)) = wakeups.as_mut() else {
                    return std::future::pending().await;
                };
                if rx.recv().await.is_none() {
                    return std::future::pending().await;
                }
                // One poll serves every notification queued so far.
                while rx.try_recv().is_ok() {}
            };
            tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                () = notified => idle_wait = MIN_IDLE_WAIT,
                () = tokio::time::sleep(idle_wait) => {
                    idle_wait = (idle_wait * 2).min(self.config.poll_interval);
                }
            }
        }
    }

    async fn connect(&mut self) -> Result<SqlClient, PollError> {
        let client = sql::connect(&self.config.pg).await?;
        // The claim's cost estimate is high (a subquery per row), which
        // would make PostgreSQL JIT-compile it on every batch: about half
        // of each claim's time, measured.
        client.batch_execute("SET jit = off").await?;
        self.prepare(&client).await?;
        self.live.set_host(Some(client.address().to_owned()));
        self.live.set_connected(true);
        metrics::gauge!(m::REPLICATION_CONNECTED).set(1.0);
        tracing::info!(
            host = client.address(),
            tables = self.tables.len(),
            "polling the outbox"
        );
        Ok(client)
    }

    /// A connection for `LISTEN`; without one the relay polls on its timer.
    async fn listen(&self) -> Option<(SqlClient, mpsc::UnboundedReceiver<String>)> {
        let listen = format!(
            "LISTEN {}",
            crate::catalog::quote_ident(schema::NOTIFY_CHANNEL)
        );
        let result = async {
            let (client, rx) = sql::connect_listening(&self.config.pg).await?;
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

    /// Counts a failed round; a permanent error ends the relay after a few
    /// tries, with its fix.
    fn on_failure(&self, error: &PollError, failures: &mut u32) -> Result<(), PollError> {
        *failures += 1;
        self.live.set_connected(false);
        self.live.set_last_error(&error.to_string());
        metrics::gauge!(m::REPLICATION_CONNECTED).set(0.0);
        metrics::counter!(m::RECONNECTS_TOTAL).increment(1);
        let permanent = match error {
            PollError::Sql(e) => !e.is_transient(),
            PollError::NotSetUp(_) | PollError::Relay(_) | PollError::Gave(_) => true,
        };
        tracing::warn!(%error, attempt = *failures, "polling failed");
        if permanent && *failures >= self.config.permanent_error_attempts {
            return Err(PollError::Gave(error.to_string()));
        }
        Ok(())
    }

    /// One batch of one table: claim, publish, settle, commit.
    async fn batch(
        &mut self,
        client: &mut SqlClient,
        table_index: usize,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<BatchEnd, PollError> {
        let address = client.address().to_owned();
        let at = |e| PollError::from(SqlError::from_postgres(&address, e));
        let table = self.tables[table_index].clone();
        let limit = self.config.batch_size as i64;
        let claim_started = Instant::now();
        let tx = client.inner().transaction().await.map_err(at)?;
        let rows = claim::claim(&tx, &table, limit).await.map_err(at)?;
        self.live.record_claim(claim_started.elapsed());
        if rows.is_empty() {
            tx.rollback().await.map_err(at)?;
            return Ok(BatchEnd::Committed(0));
        }
        metrics::counter!(m::POLL_BATCHES_TOTAL).increment(1);
        let claimed = rows.len();
        let mut batch: Vec<InFlight> = rows
            .into_iter()
            .map(|row| self.route(&table, row))
            .collect();
        for (i, row) in batch.iter().enumerate() {
            self.send(i, row);
        }
        if !self.wait(&mut batch, shutdown).await? {
            return Ok(self.abandon(tx, &mut batch, shutdown).await);
        }
        // Rows out of attempts go to the dead-letter topic, once.
        let mut last_tries = false;
        for (i, row) in batch.iter_mut().enumerate() {
            if let RowState::Failed { error } = &row.state {
                if row.row.attempts as u32 + 1 >= self.config.max_attempts {
                    let reason =
                        format!("failed {} times; last error: {error}", row.row.attempts + 1);
                    tracing::warn!(seq = row.row.seq, %reason, "row out of attempts: sending it to the dead-letter topic");
                    metrics::counter!(m::DEAD_LETTERS_TOTAL, "kind" => "max_attempts").increment(1);
                    row.record = crate::router::broker_dead_letter(
                        &self.config.router.dead_letter_topic,
                        &row.record,
                        &reason,
                        "max_attempts",
                        true,
                    );
                    row.dead_letter = Some(reason);
                    row.state = RowState::Sending;
                    last_tries = true;
                    let ticket = self.ticket(i, &row.row, &row.record, true);
                    self.publisher
                        .publish(Outgoing::new(row.record.clone(), ticket));
                }
            }
        }
        if last_tries && !self.wait(&mut batch, shutdown).await? {
            return Ok(self.abandon(tx, &mut batch, shutdown).await);
        }
        let mut published = Vec::new();
        let mut failed = Vec::new();
        for row in &batch {
            match &row.state {
                RowState::Published => published.push((row.row.seq, row.dead_letter.clone())),
                RowState::Failed { error } => {
                    metrics::counter!(m::POLL_ROW_FAILURES_TOTAL).increment(1);
                    failed.push(FailedRow {
                        seq: row.row.seq,
                        aggregate: row.row.aggregate.clone(),
                        error: error.clone(),
                        retry_in: backoff(row.row.attempts as u32 + 2, self.config.max_backoff),
                    });
                }
                RowState::Sending => unreachable!("wait returns once every row settled"),
            }
        }
        let settle_started = Instant::now();
        claim::settle(&tx, &table, self.config.on_published, &published, &failed)
            .await
            .map_err(at)?;
        tx.commit().await.map_err(at)?;
        self.live.record_settle(settle_started.elapsed());
        Ok(BatchEnd::Committed(claimed))
    }

    /// A claimed row as a record, or as its dead letter if it cannot be one.
    fn route(&self, table: &OutboxTable, row: ClaimedRow) -> InFlight {
        let ctx = ChangeContext {
            at: ChangeAt::Seq(row.seq),
            commit_time: row.created,
        };
        let (record, dead_letter) = match self.router.route_insert(&table.relation, &row.tuple, ctx)
        {
            Routed::Event(record) => (record, None),
            Routed::DeadLetter { record, error } => {
                tracing::warn!(seq = row.seq, reason = %error, kind = error.kind(), "unroutable row sent to the dead-letter topic");
                metrics::counter!(m::DEAD_LETTERS_TOTAL, "kind" => "unroutable").increment(1);
                (record, Some(error.to_string()))
            }
            Routed::Ignored => unreachable!("the relation is an outbox table"),
        };
        InFlight {
            row,
            record,
            dead_letter,
            state: RowState::Sending,
        }
    }

    fn ticket(
        &self,
        index: usize,
        row: &ClaimedRow,
        record: &KafkaRecord,
        dead_letter: bool,
    ) -> EventTicket {
        EventTicket {
            txn: TxnTicket(index as u64),
            commit_time: row.created,
            bytes: record.size(),
            dead_letter,
            position: None,
        }
    }

    fn send(&mut self, index: usize, row: &InFlight) {
        let ticket = self.ticket(index, &row.row, &row.record, row.dead_letter.is_some());
        self.publisher
            .publish(Outgoing::new(row.record.clone(), ticket));
    }

    /// Drives the publisher until every row of the batch settled (true),
    /// or the broker stalled or the shutdown deadline passed (false).
    async fn wait(
        &mut self,
        batch: &mut [InFlight],
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<bool, PollError> {
        let mut last_progress = Instant::now();
        let mut stop_deadline: Option<Instant> = None;
        loop {
            if batch.iter().all(|r| r.state != RowState::Sending) {
                return Ok(true);
            }
            let resend_at = self.publisher.due_at();
            let stall_at = Some(last_progress + self.config.broker_stall_timeout);
            tokio::select! {
                biased;
                _ = shutdown.changed(), if stop_deadline.is_none() => {
                    tracing::info!("stopping: finishing the batch in flight");
                    stop_deadline = Some(Instant::now() + self.config.shutdown_timeout);
                }
                event = self.publisher.next_event() => {
                    self.on_event(event)?;
                    if self.apply_outcomes(batch) {
                        last_progress = Instant::now();
                    }
                }
                _ = sleep_until(resend_at), if resend_at.is_some() => {
                    self.publisher.resend_due();
                    if self.apply_outcomes(batch) {
                        last_progress = Instant::now();
                    }
                }
                _ = sleep_until(stall_at) => return Ok(false),
                _ = sleep_until(stop_deadline), if stop_deadline.is_some() => return Ok(false),
            }
        }
    }

    fn on_event(&mut self, event: PublisherEvent) -> Result<(), PollError> {
        match event {
            PublisherEvent::Delivery(delivery) => {
                self.publisher.on_delivery(delivery);
                while let Some(delivery) = self.publisher.try_delivery() {
                    self.publisher.on_delivery(delivery);
                }
            }
            PublisherEvent::Prepared(topic, result) => self.publisher.on_prepared(topic, result)?,
            PublisherEvent::Scanned(..) => {}
        }
        Ok(())
    }

    /// What became of records, onto their rows; true if any settled.
    fn apply_outcomes(&mut self, batch: &mut [InFlight]) -> bool {
        let mut any = false;
        for outcome in self.publisher.take_outcomes() {
            let (index, state) = match outcome {
                Outcome::Acked { ticket, topic } => {
                    count_ack(&self.live, &ticket, topic);
                    if ticket.dead_letter && batch[ticket.txn.0 as usize].dead_letter.is_none() {
                        batch[ticket.txn.0 as usize].dead_letter =
                            Some("the broker refused the record".into());
                    }
                    (ticket.txn.0, RowState::Published)
                }
                // A dead letter the broker refused too: logged by the
                // publisher; the row moves on rather than wedge its aggregate.
                Outcome::GaveUp { ticket } => (ticket.txn.0, RowState::Published),
                Outcome::Failed { ticket, error } => (ticket.txn.0, RowState::Failed { error }),
                Outcome::Skipped { .. } | Outcome::Resized { .. } => continue,
            };
            if let Some(row) = batch.get_mut(index as usize) {
                if row.state == RowState::Sending {
                    row.state = state;
                    any = true;
                }
            }
        }
        let sending = batch.iter().filter(|r| r.state == RowState::Sending);
        self.live.record_in_flight(
            sending.clone().count(),
            sending.map(|r| r.record.size()).sum(),
        );
        any
    }

    /// Rolls the claim back (its rows go back to the table for the next
    /// claim), then waits for the records already handed to the producer,
    /// so the next batch does not overtake them.
    async fn abandon(
        &mut self,
        tx: tokio_postgres::Transaction<'_>,
        batch: &mut [InFlight],
        shutdown: &mut watch::Receiver<bool>,
    ) -> BatchEnd {
        if let Err(error) = tx.rollback().await {
            tracing::debug!(%error, "rollback of the claim failed; the server rolls it back");
        }
        if *shutdown.borrow() {
            return BatchEnd::ShutDown;
        }
        tracing::warn!(
            timeout = ?self.config.broker_stall_timeout,
            "the broker acknowledged nothing: the claim is rolled back; waiting for the broker"
        );
        self.live.set_waiting_for_broker(true);
        metrics::gauge!(m::WAITING_FOR_BROKER).set(1.0);
        let drained = loop {
            if batch.iter().all(|r| r.state != RowState::Sending) {
                break BatchEnd::Stalled;
            }
            let resend_at = self.publisher.due_at();
            tokio::select! {
                biased;
                _ = shutdown.changed() => break BatchEnd::ShutDown,
                event = self.publisher.next_event() => {
                    if let Err(error) = self.on_event(event) {
                        tracing::warn!(%error, "while waiting for the broker");
                    }
                    self.apply_outcomes(batch);
                }
                _ = sleep_until(resend_at), if resend_at.is_some() => {
                    self.publisher.resend_due();
                    self.apply_outcomes(batch);
                }
            }
        };
        self.live.set_waiting_for_broker(false);
        metrics::gauge!(m::WAITING_FOR_BROKER).set(0.0);
        drained
    }
}

/// The outbox tables of `router`, checked to be set up for polling.
pub async fn load_tables(
    client: &SqlClient,
    router: &RouterConfig,
) -> Result<Vec<OutboxTable>, PollError> {
    let mut tables = Vec::new();
    for (schema, table) in &router.tables {
        if !crate::catalog::table_exists(client, schema, table).await? {
            return Err(PollError::NotSetUp(format!(
                "outbox table {schema}.{table} does not exist: run `walrelay setup --source poll`"
            )));
        }
        let missing = schema::missing_pieces(client, schema, table).await?;
        if !missing.is_empty() {
            return Err(PollError::NotSetUp(format!(
                "outbox table {schema}.{table} is not set up for polling (it has no {}): run `walrelay setup --source poll`",
                missing.join(", no ")
            )));
        }
        tables.push(OutboxTable::load(client, schema, table, &router.columns).await?);
    }
    Ok(tables)
}

/// Reads each table's backlog every `interval` into the metrics and the
/// live state, until the process ends.
pub fn spawn_backlog_monitor(
    pg: ConnectionConfig,
    router: RouterConfig,
    interval: Duration,
    live: Arc<LiveState>,
) {
    tokio::spawn(async move {
        let mut session: Option<(SqlClient, Vec<OutboxTable>)> = None;
        loop {
            if session.as_ref().is_none_or(|(c, _)| c.is_closed()) {
                session = async {
                    let client = sql::connect(&pg).await.ok()?;
                    let tables = load_tables(&client, &router).await.ok()?;
                    Some((client, tables))
                }
                .await;
            }
            if let Some((client, tables)) = &session {
                let mut total = Backlog::default();
                for table in tables {
                    match claim::backlog(client, table).await {
                        Ok(backlog) => {
                            let name = table.name();
                            metrics::gauge!(m::OUTBOX_PENDING_ROWS, "table" => name.clone())
                                .set(backlog.pending_rows as f64);
                            metrics::gauge!(m::OUTBOX_FAILING_ROWS, "table" => name.clone())
                                .set(backlog.failing_rows as f64);
                            metrics::gauge!(m::OUTBOX_OLDEST_PENDING_SECONDS, "table" => name)
                                .set(backlog.oldest_pending_seconds.unwrap_or(0.0));
                            total.pending_rows += backlog.pending_rows;
                            total.failing_rows += backlog.failing_rows;
                            total.oldest_pending_seconds = match (
                                total.oldest_pending_seconds,
                                backlog.oldest_pending_seconds,
                            ) {
                                (Some(a), Some(b)) => Some(a.max(b)),
                                (a, b) => a.or(b),
                            };
                        }
                        Err(error) => {
                            tracing::debug!(%error, "backlog query failed");
                            metrics::counter!(m::MONITOR_ERRORS_TOTAL).increment(1);
                            live.counters
                                .monitor_errors
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
                live.set_backlog(Some(total));
            }
            tokio::time::sleep(interval).await;
        }
    });
}

/// Sleeps `wait`; true if shutdown came first.
async fn wait_or_shutdown(wait: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = shutdown.changed() => true,
        () = tokio::time::sleep(wait) => false,
    }
}
