//! Replication errors: what went wrong, whether retrying can help, and what
//! the operator should do about it.

use std::fmt;
use std::io;

use crate::pgoutput::DecodeError;

/// An ErrorResponse from the server, with the fields operators need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerError {
    pub severity: String,
    /// SQLSTATE, such as `55006`.
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ServerError {
    /// What the operator should do, for the errors a relay commonly meets.
    pub fn fix(&self) -> Option<&'static str> {
        let m = self.message.as_str();
        Some(match self.code.as_str() {
            "55006" if m.contains("replication slot") => {
                "another process holds this replication slot: stop it (see pg_stat_replication), wait for it to exit, or use a different --slot"
            }
            "42704" if m.contains("replication slot") => {
                "the replication slot does not exist: run `walrelay setup` to create it (a slot that vanished means events may have been lost; find out who dropped it)"
            }
            "42704" if m.contains("publication") => {
                "the publication does not exist: run `walrelay setup`, or CREATE PUBLICATION walrelay FOR TABLE public.outbox"
            }
            "55000" if m.contains("wal_level") => {
                "set wal_level = logical in postgresql.conf (ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL"
            }
            "42501" | "28000" if m.contains("replication") => {
                "the role lacks the REPLICATION attribute: ALTER ROLE <role> WITH REPLICATION"
            }
            "53300" if m.contains("standby") || m.contains("wal sender") => {
                "all WAL senders are in use: raise max_wal_senders in postgresql.conf and restart PostgreSQL"
            }
            "53400" if m.contains("replication slots") => {
                "all replication slots are in use: drop unused slots (SELECT slot_name FROM pg_replication_slots WHERE NOT active) or raise max_replication_slots and restart"
            }
            "28P01" => "the password is wrong: check the password in --pg-url (or PGPASSWORD)",
            "28000" if m.contains("not permitted to log in") => {
                "the role may not log in: ALTER ROLE <role> WITH LOGIN"
            }
            "28000" => {
                "pg_hba.conf has no entry allowing this replication connection: add `host replication <role> <address> scram-sha-256` and `host <db> <role> <address> scram-sha-256`, then reload"
            }
            "3D000" => "the database does not exist: check the database name in --pg-url",
            _ => return None,
        })
    }

    /// True when retrying cannot succeed without someone changing something.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self.code.as_str(),
            "42704" | "55000" | "42501" | "28000" | "28P01" | "3D000" | "42P01"
        )
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(detail) = &self.detail {
            write!(f, " (detail: {detail})")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        if let Some(fix) = self.fix() {
            write!(f, "; fix: {fix}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}

/// Everything that can end a replication connection.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error(
        "cannot connect to PostgreSQL at {address}: {source}; check that the server runs and --pg-url names the right host and port"
    )]
    Connect {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "TLS with PostgreSQL at {address} failed: {reason}; check sslmode, sslrootcert and the host name in --pg-url against the server's certificate"
    )]
    Tls { address: String, reason: String },
    #[error("connection to PostgreSQL lost: {0}")]
    Io(#[from] io::Error),
    #[error("PostgreSQL closed the connection")]
    Closed,
    #[error("PostgreSQL: {0}")]
    Server(#[from] ServerError),
    #[error(
        "the server asks for a password but --pg-url has none: add it (postgres://user:password@host/db) or set PGPASSWORD"
    )]
    PasswordRequired,
    #[error(
        "the server asks for authentication method {0}, which walrelay does not support; use scram-sha-256, md5, password or trust in pg_hba.conf"
    )]
    UnsupportedAuthentication(String),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("cannot decode a pgoutput message at {lsn}: {source}")]
    Decode {
        lsn: crate::lsn::Lsn,
        #[source]
        source: DecodeError,
    },
}

impl ReplicationError {
    /// Whether reconnecting later can succeed without a human changing
    /// anything: lost connections can, a missing slot or a wrong password
    /// cannot.
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Connect { .. }
            | ReplicationError::Io(_)
            | ReplicationError::Closed => true,
            ReplicationError::Server(e) => !e.is_permanent(),
            ReplicationError::PasswordRequired
            | ReplicationError::Tls { .. }
            | ReplicationError::UnsupportedAuthentication(_)
            | ReplicationError::Protocol(_)
            | ReplicationError::Decode { .. } => false,
        }
    }

    /// The server's SQLSTATE, when the server sent the error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server(e) => Some(&e.code),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(code: &str, message: &str) -> ServerError {
        ServerError {
            severity: "ERROR".into(),
            code: code.into(),
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    #[test]
    fn slot_in_use_names_the_fix_and_is_retried() {
        let e = server_error(
            "55006",
            "replication slot \"walrelay\" is active for PID 42",
        );
        assert!(e.to_string().contains("use a different --slot"));
        assert!(ReplicationError::Server(e).is_transient());
    }

    #[test]
    fn missing_slot_and_wrong_password_are_permanent() {
        let slot = server_error("42704", "replication slot \"x\" does not exist");
        assert!(slot.to_string().contains("walrelay setup"));
        assert!(!ReplicationError::Server(slot).is_transient());
        let password = server_error("28P01", "password authentication failed for user \"u\"");
        assert!(password.to_string().contains("password is wrong"));
        assert!(!ReplicationError::Server(password).is_transient());
    }

    #[test]
    fn wal_level_and_missing_replication_privilege_name_their_settings() {
        let wal = server_error("55000", "logical decoding requires wal_level >= logical");
        assert!(wal.to_string().contains("wal_level = logical"));
        let role = server_error(
            "42501",
            "must be superuser or replication role to start walsender",
        );
        assert!(role.to_string().contains("WITH REPLICATION"));
        let senders = server_error(
            "53300",
            "number of requested standby connections exceeds max_wal_senders (currently 1)",
        );
        assert!(senders.to_string().contains("max_wal_senders"));
    }
}
