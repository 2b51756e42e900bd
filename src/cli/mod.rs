//! The command line: clap definitions, validation, and dispatch to the
//! subcommands. Every option also reads an environment variable.

mod args;
pub mod layers;
mod replay_args;
mod run_args;
mod values;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use layers::Layered;

pub use args::{
    CheckArgs, CheckKafkaArgs, InboxArgs, OutboxArgs, PgArgs, SetupArgs, SourceKind, StatusArgs,
    TailArgs, inbox_tables,
};
pub use replay_args::{BackfillArgs, RecoverArgs};
pub use run_args::RunArgs;
pub use values::{parse_duration, parse_retention, parse_size};

use crate::commands;
use crate::sql;

/// Streams transactional-outbox events from PostgreSQL to Kafka through
/// logical replication.
#[derive(Debug, Parser)]
#[command(name = "walrelay", version, about)]
pub struct Cli {
    /// A TOML file of settings whose keys are the flags' long names
    /// (pg-url = "...", [run] max-in-flight-events = 10000). Flags win
    /// over environment variables, which win over the file.
    #[arg(long, global = true, env = layers::CONFIG_ENV, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// Log lines as text, or as JSON objects (one per line) for a log
    /// collector. WALRELAY_LOG picks what is logged (default info; such as
    /// walrelay=debug,rdkafka=warn).
    #[arg(
        long,
        global = true,
        env = "WALRELAY_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written to standard error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (tracing-subscriber's json format).
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream outbox events to Kafka until stopped (SIGINT/SIGTERM: stop
    /// reading, drain in-flight events, confirm, exit 0).
    Run(Box<RunArgs>),
    /// Create the outbox table, the publication and the slot if missing.
    Setup(Box<SetupArgs>),
    /// Preflight: wal_level, free slots and senders, REPLICATION, publication
    /// and table shape; with --brokers, the replication of the topics
    /// walrelay writes. Each finding names its fix. Exit code 1 when a
    /// check fails (warnings do not).
    Check(Box<CheckArgs>),
    /// Replication slots: active pid, confirmed and restart LSN, lag and
    /// retained WAL, wal_status.
    Status(StatusArgs),
    /// Print every decoded change of a publication as JSON lines, from a
    /// temporary slot that disappears on exit (Ctrl-C to stop).
    Tail(TailArgs),
    /// Consume Kafka topics into an inbox table, each event once (by its
    /// id header); offsets kept in PostgreSQL with the rows. Create the
    /// tables with `walrelay setup --inbox`.
    Inbox(Box<InboxArgs>),
    /// Send outbox rows again as the stream's records: all, a time range
    /// (--since/--until) or a --where predicate, to the usual topics or a
    /// --topic-template of their own. Resumable under its --name.
    Backfill(Box<BackfillArgs>),
    /// After the slot was lost (wal_status 'lost'): make it again and
    /// publish, from the outbox table, every event not in Kafka; then
    /// `run` streams on from the new slot. Stops if rows are gone, unless
    /// --accept-loss.
    Recover(Box<RecoverArgs>),
    /// Print the effective configuration of a command, each value with its
    /// source (flag, env, file or default), secrets masked; the output is a
    /// valid config file. `walrelay config run --slot s` shows what
    /// `walrelay run --slot s` would use (default: run).
    Config(ConfigArgs),
}

#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// The command and flags to show the configuration of, such as `run` or
    /// `inbox --topic orders`.
    #[arg(
        value_name = "COMMAND [FLAGS]",
        trailing_var_arg = true,
        allow_hyphen_values = true,
        num_args = 0..
    )]
    pub command_line: Vec<std::ffi::OsString>,
}

