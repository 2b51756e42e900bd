//! `walrelay run`'s flags, in groups, and their validation into the
//! relay's or the polling source's configuration.

use std::time::Duration;

use clap::Args;

use super::UsageError;
use super::args::{
    HttpArgs, KafkaArgs, OutboxArgs, PgArgs, PrimaryArgs, SourceKind, parse_kafka_options,
};
use super::values::{parse_duration, parse_retention, parse_size};
use crate::kafka::{ProducerSettings, Replication, SinkSettings, TopicSpec};
use crate::poll::{OnPublished, PollConfig};
use crate::postgres::TargetSessionAttrs;
use crate::relay::{DeliveryGuarantee, RelayConfig};
use crate::replication::ConnectionConfig;
use crate::router::{HeaderColumn, RouterConfig, TopicTemplate, check_topic_name};

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub pg: PgArgs,
    #[command(flatten)]
    pub primary: PrimaryArgs,
    #[command(flatten)]
    pub outbox: OutboxArgs,
    /// How long a stop waits for in-flight events to be acknowledged.
    #[arg(long, env = "WALRELAY_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Longest wait between reconnect attempts.
    #[arg(long, env = "WALRELAY_MAX_BACKOFF", default_value = "30s", value_parser = parse_duration)]
    pub max_backoff: Duration,
    /// When events wait and the broker acknowledged nothing for this long,
    /// end the replication session (so PostgreSQL can shut down) and stream
    /// again once the broker answers.
    #[arg(long, env = "WALRELAY_BROKER_STALL_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub broker_stall_timeout: Duration,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub routing: RoutingArgs,
    #[command(flatten)]
    pub topics: TopicArgs,
    #[command(flatten)]
    pub stream: StreamArgs,
    #[command(flatten)]
    pub delivery: DeliveryArgs,
    #[command(flatten)]
    pub poll: PollArgs,
    #[command(flatten)]
    pub retention: RetentionArgs,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Retention (--source wal)")]
pub struct RetentionArgs {
    /// Keep outbox rows this long (such as 24h or 7d), then delete those
    /// whose event PostgreSQL knows is delivered; rows stay meanwhile for
    /// recovery. Needs the index `walrelay setup --retain` creates.
    /// Default: the relay deletes nothing.
    #[arg(long, env = "WALRELAY_RETAIN", value_parser = parse_retention)]
    pub retain: Option<Duration>,
    /// Rows deleted at most per DELETE (each its own short transaction).
    #[arg(long, env = "WALRELAY_RETAIN_BATCH_SIZE", default_value_t = crate::retention::DEFAULT_BATCH_SIZE, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub retain_batch_size: u64,
    /// Time between retention passes.
    #[arg(long, env = "WALRELAY_RETAIN_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub retain_interval: Duration,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Records")]
pub struct RoutingArgs {
    /// Topic per event: {aggregate_type}, {event_type}, {schema} and {table} are replaced.
    #[arg(
        long,
        env = "WALRELAY_TOPIC_TEMPLATE",
        default_value = "outbox.event.{aggregate_type}"
    )]
    pub topic_template: String,
    /// Extra column placed in a header: COLUMN or COLUMN:HEADER; repeatable.
    #[arg(
        long = "header-column",
        env = "WALRELAY_HEADER_COLUMNS",
        value_delimiter = ','
    )]
    pub header_columns: Vec<String>,
    /// Prefix of transactional logical decoding messages that are events.
    #[arg(long, env = "WALRELAY_MESSAGE_PREFIX", default_value = "walrelay")]
    pub message_prefix: String,
    /// Topic for what cannot be published, with the reason in a walrelay_error header.
    #[arg(
        long,
        env = "WALRELAY_DEAD_LETTER_TOPIC",
        default_value = "walrelay.dead-letter"
    )]
    pub dead_letter_topic: String,
    /// Leave out the CloudEvents binary-mode headers (ce_*).
    #[arg(long, env = "WALRELAY_NO_CLOUDEVENTS")]
    pub no_cloudevents: bool,
    /// CloudEvents source; {schema} and {table} are replaced. Default /walrelay/{schema}/{table}.
    #[arg(long, env = "WALRELAY_CLOUDEVENTS_SOURCE")]
    pub cloudevents_source: Option<String>,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Topics")]
