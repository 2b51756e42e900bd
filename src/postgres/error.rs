//! What PostgreSQL (or the operating system) says when a connection or a
//! statement fails, and what the operator should do about it. Both
//! connections, the walsender's and the SQL one, report through these.

use std::fmt;
use std::io;

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
    /// The fields of an error tokio-postgres received.
    pub fn from_db_error(db: &tokio_postgres::error::DbError) -> Self {
        ServerError {
            severity: db.severity().to_owned(),
            code: db.code().code().to_owned(),
            message: db.message().to_owned(),
            detail: db.detail().map(str::to_owned),
            hint: db.hint().map(str::to_owned),
        }
    }

    /// What the operator should do, for the errors a relay commonly meets.
    pub fn fix(&self) -> Option<&'static str> {
        let m = self.message.as_str();
        Some(match self.code.as_str() {
            "55006" if m.contains("replication slot") => {
                "another process holds this replication slot: stop it (see pg_stat_replication), wait for it to exit, or use a different --slot"
            }
            "42704" if m.contains("replication slot") => {
                "the replication slot does not exist: if walrelay streamed from it before, it was dropped and events committed since were not streamed; recover them from the outbox table with `walrelay recover --slot <slot>` (docs/runbooks/slot-dropped.md). If it never existed, run `walrelay setup`"
            }
            "55000"
                if m.contains("can no longer get changes from replication slot")
                    && self.detail.as_deref().is_some_and(is_recovery_conflict) =>
            {
                "the replication slot on this standby was invalidated by a recovery conflict: the primary vacuumed away catalog rows it still needed, or the primary's wal_level fell below logical. Fix the cause (on the standby: ALTER SYSTEM SET hot_standby_feedback = on, and stream through a physical slot with primary_slot_name; keep wal_level = logical on the primary), then recover the events committed after its last confirmed LSN from the outbox table with `walrelay recover --slot <slot>` (docs/runbooks/standby-decoding.md)"
            }
            "55000" if m.contains("can no longer get changes from replication slot") => {
                "the replication slot was invalidated and its WAL removed: events committed after its last confirmed LSN cannot be streamed; recover them from the outbox table with `walrelay recover --slot <slot>` (docs/runbooks/slot-lost.md)"
            }
            "42704" if m.contains("publication") => {
                "the publication does not exist: run `walrelay setup`, or CREATE PUBLICATION walrelay FOR TABLE public.outbox"
            }
            "55000" if m.contains("wal_level") && m.contains("on the primary") => {
                "logical decoding on a standby needs wal_level = logical on its primary: on the primary, ALTER SYSTEM SET wal_level = logical and restart it (the standby's own wal_level must be logical too)"
            }
            "55000" if m.contains("wal_level") => {
                "set wal_level = logical in postgresql.conf (ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL"
            }
            "28000" if m.contains("pg_hba.conf") && m.contains("replication") => {
                "pg_hba.conf has no entry allowing this replication connection: add `host replication <role> <address> scram-sha-256` (and `host <db> <role> <address> scram-sha-256` for the SQL connection), then SELECT pg_reload_conf()"
            }
            "28000" if m.contains("pg_hba.conf") => {
                "pg_hba.conf has no entry allowing this connection: add `host <db> <role> <address> scram-sha-256` (and a `replication` line for the replication connection), then SELECT pg_reload_conf()"
            }
            "28000" if m.starts_with("role ") && m.ends_with("does not exist") => {
                "the role in --pg-url does not exist: correct the user name, or create it (CREATE ROLE <role> LOGIN REPLICATION PASSWORD '...')"
            }
            "28000" if m.contains("not permitted to log in") => {
                "the role may not log in: ALTER ROLE <role> WITH LOGIN"
            }
            "42501" | "28000" if m.contains("replication") || m.contains("WAL sender") => {
                "the role lacks the REPLICATION attribute: ALTER ROLE <role> WITH REPLICATION"
            }
            "28000" => {
                "the server refused this login: check pg_hba.conf for an entry allowing this role, database and address"
            }
            "53300"
                if m.contains("standby") || m.contains("wal sender") || m.contains("walsender") =>
            {
                "all WAL senders are in use: raise max_wal_senders in postgresql.conf and restart PostgreSQL"
            }
            "53300" => {
                "the server has no free connection: raise max_connections, or close idle sessions (see pg_stat_activity); walrelay retries"
            }
            "53400" if m.contains("replication slots") => {
                "all replication slots are in use: drop unused slots (SELECT slot_name FROM pg_replication_slots WHERE NOT active) or raise max_replication_slots and restart"
            }
            "28P01" => "the password is wrong: check the password in --pg-url (or PGPASSWORD)",
            "3D000" => "the database does not exist: check the database name in --pg-url",
            "57P03" if m.contains("shutting down") => {
                "PostgreSQL is shutting down: walrelay connects again once it is back"
            }
            "57P03" => {
                "PostgreSQL is starting up or in recovery and not accepting connections yet: walrelay retries; if it stays so, check that --pg-url names the primary"
            }
            "57P01" | "57P02" => {
                "the server ended this session (a shutdown, a restart or pg_terminate_backend): walrelay reconnects"
            }
            "25006" => {
                "this server is a read-only standby: point --pg-url at the primary, or list every host with target_session_attrs=read-write; on a standby (PostgreSQL 16+), run (--source wal), setup, recover and backfill take the primary's URL in --primary-url for their writes"
            }
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

/// A slot invalidated on a standby by a recovery conflict, as the server's
/// detail says it: 16 and 17 name the conflict, 18 its cause.
fn is_recovery_conflict(detail: &str) -> bool {
    detail.contains("conflicting with recovery")
        || detail.contains("rows_removed")
        || detail.contains("wal_level_insufficient")
}

/// What to do about an operating-system error on a connection to
/// PostgreSQL: refused, timed out, a host name that does not resolve.
pub fn os_error_fix(error: &io::Error) -> Option<&'static str> {
    let text = error.to_string();
    Some(match error.kind() {
        io::ErrorKind::ConnectionRefused => {
            "nothing accepts connections there: check that PostgreSQL runs, that it listens on that address and port (listen_addresses, port), and that --pg-url names them"
        }
        io::ErrorKind::TimedOut => {
            "no answer in time: check the host and port in --pg-url and any firewall between walrelay and PostgreSQL (connect_timeout= sets the wait)"
        }
        io::ErrorKind::PermissionDenied => {
            "walrelay may not open that socket: check the socket directory's permissions"
        }
        io::ErrorKind::NotFound if text.contains(".s.PGSQL") || text.contains("No such file") => {
            "no server socket there: check the socket directory (host=) and port in --pg-url"
        }
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof => "the connection was cut: walrelay reconnects",
        _ if text.contains("lookup")
            || text.contains("resolve")
            || text.contains("Name or service") =>
        {
            "the host name does not resolve: check the host in --pg-url and DNS"
        }
        _ => return None,
    })
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
            // The command names the slot the server named, ready to run.
            match slot_named(&self.message) {
                Some(slot) => write!(f, "; fix: {}", fix.replace("<slot>", slot))?,
                None => write!(f, "; fix: {fix}")?,
            }
        }
        Ok(())
    }
}

