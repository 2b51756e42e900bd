//! What both connections to PostgreSQL share: the connection URL
//! (`config.rs`), TLS (`tls.rs`), server errors and their fixes
//! (`error.rs`), and identifier quoting. The walsender connection lives in
//! `crate::replication`, the SQL connection in `crate::sql`.

pub mod config;
pub mod error;
pub mod tls;

pub use config::{ConnectionConfig, Password, SslMode, redact_url};
pub use error::{ServerError, os_error_fix};

/// Quotes an identifier (`"my ""table"""`).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}
