//! Where each setting comes from: the command line, then the environment,
//! then the config file (`--config FILE`, `WALRELAY_CONFIG`), then the
//! built-in default.
//!
//! The file is generic over the clap definitions: its keys are the flags'
//! long names (`pg-url`, `max-in-flight-events`; `kafka-options` for `-X`),
//! so a flag added to the command line is a key of the file at once. A
//! value from the file becomes the flag's default before clap parses, which
//! gives the precedence for free (clap takes the flag, then the variable,
//! then the default), and `ArgMatches::value_source` tells them apart.
//!
//! Top-level keys apply to every command that has the flag (one file
//! serves `setup`, `run` and `status`); a `[run]`, `[inbox]`, ... table
//! applies to that command only and wins over the top level.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, ArgMatches, CommandFactory, FromArgMatches, parser::ValueSource};

use super::Cli;
use crate::commands::config::{Setting, Source};

/// The environment variable naming the config file.
pub const CONFIG_ENV: &str = "WALRELAY_CONFIG";

/// Arguments that are not settings of a command.
const NOT_SETTINGS: [&str; 3] = ["help", "version", "config"];

/// The parsed command line with the file merged in, and where each
/// setting came from.
pub struct Layered {
    pub cli: Cli,
    /// The config file read, if any.
    pub file: Option<PathBuf>,
    /// The running command's settings, in definition order.
    pub settings: Vec<Setting>,
}

/// Why the command line and file could not be turned into a [`Cli`].
pub enum LayerError {
    /// clap's own error (and `--help`, `--version`): clap prints it.
    Clap(clap::Error),
    /// A bad config file: exit code 2 with this message.
    File(String),
}

/// Parses `argv` (with the program name first) merged with the config
/// file it or `WALRELAY_CONFIG` names.
pub fn parse(argv: Vec<OsString>) -> Result<Layered, LayerError> {
    let (matches, file, settings) = layered_matches(argv, false)?;
    let cli = Cli::from_arg_matches(&matches).map_err(LayerError::Clap)?;
    Ok(Layered {
        cli,
        file,
        settings,
    })
}

/// What `walrelay config` shows: the command named in `argv` and its
/// settings. A required flag left unset is shown as unset, not an error.
pub fn describe(argv: Vec<OsString>) -> Result<Described, LayerError> {
    let (matches, file, settings) = layered_matches(argv, true)?;
    let command = matches.subcommand_name().unwrap_or("run").to_owned();
    Ok(Described {
        command,
        file,
        settings,
    })
}

/// A command's effective configuration, for `walrelay config`.
pub struct Described {
    pub command: String,
    pub file: Option<PathBuf>,
    pub settings: Vec<Setting>,
}

type Parsed = (ArgMatches, Option<PathBuf>, Vec<Setting>);

fn layered_matches(argv: Vec<OsString>, optional: bool) -> Result<Parsed, LayerError> {
    let mut command = Cli::command();
    let names: Vec<String> = command
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    let (file, subcommand) = scan(&argv, &names);
    let mut from_file = BTreeSet::new();
    if let Some(path) = &file {
        let table = read_file(path)?;
        from_file = apply(&mut command, &table, subcommand.as_deref(), path)?;
    }
    if optional {
        for name in &names {
            command = command.mut_subcommand(name, |sub| {
                let ids: Vec<clap::Id> = sub.get_arguments().map(|a| a.get_id().clone()).collect();
                ids.into_iter()
                    .fold(sub, |sub, id| sub.mut_arg(id, |a| a.required(false)))
            });
        }
    }
    let matches = command
        .try_get_matches_from(argv)
        .map_err(LayerError::Clap)?;
    let settings = settings(&matches, &from_file);
    Ok((matches, file, settings))
}

/// The config file (from `--config` or the environment) and the command
/// named, read from the raw arguments: both are needed before clap runs.
/// clap parses `--config` again, so a malformed line still gets its error.
fn scan(argv: &[OsString], names: &[String]) -> (Option<PathBuf>, Option<String>) {
    let mut file = None;
    let mut subcommand = None;
    let mut args = argv.iter().skip(1);
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if text == "--" {
            break;
        } else if text == "--config" {
            file = args.next().map(PathBuf::from);
        } else if let Some(path) = text.strip_prefix("--config=") {
            file = Some(PathBuf::from(path));
        } else if subcommand.is_none() && names.iter().any(|n| *n == text) {
            subcommand = Some(text.into_owned());
        }
    }
    let file = file.or_else(|| {
        std::env::var_os(CONFIG_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    (file, subcommand)
}

fn read_file(path: &Path) -> Result<toml::Table, LayerError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        LayerError::File(format!(
            "config file {}: cannot read it: {e}; fix the path given to --config or {CONFIG_ENV}",
            path.display()
        ))
    })?;
    text.parse::<toml::Table>().map_err(|e| {
        LayerError::File(format!(
            "config file {} is not valid TOML: {e}",
            path.display()
        ))
    })
}

