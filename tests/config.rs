//! Configuration as operators give it: a config file, environment
//! variables and flags (in that order of precedence), `walrelay config`,
//! libpq's variables, password file and keyword/value strings against a
//! real PostgreSQL, and a relay configured by file alone streaming to a
//! real broker with JSON logs. Each runs the real binary.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use proptest::prelude::*;
use support::kafka::Broker;
use support::{PgCluster, PgOptions, Stack, free_port};

/// The walrelay binary with no WALRELAY_* or PG* variable of the test's own
/// environment, so each test sets exactly what it means.
fn walrelay() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_walrelay"));
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("WALRELAY_") || name.starts_with("PG") {
            command.env_remove(name.as_ref());
        }
    }
    command.env("HOME", "/nonexistent").stdin(Stdio::null());
    command
}

fn run(command: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = command.output().expect("run walrelay");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The line of `walrelay config`'s output that sets `key`.
fn line<'a>(output: &'a str, key: &str) -> &'a str {
    output
        .lines()
        .find(|l| l.starts_with(&format!("{key} = ")))
        .unwrap_or_else(|| panic!("no {key} in:\n{output}"))
}

#[test]
fn flags_win_over_environment_which_wins_over_the_file_which_wins_over_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "walrelay.toml",
        r#"
slot = "file_slot"
publication = "file_publication"
table = ["public.a", "public.b"]
message-prefix = "file_prefix"

[run]
max-in-flight-events = 777
"#,
    );
    let (code, out, err) = run(walrelay()
        .args(["--config", file.to_str().unwrap(), "config", "run"])
        .args(["--slot", "flag_slot", "--publication", "flag_publication"])
        .env("WALRELAY_PUBLICATION", "env_publication")
        .env("WALRELAY_MESSAGE_PREFIX", "env_prefix"));
    assert_eq!(code, 0, "{err}");
    assert_eq!(line(&out, "slot"), r#"slot = "flag_slot"  # flag"#);
    assert_eq!(
        line(&out, "publication"),
        r#"publication = "flag_publication"  # flag"#
    );
    assert_eq!(
        line(&out, "message-prefix"),
        r#"message-prefix = "env_prefix"  # env WALRELAY_MESSAGE_PREFIX"#
    );
    assert_eq!(
        line(&out, "table"),
        r#"table = ["public.a", "public.b"]  # file"#
    );
    assert_eq!(
        line(&out, "max-in-flight-events"),
        "max-in-flight-events = 777  # file"
    );
    assert_eq!(
        line(&out, "heartbeat-interval"),
        r#"heartbeat-interval = "10s"  # default"#
    );
    // The [run] table is run's alone: status does not see it, and the
    // top-level slot reaches every command that has the flag.
    let (code, out, err) = run(walrelay()
        .args(["config", "status"])
        .env("WALRELAY_CONFIG", &file));
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("max-in-flight-events"), "{out}");
    assert_eq!(line(&out, "slot"), r#"slot = "file_slot"  # file"#);
}

#[test]
fn the_output_of_walrelay_config_is_a_config_file_that_gives_the_same_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let (code, first, err) = run(walrelay().args([
        "config",
        "run",
        "--slot",
        "s1",
        "--table",
        "public.x,app.y",
        "--create-slot",
        "--max-in-flight-bytes",
        "8MiB",
    ]));
    assert_eq!(code, 0, "{err}");
    let file = write(dir.path(), "again.toml", &first);
    let (code, second, err) = run(walrelay().args(["--config", file.to_str().unwrap(), "config"]));
    assert_eq!(code, 0, "{err}");
    let values = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split("  # ").next().unwrap().to_owned())
            .collect()
    };
    assert_eq!(values(&first), values(&second));
    assert_eq!(
        line(&second, "table"),
        r#"table = ["public.x", "app.y"]  # file"#
    );
    assert_eq!(line(&second, "create-slot"), "create-slot = true  # file");
}

