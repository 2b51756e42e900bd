//! Apache Kafka for the tests, run by `scripts/kafka` (KRaft, on loopback,
//! no Docker).
//!
//! One single-node broker per test process serves every test that leaves
//! the broker alone ([`Broker::shared`]); it starts with the first test
//! that asks for it and stops when the process exits. Each test writes
//! under topic names of its own ([`Topics`]), so tests that run at once
//! never read each other's records. A test that pauses, stops, kills or
//! restarts a broker, or puts a proxy in front of it, starts a private one
//! ([`Broker::start`], [`Broker::start_behind`], [`Broker::cluster`]): the
//! methods that hurt a broker refuse to run on the shared one.
//!
//! Records are read as any Kafka consumer reads them: from the log's
//! start, `isolation.level=read_committed`, up to each partition's high
//! watermark.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tempfile::TempDir;

/// How soon a silent node is fenced (`broker.session.timeout.ms`): a
/// crashed or paused node of a cluster is noticed in seconds, and a
/// single node restarted after `kill -9` registers again in seconds.
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// The session timeout of a single node that tests pause: longer than any
/// pause of a test.
const PAUSABLE_SESSION_TIMEOUT: Duration = Duration::from_secs(120);

/// `scripts/kafka` of this checkout.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// The test process's broker: no test may hurt it.
    Shared,
    /// One test's own broker or cluster: its faults are the test's to make.
    Private,
    /// Someone else's broker (`scripts/start`'s): read only.
    External,
}

pub struct Broker {
    kind: Kind,
    /// `scripts/kafka`'s directory for this cluster.
    dir: PathBuf,
    /// A private broker's directory, removed on drop.
    _owned: Option<TempDir>,
    nodes: usize,
    /// A pause (SIGSTOP) of this broker does not fence it.
    pausable: bool,
    /// Node 1's own client port (not the proxy's it may advertise).
    pub port: u16,
    bootstrap: String,
    /// Clients speak SASL_SSL (SCRAM-SHA-512) and ACLs are on.
    secure: bool,
}

