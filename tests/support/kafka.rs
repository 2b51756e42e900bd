//! A real Kafka-protocol broker for tests: tansu on a free port (memory or
//! SQLite storage), or the Apache Kafka named by `WALRELAY_TEST_BROKERS`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tempfile::TempDir;

use super::free_port;

/// Where tansu is: `WALRELAY_TANSU`, `~/.cargo/bin/tansu`, or on PATH.
fn tansu_binary() -> PathBuf {
    if let Ok(path) = std::env::var("WALRELAY_TANSU") {
        return path.into();
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let cargo_bin = PathBuf::from(home).join(".cargo/bin/tansu");
    if cargo_bin.exists() {
        cargo_bin
    } else {
        PathBuf::from("tansu")
    }
}

pub struct Broker {
    pub port: u16,
    /// The address the broker tells clients to use (a proxy's, in network tests).
    advertised_port: Option<u16>,
    external: Option<String>,
    child: Option<Child>,
    dir: TempDir,
    persistent: bool,
}

impl Broker {
    /// A broker that forgets everything when stopped.
    pub fn start() -> Self {
        Self::launch(false)
    }

    /// A broker that keeps its data across `stop` and `restart` (SQLite).
    pub fn start_persistent() -> Self {
        Self::launch(true)
    }

    fn launch(persistent: bool) -> Self {
        let external = std::env::var("WALRELAY_TEST_BROKERS")
            .ok()
            .filter(|b| !b.is_empty());
        let mut broker = Broker {
            port: free_port(),
            advertised_port: None,
            external,
            child: None,
            dir: tempfile::Builder::new()
                .prefix("walrelay-broker-")
                .tempdir()
                .unwrap(),
            persistent,
        };
        if broker.external.is_none() {
            broker.spawn();
        }
        broker
    }

    /// A handle on a broker someone else runs (for consuming only).
    pub fn connect_to(bootstrap: &str) -> Self {
        Broker {
            port: 0,
            advertised_port: None,
            external: Some(bootstrap.to_owned()),
            child: None,
            dir: tempfile::tempdir().unwrap(),
            persistent: false,
        }
    }

    /// A broker that advertises `advertised_port` instead of its own, so
    /// clients connect through a proxy listening there.
    pub fn start_behind(advertised_port: u16) -> Self {
        let mut broker = Broker {
            port: free_port(),
            advertised_port: Some(advertised_port),
            external: None,
            child: None,
            dir: tempfile::Builder::new()
                .prefix("walrelay-broker-")
                .tempdir()
                .unwrap(),
            persistent: false,
        };
        broker.spawn();
        broker
    }

    /// Suspends the broker (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        let pid = self.child.as_ref().expect("a local broker").id();
        Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .unwrap();
    }

    pub fn resume(&self) {
        let pid = self.child.as_ref().expect("a local broker").id();
        Command::new("kill")
            .args(["-CONT", &pid.to_string()])
            .status()
            .unwrap();
    }

    /// True when the tests run against a broker they cannot stop.
    pub fn is_external(&self) -> bool {
        self.external.is_some()
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!(
            "tcp://127.0.0.1:{}",
            self.advertised_port.unwrap_or(self.port)
        );
        let storage = if self.persistent {
            "sqlite://tansu.db".to_owned()
        } else {
            "memory://tansu/".to_owned()
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("broker.log"))
            .unwrap();
        let child = Command::new(tansu_binary())
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &advertised, "--storage-engine", &storage])
            .current_dir(self.dir.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("cannot start tansu: install it with `cargo install --locked tansu --features dynostore,libsql` or set WALRELAY_TEST_BROKERS");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn bootstrap(&self) -> String {
        self.external
            .clone()
            .unwrap_or_else(|| format!("127.0.0.1:{}", self.advertised_port.unwrap_or(self.port)))
    }

    /// Stops the broker the way an operator does (SIGTERM). A broker
    /// SIGKILLed may lose records it had already acknowledged (tansu's
    /// SQLite storage, like a Kafka broker with replication factor 1 and
    /// no fsync, is not durable across a crash), which no relay can mend.
    pub fn stop(&mut self) {
        assert!(!self.is_external(), "cannot stop an external broker");
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The broker's own log, for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    /// Crashes the broker (SIGKILL).
    pub fn kill9(&mut self) {
        assert!(!self.is_external(), "cannot kill an external broker");
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Another producer: writes `n` plain records (no walrelay headers) to
    /// `topic`, spread over its partitions; returns `n`.
    pub fn produce_plain(&self, topic: &str, n: usize) -> usize {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
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

    /// Creates `topic` with `partitions` partitions, and waits until its
    /// metadata shows them.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        use rdkafka::client::DefaultClientContext;
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .unwrap();
        let created = block_on(async {
            admin
                .create_topics(
                    &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                    &AdminOptions::new(),
                )
                .await
        });
        let results = created.expect("CreateTopics");
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while admin
            .inner()
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .ok()
            .and_then(|m| {
                m.topics()
                    .iter()
                    .find(|t| t.name() == topic)
                    .map(|t| t.partitions().len())
            })
            != Some(partitions as usize)
        {
            assert!(Instant::now() < deadline, "{topic} did not appear");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Raises `topic`'s partition count to `total`, as CreatePartitions
    /// does: the records stay where they are, new partitions start empty.
    /// tansu 0.6 does not implement CreatePartitions; there the topic is
    /// recreated with `total` partitions and every record written back to
    /// its old partition, in order, with its key, value and headers, which
    /// leaves the log as adding partitions would.
    pub fn add_partitions(&self, topic: &str, total: usize) {
        use rdkafka::admin::{
            AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication,
        };
        use rdkafka::client::DefaultClientContext;
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .unwrap();
        let grown = block_on(async {
            admin
                .create_partitions(&[NewPartitions::new(topic, total)], &AdminOptions::new())
                .await
                .map(|results| results.into_iter().all(|r| r.is_ok()))
        });
        if !matches!(grown, Ok(true)) {
            let records = self.consume_all(topic);
            let deleted = block_on(async {
                admin
                    .delete_topics(&[topic], &AdminOptions::new())
                    .await
                    .map(drop)
            });
            deleted.expect("delete the topic to recreate it");
            let created = block_on(async {
                admin
                    .create_topics(
                        &[NewTopic::new(
                            topic,
                            total as i32,
                            TopicReplication::Fixed(1),
                        )],
                        &AdminOptions::new(),
                    )
                    .await
                    .map(drop)
            });
            created.expect("recreate the topic");
            std::thread::sleep(Duration::from_secs(1));
            let producer: BaseProducer = ClientConfig::new()
                .set("bootstrap.servers", self.bootstrap())
                .set("enable.idempotence", "true")
                .create()
                .unwrap();
            for r in &records {
                let mut headers = OwnedHeaders::new();
                for (k, v) in &r.headers {
                    headers = headers.insert(Header {
                        key: k,
                        value: Some(v),
                    });
                }
                let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic)
                    .partition(r.partition)
                    .headers(headers);
                if let Some(key) = &r.key {
                    record = record.key(key);
                }
                if let Some(value) = &r.value {
                    record = record.payload(value);
                }
                producer.send(record).map_err(|(e, _)| e).unwrap();
                producer.flush(Duration::from_secs(30)).unwrap();
            }
            assert_eq!(
                self.consume_all(topic).len(),
                records.len(),
                "records written back"
            );
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let found = admin
                .inner()
                .fetch_metadata(Some(topic), Duration::from_secs(5))
                .ok()
                .and_then(|m| {
                    m.topics()
                        .iter()
                        .find(|t| t.name() == topic)
                        .map(|t| t.partitions().len())
                });
            if found == Some(total) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{topic} did not grow to {total} partitions: {found:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every record of `topic`, across partitions, once at least `expected`
    /// have arrived (waiting up to `timeout` for them).
    pub fn consume(&self, topic: &str, expected: usize, timeout: Duration) -> Vec<Record> {
        self.read(topic, Some(expected), timeout)
    }

    /// Everything `topic` holds now: every partition read to its end. Use
    /// it once the writer is done (the relay confirmed the last commit).
    pub fn consume_all(&self, topic: &str) -> Vec<Record> {
        self.read(topic, None, Duration::from_secs(60))
    }

    /// Reads `topic` from the beginning until `expected` records arrived,
    /// or, with `None`, until every partition reported its end.
    fn read(&self, topic: &str, expected: Option<usize>, timeout: Duration) -> Vec<Record> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("group.id", "walrelay-tests")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create()
            .unwrap();
        let deadline = Instant::now() + timeout;
        let partitions = loop {
            let found = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(5))
                .ok()
                .and_then(|m| {
                    m.topics()
                        .iter()
                        .find(|t| t.name() == topic && t.error().is_none())
                        .map(|t| t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>())
                })
                .filter(|p| !p.is_empty());
            match found {
                Some(p) => break p,
                None if Instant::now() > deadline => return Vec::new(),
                None => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        let mut assignment = TopicPartitionList::new();
        for p in &partitions {
            assignment
                .add_partition_offset(topic, *p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&assignment).unwrap();
        let mut records = Vec::new();
        let mut at_end = std::collections::HashSet::new();
        let done = |records: &Vec<Record>, at_end: &std::collections::HashSet<i32>| match expected {
            Some(n) => records.len() >= n,
            None => at_end.len() == partitions.len(),
        };
        while !done(&records, &at_end) {
            assert!(
                Instant::now() < deadline || expected.is_some(),
                "{topic}: the partitions did not all report their end within {timeout:?}"
            );
            if Instant::now() >= deadline {
                break;
            }
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => records.push(Record {
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
                }),
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    at_end.insert(p);
                }
                Some(Err(e)) => eprintln!("consumer: {e}"),
                None => {}
            }
        }
        records.sort_by_key(|r| (r.partition, r.offset));
        records
    }
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
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
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