/// The file's key for an argument: its long name, or its id in kebab case
/// for a short-only flag (`-X` is `kafka-options`).
fn key_of(arg: &Arg) -> String {
    arg.get_long()
        .map(str::to_owned)
        .unwrap_or_else(|| arg.get_id().as_str().replace('_', "-"))
}

/// Keys are written as the flags (`pg-url`); `pg_url` is taken too.
fn normalize(key: &str) -> String {
    key.replace('_', "-")
}

/// Flags are settings; `config`'s positional command line is not.
fn settable(arg: &Arg) -> bool {
    !NOT_SETTINGS.contains(&arg.get_id().as_str()) && !arg.is_positional()
}

/// Sets the file's values as defaults of the running command's (and the
/// root's global) flags; returns the ids so set. Unknown keys are errors.
fn apply(
    command: &mut clap::Command,
    table: &toml::Table,
    subcommand: Option<&str>,
    path: &Path,
) -> Result<BTreeSet<String>, LayerError> {
    let names: Vec<String> = command
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    let mut known: BTreeSet<String> = BTreeSet::new();
    for arg in command.get_arguments().filter(|a| settable(a)) {
        known.insert(key_of(arg));
    }
    for sub in command.get_subcommands() {
        known.extend(sub.get_arguments().filter(|a| settable(a)).map(key_of));
    }

    // Top level first, then the running command's table over it.
    let mut wanted: BTreeMap<String, (String, &toml::Value)> = BTreeMap::new();
    for (key, value) in table {
        if let (true, toml::Value::Table(section)) = (names.contains(key), value) {
            let Some(sub) = command.find_subcommand(key) else {
                continue;
            };
            let own: BTreeSet<String> = sub
                .get_arguments()
                .chain(command.get_arguments())
                .filter(|a| settable(a))
                .map(key_of)
                .collect();
            for inner in section.keys() {
                if !own.contains(&normalize(inner)) {
                    return Err(unknown(path, &format!("[{key}] {inner}"), inner, &own));
                }
            }
            continue;
        }
        if normalize(key) == "config" {
            return Err(LayerError::File(format!(
                "config file {}: key `config`: a config file cannot name another; give one with --config or {CONFIG_ENV}",
                path.display()
            )));
        }
        if !known.contains(&normalize(key)) {
            let mut candidates = known.clone();
            // Command tables are keys too; `config` has no settings.
            candidates.extend(names.iter().filter(|n| *n != "config").cloned());
            return Err(unknown(path, key, key, &candidates));
        }
        wanted.insert(normalize(key), (key.clone(), value));
    }
    if let Some(toml::Value::Table(section)) = subcommand.and_then(|s| table.get(s)) {
        for (key, value) in section {
            wanted.insert(
                normalize(key),
                (format!("[{}] {key}", subcommand.unwrap_or_default()), value),
            );
        }
    }

    let mut set = BTreeSet::new();
    let root_args: Vec<Arg> = command.get_arguments().cloned().collect();
    for arg in root_args.iter().filter(|a| settable(a)) {
        if let Some((shown, value)) = wanted.get(&key_of(arg)) {
            let values = values_of(arg, value, shown, path)?;
            let id = arg.get_id().clone();
            *command = std::mem::take(command).mut_arg(id.clone(), |a| with_default(a, values));
            set.insert(id.to_string());
        }
    }
    let Some(name) = subcommand.filter(|s| names.iter().any(|n| n == s)) else {
        return Ok(set);
    };
    let sub_args: Vec<Arg> = command
        .find_subcommand(name)
        .map(|s| s.get_arguments().cloned().collect())
        .unwrap_or_default();
    for arg in sub_args.iter().filter(|a| settable(a)) {
        if let Some((shown, value)) = wanted.get(&key_of(arg)) {
            let values = values_of(arg, value, shown, path)?;
            let id = arg.get_id().clone();
            *command = std::mem::take(command).mut_subcommand(name, |sub| {
                sub.mut_arg(id.clone(), |a| with_default(a, values))
            });
            set.insert(id.to_string());
        }
    }
    Ok(set)
}

/// The argument with the file's values as its default. A required flag
/// the file gives is no longer required; a value from the file is one
/// value, whole (a `-X sasl.jaas.config=...;` keeps its semicolon).
fn with_default(arg: Arg, values: Vec<String>) -> Arg {
    let env_set = arg.get_env().and_then(std::env::var_os).is_some();
    let arg = arg.required(false).default_values(values);
    if env_set {
        arg
    } else {
        arg.value_delimiter(None)
    }
}

