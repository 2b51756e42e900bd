//! The shared integration-test harness: real servers on free ports, removed
//! on drop.
//!
//! `PgCluster` runs a throwaway PostgreSQL (initdb in a temp dir,
//! wal_level=logical, a free port). PostgreSQL refuses to run as root, so
//! when the tests run as root the server runs as the `postgres` user.

#![allow(dead_code)]

pub mod kafka;
pub mod proxy;
pub mod relay;
pub mod workload;

use std::net::TcpListener;
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A free TCP port on 127.0.0.1 (bound then released), below the kernel's
/// ephemeral range as scripts/free-ports picks them: a port bind(0) hands
/// out is as likely to be taken a moment later by some client's outgoing
/// connection, before the server meant for it binds it.
/// A port is handed out once per test process: tests run in parallel, and
/// two of them could otherwise draw the same port before either binds it.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = rand::random_range(10_000..32_768);
        let mut handed_out = HANDED_OUT.lock().unwrap();
        if handed_out.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.push(port);
            return port;
        }
    }
}

/// A name unique within this test process, for databases, slots and topics.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The PostgreSQL major version the tests run against:
/// `WALRELAY_TEST_PG` (14 to 18), default 15 (Debian's).
pub fn pg_major() -> u32 {
    std::env::var("WALRELAY_TEST_PG")
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.parse().unwrap_or_else(|_| {
                panic!("WALRELAY_TEST_PG={v:?}: expected a major version, such as 17")
            })
        })
        .unwrap_or(15)
}

/// Where the server binaries of `major` are: `WALRELAY_PG_BINDIR`, else
/// Debian's `/usr/lib/postgresql/MAJOR/bin`, else what
/// `scripts/fetch-postgres MAJOR` installed under `/opt/walrelay/postgres`.
pub fn pg_bindir_of(major: u32) -> PathBuf {
    if let Ok(dir) = std::env::var("WALRELAY_PG_BINDIR") {
        return dir.into();
    }
    let debian = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
    if debian.join("initdb").exists() {
        return debian;
    }
    let root =
        std::env::var("WALRELAY_PG_ROOT").unwrap_or_else(|_| "/opt/walrelay/postgres".into());
    let fetched = PathBuf::from(root).join(major.to_string()).join("bin");
    assert!(
        fetched.join("initdb").exists(),
        "PostgreSQL {major} server binaries not found: run scripts/fetch-postgres {major} (scripts/install-deps does), or set WALRELAY_PG_BINDIR"
    );
    fetched
}

/// The server binaries of the version under test.
pub fn pg_bindir() -> PathBuf {
    pg_bindir_of(pg_major())
}

/// `psql`: beside the server when it has one, else Debian's client (it
/// talks to every supported server).
pub fn psql_binary(bindir: &Path) -> PathBuf {
    let beside = bindir.join("psql");
    if beside.exists() {
        return beside;
    }
    ["/usr/lib/postgresql/15/bin/psql", "/usr/bin/psql"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("psql not found: install Debian's postgresql-client")
}

/// The `postgres` user's uid and gid, when we are root and must drop to it.
fn server_user() -> Option<(u32, u32)> {
    // SAFETY-free check: /proc/self/status carries the effective uid.
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let euid: u32 = status
        .lines()
        .find(|l| l.starts_with("Uid:"))?
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()?;
    if euid != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("tests run as root need a `postgres` user to run the server (install Debian's postgresql package)");
    let fields: Vec<&str> = line.split(':').collect();
    Some((fields[2].parse().unwrap(), fields[3].parse().unwrap()))
}

/// Settings a test may change before the cluster starts.
#[derive(Clone, Debug)]
pub struct PgOptions {
    pub wal_level: &'static str,
    pub wal_sender_timeout: &'static str,
    pub extra_conf: Vec<String>,
    /// Server certificate and key (PEM): the cluster starts with ssl = on.
    pub tls: Option<(String, String)>,
    /// A CA (PEM) whose client certificates the server accepts (ssl_ca_file).
    pub client_ca: Option<String>,
    /// pg_hba.conf lines placed before the harness's own.
    pub hba_first: Vec<String>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            wal_level: "logical",
            wal_sender_timeout: "60s",
            extra_conf: Vec::new(),
            tls: None,
            client_ca: None,
            hba_first: Vec::new(),
        }
    }
}

