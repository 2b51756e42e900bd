//! `walrelay check`'s failover checks: what a primary failover needs so
//! the new primary has the slot, at a position that never lies ahead of
//! what it has (PostgreSQL 17+ failover slots).

use super::check_result::Check;
use crate::catalog::{self, FAILOVER_SLOTS_SINCE, quote_ident, quote_literal};
use crate::postgres::{ConnectionConfig, TargetSessionAttrs};
use crate::sql::{self, SqlClient as Client, SqlError};

/// The failover findings: on the primary `client`, and on each standby
/// among `pg`'s hosts.
pub async fn check(
    client: &Client,
    pg: &ConnectionConfig,
    slot: &str,
    wanted: bool,
) -> Result<Vec<Check>, SqlError> {
    let mut findings = Vec::new();
    if !wanted {
        findings.push(Check::pass(format!(
            "failover not checked (--no-failover): after a primary failover the new primary has no slot {slot}"
        )));
        return Ok(findings);
    }
    let major = catalog::server_major(client).await?;
    if major < FAILOVER_SLOTS_SINCE {
        findings.push(Check::warn(
            format!(
                "failover slots need PostgreSQL {FAILOVER_SLOTS_SINCE}; this server is {major}: after a primary failover the new primary has no slot {slot}"
            ),
            format!(
                "upgrade to PostgreSQL {FAILOVER_SLOTS_SINCE} or later; until then, after a failover run walrelay setup on the new primary (events committed in between are not relayed)"
            ),
        ));
        return Ok(findings);
    }

    if let Some(info) = catalog::slot(client, slot).await? {
        findings.push(if info.failover == Some(true) {
            Check::pass(format!("replication slot {slot} is a failover slot"))
        } else {
            Check::fail(
                format!("replication slot {slot} is not a failover slot: standbys do not keep it"),
                "walrelay setup (makes it one)",
            )
        });
    }

    let physical = catalog::physical_slots(client).await?;
    let synchronized = catalog::setting_if_any(client, "synchronized_standby_slots")
        .await?
        .unwrap_or_default();
    let listed: Vec<&str> = synchronized
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if listed.is_empty() {
        findings.push(if physical.is_empty() {
            Check::warn(
                "no standby streams through a physical slot: nothing keeps a copy of the failover slot",
                "give each standby a physical slot (primary_slot_name) and list it in synchronized_standby_slots",
            )
        } else {
            Check::fail(
                format!(
                    "synchronized_standby_slots is empty: the relay can receive and publish a transaction the standby never gets, a phantom event after a failover (physical slots: {})",
                    physical.join(", ")
                ),
                format!(
                    "ALTER SYSTEM SET synchronized_standby_slots = {}; SELECT pg_reload_conf()",
                    quote_literal(&physical.join(","))
                ),
            )
        });
    } else {
        for name in &listed {
            findings.push(if physical.iter().any(|p| p == name) {
                Check::pass(format!(
                    "synchronized_standby_slots names physical slot {name}: the relay only gets what that standby has"
                ))
            } else {
                Check::fail(
                    format!("synchronized_standby_slots names {name}, which is not a physical slot here: logical decoding waits for it forever"),
                    format!(
                        "SELECT pg_create_physical_replication_slot({}, true), or remove it from synchronized_standby_slots",
                        quote_literal(name)
                    ),
                )
            });
        }
    }

    // Each standby named in the URL.
    if pg.hosts.len() > 1 {
        for mut host in pg.each_host() {
            host.target_session_attrs = TargetSessionAttrs::Any;
            let address = host.address();
            let standby = match sql::connect(&host).await {
                Ok(c) => c,
                Err(e) => {
                    findings.push(Check::warn(
                        format!("{address}: cannot check it: {e}"),
                        "bring it up, or remove it from --pg-url",
                    ));
                    continue;
                }
            };
            if catalog::in_recovery(&standby).await? {
                findings.extend(check_standby(&standby, &address, slot, &listed).await?);
            }
        }
    }
    Ok(findings)
}

/// What a standby needs to keep a usable copy of the failover slot.
async fn check_standby(
    standby: &Client,
    address: &str,
    slot: &str,
    listed: &[&str],
) -> Result<Vec<Check>, SqlError> {
    let mut findings = Vec::new();
    let setting = async |name: &str| -> Result<String, SqlError> {
        Ok(catalog::setting_if_any(standby, name)
            .await?
            .unwrap_or_default())
    };
    let on = |value: &str| value == "on";
    for (name, why) in [
        (
            "sync_replication_slots",
            "the slot sync worker keeps the failover slot",
        ),
        (
            "hot_standby_feedback",
            "the primary keeps the rows the slot still needs",
        ),
    ] {
        findings.push(if on(&setting(name).await?) {
            Check::pass(format!("standby {address}: {name} = on"))
        } else {
            Check::fail(
                format!("standby {address}: {name} is off; with it on, {why}"),
                format!("on the standby: ALTER SYSTEM SET {name} = on; SELECT pg_reload_conf()"),
            )
        });
    }
    let primary_slot = setting("primary_slot_name").await?;
    findings.push(if primary_slot.is_empty() {
        Check::fail(
            format!("standby {address}: primary_slot_name is not set"),
            "on the primary: SELECT pg_create_physical_replication_slot('standby1', true); on the standby: ALTER SYSTEM SET primary_slot_name = 'standby1'; SELECT pg_reload_conf()",
        )
    } else if !listed.contains(&primary_slot.as_str()) {
        Check::fail(
            format!(
                "standby {address} streams through {primary_slot}, which synchronized_standby_slots on the primary does not list"
            ),
            format!(
                "on the primary: ALTER SYSTEM SET synchronized_standby_slots = {}; SELECT pg_reload_conf()",
                quote_literal(primary_slot.as_str())
            ),
        )
    } else {
        Check::pass(format!(
            "standby {address} streams through {primary_slot}, listed in synchronized_standby_slots"
        ))
    });
    let conninfo = setting("primary_conninfo").await?;
    findings.push(if conninfo.contains("dbname=") {
        Check::pass(format!("standby {address}: primary_conninfo names a database"))
    } else {
        Check::fail(
            format!("standby {address}: primary_conninfo names no database, which the slot sync worker needs"),
            "on the standby: add dbname=<the outbox database> to primary_conninfo; SELECT pg_reload_conf()",
        )
    });
    findings.push(match catalog::slot(standby, slot).await? {
        Some(info) if info.synced == Some(true) && !info.temporary => {
            Check::pass(format!("standby {address} has a synchronized copy of slot {slot}"))
        }
        Some(info) if info.synced == Some(true) => Check::warn(
            format!(
                "standby {address}'s copy of slot {slot} is not usable yet (temporary): a promotion now would drop it"
            ),
            "wait: it becomes usable once the relay confirms a position the standby has (the heartbeat moves it while the outbox is idle)",
        ),
        Some(_) => Check::fail(
            format!("standby {address} has a slot {slot} that is not synchronized from the primary"),
            format!(
                "on the standby: SELECT pg_drop_replication_slot({}); the slot sync worker then copies the primary's",
                quote_literal(slot)
            ),
        ),
        None => Check::warn(
            format!("standby {address} has no copy of slot {slot} yet"),
            format!(
                "wait for the slot sync worker (it copies {} once the relay confirmed a position the standby has); see the standby's log",
                quote_ident(slot)
            ),
        ),
    });
    Ok(findings)
}
