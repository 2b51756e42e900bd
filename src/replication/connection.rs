//! A walsender connection: startup, authentication, simple queries and the
//! replication commands. `stream.rs` takes over once START_REPLICATION
//! switches the connection into CopyBoth mode.

use std::collections::HashMap;
use std::time::Duration;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::error::ReplicationError;
use super::stream::ReplicationStream;
use super::wire::{BackendMessage, Socket, Wire};
use crate::lsn::Lsn;
use crate::postgres::config::{ConnectionConfig, Host, SslMode};
use crate::postgres::{describe_failures, first_suitable, quote_ident, quote_literal};

/// Server identity from IDENTIFY_SYSTEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemIdentity {
    pub system_id: String,
    pub timeline: u32,
    /// The current WAL flush position.
    pub xlog_pos: Lsn,
    pub dbname: Option<String>,
}

/// A slot made by CREATE_REPLICATION_SLOT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreatedSlot {
    pub name: String,
    /// Changes committed after this position will be decoded.
    pub consistent_point: Lsn,
}

/// Options of START_REPLICATION for pgoutput.
#[derive(Clone, Debug)]
pub struct StartOptions {
    pub slot: String,
    pub start_lsn: Lsn,
    pub publications: Vec<String>,
    /// `None`: the highest version the server supports.
    pub proto_version: Option<u32>,
    /// Ask for logical decoding messages (`pg_logical_emit_message`).
    pub messages: bool,
}

/// Result rows of a simple query, as text.
pub type Rows = Vec<Vec<Option<String>>>;

/// An authenticated walsender connection (`replication=database`).
pub struct ReplicationConnection {
    wire: Wire,
    parameters: HashMap<String, String>,
}

impl ReplicationConnection {
    /// Connects to the first server of `config` that suits its
    /// `target_session_attrs`, authenticates and waits until it is ready.
    pub async fn connect(config: &ConnectionConfig) -> Result<Self, ReplicationError> {
        let check = config.target_session_attrs.needs_check();
        if config.hosts.len() == 1 && !check {
            return Self::connect_one(config).await;
        }
        let found = first_suitable(config, |host| async move {
            let mut conn = Self::connect_one(&host).await?;
            let (in_recovery, read_only) = if check {
                conn.server_state().await?
            } else {
                (false, false)
            };
            Ok((conn, in_recovery, read_only))
        })
        .await;
        found.map_err(|mut failures| {
            if failures.len() == 1 && failures[0].1.is_err() {
                return failures.remove(0).1.unwrap_err();
            }
            ReplicationError::NoSuitableHost {
                attrs: config.target_session_attrs.as_str(),
                failures: describe_failures(&failures),
            }
        })
    }