/// A running throwaway PostgreSQL cluster.
pub struct PgCluster {
    pub port: u16,
    pub dir: TempDir,
    /// The server's major version.
    pub major: u32,
    bindir: PathBuf,
    user: Option<(u32, u32)>,
}

impl PgCluster {
    pub fn start() -> Self {
        Self::start_with(PgOptions::default())
    }

    pub fn start_with(options: PgOptions) -> Self {
        Self::start_version(pg_major(), options)
    }

    /// A cluster of PostgreSQL `major`, whatever WALRELAY_TEST_PG says.
    pub fn start_version(major: u32, options: PgOptions) -> Self {
        let bindir = pg_bindir_of(major);
        let user = server_user();
        let dir = tempfile::Builder::new()
            .prefix("walrelay-pg-")
            .tempdir()
            .unwrap();
        if let Some((uid, gid)) = user {
            chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let cluster = PgCluster {
            port: free_port(),
            dir,
            major,
            bindir,
            user,
        };
        cluster.run(
            "initdb",
            &[
                "-D",
                cluster.data_dir().to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ],
        );
        let mut conf = vec![
            format!("port = {}", cluster.port),
            "listen_addresses = '127.0.0.1'".into(),
            format!(
                "unix_socket_directories = '{}'",
                cluster.dir.path().display()
            ),
            format!("wal_level = {}", options.wal_level),
            "max_replication_slots = 32".into(),
            "max_wal_senders = 32".into(),
            "max_connections = 100".into(),
            "fsync = off".into(),
            "full_page_writes = off".into(),
            "shared_buffers = 64MB".into(),
            format!("wal_sender_timeout = '{}'", options.wal_sender_timeout),
            "logical_decoding_work_mem = '64MB'".into(),
        ];
        conf.extend(options.extra_conf.iter().cloned());
        if let Some((cert, key)) = &options.tls {
            for (name, pem) in [("server.crt", cert), ("server.key", key)] {
                let path = cluster.data_dir().join(name);
                std::fs::write(&path, pem).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
                if let Some((uid, gid)) = cluster.user {
                    chown(&path, Some(uid), Some(gid)).unwrap();
                }
            }
            if let Some(ca) = &options.client_ca {
                let path = cluster.data_dir().join("client-ca.crt");
                std::fs::write(&path, ca).unwrap();
                if let Some((uid, gid)) = cluster.user {
                    chown(&path, Some(uid), Some(gid)).unwrap();
                }
                conf.push("ssl_ca_file = 'client-ca.crt'".into());
            }
            conf.push("ssl = on".into());
            conf.push("ssl_cert_file = 'server.crt'".into());
            conf.push("ssl_key_file = 'server.key'".into());
        }
        append(
            &cluster.data_dir().join("postgresql.conf"),
            &conf.join("\n"),
        );
        // The superuser may connect without a password; every other role
        // authenticates with the method its password was stored with.
        let hba = "\
local all all trust
local replication all trust
host all postgres 127.0.0.1/32 trust
host replication postgres 127.0.0.1/32 trust
host all +walrelay_cleartext 127.0.0.1/32 password
host replication +walrelay_cleartext 127.0.0.1/32 password
host all all 127.0.0.1/32 md5
host replication all 127.0.0.1/32 md5
";
        let hba = format!("{}\n{hba}", options.hba_first.join("\n"));
        std::fs::write(cluster.data_dir().join("pg_hba.conf"), hba).unwrap();
        let mut cluster = cluster;
        // Another process may take the port between free_port and the
        // server's bind: start again on a new one.
        for _ in 0..5 {
            match cluster.try_pg_ctl_start() {
                Ok(()) => return cluster,
                Err(e) if e.contains("Address already in use") => {
                    let _ = std::fs::remove_file(cluster.log_file());
                    cluster.port = free_port();
                    append(
                        &cluster.data_dir().join("postgresql.conf"),
                        &format!("port = {}", cluster.port),
                    );
                }
                Err(e) => panic!("{e}"),
            }
        }
        cluster.pg_ctl_start();
        cluster
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn run(&self, program: &str, args: &[&str]) {
        if let Err(e) = self.try_run(program, args) {
            panic!("{e}");
        }
    }

    fn try_run(&self, program: &str, args: &[&str]) -> Result<(), String> {
        let mut cmd = Command::new(self.bindir.join(program));
        cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "{program} failed: {}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.log_file()).unwrap_or_default()
        ))
    }

