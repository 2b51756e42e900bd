//! Replication errors: what went wrong, whether retrying can help, and what
//! the operator should do about it.

use std::io;

use crate::pgoutput::DecodeError;
pub use crate::postgres::ServerError;
use crate::postgres::os_error_fix;

/// Everything that can end a replication connection. Each names the server
/// it happened with, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error(
        "PostgreSQL at {address}: cannot connect: {error}; fix: {}",
        os_error_fix(error).unwrap_or("check that the server runs and that --pg-url names the right host and port")
    )]
    Connect {
        address: String,
        // Named `error`, not `source`: the message says it, once.
        error: io::Error,
    },
    #[error(
        "PostgreSQL at {address}: TLS failed: {reason}; fix: check sslmode, sslrootcert and the host name in --pg-url against the server's certificate"
    )]
    Tls { address: String, reason: String },
    #[error(
        "PostgreSQL at {address}: connection lost: {error}{}",
        os_error_fix(error).map(|f| format!("; fix: {f}")).unwrap_or_default()
    )]
    Lost { address: String, error: io::Error },
    #[error("cannot encode a message for PostgreSQL: {0}")]
    Io(#[from] io::Error),
    #[error("PostgreSQL at {address} closed the connection")]
    Closed { address: String },
    #[error(
        "no server in --pg-url will do for target_session_attrs={attrs}: {failures}; fix: check that one of them is up and is what target_session_attrs asks for (after a failover, the promoted standby)"
    )]
    NoSuitableHost {
        attrs: &'static str,
        failures: String,
    },
    #[error("PostgreSQL at {address}: {error}")]
    Server {
        address: String,
        error: Box<ServerError>,
    },
    #[error(
        "the server asks for a password but --pg-url has none: add it (postgres://user:password@host/db), set PGPASSWORD, or add a line to the password file (PGPASSFILE, ~/.pgpass, mode 0600)"
    )]
    PasswordRequired,
    #[error(
        "the server asks for authentication method {0}, which walrelay does not support; use scram-sha-256, md5, password or trust in pg_hba.conf"
    )]
    UnsupportedAuthentication(String),
    #[error(
        "PostgreSQL at {address}: publication {publication:?} does not exist; fix: run `walrelay setup`, or CREATE PUBLICATION {publication} FOR TABLE public.outbox"
    )]
    MissingPublication {
        address: String,
        publication: String,
    },
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("cannot decode a pgoutput message at {lsn}: {error}")]
    Decode {
        lsn: crate::lsn::Lsn,
        error: DecodeError,
    },
}

impl ReplicationError {
    /// Whether reconnecting later can succeed without a human changing
    /// anything: lost connections can, a missing slot or a wrong password
    /// cannot.
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Connect { .. }
            | ReplicationError::Lost { .. }
            | ReplicationError::Io(_)
            | ReplicationError::Closed { .. }
            | ReplicationError::NoSuitableHost { .. } => true,
            ReplicationError::Server { error, .. } => !error.is_permanent(),
            ReplicationError::PasswordRequired
            | ReplicationError::Tls { .. }
            | ReplicationError::UnsupportedAuthentication(_)
            | ReplicationError::MissingPublication { .. }
            | ReplicationError::Protocol(_)
            | ReplicationError::Decode { .. } => false,
        }
    }

    /// The server's SQLSTATE, when the server sent the error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { error, .. } => Some(&error.code),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(error: ServerError) -> ReplicationError {
        ReplicationError::Server {
            address: "db:5432".into(),
            error: Box::new(error),
        }
    }

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
        assert!(at(e).is_transient());
    }

    #[test]
    fn missing_slot_and_wrong_password_are_permanent() {
        let slot = server_error("42704", "replication slot \"x\" does not exist");
        assert!(slot.to_string().contains("walrelay setup"));
        assert!(!at(slot).is_transient());
        let password = server_error("28P01", "password authentication failed for user \"u\"");
        assert!(password.to_string().contains("password is wrong"));
        assert!(!at(password).is_transient());
    }

    #[test]
    fn wal_level_and_missing_replication_privilege_name_their_settings() {
        let wal = server_error("55000", "logical decoding requires wal_level >= logical");
        assert!(wal.to_string().contains("wal_level = logical"));
        assert!(
            at(wal)
                .to_string()
                .starts_with("PostgreSQL at db:5432: ERROR 55000")
        );
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

#[cfg(test)]
mod os_tests {
    use super::*;

    #[test]
    fn a_refused_connection_names_the_address_and_what_to_check() {
        let e = ReplicationError::Connect {
            address: "127.0.0.1:1".into(),
            error: io::Error::from(io::ErrorKind::ConnectionRefused),
        };
        let text = e.to_string();
        assert!(
            text.starts_with("PostgreSQL at 127.0.0.1:1: cannot connect: "),
            "{text}"
        );
        assert!(text.contains("refused"), "{text}");
        assert!(
            text.contains("fix: nothing accepts connections there"),
            "{text}"
        );
    }
}
