//! Shared steps of the end-to-end tests: setup, the slot's position, and
//! the ground truth of what was committed, read through `test_decoding`
//! (PostgreSQL's own output plugin) so it does not depend on walrelay's
//! transport or decoder.

use std::collections::HashMap;

use super::kafka::Record;
use super::{PgCluster, Stack};

/// Runs `walrelay setup` with `args` and returns its output lines.
pub fn setup(pg_url: &str, args: &[&str]) -> Vec<String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walrelay"))
        .args(["setup", "--pg-url", pg_url])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "setup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

pub async fn confirmed_flush_lsn(client: &tokio_postgres::Client, slot: &str) -> String {
    client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0)
}

/// The slot's confirmed LSN, parsed.
pub async fn confirmed(client: &tokio_postgres::Client, slot: &str) -> walrelay::lsn::Lsn {
    confirmed_flush_lsn(client, slot).await.parse().unwrap()
}

/// The LSN `sql` returns as the text of its one column.
pub async fn lsn_of(client: &tokio_postgres::Client, sql: &str) -> walrelay::lsn::Lsn {
    client
        .query_one(sql, &[])
        .await
        .unwrap()
        .get::<_, String>(0)
        .parse()
        .unwrap()
}

/// Where the server's WAL has been written to (`pg_current_wal_lsn()`).
pub async fn current_lsn(client: &tokio_postgres::Client) -> walrelay::lsn::Lsn {
    lsn_of(client, "SELECT pg_current_wal_lsn()::text").await
}

/// Creates the `test_decoding` slot `twin` beside the relay's, so
/// `commit_order` can read the same changes as ground truth.
pub async fn create_twin_slot(client: &tokio_postgres::Client) {
    client
        .batch_execute("SELECT pg_create_logical_replication_slot('twin', 'test_decoding')")
        .await
        .unwrap();
}

