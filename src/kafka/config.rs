//! The librdkafka client configuration: walrelay's defaults, the user's
//! `-X` options over them, and the two settings the delivery guarantee
//! rests on, which no option may weaken.

use std::collections::BTreeMap;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::BaseProducer;

/// Everything the Kafka sink needs.
#[derive(Clone, Debug)]
pub struct SinkSettings {
    pub producer: ProducerSettings,
    /// Records go out in Kafka transactions (exactly once).
    pub transactional: bool,
    /// Create missing topics (`--no-create-topics` turns it off).
    pub create_topics: bool,
    pub topic_partitions: i32,
    pub topic_replication_factor: i32,
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
    /// overrides, except the two that the delivery guarantee rests on.
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
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        for (key, value) in &self.overrides {
            match (key.as_str(), value.as_str()) {
                ("enable.idempotence", v) if v != "true" => {
                    return Err("-X enable.idempotence must stay true: without it a broker failover duplicates or reorders events".into());
                }
                ("acks", v) if v != "all" && v != "-1" => {
                    return Err("-X acks must stay all: with fewer acknowledgements a broker crash loses events that were already confirmed to PostgreSQL".into());
                }
                ("bootstrap.servers", _) => {
                    return Err("set the brokers with --brokers, not -X bootstrap.servers".into());
                }
                ("transactional.id", _) => {
                    return Err(
                        "set the transactional id with --transactional-id, not -X transactional.id"
                            .into(),
                    );
                }
                ("message.timeout.ms" | "delivery.timeout.ms", v) if v != "0" => {
                    return Err(format!(
                        "-X {key}={v}: a finite delivery timeout lets a record that timed out land after later records of its key; walrelay waits out broker outages itself (the in-flight window bounds what waits)"
                    ));
                }
                ("retries" | "message.send.max.retries", _) => {
                    return Err(format!(
                        "-X {key}: the idempotent producer retries without limit so that no record is lost or reordered; leave {key} unset"
                    ));
                }
                ("max.in.flight.requests.per.connection" | "max.in.flight", v)
                    if v.parse::<u32>().is_ok_and(|n| n > 5) || v.parse::<u32>().is_err() =>
                {
                    return Err(format!(
                        "-X {key}={v}: above 5 requests in flight the idempotent producer cannot keep a partition's order; use 1 to 5"
                    ));
                }
                _ => {
                    options.insert(key.clone(), value.clone());
                }
            }
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