    fn pg_ctl_start(&self) {
        if let Err(e) = self.try_pg_ctl_start() {
            panic!("{e}");
        }
    }

    fn try_pg_ctl_start(&self) -> Result<(), String> {
        let data = self.data_dir();
        let log = self.log_file();
        self.try_run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
    }

    /// Stops the server (fast shutdown) and starts it again on the same port.
    pub fn restart(&self) {
        self.stop("fast");
        self.pg_ctl_start();
    }

    /// Starts the server again after `stop`.
    pub fn start_again(&self) {
        self.pg_ctl_start();
    }

    /// A physical standby of this cluster, streaming through the physical
    /// slot `slot` with hot_standby_feedback on, and keeping copies of its
    /// failover slots (PostgreSQL 17+'s sync_replication_slots). Made without pg_basebackup: the
    /// primary stops, its data directory is copied (without its slots),
    /// and both start again.
    pub fn standby(&self, slot: &str, db: &str) -> PgCluster {
        let dir = tempfile::Builder::new()
            .prefix("walrelay-standby-")
            .tempdir()
            .unwrap();
        if let Some((uid, gid)) = self.user {
            chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let standby = PgCluster {
            port: free_port(),
            dir,
            major: self.major,
            bindir: self.bindir.clone(),
            user: self.user,
        };
        self.stop("fast");
        let status = Command::new("cp")
            .args(["-a"])
            .arg(self.data_dir())
            .arg(standby.data_dir())
            .status()
            .unwrap();
        assert!(status.success(), "copy the data directory");
        // The primary's slots are its own: the standby gets copies of the
        // failover slots from the slot sync worker.
        for entry in std::fs::read_dir(standby.data_dir().join("pg_replslot")).unwrap() {
            std::fs::remove_dir_all(entry.unwrap().path()).unwrap();
        }
        let mut conf = vec![
            format!("port = {}", standby.port),
            format!(
                "unix_socket_directories = '{}'",
                standby.dir.path().display()
            ),
            format!(
                "primary_conninfo = 'host=127.0.0.1 port={} user=postgres dbname={db}'",
                self.port
            ),
            format!("primary_slot_name = '{slot}'"),
            "hot_standby_feedback = on".into(),
        ];
        // Slot synchronization came with PostgreSQL 17; 16 refuses to
        // start with a setting it does not know.
        if self.major >= 17 {
            conf.push("sync_replication_slots = on".into());
        }
        append(
            &standby.data_dir().join("postgresql.conf"),
            &conf.join("\n"),
        );
        std::fs::write(standby.data_dir().join("standby.signal"), "").unwrap();
        if let Some((uid, gid)) = self.user {
            let status = Command::new("chown")
                .args(["-R", &format!("{uid}:{gid}")])
                .arg(standby.dir.path())
                .status()
                .unwrap();
            assert!(status.success());
        }
        self.pg_ctl_start();
        standby.pg_ctl_start();
        standby
    }

    /// Promotes a standby to primary.
    pub fn promote(&self) {
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-w", "-t", "60", "promote"],
        );
    }

