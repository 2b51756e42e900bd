//! Parsing a libpq-style connection URL into a [`ConnectionConfig`], and
//! redacting one for messages.
//!
//! Options walrelay does not implement are refused with an error that names
//! them; silently ignoring, say, `sslmode=require` would send a password in
//! the clear to a user who asked for encryption.

use std::path::PathBuf;
use std::time::Duration;

use percent_encoding::percent_decode_str;

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
        "connection URL: parameter {0:?} is not supported; supported: host, port, user, password, dbname, sslmode, sslrootcert, sslcert, sslkey, application_name, connect_timeout, target_session_attrs, keepalives, keepalives_idle, keepalives_interval, keepalives_count, tcp_user_timeout"
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
}

/// Parses `postgres://user:password@host:port/dbname?param=value` (see
/// [`ConnectionConfig::from_url`]).
pub fn parse(url: &str) -> Result<ConnectionConfig, ConfigError> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or_else(|| ConfigError::Scheme(redact_url(url)))?;
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, Some(query)),
        None => (rest, None),
    };
    let (authority, path) = match rest.split_once('/') {
        Some((authority, path)) => (authority, path),
        None => (rest, ""),
    };
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => (Some(userinfo), hostport),
        None => (None, authority),
    };

    let mut user = None;
    let mut password = None;
    if let Some(userinfo) = userinfo {
        let (u, p) = match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (userinfo, None),
        };
        if !u.is_empty() {
            user = Some(decode(u, "user name")?);
        }
        if let Some(p) = p {
            password = Some(Password::new(decode(p, "password")?));
        }
    }

    // host[:port] entries of the authority; a port may be missing.
    let mut hosts: Vec<String> = Vec::new();
    let mut ports: Vec<Option<u16>> = Vec::new();
    if !hostport.is_empty() {
        for entry in hostport.split(',') {
            let (host_text, port_text) = split_host_port(entry);
            hosts.push(decode(host_text, "host")?);
            ports.push(match port_text {
                Some(p) => Some(parse_port(p)?),
                None => None,
            });
        }
    }
    let mut target_session_attrs = TargetSessionAttrs::Any;
    let mut dbname = if path.is_empty() {
        None
    } else {
        Some(decode(path, "database name")?)
    };
    let mut ssl_mode = SslMode::Prefer;
    let (mut ssl_root_cert, mut ssl_cert, mut ssl_key) = (None, None, None);
    let mut application_name = "walrelay".to_owned();
    let mut connect_timeout = None;
    let mut keepalives = Keepalives::default();
    let number = |key: &str, value: &str| {
        value
            .parse::<u64>()
            .map_err(|_| ConfigError::NotANumber(key.to_owned(), value.to_owned()))
    };

    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = decode(value, "query parameter")?;
        match key {
            "host" => hosts = value.split(',').map(str::to_owned).collect(),
            "port" => {
                ports = value
                    .split(',')
                    .map(|p| parse_port(p).map(Some))
                    .collect::<Result<_, _>>()?
            }
            "target_session_attrs" => {
                target_session_attrs = match value.as_str() {
                    "any" => TargetSessionAttrs::Any,
                    "read-write" => TargetSessionAttrs::ReadWrite,
                    "read-only" => TargetSessionAttrs::ReadOnly,
                    "primary" => TargetSessionAttrs::Primary,
                    "standby" => TargetSessionAttrs::Standby,
                    "prefer-standby" => TargetSessionAttrs::PreferStandby,
                    _ => return Err(ConfigError::UnknownTargetSessionAttrs(value)),
                }
            }
            "user" => user = Some(value),
            "password" => password = Some(Password::new(value)),
            "dbname" => dbname = Some(value),
            "application_name" => application_name = value,
            "sslmode" => {
                ssl_mode = match value.as_str() {
                    "disable" => SslMode::Disable,
                    "allow" | "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    _ => return Err(ConfigError::UnknownSslMode(value)),
                }
            }
            "sslrootcert" => ssl_root_cert = Some(PathBuf::from(value)),
            "sslcert" => ssl_cert = Some(PathBuf::from(value)),
            "sslkey" => ssl_key = Some(PathBuf::from(value)),
            "connect_timeout" => {
                let secs: u64 = value
                    .parse()
                    .map_err(|_| ConfigError::ConnectTimeout(value.clone()))?;
                connect_timeout = (secs > 0).then(|| Duration::from_secs(secs));
            }
            "keepalives" => keepalives.enabled = number(key, &value)? != 0,
            "keepalives_idle" => keepalives.idle = Duration::from_secs(number(key, &value)?),
            "keepalives_interval" => {
                keepalives.interval = Duration::from_secs(number(key, &value)?)
            }
            "keepalives_count" => keepalives.count = number(key, &value)? as u32,
            "tcp_user_timeout" => {
                let ms = number(key, &value)?;
                keepalives.user_timeout = (ms > 0).then(|| Duration::from_millis(ms));
            }
            other => return Err(ConfigError::UnknownParameter(other.to_owned())),
        }
    }

    let user = user
        .or_else(|| std::env::var("PGUSER").ok())
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "postgres".to_owned());
    if ssl_cert.is_some() != ssl_key.is_some() {
        return Err(ConfigError::ClientCertPair);
    }
    if hosts.is_empty() {
        hosts.push(String::new());
    }
    // One port for all hosts, or one per host (libpq's rule).
    let ports: Vec<Option<u16>> = match ports.len() {
        0 => vec![None; hosts.len()],
        1 => vec![ports[0]; hosts.len()],
        n if n == hosts.len() => ports,
        n => {
            return Err(ConfigError::PortCount {
                hosts: hosts.len(),
                ports: n,
            });
        }
    };
    let hosts = hosts
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
    Ok(ConnectionConfig {
        hosts,
        target_session_attrs,
        dbname: dbname.unwrap_or_else(|| user.clone()),
        user,
        password: password.or_else(|| std::env::var("PGPASSWORD").ok().map(Password::new)),
        ssl_mode,
        ssl_root_cert,
        ssl_cert,
        ssl_key,
        application_name,
        connect_timeout,
        keepalives,
    })
}