/// The slot a server message names: `replication slot "NAME" ...`.
fn slot_named(message: &str) -> Option<&str> {
    let rest = message.split_once("replication slot \"")?.1;
    rest.split_once('"').map(|(slot, _)| slot)
}

impl std::error::Error for ServerError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_slot_s_fix_names_the_slot_the_server_named() {
        let error = ServerError {
            severity: "ERROR".into(),
            code: "42704".into(),
            message: "replication slot \"orders_relay\" does not exist".into(),
            detail: None,
            hint: None,
        };
        let text = error.to_string();
        assert!(
            text.contains("`walrelay recover --slot orders_relay`"),
            "{text}"
        );
        assert!(!text.contains("<slot>"), "{text}");
    }

    fn invalidated(detail: &str) -> ServerError {
        ServerError {
            severity: "ERROR".into(),
            code: "55000".into(),
            message: "can no longer get changes from replication slot \"walrelay\"".into(),
            detail: Some(detail.into()),
            hint: None,
        }
    }

    #[test]
    fn a_slot_lost_to_a_recovery_conflict_names_hot_standby_feedback_and_recover() {
        for detail in [
            "This slot has been invalidated because it was conflicting with recovery.",
            "This replication slot has been invalidated due to \"rows_removed\".",
        ] {
            let fix = invalidated(detail).fix().unwrap();
            assert!(fix.contains("recovery conflict"), "{fix}");
            assert!(fix.contains("hot_standby_feedback = on"), "{fix}");
            assert!(fix.contains("walrelay recover"), "{fix}");
        }
        let fix = invalidated(
            "This slot has been invalidated because it exceeded the maximum reserved size.",
        )
        .fix()
        .unwrap();
        assert!(fix.contains("WAL removed"), "{fix}");
    }

    #[test]
    fn a_standby_whose_primary_lacks_logical_wal_names_the_primary() {
        let error = ServerError {
            severity: "ERROR".into(),
            code: "55000".into(),
            message:
                "logical decoding on standby requires \"wal_level\" >= \"logical\" on the primary"
                    .into(),
            detail: None,
            hint: None,
        };
        assert!(
            error
                .fix()
                .unwrap()
                .contains("on the primary, ALTER SYSTEM SET wal_level = logical")
        );
    }
}
