//! What both connections to PostgreSQL share: the connection settings
//! (`config.rs`), the URL or keyword/value string they are parsed from
//! (`url.rs`, `conninfo.rs`, both down to libpq's `parameters.rs`), TLS
//! (`tls.rs`), server errors and their fixes (`error.rs`), and identifier
//! quoting. The walsender connection lives in `crate::replication`, the SQL
//! connection in `crate::sql`.

pub mod config;
pub mod conninfo;
pub mod error;
mod parameters;
pub mod passfile;
pub mod tls;
mod url;

pub use config::{ConnectionConfig, Host, HostPort, Password, SslMode, TargetSessionAttrs};
pub use error::{ServerError, os_error_fix};
pub use parameters::{ConfigError, LIBPQ_ENV, SYSTEM_ROOTS};
pub use url::redact_url;

/// A host that does not suit, and why: its error, or what it is.
pub type HostFailure<E> = (String, Result<String, E>);

/// The outcome of trying several hosts: the first that suits
/// `target_session_attrs`, tried in order (`prefer-standby`: standbys
/// first, then any). `try_host` connects to one host and tells whether it
/// is in recovery and read-only; a host that does not suit is noted.
pub async fn first_suitable<C, E, F, Fut>(
    config: &ConnectionConfig,
    mut try_host: F,
) -> Result<C, Vec<HostFailure<E>>>
where
    F: FnMut(ConnectionConfig) -> Fut,
    Fut: std::future::Future<Output = Result<(C, bool, bool), E>>,
    E: std::fmt::Display,
{
    let attrs = config.target_session_attrs;
    let passes = match attrs {
        TargetSessionAttrs::PreferStandby => {
            vec![TargetSessionAttrs::Standby, TargetSessionAttrs::Any]
        }
        other => vec![other],
    };
    let mut failures = Vec::new();
    for wanted in &passes {
        for host in config.each_host() {
            let address = host.address();
            match try_host(host).await {
                Ok((conn, in_recovery, read_only)) if wanted.accepts(in_recovery, read_only) => {
                    return Ok(conn);
                }
                Ok((_, in_recovery, _)) => failures.push((
                    address,
                    Ok(format!(
                        "is {} (target_session_attrs={})",
                        if in_recovery {
                            "a standby"
                        } else {
                            "a primary"
                        },
                        attrs.as_str()
                    )),
                )),
                Err(error) => {
                    tracing::warn!(host = %address, %error, "passing over a host of the connection string");
                    failures.push((address, Err(error)))
                }
            }
        }
    }
    Err(failures)
}

/// Quotes an identifier (`"my ""table"""`).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The hosts that did not suit, for an error message: each host's error,
/// or what it is.
pub fn describe_failures<E: std::fmt::Display>(failures: &[HostFailure<E>]) -> String {
    failures
        .iter()
        .map(|(address, failure)| match failure {
            Ok(what) => format!("{address} {what}"),
            Err(error) => error.to_string(),
        })
        .collect::<Vec<_>>()
        .join("; ")
}
