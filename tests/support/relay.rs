//! The walrelay binary as a child process: started, signalled and killed
//! the way an operator or a crash would.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

pub struct RelayProcess {
    pub child: Child,
    pub http_port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl RelayProcess {
    /// Starts `walrelay run` with `args` after the standard connection flags.
    pub fn start(pg_url: &str, brokers: &str, args: &[&str]) -> Self {
        Self::start_command("run", pg_url, brokers, args)
    }

    /// Starts `walrelay inbox` with `args` after the standard connection
    /// flags.
    pub fn start_inbox(pg_url: &str, brokers: &str, args: &[&str]) -> Self {
        Self::start_command("inbox", pg_url, brokers, args)
    }

    /// Starts `walrelay <command>` (`backfill`, `recover`, ...) with `args`
    /// after the standard connection flags.
    pub fn start_command(command: &str, pg_url: &str, brokers: &str, args: &[&str]) -> Self {
        let http_port = super::free_port();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("relay.log");
        let file = std::fs::File::create(&log).unwrap();
        let status_interval: &[&str] = if command != "run" || args.contains(&"--status-interval") {
            &[]
        } else {
            &["--status-interval", "200ms"]
        };
        let child = Command::new(env!("CARGO_BIN_EXE_walrelay"))
            .arg(command)
            .args([
                "--pg-url",
                pg_url,
                "--brokers",
                brokers,
                "--http-addr",
                &format!("127.0.0.1:{http_port}"),
            ])
            .args(status_interval)
            .args(args)
            .env(
                "WALRELAY_LOG",
                std::env::var("WALRELAY_TEST_LOG").unwrap_or_else(|_| "info,walrelay=debug".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        RelayProcess {
            child,
            http_port,
            log,
            _dir: dir,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: the crash case.
    pub async fn kill9(&mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }

    /// SIGTERM, then the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running");
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .expect("relay did not stop in time")
            .unwrap()
    }

    /// Waits for the process to exit by itself.
    pub async fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("relay did not exit; log:\n{}", self.log()))
            .unwrap()
    }

    /// GET a path of the relay's HTTP server.
    pub async fn http_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.http_port, path).await
    }

    /// A metric from /metrics, summed over its label sets (see
    /// [`metric_in`]); `None` while the server does not answer or does not
    /// export it.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let (_, text) = self.http_get("/metrics").await?;
        metric_in(&text, name)
    }
}

impl Drop for RelayProcess {
    /// A failing test shows the end of the log of every relay still running.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            // WALRELAY_TEST_KEEP_LOGS=DIR keeps a failing run's whole log.
            if let Ok(dir) = std::env::var("WALRELAY_TEST_KEEP_LOGS") {
                let path = std::path::Path::new(&dir).join(format!("relay-{}.log", self.http_port));
                let _ = std::fs::write(&path, &log);
                eprintln!("--- the whole log: {}", path.display());
            }
            let tail: Vec<&str> = log.lines().rev().take(150).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!(
                "--- the last lines of the log of the relay on http port {}:\n{}",
                self.http_port,
                tail.join("\n")
            );
        }
    }
}

/// `name` in Prometheus text, summed over its label sets (or one label
/// set's value, when `name` spells it out: `name{label="value"}`).
pub fn metric_in(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix(name))
        .filter(|rest| rest.starts_with([' ', '{']))
        .filter_map(|rest| rest.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// A plain HTTP/1.1 GET on 127.0.0.1: status and body.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status: u16 = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Some((status, body))
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}
