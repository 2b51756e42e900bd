//! The commands' flags, each also read from an environment variable, and
//! their validation into the configurations the commands run with.

use std::time::Duration;

use clap::Args;

use super::UsageError;
use super::values::parse_duration;
use crate::commands::setup::SetupOptions;
use crate::postgres::redact_url;
use crate::replication::ConnectionConfig;
use crate::router::OutboxColumns;

/// How to reach PostgreSQL.
#[derive(Debug, Clone, Args)]
pub struct PgArgs {
    /// PostgreSQL connection, as a URL
    /// (postgres://user:password@host:port/db?sslmode=verify-full) or a
    /// libpq keyword/value string (host=db dbname=app user=walrelay).
    /// What it leaves out comes from libpq's variables (PGHOST, PGPORT,
    /// PGUSER, PGPASSWORD, PGDATABASE, PGSSLMODE, PGSSLROOTCERT, ...) and
    /// password file (PGPASSFILE, ~/.pgpass); left out entirely, they give
    /// it all. A Unix socket directory goes in host=/var/run/postgresql.
    #[arg(
        long,
        env = "WALRELAY_PG_URL",
        hide_env_values = true,
        default_value = ""
    )]
    pub pg_url: String,
}

impl PgArgs {
    /// The parsed connection string, or a configuration error naming the flag.
    pub fn connection_config(&self) -> Result<ConnectionConfig, UsageError> {
        ConnectionConfig::from_url(&self.pg_url).map_err(|e| match self.pg_url.trim() {
            "" => UsageError(format!("the PostgreSQL connection (no --pg-url): {e}")),
            url => UsageError(format!("--pg-url {}: {e}", redact_url(url))),
        })
    }
}

/// The primary, when --pg-url is a standby the relay decodes from
/// (PostgreSQL 16+).
#[derive(Debug, Clone, Args)]
pub struct PrimaryArgs {
    /// When --pg-url is a standby (decoding there, PostgreSQL 16+): the
    /// primary's URL, where what a standby cannot do is written (the
    /// heartbeat, walrelay's record of its slots, the dead-letter table,
    /// setup's table and publication, recover's and backfill's progress)
    /// and where slot creation asks for the snapshot it waits for. Unused
    /// while --pg-url is a primary.
    #[arg(long, env = "WALRELAY_PRIMARY_URL", hide_env_values = true)]
    pub primary_url: Option<String>,
}

impl PrimaryArgs {
    /// The parsed URL, if given.
    pub fn connection_config(&self) -> Result<Option<ConnectionConfig>, UsageError> {
        self.primary_url
            .as_deref()
            .map(|url| {
                ConnectionConfig::from_url(url)
                    .map_err(|e| UsageError(format!("--primary-url {}: {e}", redact_url(url))))
            })
            .transpose()
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
    /// The event id: the Kafka `id` header consumers de-duplicate on.
    #[arg(long, env = "WALRELAY_ID_COLUMN", default_value = "id")]
    pub id_column: String,
    /// Routes the event to a topic ({aggregate_type} in --topic-template).
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
    /// Becomes the Kafka `event_type` header (and CloudEvents ce_type).
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
    /// Where an event the broker will never take (too large, invalid) is
    /// kept whole, before its position is confirmed or its row deleted.
    #[arg(long, env = "WALRELAY_DEAD_LETTER_TABLE", default_value = crate::dead_letters::DEFAULT_TABLE)]
    pub dead_letter_table: String,
}

/// `schema.table` (or `table`, in public) as a pair.
fn schema_table(flag: &str, text: &str) -> Result<(String, String), UsageError> {
    let (schema, table) = text.split_once('.').unwrap_or(("public", text));
    if schema.is_empty() || table.is_empty() || table.contains('.') {
        return Err(UsageError(format!(
            "{flag} {text:?}: expected schema.table, such as public.outbox"
        )));
    }
    Ok((schema.to_owned(), table.to_owned()))
}

impl OutboxArgs {
    pub fn tables(&self) -> Result<Vec<(String, String)>, UsageError> {
        self.tables
            .iter()
            .map(|t| schema_table("--table", t))
            .collect()
    }

