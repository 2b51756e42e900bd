//! The dashboards in a real browser. Each process (the WAL relay, the
//! polling source, the inbox) runs for a while with traffic; then its page
//! is opened in headless Chromium (Debian's, driven by playwright-core:
//! `tests/browser/dashboard.mjs`) at a laptop's and at a phone's size, and
//! a full-page screenshot of each goes to `test-artifacts/`.
//!
//! - The charts carry history from before the page was opened (the
//!   process keeps it, not the page).
//! - The layout holds: no word broken across lines, nothing wider than its
//!   box or the screen, text contrast of at least 4.5:1, distinct y-axis
//!   ticks, no request leaving the process, no script error.
//! - Every series the page charts is a metric that a scrape of the
//!   process's `/metrics` shows and that `dashboards/walrelay.json` charts
//!   in the process's row; and every expression of that row, evaluated by
//!   a real Prometheus scraping the process, returns a series.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::Value;
use support::relay::{RelayProcess, http_get};
use support::workload::setup;
use support::{PgOptions, Stack, StackOptions, free_port, wait_for};

/// How long a process runs with traffic before its page is opened; the
/// charts must reach back at least `HISTORY_BEFORE_OPENING` from then.
const RUN_BEFORE_OPENING: Duration = Duration::from_secs(25);
const HISTORY_BEFORE_OPENING: Duration = Duration::from_secs(15);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A stack whose server limits retained WAL, so the WAL dashboard has an
/// invalidation line to draw.
async fn stack(name: &str, setup_args: Vec<&'static str>) -> Stack {
    Stack::start_with(
        name,
        StackOptions {
            pg: PgOptions {
                extra_conf: vec!["max_slot_wal_keep_size = '1GB'".into()],
                ..Default::default()
            },
            setup_args,
            ..Default::default()
        },
    )
    .await
}

