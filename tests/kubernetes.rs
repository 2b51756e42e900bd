//! deploy/kubernetes: the kustomization renders (kubectl), every resource
//! passes its schema (kubernetes-validate for the built-in kinds, the
//! Prometheus Operator's model for the PodMonitor), the pieces point at
//! each other, and the pod's configuration runs: its init container's
//! `walrelay setup` and two `walrelay run` containers against a real
//! PostgreSQL and broker, of which only the streaming one is Ready.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use support::kafka::{Broker, Topics};
use support::{PgCluster, free_port, wait_for};
use tokio::process::{Child, Command};

const MANIFESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");

fn tools() -> PathBuf {
    PathBuf::from(std::env::var("WALRELAY_TOOLS").unwrap_or_else(|_| "/opt/walrelay".into()))
}

/// Runs scripts/validate_kubernetes.py on `dir`: exit success and output.
fn validate(dir: &Path, json: bool) -> (bool, String) {
    let python = tools().join("venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run scripts/install-deps",
        python.display()
    );
    let out = std::process::Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/validate_kubernetes.py"
        ))
        .arg(dir)
        .args(if json { &["--json"][..] } else { &[][..] })
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// The rendered resources, by kind.
fn rendered() -> BTreeMap<String, Value> {
    let (ok, text) = validate(Path::new(MANIFESTS), true);
    assert!(ok, "{text}");
    let docs: Vec<Value> = serde_json::from_str(&text).unwrap();
    let mut by_kind = BTreeMap::new();
    for doc in docs {
        let kind = doc["kind"].as_str().unwrap().to_owned();
        assert!(by_kind.insert(kind.clone(), doc).is_none(), "two {kind}s");
    }
    by_kind
}

/// A copy of the manifests with `file`'s `from` replaced by `to`.
fn broken_copy(file: &str, from: &str, to: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(MANIFESTS).unwrap() {
        let entry = entry.unwrap();
        let mut text = std::fs::read_to_string(entry.path()).unwrap();
        if entry.file_name() == file {
            assert!(text.contains(from), "{file} has no {from:?}");
            text = text.replace(from, to);
        }
        std::fs::write(dir.path().join(entry.file_name()), text).unwrap();
    }
    dir
}

#[test]
fn the_manifests_render_and_every_resource_passes_its_schema() {
    let (ok, text) = validate(Path::new(MANIFESTS), false);
    assert!(ok, "{text}");
    for kind in [
        "Namespace",
        "ConfigMap",
        "Secret",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "PodMonitor",
        "PrometheusRule",
    ] {
        assert!(text.contains(&format!("valid: {kind}/")), "{kind}: {text}");
    }
    // The validators catch what they are here for: an unknown field, a
    // wrong type, a PodMonitor field the operator does not know.
    for (file, from, to, named) in [
        (
            "deployment.yaml",
            "readinessProbe:",
            "readinesProbe:",
            "readinesProbe",
        ),
        (
            "deployment.yaml",
            "replicas: 2",
            "replicas: two",
            "replicas",
        ),
        (
            "podmonitor.yaml",
            "interval: 15s",
            "intervall: 15s",
            "intervall",
        ),
        (
            "prometheusrule.yaml",
            "    - alert: WalrelayDown",
            "    - alertt: WalrelayDown",
            "alertt",
        ),
        (
            "poddisruptionbudget.yaml",
            "maxUnavailable: 1",
            "maxUnavailble: 1",
            "maxUnavailble",
        ),
    ] {
        let dir = broken_copy(file, from, to);
        let (ok, text) = validate(dir.path(), false);
        assert!(!ok, "{file} with {to:?} passed:\n{text}");
        assert!(
            text.contains("invalid:") && text.contains(named),
            "{file} with {to:?}: {text}"
        );
    }
}

/// The relay container's environment: the ConfigMap's entries, then each
/// `env` entry (the Secret's URL).
fn container_env(
    resources: &BTreeMap<String, Value>,
    container: &Value,
) -> BTreeMap<String, String> {
    let config_map = &resources["ConfigMap"];
    let secret = &resources["Secret"];
    let mut env = BTreeMap::new();
    for source in container["envFrom"].as_array().unwrap() {
        assert_eq!(
            source["configMapRef"]["name"], config_map["metadata"]["name"],
            "envFrom names the generated ConfigMap"
        );
        for (k, v) in config_map["data"].as_object().unwrap() {
            env.insert(k.clone(), v.as_str().unwrap().to_owned());
        }
    }
    for var in container["env"].as_array().unwrap() {
        let secret_ref = &var["valueFrom"]["secretKeyRef"];
        assert_eq!(secret_ref["name"], secret["metadata"]["name"]);
        let key = secret_ref["key"].as_str().unwrap();
        let value = secret["stringData"][key]
            .as_str()
            .unwrap_or_else(|| panic!("the Secret has no key {key}"));
        env.insert(var["name"].as_str().unwrap().to_owned(), value.to_owned());
    }
    env
}

