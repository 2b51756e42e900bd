//! alerts/walrelay.rules.yml against the topology we ship: an active and a
//! standby relay on one slot (deploy/kubernetes), a `walrelay inbox` and a
//! `walrelay run --source poll`, on a real PostgreSQL and Apache Kafka,
//! scraped by a real Prometheus under the Prometheus Operator's PodMonitor
//! job naming (`<namespace>/<name>`) and the compose one (`walrelay`). The
//! healthy state raises nothing; each fault raises its own alert and no
//! other. Also: every alert links a runbook of docs/runbooks, and the
//! PrometheusRule beside the PodMonitor carries the rules unchanged.
//!
//! The test-only rewrite: the rules are loaded with their `for:`
//! durations, range windows and thresholds made small (`REWRITES`, each of
//! which must match), so that each fault shows within seconds. The
//! expressions are otherwise the shipped ones.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use support::kafka::{Broker, Topics};
use support::relay::{RelayProcess, http_get};
use support::{PgCluster, free_port, wait_for};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const RUNBOOK_BASE: &str = "https://github.com/walrelay/walrelay/blob/main/docs/runbooks/";
/// The runbooks of docs/runbooks the alerts may link to.
const RUNBOOKS: [&str; 11] = [
    "relay-down.md",
    "not-scraped.md",
    "standby-lost.md",
    "slot-lag-growing.md",
    "slot-near-invalidation.md",
    "broker-down.md",
    "dead-letters.md",
    "exactly-once-fallback.md",
    "poll-backlog.md",
    "inbox-lag.md",
    "publishing-stalled.md",
];

