//! The commands' flags, each also read from an environment variable, and
//! their validation into the configurations the commands run with.

use std::time::Duration;

use clap::Args;

use super::UsageError;
use super::values::{parse_duration, parse_size};
use crate::kafka::{ProducerSettings, SinkSettings};
use crate::poll::{OnPublished, PollConfig};
use crate::postgres::{TargetSessionAttrs, redact_url};
use crate::relay::{DeliveryGuarantee, RelayConfig};
use crate::replication::ConnectionConfig;
use crate::router::{HeaderColumn, OutboxColumns, RouterConfig, TopicTemplate, check_topic_name};

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
        ConnectionConfig::from_url(&self.pg_url)
            .map_err(|e| UsageError(format!("--pg-url {}: {e}", redact_url(&self.pg_url))))
    }
}

/// The slot, the publication and the outbox tables.
#[derive(Debug, Clone, Args)]
pub struct OutboxArgs {
    /// Logical replication slot (pgoutput).
    #[arg(long, env = "WALRELAY_SLOT", default_value = "walrelay")]
    pub slot: String,
    /// Publication covering the outbox tables.
    #[arg(long, env = "WALRELAY_PUBLICATION", default_value = "walrelay")]
    pub publication: String,
    /// Outbox table as schema.table; repeat (or separate with commas) for several.
    #[arg(
        long = "table",
        env = "WALRELAY_TABLE",
        default_value = "public.outbox",
        value_delimiter = ','
    )]
    pub tables: Vec<String>,
    #[arg(long, env = "WALRELAY_ID_COLUMN", default_value = "id")]
    pub id_column: String,
    #[arg(
        long,
        env = "WALRELAY_AGGREGATE_TYPE_COLUMN",
        default_value = "aggregate_type"
    )]
    pub aggregate_type_column: String,
    /// Becomes the Kafka key: events of one aggregate stay in order.
    #[arg(
        long,
        env = "WALRELAY_AGGREGATE_ID_COLUMN",
        default_value = "aggregate_id"
    )]
    pub aggregate_id_column: String,
    #[arg(long, env = "WALRELAY_EVENT_TYPE_COLUMN", default_value = "event_type")]
    pub event_type_column: String,
    /// Becomes the Kafka value (jsonb, json, text or bytea).
    #[arg(long, env = "WALRELAY_PAYLOAD_COLUMN", default_value = "payload")]
    pub payload_column: String,
    /// A jsonb object whose string members become Kafka headers.
    #[arg(long, env = "WALRELAY_HEADERS_COLUMN", default_value = "headers")]
    pub headers_column: String,
    /// Its time becomes the CloudEvents ce_time header.
    #[arg(long, env = "WALRELAY_CREATED_AT_COLUMN", default_value = "created_at")]
    pub created_at_column: String,
}

impl OutboxArgs {
    pub fn tables(&self) -> Result<Vec<(String, String)>, UsageError> {
        self.tables
            .iter()
            .map(|t| {
                let (schema, table) = t.split_once('.').unwrap_or(("public", t.as_str()));
                if schema.is_empty() || table.is_empty() || table.contains('.') {
                    return Err(UsageError(format!(
                        "--table {t:?}: expected schema.table, such as public.outbox"
                    )));
                }
                Ok((schema.to_owned(), table.to_owned()))
            })
            .collect()
    }

