//! Tests of the connection URL's parsing.

use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::postgres::config::{Host, HostPort, Keepalives, SslMode, TargetSessionAttrs};

#[test]
fn url_with_every_part_is_parsed() {
    let c = ConnectionConfig::from_url(
        "postgres://relay:s%40cret@db.example:6543/app?sslmode=disable&application_name=x&connect_timeout=5",
    )
    .unwrap();
    assert_eq!(c.host(), &Host::Tcp("db.example".into()));
    assert_eq!(c.port(), 6543);
    assert_eq!(c.user, "relay");
    assert_eq!(c.password.as_ref().unwrap().expose(), "s@cret");
    assert_eq!(c.dbname, "app");
    assert_eq!(c.ssl_mode, SslMode::Disable);
    assert_eq!(c.application_name, "x");
    assert_eq!(c.connect_timeout, Some(Duration::from_secs(5)));
}

#[test]
fn unix_socket_directory_is_accepted_encoded_or_as_a_parameter() {
    let a = ConnectionConfig::from_url("postgres://u@%2Ftmp%2Fpg:5433/db").unwrap();
    assert_eq!(a.host(), &Host::UnixSocketDir("/tmp/pg".into()));
    assert_eq!(a.address(), "/tmp/pg/.s.PGSQL.5433");
    let b = ConnectionConfig::from_url("postgresql:///db?host=/tmp/pg&user=u").unwrap();
    assert_eq!(b.host(), &Host::UnixSocketDir("/tmp/pg".into()));
    assert_eq!(b.user, "u");
}

#[test]
fn ipv6_host_in_brackets_is_parsed() {
    let c = ConnectionConfig::from_url("postgres://u@[::1]:5544/db").unwrap();
    assert_eq!(c.host(), &Host::Tcp("::1".into()));
    assert_eq!(c.port(), 5544);
}

#[test]
fn every_libpq_sslmode_and_certificate_parameter_is_understood() {
    for (text, mode) in [
        ("disable", SslMode::Disable),
        ("allow", SslMode::Prefer),
        ("prefer", SslMode::Prefer),
        ("require", SslMode::Require),
        ("verify-ca", SslMode::VerifyCa),
        ("verify-full", SslMode::VerifyFull),
    ] {
        let c = ConnectionConfig::from_url(&format!("postgres://u@h/db?sslmode={text}")).unwrap();
        assert_eq!(c.ssl_mode, mode);
    }
    let c = ConnectionConfig::from_url(
        "postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem&sslcert=/c.pem&sslkey=/k.pem",
    )
    .unwrap();
    assert_eq!(c.root_cert_path(), PathBuf::from("/ca.pem"));
    assert_eq!(c.ssl_cert, Some(PathBuf::from("/c.pem")));
    assert_eq!(
        ConnectionConfig::from_url("postgres://u@h/db?sslcert=/c.pem").unwrap_err(),
        ConfigError::ClientCertPair
    );
    assert!(matches!(
        ConnectionConfig::from_url("postgres://u@h/db?sslmode=maybe"),
        Err(ConfigError::UnknownSslMode(_))
    ));
}

#[test]
fn keepalives_take_libpqs_parameters_and_default_to_noticing_a_dead_peer_in_seconds() {
    let c = ConnectionConfig::from_url("postgres://u@h/db").unwrap();
    assert!(c.keepalives.enabled);
    assert_eq!(c.keepalives.idle, Duration::from_secs(10));
    let c = ConnectionConfig::from_url(
        "postgres://u@h/db?keepalives=1&keepalives_idle=3&keepalives_interval=1&keepalives_count=2&tcp_user_timeout=4000",
    )
    .unwrap();
    assert_eq!(
        c.keepalives,
        Keepalives {
            enabled: true,
            idle: Duration::from_secs(3),
            interval: Duration::from_secs(1),
            count: 2,
            user_timeout: Some(Duration::from_secs(4)),
        }
    );
    assert!(
        !ConnectionConfig::from_url("postgres://u@h/db?keepalives=0")
            .unwrap()
            .keepalives
            .enabled
    );
    assert_eq!(
        ConnectionConfig::from_url("postgres://u@h/db?keepalives_idle=soon").unwrap_err(),
        ConfigError::NotANumber("keepalives_idle".into(), "soon".into())
    );
}

