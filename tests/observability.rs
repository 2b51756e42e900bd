//! What operators look at: metrics, Prometheus, alert rules, the dashboard,
//! `status` and `check`, and the `scripts/start` path.

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use support::relay::http_get;
use support::workload::current_lsn;
use support::{BrokerChoice, PgCluster, PgOptions, Stack, StackOptions, free_port, wait_for};
use walrelay::lsn::Lsn;

fn walrelay(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_walrelay"))
        .args(args)
        .output()
        .unwrap()
}

fn setup(url: &str) {
    let out = walrelay(&["setup", "--pg-url", url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `name{labels}` -> value, from Prometheus text.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

struct SlotRow {
    active: bool,
    lag: i64,
    retained: i64,
    confirmed: Lsn,
    restart: Lsn,
}

async fn slot_row(client: &tokio_postgres::Client, slot: &str) -> SlotRow {
    let row = client
        .query_one(
            "SELECT active, (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, (pg_current_wal_lsn() - restart_lsn)::bigint,
                    confirmed_flush_lsn::text, restart_lsn::text
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    SlotRow {
        active: row.get(0),
        lag: row.get(1),
        retained: row.get(2),
        confirmed: row.get::<_, String>(3).parse().unwrap(),
        restart: row.get::<_, String>(4).parse().unwrap(),
    }
}

fn promtool(args: &[&str], stdin: Option<&str>) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect(
            "promtool (Debian's prometheus package) is needed: scripts/install-deps installs it",
        );
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_match_the_slot_and_lag_rises_while_the_broker_is_down() {
    let stack = Stack::start_with(
        "metrics",
        StackOptions {
            broker: BrokerChoice::Private,
            ..Default::default()
        },
    )
    .await;
    let relay = stack.relay(&[]);
    let (client, broker) = (&stack.client, &stack.broker);
    let topic = stack.topic("m");
    client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             SELECT 'm', 'k' || (g % 5), 'E', jsonb_build_object('g', g) FROM generate_series(1, 200) g",
        )
        .await
        .unwrap();
    assert_eq!(
        broker.consume(&topic, 200, Duration::from_secs(60)).len(),
        200
    );

    // The exported text is valid Prometheus exposition format.
    let (code, text) = relay.http_get("/metrics").await.unwrap();
    assert_eq!(code, 200);
    let check = promtool(&["check", "metrics"], Some(&text));
    assert!(
        check.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let metrics = parse_metrics(&text);
    assert_eq!(
        metrics[&format!("walrelay_events_published_total{{topic=\"{topic}\"}}")],
        200.0
    );
    assert_eq!(metrics["walrelay_replication_connected"], 1.0);
    assert_eq!(metrics["walrelay_commit_to_ack_seconds_count"], 200.0);
    // Exactly once: the 200 events went in at least one Kafka transaction.
    assert!(metrics["walrelay_kafka_commit_seconds_count"] >= 1.0);
    assert!(metrics["walrelay_kafka_commit_seconds_sum"] > 0.0);

    // The gauges agree with pg_replication_slots once the database is quiet.
    wait_for(
        "the slot gauges to match pg_replication_slots",
        Duration::from_secs(30),
        async || {
            let (_, text) = relay.http_get("/metrics").await?;
            let m = parse_metrics(&text);
            let row = slot_row(client, "walrelay").await;
            let matches = m.get("walrelay_slot_lag_bytes{slot=\"walrelay\"}")
                == Some(&(row.lag as f64))
                && m.get("walrelay_slot_retained_wal_bytes{slot=\"walrelay\"}")
                    == Some(&(row.retained as f64))
                && m.get("walrelay_slot_active{slot=\"walrelay\"}")
                    == Some(&(if row.active { 1.0 } else { 0.0 }))
                && m.get("walrelay_confirmed_lsn") == Some(&(row.confirmed.0 as f64))
                && m.get("walrelay_slot_wal_status{slot=\"walrelay\",wal_status=\"reserved\"}")
                    == Some(&1.0);
            matches.then_some(())
        },
    )
    .await;
    let row = slot_row(client, "walrelay").await;
    assert!(row.restart <= row.confirmed);

    // With the broker down, events wait and the lag grows and stays up.
    broker.stop();
    let before = current_lsn(client).await;
    client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             SELECT 'm', 'k', 'WhileDown', jsonb_build_object('pad', repeat('p', 500)) FROM generate_series(1, 100)",
        )
        .await
        .unwrap();
    let lag_while_down = wait_for(
        "the lag metric to rise",
        Duration::from_secs(20),
        async || {
            let (_, text) = relay.http_get("/metrics").await?;
            let lag = *parse_metrics(&text).get("walrelay_slot_lag_bytes{slot=\"walrelay\"}")?;
            (lag > 50_000.0).then_some(lag)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Nothing written while the broker is down is confirmed (what was
    // written before may be: the relay's own status records), so the lag
    // stays above those events' size.
    let (_, text) = relay.http_get("/metrics").await.unwrap();
    let metrics = parse_metrics(&text);
    assert!(
        metrics["walrelay_confirmed_lsn"] <= before.0 as f64,
        "confirmed past {before:?} with the broker down: {text}"
    );
    assert!(
        metrics["walrelay_slot_lag_bytes{slot=\"walrelay\"}"] >= 50_000.0,
        "the lag fell from {lag_while_down} with the broker down: {text}"
    );

    broker.start_again();
    wait_for(
        "the lag to return to zero",
        Duration::from_secs(60),
        async || {
            let (_, text) = relay.http_get("/metrics").await?;
            (*parse_metrics(&text).get("walrelay_slot_lag_bytes{slot=\"walrelay\"}")? == 0.0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        broker.consume(&topic, 300, Duration::from_secs(30)).len(),
        300
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_scrapes_the_relay_and_returns_the_lag_series() {
    let stack = Stack::start("prom").await;
    let relay = stack.relay(&[]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nrule_files:\n  - {}/alerts/walrelay.rules.yml\nscrape_configs:\n  - job_name: walrelay\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            env!("CARGO_MANIFEST_DIR"),
            relay.http_port
        ),
    )
    .unwrap();
    let port = free_port();
    let mut prometheus = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus (Debian's prometheus package) is needed");
    let series = wait_for(
        "Prometheus to return walrelay_slot_lag_bytes",
        Duration::from_secs(60),
        async || {
            let (code, body) =
                http_get(port, "/api/v1/query?query=walrelay_slot_lag_bytes").await?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let result = v["data"]["result"].as_array()?.clone();
            (code == 200 && !result.is_empty()).then_some(result)
        },
    )
    .await;
    assert_eq!(series[0]["metric"]["slot"], "walrelay");
    assert_eq!(series[0]["metric"]["job"], "walrelay");
    // The alert rules loaded, and the relay is up.
    let (_, rules) = http_get(port, "/api/v1/rules").await.unwrap();
    assert!(rules.contains("WalrelayPublishingStalled"), "{rules}");
    let (_, up) = http_get(port, "/api/v1/query?query=up").await.unwrap();
    assert!(up.contains("\"1\""), "{up}");
    prometheus.start_kill().unwrap();
    drop(relay);
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let check = promtool(&["check", "rules", "alerts/walrelay.rules.yml"], None);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(String::from_utf8_lossy(&check.stdout).contains("SUCCESS: 14 rules found"));
    let test = promtool(&["test", "rules", "alerts/walrelay.test.yml"], None);
    assert!(
        test.status.success(),
        "{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
}

#[test]
fn every_metric_in_the_dashboard_and_alerts_is_one_walrelay_exports() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // The PromQL: `expr` of dashboard panels and alert rules, `series` of rule tests.
    let mut queries: Vec<String> = Vec::new();
    fn exprs(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match v {
                        serde_json::Value::String(s) if k == "expr" || k == "query" => {
                            out.push(s.clone())
                        }
                        _ => exprs(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
            _ => {}
        }
    }
    let dashboard_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("dashboards/walrelay.json")).unwrap(),
    )
    .unwrap();
    exprs(&dashboard_json, &mut queries);
    for file in ["alerts/walrelay.rules.yml", "alerts/walrelay.test.yml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        queries.extend(
            text.lines()
                .filter_map(|l| {
                    l.trim()
                        .strip_prefix("expr:")
                        .or_else(|| l.trim().strip_prefix("- series:"))
                })
                .map(str::to_owned),
        );
    }
    let mut used = std::collections::BTreeSet::new();
    for query in &queries {
        let mut rest = query.as_str();
        while let Some(i) = rest.find("walrelay_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            // `label_values(walrelay_x, instance)` and expressions name metrics; `job="walrelay"` does not match.
            used.insert(name);
        }
    }
    assert!(used.len() > 10, "{used:?}");
    for name in used {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(name.clone(), |n, s| {
                n.strip_suffix(s).map(str::to_owned).unwrap_or(n)
            });
        assert!(
            walrelay::metrics::ALL.contains(&base.as_str()),
            "{name} is used but walrelay does not export it"
        );
    }
    // The scrape job the alerts expect is the one the compose file configures.
    let prom = std::fs::read_to_string(root.join("deploy/prometheus.yml")).unwrap();
    assert!(prom.contains("job_name: walrelay"));
    let dashboard = dashboard_json;
    let datasource = std::fs::read_to_string(
        root.join("deploy/grafana/provisioning/datasources/prometheus.yml"),
    )
    .unwrap();
    assert!(datasource.contains(
        &format!("uid: {}", dashboard["panels"][0]["datasource"]["uid"].as_str().unwrap())
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn check_names_the_fix_on_a_wrong_cluster_and_passes_on_a_right_one() {
    let replica = PgCluster::start_with(PgOptions {
        wal_level: "replica",
        ..Default::default()
    });
    let out = walrelay(&["check", "--pg-url", &replica.url("postgres")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("FAIL  wal_level = replica; logical decoding needs logical"),
        "{text}"
    );
    assert!(
        text.contains("fix: ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"),
        "{text}"
    );
    assert!(
        text.contains("FAIL  outbox table public.outbox does not exist"),
        "{text}"
    );

    let pg = PgCluster::start_with(PgOptions {
        extra_conf: vec!["max_slot_wal_keep_size = '1GB'".into()],
        ..Default::default()
    });
    let db = pg.create_database("check").await;
    let before = walrelay(&["check", "--pg-url", &pg.url(&db)]);
    assert_eq!(before.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&before.stdout)
            .contains("fix: CREATE PUBLICATION \"walrelay\" FOR TABLE \"public\".\"outbox\"")
    );
    setup(&pg.url(&db));
    let out = walrelay(&["check", "--pg-url", &pg.url(&db)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    assert!(
        text.contains("ok    public.outbox has a primary key"),
        "{text}"
    );
    assert!(
        text.contains("ok    max_slot_wal_keep_size = 1GB"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn status_json_matches_pg_replication_slots() {
    let pg = PgCluster::start();
    let db = pg.create_database("status").await;
    setup(&pg.url(&db));
    let client = pg.client(&db).await;
    client
        .batch_execute("SELECT pg_create_logical_replication_slot('second', 'pgoutput'); INSERT INTO outbox (aggregate_type, aggregate_id, event_type) VALUES ('a', 'b', 'c')")
        .await
        .unwrap();
    let out = walrelay(&["status", "--pg-url", &pg.url(&db), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let slots: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let slots = slots.as_array().unwrap();
    assert_eq!(slots.len(), 2);
    for slot in slots {
        let name = slot["slot_name"].as_str().unwrap();
        let row = slot_row(&client, name).await;
        assert_eq!(slot["active"], row.active);
        assert_eq!(slot["confirmed_flush_lsn"], row.confirmed.to_string());
        assert_eq!(slot["restart_lsn"], row.restart.to_string());
        assert_eq!(
            slot["lag_bytes"], row.lag,
            "no WAL was written between the two reads"
        );
        assert_eq!(slot["retained_wal_bytes"], row.retained);
        assert_eq!(slot["wal_status"], "reserved");
        assert_eq!(slot["two_phase"], false, "{slot}");
        // Columns of newer servers: present where the server has them.
        if pg.major >= 17 {
            let since: Option<String> = client
                .query_one(
                    "SELECT to_char(inactive_since AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') FROM pg_replication_slots WHERE slot_name = $1",
                    &[&name],
                )
                .await
                .unwrap()
                .get(0);
            assert!(since.is_some(), "{name} has never been used");
            assert_eq!(slot["inactive_since"].as_str(), since.as_deref());
            assert!(
                slot["failover"].is_boolean() && slot["synced"] == false,
                "{slot}"
            );
        } else {
            assert!(slot["inactive_since"].is_null(), "{slot}");
            assert!(slot["failover"].is_null(), "{slot}");
        }
    }
    let table = walrelay(&["status", "--pg-url", &pg.url(&db), "--slot", "walrelay"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.starts_with("SLOT"), "{text}");
    assert_eq!(text.lines().count(), 2, "one slot: {text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn scripts_start_brings_everything_up_and_stop_leaves_nothing_behind() {
    // The local stack brings its own broker (Apache Kafka, scripts/kafka).
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let state = tempfile::Builder::new()
        .prefix("walrelay-start-")
        .tempdir()
        .unwrap();
    let (pg_port, broker_port, http_port, inbox_http_port) =
        (free_port(), free_port(), free_port(), free_port());
    let env = [
        ("WALRELAY_STATE_DIR", state.path().display().to_string()),
        ("WALRELAY_PG_PORT", pg_port.to_string()),
        ("WALRELAY_BROKER_PORT", broker_port.to_string()),
        ("WALRELAY_HTTP_PORT", http_port.to_string()),
        ("WALRELAY_INBOX_HTTP_PORT", inbox_http_port.to_string()),
        ("WALRELAY_DEMO_RATE", "20".into()),
        ("WALRELAY_BIN", env!("CARGO_BIN_EXE_walrelay").into()),
    ];
    let start = Command::new(root.join("scripts/start"))
        .envs(env.clone())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&start.stdout).into_owned();
    let stop = || {
        Command::new(root.join("scripts/stop"))
            .envs(env.clone())
            .output()
            .unwrap()
    };
    if !start.status.success() {
        stop();
        panic!(
            "scripts/start failed:\n{out}\n{}",
            String::from_utf8_lossy(&start.stderr)
        );
    }
    assert!(
        out.contains(&format!("dashboard:  http://127.0.0.1:{http_port}/")),
        "{out}"
    );
    assert!(
        out.contains("scripts/kafka consume ") && out.contains("/kafka outbox.event.order"),
        "{out}"
    );

    // An event written by the demo writer arrives in Kafka.
    let consumer = support::kafka::Broker::connect_to(&format!("127.0.0.1:{broker_port}"));
    let records = consumer.consume("outbox.event.order", 3, Duration::from_secs(60));
    // ... and in the second database's inbox, through `walrelay inbox`.
    let inbox_url = format!("postgres://postgres@127.0.0.1:{pg_port}/walrelay_inbox");
    let (inbox, connection) = tokio_postgres::connect(&inbox_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let first_id = records[0].header("id").unwrap().to_owned();
    // Polled by hand, not with wait_for: a timeout must still reach the
    // stop below, so nothing is left running.
    let mut in_inbox = Vec::new();
    for _ in 0..600 {
        in_inbox = inbox
            .query(
                "SELECT id::text, topic FROM inbox WHERE id::text = $1",
                &[&first_id],
            )
            .await
            .unwrap();
        if !in_inbox.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let inbox_status = http_get(inbox_http_port, "/api/status").await;
    drop(inbox);
    let pids: Vec<i32> = [
        "kafka/node-1/pid",
        "walrelay.pid",
        "inbox.pid",
        "demo-writer.pid",
    ]
    .iter()
    .map(|file| {
        std::fs::read_to_string(state.path().join(file))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    })
    .collect();
    let stopped = stop();
    assert!(stopped.status.success());
    assert!(
        records.len() >= 3,
        "demo events in Kafka: {}",
        records.len()
    );
    assert_eq!(records[0].header("event_type"), Some("OrderPlaced"));
    assert!(records[0].key.as_ref().unwrap().starts_with(b"order-"));
    assert_eq!(in_inbox.len(), 1, "the first demo event in the inbox");
    assert_eq!(in_inbox[0].get::<_, String>(1), "outbox.event.order");
    assert!(
        out.contains(&format!(
            "(the inbox's: http://127.0.0.1:{inbox_http_port}/)"
        )),
        "{out}"
    );
    let (code, inbox_status) = inbox_status.expect("the inbox's dashboard answers");
    assert_eq!(code, 200, "{inbox_status}");
    let inbox_status: serde_json::Value = serde_json::from_str(&inbox_status).unwrap();
    assert!(inbox_status["inbox"].is_object(), "{inbox_status}");

    // Nothing is left running: not the services, not their children, not PostgreSQL.
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} is still running"
        );
    }
    let leftovers = Command::new("pgrep")
        .args(["-f", &state.path().display().to_string()])
        .output()
        .unwrap();
    assert!(
        leftovers.stdout.is_empty(),
        "left behind: {}",
        String::from_utf8_lossy(&leftovers.stdout)
    );
    let leftovers = Command::new("pgrep")
        .args(["-f", &format!("127.0.0.1:{pg_port}")])
        .output()
        .unwrap();
    assert!(
        leftovers.stdout.is_empty(),
        "left behind: {}",
        String::from_utf8_lossy(&leftovers.stdout)
    );
}
