//! `walrelay config`: the effective configuration of a command, each value
//! with its source, secrets masked. The output is itself a config file.
//! The command line (`cli/layers.rs`) finds each [`Setting`] and where it
//! came from; this file only prints them.

use std::fmt::Write;
use std::path::Path;

/// Where a setting's value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env,
    File,
    Default,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Flag => "flag",
            Source::Env => "env",
            Source::File => "file",
            Source::Default => "default",
        }
    }
}

/// One setting of the command that runs, for `walrelay config`.
#[derive(Clone, Debug)]
pub struct Setting {
    /// The key in the file: the flag's long name.
    pub key: String,
    /// Its raw values, unmasked (mask before printing).
    pub values: Vec<String>,
    /// Whether it takes several values (printed as a list).
    pub many: bool,
    /// Whether it is an on/off flag (printed as a bool).
    pub switch: bool,
    pub source: Source,
    /// The environment variable that sets it, if any.
    pub env: Option<String>,
}

/// librdkafka option names that hold a secret (`sasl.password`,
/// `ssl.key.password`, `sasl.jaas.config`, `sasl.oauthbearer.client.secret`,
/// `ssl.key.pem`, ...).
const SECRET_MARKS: [&str; 6] = [
    "password",
    "secret",
    "jaas",
    "token",
    "key.pem",
    "credential",
];

/// The settings as TOML, a comment after each naming its source.
pub fn render(command: &str, file: Option<&Path>, settings: &[Setting]) -> String {
    let mut out = String::new();
    let file = file.map_or("none".to_owned(), |f| f.display().to_string());
    let _ = writeln!(
        out,
        "# walrelay {command}: effective configuration (config file: {file})\n# precedence: flag, then env, then file, then default; secrets masked"
    );
    for setting in settings {
        let source = match (setting.source, &setting.env) {
            (Source::Env, Some(env)) => format!("env {env}"),
            (source, _) => source.as_str().to_owned(),
        };
        match value(setting) {
            Some(value) => {
                let _ = writeln!(out, "{} = {value}  # {source}", setting.key);
            }
            // An optional setting that is not set: a comment, not a value.
            None => {
                let _ = writeln!(out, "# {} is not set  # {source}", setting.key);
            }
        }
    }
    out
}

fn value(setting: &Setting) -> Option<String> {
    if setting.switch {
        return Some(
            setting
                .values
                .first()
                .map_or("false", String::as_str)
                .to_owned(),
        );
    }
    let quoted: Vec<String> = setting.values.iter().map(|v| literal(&mask(v))).collect();
    match (setting.many, quoted.as_slice()) {
        (true, _) => Some(format!("[{}]", quoted.join(", "))),
        (false, [one]) => Some(one.clone()),
        (false, _) => None,
    }
}

/// A whole number as a TOML integer, anything else as a string.
fn literal(text: &str) -> String {
    match text.parse::<i64>() {
        Ok(n) if n.to_string() == text => text.to_owned(),
        _ => quote(text),
    }
}

/// A value with any secret in it replaced: a connection URL's or string's
/// password, a secret librdkafka option.
pub fn mask(value: &str) -> String {
    if value.contains("://") {
        return crate::postgres::redact_url(value);
    }
    if let Some((key, _)) = value.split_once('=') {
        let lower = key.trim().to_ascii_lowercase();
        if !lower.contains(' ') && SECRET_MARKS.iter().any(|m| lower.contains(m)) {
            return format!("{key}=***");
        }
    }
    if crate::postgres::conninfo::is_conninfo(value) {
        return crate::postgres::redact_url(value);
    }
    value.to_owned()
}

/// A TOML basic string.
fn quote(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_and_the_rest_kept() {
        assert_eq!(mask("sasl.password=hunter2"), "sasl.password=***");
        assert_eq!(
            mask(
                "sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required;"
            ),
            "sasl.jaas.config=***"
        );
        assert_eq!(mask("linger.ms=5"), "linger.ms=5");
        assert_eq!(mask("postgres://u:pw@db/app"), "postgres://u:***@db/app");
        assert_eq!(mask("host=db password=pw"), "host=db password=***");
        assert_eq!(mask("walrelay"), "walrelay");
        assert_eq!(
            mask("postgres://u:secret@db/app?sslmode=require"),
            "postgres://u:***@db/app?sslmode=require"
        );
    }

    #[test]
    fn quoting_makes_valid_toml() {
        let text = format!("k = {}", quote("a \"b\" \\ c\n"));
        let parsed: toml::Table = text.parse().unwrap();
        assert_eq!(parsed["k"].as_str(), Some("a \"b\" \\ c\n"));
    }
}