pub struct TopicArgs {
    /// Stop with an error instead of creating a missing topic.
    #[arg(long, env = "WALRELAY_NO_CREATE_TOPICS")]
    pub no_create_topics: bool,
    /// Partitions of topics walrelay creates (default 1). An existing topic
    /// keeps its own count; one with fewer is named at start, with the fix.
    #[arg(long, env = "WALRELAY_TOPIC_PARTITIONS", value_name = "N", value_parser = clap::value_parser!(i32).range(1..))]
    pub topic_partitions: Option<i32>,
    /// Replicas of each partition of topics walrelay creates: a number, or
    /// default: the brokers' default.replication.factor (-1 means the
    /// same). An existing topic with fewer is named at start, with the fix.
    #[arg(
        long,
        env = "WALRELAY_TOPIC_REPLICATION_FACTOR",
        value_name = "N|default",
        default_value = "default",
        allow_negative_numbers = true
    )]
    pub topic_replication_factor: Replication,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Replication (--source wal)")]
pub struct StreamArgs {
    /// Most events produced and not yet acknowledged; reading WAL pauses at the limit.
    #[arg(long, env = "WALRELAY_MAX_IN_FLIGHT_EVENTS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_in_flight_events: u64,
    /// Most bytes of events produced and not yet acknowledged.
    #[arg(long, env = "WALRELAY_MAX_IN_FLIGHT_BYTES", default_value = "64MiB", value_parser = parse_size)]
    pub max_in_flight_bytes: u64,
    /// How often to send a status update to PostgreSQL even when nothing moved.
    #[arg(long, env = "WALRELAY_STATUS_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub status_interval: Duration,
    /// pgoutput protocol version (1-4); default: the highest the server speaks.
    #[arg(long, env = "WALRELAY_PROTO_VERSION", value_parser = clap::value_parser!(u32).range(1..=4))]
    pub proto_version: Option<u32>,
    /// Create the slot if it does not exist (otherwise a missing slot is an error:
    /// a slot that vanished may mean lost events).
    #[arg(long, env = "WALRELAY_CREATE_SLOT")]
    pub create_slot: bool,
    /// How often to emit a transactional heartbeat message, so the slot advances
    /// while the outbox is idle and other tables are busy; 0 turns it off.
    #[arg(long, env = "WALRELAY_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// Prefix of the heartbeat messages (never published).
    #[arg(long, env = "WALRELAY_HEARTBEAT_PREFIX", default_value = crate::relay::heartbeat::DEFAULT_PREFIX)]
    pub heartbeat_prefix: String,
    /// While another relay holds the slot, how often to ask for it (standby mode).
    #[arg(long, env = "WALRELAY_STANDBY_RETRY", default_value = "2s", value_parser = parse_duration)]
    pub standby_retry: Duration,
    /// Nothing from the server for this long, though asked to answer: the
    /// session is taken for lost and the relay connects again (to another
    /// host of --pg-url if there is one). TCP keepalives (the URL's
    /// keepalives_* parameters) notice a dead peer too.
    #[arg(long, env = "WALRELAY_REPLICATION_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub replication_timeout: Duration,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Delivery")]
pub struct DeliveryArgs {
    /// exactly-once: every event once in Kafka (records carry their position,
    /// a restarted relay skips what a partition holds); at-least-once: a
    /// restart may publish again what was not yet confirmed.
    /// (default: exactly-once, for both sources)
    #[arg(long, env = "WALRELAY_DELIVERY", value_enum)]
    pub delivery: Option<DeliveryGuarantee>,
    /// Exactly once: the Kafka transactional id this relay's records are
    /// written under, with <id>.spare and <id>.spare2 (a relay taking over
    /// the slot takes them over too, which fences the one before). Default:
    /// walrelay.<system identifier>.<slot>.
    #[arg(long, env = "WALRELAY_TRANSACTIONAL_ID")]
    pub transactional_id: Option<String>,
    /// Exactly once: records of a partition's tail read at most when looking
    /// for this relay's own (others' records are passed over).
    #[arg(long, env = "WALRELAY_EXACTLY_ONCE_LOOKBACK", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub exactly_once_lookback: u64,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Polling (--source poll)")]
pub struct PollArgs {
    /// wal: stream from the replication slot; poll: poll the outbox table
    /// (no logical replication needed; set it up with
    /// `walrelay setup --source poll`).
    #[arg(long, env = "WALRELAY_SOURCE", value_enum, default_value = "wal")]
    pub source: SourceKind,
    /// --source poll: longest wait between polls of an idle outbox (a
    /// NOTIFY from the insert trigger wakes the relay sooner).
    #[arg(long, env = "WALRELAY_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// --source poll: batches in flight at once, each on a connection of its
    /// own: one is claimed while others are published and settled.
    #[arg(long, env = "WALRELAY_POLL_CONNECTIONS", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=32))]
    pub poll_connections: u64,
    /// --source poll: rows claimed at most per batch.
    #[arg(long, env = "WALRELAY_POLL_BATCH_SIZE", default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub poll_batch_size: u64,
    /// --source poll: what to do with a published row: delete it, or set
    /// published_at and keep it.
    #[arg(
        long,
        env = "WALRELAY_ON_PUBLISHED",
        value_enum,
        default_value = "delete"
    )]
    pub on_published: OnPublished,
    /// --source poll: a row that failed this many times goes to the
    /// dead-letter topic.
    #[arg(long, env = "WALRELAY_MAX_ATTEMPTS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,
}

