//! Parsing a libpq-style connection URL into a [`ConnectionConfig`], and
//! redacting one for messages. A URL comes down to libpq's parameters
//! (`parameters.rs`); a keyword/value string given where a URL is taken
//! goes to `conninfo.rs`.

use percent_encoding::percent_decode_str;

use super::config::ConnectionConfig;
use super::parameters::{ConfigError, from_pairs};

/// Parses `postgres://user:password@host:port/dbname?param=value` (see
/// [`ConnectionConfig::from_url`]), with libpq's environment variables for
/// what it leaves out.
pub fn parse(url: &str) -> Result<ConnectionConfig, ConfigError> {
    parse_with_env(url, &|name| {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    })
}

/// [`parse`] with the environment given, for tests.
pub fn parse_with_env(
    url: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ConnectionConfig, ConfigError> {
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

    // The URL's parts as (key, value) pairs, in the order libpq applies
    // them: the authority and path, then the query (later wins).
    let mut pairs: Vec<(String, String)> = Vec::new();
    if let Some(userinfo) = userinfo {
        let (u, p) = match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (userinfo, None),
        };
        if !u.is_empty() {
            pairs.push(("user".into(), decode(u, "user name")?));
        }
        if let Some(p) = p {
            pairs.push(("password".into(), decode(p, "password")?));
        }
    }
    // host[:port] entries of the authority; a port may be missing.
    if !hostport.is_empty() {
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for entry in hostport.split(',') {
            let (host_text, port_text) = split_host_port(entry);
            hosts.push(decode(host_text, "host")?);
            ports.push(port_text.unwrap_or_default().to_owned());
        }
        pairs.push(("host".into(), hosts.join(",")));
        if ports.iter().any(|p| !p.is_empty()) {
            pairs.push(("port".into(), ports.join(",")));
        }
    }
    if !path.is_empty() {
        pairs.push(("dbname".into(), decode(path, "database name")?));
    }
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        pairs.push((key.to_owned(), decode(value, "query parameter")?));
    }
    from_pairs(pairs, env)
}

/// The URL (or keyword/value string) with any password replaced, safe to
/// print.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        if super::conninfo::is_conninfo(url) {
            return super::conninfo::redact(url);
        }
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
    ///
    /// A libpq keyword/value string (`host=db dbname=app`) is taken too, and
    /// libpq's environment variables (`PGHOST`, `PGSSLMODE`, ...) and
    /// password file fill in what the string leaves out.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        if super::conninfo::is_conninfo(url) {
            return super::conninfo::parse(url);
        }
        parse(url)
    }
}

#[cfg(test)]
#[path = "url_tests.rs"]
mod tests;
