//! `walrelay check`'s Kafka checks: the brokers answer, and the topics
//! walrelay writes (those its topic template makes, and the dead-letter
//! topic) keep a confirmed event through the loss of a broker: more than
//! one replica, and `min.insync.replicas` above 1, on a cluster of several
//! brokers.

use super::check_result::Check;
use crate::kafka::ProducerSettings;
use crate::kafka::cluster::{Cluster, ClusterView, Setting, TopicShape};
use crate::kafka::topic_spec::replication_fix;
use crate::router::TopicTemplate;

/// What to check.
#[derive(Clone, Debug)]
pub struct KafkaCheckOptions {
    pub producer: ProducerSettings,
    pub topic_template: TopicTemplate,
    pub dead_letter_topic: String,
    /// The outbox tables, whose names the template's `{schema}` and
    /// `{table}` take.
    pub tables: Vec<(String, String)>,
}

/// The replicas a topic should have on a cluster of `brokers`.
fn wanted_replicas(brokers: usize) -> i32 {
    brokers.min(3) as i32
}

/// The Kafka findings; without options (no --brokers), a line saying so.
pub async fn check(options: Option<&KafkaCheckOptions>) -> Vec<Check> {
    let Some(options) = options else {
        return vec![Check::pass(
            "Kafka not checked: give --brokers (or WALRELAY_BROKERS) to check the topics walrelay writes",
        )];
    };
    let brokers = &options.producer.brokers;
    let unreachable = |error: String| {
        vec![Check::fail(
            format!("cannot reach Kafka at {brokers}: {error}"),
            "check --brokers, that the brokers run, and the -X options (TLS, SASL)",
        )]
    };
    let cluster = match options
        .producer
        .client_config()
        .and_then(|config| Cluster::new(&config).map_err(|e| e.to_string()))
    {
        Ok(cluster) => cluster,
        Err(error) => return unreachable(error),
    };
    let view = match cluster.view(None).await {
        Ok(view) => view,
        Err(error) => return unreachable(error.to_string()),
    };
    let mut findings = vec![Check::pass(format!(
        "Kafka at {brokers} answers: {} broker(s)",
        view.brokers.len()
    ))];
    findings.extend(cluster_default(&cluster, &view, brokers).await);

    let written: Vec<(String, TopicShape)> = view
        .topics
        .iter()
        // Kafka's own (__consumer_offsets, __transaction_state).
        .filter(|(name, _)| !name.starts_with("__"))
        .filter(|(name, _)| {
            **name == options.dead_letter_topic
                || options.topic_template.could_render(name, &options.tables)
        })
        .map(|(name, shape)| (name.clone(), *shape))
        .collect();
    if !written
        .iter()
        .any(|(name, _)| *name != options.dead_letter_topic)
    {
        findings.push(Check::pass(format!(
            "no topic of --topic-template {} exists yet (walrelay run creates them)",
            options.topic_template
        )));
    }
    if !view.topics.contains_key(&options.dead_letter_topic) {
        findings.push(Check::pass(format!(
            "dead-letter topic {} does not exist yet (walrelay run creates it)",
            options.dead_letter_topic
        )));
    }
    if written.is_empty() {
        return findings;
    }
    let names: Vec<String> = written.iter().map(|(name, _)| name.clone()).collect();
    let settings = match cluster.topic_settings(&names, "min.insync.replicas").await {
        Ok(settings) => settings
            .into_iter()
            .map(|s| s.map_err(|code| code.to_string()))
            .collect(),
        Err(error) => vec![Err(error.to_string()); names.len()],
    };
    for ((topic, shape), setting) in written.iter().zip(settings) {
        findings.extend(check_topic(
            topic,
            *shape,
            setting,
            view.brokers.len(),
            brokers,
        ));
    }
    findings
}

/// What a topic created with the brokers' default replication factor gets.
async fn cluster_default(cluster: &Cluster, view: &ClusterView, brokers: &str) -> Vec<Check> {
    let Some(&broker) = view.brokers.first() else {
        return Vec::new();
    };
    match cluster
        .broker_setting(broker, "default.replication.factor")
        .await
    {
        Ok(factor) if factor == "1" && view.brokers.len() > 1 => vec![Check::warn(
            format!(
                "the brokers' default.replication.factor is 1 on a cluster of {} brokers: topics walrelay creates get one replica (unless --topic-replication-factor says more), and a lost disk loses events already confirmed to PostgreSQL",
                view.brokers.len()
            ),
            format!(
                "set default.replication.factor={} in each broker's server.properties, or run walrelay with --topic-replication-factor {}",
                wanted_replicas(view.brokers.len()),
                wanted_replicas(view.brokers.len())
            ),
        )],
        Ok(factor) => vec![Check::pass(format!(
            "the brokers' default.replication.factor is {factor} (what topics walrelay creates get, unless --topic-replication-factor says otherwise)"
        ))],
        Err(error) => vec![Check::warn(
            format!("cannot read the brokers' configuration at {brokers}: {error}"),
            "grant walrelay's principal DESCRIBE_CONFIGS on the cluster, so check can see the replication defaults",
        )],
    }
}

