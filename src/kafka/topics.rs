//! Topics: walrelay makes sure a topic exists before producing to it
//! (many production clusters do not create topics on first use), and
//! learns its partition count.
//!
//! No client of walrelay's lets a metadata request create a topic
//! (`allow.auto.create.topics` is off, `kafka/config.rs`): a broker with
//! `auto.create.topics.enable` (Apache Kafka's default) would otherwise
//! make it with its own `num.partitions` and `default.replication.factor`
//! before walrelay's CreateTopics. A topic walrelay creates is read back
//! and logged as the broker has it; an existing topic that differs from
//! what was asked is named, with the fix, when it is first prepared.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{Producer, ThreadedProducer};

use super::cluster::{Cluster, REQUEST_TIMEOUT, TopicShape};
use crate::publish::TopicError;

/// How long a created topic may take to show in the metadata.
const CREATED_VISIBLE: Duration = Duration::from_secs(10);

/// What a topic walrelay creates gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopicSpec {
    /// `--topic-partitions`; `None` when not given: a topic is created
    /// with one, and an existing topic's count is what it is.
    pub partitions: Option<i32>,
    pub replication: Replication,
}

impl TopicSpec {
    /// Partitions of a topic walrelay creates.
    pub fn partitions(&self) -> i32 {
        self.partitions.unwrap_or(1)
    }
}

impl Default for TopicSpec {
    fn default() -> Self {
        TopicSpec {
            partitions: None,
            replication: Replication::ClusterDefault,
        }
    }
}

/// `--topic-replication-factor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replication {
    /// The brokers' `default.replication.factor` (-1 in CreateTopics,
    /// KIP-464).
    ClusterDefault,
    Factor(i32),
}

impl std::str::FromStr for Replication {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "default" | "-1" => Ok(Replication::ClusterDefault),
            n => match n.parse::<i32>() {
                Ok(n) if n >= 1 => Ok(Replication::Factor(n)),
                _ => Err(format!(
                    "{text:?}: expected a number of replicas (1 or more), or default (the brokers' default.replication.factor)"
                )),
            },
        }
    }
}

/// How an existing topic differs from what was asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// Fewer partitions than `--topic-partitions` asks for.
    FewerPartitions { has: i32, asked: i32 },
    /// More partitions than asked: fine (walrelay uses the topic's count).
    MorePartitions { has: i32, asked: i32 },
    /// Fewer replicas than asked (by the flag, or the cluster's default).
    FewerReplicas {
        has: i32,
        asked: i32,
        by_default: bool,
    },
    MoreReplicas {
        has: i32,
        asked: i32,
        by_default: bool,
    },
}

/// How `shape` differs from `spec`; `cluster_default` is the brokers'
/// `default.replication.factor` when known (what
/// [`Replication::ClusterDefault`] asks for).
pub fn mismatches(
    shape: TopicShape,
    spec: &TopicSpec,
    cluster_default: Option<i32>,
) -> Vec<Mismatch> {
    let mut found = Vec::new();
    let has = shape.partitions;
    match spec.partitions {
        // Fewer than the user asked for: not what they expect. Without the
        // flag (one partition when created) any count is the topic's own.
        Some(asked) if has < asked => found.push(Mismatch::FewerPartitions { has, asked }),
        _ if has > spec.partitions() => found.push(Mismatch::MorePartitions {
            has,
            asked: spec.partitions(),
        }),
        _ => {}
    }
    let (asked, by_default) = match (spec.replication, cluster_default) {
        (Replication::Factor(n), _) => (n, false),
        (Replication::ClusterDefault, Some(n)) => (n, true),
        (Replication::ClusterDefault, None) => return found,
    };
    let has = shape.replication_factor;
    if has < asked {
        found.push(Mismatch::FewerReplicas {
            has,
            asked,
            by_default,
        });
    } else if has > asked {
        found.push(Mismatch::MoreReplicas {
            has,
            asked,
            by_default,
        });
    }
    found
}