impl Broker {
    /// The broker every test of this process shares: started on first use,
    /// stopped (and its directory removed) when the process exits.
    pub fn shared() -> &'static Broker {
        static SHARED: OnceLock<Broker> = OnceLock::new();
        SHARED.get_or_init(|| {
            let dir = tempfile::Builder::new()
                .prefix("walrelay-kafka-shared-")
                .tempdir()
                .unwrap()
                .keep();
            Broker::launch(Kind::Shared, dir, None, 1, None, SESSION_TIMEOUT, false)
        })
    }

    /// A single-node broker of the calling test's own, to stop or crash.
    pub fn start() -> Self {
        Self::private(1, None, SESSION_TIMEOUT, false)
    }

    /// A single-node broker of the calling test's own, to pause. A single
    /// node (broker and controller in one process) paused longer than its
    /// session timeout fences itself when it resumes, and Apache Kafka
    /// 4.4 then sometimes stops serving its partitions, or accepting a
    /// producer's records, for minutes (seen in 2 of about 12 runs of the
    /// pause tests): so this one's session outlasts any pause of a test.
    /// The price: after a `kill9` it waits that long to register again.
    pub fn start_pausable() -> Self {
        Self::private(1, None, PAUSABLE_SESSION_TIMEOUT, false)
    }

    /// A private three-node cluster (replication factor 3,
    /// `min.insync.replicas` 2). A paused node is fenced by the others.
    pub fn cluster() -> Self {
        Self::private(3, None, SESSION_TIMEOUT, false)
    }

    /// A private broker that tells clients to connect to
    /// `advertised_port` (a proxy's) instead of its own port.
    pub fn start_behind(advertised_port: u16) -> Self {
        Self::private(1, Some(advertised_port), SESSION_TIMEOUT, false)
    }

    /// A private broker as users run one: TLS and SASL/SCRAM for clients,
    /// ACLs on. The harness reads and administers it as the super user;
    /// principals `relay` and `inbox` have no rights until [`Broker::acl`]
    /// gives them some.
    pub fn secure() -> Self {
        Self::private(1, None, SESSION_TIMEOUT, true)
    }

    fn private(
        nodes: usize,
        advertised_port: Option<u16>,
        session: Duration,
        secure: bool,
    ) -> Self {
        let owned = tempfile::Builder::new()
            .prefix("walrelay-kafka-")
            .tempdir()
            .unwrap();
        let dir = owned.path().to_owned();
        Self::launch(
            Kind::Private,
            dir,
            Some(owned),
            nodes,
            advertised_port,
            session,
            secure,
        )
    }

    /// librdkafka options (`-X` for walrelay) for `user`'s credentials
    /// (`relay` or `inbox`, password `<user>-secret`) over TLS.
    pub fn credentials(&self, user: &str) -> Vec<String> {
        assert!(self.secure, "a secure broker's credentials");
        [
            "security.protocol=SASL_SSL".to_owned(),
            "sasl.mechanisms=SCRAM-SHA-512".to_owned(),
            format!("sasl.username={user}"),
            format!("sasl.password={user}-secret"),
            format!("ssl.ca.location={}", self.dir.join("ca.pem").display()),
        ]
        .into_iter()
        .flat_map(|o| ["-X".to_owned(), o])
        .collect()
    }

    /// Runs Kafka's ACL tool as the super user: `["--add", "--allow-principal",
    /// "User:relay", "--operation", "Write", "--topic", ...]`.
    pub fn acl(&self, args: &[&str]) {
        let mut all = vec![
            "tool".to_owned(),
            self.dir.display().to_string(),
            "org.apache.kafka.tools.AclCommand".to_owned(),
        ];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        if args.contains(&"--remove") {
            all.push("--force".to_owned());
        }
        run_script(&all);
    }

    /// A handle on a broker someone else runs, for reading only.
    pub fn connect_to(bootstrap: &str) -> Self {
        Broker {
            kind: Kind::External,
            dir: PathBuf::new(),
            _owned: None,
            nodes: 0,
            pausable: false,
            port: 0,
            bootstrap: bootstrap.to_owned(),
            secure: false,
        }
    }

    fn launch(
        kind: Kind,
        dir: PathBuf,
        owned: Option<TempDir>,
        nodes: usize,
        advertised_port: Option<u16>,
        session: Duration,
        secure: bool,
    ) -> Self {
        let mut args = vec![
            "start".to_owned(),
            dir.display().to_string(),
            "--nodes".to_owned(),
            nodes.to_string(),
            "--session-timeout".to_owned(),
            session.as_millis().to_string(),
            // Stopped with the test process however it ends (a panic
            // aborting, a SIGKILL), not only when dropped.
            "--watch".to_owned(),
            std::process::id().to_string(),
        ];
        if kind == Kind::Shared {
            args.push("--remove".to_owned());
        }
        if let Some(port) = advertised_port {
            args.extend(["--advertise-port".to_owned(), port.to_string()]);
        }
        if secure {
            args.push("--secure".to_owned());
        }
        let started = Instant::now();
        run_script(&args);
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()))
                .trim()
                .to_owned()
        };
        let port = read("node-1/port").parse().unwrap();
        let bootstrap = read("bootstrap");
        eprintln!(
            "Apache Kafka ({kind:?}, {nodes} node(s)) at {bootstrap} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Broker {
            kind,
            dir,
            _owned: owned,
            nodes,
            pausable: nodes > 1 || session >= PAUSABLE_SESSION_TIMEOUT,
            port,
            bootstrap,
            secure,
        }
    }

    /// What clients connect to (a proxy's port, for `start_behind`).
    pub fn bootstrap(&self) -> String {
        self.bootstrap.clone()
    }

    /// Node `node`'s (1-based) process id, while it runs.
    pub fn pid(&self, node: usize) -> Option<u32> {
        std::fs::read_to_string(self.dir.join(format!("node-{node}/pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The end of the nodes' own logs, for assertion messages.
    pub fn log(&self) -> String {
        (1..=self.nodes)
            .map(|i| {
                let log = std::fs::read_to_string(self.dir.join(format!("node-{i}/server.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- node {i}:\n{}", tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Panics unless this broker is the test's own to hurt.
    fn must_be_private(&self, what: &str) {
        assert_eq!(
            self.kind,
            Kind::Private,
            "{what} would hurt every test sharing this broker: start a private one (StackOptions::broker)"
        );
    }

    fn signal(&self, node: usize, signal: &str) {
        let Some(pid) = self.pid(node) else {
            panic!("Kafka node {node} is not running");
        };
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Suspends every node (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        self.must_be_private("pausing the broker");
        (1..=self.nodes).for_each(|i| self.pause_node(i));
    }

    /// Lets every node go on (SIGCONT).
    pub fn resume(&self) {
        self.must_be_private("resuming the broker");
        (1..=self.nodes).for_each(|i| self.resume_node(i));
    }

    pub fn pause_node(&self, node: usize) {
        self.must_be_private("pausing a node");
        assert!(
            self.pausable,
            "a single node paused past its session timeout fences itself: start it with Broker::start_pausable (BrokerChoice::Pausable)"
        );
        self.signal(node, "-STOP");
    }

    pub fn resume_node(&self, node: usize) {
        self.must_be_private("resuming a node");
        self.signal(node, "-CONT");
    }

    /// Stops every node the way an operator does (SIGTERM, a controlled
    /// shutdown). The data stays for `start_again`.
    pub fn stop(&self) {
        self.must_be_private("stopping the broker");
        run_script(&["stop".to_owned(), self.dir.display().to_string()]);
    }

    /// Stops one node (SIGTERM).
    pub fn stop_node(&self, node: usize) {
        self.must_be_private("stopping a node");
        run_script(&[
            "stop".to_owned(),
            self.dir.display().to_string(),
            node.to_string(),
        ]);
    }

    /// Crashes every node (SIGKILL). Kafka wrote every record it had
    /// acknowledged to the page cache, so a process crash loses none.
    pub fn kill9(&self) {
        self.must_be_private("killing the broker");
        (1..=self.nodes).for_each(|i| self.kill_node(i));
    }

    /// Crashes one node (SIGKILL) and waits until it is gone.
    pub fn kill_node(&self, node: usize) {
        self.must_be_private("killing a node");
        let Some(pid) = self.pid(node) else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) {
            assert!(
                Instant::now() < deadline,
                "Kafka node {node} ({pid}) outlived SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(self.dir.join(format!("node-{node}/pid")));
    }

    /// Starts every node that is not running, on its old ports and with
    /// its data, and waits until the cluster answers.
    pub fn start_again(&self) {
        self.must_be_private("restarting the broker");
        run_script(&["start".to_owned(), self.dir.display().to_string()]);
    }

    /// Stops the broker (SIGTERM) and starts it again with its data.
    pub fn restart(&self) {
        self.stop();
        self.start_again();
    }

    /// The node (1-based, its `node.id`) leading `topic`'s `partition`,
    /// from the cluster's metadata; `None` while it has no leader.
    pub fn leader(&self, topic: &str, partition: i32) -> Option<usize> {
        self.partition(topic, partition)?.leader
    }

    /// `topic`'s `partition` as the cluster's metadata shows it now: its
    /// leader, replicas and in-sync replicas (node ids, 1-based).
    pub fn partition(&self, topic: &str, partition: i32) -> Option<PartitionState> {
        self.must_be_private("a partition's leader and replicas (for a fault)");
        let consumer = self.consumer("read_committed");
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .ok()?;
        let t = metadata.topics().iter().find(|t| t.name() == topic)?;
        let p = t.partitions().iter().find(|p| p.id() == partition)?;
        Some(PartitionState {
            leader: (p.leader() >= 1).then(|| p.leader() as usize),
            replicas: p.replicas().iter().map(|r| *r as usize).collect(),
            isr: p.isr().iter().map(|r| *r as usize).collect(),
        })
    }

    /// Every partition of `topic` as the cluster's metadata shows it now
    /// (reading only: any broker may be asked); `None` when the topic does
    /// not exist.
    pub fn layout(&self, topic: &str) -> Option<Vec<PartitionState>> {
        let metadata = self
            .consumer("read_committed")
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .ok()?;
        let t = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())?;
        let mut partitions: Vec<_> = t.partitions().iter().collect();
        partitions.sort_by_key(|p| p.id());
        let layout: Vec<PartitionState> = partitions
            .into_iter()
            .map(|p| PartitionState {
                leader: (p.leader() >= 1).then(|| p.leader() as usize),
                replicas: p.replicas().iter().map(|r| *r as usize).collect(),
                isr: p.isr().iter().map(|r| *r as usize).collect(),
            })
            .collect();
        (!layout.is_empty()).then_some(layout)
    }

    /// Sets `topic`'s own `name` to `value` (kafka-configs.sh --alter
    /// --add-config), and waits until the cluster reports it.
    pub fn set_topic_config(&self, topic: &str, name: &str, value: &str) {
        use rdkafka::admin::{AdminOptions, AlterConfig, ResourceSpecifier};
        let admin = self.admin();
        let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
        let results = block_on(async {
            admin
                .alter_configs(
                    &[AlterConfig::new(ResourceSpecifier::Topic(topic)).set(name, value)],
                    &options,
                )
                .await
        })
        .expect("AlterConfigs");
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = block_on(async {
                admin
                    .describe_configs(&[ResourceSpecifier::Topic(topic)], &options)
                    .await
            });
            let shown = now
                .ok()
                .and_then(|mut r| r.pop()?.ok()?.get(name).and_then(|e| e.value.clone()));
            if shown.as_deref() == Some(value) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{topic}'s {name} is not {value} within 30 s: {shown:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", self.bootstrap());
        if self.secure {
            config
                .set("security.protocol", "SASL_SSL")
                .set("sasl.mechanisms", "SCRAM-SHA-512")
                .set("sasl.username", "admin")
                .set("sasl.password", "admin-secret")
                .set(
                    "ssl.ca.location",
                    self.dir.join("ca.pem").display().to_string(),
                );
        }
        config
    }

    fn admin(&self) -> rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> {
        self.client_config().create().unwrap()
    }

    /// Another producer: writes `n` plain records (no walrelay headers) to
    /// `topic`, spread over its partitions; returns `n`.
    pub fn produce_plain(&self, topic: &str, n: usize) -> usize {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let producer: BaseProducer = self
            .client_config()
            .set("enable.idempotence", "true")
            .create()
            .unwrap();
        for i in 0..n {
            let key = format!("foreign-{i}");
            producer
                .send(BaseRecord::to(topic).key(&key).payload("{}"))
                .unwrap();
        }
        producer.flush(Duration::from_secs(30)).unwrap();
        n
    }

    /// Creates `topic` with `partitions` partitions, replicated to every
    /// node (at most 3), and waits until its metadata shows them.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        self.create_topic_replicated(topic, partitions, self.nodes.clamp(1, 3) as i32);
    }

    /// Creates `topic` with `partitions` partitions of `replication`
    /// replicas each, and waits until its metadata shows them.
    pub fn create_topic_replicated(&self, topic: &str, partitions: i32, replication: i32) {
        use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
        let admin = self.admin();
        let results = block_on(async {
            admin
                .create_topics(
                    &[NewTopic::new(
                        topic,
                        partitions,
                        TopicReplication::Fixed(replication),
                    )],
                    &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
                )
                .await
        })
        .expect("CreateTopics");
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        self.wait_for_partitions(topic, partitions as usize);
    }

    /// Deletes `topic` (DeleteTopics) and waits until the metadata no
    /// longer shows it, so that it can be created again.
    pub fn delete_topic(&self, topic: &str) {
        use rdkafka::admin::AdminOptions;
        let admin = self.admin();
        let results = block_on(async {
            admin
                .delete_topics(
                    &[topic],
                    &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
                )
                .await
        })
        .expect("DeleteTopics");
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.topic_exists(topic) {
            assert!(
                Instant::now() < deadline,
                "{topic} still shows in the metadata 30 s after it was deleted"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether the broker's metadata shows `topic` (asked without creating
    /// it: a consumer's metadata request never does).
    pub fn topic_exists(&self, topic: &str) -> bool {
        let consumer = self.consumer("read_committed");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.partitions(&consumer, topic) {
                Ok(found) => return found.is_some(),
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "no metadata of {topic} within 30 s: {e}"
                ),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `topic`'s id (KIP-516) as Kafka's own topic tool prints it.
    pub fn topic_id(&self, topic: &str) -> String {
        let out = Command::new(script())
            .args(["tool", &self.dir.display().to_string()])
            .args(["org.apache.kafka.tools.TopicCommand", "--describe"])
            .args(["--topic", topic])
            .output()
            .unwrap_or_else(|e| panic!("cannot run scripts/kafka: {e}"));
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .skip_while(|word| *word != "TopicId:")
            .nth(1)
            .unwrap_or_else(|| {
                panic!(
                    "kafka-topics --describe {topic} printed no TopicId: {text}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
            .to_owned()
    }

    /// Raises `topic`'s partition count to `total` (CreatePartitions): the
    /// records stay where they are, new partitions start empty.
    pub fn add_partitions(&self, topic: &str, total: usize) {
        use rdkafka::admin::{AdminOptions, NewPartitions};
        let admin = self.admin();
        let results = block_on(async {
            admin
                .create_partitions(
                    &[NewPartitions::new(topic, total)],
                    &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
                )
                .await
        })
        .expect("CreatePartitions");
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        self.wait_for_partitions(topic, total);
    }

    fn wait_for_partitions(&self, topic: &str, count: usize) {
        let consumer = self.consumer("read_committed");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let found = match self.partitions(&consumer, topic) {
                Ok(Some(p)) => Some(p.len()),
                _ => None,
            };
            if found == Some(count) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{topic} did not show {count} partitions within 30 s: {found:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Each partition's (low, high) watermarks now.
    pub fn watermarks(&self, topic: &str) -> HashMap<i32, (i64, i64)> {
        let consumer = self.consumer("read_committed");
        let partitions = self
            .partitions(&consumer, topic)
            .unwrap_or_else(|e| panic!("metadata of {topic}: {e}"))
            .unwrap_or_else(|| panic!("topic {topic} does not exist"));
        watermarks(
            &consumer,
            topic,
            &partitions,
            Instant::now() + Duration::from_secs(30),
        )
    }

    /// Every record of `topic`, across partitions, in (partition, offset)
    /// order: waits up to `timeout` until at least `expected` have arrived,
    /// then reads each partition to its high watermark, so the result is
    /// everything the topic holds at that moment. Panics, naming the topic
    /// and the count, when they do not arrive in time.
    pub fn consume(&self, topic: &str, expected: usize, timeout: Duration) -> Vec<Record> {
        self.read(topic, Some(expected), timeout)
    }

    /// Everything `topic` holds now: every partition read to its high
    /// watermark; nothing when the topic does not exist. Use it once the
    /// writer is done (the relay confirmed the last commit).
    pub fn consume_all(&self, topic: &str) -> Vec<Record> {
        self.read(topic, None, Duration::from_secs(60))
    }

    /// Everything `topic` holds now as a `read_uncommitted` reader sees it
    /// (the Java consumer's default): aborted transactions' records too.
    /// Only for reporting what such a reader gets; exactly once is judged
    /// by `read_committed` readers.
    pub fn consume_all_uncommitted(&self, topic: &str) -> Vec<Record> {
        self.read_as(topic, None, Duration::from_secs(60), "read_uncommitted")
    }

    fn consumer(&self, isolation: &str) -> BaseConsumer {
        self.client_config()
            .set("group.id", "walrelay-tests")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", isolation)
            .create()
            .unwrap()
    }

    /// `topic`'s partition ids; `Ok(None)` when the broker says it does not
    /// exist.
    fn partitions(&self, consumer: &BaseConsumer, topic: &str) -> Result<Option<Vec<i32>>, String> {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        let t = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or("not in the metadata")?;
        match t.error() {
            None if !t.partitions().is_empty() => {
                Ok(Some(t.partitions().iter().map(|p| p.id()).collect()))
            }
            None => Err("no partitions yet".into()),
            Some(e) if RDKafkaErrorCode::from(e) == RDKafkaErrorCode::UnknownTopicOrPartition => {
                Ok(None)
            }
            Some(e) => Err(format!("{:?}", RDKafkaErrorCode::from(e))),
        }
    }

    /// Reads `topic` from the beginning: with `Some(n)`, until at least `n`
    /// records arrived (or panics at `timeout`); then every partition to
    /// its high watermark.
    fn read(&self, topic: &str, expected: Option<usize>, timeout: Duration) -> Vec<Record> {
        self.read_as(topic, expected, timeout, "read_committed")
    }

    fn read_as(
        &self,
        topic: &str,
        expected: Option<usize>,
        timeout: Duration,
        isolation: &str,
    ) -> Vec<Record> {
        let consumer = self.consumer(isolation);
        let started = Instant::now();
        let deadline = started + timeout;
        let partitions = loop {
            match self.partitions(&consumer, topic) {
                Ok(Some(p)) => break p,
                Ok(None) if expected.is_none() => return Vec::new(),
                result => assert!(
                    Instant::now() < deadline,
                    "waited {timeout:?} for {} record(s) of {topic}, and the topic is not there: {result:?}\n{}",
                    expected.unwrap_or(0),
                    self.log()
                ),
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let mut assignment = TopicPartitionList::new();
        for p in &partitions {
            assignment
                .add_partition_offset(topic, *p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&assignment).unwrap();
        let mut records = Vec::new();
        // The next offset to read in each partition.
        let mut next: HashMap<i32, i64> = HashMap::new();
        let poll = |records: &mut Vec<Record>, next: &mut HashMap<i32, i64>| match consumer
            .poll(Duration::from_millis(200))
        {
            Some(Ok(m)) => {
                next.insert(m.partition(), m.offset() + 1);
                records.push(Record::of(&m));
            }
            Some(Err(KafkaError::PartitionEOF(_))) | None => {}
            Some(Err(e)) => eprintln!("consuming {topic}: {e}"),
        };
        if let Some(n) = expected {
            while records.len() < n {
                assert!(
                    Instant::now() < deadline,
                    "{topic}: {} of the {n} expected record(s) arrived within {timeout:?} (watermarks now: {:?})\n{}",
                    records.len(),
                    partitions
                        .iter()
                        .map(|p| (
                            *p,
                            consumer.fetch_watermarks(topic, *p, Duration::from_secs(5))
                        ))
                        .collect::<Vec<_>>(),
                    self.log()
                );
                poll(&mut records, &mut next);
            }
        }
        // Then everything up to the high watermarks of this moment.
        let deadline = deadline.max(Instant::now() + Duration::from_secs(30));
        let ends = if isolation == "read_committed" && expected.is_none() {
            self.settled_ends(topic, &partitions, &consumer, deadline)
        } else {
            watermarks(&consumer, topic, &partitions, deadline)
        };
        loop {
            let behind: Vec<(i32, i64, i64)> = ends
                .iter()
                .map(|(p, (low, high))| (*p, next.get(p).copied().unwrap_or(*low), *high))
                .filter(|(_, at, high)| at < high)
                .filter(|(p, _, high)| position(&consumer, topic, *p).is_none_or(|at| at < *high))
                .collect();
            if behind.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{topic}: the partitions were not read to their high watermarks within {:?} (partition, next offset, high watermark): {behind:?}\n{}",
                deadline - started,
                self.log()
            );
            poll(&mut records, &mut next);
        }
        records.sort_by_key(|r| (r.partition, r.offset));
        records
    }
}

impl Broker {
    /// Each partition's high watermark now, once the last stable offset has
    /// reached it: a transaction's commit returns to its producer before
    /// its markers are written, so right after the relay confirms, a
    /// `read_committed` reader may not see the newest commits for a few
    /// milliseconds (its watermark is the last stable offset). Past
    /// `deadline` an open transaction hides records for good (Kafka's
    /// hanging transaction): that fails, naming what it hides.
    fn settled_ends(
        &self,
        topic: &str,
        partitions: &[i32],
        committed: &BaseConsumer,
        deadline: Instant,
    ) -> HashMap<i32, (i64, i64)> {
        let uncommitted = self.consumer("read_uncommitted");
        let highs = watermarks(&uncommitted, topic, partitions, deadline);
        // Since when the last stable offset was seen below the watermark.
        let mut waited: Option<Instant> = None;
        loop {
            let stable = watermarks(committed, topic, partitions, deadline);
            let hidden: Vec<(i32, i64, i64)> = highs
                .iter()
                .map(|(p, (_, high))| (*p, stable[p].1, *high))
                .filter(|(_, stable, high)| stable < high)
                .collect();
            if hidden.is_empty() {
                if let Some(since) = waited {
                    eprintln!(
                        "{topic}: read_committed readers saw the newest commits {:?} later (their markers were still being written)",
                        since.elapsed()
                    );
                }
                return highs;
            }
            waited.get_or_insert_with(Instant::now);
            if Instant::now() >= deadline {
                let records =
                    self.read_as(topic, None, Duration::from_secs(30), "read_uncommitted");
                let what: Vec<String> = hidden
                    .iter()
                    .map(|(p, stable, high)| {
                        let ids: Vec<&str> = records
                            .iter()
                            .filter(|r| r.partition == *p && r.offset >= *stable)
                            .filter_map(|r| r.header("id"))
                            .collect();
                        format!("partition {p}: offsets {stable}..{high} hidden, ids {ids:?}")
                    })
                    .collect();
                panic!(
                    "{topic}: an open transaction hides records from read_committed readers for good (a hanging transaction): {}",
                    what.join("; ")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The application's position in `topic`'s `partition` (past transaction
/// markers too), when librdkafka knows it.
fn position(consumer: &BaseConsumer, topic: &str, partition: i32) -> Option<i64> {
    let positions = consumer.position().ok()?;
    match positions.find_partition(topic, partition)?.offset() {
        Offset::Offset(at) => Some(at),
        _ => None,
    }
}

fn watermarks(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: &[i32],
    deadline: Instant,
) -> HashMap<i32, (i64, i64)> {
    partitions
        .iter()
        .map(|p| {
            loop {
                match consumer.fetch_watermarks(topic, *p, Duration::from_secs(5)) {
                    Ok(marks) => break (*p, marks),
                    Err(e) => {
                        assert!(
                            Instant::now() < deadline,
                            "the watermarks of {topic}/{p}: {e}"
                        );
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
        })
        .collect()
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

fn run_script(args: &[String]) {
    let out = Command::new(script())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/kafka: {e}"));
    assert!(
        out.status.success(),
        "scripts/kafka {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a future to completion on a runtime of its own (the broker
/// helpers are called from within the tests' runtime).
fn block_on<F>(future: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(future)
        })
        .join()
        .unwrap()
    })
}

impl Drop for Broker {
    /// A private broker's data goes with it: SIGKILL is enough, and quick.
    fn drop(&mut self) {
        if self.kind != Kind::Private {
            return;
        }
        for node in 1..=self.nodes {
            if let Some(pid) = self.pid(node) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// A partition as the cluster's metadata shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionState {
    pub leader: Option<usize>,
    pub replicas: Vec<usize>,
    pub isr: Vec<usize>,
}

/// The topic names of one test. Every topic a test's relays write to (the
/// template's and the dead-letter topic) starts with `ns.`, so tests that
/// share a broker never read each other's records.
#[derive(Clone, Debug)]
pub struct Topics {
    pub ns: String,
}

impl Topics {
    /// A namespace unique in this process, named after `prefix`.
    pub fn new(prefix: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        // Letters, digits and '-' only: no '.' or '_' that Kafka could
        // confuse in its metric names, nothing special in a regex.
        let prefix: String = prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        Topics {
            ns: format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed)),
        }
    }

    /// Where the default template puts events of `aggregate_type`.
    pub fn topic(&self, aggregate_type: &str) -> String {
        self.named(&format!("outbox.event.{aggregate_type}"))
    }

    /// `name` in this namespace (what a test's own `--topic-template`
    /// renders to).
    pub fn named(&self, name: &str) -> String {
        format!("{}.{name}", self.ns)
    }

    /// The dead-letter topic of this test's relays.
    pub fn dead_letters(&self) -> String {
        self.named("walrelay.dead-letter")
    }

    /// A regular expression (for `inbox --topic`) matching every topic of
    /// the default template in this namespace.
    pub fn pattern(&self) -> String {
        format!("^{}\\.outbox\\.event\\..*", self.ns)
    }

    /// This test's inbox consumer group.
    pub fn group(&self) -> String {
        format!("{}-inbox", self.ns)
    }

    /// `walrelay run` arguments with this namespace: `--topic-template` and
    /// `--dead-letter-topic` get the `ns.` prefix (the defaults are added
    /// when `args` has none).
    pub fn relay_args(&self, args: &[&str]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut template = false;
        let mut dead_letter = false;
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            out.push((*arg).to_owned());
            if matches!(*arg, "--topic-template" | "--dead-letter-topic") {
                template |= *arg == "--topic-template";
                dead_letter |= *arg == "--dead-letter-topic";
                let value = it.next().expect("a value after the option");
                out.push(self.named(value));
            }
        }
        if !template {
            out.extend([
                "--topic-template".to_owned(),
                self.topic("{aggregate_type}"),
            ]);
        }
        if !dead_letter {
            out.extend(["--dead-letter-topic".to_owned(), self.dead_letters()]);
        }
        out
    }

    /// `walrelay inbox` arguments with this test's group (unless `args`
    /// names one).
    pub fn inbox_args(&self, args: &[&str]) -> Vec<String> {
        let mut out: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        if !args.contains(&"--group") {
            out.extend(["--group".to_owned(), self.group()]);
        }
        out
    }
}

/// A consumed record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Record {
    fn of<M: Message>(m: &M) -> Self {
        Record {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers: m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| std::str::from_utf8(v).unwrap())
    }

    pub fn header_names(&self) -> Vec<&str> {
        self.headers.iter().map(|(k, _)| k.as_str()).collect()
    }
}
