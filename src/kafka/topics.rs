//! Topics: walrelay makes sure a topic exists before producing to it
//! (brokers such as tansu, and many production clusters, do not create
//! topics on first use).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::producer::MetadataProbe;

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error(
        "topic {0:?} does not exist and --no-create-topics is set: create it, or drop --no-create-topics"
    )]
    Missing(String),
    #[error("cannot create topic {topic:?}: {source}")]
    Create {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("cannot read metadata for topic {topic:?} (is the broker reachable?): {source}")]
    Metadata {
        topic: String,
        #[source]
        source: KafkaError,
    },
}

/// Knows which topics exist, and creates the missing ones.
pub struct TopicManager {
    admin: Arc<AdminClient<DefaultClientContext>>,
    known: HashSet<String>,
    create: bool,
    partitions: i32,
    replication_factor: i32,
}

impl TopicManager {
    pub fn new(
        config: &ClientConfig,
        create: bool,
        partitions: i32,
        replication_factor: i32,
    ) -> Result<Self, KafkaError> {
        Ok(TopicManager {
            admin: Arc::new(config.create()?),
            known: HashSet::new(),
            create,
            partitions,
            replication_factor,
        })
    }

    /// Makes sure `topic` exists. Cheap after the first call per topic.
    pub async fn ensure(&mut self, topic: &str, probe: &MetadataProbe) -> Result<(), TopicError> {
        if self.known.contains(topic) {
            return Ok(());
        }
        if !Self::exists(probe, topic).await? {
            if !self.create {
                return Err(TopicError::Missing(topic.to_owned()));
            }
            self.create_topic(topic).await?;
            tracing::info!(topic, partitions = self.partitions, "created topic");
            // Fetch it again through the producer, so its first record does
            // not wait for a metadata refresh.
            Self::exists(probe, topic).await?;
        }
        self.known.insert(topic.to_owned());
        Ok(())
    }

    async fn exists(probe: &MetadataProbe, topic: &str) -> Result<bool, TopicError> {
        let probe = probe.clone();
        let name = topic.to_owned();
        // Metadata requests block; keep them off the async threads.
        tokio::task::spawn_blocking(move || probe.topic_exists(&name, Duration::from_secs(10)))
            .await
            .expect("metadata task panicked")
            .map_err(|source| TopicError::Metadata {
                topic: topic.to_owned(),
                source,
            })
    }

    async fn create_topic(&self, topic: &str) -> Result<(), TopicError> {
        let new_topic = NewTopic::new(
            topic,
            self.partitions,
            TopicReplication::Fixed(self.replication_factor),
        );
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = self
            .admin
            .create_topics([&new_topic], &options)
            .await
            .map_err(|source| TopicError::Create {
                topic: topic.to_owned(),
                source,
            })?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(TopicError::Create {
                        topic: topic.to_owned(),
                        source: KafkaError::AdminOp(code),
                    });
                }
            }
        }
        Ok(())
    }
}