impl RunArgs {
    /// Validates the Kafka options and builds the sink's settings.
    pub fn sink_settings(&self) -> Result<SinkSettings, UsageError> {
        let overrides = parse_kafka_options(&self.kafka.kafka_options)?;
        if self.kafka.brokers.trim().is_empty() {
            return Err(UsageError(
                "--brokers is empty: name at least one broker, such as localhost:9092".into(),
            ));
        }
        let producer = ProducerSettings {
            brokers: self.kafka.brokers.clone(),
            overrides,
        };
        producer.validate().map_err(UsageError)?;
        let exactly_once = self.poll.source == SourceKind::Wal
            && self
                .delivery
                .delivery
                .unwrap_or(DeliveryGuarantee::ExactlyOnce)
                == DeliveryGuarantee::ExactlyOnce;
        Ok(SinkSettings {
            producer,
            transactional: exactly_once,
            create_topics: !self.topics.no_create_topics,
            topics: TopicSpec {
                partitions: self.topics.topic_partitions,
                replication: self.topics.topic_replication_factor,
            },
        })
    }

    /// Validates everything else and builds the relay's configuration.
    pub fn relay_config(&self) -> Result<RelayConfig, UsageError> {
        let (pg, router) = self.pg_and_router()?;
        if self.stream.heartbeat_prefix.is_empty()
            || self.stream.heartbeat_prefix == self.routing.message_prefix
        {
            return Err(UsageError(
                "--heartbeat-prefix must be non-empty and differ from --message-prefix (heartbeats are never published)".into(),
            ));
        }
        Ok(RelayConfig {
            pg,
            slot: self.outbox.slot.clone(),
            publication: self.outbox.publication.clone(),
            router,
            max_in_flight_events: self.stream.max_in_flight_events as usize,
            max_in_flight_bytes: self.stream.max_in_flight_bytes as usize,
            status_interval: self.stream.status_interval,
            shutdown_timeout: self.shutdown_timeout,
            proto_version: self.stream.proto_version,
            max_backoff: self.max_backoff,
            permanent_error_attempts: 3,
            standby_retry: self.stream.standby_retry,
            broker_stall_timeout: self.broker_stall_timeout,
            delivery: self
                .delivery
                .delivery
                .unwrap_or(DeliveryGuarantee::ExactlyOnce),
            exactly_once_lookback: self.delivery.exactly_once_lookback as usize,
            heartbeat_prefix: self.stream.heartbeat_prefix.clone(),
            transactional_id: self.delivery.transactional_id.clone(),
            dead_letter_table: self.outbox.dead_letter_table()?,
            replication_timeout: self.stream.replication_timeout,
            primary: self.primary.connection_config()?,
        })
    }

    /// Retention's configuration, when `--retain` is given.
    pub fn retention_config(
        &self,
    ) -> Result<Option<crate::retention::RetentionConfig>, UsageError> {
        let Some(retain) = self.retention.retain else {
            return Ok(None);
        };
        if self.poll.source == SourceKind::Poll {
            return Err(UsageError(
                "--retain works with --source wal; the polling source removes rows itself (--on-published delete, or mark and delete them on your schedule)".into(),
            ));
        }
        if self.retention.retain_interval.is_zero() {
            return Err(UsageError(
                "--retain-interval must be greater than zero, such as 10s".into(),
            ));
        }
        Ok(Some(crate::retention::RetentionConfig {
            pg: self.pg.connection_config()?,
            slot: self.outbox.slot.clone(),
            tables: self.outbox.tables()?,
            created_at_column: self.outbox.created_at_column.clone(),
            retain,
            batch_size: self.retention.retain_batch_size,
            interval: self.retention.retain_interval,
        }))
    }

    /// The polling source's configuration (`--source poll`).
    pub fn poll_config(&self) -> Result<PollConfig, UsageError> {
        let (pg, router) = self.pg_and_router()?;
        if self.poll.poll_interval.is_zero() {
            return Err(UsageError(
                "--poll-interval must be greater than zero".into(),
            ));
        }
        Ok(PollConfig {
            pg,
            router,
            batch_size: self.poll.poll_batch_size as usize,
            lanes: self.poll.poll_connections as usize,
            delivery: self
                .delivery
                .delivery
                .unwrap_or(DeliveryGuarantee::ExactlyOnce),
            exactly_once_lookback: self.delivery.exactly_once_lookback as usize,
            poll_interval: self.poll.poll_interval,
            on_published: self.poll.on_published,
            max_attempts: self.poll.max_attempts,
            max_backoff: self.max_backoff,
            broker_stall_timeout: self.broker_stall_timeout,
            shutdown_timeout: self.shutdown_timeout,
            permanent_error_attempts: 3,
            dead_letter_table: self.outbox.dead_letter_table()?,
        })
    }

