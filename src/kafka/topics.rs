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
//! what was asked is named, with the fix, when it is first prepared
//! (how it differs, and the fix: `topic_spec.rs`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{Producer, ThreadedProducer};

use super::cluster::{Cluster, REQUEST_TIMEOUT, TopicShape};
use super::topic_spec::{Replication, TopicSpec, mismatches};
use crate::publish::TopicError;

/// How long a created topic may take to show in the metadata.
const CREATED_VISIBLE: Duration = Duration::from_secs(10);

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