/// The command that adds partitions to `topic`.
pub fn partitions_fix(topic: &str, brokers: &str, partitions: i32) -> String {
    format!(
        "kafka-topics.sh --bootstrap-server {brokers} --alter --topic {topic} --partitions {partitions} (walrelay follows the new count within a minute; keys move to other partitions)"
    )
}

/// How to give `topic` `replicas` replicas.
pub fn replication_fix(topic: &str, brokers: &str, replicas: i32) -> String {
    format!(
        "reassign its partitions to {replicas} replicas each: kafka-reassign-partitions.sh --bootstrap-server {brokers} --reassignment-json-file plan.json --execute, plan.json listing {replicas} brokers for every partition of {topic}"
    )
}

impl Mismatch {
    /// Logs it: a warning with its fix, or a note.
    fn log(&self, topic: &str, brokers: &str) {
        match *self {
            Mismatch::FewerPartitions { has, asked } => tracing::warn!(
                topic,
                partitions = has,
                asked,
                fix = %partitions_fix(topic, brokers, asked),
                "the topic has fewer partitions than --topic-partitions asks for; walrelay uses the ones it has"
            ),
            Mismatch::MorePartitions { has, asked } => tracing::info!(
                topic,
                partitions = has,
                asked,
                "the topic has more partitions than --topic-partitions; walrelay spreads keys over all of them"
            ),
            Mismatch::FewerReplicas {
                has,
                asked,
                by_default,
            } => tracing::warn!(
                topic,
                replication_factor = has,
                asked,
                asked_by = asked_by(by_default),
                fix = %replication_fix(topic, brokers, asked),
                "the topic has fewer replicas than asked for: it survives fewer broker failures (with one, a lost disk loses events already confirmed to PostgreSQL)"
            ),
            Mismatch::MoreReplicas {
                has,
                asked,
                by_default,
            } => tracing::info!(
                topic,
                replication_factor = has,
                asked,
                asked_by = asked_by(by_default),
                "the topic has more replicas than asked for"
            ),
        }
    }
}

fn asked_by(by_default: bool) -> &'static str {
    if by_default {
        "the brokers' default.replication.factor"
    } else {
        "--topic-replication-factor"
    }
}

/// Reads topic metadata through the producer (which warms its cache, so
/// the first record to a topic does not wait for a lookup) and creates the
/// missing topics with an admin client.
pub struct TopicCreator {
    cluster: Cluster,
    create: bool,
    spec: TopicSpec,
    /// `--brokers`, for the fixes logged.
    brokers: String,
    /// The brokers' `default.replication.factor`, once read.
    cluster_default: Mutex<Option<i32>>,
}

/// A client whose metadata requests tell a topic's shape.
pub trait MetadataSource: Send + Sync {
    /// `Ok(None)` when the topic does not exist (blocking).
    fn shape(&self, topic: &str) -> Result<Option<TopicShape>, KafkaError>;
}

impl<C: rdkafka::producer::ProducerContext + 'static> MetadataSource for ThreadedProducer<C> {
    fn shape(&self, topic: &str) -> Result<Option<TopicShape>, KafkaError> {
        let metadata = self.client().fetch_metadata(Some(topic), REQUEST_TIMEOUT)?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .and_then(TopicShape::of))
    }
}

impl TopicCreator {
    pub(super) fn new(
        config: &ClientConfig,
        create: bool,
        spec: TopicSpec,
        brokers: &str,
    ) -> Result<Self, KafkaError> {
        Ok(TopicCreator {
            cluster: Cluster::new(config)?,
            create,
            spec,
            brokers: brokers.to_owned(),
            cluster_default: Mutex::new(None),
        })
    }

