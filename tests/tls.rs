//! TLS against a cluster started with ssl = on and a certificate signed by
//! a CA the test makes: every sslmode, a wrong CA and a wrong host name.

mod support;

use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use support::kafka::{Broker, Topics};
use support::relay::RelayProcess;
use support::workload::setup;
use support::{PgCluster, PgOptions};
use walrelay::replication::{ConnectionConfig, ReplicationConnection, ReplicationError};

struct Pki {
    ca_pem: String,
    server_cert_pem: String,
    server_key_pem: String,
}

/// A CA, and a server certificate it signs for `localhost` only.
fn pki(name: &str) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, name);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        server_cert_pem: server_cert.pem(),
        server_key_pem: server_key.serialize_pem(),
    }
}

async fn connect(url: &str) -> Result<ReplicationConnection, ReplicationError> {
    ReplicationConnection::connect(&ConnectionConfig::from_url(url).unwrap()).await
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_succeeds_with_the_ca_and_fails_clearly_without_it_or_with_a_wrong_host() {
    let good = pki("walrelay test CA");
    let other = pki("some other CA");
    let pg = PgCluster::start_with(PgOptions {
        tls: Some((good.server_cert_pem.clone(), good.server_key_pem.clone())),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let wrong_ca = dir.path().join("other-ca.pem");
    std::fs::write(&ca, &good.ca_pem).unwrap();
    std::fs::write(&wrong_ca, &other.ca_pem).unwrap();
    let url = |host: &str, mode: &str, root: &std::path::Path| {
        format!(
            "postgres://postgres@{host}:{}/postgres?sslmode={mode}&sslrootcert={}",
            pg.port,
            root.display()
        )
    };

    // verify-full with the right CA and host: the replication connection is encrypted.
    let mut conn = connect(&url("localhost", "verify-full", &ca))
        .await
        .expect("verify-full with the CA");
    conn.identify_system().await.unwrap();
    let sql = walrelay::sql::connect(
        &ConnectionConfig::from_url(&url("localhost", "verify-full", &ca)).unwrap(),
    )
    .await
    .expect("the SQL connection verifies too");
    let encrypted: bool = sql
        .query_one(
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.backend_type = 'walsender' OR a.pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted, "both connections use TLS");
    let count: i64 = sql
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1);
    conn.close().await.unwrap();

    // A CA that did not sign the server's certificate.
    let err = connect(&url("localhost", "verify-full", &wrong_ca))
        .await
        .err()
        .expect("wrong CA must fail");
    let text = err.to_string();
    assert!(matches!(err, ReplicationError::Tls { .. }), "{text}");
    assert!(text.contains("UnknownIssuer"), "{text}");
    assert!(
        text.contains("sslrootcert"),
        "the message names the fix: {text}"
    );
    assert!(!err.is_transient());

    // The right CA, but a host name the certificate does not name.
    let err = connect(&url("127.0.0.1", "verify-full", &ca))
        .await
        .err()
        .expect("wrong host must fail");
    assert!(
        err.to_string().contains("not valid for name \"127.0.0.1\""),
        "{err}"
    );
    // verify-ca checks the chain only, so the same host is accepted.
    connect(&url("127.0.0.1", "verify-ca", &ca))
        .await
        .expect("verify-ca ignores the host name");
    // verify-ca still refuses a certificate from another CA.
    assert!(
        connect(&url("127.0.0.1", "verify-ca", &wrong_ca))
            .await
            .is_err()
    );

    // A missing CA file is a clear error naming the setting.
    let missing = dir.path().join("missing.pem");
    let err = connect(&url("localhost", "verify-full", &missing))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("sslrootcert"), "{err}");

    // require and prefer encrypt without checking.
    connect(&url("127.0.0.1", "require", &missing))
        .await
        .expect("require");
    connect(&url("127.0.0.1", "prefer", &missing))
        .await
        .expect("prefer");
}

#[tokio::test(flavor = "multi_thread")]
async fn sslmode_require_against_a_server_without_tls_is_refused_and_prefer_falls_back() {
    let pg = PgCluster::start();
    let base = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);
    let err = connect(&format!("{base}?sslmode=require"))
        .await
        .err()
        .expect("no TLS on the server");
    assert!(err.to_string().contains("does not accept TLS"), "{err}");
    connect(&format!("{base}?sslmode=prefer"))
        .await
        .expect("prefer falls back to plain text");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_relay_streams_over_verify_full() {
    let good = pki("walrelay test CA");
    let pg = PgCluster::start_with(PgOptions {
        tls: Some((good.server_cert_pem.clone(), good.server_key_pem.clone())),
        ..Default::default()
    });
    let broker = Broker::shared();
    let topics = Topics::new("tls");
    let db = pg.create_database("tls").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &good.ca_pem).unwrap();
    let url = format!(
        "postgres://postgres@localhost:{}/{db}?sslmode=verify-full&sslrootcert={}",
        pg.port,
        ca.display()
    );
    setup(&url, &[]);
    let args = topics.relay_args(&[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let relay = RelayProcess::start(&url, &broker.bootstrap(), &args);
    pg.client(&db)
        .await
        .batch_execute("INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('tls', 'k', 'E', '{}')")
        .await
        .unwrap();
    let records = broker.consume(&topics.topic("tls"), 1, Duration::from_secs(30));
    assert_eq!(records.len(), 1, "relay log:\n{}", relay.log());
}

#[test]
fn passwords_never_appear_in_help_or_configuration_errors() {
    let secret = "s3cr3t-pw";
    let url = format!("postgres://relay:{secret}@127.0.0.1:1/db?sslmode=bogus");
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_walrelay"))
        .args(["run", "--help"])
        .env("WALRELAY_PG_URL", &url)
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--pg-url"));
    assert!(!help.contains(secret), "{help}");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_walrelay"))
        .args(["run", "--brokers", "127.0.0.1:1"])
        .env("WALRELAY_PG_URL", &url)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(
        run.status.code(),
        Some(2),
        "a bad sslmode is a configuration error: {stderr}"
    );
    assert!(stderr.contains("sslmode"), "{stderr}");
    assert!(!stderr.contains(secret), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_authenticates_the_role_it_names() {
    let good = pki("walrelay test CA");
    // A client certificate for role `certuser`, signed by the same CA.
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "client CA");
    let client_ca = ca.self_signed(&ca_key).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
    client
        .distinguished_name
        .push(DnType::CommonName, "certuser");
    let client_cert = client.signed_by(&client_key, &client_ca, &ca_key).unwrap();

    let pg = PgCluster::start_with(PgOptions {
        tls: Some((good.server_cert_pem.clone(), good.server_key_pem.clone())),
        client_ca: Some(client_ca.pem()),
        hba_first: vec![
            "hostssl all certuser 127.0.0.1/32 cert".into(),
            "hostssl replication certuser 127.0.0.1/32 cert".into(),
        ],
        ..Default::default()
    });
    pg.client("postgres")
        .await
        .batch_execute("CREATE ROLE certuser LOGIN REPLICATION")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = (
        dir.path().join("ca.pem"),
        dir.path().join("client.pem"),
        dir.path().join("client.key"),
    );
    std::fs::write(&ca, &good.ca_pem).unwrap();
    std::fs::write(&cert, client_cert.pem()).unwrap();
    std::fs::write(&key, client_key.serialize_pem()).unwrap();
    let base = format!(
        "postgres://certuser@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg.port,
        ca.display()
    );
    let with_cert = format!("{base}&sslcert={}&sslkey={}", cert.display(), key.display());
    let mut conn = connect(&with_cert)
        .await
        .expect("the certificate authenticates certuser");
    conn.identify_system().await.unwrap();
    let sql = walrelay::sql::connect(&ConnectionConfig::from_url(&with_cert).unwrap())
        .await
        .unwrap();
    let user: String = sql
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, "certuser");
    // Without the certificate the server refuses the role.
    let err = connect(&base)
        .await
        .err()
        .expect("no certificate, no login");
    assert!(
        err.sqlstate() == Some("28000") || matches!(err, ReplicationError::Tls { .. }),
        "{err}"
    );
}
