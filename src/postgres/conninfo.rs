//! libpq's keyword/value connection strings
//! (`host=db port=5432 dbname=app user=relay sslmode=verify-full`):
//! pairs separated by spaces, `=` with optional spaces around it, and
//! single-quoted values with `\'` and `\\` escapes.

use super::config::ConnectionConfig;
use super::parameters::{ConfigError, from_pairs};

/// Whether `text` is a keyword/value string rather than a URL.
/// An empty string is one too: everything from the environment, as libpq.
pub fn is_conninfo(text: &str) -> bool {
    !text.contains("://") && (text.contains('=') || text.trim().is_empty())
}

/// Parses a keyword/value string, with libpq's environment variables for
/// what it leaves out.
pub fn parse(text: &str) -> Result<ConnectionConfig, ConfigError> {
    parse_with_env(text, &|name| {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    })
}

/// [`parse`] with the environment given, for tests.
pub fn parse_with_env(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ConnectionConfig, ConfigError> {
    from_pairs(pairs(text)?, env)
}

/// The string's (keyword, value) pairs, in order.
pub fn pairs(text: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(ConfigError::Conninfo(format!(
                "{key:?} has no value; write key=value, such as host=db dbname=app"
            )));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => value.push(chars.next().unwrap_or('\\')),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => {
                        return Err(ConfigError::Conninfo(format!(
                            "the value of {key} has no closing quote (')"
                        )));
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next().unwrap_or('\\'));
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// The string with any password replaced, safe to print.
pub fn redact(text: &str) -> String {
    match pairs(text) {
        Ok(pairs) => pairs
            .into_iter()
            .map(|(k, v)| match k.as_str() {
                "password" => "password=***".to_owned(),
                _ if v.is_empty() || v.contains([' ', '\'', '\\']) => {
                    format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
                }
                _ => format!("{k}={v}"),
            })
            .collect::<Vec<_>>()
            .join(" "),
        // Unparsable: show nothing that might be a secret.
        Err(_) => "(a connection string that could not be parsed)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn pairs_take_spaces_around_equals_and_quoted_values() {
        let got = pairs(r"host = db  dbname=app password='it\'s a secret' user=r").unwrap();
        assert_eq!(
            got,
            vec![
                ("host".into(), "db".into()),
                ("dbname".into(), "app".into()),
                ("password".into(), "it's a secret".into()),
                ("user".into(), "r".into()),
            ]
        );
    }

    #[test]
    fn a_keyword_without_value_or_an_open_quote_is_named() {
        assert!(
            pairs("host")
                .unwrap_err()
                .to_string()
                .contains("\"host\" has no value")
        );
        assert!(
            pairs("password='x")
                .unwrap_err()
                .to_string()
                .contains("closing quote")
        );
    }

    #[test]
    fn a_conninfo_string_gives_the_same_settings_as_the_url() {
        let a = parse_with_env(
            "host=db1,db2 port=5433 dbname=app user=r sslmode=require",
            &no_env,
        )
        .unwrap();
        let b = super::super::url::parse_with_env(
            "postgres://r@db1:5433,db2:5433/app?sslmode=require",
            &no_env,
        )
        .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn redact_hides_the_password_only() {
        assert_eq!(
            redact("host=db password='s e c' user=r"),
            "host=db password=*** user=r"
        );
    }
}
