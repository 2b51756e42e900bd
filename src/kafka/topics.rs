//! Topics: walrelay makes sure a topic exists before producing to it
//! (many production clusters do not create topics on first use), and
//! learns its partition count.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{Producer, ThreadedProducer};

use crate::publish::TopicError;

/// How long one metadata request may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads topic metadata through the producer (which warms its cache, so
/// the first record to a topic does not wait for a lookup) and creates the
/// missing topics with an admin client.
pub struct TopicCreator {
    admin: AdminClient<DefaultClientContext>,
    create: bool,
    partitions: i32,
    replication_factor: i32,
}

/// A client whose metadata requests tell a topic's partition count.
pub trait MetadataSource: Send + Sync {
    /// `Ok(None)` when the topic does not exist (blocking).
    fn partitions(&self, topic: &str) -> Result<Option<i32>, KafkaError>;
}

impl<C: rdkafka::producer::ProducerContext + 'static> MetadataSource for ThreadedProducer<C> {
    fn partitions(&self, topic: &str) -> Result<Option<i32>, KafkaError> {
        let metadata = self
            .client()
            .fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.partitions().len() as i32))
    }
}

impl TopicCreator {
    pub(super) fn new(
        config: &ClientConfig,
        create: bool,
        partitions: i32,
        replication_factor: i32,
    ) -> Result<Self, KafkaError> {
        Ok(TopicCreator {
            admin: config.create()?,
            create,
            partitions,
            replication_factor,
        })
    }

    /// Makes sure `topic` exists (creating it when allowed and `create`)
    /// and returns its partition count, read through `metadata`.
    pub async fn prepare(
        &self,
        metadata: Arc<dyn MetadataSource>,
        topic: &str,
        create: bool,
    ) -> Result<i32, TopicError> {
        if let Some(partitions) = self.partitions(&metadata, topic).await? {
            return Ok(partitions);
        }
        if !self.create || !create {
            return Err(TopicError::Missing(topic.to_owned()));
        }
        self.create_topic(topic).await?;
        tracing::info!(topic, partitions = self.partitions, "created topic");
        // Fetch it again through the producer, so its first record does
        // not wait for a metadata refresh.
        self.partitions(&metadata, topic)
            .await?
            .ok_or_else(|| TopicError::Metadata {
                topic: topic.to_owned(),
                reason: "the topic was created but its metadata does not list it yet".into(),
            })
    }

    async fn partitions(
        &self,
        metadata: &Arc<dyn MetadataSource>,
        topic: &str,
    ) -> Result<Option<i32>, TopicError> {
        let source = Arc::clone(metadata);
        let name = topic.to_owned();
        // Metadata requests block; keep them off the async threads.
        tokio::task::spawn_blocking(move || source.partitions(&name))
            .await
            .expect("metadata task panicked")
            .map_err(|e| TopicError::Metadata {
                topic: topic.to_owned(),
                reason: e.to_string(),
            })
    }

    async fn create_topic(&self, topic: &str) -> Result<(), TopicError> {
        let new_topic = NewTopic::new(
            topic,
            self.partitions,
            TopicReplication::Fixed(self.replication_factor),
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
            .admin
            .create_topics([&new_topic], &options)
            .await
            .map_err(|e| create_error(e.rdkafka_error_code(), e.to_string()))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(create_error(
                        Some(code),
                        KafkaError::AdminOp(code).to_string(),
                    ));
                }
            }
        }
        Ok(())
    }
}