/// One topic's findings: its replicas and `min.insync.replicas` against
/// the number of brokers.
fn check_topic(
    topic: &str,
    shape: TopicShape,
    min_insync: Result<Setting, String>,
    broker_count: usize,
    brokers: &str,
) -> Vec<Check> {
    let mut findings = Vec::new();
    let replicas = shape.replication_factor;
    let several = broker_count > 1;
    if several && replicas == 1 {
        findings.push(Check::warn(
            format!(
                "topic {topic} has replication factor 1 on a cluster of {broker_count} brokers: losing one broker's disk loses events already confirmed to PostgreSQL"
            ),
            replication_fix(topic, brokers, wanted_replicas(broker_count)),
        ));
    }
    let min_insync = match min_insync {
        Ok(setting) => setting,
        Err(error) => {
            findings.push(Check::warn(
                format!("cannot read topic {topic}'s min.insync.replicas: {error}"),
                "grant walrelay's principal DESCRIBE_CONFIGS on its topics",
            ));
            return findings;
        }
    };
    if several && min_insync.value == "1" {
        let source = if min_insync.on_topic {
            "set on the topic"
        } else {
            "the brokers' default"
        };
        let once = if replicas < 3 {
            " once it has 3 replicas (with fewer, one broker away would stop its writes)"
        } else {
            ""
        };
        let everywhere = if min_insync.on_topic {
            ""
        } else {
            "; or for every topic, --entity-type brokers --entity-default"
        };
        findings.push(Check::warn(
            format!(
                "topic {topic} has min.insync.replicas 1 ({source}): acks=all is then met by the leader alone, and a leader lost before its followers caught up loses events already confirmed to PostgreSQL"
            ),
            format!(
                "kafka-configs.sh --bootstrap-server {brokers} --alter --entity-type topics --entity-name {topic} --add-config min.insync.replicas=2{once}{everywhere}"
            ),
        ));
    }
    if findings.is_empty() {
        findings.push(Check::pass(format!(
            "topic {topic}: {} partition(s), replication factor {replicas}, min.insync.replicas {}",
            shape.partitions, min_insync.value
        )));
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::check_result::Status;

    fn shape(replication_factor: i32) -> TopicShape {
        TopicShape {
            partitions: 3,
            replication_factor,
        }
    }

    fn setting(value: &str, on_topic: bool) -> Result<Setting, String> {
        Ok(Setting {
            value: value.into(),
            on_topic,
        })
    }

    #[test]
    fn one_replica_on_a_cluster_of_several_is_a_warning_naming_the_reassignment() {
        let found = check_topic("t", shape(1), setting("2", false), 3, "k:9092");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].status, Status::Warn);
        assert!(
            found[0]
                .what
                .contains("replication factor 1 on a cluster of 3 brokers")
        );
        let fix = found[0].fix.as_deref().unwrap();
        assert!(
            fix.contains("kafka-reassign-partitions.sh --bootstrap-server k:9092"),
            "{fix}"
        );
        assert!(fix.contains("3 brokers for every partition of t"), "{fix}");
        // A single broker has nothing to replicate to.
        let alone = check_topic("t", shape(1), setting("1", false), 1, "k:9092");
        assert_eq!(alone[0].status, Status::Pass, "{alone:?}");
    }

    #[test]
    fn min_insync_replicas_1_is_a_warning_whose_fix_fits_where_it_is_set() {
        let found = check_topic("t", shape(3), setting("1", true), 3, "k:9092");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].status, Status::Warn);
        assert!(
            found[0]
                .what
                .contains("min.insync.replicas 1 (set on the topic)")
        );
        assert_eq!(
            found[0].fix.as_deref(),
            Some(
                "kafka-configs.sh --bootstrap-server k:9092 --alter --entity-type topics --entity-name t --add-config min.insync.replicas=2"
            )
        );
        let default = check_topic("t", shape(1), setting("1", false), 3, "k:9092");
        assert_eq!(default.len(), 2, "{default:?}");
        let fix = default[1].fix.as_deref().unwrap();
        assert!(fix.contains("once it has 3 replicas"), "{fix}");
        assert!(fix.contains("--entity-default"), "{fix}");
    }

    #[test]
    fn a_replicated_topic_passes_with_its_numbers() {
        let found = check_topic("t", shape(3), setting("2", false), 3, "k:9092");
        assert_eq!(
            found,
            [Check::pass(
                "topic t: 3 partition(s), replication factor 3, min.insync.replicas 2"
            )]
        );
    }
}