/// The file's value for one flag as the strings clap would get, checked
/// by the flag's own parser so a bad value names the file and the key.
fn values_of(
    arg: &Arg,
    value: &toml::Value,
    shown: &str,
    path: &Path,
) -> Result<Vec<String>, LayerError> {
    let bad = |why: String| {
        LayerError::File(format!(
            "config file {}: key `{shown}`: {why}",
            path.display()
        ))
    };
    let many = takes_many(arg);
    let values: Vec<String> = match value {
        toml::Value::Array(items) if many => items
            .iter()
            .map(|item| {
                scalar(item)
                    .ok_or_else(|| bad(format!("a list holds a {}, not a value", item.type_str())))
            })
            .collect::<Result<_, _>>()?,
        toml::Value::Array(_) => {
            return Err(bad("takes one value, not a list".into()));
        }
        // `-X` as a table: `[kafka-options]` "linger.ms" = 10.
        toml::Value::Table(options) if many => options
            .iter()
            .map(|(k, v)| {
                scalar(v)
                    .map(|v| format!("{k}={v}"))
                    .ok_or_else(|| bad(format!("{k}: a {} is not a value", v.type_str())))
            })
            .collect::<Result<_, _>>()?,
        other => {
            let text = scalar(other).ok_or_else(|| {
                bad(format!(
                    "a {} is not a value this key takes",
                    other.type_str()
                ))
            })?;
            match arg.get_value_delimiter() {
                Some(d) if many => text.split(d).map(str::to_owned).collect(),
                _ => vec![text],
            }
        }
    };
    if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
        return match values.as_slice() {
            [v] if v == "true" || v == "false" => Ok(values),
            _ => Err(bad("expected true or false".into())),
        };
    }
    // The flag's own parser, on a command of that flag alone.
    let probe = clap::Command::new("walrelay")
        .no_binary_name(true)
        .disable_help_flag(true)
        .arg(
            arg.clone()
                .required(false)
                .global(false)
                .value_delimiter(None),
        );
    let flag = match arg.get_long() {
        Some(long) => format!("--{long}"),
        None => format!("-{}", arg.get_short().unwrap_or('X')),
    };
    for value in &values {
        if let Err(e) = probe
            .clone()
            .try_get_matches_from([format!("{flag}={value}")])
        {
            // clap's message without its usage lines, which are about
            // the command line, not the file.
            let text = e.to_string();
            let text: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("Usage") && !l.starts_with("For more"))
                .collect();
            let text = text.join(" ");
            return Err(bad(text
                .strip_prefix("error: ")
                .unwrap_or(&text)
                .to_owned()));
        }
    }
    Ok(values)
}

fn takes_many(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::Append)
        || arg.get_value_delimiter().is_some()
        || arg.get_num_args().is_some_and(|n| n.max_values() > 1)
}

fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Datetime(d) => Some(d.to_string()),
        _ => None,
    }
}

fn unknown(path: &Path, shown: &str, key: &str, candidates: &BTreeSet<String>) -> LayerError {
    let key = normalize(key);
    // Only a near miss is worth suggesting.
    let nearest = candidates
        .iter()
        .map(|c| (edit_distance(&key, c), c))
        .min()
        .filter(|(distance, _)| *distance <= (key.len() / 3).max(2))
        .map(|(_, c)| format!("; did you mean `{c}`?"))
        .unwrap_or_default();
    LayerError::File(format!(
        "config file {}: unknown key `{shown}`{nearest} (keys are the flags' long names, see walrelay help)",
        path.display()
    ))
}

/// Levenshtein distance, for the nearest valid key.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(previous + 1);
        }
    }
    row[b.len()]
}

/// The running command's settings (and the root's), with their sources.
fn settings(matches: &ArgMatches, from_file: &BTreeSet<String>) -> Vec<Setting> {
    let command = Cli::command();
    let mut out = Vec::new();
    let mut collect = |args: Vec<&Arg>, matches: &ArgMatches| {
        for arg in args.into_iter().filter(|a| settable(a)) {
            let id = arg.get_id().as_str();
            let values: Vec<String> = matches
                .get_raw(id)
                .map(|raw| raw.map(|v| v.to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            let source = match matches.value_source(id) {
                Some(ValueSource::CommandLine) => Source::Flag,
                Some(ValueSource::EnvVariable) => Source::Env,
                Some(ValueSource::DefaultValue) if from_file.contains(id) => Source::File,
                _ => Source::Default,
            };
            out.push(Setting {
                key: key_of(arg),
                values,
                many: takes_many(arg),
                switch: matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse),
                source,
                env: arg.get_env().map(|e| e.to_string_lossy().into_owned()),
            });
        }
    };
    collect(command.get_arguments().collect(), matches);
    if let Some((name, sub_matches)) = matches.subcommand() {
        if let Some(sub) = command.find_subcommand(name) {
            collect(sub.get_arguments().collect(), sub_matches);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_single_character_edits() {
        assert_eq!(edit_distance("slot", "slot"), 0);
        assert_eq!(edit_distance("slott", "slot"), 1);
        assert_eq!(edit_distance("pg-ulr", "pg-url"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn scan_finds_the_file_and_the_command() {
        let argv = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let names = ["run".to_owned(), "status".to_owned()];
        let (file, sub) = scan(
            &argv(&[
                "walrelay",
                "--log-format",
                "json",
                "--config",
                "a.toml",
                "run",
            ]),
            &names,
        );
        assert_eq!(file, Some(PathBuf::from("a.toml")));
        assert_eq!(sub.as_deref(), Some("run"));
        let (file, sub) = scan(&argv(&["walrelay", "status", "--config=b.toml"]), &names);
        assert_eq!(file, Some(PathBuf::from("b.toml")));
        assert_eq!(sub.as_deref(), Some("status"));
    }
}