    pub fn columns(&self) -> OutboxColumns {
        OutboxColumns {
            id: self.id_column.clone(),
            aggregate_type: self.aggregate_type_column.clone(),
            aggregate_id: self.aggregate_id_column.clone(),
            event_type: self.event_type_column.clone(),
            payload: self.payload_column.clone(),
            headers: self.headers_column.clone(),
            created_at: self.created_at_column.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct SetupArgs {
    #[command(flatten)]
    pub pg: PgArgs,
    #[command(flatten)]
    pub outbox: OutboxArgs,
    /// Do not make the slot a failover slot (PostgreSQL 17+ keeps failover
    /// slots on standbys with sync_replication_slots = on).
    #[arg(long, env = "WALRELAY_NO_FAILOVER")]
    pub no_failover: bool,
    /// wal: the publication and the slot; poll: the columns, triggers and
    /// index `run --source poll` needs (no logical replication).
    #[arg(long, env = "WALRELAY_SOURCE", value_enum, default_value = "wal")]
    pub source: SourceKind,
    /// The inbox's tables instead (for `walrelay inbox`, usually in the
    /// consumer's database): TABLE, its `_offsets` and its
    /// `_dead_letters`. Without a value, public.inbox.
    #[arg(
        long,
        env = "WALRELAY_SETUP_INBOX",
        value_name = "TABLE",
        num_args = 0..=1,
        default_missing_value = "public.inbox"
    )]
    pub inbox: Option<String>,
}

/// Where `run` reads events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    /// Logical replication: a slot on a publication (needs wal_level =
    /// logical and the REPLICATION attribute).
    Wal,
    /// Polling the outbox table: claim, publish, delete or mark.
    Poll,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub pg: PgArgs,
    /// Only this slot (default: all slots).
    #[arg(long, env = "WALRELAY_STATUS_SLOT")]
    pub slot: Option<String>,
    /// Refresh every two seconds, in place, until Ctrl-C.
    #[arg(long)]
    pub watch: bool,
    /// JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub pg: PgArgs,
    #[command(flatten)]
    pub outbox: OutboxArgs,
    /// Kafka bootstrap servers, host:port[,host:port...].
    #[arg(long, env = "WALRELAY_BROKERS")]
    pub brokers: String,
    /// librdkafka option key=value, as kcat's -X (TLS, SASL, linger.ms, ...).
    #[arg(
        short = 'X',
        value_name = "KEY=VALUE",
        env = "WALRELAY_KAFKA_OPTIONS",
        value_delimiter = ';',
        hide_env_values = true
    )]
    pub kafka_options: Vec<String>,
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
    /// Stop with an error instead of creating a missing topic.
    #[arg(long, env = "WALRELAY_NO_CREATE_TOPICS")]
    pub no_create_topics: bool,
    /// Partitions of topics walrelay creates.
    #[arg(long, env = "WALRELAY_TOPIC_PARTITIONS", default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..))]
    pub topic_partitions: i32,
    /// Replication factor of topics walrelay creates.
    #[arg(long, env = "WALRELAY_TOPIC_REPLICATION_FACTOR", default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..))]
    pub topic_replication_factor: i32,
    /// Most events produced and not yet acknowledged; reading WAL pauses at the limit.
    #[arg(long, env = "WALRELAY_MAX_IN_FLIGHT_EVENTS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_in_flight_events: u64,
    /// Most bytes of events produced and not yet acknowledged.
    #[arg(long, env = "WALRELAY_MAX_IN_FLIGHT_BYTES", default_value = "64MiB", value_parser = parse_size)]
    pub max_in_flight_bytes: u64,
    /// How often to send a status update to PostgreSQL even when nothing moved.
    #[arg(long, env = "WALRELAY_STATUS_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub status_interval: Duration,
    /// How long a stop waits for in-flight events to be acknowledged.
    #[arg(long, env = "WALRELAY_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Longest wait between reconnect attempts.
    #[arg(long, env = "WALRELAY_MAX_BACKOFF", default_value = "30s", value_parser = parse_duration)]
    pub max_backoff: Duration,
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
    #[arg(long, env = "WALRELAY_HEARTBEAT_PREFIX", default_value = crate::heartbeat::DEFAULT_PREFIX)]
    pub heartbeat_prefix: String,
    /// While another relay holds the slot, how often to ask for it (standby mode).
    #[arg(long, env = "WALRELAY_STANDBY_RETRY", default_value = "2s", value_parser = parse_duration)]
    pub standby_retry: Duration,
    /// exactly-once: every event once in Kafka (records carry their position,
    /// a restarted relay skips what a partition holds); at-least-once: a
    /// restart may publish again what was not yet confirmed.
    /// (default: exactly-once; --source poll delivers at least once)
    #[arg(long, env = "WALRELAY_DELIVERY", value_enum)]
    pub delivery: Option<DeliveryGuarantee>,
    /// Exactly once: the Kafka transactional id this relay's records are
    /// written under (a relay taking over the slot takes it over too, which
    /// fences the one before). Default: walrelay.<system identifier>.<slot>.
    #[arg(long, env = "WALRELAY_TRANSACTIONAL_ID")]
    pub transactional_id: Option<String>,
    /// wal: stream from the replication slot; poll: poll the outbox table
    /// (no logical replication needed; at least once; set it up with
    /// `walrelay setup --source poll`).
    #[arg(long, env = "WALRELAY_SOURCE", value_enum, default_value = "wal")]
    pub source: SourceKind,
    /// --source poll: longest wait between polls of an idle outbox (a
    /// NOTIFY from the insert trigger wakes the relay sooner).
    #[arg(long, env = "WALRELAY_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub poll_interval: Duration,
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
    /// Exactly once: records of a partition's tail read at most when looking
    /// for this relay's own (others' records are passed over).
    #[arg(long, env = "WALRELAY_EXACTLY_ONCE_LOOKBACK", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub exactly_once_lookback: u64,
    /// When events wait and the broker acknowledged nothing for this long,
    /// end the replication session (so PostgreSQL can shut down) and stream
    /// again once the broker answers.
    #[arg(long, env = "WALRELAY_BROKER_STALL_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub broker_stall_timeout: Duration,
    /// Address of the HTTP server: /metrics, /healthz, /readyz and the dashboard at /.
    #[arg(long, env = "WALRELAY_HTTP_ADDR", default_value = "127.0.0.1:9187")]
    pub http_addr: String,
}