/// The URL with any password replaced, safe to print.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let after = &url[scheme_end + 3..];
    let authority_end = after.find(['/', '?']).unwrap_or(after.len());
    let authority = &after[..authority_end];
    let mut out = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{}{user}:***@{host}", &url[..scheme_end + 3]),
            None => url[..scheme_end + 3 + authority_end].to_owned(),
        },
        None => url[..scheme_end + 3 + authority_end].to_owned(),
    };
    let tail = &after[authority_end..];
    // A password may also hide in the query string.
    let (path, query) = tail.split_once('?').unwrap_or((tail, ""));
    out.push_str(path);
    if !query.is_empty() {
        let redacted: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some(("password", _)) => "password=***".to_owned(),
                _ => pair.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&redacted.join("&"));
    }
    out
}

fn decode(text: &str, what: &'static str) -> Result<String, ConfigError> {
    percent_decode_str(text)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| ConfigError::Encoding(what))
}

fn parse_port(text: &str) -> Result<u16, ConfigError> {
    match text.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(ConfigError::Port(text.to_owned())),
    }
}

/// Splits `host:port`, `[v6]:port`, `host` or `:port`.
fn split_host_port(text: &str) -> (&str, Option<&str>) {
    if let Some(rest) = text.strip_prefix('[') {
        if let Some((host, after)) = rest.split_once(']') {
            return (host, after.strip_prefix(':'));
        }
    }
    match text.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (text, None),
    }
}

impl ConnectionConfig {
    /// Parses `postgres://user:password@host:port/dbname?param=value`.
    ///
    /// The host may be a percent-encoded Unix socket directory
    /// (`postgres://%2Fvar%2Frun%2Fpostgresql/app`) or given as `?host=/dir`.
    /// Several hosts are separated by commas, as libpq takes them
    /// (`h1:5432,h2:5432`, or `?host=h1,h2&port=5432`), and
    /// `target_session_attrs` picks among them.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        parse(url)
    }
}

#[cfg(test)]
#[path = "url_tests.rs"]
mod tests;
