//! The librdkafka client configuration: walrelay's defaults, the user's
//! `-X` options over them, and the settings the delivery guarantee rests
//! on (acknowledgements, idempotence, order, where each key lands, who
//! creates topics), which no option may weaken.

use std::collections::BTreeMap;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::BaseProducer;

use super::topic_spec::TopicSpec;

/// Everything the Kafka sink needs.
#[derive(Clone, Debug)]
pub struct SinkSettings {
    pub producer: ProducerSettings,
    /// Records go out in Kafka transactions (exactly once).
    pub transactional: bool,
    /// Create missing topics (`--no-create-topics` turns it off).
    pub create_topics: bool,
    /// What a topic walrelay creates gets.
    pub topics: TopicSpec,
}

/// Producer settings: the brokers and librdkafka options.
#[derive(Clone, Debug)]
pub struct ProducerSettings {
    pub brokers: String,
    /// `-X key=value` options, applied over walrelay's defaults.
    pub overrides: Vec<(String, String)>,
}

impl ProducerSettings {
    /// The librdkafka configuration: walrelay's defaults, then the user's
    /// overrides, except those that would weaken the delivery guarantee.
    pub fn client_config(&self) -> Result<ClientConfig, String> {
        let mut options: BTreeMap<String, String> = [
            ("bootstrap.servers", self.brokers.as_str()),
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("compression.type", "lz4"),
            // Java clients' partitioner, so keys land where theirs do.
            ("partitioner", "murmur2_random"),
            // Never give up on a record: a broker outage of any length is
            // waited out; the in-flight window bounds what waits.
            ("message.timeout.ms", "0"),
            ("linger.ms", "5"),
            ("batch.num.messages", "10000"),
            ("queue.buffering.max.messages", "1000000"),
            ("queue.buffering.max.kbytes", "1048576"),
            ("message.max.bytes", "1000000"),
            ("client.id", "walrelay"),
            // librdkafka's producer default is true: its first metadata
            // request for a missing topic would create it with the broker's
            // defaults, before walrelay creates it as asked.
            ("allow.auto.create.topics", "false"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        for (key, value) in &self.overrides {
            refuse_weakening(key, value)?;
            options.insert(key.clone(), value.clone());
        }
        let mut config = ClientConfig::new();
        for (k, v) in options {
            config.set(k, v);
        }
        Ok(config)
    }

    /// Checks every option with librdkafka itself, before anything
    /// connects: an unknown key, a bad value, or options that do not go
    /// together. The message names the option and says what to do.
    pub fn validate(&self) -> Result<(), String> {
        let config = self.client_config()?;
        if let Err(error) = config.create_native_config() {
            return Err(match error {
                KafkaError::ClientConfig(_, description, key, value) => format!(
                    "-X {key}={value}: librdkafka refuses it: {description}; see librdkafka's CONFIGURATION.md for the options and their values"
                ),
                other => format!("-X: librdkafka refuses the options: {other}"),
            });
        }
        // Some checks only run when a client is made (settings that
        // contradict each other); making one connects nothing yet.
        config
            .create::<BaseProducer>()
            .map(drop)
            .map_err(|error| format!("-X: librdkafka refuses these options together: {error}"))
    }
}

/// Refuses an option that would weaken the delivery guarantee, naming it
/// and what to do instead. librdkafka also takes a topic option with a
/// `topic.` prefix, and `acks` as `request.required.acks`: those forms are
/// refused alike.
fn refuse_weakening(key: &str, value: &str) -> Result<(), String> {
    let name = key.strip_prefix("topic.").unwrap_or(key);
    match (name, value) {
        ("enable.idempotence", v) if v != "true" => Err(format!(
            "-X {key} must stay true: without it a broker failover duplicates or reorders events"
        )),
        ("acks" | "request.required.acks", v) if v != "all" && v != "-1" => Err(format!(
            "-X {key} must stay all: with fewer acknowledgements a broker crash loses events that were already confirmed to PostgreSQL"
        )),
        ("bootstrap.servers", _) => {
            Err("set the brokers with --brokers, not -X bootstrap.servers".into())
        }
        ("transactional.id", _) => {
            Err("set the transactional id with --transactional-id, not -X transactional.id".into())
        }
        ("message.timeout.ms" | "delivery.timeout.ms", v) if v != "0" => Err(format!(
            "-X {key}={v}: a finite delivery timeout lets a record that timed out land after later records of its key; walrelay waits out broker outages itself (the in-flight window bounds what waits)"
        )),
        ("retries" | "message.send.max.retries", _) => Err(format!(
            "-X {key}: the idempotent producer retries without limit so that no record is lost or reordered; leave {key} unset"
        )),
        ("max.in.flight.requests.per.connection" | "max.in.flight", v)
            if v.parse::<u32>().is_ok_and(|n| n > 5) || v.parse::<u32>().is_err() =>
        {
            Err(format!(
                "-X {key}={v}: above 5 requests in flight the idempotent producer cannot keep a partition's order; use 1 to 5"
            ))
        }
        ("partitioner", v) if v != "murmur2_random" => Err(format!(
            "-X {key}={v}: walrelay puts each key in the partition Java's default partitioner picks (murmur2): per-key order and exactly once rest on it (a restarted relay reads each key's partition back to skip what is there); leave {key} unset"
        )),
        ("partitioner_cb" | "msg_order_cmp", _) => Err(format!(
            "-X {key}: walrelay puts each key in the partition Java's default partitioner picks (murmur2), and keeps each partition's order: per-key order and exactly once rest on both; leave {key} unset"
        )),
        ("queuing.strategy", v) if v != "fifo" => Err(format!(
            "-X {key}={v}: only fifo keeps the order records were produced in; leave {key} unset"
        )),
        ("allow.auto.create.topics", _) => refuse_auto_create(key, value),
        _ => Ok(()),
    }
}

/// Refuses `-X allow.auto.create.topics` on, for any client walrelay
/// makes: its metadata requests would then create a missing topic with the
/// broker's defaults before walrelay creates it as asked.
pub fn refuse_auto_create(key: &str, value: &str) -> Result<(), String> {
    let name = key.strip_prefix("topic.").unwrap_or(key);
    // librdkafka's false: "false", "f" or "0", in any case.
    let off = ["false", "f", "0"]
        .iter()
        .any(|f| value.eq_ignore_ascii_case(f));
    if name != "allow.auto.create.topics" || off {
        return Ok(());
    }
    Err(format!(
        "-X {key}={value}: a client's metadata request would create a missing topic with the broker's defaults (num.partitions, default.replication.factor) before walrelay creates it with --topic-partitions and --topic-replication-factor; leave {key} unset (walrelay creates the topics it writes; --no-create-topics turns that off)"
    ))
}

/// Turns a producer configuration transactional. A transaction's records
/// must be delivered within its timeout, so the delivery timeout becomes
/// that timeout: a record that times out aborts its transaction, and the
/// publisher sends the whole transaction again, in order.
pub fn make_transactional(config: &mut ClientConfig, transactional_id: &str) {
    config
        .set("transactional.id", transactional_id)
        .set("transaction.timeout.ms", TRANSACTION_TIMEOUT_MS)
        .set("message.timeout.ms", TRANSACTION_TIMEOUT_MS);
}

/// How long a transaction may stay open before the broker aborts it.
const TRANSACTION_TIMEOUT_MS: &str = "60000";

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(overrides: &[(&str, &str)]) -> ProducerSettings {
        ProducerSettings {
            brokers: "127.0.0.1:9092".into(),
            overrides: overrides
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn defaults_are_idempotent_acks_all_lz4_murmur2() {
        let config = settings(&[]).client_config().unwrap();
        assert_eq!(config.get("enable.idempotence"), Some("true"));
        assert_eq!(config.get("acks"), Some("all"));
        assert_eq!(config.get("compression.type"), Some("lz4"));
        assert_eq!(config.get("partitioner"), Some("murmur2_random"));
        assert_eq!(config.get("message.timeout.ms"), Some("0"));
        assert_eq!(config.get("allow.auto.create.topics"), Some("false"));
        settings(&[]).validate().unwrap();
    }

    #[test]
    fn overrides_apply_but_never_weaken_the_guarantee() {
        let config = settings(&[("linger.ms", "20"), ("security.protocol", "SASL_SSL")])
            .client_config()
            .unwrap();
        assert_eq!(config.get("linger.ms"), Some("20"));
        assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
        assert!(
            settings(&[("acks", "1")])
                .client_config()
                .unwrap_err()
                .contains("acks must stay all")
        );
        assert!(
            settings(&[("enable.idempotence", "false")])
                .client_config()
                .is_err()
        );
        assert!(settings(&[("acks", "-1")]).client_config().is_ok());
    }

    #[test]
    fn options_that_would_weaken_order_or_exactly_once_are_refused() {
        for (key, value) in [
            ("message.timeout.ms", "30000"),
            ("delivery.timeout.ms", "5000"),
            ("retries", "3"),
            ("max.in.flight.requests.per.connection", "10"),
            ("transactional.id", "x"),
        ] {
            let error = settings(&[(key, value)]).client_config().unwrap_err();
            assert!(error.contains(key), "{error}");
        }
        assert!(
            settings(&[("max.in.flight.requests.per.connection", "5")])
                .client_config()
                .is_ok()
        );
        let mut config = settings(&[]).client_config().unwrap();
        make_transactional(&mut config, "walrelay.7.s");
        assert_eq!(config.get("transactional.id"), Some("walrelay.7.s"));
        assert_eq!(config.get("message.timeout.ms"), Some("60000"));
        create_check(&config);
    }

    #[test]
    fn options_that_move_keys_to_other_partitions_are_refused_saying_why() {
        for (key, value) in [
            ("partitioner", "random"),
            ("partitioner", "consistent_random"),
            ("topic.partitioner", "murmur2"),
            ("partitioner_cb", "x"),
            ("queuing.strategy", "lifo"),
        ] {
            let error = settings(&[(key, value)]).client_config().unwrap_err();
            assert!(error.starts_with(&format!("-X {key}")), "{error}");
            assert!(error.contains("leave"), "the fix: {error}");
        }
        let error = settings(&[("partitioner", "random")])
            .client_config()
            .unwrap_err();
        assert!(error.contains("murmur2"), "{error}");
        assert!(error.contains("exactly once"), "{error}");
        // The partitioner walrelay sets anyway is no change.
        assert!(
            settings(&[("partitioner", "murmur2_random")])
                .client_config()
                .is_ok()
        );
    }

    #[test]
    fn topic_prefixed_and_aliased_forms_are_refused_alike() {
        for (key, value) in [
            ("topic.acks", "1"),
            ("request.required.acks", "1"),
            ("topic.request.required.acks", "0"),
            ("topic.message.timeout.ms", "3000"),
            ("topic.delivery.timeout.ms", "3000"),
        ] {
            let error = settings(&[(key, value)]).client_config().unwrap_err();
            assert!(error.starts_with(&format!("-X {key}")), "{error}");
        }
        assert!(settings(&[("topic.acks", "all")]).validate().is_ok());
    }

    #[test]
    fn automatic_topic_creation_stays_off() {
        for value in ["true", "TRUE", "t", "1"] {
            let error = settings(&[("allow.auto.create.topics", value)])
                .client_config()
                .unwrap_err();
            assert!(
                error.starts_with(&format!("-X allow.auto.create.topics={value}: ")),
                "{error}"
            );
            assert!(error.contains("--topic-partitions"), "{error}");
        }
        let config = settings(&[("allow.auto.create.topics", "false")])
            .client_config()
            .unwrap();
        assert_eq!(config.get("allow.auto.create.topics"), Some("false"));
        // The inbox's consumer asks the same of its options.
        assert!(refuse_auto_create("allow.auto.create.topics", "true").is_err());
        assert!(refuse_auto_create("allow.auto.create.topics", "0").is_ok());
        assert!(refuse_auto_create("session.timeout.ms", "6000").is_ok());
    }

    fn create_check(config: &ClientConfig) {
        config.create::<BaseProducer>().map(drop).unwrap();
    }

    #[test]
    fn unknown_options_and_bad_values_are_named() {
        let unknown = settings(&[("no.such.option", "1")]).validate().unwrap_err();
        assert!(unknown.starts_with("-X no.such.option=1: "), "{unknown}");
        let bad = settings(&[("linger.ms", "soon")]).validate().unwrap_err();
        assert!(bad.starts_with("-X linger.ms=soon: "), "{bad}");
    }
}