#[test]
fn an_unknown_key_stops_with_exit_code_2_naming_it_and_the_nearest_valid_one() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "typo.toml", "max-in-flight-event = 10\n");
    let (code, _, err) = run(walrelay()
        .args(["--config", file.to_str().unwrap(), "status"])
        .args(["--pg-url", "postgres://nowhere.invalid/db"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown key `max-in-flight-event`"), "{err}");
    assert!(
        err.contains("did you mean `max-in-flight-events`?"),
        "{err}"
    );
    assert!(err.contains("typo.toml"), "{err}");

    // In a command's table, the key must be that command's.
    let file = write(
        dir.path(),
        "section.toml",
        "[setup]\nbrokers = \"k:9092\"\n",
    );
    let (code, _, err) = run(walrelay()
        .args(["--config", file.to_str().unwrap(), "setup"])
        .args(["--pg-url", "postgres://nowhere.invalid/db"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown key `[setup] brokers`"), "{err}");
}

#[test]
fn a_bad_value_or_a_broken_file_names_the_file_the_key_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[run]\nmax-backoff = \"3 weeks\"\n",
            "key `[run] max-backoff`",
            "use ms, s, m or h",
        ),
        (
            "create-slot = \"yes\"\n",
            "key `create-slot`",
            "expected true or false",
        ),
        (
            "slot = [\"a\", \"b\"]\n",
            "key `slot`",
            "takes one value, not a list",
        ),
        ("slot = \"unterminated\n", "is not valid TOML", "line 1"),
        (
            "source = \"kafka\"\n",
            "key `source`",
            "possible values: wal, poll",
        ),
        (
            "config = \"other.toml\"\n",
            "key `config`",
            "cannot name another",
        ),
    ];
    for (text, what, fix) in cases {
        let file = write(dir.path(), "bad.toml", text);
        let (code, _, err) = run(walrelay().args(["--config", file.to_str().unwrap(), "config"]));
        assert_eq!(code, 2, "{text}: {err}");
        assert!(err.contains(what) && err.contains(fix), "{text}: {err}");
    }
    let (code, _, err) = run(walrelay().args(["--config", "/nonexistent/walrelay.toml", "config"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot read it"), "{err}");
}

#[test]
fn walrelay_config_masks_every_secret_wherever_it_comes_from() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "secrets.toml",
        r#"
pg-url = "postgres://relay:file-pg-secret@db:5432/app?sslmode=require"
brokers = "k:9092"

[kafka-options]
"sasl.password" = "file-sasl-secret"
"sasl.jaas.config" = "org.apache.kafka.common.security.plain.PlainLoginModule required username=\"u\" password=\"jaas-secret\";"
"linger.ms" = 5
"#,
    );
    let (code, out, err) = run(walrelay()
        .args(["--config", file.to_str().unwrap(), "config", "run"])
        .args(["-X", "ssl.key.password=flag-key-secret"]));
    assert_eq!(code, 0, "{err}");
    for secret in [
        "file-pg-secret",
        "file-sasl-secret",
        "jaas-secret",
        "flag-key-secret",
    ] {
        assert!(!out.contains(secret), "{secret} shown:\n{out}");
    }
    assert_eq!(
        line(&out, "pg-url"),
        r#"pg-url = "postgres://relay:***@db:5432/app?sslmode=require"  # file"#
    );
    // A flag replaces the file's list; what is not secret stays readable.
    assert_eq!(
        line(&out, "kafka-options"),
        r#"kafka-options = ["ssl.key.password=***"]  # flag"#
    );
    let (code, out, err) = run(walrelay()
        .args(["--config", file.to_str().unwrap(), "config", "run"])
        .env(
            "WALRELAY_PG_URL",
            "host=db user=relay password='env pg secret'",
        ));
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("env pg secret"), "{out}");
    assert!(!out.contains("jaas-secret"), "{out}");
    assert!(out.contains("\"linger.ms=5\""), "{out}");
    assert_eq!(
        line(&out, "pg-url"),
        r#"pg-url = "host=db user=relay password=***"  # env WALRELAY_PG_URL"#
    );
}

#[test]
fn log_format_json_is_refused_when_misspelt() {
    let (code, _, err) = run(walrelay().args(["--log-format", "jsn", "config"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("possible values: text, json"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever an operator types as a connection string, an error or a
    /// configuration comes back, never a panic.
    #[test]
    fn connection_strings_never_panic(text in "\\PC*") {
        let _ = walrelay::postgres::ConnectionConfig::from_url(&text);
        let _ = walrelay::postgres::redact_url(&text);
    }

    #[test]
    fn keyword_value_strings_never_panic(
        pairs in prop::collection::vec(
            (prop::sample::select(vec!["host", "port", "dbname", "user", "password", "sslmode", "keepalives_count", "connect_timeout", "bogus"]),
             "[ -~]{0,12}"),
            0..6,
        )
    ) {
        let text: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = walrelay::postgres::ConnectionConfig::from_url(&text.join(" "));
    }

    #[test]
    fn urls_never_panic(
        authority in "[a-z0-9:@,\\[\\]%.]{0,30}",
        query in "[a-z_=&0-9%-]{0,40}",
    ) {
        let _ = walrelay::postgres::ConnectionConfig::from_url(&format!("postgres://{authority}/db?{query}"));
    }

    #[test]
    fn topic_templates_and_replication_factors_never_panic(text in "\\PC*") {
        let _ = text.parse::<walrelay::router::TopicTemplate>();
        let _ = text.parse::<walrelay::kafka::Replication>();
    }
}

#[test]
fn sslrootcert_system_demands_verify_full() {
    let err = walrelay::postgres::ConnectionConfig::from_url(
        "host=db sslrootcert=system sslmode=require",
    )
    .unwrap_err();
    assert!(err.to_string().contains("use sslmode=verify-full"), "{err}");
    let config =
        walrelay::postgres::ConnectionConfig::from_url("host=db sslrootcert=system").unwrap();
    assert_eq!(config.ssl_mode, walrelay::postgres::SslMode::VerifyFull);
}

/// A role with a password (the harness trusts only `postgres`; other roles
/// give an md5 password over TCP).
fn relay_role(pg: &PgCluster, db: &str) {
    pg.psql(
        db,
        "CREATE ROLE relay LOGIN REPLICATION PASSWORD 'relay pw:1'",
    );
}

/// A password file only its owner can read, as libpq wants it.
fn passfile(dir: &Path, text: &str, mode: u32) -> PathBuf {
    let path = write(dir, "pgpass", text);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn libpq_variables_the_password_file_and_keyword_value_strings_reach_postgres() {
    let pg = PgCluster::start();
    let db = pg.create_database("libpq").await;
    relay_role(&pg, &db);
    let dir = tempfile::tempdir().unwrap();
    let port = pg.port.to_string();
    let env = |command: &mut Command| {
        command
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", &port)
            .env("PGUSER", "relay")
            .env("PGDATABASE", &db)
            .env("PGSSLMODE", "disable");
    };

    // Everything from PG* variables, the password from PGPASSWORD.
    let mut status = walrelay();
    env(&mut status);
    let (code, _, err) = run(status.arg("status").env("PGPASSWORD", "relay pw:1"));
    assert_eq!(code, 0, "PGPASSWORD: {err}");

    // Without a password the server refuses: the password file matters.
    let mut status = walrelay();
    env(&mut status);
    let (code, _, err) = run(status.arg("status"));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("password"), "{err}");

    // The password from PGPASSFILE (an escaped colon in it).
    let line = format!("127.0.0.1:{port}:{db}:relay:relay pw\\:1\n");
    let file = passfile(
        dir.path(),
        &format!("# other\n127.0.0.1:1:*:*:wrong\n{line}"),
        0o600,
    );
    let mut status = walrelay();
    env(&mut status);
    let (code, _, err) = run(status.arg("status").env("PGPASSFILE", &file));
    assert_eq!(code, 0, "PGPASSFILE: {err}");

    // ~/.pgpass by default.
    let home = tempfile::tempdir().unwrap();
    passfile(home.path(), &line, 0o600);
    std::fs::rename(home.path().join("pgpass"), home.path().join(".pgpass")).unwrap();
    let mut status = walrelay();
    env(&mut status);
    let (code, _, err) = run(status.arg("status").env("HOME", home.path()));
    assert_eq!(code, 0, "~/.pgpass: {err}");

    // A file others can read is ignored, as libpq does, with a warning.
    let open = passfile(dir.path(), &line, 0o644);
    let mut status = walrelay();
    env(&mut status);
    let (code, _, err) = run(status.arg("status").env("PGPASSFILE", &open));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("chmod 0600"), "{err}");

    // A keyword/value string, quoted password, no variables at all; its
    // values win over the variables'.
    let conninfo = format!(
        "host=127.0.0.1 port={port} dbname={db} user=relay password='relay pw:1' sslmode=disable"
    );
    let (code, _, err) = run(walrelay().args(["status", "--pg-url", &conninfo]));
    assert_eq!(code, 0, "key=value: {err}");
    let (code, _, err) = run(walrelay()
        .args(["status", "--pg-url", &conninfo])
        .env("PGUSER", "nobody")
        .env("PGPORT", "1"));
    assert_eq!(code, 0, "key=value over PG*: {err}");

    // A bad variable is named.
    let (code, _, err) = run(walrelay()
        .args(["status", "--pg-url", &conninfo])
        .env("PGSSLMODE", "sometimes"));
    assert_eq!(code, 0, "the string's sslmode wins: {err}");
    let mut status = walrelay();
    env(&mut status);
    let (code, _, err) = run(status.arg("status").env("PGSSLMODE", "sometimes"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("environment variable PGSSLMODE"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sslrootcert_system_trusts_the_systems_cas_and_nothing_else() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "walrelay config test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &ca_cert, &ca_key)
        .unwrap();
    let pg = PgCluster::start_with(PgOptions {
        tls: Some((server_cert.pem(), server_key.serialize_pem())),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "ca.pem", &ca_cert.pem());
    let conninfo = format!(
        "host=localhost port={} dbname=postgres user=postgres sslrootcert=system",
        pg.port
    );

    // The test's CA is not among the system's: refused.
    let (code, _, err) = run(walrelay().args(["status", "--pg-url", &conninfo]));
    assert_eq!(code, 1, "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    // Made a system CA (SSL_CERT_FILE is the system store's override), it
    // verifies.
    let (code, _, err) = run(walrelay()
        .args(["status", "--pg-url", &conninfo])
        .env("SSL_CERT_FILE", &ca_file));
    assert_eq!(code, 0, "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_configured_by_file_and_libpq_variables_streams_and_logs_json() {
    let stack = Stack::start("configfile").await;
    relay_role(&stack.pg, &stack.db);
    let broker: &Broker = &stack.broker;
    let dir = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let file = write(
        dir.path(),
        "walrelay.toml",
        &format!(
            r#"
brokers = "{brokers}"
log-format = "json"

[run]
topic-template = "{template}"
dead-letter-topic = "{dead}"
http-addr = "127.0.0.1:{http_port}"
heartbeat-interval = "0"
status-interval = "200ms"
"#,
            brokers = broker.bootstrap(),
            template = stack.topic("{aggregate_type}"),
            dead = stack.topics.dead_letters(),
        ),
    );
    let pgpass = passfile(
        dir.path(),
        &format!(
            "127.0.0.1:{}:{}:relay:relay pw\\:1\n",
            stack.pg.port, stack.db
        ),
        0o600,
    );
    let log = dir.path().join("relay.log");
    let mut relay = tokio::process::Command::new(env!("CARGO_BIN_EXE_walrelay"));
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("WALRELAY_") || name.starts_with("PG") {
            relay.env_remove(name.as_ref());
        }
    }
    let mut relay = relay
        .arg("run")
        .env("WALRELAY_CONFIG", &file)
        .env("WALRELAY_LOG", "info,walrelay=debug")
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", stack.pg.port.to_string())
        .env("PGUSER", "relay")
        .env("PGDATABASE", &stack.db)
        .env("PGSSLMODE", "disable")
        .env("PGPASSFILE", &pgpass)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    stack.insert_events("configured", 3).await;
    let records = broker.consume(&stack.topic("configured"), 3, Duration::from_secs(60));
    assert_eq!(records.len(), 3);

    // SIGTERM: drain, confirm, exit 0.
    let pid = relay.id().expect("running");
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), relay.wait())
        .await
        .expect("the relay stops on SIGTERM")
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}: {text}");

    // Every line a JSON object with a level and a message.
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log at all");
    for line in &lines {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n{text}"));
        assert!(value["level"].is_string(), "{line}");
        assert!(value["fields"]["message"].is_string(), "{line}");
    }
}

#[test]
fn the_shipped_example_file_configures_every_command() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/walrelay.toml");
    for command in ["setup", "check", "run", "status", "tail", "inbox"] {
        let (code, out, err) = run(walrelay().args(["--config", example, "config", command]));
        assert_eq!(code, 0, "{command}: {err}");
        assert!(
            out.contains("# file"),
            "{command}: nothing from the file:\n{out}"
        );
    }
    let (_, out, _) = run(walrelay().args(["--config", example, "config", "run"]));
    assert_eq!(line(&out, "log-format"), r#"log-format = "json"  # file"#);
    assert_eq!(
        line(&out, "topic-partitions"),
        "topic-partitions = 12  # file"
    );
}