/// A bad flag or environment value: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Parses the command line, runs the command and maps the outcome to an
/// exit code: 0 success, 1 failure, 2 bad configuration.
pub fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let layered = match layers::parse(argv) {
        Ok(layered) => layered,
        Err(error) => return layer_error(error),
    };
    if let Command::Config(args) = &layered.cli.command {
        return print_config(&layered, args);
    }
    let cli = layered.cli;
    init_tracing(cli.log_format);
    // One thread: the relay is one loop, and a single-threaded runtime
    // saves the cross-thread wakeups that dominated its CPU profile.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("walrelay: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(dispatch(cli));
    // A librdkafka call still blocking a thread (a transaction's commit or
    // takeover while the broker is away) must not keep the process from
    // exiting: what it left open is fenced by the next holder.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(code) => code,
        Err(err) => {
            if let Some(usage) = err.downcast_ref::<UsageError>() {
                eprintln!("walrelay: {usage}");
                return ExitCode::from(2);
            }
            eprintln!("walrelay: {err:#}");
            ExitCode::from(1)
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) if args.poll.source == SourceKind::Poll => {
            // --retain is refused here, with the reason.
            args.retention_config()?;
            let kafka = args.sink_settings()?;
            let poll = args.poll_config()?;
            let listener = commands::run::listen(&args.http.http_addr)
                .await
                .map_err(UsageError)?;
            commands::run::run_poll(poll, kafka, listener, args.stream.status_interval).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            let kafka = args.sink_settings()?;
            let relay = args.relay_config()?;
            let retention = args.retention_config()?;
            let listener = commands::run::listen(&args.http.http_addr)
                .await
                .map_err(UsageError)?;
            commands::run::run(commands::run::RunOptions {
                relay,
                kafka,
                listener,
                create_slot: args.stream.create_slot,
                heartbeat_interval: args.stream.heartbeat_interval,
                retention,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Setup(args) if args.inbox.is_some() => {
            let config = args.pg.connection_config()?;
            let tables = inbox_tables(args.inbox.as_deref().unwrap_or_default(), "--inbox")?;
            let mut client = sql::connect(&config).await?;
            for line in crate::inbox::schema::setup(&mut client, &tables).await? {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(args) if args.setup.inbox.is_some() => {
            let args = &args.setup;
            let config = args.pg.connection_config()?;
            let tables = inbox_tables(args.inbox.as_deref().unwrap_or_default(), "--inbox")?;
            let client = sql::connect(&config).await?;
            let missing = crate::inbox::schema::missing_pieces(&client, &tables).await?;
            for line in &missing {
                println!("FAIL  {line}");
            }
            if missing.is_empty() {
                println!(
                    "ok    inbox tables {0}, {0}_offsets and {0}_dead_letters are set up",
                    tables.name()
                );
                return Ok(ExitCode::SUCCESS);
            }
            Ok(ExitCode::from(1))
        }
        Command::Inbox(args) => {
            let config = args.inbox_config()?;
            let listener = commands::run::listen(&args.http.http_addr)
                .await
                .map_err(UsageError)?;
            commands::inbox::run(config, listener).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Setup(args) => {
            let config = args.pg.connection_config()?;
            let options = args.options()?;
            let mut client = sql::connect(&config).await?;
            if options.poll {
                for line in commands::setup::setup_poll(&mut client, &options).await? {
                    println!("{line}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            for line in commands::setup::setup(&client, &config, &options).await? {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(check) => {
            let args = &check.setup;
            let config = args.pg.connection_config()?;
            let kafka = check.kafka.options(&args.outbox.tables()?)?;
            let options = args.options()?;
            // With several hosts, the checks of the outbox run on the primary,
            // unless the URL asks for the standby the relay decodes from.
            let mut primary = config.clone();
            let decodes_on_standby = matches!(
                config.target_session_attrs,
                crate::postgres::TargetSessionAttrs::Standby
                    | crate::postgres::TargetSessionAttrs::PreferStandby
            );
            if primary.hosts.len() > 1 && !decodes_on_standby {
                primary.target_session_attrs = crate::postgres::TargetSessionAttrs::Primary;
            }
            let client = sql::connect(&primary).await?;
            let mut findings = commands::check::check(&client, &config, &options).await?;
            findings.extend(commands::check_kafka::check(kafka.as_ref()).await);
            let failed = commands::check::print(&findings);
            Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Status(args) => {
            let config = args.pg.connection_config()?;
            let client = sql::connect(&config).await?;
            commands::status::run(&client, args.slot.as_deref(), args.json, args.watch).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Backfill(args) => {
            let options = args.options()?;
            let listener = commands::run::listen(&args.run.http.http_addr)
                .await
                .map_err(UsageError)?;
            commands::replay::backfill(options, listener).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Recover(args) => {
            let options = args.options()?;
            let listener = commands::run::listen(&args.run.http.http_addr)
                .await
                .map_err(UsageError)?;
            commands::replay::recover(options, listener).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(_) => Ok(ExitCode::SUCCESS),
        Command::Tail(args) => {
            let config = args.pg.connection_config()?;
            let options = commands::tail::TailOptions {
                publications: args.publications,
                proto_version: args.proto_version,
            };
            let shutdown = crate::shutdown::Shutdown::on_signals();
            let mut stdout = std::io::stdout();
            commands::tail::tail(&config, &options, &mut stdout, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn layer_error(error: layers::LayerError) -> ExitCode {
    match error {
        // --help and --version exit 0, a bad flag 2.
        layers::LayerError::Clap(e) => e.exit(),
        layers::LayerError::File(message) => {
            eprintln!("walrelay: {message}");
            ExitCode::from(2)
        }
    }
}

/// `walrelay config [COMMAND [FLAGS]]`: the same parse as the command
/// would get, printed instead of run.
fn print_config(outer: &layers::Layered, args: &ConfigArgs) -> ExitCode {
    let mut argv: Vec<std::ffi::OsString> = vec!["walrelay".into()];
    if let Some(file) = &outer.file {
        argv.extend(["--config".into(), file.clone().into_os_string()]);
    }
    if args.command_line.is_empty() {
        argv.push("run".into());
    }
    argv.extend(args.command_line.iter().cloned());
    let inner = match layers::describe(argv) {
        Ok(inner) => inner,
        Err(error) => return layer_error(error),
    };
    if inner.command == "config" {
        eprintln!(
            "walrelay: config shows another command's configuration, such as `walrelay config run`"
        );
        return ExitCode::from(2);
    }
    print!(
        "{}",
        commands::config::render(&inner.command, inner.file.as_deref(), &inner.settings)
    );
    ExitCode::SUCCESS
}

/// Logs to standard error; WALRELAY_LOG is an EnvFilter (default info).
fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WALRELAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every flag of every command says what it does in `--help`.
    #[test]
    fn every_argument_of_every_command_has_help_text() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{path} {} (the command)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut command = Cli::command();
        command.build();
        let mut missing = Vec::new();
        walk(&command, "walrelay", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
    }

    #[test]
    fn the_command_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