    /// Whether the server is in recovery, and whether its transactions are
    /// read-only (what `target_session_attrs` asks about).
    async fn server_state(&mut self) -> Result<(bool, bool), ReplicationError> {
        let rows = self
            .simple_query("SELECT pg_is_in_recovery(), current_setting('transaction_read_only')")
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| ReplicationError::Protocol("no row for the server's state".into()))?;
        let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        Ok((field(0) == "t", field(1) == "on"))
    }

    /// Connects to the first host of `config`.
    async fn connect_one(config: &ConnectionConfig) -> Result<Self, ReplicationError> {
        let timeout = config.connect_timeout.unwrap_or(Duration::from_secs(30));
        let socket = tokio::time::timeout(timeout, open_socket(config))
            .await
            .map_err(|_| ReplicationError::Connect {
                address: config.address(),
                error: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {timeout:?}"),
                ),
            })??;
        let mut conn = ReplicationConnection {
            wire: Wire::new(socket, config.address()),
            parameters: HashMap::new(),
        };
        conn.startup(config).await?;
        Ok(conn)
    }

    async fn startup(&mut self, config: &ConnectionConfig) -> Result<(), ReplicationError> {
        // Fixed output settings, so timestamps and text values decode the
        // same way whatever the server's defaults are.
        let params = [
            ("user", config.user.as_str()),
            ("database", config.dbname.as_str()),
            ("replication", "database"),
            ("application_name", config.application_name.as_str()),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO"),
            ("TimeZone", "UTC"),
            ("bytea_output", "hex"),
        ];
        frontend::startup_message(params, self.wire.out())?;
        self.wire.flush().await?;
        self.authenticate(config).await?;
        loop {
            match self.read().await? {
                backend::Message::ParameterStatus(p) => {
                    self.parameters
                        .insert(p.name()?.to_owned(), p.value()?.to_owned());
                }
                backend::Message::BackendKeyData(_) | backend::Message::NoticeResponse(_) => {}
                backend::Message::ReadyForQuery(_) => return Ok(()),
                other => return Err(unexpected("startup", &other)),
            }
        }
    }

    async fn authenticate(&mut self, config: &ConnectionConfig) -> Result<(), ReplicationError> {
        let password = || {
            config
                .password
                .as_ref()
                .map(|p| p.expose().as_bytes())
                .ok_or(ReplicationError::PasswordRequired)
        };
        match self.read().await? {
            backend::Message::AuthenticationOk => return Ok(()),
            backend::Message::AuthenticationCleartextPassword => {
                frontend::password_message(password()?, self.wire.out())?;
            }
            backend::Message::AuthenticationMd5Password(body) => {
                let hash = md5_hash(config.user.as_bytes(), password()?, body.salt());
                frontend::password_message(hash.as_bytes(), self.wire.out())?;
            }
            backend::Message::AuthenticationSasl(body) => {
                let mut mechanisms = body.mechanisms();
                let mut has_scram = false;
                while let Some(m) = mechanisms.next()? {
                    has_scram |= m == sasl::SCRAM_SHA_256;
                }
                if !has_scram {
                    return Err(ReplicationError::UnsupportedAuthentication(
                        "SASL without SCRAM-SHA-256".into(),
                    ));
                }
                self.scram(password()?).await?;
            }
            backend::Message::AuthenticationGss | backend::Message::AuthenticationSspi => {
                return Err(ReplicationError::UnsupportedAuthentication(
                    "GSSAPI/SSPI".into(),
                ));
            }
            backend::Message::AuthenticationKerberosV5 => {
                return Err(ReplicationError::UnsupportedAuthentication(
                    "Kerberos V5".into(),
                ));
            }
            backend::Message::AuthenticationScmCredential => {
                return Err(ReplicationError::UnsupportedAuthentication(
                    "SCM credential".into(),
                ));
            }
            other => return Err(unexpected("authentication", &other)),
        }
        if !matches!(
            self.wire_flush_then_read().await?,
            backend::Message::AuthenticationOk
        ) {
            return Err(ReplicationError::Protocol(
                "authentication did not end with AuthenticationOk".into(),
            ));
        }
        Ok(())
    }

    async fn scram(&mut self, password: &[u8]) -> Result<(), ReplicationError> {
        let mut scram = sasl::ScramSha256::new(password, sasl::ChannelBinding::unsupported());
        frontend::sasl_initial_response(sasl::SCRAM_SHA_256, scram.message(), self.wire.out())?;
        match self.wire_flush_then_read().await? {
            backend::Message::AuthenticationSaslContinue(body) => scram.update(body.data())?,
            other => return Err(unexpected("SCRAM exchange", &other)),
        }
        frontend::sasl_response(scram.message(), self.wire.out())?;
        match self.wire_flush_then_read().await? {
            backend::Message::AuthenticationSaslFinal(body) => scram.finish(body.data())?,
            other => return Err(unexpected("SCRAM exchange", &other)),
        }
        Ok(())
    }

    async fn wire_flush_then_read(&mut self) -> Result<backend::Message, ReplicationError> {
        self.wire.flush().await?;
        self.read().await
    }

    /// Reads one message; an ErrorResponse becomes an error.
    async fn read(&mut self) -> Result<backend::Message, ReplicationError> {
        match self.wire.read_message().await? {
            BackendMessage::Other(backend::Message::ErrorResponse(body)) => {
                Err(self.wire.server_error(body.fields()))
            }
            BackendMessage::Other(message) => Ok(message),
            BackendMessage::CopyBothResponse => Err(ReplicationError::Protocol(
                "unexpected CopyBothResponse".into(),
            )),
        }
    }

    /// The server this connection went to (`host:port`).
    pub fn address(&self) -> &str {
        self.wire.address()
    }

    /// A server parameter reported at startup (`server_version`, ...).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    /// The server's major version (10, 11, ... 17), from `server_version`.
    pub fn server_major_version(&self) -> Option<u32> {
        let version = self.parameter("server_version")?;
        let digits: String = version.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    }

    /// Runs one statement through the simple query protocol and returns its
    /// rows as text. Used for replication commands and a few queries.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Rows, ReplicationError> {
        frontend::query(sql, self.wire.out())?;
        self.wire.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.wire.read_message().await? {
                BackendMessage::Other(message) => match message {
                    backend::Message::DataRow(row) => {
                        let buffer = row.buffer();
                        let mut values = Vec::new();
                        let mut ranges = row.ranges();
                        while let Some(range) = ranges.next()? {
                            values.push(match range {
                                Some(r) => Some(
                                    std::str::from_utf8(&buffer[r])
                                        .map_err(|_| {
                                            ReplicationError::Protocol(
                                                "non UTF-8 text in a result row".into(),
                                            )
                                        })?
                                        .to_owned(),
                                ),
                                None => None,
                            });
                        }
                        rows.push(values);
                    }
                    backend::Message::ErrorResponse(body) => {
                        error = Some(self.wire.server_error(body.fields()));
                    }
                    backend::Message::ReadyForQuery(_) => {
                        return match error {
                            Some(e) => Err(e),
                            None => Ok(rows),
                        };
                    }
                    _ => {}
                },
                BackendMessage::CopyBothResponse => {
                    return Err(ReplicationError::Protocol(
                        "simple_query cannot run a command that starts replication".into(),
                    ));
                }
            }
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| ReplicationError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let field = |i: usize| row.get(i).cloned().flatten();
        let missing = || ReplicationError::Protocol("IDENTIFY_SYSTEM row is incomplete".into());
        Ok(SystemIdentity {
            system_id: field(0).ok_or_else(missing)?,
            timeline: field(1).and_then(|t| t.parse().ok()).ok_or_else(missing)?,
            xlog_pos: field(2).and_then(|l| l.parse().ok()).ok_or_else(missing)?,
            dbname: field(3),
        })
    }

    /// The content of timeline `timeline`'s history file: one line per
    /// ancestor timeline and the LSN where it ended.
    pub async fn timeline_history(&mut self, timeline: u32) -> Result<String, ReplicationError> {
        let rows = self
            .simple_query(&format!("TIMELINE_HISTORY {timeline}"))
            .await?;
        let content = rows
            .first()
            .and_then(|row| row.get(1).cloned().flatten())
            .ok_or_else(|| {
                ReplicationError::Protocol("TIMELINE_HISTORY returned no content".into())
            })?;
        // A bytea in text form: hex after `\x`.
        Ok(match content.strip_prefix("\\x") {
            Some(hex) => String::from_utf8_lossy(
                &(0..hex.len() / 2)
                    .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
                    .collect::<Vec<u8>>(),
            )
            .into_owned(),
            None => content,
        })
    }

    /// The slot's confirmed flush position, if the slot exists.
    pub async fn slot_confirmed_lsn(
        &mut self,
        slot: &str,
    ) -> Result<Option<Lsn>, ReplicationError> {
        let rows = self
            .simple_query(&format!(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = {}",
                quote_literal(slot)
            ))
            .await?;
        Ok(rows
            .first()
            .and_then(|row| row.first().cloned().flatten())
            .and_then(|lsn| lsn.parse().ok()))
    }

    /// Creates a pgoutput slot. A temporary slot disappears with the
    /// connection, so it can never pin WAL after its user has gone.
    pub async fn create_slot(
        &mut self,
        name: &str,
        temporary: bool,
    ) -> Result<CreatedSlot, ReplicationError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} {}LOGICAL pgoutput NOEXPORT_SNAPSHOT",
            quote_ident(name),
            if temporary { "TEMPORARY " } else { "" }
        );
        let rows = self.simple_query(&sql).await?;
        let row = rows.first().ok_or_else(|| {
            ReplicationError::Protocol("CREATE_REPLICATION_SLOT returned no row".into())
        })?;
        Ok(CreatedSlot {
            name: row
                .first()
                .cloned()
                .flatten()
                .unwrap_or_else(|| name.to_owned()),
            consistent_point: row
                .get(1)
                .cloned()
                .flatten()
                .and_then(|l| l.parse().ok())
                .ok_or_else(|| {
                    ReplicationError::Protocol(
                        "CREATE_REPLICATION_SLOT returned no consistent point".into(),
                    )
                })?,
        })
    }

    /// The pgoutput protocol version to ask for: the highest this server
    /// speaks (1 on 10-13, 2 on 14, 3 on 15, 4 on 16 and later).
    pub fn best_proto_version(&self) -> u32 {
        match self.server_major_version() {
            Some(v) if v >= 16 => 4,
            Some(15) => 3,
            Some(14) => 2,
            _ => 1,
        }
    }

    /// Switches to CopyBoth and streams changes from the slot.
    pub async fn start_replication(
        mut self,
        options: &StartOptions,
    ) -> Result<ReplicationStream, ReplicationError> {
        let proto_version = options
            .proto_version
            .unwrap_or_else(|| self.best_proto_version());
        self.require_publications(&options.publications).await?;
        let publications = options
            .publications
            .iter()
            .map(|p| quote_ident(p))
            .collect::<Vec<_>>()
            .join(",");
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} (proto_version '{}', publication_names {}, messages '{}')",
            quote_ident(&options.slot),
            options.start_lsn,
            proto_version,
            quote_literal(&publications),
            options.messages,
        );
        frontend::query(&sql, self.wire.out())?;
        self.wire.flush().await?;
        loop {
            match self.wire.read_message().await? {
                BackendMessage::CopyBothResponse => break,
                BackendMessage::Other(backend::Message::ErrorResponse(body)) => {
                    return Err(self.wire.server_error(body.fields()));
                }
                BackendMessage::Other(backend::Message::NoticeResponse(_)) => {}
                BackendMessage::Other(other) => {
                    return Err(unexpected("START_REPLICATION", &other));
                }
            }
        }
        Ok(ReplicationStream::new(self.wire, proto_version))
    }

    /// Fails when a publication does not exist. Before PostgreSQL 18
    /// pgoutput raised that error at the first change; 18 only warns and
    /// streams nothing, which would look like an idle outbox.
    async fn require_publications(
        &mut self,
        publications: &[String],
    ) -> Result<(), ReplicationError> {
        let names = publications
            .iter()
            .map(|p| quote_literal(p))
            .collect::<Vec<_>>()
            .join(",");
        let sql = format!(
            "SELECT p FROM unnest(ARRAY[{names}]::text[]) AS p \
             WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = p)"
        );
        let missing = self.simple_query(&sql).await?;
        match missing
            .into_iter()
            .next()
            .and_then(|row| row.into_iter().next().flatten())
        {
            Some(publication) => Err(ReplicationError::MissingPublication {
                address: self.address().to_owned(),
                publication,
            }),
            None => Ok(()),
        }
    }

    /// Ends the session politely.
    pub async fn close(mut self) -> Result<(), ReplicationError> {
        frontend::terminate(self.wire.out());
        self.wire.flush().await
    }
}

