//! The ordinary SQL connection (tokio-postgres, TLS through rustls) used by
//! `setup`, `check`, `status`, slot creation, the slot monitor and the
//! heartbeat; and [`SqlError`], which says which server failed, what it or
//! the operating system said, and what to do about it.

use std::fmt;
use std::io;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::postgres::{
    ConnectionConfig, ServerError, describe_failures, first_suitable, os_error_fix,
};

/// An SQL connection that knows where it goes, so every failure says so.
pub struct SqlClient {
    client: tokio_postgres::Client,
    address: String,
    /// Why the connection ended, once it has.
    closed: watch::Receiver<Option<ClosedReason>>,
}

/// Why an SQL connection ended: the server's SQLSTATE (57P01 when it was
/// terminated, as at a fast shutdown) and the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClosedReason {
    pub sqlstate: Option<String>,
    pub message: String,
}

impl SqlClient {
    pub async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, SqlError> {
        self.client
            .query(sql, params)
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, SqlError> {
        self.client
            .query_one(sql, params)
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, SqlError> {
        self.client
            .query_opt(sql, params)
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, SqlError> {
        self.client
            .execute(sql, params)
            .await
            .map_err(|e| self.error(e))
    }

    pub async fn batch_execute(&self, sql: &str) -> Result<(), SqlError> {
        self.client
            .batch_execute(sql)
            .await
            .map_err(|e| self.error(e))
    }

    /// The tokio-postgres client, for what the wrappers above do not cover
    /// (transactions, COPY); map its errors with [`SqlClient::error`].
    pub fn inner(&mut self) -> &mut tokio_postgres::Client {
        &mut self.client
    }

    /// A tokio-postgres error of this connection, classified.
    pub fn error(&self, error: tokio_postgres::Error) -> SqlError {
        SqlError::from_postgres(&self.address, error)
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Waits until the connection ends, and says why.
    pub async fn closed(&mut self) -> ClosedReason {
        match self.closed.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().expect("waited for Some"),
            Err(_) => ClosedReason {
                sqlstate: None,
                message: "the connection task ended".into(),
            },
        }
    }
}

/// Opens an SQL connection with `config`'s settings, TLS included, to
/// the first of its hosts that suits its `target_session_attrs`; the
/// connection task runs in the background until the client is dropped.
pub async fn connect(config: &ConnectionConfig) -> Result<SqlClient, SqlError> {
    let check = config.target_session_attrs.needs_check();
    if config.hosts.len() == 1 && !check {
        return connect_one(config).await;
    }
    let found = first_suitable(config, |host| async move {
        let client = connect_one(&host).await?;
        let (in_recovery, read_only) = if check {
            let timeout = host.connect_timeout.unwrap_or(Duration::from_secs(30));
            let row = tokio::time::timeout(
                timeout,
                client.query_one(
                    "SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on'",
                    &[],
                ),
            )
            .await
            .map_err(|_| timed_out(&host.address(), timeout, "to the query for its state"))??;
            (row.get(0), row.get(1))
        } else {
            (false, false)
        };
        Ok((client, in_recovery, read_only))
    })
    .await;
    found.map_err(|mut failures| {
        if failures.len() == 1 && failures[0].1.is_err() {
            return failures.remove(0).1.unwrap_err();
        }
        SqlError::new(
            &config.address(),
            SqlCause::NoSuitableHost {
                attrs: config.target_session_attrs.as_str(),
                failures: describe_failures(&failures),
            },
        )
    })
}

/// Opens an SQL connection that hands the channel names of the
/// notifications it receives (after `LISTEN`) to the returned receiver.
pub async fn connect_listening(
    config: &ConnectionConfig,
) -> Result<(SqlClient, mpsc::UnboundedReceiver<String>), SqlError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = connect_one_with(config, Some(tx)).await?;
    Ok((client, rx))
}

/// Opens an SQL connection to the first host of `config`.
async fn connect_one(config: &ConnectionConfig) -> Result<SqlClient, SqlError> {
    connect_one_with(config, None).await
}

/// `connect_timeout` (30 s when unset) bounds the whole connect, TLS and
/// authentication too, as in libpq: tokio-postgres bounds only the TCP
/// connect, and a host that accepts and then freezes must be given up on.
async fn connect_one_with(
    config: &ConnectionConfig,
    notifications: Option<mpsc::UnboundedSender<String>>,
) -> Result<SqlClient, SqlError> {
    let timeout = config.connect_timeout.unwrap_or(Duration::from_secs(30));
    tokio::time::timeout(timeout, open(config, notifications))
        .await
        .map_err(|_| timed_out(&config.address(), timeout, "(connect_timeout)"))?
}

/// An error for a server that did not answer in time.
fn timed_out(address: &str, timeout: Duration, what: &str) -> SqlError {
    SqlError::new(
        address,
        SqlCause::Os(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?} {what}"),
        )),
    )
}