    pub fn dead_letter_table(&self) -> Result<(String, String), UsageError> {
        schema_table("--dead-letter-table", &self.dead_letter_table)
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
    pub primary: PrimaryArgs,
    #[command(flatten)]
    pub outbox: OutboxArgs,
    /// Do not make the slot a failover slot (PostgreSQL 17+ keeps failover
    /// slots on standbys with sync_replication_slots = on).
    #[arg(long, env = "WALRELAY_NO_FAILOVER")]
    pub no_failover: bool,
    /// Make the slot even though walrelay streamed from a slot of that name
    /// that is gone (dropped, invalidated, or not on a promoted server).
    /// Events committed since it was lost are then never streamed: prefer
    /// `walrelay recover`. Never put this in an init container.
    #[arg(long, env = "WALRELAY_NEW_SLOT")]
    pub new_slot: bool,
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
    /// The retention `run --retain` will use: setup creates (and check
    /// looks for) the index on the created-at column its pruning walks.
    #[arg(long, env = "WALRELAY_RETAIN", value_parser = super::values::parse_retention)]
    pub retain: Option<std::time::Duration>,
}

impl SetupArgs {
    /// What `setup` makes and `check` looks for, from the flags.
    pub fn options(&self) -> Result<SetupOptions, UsageError> {
        Ok(SetupOptions {
            tables: self.outbox.tables()?,
            columns: self.outbox.columns(),
            publication: self.outbox.publication.clone(),
            slot: self.outbox.slot.clone(),
            failover: !self.no_failover,
            poll: self.source == SourceKind::Poll,
            dead_letter_table: self.outbox.dead_letter_table()?,
            new_slot: self.new_slot,
            retain: self.retain.is_some(),
            primary: self.primary.connection_config()?,
        })
    }
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub setup: SetupArgs,
    #[command(flatten)]
    pub kafka: CheckKafkaArgs,
}

/// The topics `check` looks at, when it is given the brokers.
#[derive(Debug, Args)]
#[command(next_help_heading = "Kafka")]
pub struct CheckKafkaArgs {
    /// Kafka bootstrap servers: check the topics walrelay writes too (their
    /// replication factor and min.insync.replicas). Without it, only
    /// PostgreSQL is checked.
    #[arg(long, env = "WALRELAY_BROKERS")]
    pub brokers: Option<String>,
    /// librdkafka option key=value, as `run` takes them (TLS, SASL).
    #[arg(
        short = 'X',
        value_name = "KEY=VALUE",
        env = "WALRELAY_KAFKA_OPTIONS",
        value_delimiter = ';',
        hide_env_values = true
    )]
    pub kafka_options: Vec<String>,
    /// The topics checked are those this template makes (as `run`'s).
    #[arg(
        long,
        env = "WALRELAY_TOPIC_TEMPLATE",
        default_value = "outbox.event.{aggregate_type}"
    )]
    pub topic_template: String,
    /// Checked too, as `run`'s.
    #[arg(
        long,
        env = "WALRELAY_DEAD_LETTER_TOPIC",
        default_value = "walrelay.dead-letter"
    )]
    pub dead_letter_topic: String,
}

