//! Replication errors: what went wrong, whether retrying can help, and what
//! the operator should do about it.

use std::io;

use crate::pgoutput::DecodeError;
pub use crate::postgres::ServerError;

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
