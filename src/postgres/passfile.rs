//! libpq's password file (`~/.pgpass`, `PGPASSFILE`, `passfile=`): lines
//! of `hostname:port:database:username:password`, `*` matching anything,
//! `\:` and `\\` escaping. The first matching line wins.
//!
//! As libpq does, a file that others may read is ignored (with a warning):
//! a password there is no secret.

use std::path::Path;

use super::config::{Host, HostPort};

/// The password of the first line matching one of `hosts` (in order), if
/// the file exists, is private and has one.
pub fn lookup(file: &Path, hosts: &[HostPort], dbname: &str, user: &str) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    if !private(file) {
        tracing::warn!(
            file = %file.display(),
            "password file ignored: others can read it; chmod 0600 it"
        );
        return None;
    }
    hosts
        .iter()
        .find_map(|host| find(&text, host, dbname, user))
}

/// The password for one server in the file's text.
pub fn find(text: &str, host: &HostPort, dbname: &str, user: &str) -> Option<String> {
    let names: Vec<String> = match &host.host {
        Host::Tcp(name) => vec![name.clone()],
        // A socket connection matches "localhost", as in libpq, or the
        // socket directory itself.
        Host::UnixSocketDir(dir) => vec!["localhost".into(), dir.display().to_string()],
    };
    let port = host.port.to_string();
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter_map(fields)
        .find(|f| {
            (f[0] == "*" || names.contains(&f[0]))
                && (f[1] == "*" || f[1] == port)
                && (f[2] == "*" || f[2] == dbname)
                && (f[3] == "*" || f[3] == user)
        })
        .map(|mut f| f.swap_remove(4))
}

/// A line's five fields, unescaped; `None` for a line with fewer.
fn fields(line: &str) -> Option<Vec<String>> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => fields.last_mut()?.push(chars.next().unwrap_or('\\')),
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut()?.push(c),
        }
    }
    (fields.len() == 5).then_some(fields)
}

#[cfg(unix)]
fn private(file: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(file).is_ok_and(|m| m.permissions().mode() & 0o077 == 0)
}

#[cfg(not(unix))]
fn private(_file: &Path) -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(name: &str, port: u16) -> HostPort {
        HostPort {
            host: Host::Tcp(name.into()),
            port,
        }
    }

    #[test]
    fn first_matching_line_wins_and_stars_match_anything() {
        let text = "# comment\ndb1:5432:app:relay:first\n*:*:*:relay:second\n";
        assert_eq!(
            find(text, &tcp("db1", 5432), "app", "relay").as_deref(),
            Some("first")
        );
        assert_eq!(
            find(text, &tcp("db2", 6543), "x", "relay").as_deref(),
            Some("second")
        );
        assert_eq!(find(text, &tcp("db1", 5432), "app", "other"), None);
    }

    #[test]
    fn escaped_colons_and_backslashes_are_part_of_the_field() {
        let text = r"db:5432:app:relay:pa\:ss\\word:with:colons";
        assert_eq!(
            find(text, &tcp("db", 5432), "app", "relay").as_deref(),
            Some(r"pa:ss\word:with:colons")
        );
    }

    #[test]
    fn a_socket_connection_matches_localhost() {
        let socket = HostPort {
            host: Host::UnixSocketDir("/var/run/postgresql".into()),
            port: 5432,
        };
        let text = "localhost:5432:app:relay:secret\n";
        assert_eq!(
            find(text, &socket, "app", "relay").as_deref(),
            Some("secret")
        );
    }

    #[test]
    fn short_lines_are_skipped() {
        assert_eq!(
            find("db:5432:app\n", &tcp("db", 5432), "app", "relay"),
            None
        );
    }
}
