//! Shared steps of the end-to-end tests: setup, the slot's position, and
//! the ground truth of what was committed, read through `test_decoding`
//! (PostgreSQL's own output plugin) so it does not depend on walrelay's
//! transport or decoder.

use super::PgCluster;

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
