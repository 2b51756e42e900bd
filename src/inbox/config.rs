//! How `walrelay inbox` runs: the settings the command line fills, and the
//! librdkafka configuration of its consumer. Apart from the loop, so the
//! flags and the loop's tests build it without the loop's machinery.

use std::time::Duration;

use rdkafka::config::ClientConfig;

use super::reset::OnTopicReset;
use super::schema::InboxTables;
use crate::postgres::ConnectionConfig;

/// How `walrelay inbox` runs.
#[derive(Clone, Debug)]
pub struct InboxConfig {
    pub pg: ConnectionConfig,
    pub brokers: String,
    /// `-X key=value`, over the consumer's defaults.
    pub overrides: Vec<(String, String)>,
    /// Topic names, or regular expressions starting with `^`.
    pub topics: Vec<String>,
    pub tables: InboxTables,
    pub group: String,
    /// Records per PostgreSQL transaction, at most.
    pub batch_size: usize,
    /// How long a batch waits to fill before it is stored anyway.
    pub batch_wait: Duration,
    /// Longest wait between attempts to reach PostgreSQL again.
    pub max_backoff: Duration,
    /// What to do with a partition whose topic was made again (or whose
    /// log was truncated).
    pub on_topic_reset: OnTopicReset,
    /// How often the ids of the topics held are read again, to notice a
    /// topic made again while it is read.
    pub topic_check_interval: Duration,
}

impl InboxConfig {
    /// The consumer's librdkafka configuration.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group)
            .set("client.id", "walrelay-inbox")
            // Offsets live in PostgreSQL, with the rows.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // librdkafka's consumer default, kept explicit: subscribing to
            // (or checking) a topic never creates it with the broker's
            // defaults. `-X` may not change it (cli/args.rs).
            .set("allow.auto.create.topics", "false")
            // Records of aborted transactions are never stored; `-X` may
            // not change it either.
            .set("isolation.level", "read_committed")
            // Subscribing to a topic the relay has not made yet must not
            // make it with the broker's defaults (librdkafka's consumer
            // default; said here, where the consumer is made).
            .set("allow.auto.create.topics", "false")
            // High watermarks for the consumer-lag gauge.
            .set("statistics.interval.ms", "1000");
        if self.topics.iter().any(|t| t.starts_with('^')) {
            // A pattern picks up topics created later at the next metadata
            // refresh: every second rather than librdkafka's 5 minutes, so
            // a new topic's first records do not wait (one metadata
            // request a second).
            config.set("topic.metadata.refresh.interval.ms", "1000");
        }
        for (key, value) in &self.overrides {
            config.set(key, value);
        }
        config
    }
}