    /// Stops the server; `mode` is smart, fast or immediate.
    pub fn stop(&self, mode: &str) {
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-m", mode, "-w", "stop"],
        );
    }

    /// A URL for `role` on `db` over TCP.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    pub fn url_as(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// A connected tokio-postgres client to `db` as the superuser.
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(db), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to {db}: {e}"));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// Creates a fresh database and returns its name.
    pub async fn create_database(&self, prefix: &str) -> String {
        let name = unique_name(prefix);
        self.client("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        name
    }

    /// Runs `psql -c` as the superuser (for statements like ALTER SYSTEM).
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(psql_binary(&self.bindir))
            .args([
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &self.url(db),
                "-c",
                sql,
            ])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// The server log so far, for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.data_dir();
        let mut cmd = Command::new(self.bindir.join("pg_ctl"));
        cmd.args([
            "-D",
            data.to_str().unwrap(),
            "-m",
            "immediate",
            "-w",
            "stop",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        let _ = cmd.status();
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    writeln!(f, "\n{text}").unwrap();
}

/// Polls `check` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What most end-to-end tests start from: a PostgreSQL cluster, a broker
/// (the process's shared one unless the options ask for a private one), a
/// namespace for the test's topics, a fresh database with the outbox set
/// up (`walrelay setup`), and a superuser client on it.
pub struct Stack {
    pub pg: PgCluster,
    pub broker: BrokerRef,
    pub topics: kafka::Topics,
    pub db: String,
    pub client: tokio_postgres::Client,
}

/// Which broker a [`Stack`] uses.
#[derive(Clone, Copy, Debug, Default)]
pub enum BrokerChoice {
    /// The test process's shared broker: nothing may stop, pause or kill it.
    #[default]
    Shared,
    /// A single-node broker of the test's own, to stop or crash.
    Private,
    /// A single-node broker of the test's own, to pause (see
    /// `kafka::Broker::start_pausable`).
    Pausable,
    /// A private broker that advertises this port (a proxy's) instead of
    /// its own.
    Behind(u16),
    /// A private three-node cluster (replication factor 3,
    /// `min.insync.replicas` 2).
    Cluster,
    /// A private broker with TLS, SASL/SCRAM and ACLs.
    Secure,
}

/// The shared broker or a test's own.
pub enum BrokerRef {
    Shared(&'static kafka::Broker),
    Private(kafka::Broker),
}

impl std::ops::Deref for BrokerRef {
    type Target = kafka::Broker;

    fn deref(&self) -> &kafka::Broker {
        match self {
            BrokerRef::Shared(broker) => broker,
            BrokerRef::Private(broker) => broker,
        }
    }
}

impl BrokerRef {
    pub fn start(choice: BrokerChoice) -> Self {
        match choice {
            BrokerChoice::Shared => BrokerRef::Shared(kafka::Broker::shared()),
            BrokerChoice::Private => BrokerRef::Private(kafka::Broker::start()),
            BrokerChoice::Pausable => BrokerRef::Private(kafka::Broker::start_pausable()),
            BrokerChoice::Behind(port) => BrokerRef::Private(kafka::Broker::start_behind(port)),
            BrokerChoice::Cluster => BrokerRef::Private(kafka::Broker::cluster()),
            BrokerChoice::Secure => BrokerRef::Private(kafka::Broker::secure()),
        }
    }
}

/// How a [`Stack`] differs from the default.
#[derive(Default)]
pub struct StackOptions {
    pub pg: PgOptions,
    pub broker: BrokerChoice,
    /// Extra arguments for `walrelay setup`.
    pub setup_args: Vec<&'static str>,
    /// A `test_decoding` slot `twin` for `workload::commit_order`.
    pub twin: bool,
}

impl Stack {
    pub async fn start(name: &str) -> Self {
        Self::start_with(name, StackOptions::default()).await
    }

    /// A stack whose broker the relays reach through a proxy (to cut it
    /// or slow it down), returned beside it.
    pub async fn start_behind_proxy(name: &str, options: StackOptions) -> (Self, proxy::Proxy) {
        let port = free_port();
        let stack = Self::start_with(
            name,
            StackOptions {
                broker: BrokerChoice::Behind(port),
                ..options
            },
        )
        .await;
        let link = proxy::Proxy::start_on(port, stack.broker.port).await;
        (stack, link)
    }

    pub async fn start_with(name: &str, options: StackOptions) -> Self {
        let pg = PgCluster::start_with(options.pg);
        let broker = BrokerRef::start(options.broker);
        let db = pg.create_database(name).await;
        workload::setup(&pg.url(&db), &options.setup_args);
        let client = pg.client(&db).await;
        if options.twin {
            workload::create_twin_slot(&client).await;
        }
        Stack {
            pg,
            broker,
            topics: kafka::Topics::new(name),
            db,
            client,
        }
    }

    /// The superuser URL of the test's database.
    pub fn url(&self) -> String {
        self.pg.url(&self.db)
    }

    /// Where this test's relays put events of `aggregate_type`.
    pub fn topic(&self, aggregate_type: &str) -> String {
        self.topics.topic(aggregate_type)
    }

    /// Starts `walrelay run` against this stack, its topics in the test's
    /// namespace.
    pub fn relay(&self, args: &[&str]) -> relay::RelayProcess {
        self.relay_via(&self.url(), args)
    }

    /// Starts `walrelay run` on `pg_url` (a proxy's, another role's) and
    /// this stack's broker, its topics in the test's namespace.
    pub fn relay_via(&self, pg_url: &str, args: &[&str]) -> relay::RelayProcess {
        let args = self.topics.relay_args(args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        relay::RelayProcess::start(pg_url, &self.broker.bootstrap(), &args)
    }

    /// Starts `walrelay inbox` into `pg_url` with this test's consumer group.
    pub fn inbox(&self, pg_url: &str, args: &[&str]) -> relay::RelayProcess {
        let args = self.topics.inbox_args(args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        relay::RelayProcess::start_inbox(pg_url, &self.broker.bootstrap(), &args)
    }

    /// Inserts `n` events of `aggregate_type` in one transaction, over ten
    /// aggregates.
    pub async fn insert_events(&self, aggregate_type: &str, n: i32) {
        self.client
            .execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                 SELECT $1::text, 'k' || (g % 10), 'E', jsonb_build_object('g', g) FROM generate_series(1, $2::int) g",
                &[&aggregate_type, &n],
            )
            .await
            .unwrap();
    }

    /// How many events of `aggregate_type` the outbox holds.
    pub async fn count_of(&self, aggregate_type: &str) -> usize {
        let count: i64 = self
            .client
            .query_one(
                "SELECT count(*) FROM outbox WHERE aggregate_type = $1",
                &[&aggregate_type],
            )
            .await
            .unwrap()
            .get(0);
        count as usize
    }

    /// The slot's confirmed LSN.
    pub async fn confirmed(&self) -> walrelay::lsn::Lsn {
        workload::confirmed(&self.client, "walrelay").await
    }

    /// Waits until the slot has confirmed `lsn`.
    pub async fn wait_confirmed(&self, lsn: walrelay::lsn::Lsn, timeout: Duration) {
        wait_for(&format!("the slot to confirm {lsn}"), timeout, async || {
            (self.confirmed().await >= lsn).then_some(())
        })
        .await;
    }
}

/// Headless Chromium on `url` with `extra` flags (`--dump-dom`,
/// `--screenshot=...`), offline and with a throwaway profile.
/// The text a page shows: its tags taken out and runs of white space made
/// one (the dashboard wraps each word in a span so none breaks mid-word).
pub fn visible_text(html: &str) -> String {
    let mut text = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            _ if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub fn chromium(profile: &Path, url: &str, extra: &[&str]) -> std::process::Output {
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,900",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("chromium (Debian's chromium package) is needed")
}