#[test]
fn unknown_parameters_and_bad_ports_are_refused_by_name() {
    let err = ConnectionConfig::from_url("postgres://u@h/db?gssencmode=disable").unwrap_err();
    assert_eq!(err, ConfigError::UnknownParameter("gssencmode".into()));
    let err = ConnectionConfig::from_url("postgres://u@h:99999/db").unwrap_err();
    assert_eq!(err, ConfigError::Port("99999".into()));
    assert!(matches!(
        ConnectionConfig::from_url("mysql://u@h/db"),
        Err(ConfigError::Scheme(_))
    ));
}

#[test]
fn several_hosts_are_taken_as_libpq_takes_them() {
    let c = ConnectionConfig::from_url(
        "postgres://u@h1:5432,h2:5433,[::1]/db?target_session_attrs=read-write",
    )
    .unwrap();
    let hosts: Vec<String> = c.hosts.iter().map(HostPort::address).collect();
    assert_eq!(hosts, ["h1:5432", "h2:5433", "[::1]:5432"]);
    assert_eq!(c.target_session_attrs, TargetSessionAttrs::ReadWrite);
    assert_eq!(c.address(), "h1:5432,h2:5433,[::1]:5432");
    let each = c.each_host();
    assert_eq!(each.len(), 3);
    assert_eq!(each[1].address(), "h2:5433");
    let q = ConnectionConfig::from_url("postgres://u@/db?host=a,b&port=6000").unwrap();
    assert_eq!(q.address(), "a:6000,b:6000");
    assert_eq!(
        ConnectionConfig::from_url("postgres://u@/db?host=a,b,c&port=1,2").unwrap_err(),
        ConfigError::PortCount { hosts: 3, ports: 2 }
    );
    assert!(matches!(
        ConnectionConfig::from_url("postgres://u@h/db?target_session_attrs=master"),
        Err(ConfigError::UnknownTargetSessionAttrs(_))
    ));
    assert!(TargetSessionAttrs::ReadWrite.accepts(false, false));
    assert!(!TargetSessionAttrs::ReadWrite.accepts(true, true));
    assert!(TargetSessionAttrs::Standby.accepts(true, true));
}

#[test]
fn password_never_appears_in_debug_output_or_redacted_urls() {
    let c = ConnectionConfig::from_url("postgres://u:hunter2@h/db").unwrap();
    assert!(!format!("{c:?}").contains("hunter2"));
    assert_eq!(
        redact_url("postgres://u:hunter2@h/db"),
        "postgres://u:***@h/db"
    );
    assert_eq!(
        redact_url("postgres://u@h/db?password=hunter2&sslmode=disable"),
        "postgres://u@h/db?password=***&sslmode=disable"
    );
    let err = ConnectionConfig::from_url("mysql://u:hunter2@h/db").unwrap_err();
    assert!(!err.to_string().contains("hunter2"));
}

fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    move |name| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
    }
}

#[test]
fn libpq_variables_fill_in_what_the_url_leaves_out_and_never_override_it() {
    let env = env_of(&[
        ("PGHOST", "envhost"),
        ("PGPORT", "6543"),
        ("PGUSER", "envuser"),
        ("PGDATABASE", "envdb"),
        ("PGSSLMODE", "require"),
        ("PGAPPNAME", "envapp"),
        ("PGTARGETSESSIONATTRS", "read-write"),
    ]);
    let c = parse_with_env("postgres://", &env).unwrap();
    assert_eq!(c.address(), "envhost:6543");
    assert_eq!((c.user.as_str(), c.dbname.as_str()), ("envuser", "envdb"));
    assert_eq!(c.ssl_mode, SslMode::Require);
    assert_eq!(c.application_name, "envapp");
    assert_eq!(c.target_session_attrs, TargetSessionAttrs::ReadWrite);

    let c = parse_with_env("postgres://u@db:5432/app?sslmode=disable", &env).unwrap();
    assert_eq!(c.address(), "db:5432");
    assert_eq!((c.user.as_str(), c.dbname.as_str()), ("u", "app"));
    assert_eq!(c.ssl_mode, SslMode::Disable);
}

#[test]
fn a_bad_libpq_variable_is_named_unless_the_url_overrides_it() {
    let env = env_of(&[("PGSSLMODE", "sometimes")]);
    let err = parse_with_env("postgres://db/app", &env).unwrap_err();
    assert!(
        err.to_string().contains("environment variable PGSSLMODE"),
        "{err}"
    );
    assert!(parse_with_env("postgres://db/app?sslmode=disable", &env).is_ok());
}

#[test]
fn a_huge_keepalives_count_is_an_error_not_a_wrap() {
    let err =
        parse_with_env("postgres://db/app?keepalives_count=99999999999", &|_| None).unwrap_err();
    assert!(err.to_string().contains("keepalives_count"), "{err}");
}