fn is_subset(labels: &Value, of: &Value) -> bool {
    labels
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, v)| of.get(k) == Some(v))
}

#[test]
fn the_resources_point_at_each_other_and_name_real_options() {
    let r = rendered();
    let deployment = &r["Deployment"];
    let pod = &deployment["spec"]["template"];
    let pod_labels = &pod["metadata"]["labels"];
    let containers = pod["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let relay = &containers[0];
    assert_eq!(deployment["spec"]["replicas"], 2, "one active, one standby");
    assert_eq!(relay["args"], serde_json::json!(["run"]));
    assert_eq!(
        pod["spec"]["initContainers"][0]["args"],
        serde_json::json!(["setup"])
    );

    // Probes and the Service and the PodMonitor reach the port the relay
    // listens on.
    let env = container_env(&r, relay);
    let listen_port: u64 = env["WALRELAY_HTTP_ADDR"]
        .strip_prefix("0.0.0.0:")
        .expect("listens beyond loopback")
        .parse()
        .unwrap();
    let port = &relay["ports"][0];
    assert_eq!(port["containerPort"], listen_port);
    assert_eq!(
        relay["readinessProbe"]["httpGet"]["path"],
        "/readyz?standby=ready"
    );
    assert_eq!(relay["livenessProbe"]["httpGet"]["path"], "/healthz");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(relay[probe]["httpGet"]["port"], port["name"], "{probe}");
    }
    assert_eq!(r["Service"]["spec"]["ports"][0]["targetPort"], port["name"]);
    let endpoint = &r["PodMonitor"]["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["port"], port["name"]);
    assert_eq!(endpoint["path"], "/metrics");

    // Every selector selects the relay's pods.
    for (what, selector) in [
        ("Deployment", &deployment["spec"]["selector"]["matchLabels"]),
        ("Service", &r["Service"]["spec"]["selector"]),
        (
            "PodMonitor",
            &r["PodMonitor"]["spec"]["selector"]["matchLabels"],
        ),
        (
            "PodDisruptionBudget",
            &r["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        ),
        (
            "topology spread",
            &pod["spec"]["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"],
        ),
    ] {
        assert!(
            selector.is_object() && is_subset(selector, pod_labels),
            "{what}'s selector {selector} does not select {pod_labels}"
        );
    }

    // The grace period outlasts the relay's own shutdown timeout.
    let shutdown = walrelay::cli::parse_duration(&env["WALRELAY_SHUTDOWN_TIMEOUT"]).unwrap();
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(
        Duration::from_secs(grace) > shutdown,
        "{grace}s vs {shutdown:?}"
    );
    assert!(relay["resources"]["requests"]["memory"].is_string());
    assert!(relay["resources"]["requests"]["cpu"].is_string());

    // Every variable is an option of the command the container runs.
    let help = |command: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_walrelay"))
            .args([command, "--help"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let (run_help, setup_help) = (help("run"), help("setup"));
    for name in env.keys() {
        assert!(
            run_help.contains(&format!("[env: {name}")),
            "{name} is not a `walrelay run` option"
        );
    }
    assert!(setup_help.contains("[env: WALRELAY_PG_URL"));
}

/// A container of the pod as a process: its args, its environment (with
/// `overrides` for what differs on one test machine), nothing inherited.
fn spawn(args: &Value, env: &BTreeMap<String, String>, log: &Path) -> Child {
    let args: Vec<&str> = args
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    Command::new(env!("CARGO_BIN_EXE_walrelay"))
        .args(args)
        .env_clear()
        .envs(env)
        .env("WALRELAY_LOG", "info,walrelay=debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Kubernetes' disruption controller: how many pods a PodDisruptionBudget
/// lets be evicted now, with `expected` pods of which `healthy` are Ready.
fn disruptions_allowed(pdb: &Value, expected: i64, healthy: i64) -> i64 {
    let spec = &pdb["spec"];
    let desired_healthy = match (
        spec["minAvailable"].as_i64(),
        spec["maxUnavailable"].as_i64(),
    ) {
        (Some(min), None) => min,
        (None, Some(max)) => expected - max,
        _ => panic!("one of minAvailable and maxUnavailable, as a number: {spec}"),
    };
    (healthy - desired_healthy).max(0)
}

/// The readiness probe's answer (its path from the manifest): the status
/// code and the role.
async fn readiness(port: u16, path: &str) -> Option<(u16, String)> {
    let (code, body) = support::relay::http_get(port, path).await?;
    let v: Value = serde_json::from_str(&body).ok()?;
    Some((code, v["role"].as_str()?.to_owned()))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pods_run_ready_in_pairs_one_streaming_a_drain_may_evict_either_and_sigterm_hands_over()
{
    let r = rendered();
    let pod = &r["Deployment"]["spec"]["template"]["spec"];
    let relay = &pod["containers"][0];
    let init = &pod["initContainers"][0];

    let pg = PgCluster::start();
    let broker = Broker::shared();
    let topics = Topics::new("kubernetes");
    let db = pg.create_database("kubernetes").await;
    let dir = tempfile::tempdir().unwrap();

    // The Secret's URL shape (two hosts, the primary by
    // target_session_attrs) with this machine's server second.
    let mut env = container_env(&r, relay);
    let url = &env["WALRELAY_PG_URL"];
    assert!(
        url.contains(",") && url.contains("target_session_attrs=read-write"),
        "{url}"
    );
    env.insert(
        "WALRELAY_PG_URL".into(),
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{db}?target_session_attrs=read-write&sslmode=disable",
            free_port(),
            pg.port
        ),
    );
    env.insert("WALRELAY_BROKERS".into(), broker.bootstrap());
    // The test's own topics on the shared broker.
    env.insert(
        "WALRELAY_TOPIC_TEMPLATE".into(),
        topics.topic("{aggregate_type}"),
    );
    env.insert("WALRELAY_DEAD_LETTER_TOPIC".into(), topics.dead_letters());

    let mut setup = spawn(
        &init["args"],
        &container_env(&r, init)
            .into_iter()
            .chain(env.clone())
            .collect(),
        &dir.path().join("setup.log"),
    );
    let status = tokio::time::timeout(Duration::from_secs(60), setup.wait())
        .await
        .unwrap()
        .unwrap();
    let setup_log = std::fs::read_to_string(dir.path().join("setup.log")).unwrap();
    assert!(status.success(), "init container: {setup_log}");

    // Two replicas; on one machine each needs its own port.
    let mut relays = Vec::new();
    for i in 0..2 {
        let port = free_port();
        let mut env = env.clone();
        env.insert("WALRELAY_HTTP_ADDR".into(), format!("127.0.0.1:{port}"));
        let log = dir.path().join(format!("relay{i}.log"));
        relays.push((spawn(&relay["args"], &env, &log), port, log));
    }
    let logs: Vec<PathBuf> = relays.iter().map(|r| r.2.clone()).collect();
    let log = |i: usize| std::fs::read_to_string(&logs[i]).unwrap_or_default();
    let probe = relay["readinessProbe"]["httpGet"]["path"].as_str().unwrap();
    let (active, standby) = wait_for(
        "both relays Ready: one active, the other standing by",
        Duration::from_secs(30),
        async || {
            let a = readiness(relays[0].1, probe).await?;
            let b = readiness(relays[1].1, probe).await?;
            match (a, b) {
                (a, b) if a == (200, "active".into()) && b == (200, "standby".into()) => {
                    Some((0, 1))
                }
                (a, b) if b == (200, "active".into()) && a == (200, "standby".into()) => {
                    Some((1, 0))
                }
                _ => None,
            }
        },
    )
    .await;
    // Plain /readyz still tells the streaming relay from the standby.
    assert_eq!(readiness(relays[active].1, "/readyz").await.unwrap().0, 200);
    assert_eq!(
        readiness(relays[standby].1, "/readyz").await.unwrap().0,
        503
    );
    // So the budget lets a node drain evict one of the two, either one,
    // and no second while the first's replacement is not Ready.
    let pdb = &r["PodDisruptionBudget"];
    assert_eq!(disruptions_allowed(pdb, 2, 2), 1, "{pdb}");
    assert_eq!(disruptions_allowed(pdb, 2, 1), 0, "{pdb}");

    let client = pg.client(&db).await;
    client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             VALUES ('k8s', 'a1', 'Created', '{\"n\": 1}')",
        )
        .await
        .unwrap();
    let topic = topics.topic("k8s");
    let first = broker.consume(&topic, 1, Duration::from_secs(30));
    assert_eq!(first.len(), 1, "{}", log(active));

    // What the kubelet does at a node drain or a deletion: SIGTERM. The
    // standby becomes Ready and streams.
    let pid = relays[active].0.id().unwrap();
    let signalled = std::time::Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(45), relays[active].0.wait())
        .await
        .expect("the relay outlived the pod's grace period")
        .unwrap();
    assert!(exit.success(), "{}", log(active));
    wait_for(
        "the standby to take over",
        Duration::from_secs(30),
        async || {
            (readiness(relays[standby].1, probe).await? == (200, "active".into())).then_some(())
        },
    )
    .await;
    // Measured, not asserted (shared machines are noisy): about the
    // standby's retry time.
    eprintln!(
        "the standby took over {:?} after the SIGTERM of the streaming relay (WALRELAY_STANDBY_RETRY={})",
        signalled.elapsed(),
        env["WALRELAY_STANDBY_RETRY"]
    );
    client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             VALUES ('k8s', 'a1', 'Renamed', '{\"n\": 2}')",
        )
        .await
        .unwrap();
    let records = broker.consume(&topic, 2, Duration::from_secs(30));
    let types: Vec<&str> = records
        .iter()
        .map(|r| r.header("event_type").unwrap())
        .collect();
    assert_eq!(types, ["Created", "Renamed"], "{}", log(standby));
}