async fn open(
    config: &ConnectionConfig,
    notifications: Option<mpsc::UnboundedSender<String>>,
) -> Result<SqlClient, SqlError> {
    let address = config.address();
    let tls = crate::postgres::tls::client_config(config)
        .map_err(|e| SqlError::new(&address, SqlCause::Tls(e.to_string())))?;
    let pg = config.to_tokio_postgres();
    // tokio-postgres says only "invalid configuration" when the server
    // asks for a password and there is none.
    let no_password = config.password.is_none();
    let at = |e: tokio_postgres::Error| {
        if no_password && e.to_string() == "invalid configuration" {
            return SqlError::new(
                &address,
                SqlCause::Other(
                    "the server asks for a password but the connection has none: give it in --pg-url (password=), PGPASSWORD, or a line of the password file (PGPASSFILE, ~/.pgpass, mode 0600)".into(),
                ),
            );
        }
        SqlError::from_postgres(&address, e)
    };
    let (closed_tx, closed) = watch::channel(None);
    let client = match tls {
        Some(tls) => {
            let connector = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
            let (client, connection) = pg.connect(connector).await.map_err(at)?;
            tokio::spawn(drive(connection, address.clone(), closed_tx, notifications));
            client
        }
        None => {
            let (client, connection) = pg.connect(tokio_postgres::NoTls).await.map_err(at)?;
            tokio::spawn(drive(connection, address.clone(), closed_tx, notifications));
            client
        }
    };
    Ok(SqlClient {
        client,
        address,
        closed,
    })
}

/// Runs the connection until it ends, passing on notifications, then
/// tells why it ended.
async fn drive<T>(
    mut connection: tokio_postgres::Connection<tokio_postgres::Socket, T>,
    address: String,
    closed: watch::Sender<Option<ClosedReason>>,
    notifications: Option<mpsc::UnboundedSender<String>>,
) where
    T: tokio_postgres::tls::TlsStream + Unpin,
{
    let ended = loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                if let Some(tx) = &notifications {
                    let _ = tx.send(n.channel().to_owned());
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => break Err(e),
            None => break Ok(()),
        }
    };
    let reason = match ended {
        Ok(()) => ClosedReason {
            sqlstate: None,
            message: "closed".into(),
        },
        Err(e) => {
            let error = SqlError::from_postgres(&address, e);
            tracing::debug!(error = %error, "SQL connection closed");
            ClosedReason {
                sqlstate: error.sqlstate().map(str::to_owned),
                message: error.to_string(),
            }
        }
    };
    closed.send_replace(Some(reason));
}

/// An SQL connection that reconnects on first use after it broke, for
/// background tasks (slot monitor, heartbeat) that must outlive database
/// restarts.
pub struct SqlSession {
    config: ConnectionConfig,
    client: Option<SqlClient>,
}

impl SqlSession {
    pub fn new(config: ConnectionConfig) -> Self {
        SqlSession {
            config,
            client: None,
        }
    }

    /// The connected client, connecting first if there is none or it closed.
    pub async fn client(&mut self) -> Result<&SqlClient, SqlError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = None;
            self.client = Some(connect(&self.config).await?);
        }
        Ok(self.client.as_ref().expect("connected above"))
    }

    /// Where this session connects, for messages.
    pub fn address(&self) -> String {
        self.config.address()
    }

    /// Waits until the current connection ends (never, without one).
    pub async fn closed(&mut self) -> ClosedReason {
        match self.client.as_mut() {
            Some(client) => client.closed().await,
            None => std::future::pending().await,
        }
    }
}

