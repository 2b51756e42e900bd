//! `walrelay check`: preflight against a database. Each failed check prints
//! the SQL or setting that fixes it.

use crate::catalog::{self, qualified, quote_ident, quote_literal};
use crate::postgres::ConnectionConfig;
use crate::sql::{SqlClient as Client, SqlError};

use super::setup::SetupOptions;

pub use super::check_result::{Check, Status};

/// The fix for a database that cannot do logical replication, besides
/// making it: the polling source.
const OR_POLL: &str = "; or, where logical replication is not allowed, poll the table instead: walrelay setup --source poll, then walrelay run --source poll";

/// Runs every check against the primary `client`; `pg` reaches the
/// standbys the URL names, for the failover checks.
pub async fn check(
    client: &Client,
    pg: &ConnectionConfig,
    options: &SetupOptions,
) -> Result<Vec<Check>, SqlError> {
    let mut findings = Vec::new();
    let (dl_schema, dl_table) = &options.dead_letter_table;
    findings.push(
        if catalog::table_exists(client, dl_schema, dl_table).await? {
            Check::pass(format!("dead-letter table {dl_schema}.{dl_table} exists"))
        } else {
            Check::fail(
                format!("dead-letter table {dl_schema}.{dl_table} does not exist (events the broker refuses for good are kept there)"),
                "walrelay setup",
            )
        },
    );
    if options.poll {
        for (schema, table) in &options.tables {
            findings.extend(check_table(client, options, schema, table).await?);
        }
        return Ok(findings);
    }
    let setting = async |name: &str| catalog::setting(client, name).await;

    let wal_level = setting("wal_level").await?;
    findings.push(if wal_level == "logical" {
        Check::pass("wal_level = logical")
    } else {
        Check::fail(
            format!("wal_level = {wal_level}; logical decoding needs logical"),
            format!("ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL{OR_POLL}"),
        )
    });

    let slot = catalog::slot(client, &options.slot).await?;
    let max_slots: i64 = setting("max_replication_slots").await?.parse().unwrap_or(0);
    let used_slots = catalog::replication_slot_count(client).await?;
    findings.push(match &slot {
        Some(slot) => {
            if slot.plugin == "pgoutput" {
                Check::pass(format!("replication slot {} exists (pgoutput)", options.slot))
            } else {
                Check::fail(
                    format!("replication slot {} uses plugin {:?}, not pgoutput", options.slot, slot.plugin),
                    format!("SELECT pg_drop_replication_slot({}); then walrelay setup", quote_literal(&options.slot)),
                )
            }
        }
        None if used_slots < max_slots => Check::warn(
            format!(
                "replication slot {} does not exist yet ({used_slots} of max_replication_slots = {max_slots} in use)",
                options.slot
            ),
            "walrelay setup",
        ),
        None => Check::fail(
            format!("no free replication slot: {used_slots} of max_replication_slots = {max_slots} in use"),
            "drop unused slots (SELECT slot_name FROM pg_replication_slots WHERE NOT active) or ALTER SYSTEM SET max_replication_slots = <more>; then restart",
        ),
    });

    let max_senders: i64 = setting("max_wal_senders").await?.parse().unwrap_or(0);
    let used_senders = catalog::wal_sender_count(client).await?;
    findings.push(if used_senders < max_senders {
        Check::pass(format!(
            "WAL senders: {used_senders} of max_wal_senders = {max_senders} in use"
        ))
    } else {
        Check::fail(
            format!("no free WAL sender: {used_senders} of max_wal_senders = {max_senders} in use"),
            "ALTER SYSTEM SET max_wal_senders = <more>; then restart PostgreSQL",
        )
    });

    let (user, can_replicate) = catalog::role_can_replicate(client).await?;
    findings.push(if can_replicate {
        Check::pass(format!("role {user} may replicate"))
    } else {
        Check::fail(
            format!("role {user} lacks the REPLICATION attribute"),
            format!(
                "ALTER ROLE {} WITH REPLICATION{OR_POLL}",
                quote_ident(&user)
            ),
        )
    });

    match catalog::publication_publishes_inserts(client, &options.publication).await? {
        None => findings.push(Check::fail(
            format!("publication {} does not exist", options.publication),
            format!(
                "CREATE PUBLICATION {} FOR TABLE {} (or walrelay setup)",
                quote_ident(&options.publication),
                options
                    .tables
                    .iter()
                    .map(|(s, t)| qualified(s, t))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
        Some(publishes_inserts) => {
            findings.push(if publishes_inserts {
                Check::pass(format!(
                    "publication {} exists and publishes inserts",
                    options.publication
                ))
            } else {
                Check::fail(
                    format!(
                        "publication {} does not publish inserts",
                        options.publication
                    ),
                    format!(
                        "ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate')",
                        quote_ident(&options.publication)
                    ),
                )
            });
        }
    }

    for (schema, table) in &options.tables {
        findings.extend(check_table(client, options, schema, table).await?);
    }
    if !options.poll {
        findings.extend(lost_events(client, options).await?);
    }

    let keep = setting("max_slot_wal_keep_size").await?;
    findings.push(if keep == "-1" {
        Check::warn(
            "max_slot_wal_keep_size is unlimited: a stuck slot can keep WAL until the disk is full",
            "ALTER SYSTEM SET max_slot_wal_keep_size = '50GB' (size it to your disk); then SELECT pg_reload_conf()",
        )
    } else {
        Check::pass(format!("max_slot_wal_keep_size = {keep}"))
    });
    // A standby the relay decodes from has its own needs; failover slots
    // are the primary's.
    if catalog::in_recovery(client).await? {
        findings.extend(super::check_standby::check(client, options.primary.as_ref()).await?);
    } else {
        findings.extend(
            super::check_failover::check(client, pg, &options.slot, options.failover).await?,
        );
    }
    Ok(findings)
}

/// What `run` stops on at start besides the checks above: a publication
/// that decodes events away (a row filter, a column list, a renamed
/// table), and a slot that is invalidated or gone after walrelay used it.
async fn lost_events(client: &Client, options: &SetupOptions) -> Result<Vec<Check>, SqlError> {
    use crate::relay::outbox_watch::{OutboxProblem, OutboxWatch};
    use crate::slot_health::recover_command;
    let mut findings = Vec::new();
    let mut watch = OutboxWatch::new(
        &options.slot,
        &options.publication,
        &options.tables,
        crate::relay::outbox_watch::relay_columns(&options.columns),
    );
    if let Some(problem @ (OutboxProblem::RowFilter { .. } | OutboxProblem::ColumnList { .. })) =
        watch.check(client).await?
    {
        findings.push(Check::fail(
            problem.to_string(),
            "see docs/runbooks/publication-changed.md",
        ));
    }
    let schema = super::run::record_schema(&options.tables);
    // A role that may not read walrelay's record: the slot checks above stand.
    let record = crate::slot_record::find(client, &schema, &options.slot)
        .await
        .ok()
        .flatten();
    let reading = catalog::slots(client, Some(&options.slot))
        .await?
        .into_iter()
        .next();
    let fix = format!(
        "{} (see docs/runbooks/slot-lost.md)",
        recover_command(&options.slot)
    );
    match (&reading, record) {
        (None, Some(record)) => findings.push(Check::fail(
            crate::slot_record::SlotWasInUse {
                slot: options.slot.clone(),
                record,
            }
            .to_string(),
            fix,
        )),
        (Some(_), record) => {
            let last = record.map(|r| r.last).unwrap_or_default();
            if let Some(problem) = crate::slot_health::assess(&options.slot, reading.as_ref(), last)
            {
                findings.push(Check::fail(problem.to_string(), fix));
            }
        }
        (None, None) => {}
    }
    Ok(findings)
}

async fn check_table(
    client: &Client,
    options: &SetupOptions,
    schema: &str,
    table: &str,
) -> Result<Vec<Check>, SqlError> {
    let name = format!("{schema}.{table}");
    let qualified = qualified(schema, table);
    let mut findings = Vec::new();
    let setup = if options.poll {
        "walrelay setup --source poll"
    } else {
        "walrelay setup"
    };
    if !catalog::table_exists(client, schema, table).await? {
        findings.push(Check::fail(
            format!("outbox table {name} does not exist"),
            format!("{setup} (creates the default outbox table)"),
        ));
        return Ok(findings);
    }
    if options.poll {
        let missing = crate::poll::schema::missing_pieces(client, schema, table).await?;
        findings.push(if missing.is_empty() {
            Check::pass(format!(
                "{name} is set up for polling (sequence, attempts, ordering and notify triggers, index)"
            ))
        } else {
            Check::fail(
                format!("{name} is not set up for polling: no {}", missing.join(", no ")),
                setup,
            )
        });
    } else {
        let covered =
            catalog::publication_covers(client, &options.publication, schema, table).await?;
        findings.push(if covered {
            Check::pass(format!("publication {} covers {name}", options.publication))
        } else {
            Check::fail(
                format!("publication {} does not cover {name}", options.publication),
                format!(
                    "ALTER PUBLICATION {} ADD TABLE {qualified}",
                    quote_ident(&options.publication)
                ),
            )
        });
    }
    let columns = catalog::table_columns(client, schema, table).await?;
    let c = &options.columns;
    let required = [
        (&c.id, "uuid"),
        (&c.aggregate_type, "text"),
        (&c.aggregate_id, "text"),
        (&c.event_type, "text"),
        (&c.payload, "jsonb"),
    ];
    let mut missing = Vec::new();
    for (column, suggested_type) in required {
        if !columns.iter().any(|(n, _)| n == column) {
            missing.push(format!(
                "ADD COLUMN {} {suggested_type}",
                quote_ident(column)
            ));
        }
    }
    findings.push(if missing.is_empty() {
        Check::pass(format!("{name} has the outbox columns"))
    } else {
        Check::fail(
            format!("{name} lacks outbox columns"),
            format!("ALTER TABLE {qualified} {}", missing.join(", ")),
        )
    });
    if let Some((_, payload_type)) = columns.iter().find(|(n, _)| *n == c.payload) {
        let ok = matches!(payload_type.as_str(), "jsonb" | "json" | "text" | "bytea")
            || payload_type.starts_with("character");
        if !ok {
            findings.push(Check::fail(
                format!(
                    "{name}.{} has type {payload_type}, which walrelay cannot encode",
                    c.payload
                ),
                format!(
                    "ALTER TABLE {qualified} ALTER COLUMN {} TYPE jsonb USING {}::text::jsonb",
                    quote_ident(&c.payload),
                    quote_ident(&c.payload)
                ),
            ));
        }
    }
    findings.push(if catalog::has_primary_key(client, schema, table).await? {
        Check::pass(format!("{name} has a primary key"))
    } else {
        Check::fail(
            format!("{name} has no primary key"),
            format!(
                "ALTER TABLE {qualified} ADD PRIMARY KEY ({})",
                quote_ident(&c.id)
            ),
        )
    });
    if options.retain && !options.poll {
        findings.push(
            if crate::retention::has_index(client, schema, table, &c.created_at).await? {
                Check::pass(format!(
                    "{name} has an index on {} (for --retain)",
                    c.created_at
                ))
            } else {
                Check::fail(
                    format!(
                        "{name} has no index on {}: --retain would scan the whole table for every batch",
                        c.created_at
                    ),
                    format!(
                        "walrelay setup --retain 24h (the index is the same for any retention), or {}",
                        crate::retention::create_index_sql(schema, table, &c.created_at)
                    ),
                )
            },
        );
    }
    Ok(findings)
}

/// Prints findings for a person; returns whether any check failed.
pub fn print(findings: &[Check]) -> bool {
    let mut failed = false;
    for f in findings {
        let label = match f.status {
            Status::Pass => "ok  ",
            Status::Warn => "warn",
            Status::Fail => {
                failed = true;
                "FAIL"
            }
        };
        println!("{label}  {}", f.what);
        if let Some(fix) = &f.fix {
            println!("      fix: {fix}");
        }
    }
    failed
}
