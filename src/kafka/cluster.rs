//! What the cluster says about itself and its topics, through an admin
//! client: its brokers, each topic's partitions and replicas, and
//! configuration values (a topic's own, or the brokers' default that
//! applies when the topic sets none).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ConfigSource, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::metadata::{Metadata, MetadataTopic};

/// How long one metadata or configuration request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A topic's size as the cluster's metadata shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopicShape {
    pub partitions: i32,
    /// The fewest replicas of any of its partitions: what its durability
    /// rests on.
    pub replication_factor: i32,
}

impl TopicShape {
    /// `None` when the metadata does not list the topic whole (it does not
    /// exist, or has no partitions yet).
    pub fn of(topic: &MetadataTopic) -> Option<TopicShape> {
        if topic.error().is_some() || topic.partitions().is_empty() {
            return None;
        }
        Some(TopicShape {
            partitions: topic.partitions().len() as i32,
            replication_factor: topic
                .partitions()
                .iter()
                .map(|p| p.replicas().len() as i32)
                .min()
                .unwrap_or(0),
        })
    }
}

/// The brokers and the topics of a cluster at one moment.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    pub brokers: Vec<i32>,
    pub topics: BTreeMap<String, TopicShape>,
}

impl ClusterView {
    fn of(metadata: &Metadata) -> Self {
        ClusterView {
            brokers: metadata.brokers().iter().map(|b| b.id()).collect(),
            topics: metadata
                .topics()
                .iter()
                .filter_map(|t| Some((t.name().to_owned(), TopicShape::of(t)?)))
                .collect(),
        }
    }
}

/// A configuration value and where it comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    pub value: String,
    /// Set on the topic itself (otherwise the brokers' default applies).
    pub on_topic: bool,
}

/// An admin client's view of the cluster.
#[derive(Clone)]
pub struct Cluster {
    admin: Arc<AdminClient<DefaultClientContext>>,
}

impl Cluster {
    /// An admin client with `config`'s connection settings (nothing
    /// connects yet).
    pub fn new(config: &ClientConfig) -> Result<Self, KafkaError> {
        Ok(Cluster {
            admin: Arc::new(config.create()?),
        })
    }

    pub fn admin(&self) -> &AdminClient<DefaultClientContext> {
        &self.admin
    }

    /// The brokers and every topic; with `topic`, only that topic (a
    /// cheaper request on a cluster of many topics).
    pub async fn view(&self, topic: Option<&str>) -> Result<ClusterView, KafkaError> {
        let admin = Arc::clone(&self.admin);
        let topic = topic.map(str::to_owned);
        // Metadata requests block; keep them off the async threads.
        tokio::task::spawn_blocking(move || {
            admin
                .inner()
                .fetch_metadata(topic.as_deref(), REQUEST_TIMEOUT)
                .map(|m| ClusterView::of(&m))
        })
        .await
        .expect("metadata task panicked")
    }

    /// A broker's value of `name` (`default.replication.factor`, ...).
    pub async fn broker_setting(&self, broker: i32, name: &str) -> Result<String, KafkaError> {
        let resource = ResourceSpecifier::Broker(broker);
        let mut results = self.admin.describe_configs([&resource], &options()).await?;
        let config = results
            .pop()
            .ok_or(KafkaError::AdminOp(RDKafkaErrorCode::Fail))?
            .map_err(KafkaError::AdminOp)?;
        config
            .get(name)
            .and_then(|e| e.value.clone())
            .ok_or(KafkaError::AdminOp(RDKafkaErrorCode::InvalidConfig))
    }

    /// Each topic's value of `name`, or why it cannot be read.
    pub async fn topic_settings(
        &self,
        topics: &[String],
        name: &str,
    ) -> Result<Vec<Result<Setting, RDKafkaErrorCode>>, KafkaError> {
        let resources: Vec<ResourceSpecifier<'_>> =
            topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
        let results = self
            .admin
            .describe_configs(resources.iter(), &options())
            .await?;
        Ok(results
            .into_iter()
            .map(|result| {
                let config = result?;
                let entry = config.get(name).ok_or(RDKafkaErrorCode::InvalidConfig)?;
                Ok(Setting {
                    value: entry.value.clone().unwrap_or_default(),
                    on_topic: entry.source == ConfigSource::DynamicTopic,
                })
            })
            .collect())
    }
}

fn options() -> AdminOptions {
    AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT))
}