/// Every outbox insert committed so far, in commit order, as (id,
/// aggregate_id, the commit's end LSN), read from the `test_decoding` slot
/// `slot` without consuming it. Asserts there are `expected` of them.
pub async fn commit_order(
    pg: &PgCluster,
    db: &str,
    slot: &str,
    expected: usize,
) -> Vec<(String, String, walrelay::lsn::Lsn)> {
    let client = pg.client(db).await;
    let rows = client
        .query(
            "SELECT lsn::text, data FROM pg_logical_slot_peek_changes($1, NULL, NULL)",
            &[&slot],
        )
        .await
        .unwrap();
    let mut pending: Vec<(String, String)> = Vec::new();
    let mut out = Vec::new();
    for row in rows {
        let (lsn, data): (String, String) = (row.get(0), row.get(1));
        if data.starts_with("table public.outbox: INSERT: ") {
            let columns = parse_test_decoding_insert(&data);
            let value = |name: &str| {
                columns
                    .iter()
                    .find(|(n, _)| n == name)
                    .and_then(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            pending.push((value("id"), value("aggregate_id")));
        } else if data.starts_with("COMMIT") {
            // For a commit, test_decoding's lsn is the commit's end.
            let end: walrelay::lsn::Lsn = lsn.parse().unwrap();
            out.extend(pending.drain(..).map(|(id, key)| (id, key, end)));
        }
    }
    assert_eq!(
        out.len(),
        expected,
        "committed outbox rows in the twin slot"
    );
    out
}

/// Parses one test_decoding INSERT line into column name -> value, where a
/// value is the unquoted text (None for SQL NULL).
pub fn parse_test_decoding_insert(line: &str) -> Vec<(String, Option<String>)> {
    let rest = line.split_once(": INSERT: ").expect("an INSERT line").1;
    let mut out = Vec::new();
    let mut s = rest;
    while !s.is_empty() {
        let open = s.find('[').unwrap();
        let name = s[..open].to_owned();
        let close = s[open..].find("]:").unwrap() + open;
        let type_name = s[open + 1..close].to_owned();
        s = &s[close + 2..];
        let value = if let Some(quoted) = s.strip_prefix('\'') {
            let mut value = String::new();
            let mut chars = quoted.char_indices().peekable();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                if c == '\'' {
                    if matches!(chars.peek(), Some((_, '\''))) {
                        chars.next();
                        value.push('\'');
                    } else {
                        end = i + 1;
                        break;
                    }
                } else {
                    value.push(c);
                }
            }
            s = &quoted[end..];
            Some(value)
        } else {
            let end = s.find(' ').unwrap_or(s.len());
            let token = &s[..end];
            s = &s[end..];
            (token != "null").then(|| token.to_owned())
        };
        s = s.trim_start();
        // test_decoding spells booleans out; the type's output function
        // (which pgoutput uses) prints t and f.
        let value = match (type_name.as_str(), value.as_deref()) {
            ("boolean", Some("true")) => Some("t".to_owned()),
            ("boolean", Some("false")) => Some("f".to_owned()),
            _ => value,
        };
        out.push((name, value));
    }
    out
}

/// A seeded random source for kill timings; the seed is printed, so a
/// failing run can be repeated with `WALRELAY_TEST_SEED`.
pub fn seeded_rng(test: &str) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    let seed = std::env::var("WALRELAY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("{test}: random timings from seed {seed} (repeat with WALRELAY_TEST_SEED={seed})");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// Checks that every committed event of `truth` (from `commit_order`) is
/// in `records` exactly once, that nothing else is, and that each key's
/// events are in commit order.
pub fn assert_exactly_once_in_order(
    truth: &[(String, String, walrelay::lsn::Lsn)],
    records: &[Record],
) {
    let mut copies: HashMap<&str, usize> = HashMap::new();
    let mut order: HashMap<String, Vec<&str>> = HashMap::new();
    for r in records {
        let id = r.header("id").unwrap();
        *copies.entry(id).or_default() += 1;
        let key = String::from_utf8(r.key.clone().unwrap()).unwrap();
        order.entry(key).or_default().push(id);
    }
    let mut expected: HashMap<&str, Vec<&str>> = HashMap::new();
    let at = |id: &str| -> Vec<String> {
        records
            .iter()
            .filter(|r| r.header("id") == Some(id))
            .map(|r| format!("{}/{}", r.partition, r.offset))
            .collect()
    };
    for (id, key, end) in truth {
        let n = copies.get(id.as_str()).copied().unwrap_or(0);
        assert_eq!(
            n,
            1,
            "event {id} of {key} (commit {end}) arrived {n} times, at (partition/offset) {:?}",
            at(id)
        );
        expected.entry(key.as_str()).or_default().push(id.as_str());
    }
    assert_eq!(
        records.len(),
        truth.len(),
        "no record that was not committed"
    );
    for (key, ids) in expected {
        if order[key] != ids {
            let arrived: Vec<String> = records
                .iter()
                .filter(|r| r.key.as_deref() == Some(key.as_bytes()))
                .map(|r| {
                    format!(
                        "{} at {}/{} position {:?}",
                        r.header("id").unwrap(),
                        r.partition,
                        r.offset,
                        r.header("walrelay_position")
                    )
                })
                .collect();
            panic!(
                "per-key order of {key}: committed {ids:#?}\narrived (id at partition/offset):\n{}",
                arrived.join("\n")
            );
        }
    }
}

/// `writers` connections committing `txns` transactions of `per_txn`
/// events each, over 50 aggregates, as fast as they can.
pub fn spawn_writers(
    stack: &Stack,
    aggregate_type: &'static str,
    writers: i32,
    txns: i32,
    per_txn: i32,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..writers)
        .map(|w| {
            let url = stack.url();
            tokio::spawn(async move {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                for t in 0..txns {
                    client
                        .execute(
                            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                             SELECT $1::text, 'agg-' || (($2::int * 7 + $3::int + g) % 50), 'E',
                                    jsonb_build_object('w', $2::int, 't', $3::int, 'g', g)
                             FROM generate_series(1, $4::int) g",
                            &[&aggregate_type, &w, &t, &per_txn],
                        )
                        .await
                        .unwrap();
                }
            })
        })
        .collect()
}

/// A writer that commits 5 events of `aggregate_type` over 7 aggregates
/// every 20 ms until `stop` is set, connecting again across restarts.
/// Returns the number of events whose commit succeeded (a commit that
/// failed may still have happened: the twin slot tells).
pub fn steady_writer(
    url: String,
    aggregate_type: &'static str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    use std::time::Duration;
    tokio::spawn(async move {
        let mut written = 0;
        let mut client: Option<tokio_postgres::Client> = None;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    Ok((c, conn)) => {
                        tokio::spawn(conn);
                        client = Some(c);
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
            let result = client
                .as_ref()
                .unwrap()
                .execute(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                     SELECT $1::text, 'agg-' || (g % 7), 'E', jsonb_build_object('g', g)
                     FROM generate_series(1, 5) g",
                    &[&aggregate_type],
                )
                .await;
            if result.is_ok() {
                written += 5;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        written
    })
}