/// Inserts a few outbox rows of `aggregate_type` every 200 ms until
/// aborted: the traffic a dashboard charts.
fn keep_writing(pg_url: String, aggregate_type: &'static str) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (client, connection) = tokio_postgres::connect(&pg_url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        for i in 0u64.. {
            let rows = 1 + (i % 5) as i32;
            client
                .execute(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                     SELECT $1::text, 'k' || (g % 7), 'E', jsonb_build_object('g', g, 'pad', repeat('x', 200))
                     FROM generate_series(1, $2::int) g",
                    &[&aggregate_type, &rows],
                )
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// What `tests/browser/dashboard.mjs` saw at each size.
struct Report {
    sizes: Vec<Value>,
}

impl Report {
    /// The text of the page at the laptop's size, in lower case, with
    /// plain spaces (the page keeps numbers and units together).
    fn text(&self) -> String {
        self.sizes[0]["text"]
            .as_str()
            .unwrap_or_default()
            .replace('\u{a0}', " ")
            .to_lowercase()
    }

    /// The metrics behind the page's series (and their limits), with the
    /// state's.
    fn metrics(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for size in &self.sizes {
            let dashboard = &size["dashboard"];
            out.insert(dashboard["stateMetric"].as_str().unwrap().to_owned());
            for chart in dashboard["charts"].as_array().unwrap() {
                for series in chart["series"].as_array().unwrap() {
                    for key in ["metric", "limitMetric"] {
                        if let Some(m) = series[key].as_str() {
                            out.insert(m.to_owned());
                        }
                    }
                }
            }
        }
        out
    }

    fn chart<'a>(&'a self, size: &'a Value, id: &str) -> &'a Value {
        size["dashboard"]["charts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .unwrap_or_else(|| panic!("no chart {id}: {}", size["dashboard"]))
    }
}

/// Opens `http://127.0.0.1:{port}/` in Chromium at both sizes; the
/// screenshots are `test-artifacts/dashboard-{name}-{laptop,phone}.png`.
fn open_dashboard(port: u16, name: &str) -> Report {
    let browser = root().join("tests/browser");
    assert!(
        browser.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run scripts/install-deps"
    );
    let artifacts = root().join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let out = std::process::Command::new("node")
        .arg(browser.join("dashboard.mjs"))
        .arg(format!("http://127.0.0.1:{port}/"))
        .arg(artifacts.join(format!("dashboard-{name}")))
        .output()
        .expect("node (Debian's nodejs) is needed: scripts/install-deps installs it");
    assert!(
        out.status.success(),
        "the browser run failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    Report {
        sizes: report["sizes"].as_array().unwrap().clone(),
    }
}

/// The layout's faults at each size, and the history before the page.
fn check_page(report: &Report, opened_after: Instant) {
    let before = HISTORY_BEFORE_OPENING.as_millis() as f64;
    for size in &report.sizes {
        let name = size["name"].as_str().unwrap();
        let layout = &size["layout"];
        assert_eq!(
            layout["broken"],
            serde_json::json!([]),
            "{name}: words broken across lines"
        );
        assert_eq!(
            layout["overflowing"],
            serde_json::json!([]),
            "{name}: content wider than its box"
        );
        assert_eq!(layout["pageWiderThanScreen"], false, "{name}");
        let contrast = layout["lowestContrast"]["ratio"].as_f64().unwrap();
        assert!(
            contrast >= 4.5,
            "{name}: contrast {contrast:.1} for {}",
            layout["lowestContrast"]["text"]
        );
        assert_eq!(
            size["external"],
            serde_json::json!([]),
            "{name}: requests left the process"
        );
        assert_eq!(
            size["errors"],
            serde_json::json!([]),
            "{name}: script errors"
        );
        let screenshot = PathBuf::from(size["screenshot"].as_str().unwrap());
        assert!(
            std::fs::metadata(&screenshot).unwrap().len() > 20_000,
            "{}",
            screenshot.display()
        );
        let opened = size["openedAt"].as_f64().unwrap();
        let dashboard = &size["dashboard"];
        assert!(
            dashboard["firstSampleMs"].as_f64().unwrap() <= opened - before,
            "{name}: the history starts at {} and the page opened at {opened}",
            dashboard["firstSampleMs"]
        );
        let charts = dashboard["charts"].as_array().unwrap();
        assert!(charts.len() >= 4, "{name}: {charts:?}");
        for chart in charts {
            let id = chart["id"].as_str().unwrap();
            // Some series of each chart reach back before the page opened.
            let earliest = chart["series"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|s| s["firstReadingMs"].as_f64())
                .fold(f64::INFINITY, f64::min);
            assert!(
                earliest <= opened - before,
                "{name}: chart {id} starts at {earliest}, the page opened at {opened}: {chart}"
            );
            // Ticks people can read: never the same label twice (the old
            // page's 1, 1, 1, 0, 0 for a lag of zero).
            for axis in chart["axes"].as_array().unwrap() {
                let labels: Vec<&str> = axis
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(Value::as_str)
                    .filter(|l| !l.is_empty())
                    .collect();
                let distinct: BTreeSet<&str> = labels.iter().copied().collect();
                assert!(labels.len() >= 2, "{name}: chart {id} has ticks {labels:?}");
                assert_eq!(
                    distinct.len(),
                    labels.len(),
                    "{name}: chart {id} has ticks {labels:?}"
                );
            }
        }
    }
    assert!(
        Instant::now().duration_since(opened_after) < Duration::from_secs(120),
        "the browser took too long"
    );
}

/// Metric names in Prometheus text, histograms by their base name.
fn scraped_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(base_name)
        .collect()
}

fn base_name(name: &str) -> String {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
        .to_owned()
}

/// The PromQL of each panel in the Grafana dashboard's row `title`.
fn grafana_row(title: &str) -> Vec<String> {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("dashboards/walrelay.json")).unwrap(),
    )
    .unwrap();
    let mut row = None;
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            row = panel["title"].as_str().map(str::to_owned);
            continue;
        }
        if row.as_deref() == Some(title) {
            for target in panel["targets"].as_array().unwrap() {
                exprs.push(target["expr"].as_str().unwrap().to_owned());
            }
        }
    }
    assert!(
        !exprs.is_empty(),
        "no row {title:?} in dashboards/walrelay.json"
    );
    exprs
}

fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("walrelay_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        names.insert(base_name(&name));
    }
    names
}