impl RunArgs {
    /// Validates the Kafka options and builds the sink's settings.
    pub fn sink_settings(&self) -> Result<SinkSettings, UsageError> {
        let overrides = parse_kafka_options(&self.kafka_options)?;
        if self.brokers.trim().is_empty() {
            return Err(UsageError(
                "--brokers is empty: name at least one broker, such as localhost:9092".into(),
            ));
        }
        let producer = ProducerSettings {
            brokers: self.brokers.clone(),
            overrides,
        };
        producer.validate().map_err(UsageError)?;
        let exactly_once = self.source == SourceKind::Wal
            && self.delivery.unwrap_or(DeliveryGuarantee::ExactlyOnce)
                == DeliveryGuarantee::ExactlyOnce;
        Ok(SinkSettings {
            producer,
            transactional: exactly_once,
            create_topics: !self.no_create_topics,
            topic_partitions: self.topic_partitions,
            topic_replication_factor: self.topic_replication_factor,
        })
    }

    /// Validates everything else and builds the relay's configuration.
    pub fn relay_config(&self) -> Result<RelayConfig, UsageError> {
        let (pg, router) = self.pg_and_router()?;
        if self.heartbeat_prefix.is_empty() || self.heartbeat_prefix == self.message_prefix {
            return Err(UsageError(
                "--heartbeat-prefix must be non-empty and differ from --message-prefix (heartbeats are never published)".into(),
            ));
        }
        Ok(RelayConfig {
            pg,
            slot: self.outbox.slot.clone(),
            publication: self.outbox.publication.clone(),
            router,
            max_in_flight_events: self.max_in_flight_events as usize,
            max_in_flight_bytes: self.max_in_flight_bytes as usize,
            status_interval: self.status_interval,
            shutdown_timeout: self.shutdown_timeout,
            proto_version: self.proto_version,
            max_backoff: self.max_backoff,
            permanent_error_attempts: 3,
            standby_retry: self.standby_retry,
            broker_stall_timeout: self.broker_stall_timeout,
            delivery: self.delivery.unwrap_or(DeliveryGuarantee::ExactlyOnce),
            exactly_once_lookback: self.exactly_once_lookback as usize,
            heartbeat_prefix: self.heartbeat_prefix.clone(),
            transactional_id: self.transactional_id.clone(),
        })
    }

