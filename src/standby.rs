//! Decoding from a physical standby (PostgreSQL 16+).
//!
//! ```text
//!   application ──writes──> primary ──WAL──> standby ──slot, pgoutput──> walrelay ──> Kafka
//!                              ^                                            │
//!                              └──── heartbeat, walrelay's records ─────────┘  (--primary-url)
//! ```
//!
//! A logical slot on a standby decodes the WAL the standby replays, so the
//! decoding costs the standby's CPU and I/O, not the primary's. What the
//! standby cannot do is write: the heartbeat that gives an idle slot a
//! commit to confirm, and walrelay's record of its slots, go to the primary
//! (`--primary-url`). Each write asks first whether the server decoded
//! from is still a standby: once it is promoted, writes go to it, and the
//! old primary may be gone.
//!
//! A new slot on a standby waits for a running-transactions record from
//! the primary before it is consistent; on an idle primary that can take
//! long (the background writer logs one every 15 s, and only when
//! something changed), so slot creation asks the primary for one with
//! `pg_log_standby_snapshot()` until it returns.

use std::future::Future;
use std::time::Duration;

use crate::catalog;
use crate::postgres::ConnectionConfig;
use crate::sql::{self, SqlClient, SqlError, SqlSession};

/// The first PostgreSQL major version with logical decoding on a standby.
pub const DECODING_ON_STANDBY_SINCE: i32 = 16;

/// How often slot creation asks the primary for a running-transactions
/// record.
const SNAPSHOT_EVERY: Duration = Duration::from_millis(500);

/// Runs `work` (a slot's creation on a standby) while asking the primary
/// for running-transactions records, which the new slot waits for.
pub async fn with_standby_snapshots<T>(
    primary: &ConnectionConfig,
    work: impl Future<Output = T>,
) -> T {
    let primary = primary.clone();
    let nudge = async move {
        let mut session = SqlSession::new(primary);
        loop {
            match session.client().await {
                Ok(client) => {
                    if let Err(e) = client
                        .execute("SELECT pg_log_standby_snapshot()", &[])
                        .await
                    {
                        tracing::debug!(error = %e, "cannot log a standby snapshot on the primary");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot reach the primary"),
            }
            tokio::time::sleep(SNAPSHOT_EVERY).await;
        }
    };
    tokio::select! {
        out = work => out,
        () = nudge => unreachable!("the nudge loops until the work is done"),
    }
}

/// What to tell an operator whose server is a standby of too old a
/// version.
pub fn too_old(major: i32) -> String {
    format!(
        "this server is a standby of PostgreSQL {major}, which cannot decode logically (PostgreSQL {DECODING_ON_STANDBY_SINCE}+ can): point --pg-url at the primary, or upgrade"
    )
}

/// The fix when something must write and the server decoded from is a
/// standby with no primary named.
pub fn needs_primary(what: &str) -> String {
    format!(
        "--pg-url is a standby, which cannot write, and {what}: add --primary-url (WALRELAY_PRIMARY_URL) with the primary's URL"
    )
}

/// Where the run path writes (the heartbeat, walrelay's record of its
/// slots): the server decoded from, unless it is a standby, then the
/// primary. Asked at each write, so a promotion moves the writes. Without
/// a primary named nothing is asked: `run` refused to start on a standby
/// that needs one.
pub struct WriteRoute {
    primary: Option<SqlSession>,
}

impl WriteRoute {
    pub fn new(primary: Option<ConnectionConfig>) -> Self {
        WriteRoute {
            primary: primary.map(SqlSession::new),
        }
    }

    /// The client to write with: `decoding` (a client of the server
    /// decoded from), or the primary's while that server is a standby.
    pub async fn client<'a>(
        &'a mut self,
        decoding: &'a SqlClient,
    ) -> Result<&'a SqlClient, SqlError> {
        match &mut self.primary {
            Some(primary) if catalog::in_recovery(decoding).await? => primary.client().await,
            _ => Ok(decoding),
        }
    }
}

/// Connects to the primary for writes when `client`'s server is a standby:
/// `Ok(None)` when it is not. Refuses a standby too old to decode, and a
/// standby without `primary`, naming what needed the write.
pub async fn primary_for(
    client: &SqlClient,
    primary: Option<&ConnectionConfig>,
    what: &str,
) -> Result<Option<SqlClient>, StandbyError> {
    if !catalog::in_recovery(client).await? {
        return Ok(None);
    }
    let major = catalog::server_major(client).await?;
    if major < DECODING_ON_STANDBY_SINCE {
        return Err(StandbyError::TooOld(too_old(major)));
    }
    let Some(primary) = primary else {
        return Err(StandbyError::NoPrimary(needs_primary(what)));
    };
    let writer = sql::connect(primary).await?;
    if catalog::in_recovery(&writer).await? {
        return Err(StandbyError::PrimaryIsStandby(writer.address().to_owned()));
    }
    Ok(Some(writer))
}

/// Why a standby cannot be used as asked.
#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error(transparent)]
    Postgres(#[from] SqlError),
    #[error("{0}")]
    TooOld(String),
    #[error("{0}")]
    NoPrimary(String),
    #[error(
        "--primary-url reaches {0}, which is a standby too: it must name the primary (add target_session_attrs=read-write to it when it lists several hosts)"
    )]
    PrimaryIsStandby(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixes_name_the_flag_and_the_version() {
        assert!(needs_primary("the heartbeat writes").contains("--primary-url"));
        assert!(too_old(15).contains("PostgreSQL 16+"));
    }
}
