//! What a lane asks of PostgreSQL, behind one trait: connect, claim, note
//! rows in flight, settle. The loop (`poll_relay.rs`) only sees
//! [`OutboxStore`]; [`PgStore`] is the real one, and the tests run the loop
//! on an in-memory outbox (`memory.rs`), as the WAL relay's run on a
//! scripted walsender (`relay/session.rs`'s `Connector`).

use std::sync::Arc;

use tokio::sync::mpsc;

use super::batch::Settlement;
use super::claim::{self, Claim, LaneShare, OutboxTable};
use super::settle;
use super::{PollConfig, PollError, load_tables, schema};
use crate::publish::LocalBoxFuture;
use crate::sql::{self, SqlClient, SqlError};

/// The outbox as a lane works on it. Each future is one unit of a lane's
/// work, which the loop bounds with its timeout.
pub trait OutboxStore {
    /// One lane's connection(s), handed back with each call.
    type Conn: Clone + 'static;

    /// A new connection for a lane, with the session set up and the outbox
    /// tables loaded; with `listen`, a connection for wakeups too.
    fn connect(&self, listen: bool) -> LocalBoxFuture<Result<Connected<Self::Conn>, PollError>>;

    /// Opens the lane's transaction and claims up to `limit` rows of
    /// `table` in `share`; a claim that found nothing ends the transaction.
    fn claim(
        &self,
        conn: Self::Conn,
        table: OutboxTable,
        limit: i64,
        share: LaneShare,
    ) -> LocalBoxFuture<Result<Claim, PollError>>;

    /// Exactly once: notes `seqs` as possibly sent, committed before they
    /// are sent (outside the claim's transaction).
    fn mark_in_flight(
        &self,
        conn: Self::Conn,
        table: OutboxTable,
        seqs: Vec<i64>,
    ) -> LocalBoxFuture<Result<(), PollError>>;

    /// Writes the batch's outcome back (dead letters kept whole first) and
    /// commits the claim's transaction.
    fn settle(
        &self,
        conn: Self::Conn,
        table: OutboxTable,
        settlement: Settlement,
    ) -> LocalBoxFuture<Result<(), PollError>>;
}

/// A lane's new connection.
pub struct Connected<C> {
    pub conn: C,
    /// The server, for the dashboard and the logs.
    pub host: String,
    pub tables: Vec<OutboxTable>,
    pub wakeups: Option<Wakeups>,
}

/// Notifications of new rows (the insert trigger's NOTIFY), while the
/// connection that listens is open.
pub struct Wakeups {
    pub rx: mpsc::UnboundedReceiver<String>,
    open: Box<dyn Fn() -> bool>,
}

impl Wakeups {
    /// `open` says whether the listening connection (which it keeps) is
    /// still open.
    pub fn new(rx: mpsc::UnboundedReceiver<String>, open: impl Fn() -> bool + 'static) -> Self {
        Wakeups {
            rx,
            open: Box::new(open),
        }
    }

    pub fn is_open(&self) -> bool {
        (self.open)()
    }
}

/// The outbox in PostgreSQL.
pub struct PgStore {
    config: PollConfig,
}

impl PgStore {
    pub fn new(config: PollConfig) -> Self {
        PgStore { config }
    }
}

/// A lane's connections to PostgreSQL.
#[derive(Clone)]
pub struct PgConn {
    /// The connection whose transaction claims and settles.
    client: Arc<SqlClient>,
    /// Exactly once: a second connection, for the in-flight notes that must
    /// commit before a batch is sent (the claim's transaction is still
    /// open then).
    marks: Option<Arc<SqlClient>>,
}

impl OutboxStore for PgStore {
    type Conn = PgConn;

    fn connect(&self, wakeups: bool) -> LocalBoxFuture<Result<Connected<PgConn>, PollError>> {
        let config = self.config.clone();
        Box::pin(async move {
            let client = sql::connect(&config.pg).await?;
            // A batch's claim stays open while the broker is waited for: a
            // server-side idle timeout would roll it back and let another
            // relay send rows this relay's producer still holds.
            client
                .batch_execute("SET idle_in_transaction_session_timeout = 0")
                .await?;
            let tables = load_tables(&client, &config.router).await?;
            let marks = if config.delivery.is_exactly_once() {
                Some(Arc::new(sql::connect(&config.pg).await?))
            } else {
                None
            };
            let wakeups = if wakeups { listen(&config).await } else { None };
            Ok(Connected {
                host: client.address().to_owned(),
                conn: PgConn {
                    client: Arc::new(client),
                    marks,
                },
                tables,
                wakeups,
            })
        })
    }

    fn claim(
        &self,
        conn: PgConn,
        table: OutboxTable,
        limit: i64,
        share: LaneShare,
    ) -> LocalBoxFuture<Result<Claim, PollError>> {
        Box::pin(async move {
            let client = &conn.client;
            client.batch_execute(claim::BEGIN_CLAIM).await?;
            let claim = claim::claim(client, &table, limit, share).await?;
            if claim.rows.is_empty() {
                // Nothing to hold: end the transaction now.
                client.batch_execute("ROLLBACK").await?;
            }
            Ok(claim)
        })
    }

    fn mark_in_flight(
        &self,
        conn: PgConn,
        table: OutboxTable,
        seqs: Vec<i64>,
    ) -> LocalBoxFuture<Result<(), PollError>> {
        Box::pin(async move {
            let marks = conn.marks.as_ref().unwrap_or(&conn.client);
            claim::mark_in_flight(marks, &table, &seqs).await?;
            Ok(())
        })
    }

    fn settle(
        &self,
        conn: PgConn,
        table: OutboxTable,
        settlement: Settlement,
    ) -> LocalBoxFuture<Result<(), PollError>> {
        let on_published = self.config.on_published;
        let dead_letter_table = self.config.dead_letter_table.clone();
        let exactly_once = self.config.delivery.is_exactly_once();
        Box::pin(async move {
            let client = &conn.client;
            for letter in &settlement.dead_letters {
                crate::dead_letters::store(client, &dead_letter_table, letter).await?;
            }
            settle::settle(
                client,
                &table,
                on_published,
                &settlement.published,
                &settlement.failed,
                exactly_once,
            )
            .await?;
            client.batch_execute("COMMIT").await?;
            Ok(())
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
        .map(|(client, rx)| Wakeups::new(rx, move || !client.is_closed()))
}