/// A Prometheus scraping one process every second.
struct Prometheus {
    child: tokio::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn scrape(target_port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: walrelay\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = tokio::process::Command::new("prometheus")
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
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    /// The series `expr` returns now (`None` while Prometheus is not up).
    async fn query(&self, expr: &str) -> Option<Vec<Value>> {
        let query: String =
            percent_encoding::utf8_percent_encode(expr, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        let (code, body) = http_get(self.port, &format!("/api/v1/query?query={query}")).await?;
        let v: Value = serde_json::from_str(&body).ok()?;
        (code == 200).then(|| v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// The page's series against a real scrape of the process, and the
/// Grafana row against both.
async fn check_metrics(
    report: &Report,
    process: &RelayProcess,
    prometheus: &Prometheus,
    row: &str,
) {
    let (code, scrape) = process.http_get("/metrics").await.unwrap();
    assert_eq!(code, 200);
    let scraped = scraped_names(&scrape);
    let exprs = grafana_row(row);
    let charted: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    for metric in report.metrics() {
        assert!(
            scraped.contains(&metric),
            "the page charts {metric}, which /metrics does not show:\n{scrape}"
        );
        assert!(
            charted.contains(&metric),
            "the page charts {metric}; Grafana's row {row:?} does not"
        );
    }
    for metric in &charted {
        assert!(
            scraped.contains(metric),
            "Grafana's row {row:?} charts {metric}, which /metrics does not show"
        );
    }
    // Every panel's expression returns data from the process.
    for expr in &exprs {
        let expr = expr.replace("$instance", ".*").replace("$slot", ".*");
        wait_for(
            &format!("Prometheus to answer {expr}"),
            Duration::from_secs(60),
            async || prometheus.query(&expr).await.filter(|r| !r.is_empty()),
        )
        .await;
    }
}

async fn status(process: &RelayProcess) -> Option<Value> {
    let (_, body) = process.http_get("/api/status").await?;
    serde_json::from_str(&body).ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_wal_relay_dashboard_shows_the_history_before_it_was_opened_and_a_past_error() {
    let stack = stack("dashwal", vec![]).await;
    let relay = stack.relay(&[]);
    let prometheus = Prometheus::scrape(relay.http_port);
    wait_for("the relay to stream", Duration::from_secs(60), async || {
        (status(&relay).await?["state"] == "active").then_some(())
    })
    .await;
    let writer = keep_writing(stack.url(), "dash");
    let started = Instant::now();
    // An interruption the dashboard must show as past once the relay is
    // back: the walsender is ended under it.
    tokio::time::sleep(Duration::from_secs(8)).await;
    stack
        .client
        .batch_execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'walrelay'",
        )
        .await
        .unwrap();
    let error = wait_for(
        "the error to be past",
        Duration::from_secs(60),
        async || {
            let s = status(&relay).await?;
            let last = s["errors"].get(0)?.clone();
            (s["state"] == "active" && !last["resolved_ms"].is_null()).then_some(last)
        },
    )
    .await;
    assert_eq!(error["resolved_by"], "reconnected", "{error}");
    tokio::time::sleep(RUN_BEFORE_OPENING.saturating_sub(started.elapsed())).await;

    let opened = Instant::now();
    let report = open_dashboard(relay.http_port, "wal");
    writer.abort();
    check_page(&report, opened);
    let text = report.text();
    for expected in [
        "WAL relay",
        "slot walrelay",
        "exactly-once",
        "role active",
        "streaming from",
        "Last error",
        "PAST",
        "connected again",
        "reconnecting",
        "max_slot_wal_keep_size 1 GiB",
    ] {
        assert!(
            text.contains(&expected.to_lowercase()),
            "the page does not say {expected:?}:\n{text}"
        );
    }
    assert!(!text.contains("still failing"), "{text}");
    for size in &report.sizes {
        let in_flight = report.chart(size, "in-flight");
        let labels: Vec<&str> = in_flight["series"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["label"].as_str().unwrap())
            .collect();
        assert_eq!(labels, ["events", "bytes"], "in flight against both limits");
        let slot = report.chart(size, "slot");
        assert!(
            slot["series"][2]["readings"].as_u64().unwrap() > 10,
            "the invalidation line: {slot}"
        );
    }
    check_metrics(&report, &relay, &prometheus, "WAL relay").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_polling_source_dashboard_shows_backlog_claims_and_settles_from_before_it_was_opened() {
    let stack = stack("dashpoll", vec!["--source", "poll"]).await;
    // A backlog first, so the backlog chart has a slope to show.
    stack.insert_events("dashpoll", 300).await;
    let relay = stack.relay(&["--source", "poll", "--poll-batch-size", "50"]);
    let prometheus = Prometheus::scrape(relay.http_port);
    let writer = keep_writing(stack.url(), "dashpoll");
    tokio::time::sleep(RUN_BEFORE_OPENING).await;
    let s = status(&relay).await.unwrap();
    assert!(s["events_published"].as_u64().unwrap() > 300, "{s}");

    let opened = Instant::now();
    let report = open_dashboard(relay.http_port, "poll");
    writer.abort();
    check_page(&report, opened);
    let text = report.text();
    for expected in [
        "Polling source",
        "table public.outbox",
        "exactly-once",
        "polling from",
        "Claim and settle times",
        "Backlog",
        "no errors",
    ] {
        assert!(
            text.contains(&expected.to_lowercase()),
            "the page does not say {expected:?}:\n{text}"
        );
    }
    for size in &report.sizes {
        let times = report.chart(size, "claim-settle");
        for series in times["series"].as_array().unwrap() {
            assert!(series["readings"].as_u64().unwrap() >= 10, "{series}");
        }
    }
    check_metrics(&report, &relay, &prometheus, "Polling source").await;
}

/// Produces `record` to `topic` with the `id` header, `copies` times.
fn produce_copies(bootstrap: &str, topic: &str, id: &str, copies: usize) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    for _ in 0..copies {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "id",
                value: Some(id),
            })
            .insert(Header {
                key: "ce_type",
                value: Some("OrderPlaced"),
            });
        producer
            .send(
                BaseRecord::to(topic)
                    .key("dup-1")
                    .payload("{\"copy\": true}")
                    .headers(headers),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_inbox_dashboard_names_its_topics_finds_new_ones_within_seconds_and_keeps_its_history()
{
    let stack = stack("dashinbox", vec![]).await;
    let inbox_db = stack.pg.create_database("dashinboxdb").await;
    let inbox_url = stack.pg.url(&inbox_db);
    setup(&inbox_url, &["--inbox"]);
    let inbox_client = stack.pg.client(&inbox_db).await;
    // The inbox starts before any topic of its pattern exists, as in the
    // quick start.
    let pattern = stack.topics.pattern();
    let inbox = stack.inbox(&inbox_url, &["--topic", &pattern]);
    let prometheus = Prometheus::scrape(inbox.http_port);
    wait_for(
        "the inbox to consume",
        Duration::from_secs(60),
        async || (status(&inbox).await?["state"] == "active").then_some(()),
    )
    .await;
    let relay = stack.relay(&[]);
    let writer = keep_writing(stack.url(), "dashinbox");
    // A topic created after the subscription is found at the next
    // metadata refresh (one a second) and read from its start.
    let found = Instant::now();
    let topic = stack.topic("dashinbox");
    wait_for(
        "the first event in the inbox",
        Duration::from_secs(60),
        async || {
            let n: i64 = inbox_client
                .query_one("SELECT count(*) FROM inbox WHERE topic = $1", &[&topic])
                .await
                .ok()?
                .get(0);
            (n > 0).then_some(())
        },
    )
    .await;
    let discovery = found.elapsed();
    println!("a new topic's first event reached the inbox in {discovery:?} (relay start included)");
    // A second new topic, with the relay already running: found in about
    // a second.
    let second = stack.topic("dashdups");
    let id = uuid::Uuid::new_v4().to_string();
    stack.broker.create_topic(&second, 1);
    produce_copies(&stack.broker.bootstrap(), &second, &id, 3);
    // From the records in Kafka (making a producer is not the relay's time).
    let produced = Instant::now();
    wait_for(
        "the copies' record in the inbox",
        Duration::from_secs(30),
        async || {
            let n: i64 = inbox_client
                .query_one("SELECT count(*) FROM inbox WHERE id::text = $1", &[&id])
                .await
                .ok()?
                .get(0);
            (n == 1).then_some(())
        },
    )
    .await;
    let second_discovery = produced.elapsed();
    println!("a topic created while consuming reached the inbox in {second_discovery:?}");
    assert!(
        second_discovery < Duration::from_secs(10),
        "a new topic of the pattern took {second_discovery:?} to be consumed"
    );
    // Records without an id: dead letters.
    stack.broker.produce_plain(&second, 2);
    wait_for(
        "duplicates and dead letters counted",
        Duration::from_secs(30),
        async || {
            let s = status(&inbox).await?;
            (s["inbox"]["duplicates"].as_u64()? >= 2 && s["dead_letters"].as_u64()? >= 2)
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(RUN_BEFORE_OPENING.saturating_sub(found.elapsed())).await;

    let opened = Instant::now();
    let report = open_dashboard(inbox.http_port, "inbox");
    writer.abort();
    check_page(&report, opened);
    let text = report.text();
    for expected in [
        "Inbox",
        "topics matching",
        pattern.as_str(),
        "into public.inbox",
        "consuming",
        "Consumer lag per partition",
        "Duplicates skipped",
    ] {
        assert!(
            text.contains(&expected.to_lowercase()),
            "the page does not say {expected:?}:\n{text}"
        );
    }
    // The header names the topics, not the table; no error shows as
    // current once consuming went on normally.
    assert!(!text.contains("topics public.inbox"), "{text}");
    assert!(!text.contains("still failing"), "{text}");
    for size in &report.sizes {
        let lag = report.chart(size, "lag");
        let partitions: Vec<&str> = lag["series"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert!(
            partitions.contains(&format!("{topic}/0").as_str()),
            "one lag series per partition: {partitions:?}"
        );
    }
    // The produced-to-stored p99 of the last minute is not a discovery
    // wait of ten seconds.
    let s = status(&inbox).await.unwrap();
    let p99 = s["p99_commit_to_ack_ms"].as_f64().unwrap();
    assert!(p99 < 5000.0, "produced to stored p99 {p99} ms");
    check_metrics(&report, &inbox, &prometheus, "Inbox").await;
    drop(relay);
}
