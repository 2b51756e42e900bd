//! libpq's connection parameters (`host`, `sslmode`, `target_session_attrs`,
//! ...) and what each sets in a [`ConnectionConfig`]. Both ways of writing
//! a connection string, a URL (`url.rs`) and keyword/value pairs
//! (`conninfo.rs`), come down to these pairs, so both build on this file.
//!
//! Options walrelay does not implement are refused with an error that names
//! them; silently ignoring, say, `sslmode=require` would send a password in
//! the clear to a user who asked for encryption.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::config::{
    ConnectionConfig, Host, HostPort, Keepalives, Password, SslMode, TargetSessionAttrs,
};

/// A connection URL walrelay cannot use as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "connection URL must start with postgres:// or postgresql:// (got {0:?}); example: postgres://walrelay:secret@localhost:5432/app"
    )]
    Scheme(String),
    #[error("connection URL: invalid port {0:?}: use a number from 1 to 65535")]
    Port(String),
    #[error("connection URL: {0} is not valid percent-encoded UTF-8")]
    Encoding(&'static str),
    #[error("connection URL: sslcert and sslkey go together; give both or neither")]
    ClientCertPair,
    #[error(
        "connection URL: unknown sslmode {0:?}; use disable, allow, prefer, require, verify-ca or verify-full"
    )]
    UnknownSslMode(String),
    #[error(
        "connection URL: parameter {0:?} is not supported; supported: host, port, user, password, passfile, dbname, sslmode, sslrootcert, sslcert, sslkey, application_name, connect_timeout, target_session_attrs, keepalives, keepalives_idle, keepalives_interval, keepalives_count, tcp_user_timeout"
    )]
    UnknownParameter(String),
    #[error(
        "connection URL: unknown target_session_attrs {0:?}; use any, read-write, read-only, primary, standby or prefer-standby"
    )]
    UnknownTargetSessionAttrs(String),
    #[error(
        "connection URL: {hosts} hosts but {ports} ports; give one port for all, or one per host"
    )]
    PortCount { hosts: usize, ports: usize },
    #[error(
        "connection URL: {0}={1:?} is not a whole number (of seconds, or milliseconds for tcp_user_timeout)"
    )]
    NotANumber(String, String),
    #[error("connection URL: connect_timeout={0:?} is not a whole number of seconds")]
    ConnectTimeout(String),
    #[error(
        "sslrootcert=system checks the server against the system's CAs, which only means something with the host name checked too: use sslmode=verify-full (the default with sslrootcert=system)"
    )]
    WeakSystemRoots,
    #[error("connection string: {0}")]
    Conninfo(String),
    #[error("environment variable {0}: {1}")]
    FromEnv(&'static str, Box<ConfigError>),
}

/// The libpq environment variables walrelay reads, and the parameter each
/// stands in for when the connection string leaves it out.
pub const LIBPQ_ENV: [(&str, &str); 12] = [
    ("host", "PGHOST"),
    ("port", "PGPORT"),
    ("user", "PGUSER"),
    ("password", "PGPASSWORD"),
    ("dbname", "PGDATABASE"),
    ("sslmode", "PGSSLMODE"),
    ("sslrootcert", "PGSSLROOTCERT"),
    ("sslcert", "PGSSLCERT"),
    ("sslkey", "PGSSLKEY"),
    ("application_name", "PGAPPNAME"),
    ("connect_timeout", "PGCONNECT_TIMEOUT"),
    ("target_session_attrs", "PGTARGETSESSIONATTRS"),
];