    /// What both sources share: the URL and the routing.
    fn pg_and_router(&self) -> Result<(ConnectionConfig, RouterConfig), UsageError> {
        let pg = self.pg.connection_config()?;
        if pg.hosts.len() > 1
            && !matches!(
                pg.target_session_attrs,
                TargetSessionAttrs::ReadWrite
                    | TargetSessionAttrs::Primary
                    | TargetSessionAttrs::Standby
                    | TargetSessionAttrs::PreferStandby
            )
        {
            return Err(UsageError(format!(
                "--pg-url names {} hosts with target_session_attrs={}: say which server the relay decodes from: add target_session_attrs=read-write (the primary), or standby (a standby, PostgreSQL 16+)",
                pg.hosts.len(),
                pg.target_session_attrs.as_str()
            )));
        }
        let topic_template: TopicTemplate = self
            .routing
            .topic_template
            .parse()
            .map_err(|e| UsageError(format!("--topic-template {e}")))?;
        check_topic_name(&self.routing.dead_letter_topic)
            .map_err(|e| UsageError(format!("--dead-letter-topic: {e}")))?;
        let header_columns = self
            .routing
            .header_columns
            .iter()
            .map(|h| {
                h.parse::<HeaderColumn>()
                    .map_err(|e| UsageError(format!("--header-column {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if self.routing.message_prefix.is_empty() {
            return Err(UsageError("--message-prefix must not be empty".into()));
        }
        if self.stream.standby_retry.is_zero()
            || self.stream.status_interval.is_zero()
            || self.broker_stall_timeout.is_zero()
        {
            return Err(UsageError(
                "--standby-retry, --status-interval and --broker-stall-timeout must be greater than zero".into(),
            ));
        }
        let router = RouterConfig {
            tables: self.outbox.tables()?,
            columns: self.outbox.columns(),
            header_columns,
            topic_template,
            message_prefix: self.routing.message_prefix.clone(),
            dead_letter_topic: self.routing.dead_letter_topic.clone(),
            cloudevents: !self.routing.no_cloudevents,
            cloudevents_source: self.routing.cloudevents_source.clone(),
        };
        Ok((pg, router))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Cli, Command};
    use crate::kafka::{Replication, TopicSpec};

    fn topics(extra: &[&str]) -> Result<TopicSpec, String> {
        let mut args = vec!["walrelay", "run", "--pg-url", "postgres://u@h/db"];
        args.extend(["--brokers", "k:9092"]);
        args.extend(extra);
        let cli = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
        let Command::Run(run) = cli.command else {
            unreachable!("parsed as run")
        };
        Ok(run.sink_settings().map_err(|e| e.0)?.topics)
    }

    #[test]
    fn topic_flags_take_a_replica_count_or_default_and_tell_whether_partitions_were_given() {
        assert_eq!(topics(&[]), Ok(TopicSpec::default()));
        assert_eq!(
            topics(&["--topic-partitions", "8", "--topic-replication-factor", "3"]),
            Ok(TopicSpec {
                partitions: Some(8),
                replication: Replication::Factor(3),
            })
        );
        for default in ["default", "-1"] {
            assert_eq!(
                topics(&["--topic-replication-factor", default]).map(|t| t.replication),
                Ok(Replication::ClusterDefault)
            );
        }
        let zero = topics(&["--topic-replication-factor", "0"]).unwrap_err();
        assert!(zero.contains("or default"), "{zero}");
    }

    fn relay_config(url: &str) -> Result<(), String> {
        let cli = Cli::try_parse_from(["walrelay", "run", "--pg-url", url, "--brokers", "k:9092"])
            .map_err(|e| e.to_string())?;
        let Command::Run(run) = cli.command else {
            unreachable!("parsed as run")
        };
        run.relay_config().map(|_| ()).map_err(|e| e.0)
    }

    #[test]
    fn several_hosts_must_say_whether_the_relay_decodes_from_the_primary_or_a_standby() {
        for attrs in ["read-write", "primary", "standby", "prefer-standby"] {
            assert_eq!(
                relay_config(&format!(
                    "postgres://u@h1,h2/db?target_session_attrs={attrs}"
                )),
                Ok(()),
                "{attrs}"
            );
        }
        let any = relay_config("postgres://u@h1,h2/db").unwrap_err();
        assert!(
            any.contains("target_session_attrs=read-write") && any.contains("standby"),
            "{any}"
        );
    }
}
