//! `walrelay check`'s standby checks, when `--pg-url` is a standby the
//! relay decodes from (PostgreSQL 16+): what keeps the standby's slot from
//! being invalidated by a recovery conflict, and what the primary must
//! give it.

use super::check_result::Check;
use crate::catalog;
use crate::postgres::ConnectionConfig;
use crate::sql::{self, SqlClient as Client, SqlError};
use crate::standby::DECODING_ON_STANDBY_SINCE;

/// The findings on the standby `client`, and on the primary `primary`
/// reaches (`--primary-url`).
pub async fn check(
    client: &Client,
    primary: Option<&ConnectionConfig>,
) -> Result<Vec<Check>, SqlError> {
    let mut findings = Vec::new();
    let major = catalog::server_major(client).await?;
    if major < DECODING_ON_STANDBY_SINCE {
        findings.push(Check::fail(
            format!("this server is a standby of PostgreSQL {major}, which cannot decode logically"),
            format!("point --pg-url at the primary, or upgrade to PostgreSQL {DECODING_ON_STANDBY_SINCE} or later"),
        ));
        return Ok(findings);
    }
    findings.push(Check::pass(format!(
        "this server is a standby (PostgreSQL {major}): the relay decodes here"
    )));
    let setting = async |name: &str| catalog::setting_if_any(client, name).await;
    findings.push(if setting("hot_standby_feedback").await?.as_deref() == Some("on") {
        Check::pass("hot_standby_feedback = on")
    } else {
        Check::fail(
            "hot_standby_feedback is off: the primary may vacuum away catalog rows the standby's slot needs, and a recovery conflict invalidates the slot",
            "on the standby: ALTER SYSTEM SET hot_standby_feedback = on; SELECT pg_reload_conf()",
        )
    });
    let physical_slot = setting("primary_slot_name").await?.unwrap_or_default();
    findings.push(if physical_slot.is_empty() {
        Check::warn(
            "primary_slot_name is not set: while the standby is disconnected the primary forgets what its slot needs, and a recovery conflict can invalidate it",
            "on the primary: SELECT pg_create_physical_replication_slot('standby1', true); on the standby: ALTER SYSTEM SET primary_slot_name = 'standby1'; SELECT pg_reload_conf()",
        )
    } else {
        Check::pass(format!(
            "the standby streams through physical slot {physical_slot}"
        ))
    });
    let Some(primary) = primary else {
        findings.push(Check::fail(
            "no --primary-url: the primary's wal_level is not checked, and `run` has nowhere to write the heartbeat that moves an idle slot",
            "add --primary-url (WALRELAY_PRIMARY_URL) with the primary's URL",
        ));
        return Ok(findings);
    };
    let primary = match sql::connect(primary).await {
        Ok(client) => client,
        Err(e) => {
            findings.push(Check::fail(
                format!("cannot reach the primary (--primary-url): {e}"),
                "check --primary-url",
            ));
            return Ok(findings);
        }
    };
    if catalog::in_recovery(&primary).await? {
        findings.push(Check::fail(
            format!("--primary-url reaches {}, a standby", primary.address()),
            "point --primary-url at the primary (add target_session_attrs=read-write when it lists several hosts)",
        ));
        return Ok(findings);
    }
    let wal_level = catalog::setting(&primary, "wal_level").await?;
    findings.push(if wal_level == "logical" {
        Check::pass("the primary's wal_level = logical")
    } else {
        Check::fail(
            format!("the primary's wal_level = {wal_level}: a standby decodes only WAL written with wal_level = logical"),
            "on the primary: ALTER SYSTEM SET wal_level = logical; then restart it",
        )
    });
    Ok(findings)
}