    /// The polling source's configuration (`--source poll`).
    pub fn poll_config(&self) -> Result<PollConfig, UsageError> {
        if self.delivery == Some(DeliveryGuarantee::ExactlyOnce) {
            return Err(UsageError(
                "--source poll delivers at least once (a polled row has no log position to recognise it by in Kafka): drop --delivery exactly-once, and let consumers dedupe on the id header (walrelay inbox does)".into(),
            ));
        }
        let (pg, router) = self.pg_and_router()?;
        if self.poll_interval.is_zero() {
            return Err(UsageError(
                "--poll-interval must be greater than zero".into(),
            ));
        }
        Ok(PollConfig {
            pg,
            router,
            batch_size: self.poll_batch_size as usize,
            poll_interval: self.poll_interval,
            on_published: self.on_published,
            max_attempts: self.max_attempts,
            max_backoff: self.max_backoff,
            broker_stall_timeout: self.broker_stall_timeout,
            shutdown_timeout: self.shutdown_timeout,
            permanent_error_attempts: 3,
        })
    }

    /// What both sources share: the URL and the routing.
    fn pg_and_router(&self) -> Result<(ConnectionConfig, RouterConfig), UsageError> {
        let pg = self.pg.connection_config()?;
        if pg.hosts.len() > 1
            && !matches!(
                pg.target_session_attrs,
                TargetSessionAttrs::ReadWrite | TargetSessionAttrs::Primary
            )
        {
            return Err(UsageError(format!(
                "--pg-url names {} hosts with target_session_attrs={}: the relay needs the primary, so add target_session_attrs=read-write (or primary)",
                pg.hosts.len(),
                pg.target_session_attrs.as_str()
            )));
        }
        let topic_template: TopicTemplate = self
            .topic_template
            .parse()
            .map_err(|e| UsageError(format!("--topic-template {e}")))?;
        check_topic_name(&self.dead_letter_topic)
            .map_err(|e| UsageError(format!("--dead-letter-topic: {e}")))?;
        let header_columns = self
            .header_columns
            .iter()
            .map(|h| {
                h.parse::<HeaderColumn>()
                    .map_err(|e| UsageError(format!("--header-column {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if self.message_prefix.is_empty() {
            return Err(UsageError("--message-prefix must not be empty".into()));
        }
        if self.standby_retry.is_zero()
            || self.status_interval.is_zero()
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
            message_prefix: self.message_prefix.clone(),
            dead_letter_topic: self.dead_letter_topic.clone(),
            cloudevents: !self.no_cloudevents,
            cloudevents_source: self.cloudevents_source.clone(),
        };
        Ok((pg, router))
    }
}

#[derive(Debug, Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub pg: PgArgs,
    /// Publication(s) to stream; repeat the flag for several.
    #[arg(
        long = "publication",
        env = "WALRELAY_PUBLICATION",
        default_value = "walrelay",
        value_delimiter = ','
    )]
    pub publications: Vec<String>,
    /// pgoutput protocol version (1-4); default: the highest the server speaks.
    #[arg(long, env = "WALRELAY_PROTO_VERSION", value_parser = clap::value_parser!(u32).range(1..=4))]
    pub proto_version: Option<u32>,
}

