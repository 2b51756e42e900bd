//! What the polling source needs in an outbox table, made by
//! `walrelay setup --source poll` and verified by `check` and `run`:
//!
//! - `seq`: the row's place in its aggregate's order, set by a trigger;
//! - `attempts`, `last_error`, `next_attempt_at`: failed publications and
//!   when to try again;
//! - `published_at`: set instead of deleting (`--on-published mark`);
//! - a BEFORE INSERT trigger that takes a per-aggregate advisory lock,
//!   held to the writer's commit, and only then numbers the row: writers
//!   of one aggregate take turns, so per aggregate `seq` order is commit
//!   order and a row with a lower `seq` can never become visible after
//!   one with a higher `seq`;
//! - an AFTER INSERT statement trigger that sends `NOTIFY walrelay_outbox`
//!   (delivered at commit) to wake the relay;
//! - two partial indexes over the rows not yet published: on `seq` (the
//!   claim takes the oldest) and on the aggregate and `seq` (the claim
//!   asks, per row, whether an older row of its aggregate waits).

use crate::catalog::{self, qualified, quote_ident, quote_literal};
use crate::router::OutboxColumns;
use crate::sql::{SqlClient, SqlError};

/// The channel the insert trigger notifies.
pub const NOTIFY_CHANNEL: &str = "walrelay_outbox";

/// The advisory lock class (the first key of the two-key form) under
/// which writers of one aggregate queue behind each other.
pub const WRITER_LOCK_CLASS: i32 = 0x7772_6c77; // "wrlw"

pub const SEQ: &str = "seq";
pub const ATTEMPTS: &str = "attempts";
pub const LAST_ERROR: &str = "last_error";
pub const NEXT_ATTEMPT_AT: &str = "next_attempt_at";
pub const PUBLISHED_AT: &str = "published_at";

/// The bookkeeping columns and their definitions.
const COLUMNS: [(&str, &str); 5] = [
    (SEQ, "bigint"),
    (ATTEMPTS, "integer NOT NULL DEFAULT 0"),
    (LAST_ERROR, "text"),
    (NEXT_ATTEMPT_AT, "timestamptz"),
    (PUBLISHED_AT, "timestamptz"),
];

/// Names of the objects setup creates for one table.
pub struct PollObjects {
    pub sequence: String,
    /// Rows whose records a relay may have sent (exactly once): written
    /// before a batch is published, deleted with the rows it settles.
    pub in_flight: String,
    pub order_function: String,
    pub notify_function: String,
    pub index: String,
    pub aggregate_index: String,
}

pub const ORDER_TRIGGER: &str = "walrelay_order";
pub const NOTIFY_TRIGGER: &str = "walrelay_notify";

impl PollObjects {
    pub fn of(table: &str) -> Self {
        PollObjects {
            sequence: format!("{table}_walrelay_seq"),
            in_flight: format!("{table}_walrelay_in_flight"),
            order_function: format!("{table}_walrelay_order"),
            notify_function: format!("{table}_walrelay_notify"),
            index: format!("{table}_walrelay_pending"),
            aggregate_index: format!("{table}_walrelay_aggregate"),
        }
    }
}

/// The writers' per-aggregate lock key, as SQL over the trigger's `NEW`.
pub fn aggregate_key_sql(row: &str, columns: &OutboxColumns) -> String {
    format!(
        "hashtext(coalesce({row}.{}::text, '') || '/' || coalesce({row}.{}::text, ''))",
        quote_ident(&columns.aggregate_type),
        quote_ident(&columns.aggregate_id)
    )
}

/// The trigger functions (CREATE OR REPLACE: setup may run again).
pub fn functions_sql(schema: &str, table: &str, columns: &OutboxColumns) -> String {
    let objects = PollObjects::of(table);
    let seq = quote_ident(SEQ);
    format!(
        "CREATE OR REPLACE FUNCTION {order}() RETURNS trigger LANGUAGE plpgsql AS $walrelay$
BEGIN
  -- walrelay run --source poll: writers of one aggregate take turns from
  -- here to their commit, so the sequence follows commit order.
  PERFORM pg_advisory_xact_lock({writer}, {key});
  NEW.{seq} := nextval({sequence});
  RETURN NEW;
END
$walrelay$;
CREATE OR REPLACE FUNCTION {notify}() RETURNS trigger LANGUAGE plpgsql AS $walrelay$
BEGIN
  PERFORM pg_notify({channel}, TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME);
  RETURN NULL;
END
$walrelay$;",
        order = qualified(schema, &objects.order_function),
        notify = qualified(schema, &objects.notify_function),
        writer = WRITER_LOCK_CLASS,
        key = aggregate_key_sql("NEW", columns),
        sequence = quote_literal(&qualified(schema, &objects.sequence)),
        channel = quote_literal(NOTIFY_CHANNEL),
    )
}