/// A failed connection or statement on the SQL connection.
#[derive(Debug)]
pub struct SqlError {
    /// `host:port` (or the socket path) of the server.
    pub address: String,
    pub cause: SqlCause,
}

/// What went wrong.
#[derive(Debug)]
pub enum SqlCause {
    /// The server answered with an error.
    Server(ServerError),
    /// The operating system: refused, timed out, name resolution, reset.
    Os(io::Error),
    /// TLS could not be set up or negotiated.
    Tls(String),
    /// The server closed the connection.
    Closed,
    /// Anything else tokio-postgres reports (a protocol or type error).
    Other(String),
    /// Several hosts, none of which suits `target_session_attrs`.
    NoSuitableHost {
        attrs: &'static str,
        failures: String,
    },
}

impl SqlError {
    pub fn new(address: &str, cause: SqlCause) -> Self {
        SqlError {
            address: address.to_owned(),
            cause,
        }
    }

    /// Classifies a tokio-postgres error: the server's own error fields
    /// when it sent some, else the operating system's error underneath.
    pub fn from_postgres(address: &str, error: tokio_postgres::Error) -> Self {
        let cause = if let Some(db) = error.as_db_error() {
            SqlCause::Server(ServerError::from_db_error(db))
        } else if let Some(os) = io_source(&error) {
            SqlCause::Os(io::Error::new(os.kind(), os.to_string()))
        } else if error.is_closed() {
            SqlCause::Closed
        } else {
            let text = error.to_string();
            if text.contains("TLS") || text.contains("tls") || text.contains("certificate") {
                SqlCause::Tls(text)
            } else {
                SqlCause::Other(text)
            }
        };
        SqlError::new(address, cause)
    }

    /// The server's error, if it sent one.
    pub fn server(&self) -> Option<&ServerError> {
        match &self.cause {
            SqlCause::Server(e) => Some(e),
            _ => None,
        }
    }

    /// The server's SQLSTATE, if it sent one.
    pub fn sqlstate(&self) -> Option<&str> {
        self.server().map(|e| e.code.as_str())
    }

    /// Whether trying again later can work without anyone changing
    /// anything: the connection or the server went away, a deadlock or
    /// serialization failure, a server short of resources or shutting
    /// down, no suitable host yet (a failover in progress).
    pub fn is_transient(&self) -> bool {
        match &self.cause {
            SqlCause::Os(_) | SqlCause::Closed | SqlCause::NoSuitableHost { .. } => true,
            SqlCause::Server(e) => {
                matches!(
                    &e.code[..2.min(e.code.len())],
                    "08" | "40" | "53" | "57" | "58"
                ) || e.code == "55P03"
            }
            SqlCause::Tls(_) | SqlCause::Other(_) => false,
        }
    }
}

/// The first `io::Error` in an error's source chain.
fn io_source<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut current = error.source();
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return Some(io);
        }
        current = e.source();
    }
    None
}

impl fmt::Display for SqlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PostgreSQL at {}: ", self.address)?;
        match &self.cause {
            SqlCause::Server(e) => write!(f, "{e}"),
            SqlCause::Os(e) => {
                write!(f, "{e}")?;
                if let Some(fix) = os_error_fix(e) {
                    write!(f, "; fix: {fix}")?;
                }
                Ok(())
            }
            SqlCause::Tls(reason) => write!(
                f,
                "TLS failed: {reason}; fix: check sslmode, sslrootcert and the host name in --pg-url against the server's certificate"
            ),
            SqlCause::Closed => write!(f, "the server closed the connection"),
            SqlCause::NoSuitableHost { attrs, failures } => write!(
                f,
                "no server will do for target_session_attrs={attrs}: {failures}; fix: check that one of them is up and is what target_session_attrs asks for"
            ),
            SqlCause::Other(text) => write!(f, "{text}"),
        }
    }
}

impl std::error::Error for SqlError {}