#[derive(Debug, Args)]
pub struct InboxArgs {
    #[command(flatten)]
    pub pg: PgArgs,
    /// Kafka bootstrap servers, host:port[,host:port...].
    #[arg(long, env = "WALRELAY_BROKERS")]
    pub brokers: String,
    /// A topic to consume, or a regular expression when it starts with ^
    /// (^outbox\..* consumes every topic of the default template).
    /// Repeat it for several.
    #[arg(
        long = "topic",
        env = "WALRELAY_INBOX_TOPICS",
        value_delimiter = ',',
        required = true
    )]
    pub topics: Vec<String>,
    /// The inbox table (`walrelay setup --inbox` creates it).
    #[arg(long, env = "WALRELAY_INBOX_TABLE", default_value = "public.inbox")]
    pub table: String,
    /// The consumer group: instances of one group share the partitions.
    #[arg(long, env = "WALRELAY_INBOX_GROUP", default_value = "walrelay-inbox")]
    pub group: String,
    /// Records per PostgreSQL transaction, at most.
    #[arg(long, env = "WALRELAY_INBOX_BATCH_SIZE", default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub batch_size: u64,
    /// How long a batch waits to fill before it is stored anyway.
    #[arg(long, env = "WALRELAY_INBOX_BATCH_WAIT", default_value = "100ms", value_parser = parse_duration)]
    pub batch_wait: Duration,
    /// Longest wait between attempts to reach PostgreSQL again.
    #[arg(long, env = "WALRELAY_MAX_BACKOFF", default_value = "30s", value_parser = parse_duration)]
    pub max_backoff: Duration,
    /// librdkafka consumer option key=value, as kcat's -X (TLS, SASL,
    /// session.timeout.ms, ...).
    #[arg(
        short = 'X',
        value_name = "KEY=VALUE",
        env = "WALRELAY_KAFKA_OPTIONS",
        value_delimiter = ';',
        hide_env_values = true
    )]
    pub kafka_options: Vec<String>,
    /// Address of the HTTP server: /metrics, /healthz, /readyz, the dashboard.
    #[arg(long, env = "WALRELAY_HTTP_ADDR", default_value = "127.0.0.1:9187")]
    pub http_addr: String,
}

impl InboxArgs {
    pub fn inbox_config(&self) -> Result<crate::inbox::InboxConfig, UsageError> {
        let overrides = parse_kafka_options(&self.kafka_options)?;
        for (key, _) in &overrides {
            if matches!(
                key.as_str(),
                "enable.auto.commit" | "enable.auto.offset.store" | "group.id"
            ) {
                return Err(UsageError(format!(
                    "-X {key}: the inbox keeps its offsets in PostgreSQL and its group in --group; leave {key} to walrelay"
                )));
            }
        }
        if self.brokers.trim().is_empty() {
            return Err(UsageError(
                "--brokers is empty: name at least one broker, such as localhost:9092".into(),
            ));
        }
        let topics: Vec<String> = self
            .topics
            .iter()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect();
        if topics.is_empty() {
            return Err(UsageError(
                "--topic is empty: name a topic, or a regular expression starting with ^".into(),
            ));
        }
        if self.group.trim().is_empty() {
            return Err(UsageError(
                "--group is empty: name the consumer group".into(),
            ));
        }
        Ok(crate::inbox::InboxConfig {
            pg: self.pg.connection_config()?,
            brokers: self.brokers.clone(),
            overrides,
            topics,
            tables: inbox_tables(&self.table, "--table")?,
            group: self.group.clone(),
            batch_size: self.batch_size as usize,
            batch_wait: self.batch_wait,
            max_backoff: self.max_backoff,
        })
    }
}

/// `schema.table` of an inbox table, or which flag is wrong.
pub fn inbox_tables(name: &str, flag: &str) -> Result<crate::inbox::InboxTables, UsageError> {
    let (schema, table) = name.split_once('.').unwrap_or(("public", name));
    if schema.is_empty() || table.is_empty() || table.contains('.') {
        return Err(UsageError(format!(
            "{flag} {name:?}: expected schema.table, such as public.inbox"
        )));
    }
    Ok(crate::inbox::InboxTables::new(schema, table))
}

/// `-X key=value` options.
fn parse_kafka_options(options: &[String]) -> Result<Vec<(String, String)>, UsageError> {
    options
        .iter()
        .map(|o| match o.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
            _ => Err(UsageError(format!(
                "-X {o:?}: expected KEY=VALUE, such as -X linger.ms=10"
            ))),
        })
        .collect()
}
