//! Where and how to connect: the servers, the credentials, TLS, keepalives,
//! as a libpq-style URL gives them, and the same for tokio-postgres.
//!
//! The URL itself is parsed and checked in `url.rs`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// A password that never shows itself in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn new(text: impl Into<String>) -> Self {
        Password(text.into())
    }

    /// The secret itself, for the authentication exchange only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Tcp(String),
    /// A directory holding the server's Unix socket (`.s.PGSQL.<port>`).
    UnixSocketDir(PathBuf),
}

/// libpq's `sslmode` (see `tls.rs` for what each checks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// `allow` and `prefer`: encryption when the server offers it.
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// libpq's `target_session_attrs`: which of several hosts to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetSessionAttrs {
    Any,
    ReadWrite,
    ReadOnly,
    Primary,
    Standby,
    PreferStandby,
}

impl TargetSessionAttrs {
    /// Whether a server in this state will do.
    pub fn accepts(self, in_recovery: bool, read_only: bool) -> bool {
        match self {
            TargetSessionAttrs::Any | TargetSessionAttrs::PreferStandby => true,
            TargetSessionAttrs::ReadWrite => !read_only,
            TargetSessionAttrs::ReadOnly => read_only,
            TargetSessionAttrs::Primary => !in_recovery,
            TargetSessionAttrs::Standby => in_recovery,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TargetSessionAttrs::Any => "any",
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::ReadOnly => "read-only",
            TargetSessionAttrs::Primary => "primary",
            TargetSessionAttrs::Standby => "standby",
            TargetSessionAttrs::PreferStandby => "prefer-standby",
        }
    }

    /// Whether this needs to ask each server what it is.
    pub fn needs_check(self) -> bool {
        self != TargetSessionAttrs::Any
    }
}

/// One server of the URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    pub host: Host,
    pub port: u16,
}

impl HostPort {
    /// `host:port` or the socket path, for messages.
    pub fn address(&self) -> String {
        match &self.host {
            Host::Tcp(h) if h.contains(':') => format!("[{h}]:{}", self.port),
            Host::Tcp(h) => format!("{h}:{}", self.port),
            Host::UnixSocketDir(dir) => format!("{}/.s.PGSQL.{}", dir.display(), self.port),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionConfig {
    /// The servers to try, in order (libpq: `host1:port1,host2:port2`).
    pub hosts: Vec<HostPort>,
    /// Which of them to use (`target_session_attrs`, default `any`).
    pub target_session_attrs: TargetSessionAttrs,
    pub user: String,
    pub password: Option<Password>,
    pub dbname: String,
    pub ssl_mode: SslMode,
    /// CA certificate(s) for verify-ca and verify-full (`sslrootcert`).
    pub ssl_root_cert: Option<PathBuf>,
    /// Client certificate and key (`sslcert`, `sslkey`).
    pub ssl_cert: Option<PathBuf>,
    pub ssl_key: Option<PathBuf>,
    pub application_name: String,
    pub connect_timeout: Option<Duration>,
    /// TCP keepalives (`keepalives`, `keepalives_idle`,
    /// `keepalives_interval`, `keepalives_count`), and how long sent data
    /// may stay unacknowledged (`tcp_user_timeout`): together they notice a
    /// host that vanished without a reset.
    pub keepalives: Keepalives,
}

/// TCP keepalive settings, libpq's names. walrelay's defaults notice a
/// dead peer in about 25 s (libpq leaves them to the operating system,
/// where the first probe waits two hours).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalives {
    pub enabled: bool,
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
    /// `tcp_user_timeout`; `None` leaves the operating system's.
    pub user_timeout: Option<Duration>,
}

impl Default for Keepalives {
    fn default() -> Self {
        Keepalives {
            enabled: true,
            idle: Duration::from_secs(10),
            interval: Duration::from_secs(5),
            count: 3,
            user_timeout: Some(Duration::from_secs(30)),
        }
    }
}

impl Keepalives {
    /// Applies them to a connected socket.
    pub fn apply(&self, socket: &tokio::net::TcpStream) -> std::io::Result<()> {
        let socket = socket2::SockRef::from(socket);
        if self.enabled {
            socket.set_tcp_keepalive(
                &socket2::TcpKeepalive::new()
                    .with_time(self.idle)
                    .with_interval(self.interval)
                    .with_retries(self.count),
            )?;
        }
        socket.set_tcp_user_timeout(self.user_timeout)
    }
}

impl ConnectionConfig {
    /// The same settings for tokio-postgres, used by the ordinary SQL
    /// connection (`crate::sql`).
    pub fn to_tokio_postgres(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        match self.host() {
            Host::Tcp(h) => config.host(h),
            Host::UnixSocketDir(dir) => config.host_path(dir),
        };
        config
            .port(self.port())
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name(&self.application_name)
            .ssl_mode(match self.ssl_mode {
                SslMode::Disable => tokio_postgres::config::SslMode::Disable,
                SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                    tokio_postgres::config::SslMode::Require
                }
            });
        if let Some(password) = &self.password {
            config.password(password.expose());
        }
        if let Some(timeout) = self.connect_timeout {
            config.connect_timeout(timeout);
        }
        config
            .keepalives(self.keepalives.enabled)
            .keepalives_idle(self.keepalives.idle)
            .keepalives_interval(self.keepalives.interval)
            .keepalives_retries(self.keepalives.count);
        if let Some(timeout) = self.keepalives.user_timeout {
            config.tcp_user_timeout(timeout);
        }
        config
    }

    /// `sslrootcert`, or libpq's default `~/.postgresql/root.crt`.
    pub fn root_cert_path(&self) -> PathBuf {
        self.ssl_root_cert.clone().unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".postgresql/root.crt")
        })
    }

    /// `sslrootcert=system`: the operating system's CAs.
    pub fn uses_system_roots(&self) -> bool {
        self.ssl_root_cert.as_deref() == Some(std::path::Path::new(super::SYSTEM_ROOTS))
    }

    /// The first server: the one a single-host connection uses.
    pub fn host(&self) -> &Host {
        &self.hosts[0].host
    }

    pub fn port(&self) -> u16 {
        self.hosts[0].port
    }

    /// Where the server is, for messages: `host:port` or the socket path
    /// (every host, comma-separated, when there are several).
    pub fn address(&self) -> String {
        self.hosts
            .iter()
            .map(HostPort::address)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// One configuration per host, in the URL's order.
    pub fn each_host(&self) -> Vec<ConnectionConfig> {
        self.hosts
            .iter()
            .map(|host| ConnectionConfig {
                hosts: vec![host.clone()],
                ..self.clone()
            })
            .collect()
    }
}