/// Makes `schema.table` ready for the polling source, in one transaction;
/// one line per step, saying what it did.
pub async fn setup(
    client: &mut SqlClient,
    schema: &str,
    table: &str,
    columns: &OutboxColumns,
) -> Result<Vec<String>, SqlError> {
    let name = format!("{schema}.{table}");
    let target = qualified(schema, table);
    let objects = PollObjects::of(table);
    let existing = catalog::table_columns(client, schema, table).await?;
    let missing: Vec<(&str, &str)> = COLUMNS
        .iter()
        .copied()
        .filter(|(c, _)| !existing.iter().any(|(name, _)| name == c))
        .collect();
    let has_created_at = existing.iter().any(|(c, _)| *c == columns.created_at);
    let triggers_before = catalog::table_triggers(client, schema, table).await?;
    let index_before = catalog::index_exists(client, schema, &objects.index).await?;
    let aggregate_index_before =
        catalog::index_exists(client, schema, &objects.aggregate_index).await?;
    let in_flight_before = catalog::table_exists(client, schema, &objects.in_flight).await?;

    let mut report = Vec::new();
    let address = client.address().to_owned();
    let tx = client
        .inner()
        .transaction()
        .await
        .map_err(|e| SqlError::from_postgres(&address, e))?;
    let at = |e| SqlError::from_postgres(&address, e);
    tx.batch_execute(&format!(
        "CREATE SEQUENCE IF NOT EXISTS {}",
        qualified(schema, &objects.sequence)
    ))
    .await
    .map_err(at)?;
    if missing.is_empty() {
        report.push(format!("{name} has the polling columns"));
    } else {
        let adds: Vec<String> = missing
            .iter()
            .map(|(c, def)| format!("ADD COLUMN IF NOT EXISTS {} {def}", quote_ident(c)))
            .collect();
        tx.batch_execute(&format!("ALTER TABLE {target} {}", adds.join(", ")))
            .await
            .map_err(at)?;
        let names: Vec<&str> = missing.iter().map(|(c, _)| *c).collect();
        report.push(format!("added columns {} to {name}", names.join(", ")));
    }
    tx.batch_execute(&functions_sql(schema, table, columns))
        .await
        .map_err(at)?;
    let mut created = Vec::new();
    if !triggers_before.iter().any(|t| t == ORDER_TRIGGER) {
        tx.batch_execute(&format!(
            "CREATE TRIGGER {ORDER_TRIGGER} BEFORE INSERT ON {target} FOR EACH ROW EXECUTE FUNCTION {}()",
            qualified(schema, &objects.order_function)
        ))
        .await
        .map_err(at)?;
        created.push(ORDER_TRIGGER);
    }
    if !triggers_before.iter().any(|t| t == NOTIFY_TRIGGER) {
        tx.batch_execute(&format!(
            "CREATE TRIGGER {NOTIFY_TRIGGER} AFTER INSERT ON {target} FOR EACH STATEMENT EXECUTE FUNCTION {}()",
            qualified(schema, &objects.notify_function)
        ))
        .await
        .map_err(at)?;
        created.push(NOTIFY_TRIGGER);
    }
    if created.is_empty() {
        report.push(format!("{name} has the ordering and notify triggers"));
    } else {
        report.push(format!(
            "created trigger(s) {} on {name}",
            created.join(", ")
        ));
    }
    // Rows from before the trigger get numbers in the order they were made.
    let order = if has_created_at {
        format!("{}, ctid", quote_ident(&columns.created_at))
    } else {
        "ctid".to_owned()
    };
    let numbered = tx
        .execute(
            &format!(
                "WITH unnumbered AS (
                   SELECT ctid AS row_id, row_number() OVER (ORDER BY {order}) AS n
                   FROM {target} WHERE {seq} IS NULL),
                 base AS (SELECT nextval({sequence}) AS first
                          WHERE EXISTS (SELECT 1 FROM unnumbered))
                 UPDATE {target} t SET {seq} = base.first + unnumbered.n
                 FROM unnumbered, base WHERE t.ctid = unnumbered.row_id",
                seq = quote_ident(SEQ),
                sequence = quote_literal(&qualified(schema, &objects.sequence)),
            ),
            &[],
        )
        .await
        .map_err(at)?;
    if numbered > 0 {
        // The rows took numbers past the one nextval gave: move on.
        tx.batch_execute(&format!(
            "SELECT setval({}, (SELECT max({}) FROM {target}))",
            quote_literal(&qualified(schema, &objects.sequence)),
            quote_ident(SEQ)
        ))
        .await
        .map_err(at)?;
        report.push(format!("numbered {numbered} existing rows of {name}"));
    }
    // Both over the rows not yet published: the claim takes the oldest by
    // seq, then asks per row whether an older row of its aggregate waits.
    let indexes = [
        (&objects.index, index_before, vec![SEQ], "by seq"),
        (
            &objects.aggregate_index,
            aggregate_index_before,
            vec![&columns.aggregate_type, &columns.aggregate_id, SEQ],
            "by aggregate and seq",
        ),
    ];
    for (index, existed, keys, order) in indexes {
        let keys: Vec<String> = keys.iter().map(|k| quote_ident(k)).collect();
        tx.batch_execute(&format!(
            "CREATE INDEX IF NOT EXISTS {} ON {target} ({}) WHERE {} IS NULL",
            quote_ident(index),
            keys.join(", "),
            quote_ident(PUBLISHED_AT)
        ))
        .await
        .map_err(at)?;
        if !existed {
            report.push(format!(
                "created index {index} on {name} (rows not yet published, {order})"
            ));
        }
    }
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {} (seq bigint PRIMARY KEY, claimed_at timestamptz NOT NULL DEFAULT now())",
        qualified(schema, &objects.in_flight)
    ))
    .await
    .map_err(at)?;
    if !in_flight_before {
        report.push(format!(
            "created table {schema}.{} (rows a relay may have sent, for exactly once)",
            objects.in_flight
        ));
    }
    // The records' origin names this table's rows apart from any other
    // source's (another database of the same name, a table made again):
    // a random id, kept in the in-flight table's comment.
    let in_flight = qualified(schema, &objects.in_flight);
    let comment: Option<String> = tx
        .query_one(
            "SELECT obj_description($1::text::regclass, 'pg_class')",
            &[&in_flight],
        )
        .await
        .map_err(at)?
        .get(0);
    if comment.as_deref().and_then(source_id_of).is_none() {
        let id: String = tx
            .query_one("SELECT gen_random_uuid()::text", &[])
            .await
            .map_err(at)?
            .get(0);
        tx.batch_execute(&format!(
            "COMMENT ON TABLE {in_flight} IS {}",
            quote_literal(&format!("{SOURCE_ID_PREFIX}{id}"))
        ))
        .await
        .map_err(at)?;
        report.push(format!("{name}'s records carry source id {id}"));
    }
    tx.commit().await.map_err(at)?;
    Ok(report)
}