/// A YAML file as JSON, read by PyYAML in scripts/install-deps's tool
/// environment (the one tests/kubernetes.rs uses).
fn yaml(path: &Path) -> Value {
    let tools =
        PathBuf::from(std::env::var("WALRELAY_TOOLS").unwrap_or_else(|_| "/opt/walrelay".into()));
    let python = tools.join("venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run scripts/install-deps",
        python.display()
    );
    let out = std::process::Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn rules() -> Vec<Value> {
    let doc = yaml(&Path::new(ROOT).join("alerts/walrelay.rules.yml"));
    doc["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect()
}

#[test]
fn every_alert_links_a_runbook_of_the_list_and_every_runbook_is_linked() {
    let mut linked = BTreeSet::new();
    for rule in rules() {
        let name = rule["alert"].as_str().unwrap();
        let url = rule["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} has no runbook_url"));
        let file = url
            .strip_prefix(RUNBOOK_BASE)
            .unwrap_or_else(|| panic!("{name}: {url} is not under {RUNBOOK_BASE}"));
        let runbook = RUNBOOKS
            .iter()
            .find(|r| **r == file)
            .unwrap_or_else(|| panic!("{name}: {file} is not one of {RUNBOOKS:?}"));
        linked.insert(*runbook);
    }
    let unlinked: Vec<&str> = RUNBOOKS
        .iter()
        .copied()
        .filter(|r| !linked.contains(r))
        .collect();
    assert!(unlinked.is_empty(), "no alert links {unlinked:?}");
}

#[test]
fn the_prometheus_rule_carries_the_rules_file_unchanged() {
    let rules = yaml(&Path::new(ROOT).join("alerts/walrelay.rules.yml"));
    let resource = yaml(&Path::new(ROOT).join("deploy/kubernetes/prometheusrule.yaml"));
    assert_eq!(resource["kind"], "PrometheusRule");
    assert_eq!(
        resource["spec"]["groups"], rules["groups"],
        "deploy/kubernetes/prometheusrule.yaml differs from alerts/walrelay.rules.yml: run scripts/prometheusrule"
    );
    let kustomization =
        std::fs::read_to_string(Path::new(ROOT).join("deploy/kubernetes/kustomization.yaml"))
            .unwrap();
    assert!(kustomization.contains("- prometheusrule.yaml"));
}

/// The test-only rewrite of the rules: (shipped text, test text). Each
/// shipped text must occur, so a change of the rules fails here first.
const REWRITES: &[(&str, &str)] = &[
    ("for: 1m", "for: 3s"),
    ("for: 2m", "for: 6s"),
    ("for: 5m", "for: 10s"),
    ("for: 10m", "for: 10s"),
    ("[10m]", "[20s]"),
    ("[15m]", "[20s]"),
    ("[5m]", "[10s]"),
    // Slot lag: 1 GiB -> 16 MiB; poll backlog and last ack: 300 s -> 5 s;
    // inbox lag: 10000 -> 20 records.
    ("> 1073741824", "> 16777216"),
    ("> 300", "> 5"),
    ("> 10000", "> 20"),
];

const NAMESPACE: &str = "walrelay-alerts";
const POD_JOB: &str = "walrelay-alerts/walrelay";
const COMPOSE_JOB: &str = "walrelay";

/// A real Prometheus with the rewritten rules and two file-discovered
/// scrape configs: the PodMonitor's (job `<namespace>/walrelay`, as the
/// operator relabels it, with `namespace` and `pod` labels) and compose's.
struct Prometheus {
    port: u16,
    dir: tempfile::TempDir,
    _child: tokio::process::Child,
}

impl Prometheus {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut text =
            std::fs::read_to_string(Path::new(ROOT).join("alerts/walrelay.rules.yml")).unwrap();
        for (from, to) in REWRITES {
            assert!(text.contains(from), "the rules no longer contain {from:?}");
            text = text.replace(from, to);
        }
        std::fs::write(dir.path().join("rules.yml"), text).unwrap();
        let config = format!(
            "global:
  scrape_interval: 1s
  scrape_timeout: 900ms
  evaluation_interval: 1s
rule_files:
  - {dir}/rules.yml
scrape_configs:
  - job_name: podMonitor/{NAMESPACE}/walrelay/0
    file_sd_configs:
      - files: ['{dir}/pods.json']
    relabel_configs:
      - target_label: job
        replacement: {POD_JOB}
  - job_name: {COMPOSE_JOB}
    file_sd_configs:
      - files: ['{dir}/compose.json']
",
            dir = dir.path().display()
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = free_port();
        Prometheus {
            port,
            _child: tokio::process::Command::new("prometheus")
                .arg(format!(
                    "--config.file={}",
                    dir.path().join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::from(
                    std::fs::File::create(dir.path().join("prometheus.log")).unwrap(),
                ))
                .kill_on_drop(true)
                .spawn()
                .expect("prometheus (Debian's prometheus package) is needed: scripts/install-deps"),
            dir,
        }
    }

    /// Points the two scrape configs at these processes.
    fn targets(&self, pods: &[&RelayProcess], compose: &[&RelayProcess]) {
        let pods: Vec<Value> = pods
            .iter()
            .map(|p| {
                serde_json::json!({
                    "targets": [format!("127.0.0.1:{}", p.http_port)],
                    "labels": {"namespace": NAMESPACE, "pod": format!("walrelay-{}", p.http_port)},
                })
            })
            .collect();
        let compose: Vec<String> = compose
            .iter()
            .map(|p| format!("127.0.0.1:{}", p.http_port))
            .collect();
        // Written whole and renamed, so discovery never reads half a file.
        for (name, value) in [
            ("pods.json", Value::from(pods)),
            ("compose.json", serde_json::json!([{ "targets": compose }])),
        ] {
            let tmp = self.dir.path().join(format!("{name}.tmp"));
            std::fs::write(&tmp, value.to_string()).unwrap();
            std::fs::rename(&tmp, self.dir.path().join(name)).unwrap();
        }
    }

    async fn get(&self, path: &str) -> Option<Value> {
        let (code, body) = http_get(self.port, path).await?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }

    /// Active alerts (pending or firing): (name, state, labels).
    async fn alerts(&self) -> Option<Vec<(String, String, Value)>> {
        let v = self.get("/api/v1/alerts").await?;
        Some(
            v["data"]["alerts"]
                .as_array()?
                .iter()
                .map(|a| {
                    (
                        a["labels"]["alertname"].as_str().unwrap_or("").to_owned(),
                        a["state"].as_str().unwrap_or("").to_owned(),
                        a["labels"].clone(),
                    )
                })
                .collect(),
        )
    }

    /// The value of a PromQL query's single-series result.
    async fn query(&self, promql: &str) -> Option<f64> {
        let v = self
            .get(&format!("/api/v1/query?query={}", encode(promql)))
            .await?;
        let result = v["data"]["result"].as_array()?;
        result.first()?["value"][1].as_str()?.parse().ok()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Waits until `name` fires (with `labels` among its labels) and then
/// checks that it is the only alert active; returns after it has.
async fn fires_alone(prometheus: &Prometheus, name: &str, labels: &[(&str, &str)]) {
    let alerts = wait_for(
        &format!("{name} {labels:?} to fire"),
        Duration::from_secs(120),
        async || {
            let alerts = prometheus.alerts().await?;
            alerts
                .iter()
                .any(|(n, state, l)| {
                    n == name
                        && state == "firing"
                        && labels.iter().all(|(k, v)| l[*k].as_str() == Some(*v))
                })
                .then_some(alerts)
        },
    )
    .await;
    let others: Vec<_> = alerts.iter().filter(|(n, _, _)| n != name).collect();
    assert!(
        others.is_empty(),
        "{name} fired, and so did {others:?}\n{}",
        prometheus.log()
    );
}

/// Waits until no alert is active.
async fn quiet(prometheus: &Prometheus, after: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let alerts = prometheus.alerts().await;
        if alerts.as_ref().is_some_and(Vec::is_empty) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "alerts still active 120 s after {after}: {alerts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Holds the lock of `sql` in a transaction of its own until dropped.
async fn hold(pg: &PgCluster, db: &str, sql: &str) -> tokio_postgres::Client {
    let client = pg.client(db).await;
    client.batch_execute("BEGIN").await.unwrap();
    client.batch_execute(sql).await.unwrap();
    client
}

#[tokio::test(flavor = "multi_thread")]
async fn each_alert_fires_for_its_own_fault_and_no_other() {
    let pg = PgCluster::start();
    // The test's own broker: one fault stops it.
    let broker = Broker::start();
    let topics = Topics::new("alerts");
    let db = pg.create_database("alerts").await;
    let url = pg.url(&db);
    support::workload::setup(&url, &[]);
    support::workload::setup(&url, &["--source", "poll", "--table", "public.polled"]);
    support::workload::setup(&url, &["--inbox"]);
    let client = pg.client(&db).await;

    // The pods: two relays on one slot. A short stall timeout and standby
    // retry, and a replication timeout longer than the test.
    let relay_args = topics.relay_args(&[
        "--standby-retry",
        "500ms",
        "--broker-stall-timeout",
        "3s",
        "--replication-timeout",
        "10m",
        // A scan of 50 records: the test's own partitions are read to their
        // start, while 60 records of another producer at a partition's tail
        // make exactly once fall back.
        "--exactly-once-lookback",
        "50",
    ]);
    let relay_args: Vec<&str> = relay_args.iter().map(String::as_str).collect();
    let start_relay = || RelayProcess::start(&url, &broker.bootstrap(), &relay_args);
    // Compose: the polling source and the inbox.
    let poll_args = topics.relay_args(&[
        "--source",
        "poll",
        "--table",
        "public.polled",
        "--poll-interval",
        "200ms",
        "--broker-stall-timeout",
        "3s",
    ]);
    let poll_args: Vec<&str> = poll_args.iter().map(String::as_str).collect();
    let poll = RelayProcess::start(&url, &broker.bootstrap(), &poll_args);
    // The inbox reads the orders and the polled rows (not the topic another
    // producer writes to below: its records are no events).
    let pattern = format!("^{}\\.outbox\\.event\\.(orders|polled)$", topics.ns);
    // Small batches: a slow store shows as lag between them.
    let inbox_args = topics.inbox_args(&["--topic", &pattern, "--batch-size", "5"]);
    let inbox_args: Vec<&str> = inbox_args.iter().map(String::as_str).collect();
    let inbox = RelayProcess::start_inbox(&url, &broker.bootstrap(), &inbox_args);

    let mut a = start_relay();
    let mut b = start_relay();
    let role = async |r: &RelayProcess| -> Option<String> {
        let (_, body) = r.http_get("/readyz").await?;
        let v: Value = serde_json::from_str(&body).ok()?;
        Some(v["role"].as_str()?.to_owned())
    };
    wait_for(
        "one relay active and one standby",
        Duration::from_secs(60),
        async || {
            let roles = [role(&a).await?, role(&b).await?];
            (roles.contains(&"active".to_owned()) && roles.contains(&"standby".to_owned()))
                .then_some(())
        },
    )
    .await;
    if role(&a).await.as_deref() != Some("active") {
        std::mem::swap(&mut a, &mut b);
    }
    let (mut active, mut standby) = (a, b);

    let prometheus = Prometheus::start();
    prometheus.targets(&[&active, &standby], &[&poll, &inbox]);

    // Healthy, with events flowing through all four processes: the relay
    // publishes, the inbox stores, the polling source publishes.
    let insert = async |aggregate: &str, n: i32| {
        client
            .execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                 SELECT $1::text, 'k' || g, 'E', '{}' FROM generate_series(1, $2::int) g",
                &[&aggregate, &n],
            )
            .await
            .unwrap();
    };
    let insert_polled = async |aggregate: &str, n: i32| {
        client
            .execute(
                "INSERT INTO polled (aggregate_type, aggregate_id, event_type, payload)
                 SELECT $1::text, 'k' || g, 'E', '{}' FROM generate_series(1, $2::int) g",
                &[&aggregate, &n],
            )
            .await
            .unwrap();
    };
    let stored = async |n: i64| {
        let count: i64 = client
            .query_one("SELECT count(*) FROM inbox", &[])
            .await
            .unwrap()
            .get(0);
        (count >= n).then_some(())
    };
    insert("orders", 5).await;
    insert_polled("polled", 5).await;
    wait_for(
        "the inbox to store 10 events",
        Duration::from_secs(60),
        async || stored(10).await,
    )
    .await;
    // Every target scraped, under both job names, and the rules evaluated
    // over several periods: nothing is active.
    wait_for(
        "Prometheus to scrape all four processes",
        Duration::from_secs(60),
        async || {
            let pods = prometheus
                .query(&format!("count(up{{job=\"{POD_JOB}\"}} == 1)"))
                .await?;
            let compose = prometheus
                .query(&format!("count(up{{job=\"{COMPOSE_JOB}\"}} == 1)"))
                .await?;
            (pods == 2.0 && compose == 2.0).then_some(())
        },
    )
    .await;
    // Prometheus's own count of rule evaluations, from its /metrics.
    let evaluations = async || {
        let (_, text) = http_get(prometheus.port, "/metrics").await?;
        support::relay::metric_in(&text, "prometheus_rule_group_iterations_total")
    };
    // Nothing scraped yet is how Prometheus starts: wait for that to pass.
    quiet(&prometheus, "the first scrapes").await;
    let start = evaluations().await.unwrap_or(0.0);
    // Past the longest `for:` (10 s) of the rewritten rules.
    wait_for(
        "15 evaluations of the rules",
        Duration::from_secs(120),
        async || {
            let alerts = prometheus.alerts().await?;
            assert!(
                alerts.is_empty(),
                "healthy, yet active: {alerts:?}\n{}",
                prometheus.log()
            );
            (evaluations().await? >= start + 15.0).then_some(())
        },
    )
    .await;

    // 1. The streaming relay is killed: it is down; the standby takes over,
    // so nothing else pages.
    let killed_port = active.http_port.to_string();
    active.kill9().await;
    // Until a scrape sees the standby streaming, no relay of the job
    // streams (WalrelayNotStreaming pending): the takeover comes first.
    std::mem::swap(&mut active, &mut standby);
    wait_for(
        "the standby to take over",
        Duration::from_secs(30),
        async || (role(&active).await? == "active").then_some(()),
    )
    .await;
    fires_alone(&prometheus, "WalrelayDown", &[("job", POD_JOB)]).await;
    assert!(
        prometheus
            .alerts()
            .await
            .unwrap()
            .iter()
            .all(|(_, _, l)| l["instance"].as_str().unwrap().ends_with(&killed_port))
    );
    // Kubernetes replaces the pod: a new one, a standby.
    standby = start_relay();
    wait_for(
        "the new relay to stand by",
        Duration::from_secs(30),
        async || (role(&standby).await? == "standby").then_some(()),
    )
    .await;
    prometheus.targets(&[&active, &standby], &[&poll, &inbox]);
    quiet(&prometheus, "the relay came back").await;

    // 2. Nothing scraped: the PodMonitor and the compose config select no
    // target (a label changed, the namespace is not watched).
    prometheus.targets(&[], &[]);
    fires_alone(&prometheus, "WalrelayNotScraped", &[]).await;
    prometheus.targets(&[&active, &standby], &[&poll, &inbox]);
    quiet(&prometheus, "the targets came back").await;

    // 3. The standby is lost: its pod is gone and not rescheduled.
    standby.kill9().await;
    prometheus.targets(&[&active], &[&poll, &inbox]);
    fires_alone(&prometheus, "WalrelayStandbyLost", &[("job", POD_JOB)]).await;
    standby = start_relay();
    wait_for("the new standby", Duration::from_secs(30), async || {
        (role(&standby).await? == "standby").then_some(())
    })
    .await;
    prometheus.targets(&[&active, &standby], &[&poll, &inbox]);
    quiet(&prometheus, "a standby came back").await;

    // 4. Slot lag growing: the walsender is stuck (SIGSTOP) while the
    // database writes 32 MiB of WAL; the relay stays connected.
    let walsender: i32 = client
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'walrelay'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let signal = |sig: &str| {
        assert!(
            std::process::Command::new("kill")
                .args([sig, &walsender.to_string()])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-STOP");
    client
        .batch_execute(
            "CREATE TABLE filler (v text);
             INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 32000)",
        )
        .await
        .unwrap();
    fires_alone(&prometheus, "WalrelaySlotLagHigh", &[("slot", "walrelay")]).await;
    // Once: both relays report the slot, one alert.
    let lag_alerts = prometheus.alerts().await.unwrap();
    assert_eq!(lag_alerts.len(), 1, "{lag_alerts:?}");
    signal("-CONT");
    quiet(&prometheus, "the walsender went on").await;

    // 5. Dead letters: a non-transactional outbox message is refused and
    // dead-lettered.
    client
        .batch_execute(
            "SELECT pg_logical_emit_message(false, 'walrelay', '{\"aggregate_type\": \"orders\", \"aggregate_id\": \"x\", \"event_type\": \"E\", \"payload\": {}}')",
        )
        .await
        .unwrap();
    fires_alone(&prometheus, "WalrelayDeadLetters", &[("job", POD_JOB)]).await;
    quiet(&prometheus, "the dead letter aged out of the window").await;

    // 6. Exactly once falls back: another producer wrote to a topic of
    // the relay's, so the relay's scan of that partition's tail (50 records
    // deep here) finds none of its own.
    broker.produce_plain(&topics.topic("shared"), 60);
    insert("shared", 1).await;
    fires_alone(
        &prometheus,
        "WalrelayExactlyOnceFallback",
        &[("job", POD_JOB), ("reason", "lookback")],
    )
    .await;
    quiet(&prometheus, "the fallback aged out of the window").await;

    // 7. The poll backlog ages: a lock on the in-flight table (a migration,
    // say) stops every batch before it is sent.
    let lock = hold(
        &pg,
        &db,
        "LOCK TABLE polled_walrelay_in_flight IN EXCLUSIVE MODE",
    )
    .await;
    insert_polled("polled", 1).await;
    fires_alone(
        &prometheus,
        "WalrelayPollBacklogOld",
        &[("job", COMPOSE_JOB)],
    )
    .await;
    drop(lock);
    quiet(&prometheus, "the lock went").await;

    // 8. Inbox lag: the inbox cannot keep up (a trigger makes each stored
    // row take 100 ms) while the relay publishes 300 events.
    client
        .batch_execute(
            "CREATE FUNCTION slow_store() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN PERFORM pg_sleep(0.1); RETURN NEW; END $$;
             CREATE TRIGGER slow_store BEFORE INSERT ON inbox
               FOR EACH ROW EXECUTE FUNCTION slow_store()",
        )
        .await
        .unwrap();
    insert("orders", 300).await;
    fires_alone(&prometheus, "WalrelayInboxLag", &[("job", COMPOSE_JOB)]).await;
    client
        .batch_execute("DROP TRIGGER slow_store ON inbox")
        .await
        .unwrap();
    quiet(&prometheus, "the inbox caught up").await;

    // 9. The broker is down, with events waiting: one alert per job.
    broker.stop();
    insert("orders", 1).await;
    insert_polled("polled", 1).await;
    fires_alone(&prometheus, "WalrelayBrokerDown", &[("job", COMPOSE_JOB)]).await;
    fires_alone(&prometheus, "WalrelayBrokerDown", &[("job", POD_JOB)]).await;
    broker.start_again();
    quiet(&prometheus, "the broker came back").await;

    // 10. Down under the compose job name too: the polling source dies.
    let mut poll = poll;
    poll.kill9().await;
    fires_alone(&prometheus, "WalrelayDown", &[("job", COMPOSE_JOB)]).await;
    drop(inbox);
}
