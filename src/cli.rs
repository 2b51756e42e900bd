//! The command line: clap definitions, validation, and dispatch to the
//! subcommands. Every option also reads an environment variable.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tokio::sync::watch;

use crate::replication::ConnectionConfig;
use crate::replication::config::redact_url;

/// Streams transactional-outbox events from PostgreSQL to Kafka through
/// logical replication.
#[derive(Debug, Parser)]
#[command(name = "walrelay", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print every decoded change of a publication as JSON lines, from a
    /// temporary slot that disappears on exit (Ctrl-C to stop).
    Tail(TailArgs),
}

/// How to reach PostgreSQL.
#[derive(Debug, Clone, Args)]
pub struct PgArgs {
    /// PostgreSQL URL: postgres://user:password@host:port/db?sslmode=disable.
    /// A Unix socket directory goes in ?host=/var/run/postgresql.
    #[arg(long, env = "WALRELAY_PG_URL", hide_env_values = true)]
    pub pg_url: String,
}

impl PgArgs {
    /// The parsed URL, or a configuration error naming the flag.
    pub fn connection_config(&self) -> Result<ConnectionConfig, UsageError> {
        ConnectionConfig::from_url(&self.pg_url).map_err(|e| UsageError(format!("--pg-url {}: {e}", redact_url(&self.pg_url))))
    }
}

#[derive(Debug, Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub pg: PgArgs,
    /// Publication(s) to stream; repeat the flag for several.
    #[arg(long = "publication", env = "WALRELAY_PUBLICATION", default_value = "walrelay", value_delimiter = ',')]
    pub publications: Vec<String>,
    /// pgoutput protocol version (1-4); default: the highest the server speaks.
    #[arg(long, env = "WALRELAY_PROTO_VERSION", value_parser = clap::value_parser!(u32).range(1..=4))]
    pub proto_version: Option<u32>,
}

/// A bad flag or environment value: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Parses the command line, runs the command and maps the outcome to an
/// exit code: 0 success, 1 failure, 2 bad configuration.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("walrelay: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli)) {
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
        Command::Tail(args) => {
            let config = args.pg.connection_config()?;
            let options = crate::tail::TailOptions {
                publications: args.publications,
                proto_version: args.proto_version,
            };
            let shutdown = shutdown_signal();
            let mut stdout = std::io::stdout();
            crate::tail::tail(&config, &options, &mut stdout, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A receiver that turns true on SIGINT or SIGTERM.
pub fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let term_recv = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term_recv => {}
        }
        tracing::info!("shutdown requested");
        let _ = tx.send(true);
    });
    rx
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WALRELAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