/// What `schema.table` lacks for the polling source; empty when ready.
pub async fn missing_pieces(
    client: &SqlClient,
    schema: &str,
    table: &str,
) -> Result<Vec<String>, SqlError> {
    let columns = catalog::table_columns(client, schema, table).await?;
    let mut missing: Vec<String> = COLUMNS
        .iter()
        .filter(|(c, _)| !columns.iter().any(|(name, _)| name == c))
        .map(|(c, _)| format!("column {c}"))
        .collect();
    let triggers = catalog::table_triggers(client, schema, table).await?;
    for trigger in [ORDER_TRIGGER, NOTIFY_TRIGGER] {
        if !triggers.iter().any(|t| t == trigger) {
            missing.push(format!("trigger {trigger}"));
        }
    }
    let objects = PollObjects::of(table);
    for index in [&objects.index, &objects.aggregate_index] {
        if !catalog::index_exists(client, schema, index).await? {
            missing.push(format!("index {index}"));
        }
    }
    if !catalog::table_exists(client, schema, &objects.in_flight).await? {
        missing.push(format!("table {}", objects.in_flight));
    } else if source_id(client, schema, table).await?.is_none() {
        missing.push(format!("source id (the comment on {})", objects.in_flight));
    }
    Ok(missing)
}

/// How the in-flight table's comment starts, before the source id.
const SOURCE_ID_PREFIX: &str = "walrelay source ";

fn source_id_of(comment: &str) -> Option<String> {
    let id = comment.strip_prefix(SOURCE_ID_PREFIX)?.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

/// The id setup gave `schema.table`'s rows, the system id of their
/// records' origin; `None` before setup.
pub async fn source_id(
    client: &SqlClient,
    schema: &str,
    table: &str,
) -> Result<Option<String>, SqlError> {
    let in_flight = qualified(schema, &PollObjects::of(table).in_flight);
    let comment: Option<String> = client
        .query_one(
            "SELECT obj_description(to_regclass($1), 'pg_class')",
            &[&in_flight],
        )
        .await?
        .get(0);
    Ok(comment.as_deref().and_then(source_id_of))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trigger_locks_the_aggregate_then_numbers_the_row() {
        let sql = functions_sql("app", "outbox", &OutboxColumns::default());
        let lock = sql
            .find(&format!("pg_advisory_xact_lock({WRITER_LOCK_CLASS}, hashtext(coalesce(NEW.\"aggregate_type\"::text, '') || '/' || coalesce(NEW.\"aggregate_id\"::text, '')))"))
            .expect("the lock");
        let number = sql
            .find("NEW.\"seq\" := nextval('\"app\".\"outbox_walrelay_seq\"')")
            .expect("the number");
        assert!(lock < number, "{sql}");
        assert!(sql.contains("CREATE OR REPLACE FUNCTION \"app\".\"outbox_walrelay_order\"()"));
        assert!(
            sql.contains("pg_notify('walrelay_outbox', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME)")
        );
    }
}