    /// Makes sure `topic` exists (creating it when allowed and `create`)
    /// and returns its partition count, read through `metadata`. `create`
    /// is the first preparation, which says how the topic differs from
    /// what was asked; later ones only read the count again.
    pub async fn prepare(
        &self,
        metadata: Arc<dyn MetadataSource>,
        topic: &str,
        create: bool,
    ) -> Result<i32, TopicError> {
        if let Some(shape) = self.shape(&metadata, topic).await? {
            if create {
                self.report_existing(topic, shape).await;
            }
            return Ok(shape.partitions);
        }
        if !self.create || !create {
            return Err(TopicError::Missing(topic.to_owned()));
        }
        let created = self.create_topic(topic).await?;
        // Read it back through the producer, so its first record does not
        // wait for a metadata refresh, and to log what the broker made.
        let shape = self.created_shape(&metadata, topic).await?;
        if created {
            tracing::info!(
                topic,
                partitions = shape.partitions,
                replication_factor = shape.replication_factor,
                "created topic"
            );
            // What the broker made is what was asked, unless a policy of
            // its own says otherwise.
            for mismatch in mismatches(shape, &self.spec, None) {
                mismatch.log(topic, &self.brokers);
            }
        } else {
            // Someone else created it meanwhile.
            self.report_existing(topic, shape).await;
        }
        Ok(shape.partitions)
    }

    /// Logs an existing topic's shape, and how it differs from what was
    /// asked.
    async fn report_existing(&self, topic: &str, shape: TopicShape) {
        let cluster_default = match self.spec.replication {
            Replication::ClusterDefault => self.cluster_default(topic).await,
            Replication::Factor(_) => None,
        };
        tracing::info!(
            topic,
            partitions = shape.partitions,
            replication_factor = shape.replication_factor,
            "the topic exists"
        );
        for mismatch in mismatches(shape, &self.spec, cluster_default) {
            mismatch.log(topic, &self.brokers);
        }
    }