async fn open_socket(config: &ConnectionConfig) -> Result<Box<dyn Socket>, ReplicationError> {
    let connect_error = |error| ReplicationError::Connect {
        address: config.address(),
        error,
    };
    Ok(match config.host() {
        Host::Tcp(host) => {
            let stream = TcpStream::connect((host.as_str(), config.port()))
                .await
                .map_err(connect_error)?;
            stream.set_nodelay(true).map_err(connect_error)?;
            config.keepalives.apply(&stream).map_err(connect_error)?;
            negotiate_tls(config, host, stream).await?
        }
        Host::UnixSocketDir(dir) => {
            let path = dir.join(format!(".s.PGSQL.{}", config.port()));
            Box::new(UnixStream::connect(path).await.map_err(connect_error)?)
        }
    })
}

/// Asks for TLS (SSLRequest) unless sslmode is disable, and wraps the
/// stream when the server agrees. Unix sockets never use TLS, as in libpq.
async fn negotiate_tls(
    config: &ConnectionConfig,
    host: &str,
    mut stream: TcpStream,
) -> Result<Box<dyn Socket>, ReplicationError> {
    let tls_error = |reason: String| ReplicationError::Tls {
        address: config.address(),
        reason,
    };
    let Some(tls) =
        crate::postgres::tls::client_config(config).map_err(|e| tls_error(e.to_string()))?
    else {
        return Ok(Box::new(stream));
    };
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    stream.write_all(&request).await?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {
            let name = crate::postgres::tls::server_name(host).map_err(|e| tls_error(e.to_string()))?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, stream)
                .await
                .map_err(|e| tls_error(e.to_string()))?;
            Ok(Box::new(stream))
        }
        b'N' if config.ssl_mode == SslMode::Prefer => Ok(Box::new(stream)),
        b'N' => Err(tls_error(
            "the server does not accept TLS connections (ssl = off); turn ssl on in postgresql.conf, or use sslmode=prefer or disable".into(),
        )),
        other => Err(ReplicationError::Protocol(format!("unexpected answer {other:?} to SSLRequest"))),
    }
}

fn unexpected(phase: &str, message: &backend::Message) -> ReplicationError {
    let name = match message {
        backend::Message::CopyData(_) => "CopyData",
        backend::Message::CopyDone => "CopyDone",
        backend::Message::DataRow(_) => "DataRow",
        backend::Message::CommandComplete(_) => "CommandComplete",
        backend::Message::ReadyForQuery(_) => "ReadyForQuery",
        backend::Message::RowDescription(_) => "RowDescription",
        _ => "another message",
    };
    ReplicationError::Protocol(format!("unexpected {name} during {phase}"))
}
