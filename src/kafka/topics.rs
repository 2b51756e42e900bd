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
    pub async fn ensure(&mut self, topic: &str) -> Result<(), TopicError> {
        if self.known.contains(topic) {
            return Ok(());
        }
        let admin = Arc::clone(&self.admin);
        let name = topic.to_owned();
        // Metadata requests block; keep them off the async threads.
        let exists = tokio::task::spawn_blocking(move || {
            let metadata = admin
                .inner()
                .fetch_metadata(Some(&name), Duration::from_secs(10))?;
            Ok::<bool, KafkaError>(
                metadata
                    .topics()
                    .iter()
                    .any(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty()),
            )
        })
        .await
        .expect("metadata task panicked")
        .map_err(|source| TopicError::Metadata {
            topic: topic.to_owned(),
            source,
        })?;
        if !exists {
            if !self.create {
                return Err(TopicError::Missing(topic.to_owned()));
            }
            self.create_topic(topic).await?;
            tracing::info!(topic, partitions = self.partitions, "created topic");
        }
        self.known.insert(topic.to_owned());
        Ok(())
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