/// Builds the configuration from libpq parameters (a URL's or a key=value
/// string's), filling what they leave out from the environment.
pub fn from_pairs(
    pairs: Vec<(String, String)>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ConnectionConfig, ConfigError> {
    let mut settings = Settings::default();
    for (key, variable) in LIBPQ_ENV {
        if pairs.iter().any(|(k, _)| k == key) {
            continue;
        }
        if let Some(value) = env(variable) {
            settings
                .set(key, value)
                .map_err(|e| ConfigError::FromEnv(variable, Box::new(e)))?;
        }
    }
    for (key, value) in pairs {
        settings.set(&key, value)?;
    }
    settings.finish(env)
}

/// The parameters as they are set, before defaults.
#[derive(Default)]
struct Settings {
    hosts: Vec<String>,
    ports: Vec<Option<u16>>,
    user: Option<String>,
    password: Option<Password>,
    dbname: Option<String>,
    ssl_mode: Option<SslMode>,
    ssl_root_cert: Option<PathBuf>,
    ssl_cert: Option<PathBuf>,
    ssl_key: Option<PathBuf>,
    application_name: Option<String>,
    connect_timeout: Option<Duration>,
    target_session_attrs: Option<TargetSessionAttrs>,
    keepalives: Keepalives,
    passfile: Option<PathBuf>,
}

impl Settings {
    fn set(&mut self, key: &str, value: String) -> Result<(), ConfigError> {
        let number = |value: &str| {
            value
                .parse::<u64>()
                .map_err(|_| ConfigError::NotANumber(key.to_owned(), value.to_owned()))
        };
        match key {
            "host" => self.hosts = value.split(',').map(str::to_owned).collect(),
            "port" => {
                self.ports = value
                    .split(',')
                    .map(|p| match p {
                        "" => Ok(None),
                        p => parse_port(p).map(Some),
                    })
                    .collect::<Result<_, _>>()?
            }
            "target_session_attrs" => {
                self.target_session_attrs = Some(match value.as_str() {
                    "any" => TargetSessionAttrs::Any,
                    "read-write" => TargetSessionAttrs::ReadWrite,
                    "read-only" => TargetSessionAttrs::ReadOnly,
                    "primary" => TargetSessionAttrs::Primary,
                    "standby" => TargetSessionAttrs::Standby,
                    "prefer-standby" => TargetSessionAttrs::PreferStandby,
                    _ => return Err(ConfigError::UnknownTargetSessionAttrs(value)),
                })
            }
            "user" => self.user = Some(value),
            "password" => self.password = Some(Password::new(value)),
            "passfile" => self.passfile = Some(PathBuf::from(value)),
            "dbname" => self.dbname = Some(value),
            "application_name" => self.application_name = Some(value),
            "sslmode" => {
                self.ssl_mode = Some(match value.as_str() {
                    "disable" => SslMode::Disable,
                    "allow" | "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    _ => return Err(ConfigError::UnknownSslMode(value)),
                })
            }
            "sslrootcert" => self.ssl_root_cert = Some(PathBuf::from(value)),
            "sslcert" => self.ssl_cert = Some(PathBuf::from(value)),
            "sslkey" => self.ssl_key = Some(PathBuf::from(value)),
            "connect_timeout" => {
                let secs: u64 = value
                    .parse()
                    .map_err(|_| ConfigError::ConnectTimeout(value.clone()))?;
                self.connect_timeout = (secs > 0).then(|| Duration::from_secs(secs));
            }
            "keepalives" => self.keepalives.enabled = number(&value)? != 0,
            "keepalives_idle" => self.keepalives.idle = Duration::from_secs(number(&value)?),
            "keepalives_interval" => {
                self.keepalives.interval = Duration::from_secs(number(&value)?)
            }
            "keepalives_count" => {
                self.keepalives.count = u32::try_from(number(&value)?)
                    .map_err(|_| ConfigError::NotANumber(key.to_owned(), value.clone()))?
            }
            "tcp_user_timeout" => {
                let ms = number(&value)?;
                self.keepalives.user_timeout = (ms > 0).then(|| Duration::from_millis(ms));
            }
            other => return Err(ConfigError::UnknownParameter(other.to_owned())),
        }
        Ok(())
    }

    fn finish(self, env: &dyn Fn(&str) -> Option<String>) -> Result<ConnectionConfig, ConfigError> {
        let user = self
            .user
            .or_else(|| env("USER"))
            .unwrap_or_else(|| "postgres".to_owned());
        if self.ssl_cert.is_some() != self.ssl_key.is_some() {
            return Err(ConfigError::ClientCertPair);
        }
        // sslrootcert=system: the system's CAs, and (as libpq) only with
        // the host name checked too, else any CA's customer could pose as
        // the server.
        let system_roots = self.ssl_root_cert.as_deref() == Some(Path::new(SYSTEM_ROOTS));
        let ssl_mode = match self.ssl_mode {
            None if system_roots => SslMode::VerifyFull,
            Some(mode) if system_roots && mode != SslMode::VerifyFull => {
                return Err(ConfigError::WeakSystemRoots);
            }
            mode => mode.unwrap_or(SslMode::Prefer),
        };
        let mut hosts = self.hosts;
        if hosts.is_empty() {
            hosts.push(String::new());
        }
        // One port for all hosts, or one per host (libpq's rule).
        let ports: Vec<Option<u16>> = match self.ports.len() {
            0 => vec![None; hosts.len()],
            1 => vec![self.ports[0]; hosts.len()],
            n if n == hosts.len() => self.ports,
            n => {
                return Err(ConfigError::PortCount {
                    hosts: hosts.len(),
                    ports: n,
                });
            }
        };
        let hosts: Vec<HostPort> = hosts
            .into_iter()
            .zip(ports)
            .map(|(h, port)| HostPort {
                host: if h.is_empty() {
                    Host::Tcp("localhost".to_owned())
                } else if h.starts_with('/') {
                    Host::UnixSocketDir(PathBuf::from(h))
                } else {
                    Host::Tcp(h)
                },
                port: port.unwrap_or(5432),
            })
            .collect();
        let dbname = self.dbname.unwrap_or_else(|| user.clone());
        // The password file, as libpq reads it, when no password is given.
        let password = match self.password {
            Some(password) => Some(password),
            None => {
                let file = self
                    .passfile
                    .or_else(|| env("PGPASSFILE").map(PathBuf::from));
                let file = file.or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".pgpass")));
                file.and_then(|f| super::passfile::lookup(&f, &hosts, &dbname, &user))
                    .map(Password::new)
            }
        };
        Ok(ConnectionConfig {
            hosts,
            target_session_attrs: self.target_session_attrs.unwrap_or(TargetSessionAttrs::Any),
            dbname,
            user,
            password,
            ssl_mode,
            ssl_root_cert: self.ssl_root_cert,
            ssl_cert: self.ssl_cert,
            ssl_key: self.ssl_key,
            application_name: self
                .application_name
                .unwrap_or_else(|| "walrelay".to_owned()),
            connect_timeout: self.connect_timeout,
            keepalives: self.keepalives,
        })
    }
}

/// `sslrootcert=system`: the operating system's trusted CAs.
pub const SYSTEM_ROOTS: &str = "system";

fn parse_port(text: &str) -> Result<u16, ConfigError> {
    match text.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(ConfigError::Port(text.to_owned())),
    }
}
