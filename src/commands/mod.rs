//! The bodies of walrelay's commands; `cli.rs` parses flags and calls them.

pub mod check;
pub mod check_failover;
pub mod inbox;
pub mod run;
pub mod setup;
pub mod status;
pub mod tail;

use tokio::sync::watch;

/// A receiver that turns true on SIGINT or SIGTERM.
pub fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
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
