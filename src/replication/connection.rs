//! A walsender connection: simple queries and the replication commands,
//! once `handshake.rs` has connected and authenticated it. `stream.rs`
//! takes over once START_REPLICATION switches it into CopyBoth mode.

use std::collections::HashMap;
use std::time::Duration;

use fallible_iterator::FallibleIterator;
use postgres_protocol::message::{backend, frontend};

use super::error::ReplicationError;
use super::handshake;
use super::stream::ReplicationStream;
use super::wire::{BackendMessage, Wire};
use crate::lsn::Lsn;
use crate::postgres::config::ConnectionConfig;
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
                let timeout = host.connect_timeout.unwrap_or(Duration::from_secs(30));
                tokio::time::timeout(timeout, conn.server_state())
                    .await
                    .map_err(|_| ReplicationError::Connect {
                        address: host.address(),
                        error: std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no answer within {timeout:?} to the query for its state"),
                        ),
                    })??
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

    /// Connects to the first host of `config`. `connect_timeout` (30 s
    /// when unset) bounds the whole of it, TLS and authentication too, as
    /// in libpq: a host that accepts and then freezes is given up on.
    async fn connect_one(config: &ConnectionConfig) -> Result<Self, ReplicationError> {
        let timeout = config.connect_timeout.unwrap_or(Duration::from_secs(30));
        let connect = async {
            let socket = handshake::open_socket(config).await?;
            let mut wire = Wire::new(socket, config.address());
            let parameters = handshake::startup(&mut wire, config).await?;
            Ok(ReplicationConnection { wire, parameters })
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| ReplicationError::Connect {
                address: config.address(),
                error: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {timeout:?} (connect_timeout)"),
                ),
            })?
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
                    return Err(handshake::unexpected("START_REPLICATION", &other));
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