    /// The brokers' `default.replication.factor` (read once, through a
    /// broker that `topic`'s metadata names); `None` when it cannot be
    /// read (the principal may not describe the cluster's configuration).
    async fn cluster_default(&self, topic: &str) -> Option<i32> {
        if let Some(known) = *self
            .cluster_default
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            return Some(known);
        }
        let read = async {
            let view = self.cluster.view(Some(topic)).await?;
            let broker = *view
                .brokers
                .first()
                .ok_or(KafkaError::AdminOp(RDKafkaErrorCode::BrokerNotAvailable))?;
            self.cluster
                .broker_setting(broker, "default.replication.factor")
                .await
        };
        match read.await.map(|v| v.parse::<i32>()) {
            Ok(Ok(factor)) => {
                *self
                    .cluster_default
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(factor);
                Some(factor)
            }
            Ok(Err(_)) => None,
            Err(error) => {
                tracing::debug!(%error, "cannot read the brokers' default.replication.factor");
                None
            }
        }
    }

    async fn shape(
        &self,
        metadata: &Arc<dyn MetadataSource>,
        topic: &str,
    ) -> Result<Option<TopicShape>, TopicError> {
        let source = Arc::clone(metadata);
        let name = topic.to_owned();
        // Metadata requests block; keep them off the async threads.
        tokio::task::spawn_blocking(move || source.shape(&name))
            .await
            .expect("metadata task panicked")
            .map_err(|e| TopicError::Metadata {
                topic: topic.to_owned(),
                reason: e.to_string(),
            })
    }

    /// A topic just created, once the metadata shows it whole.
    async fn created_shape(
        &self,
        metadata: &Arc<dyn MetadataSource>,
        topic: &str,
    ) -> Result<TopicShape, TopicError> {
        let deadline = tokio::time::Instant::now() + CREATED_VISIBLE;
        loop {
            if let Some(shape) = self.shape(metadata, topic).await? {
                return Ok(shape);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(TopicError::Metadata {
                    topic: topic.to_owned(),
                    reason: format!(
                        "the topic was created but the metadata does not show it after {CREATED_VISIBLE:?}"
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Creates `topic` as asked; false when it exists already.
    async fn create_topic(&self, topic: &str) -> Result<bool, TopicError> {
        let replication = match self.spec.replication {
            // -1: the brokers' default.replication.factor (KIP-464).
            Replication::ClusterDefault => -1,
            Replication::Factor(n) => n,
        };
        let new_topic = NewTopic::new(
            topic,
            self.spec.partitions(),
            TopicReplication::Fixed(replication),
        );
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let create_error = |code: Option<RDKafkaErrorCode>, reason: String| TopicError::Create {
            topic: topic.to_owned(),
            reason,
            permanent: matches!(
                code,
                Some(
                    RDKafkaErrorCode::TopicAuthorizationFailed
                        | RDKafkaErrorCode::ClusterAuthorizationFailed
                        | RDKafkaErrorCode::InvalidTopic
                        | RDKafkaErrorCode::PolicyViolation
                        | RDKafkaErrorCode::InvalidReplicationFactor
                        | RDKafkaErrorCode::InvalidPartitions
                )
            ),
        };
        let results = self
            .cluster
            .admin()
            .create_topics([&new_topic], &options)
            .await
            .map_err(|e| create_error(e.rdkafka_error_code(), e.to_string()))?;
        let mut created = true;
        for result in results {
            match result {
                Ok(_) => {}
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => created = false,
                Err((_, code)) => {
                    return Err(create_error(
                        Some(code),
                        KafkaError::AdminOp(code).to_string(),
                    ));
                }
            }
        }
        Ok(created)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(partitions: i32, replication_factor: i32) -> TopicShape {
        TopicShape {
            partitions,
            replication_factor,
        }
    }

    fn spec(partitions: Option<i32>, replication: Replication) -> TopicSpec {
        TopicSpec {
            partitions,
            replication,
        }
    }

    #[test]
    fn replication_takes_a_count_or_the_cluster_default() {
        assert_eq!("default".parse(), Ok(Replication::ClusterDefault));
        assert_eq!("-1".parse(), Ok(Replication::ClusterDefault));
        assert_eq!("3".parse(), Ok(Replication::Factor(3)));
        for bad in ["0", "-2", "three", ""] {
            let error = bad.parse::<Replication>().unwrap_err();
            assert!(error.contains("or default"), "{bad}: {error}");
        }
    }

    #[test]
    fn fewer_partitions_than_asked_is_named_only_when_the_user_asked() {
        let asked = spec(Some(8), Replication::Factor(1));
        assert_eq!(
            mismatches(shape(2, 1), &asked, None),
            [Mismatch::FewerPartitions { has: 2, asked: 8 }]
        );
        assert_eq!(mismatches(shape(8, 1), &asked, None), []);
        assert_eq!(
            mismatches(shape(12, 1), &asked, None),
            [Mismatch::MorePartitions { has: 12, asked: 8 }]
        );
        // Without --topic-partitions, a topic of several partitions is
        // worth a note, never a warning.
        let unasked = spec(None, Replication::Factor(1));
        assert_eq!(mismatches(shape(1, 1), &unasked, None), []);
        assert_eq!(
            mismatches(shape(6, 1), &unasked, None),
            [Mismatch::MorePartitions { has: 6, asked: 1 }]
        );
    }

    #[test]
    fn replicas_are_compared_with_the_flag_or_the_cluster_default() {
        let three = spec(None, Replication::Factor(3));
        assert_eq!(
            mismatches(shape(1, 1), &three, Some(1)),
            [Mismatch::FewerReplicas {
                has: 1,
                asked: 3,
                by_default: false
            }]
        );
        let default = spec(None, Replication::ClusterDefault);
        assert_eq!(
            mismatches(shape(1, 1), &default, Some(3)),
            [Mismatch::FewerReplicas {
                has: 1,
                asked: 3,
                by_default: true
            }]
        );
        assert_eq!(
            mismatches(shape(1, 3), &default, Some(1)),
            [Mismatch::MoreReplicas {
                has: 3,
                asked: 1,
                by_default: true
            }]
        );
        // The cluster's default unknown: nothing to compare with.
        assert_eq!(mismatches(shape(1, 1), &default, None), []);
    }

    #[test]
    fn the_fixes_name_the_topic_and_the_count() {
        let fix = partitions_fix("orders", "k1:9092", 8);
        assert!(
            fix.starts_with(
                "kafka-topics.sh --bootstrap-server k1:9092 --alter --topic orders --partitions 8"
            ),
            "{fix}"
        );
        let fix = replication_fix("orders", "k1:9092", 3);
        assert!(fix.contains("kafka-reassign-partitions.sh"), "{fix}");
        assert!(
            fix.contains("3 brokers for every partition of orders"),
            "{fix}"
        );
    }
}
