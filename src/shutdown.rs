//! Shutdown, as every loop sees it (the WAL relay, the polling source, the
//! inbox): a signal that turns on once and stays on. Every wait of a loop
//! goes through it, so a stop request is never slept through.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

/// A loop's view of the stop request. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// The side that asks for the stop.
#[derive(Debug)]
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }
}

/// Triggers its shutdown when dropped, however the scope ends: a
/// command's background loops (HTTP, sampler, probe, monitors) stop when
/// the command is done, after its drain, so they serve all through it.
#[derive(Debug)]
pub struct StopOnDrop(pub ShutdownTrigger);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.trigger();
    }
}

impl Shutdown {
    /// A pair: trigger it, and every clone of the `Shutdown` sees it.
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger { tx }, Shutdown { rx })
    }

    /// Turns on at SIGINT or SIGTERM.
    pub fn on_signals() -> Shutdown {
        let (trigger, shutdown) = Shutdown::new();
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
            trigger.trigger();
        });
        shutdown
    }

    /// Whether the stop was asked for.
    pub fn requested(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once the stop is asked for (at once if it was). Cancel-safe.
    pub async fn wait(&mut self) {
        // An error means the trigger is gone: no stop can come any more.
        if self.rx.wait_for(|stop| *stop).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Runs `work` unless the stop comes first (`None`).
    pub async fn unless<F: Future>(&mut self, work: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            () = self.wait() => None,
            output = work => Some(output),
        }
    }

    /// Sleeps `wait`; false if the stop came first.
    pub async fn sleep(&mut self, wait: Duration) -> bool {
        self.unless(tokio::time::sleep(wait)).await.is_some()
    }
}

/// Sleeps until `deadline`, or forever without one: a loop's optional
/// timer, beside shutdown in its `select!`.
pub async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// A loop under test, as the commands run it: on a local task of a
/// `LocalSet` (its futures hold `Rc`s), stopped through its trigger. The
/// in-process tests of the WAL relay and of the polling source share it.
#[cfg(test)]
pub(crate) mod local_loop {
    use std::fmt::Debug;
    use std::future::Future;

    use tokio::task::{JoinHandle, LocalSet};

    use super::ShutdownTrigger;

    /// Runs a test's body on a `LocalSet`, where it may start its loop
    /// with `spawn_local`.
    pub(crate) async fn run<F: Future>(body: F) -> F::Output {
        LocalSet::new().run_until(body).await
    }

    /// Asks the loop to stop and checks that it ended without an error.
    pub(crate) async fn finish<E: Debug>(stop: &ShutdownTrigger, task: JoinHandle<Result<(), E>>) {
        stop.trigger();
        task.await.unwrap().unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stop_ends_every_wait_and_stays_on() {
        let (trigger, mut shutdown) = Shutdown::new();
        let mut other = shutdown.clone();
        assert!(!shutdown.requested());
        let sleeper = tokio::spawn(async move { other.sleep(Duration::from_secs(3600)).await });
        tokio::task::yield_now().await;
        trigger.trigger();
        assert!(!sleeper.await.unwrap(), "the sleep ended early");
        assert!(shutdown.requested());
        assert_eq!(shutdown.unless(async { 1 }).await, None);
        shutdown.wait().await;
    }
}