impl CheckKafkaArgs {
    /// The Kafka checks' options; `None` without --brokers.
    pub fn options(
        &self,
        tables: &[(String, String)],
    ) -> Result<Option<crate::commands::check_kafka::KafkaCheckOptions>, UsageError> {
        let Some(brokers) = self.brokers.as_deref().filter(|b| !b.trim().is_empty()) else {
            return Ok(None);
        };
        let producer = crate::kafka::ProducerSettings {
            brokers: brokers.to_owned(),
            overrides: parse_kafka_options(&self.kafka_options)?,
        };
        producer.validate().map_err(UsageError)?;
        let topic_template = self
            .topic_template
            .parse()
            .map_err(|e| UsageError(format!("--topic-template {e}")))?;
        crate::router::check_topic_name(&self.dead_letter_topic)
            .map_err(|e| UsageError(format!("--dead-letter-topic: {e}")))?;
        Ok(Some(crate::commands::check_kafka::KafkaCheckOptions {
            producer,
            topic_template,
            dead_letter_topic: self.dead_letter_topic.clone(),
            tables: tables.to_vec(),
        }))
    }
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
    #[command(flatten)]
    pub kafka: KafkaArgs,
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
    /// A partition whose stored offset is past its log's end, or stored
    /// under another topic id (the topic was deleted and created again, or
    /// its log truncated): fail stops with the topic, partition, offsets
    /// and ids; earliest reads the log now from its start (a record whose
    /// id is already in the inbox is skipped).
    #[arg(
        long,
        env = "WALRELAY_INBOX_ON_TOPIC_RESET",
        value_enum,
        default_value = "fail"
    )]
    pub on_topic_reset: crate::inbox::OnTopicReset,
    #[command(flatten)]
    pub http: HttpArgs,
}

/// How often a running inbox reads the ids of the topics it holds again.
const TOPIC_CHECK_INTERVAL: Duration = Duration::from_secs(10);

impl InboxArgs {
    pub fn inbox_config(&self) -> Result<crate::inbox::InboxConfig, UsageError> {
        let overrides = parse_kafka_options(&self.kafka.kafka_options)?;
        for (key, value) in &overrides {
            if crate::kafka::config::refuse_auto_create(key, value).is_err() {
                return Err(UsageError(format!(
                    "-X {key}={value}: the inbox never creates a topic (one made on first use gets the broker's defaults, and a misspelt --topic would wait on an empty topic); create topics with the relay or your tools, and leave this option unset"
                )));
            }
            if matches!(
                key.as_str(),
                "enable.auto.commit" | "enable.auto.offset.store" | "group.id"
            ) {
                return Err(UsageError(format!(
                    "-X {key}: the inbox keeps its offsets in PostgreSQL and its group in --group; leave {key} to walrelay"
                )));
            }
            match (key.as_str(), value.as_str()) {
                ("isolation.level", v) if v != "read_committed" => {
                    return Err(UsageError(format!(
                        "-X isolation.level={v}: the inbox reads read_committed, so records of aborted Kafka transactions are never stored; leave this option unset"
                    )));
                }
                ("auto.offset.reset", _) => {
                    return Err(UsageError(
                        "-X auto.offset.reset: the inbox starts each partition at the offset stored in PostgreSQL, and a topic made again is decided by --on-topic-reset; leave this option unset".into(),
                    ));
                }
                _ => {}
            }
        }
        if self.kafka.brokers.trim().is_empty() {
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
            brokers: self.kafka.brokers.clone(),
            overrides,
            topics,
            tables: inbox_tables(&self.table, "--table")?,
            group: self.group.clone(),
            batch_size: self.batch_size as usize,
            batch_wait: self.batch_wait,
            max_backoff: self.max_backoff,
            on_topic_reset: self.on_topic_reset,
            topic_check_interval: TOPIC_CHECK_INTERVAL,
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
pub(super) fn parse_kafka_options(options: &[String]) -> Result<Vec<(String, String)>, UsageError> {
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

#[derive(Debug, Args)]
#[command(next_help_heading = "Kafka")]
pub struct KafkaArgs {
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
}

#[derive(Debug, Args)]
#[command(next_help_heading = "HTTP")]
pub struct HttpArgs {
    /// Address of the HTTP server: /metrics, /healthz, /readyz and the dashboard at /.
    #[arg(long, env = "WALRELAY_HTTP_ADDR", default_value = "127.0.0.1:9187")]
    pub http_addr: String,
}
