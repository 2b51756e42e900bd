//! Records through the publisher, one page at a time, waited for until
//! each is in Kafka (its transaction committed, exactly once): only then
//! may the page's end be written down as done.

use crate::kafka::KafkaSink;
use crate::publish::{
    EVENT_MARGIN, Origin, Outcome, Outgoing, Publisher, PublisherConfig, Replay, ScanSettings,
    TopicFailures,
};
use crate::record::KafkaRecord;
use crate::timeline::TimelineHistory;

use super::ReplayError;

pub struct Sender {
    publisher: Publisher<KafkaSink, usize>,
}

impl Sender {
    /// A publisher for `origin`'s records; with `transactional_id`, in
    /// Kafka transactions under that id (a second run of the same job
    /// fences the first).
    pub fn new(
        sink: KafkaSink,
        dead_letter_topic: &str,
        exactly_once: bool,
        origin: Origin,
        transactional_id: Option<String>,
    ) -> Self {
        let mut publisher = Publisher::new(
            sink,
            PublisherConfig {
                dead_letter_topic: dead_letter_topic.to_owned(),
                topic_failures: TopicFailures::Stop,
                // Exactly once, the publisher picks partitions as the
                // stream does; records go without a position, so no tail
                // is scanned (ids are looked for before, `ids.rs`).
                exactly_once: exactly_once.then(|| ScanSettings {
                    lookback: 1,
                    dead_letter_topic: dead_letter_topic.to_owned(),
                    window: EVENT_MARGIN,
                    margin: EVENT_MARGIN,
                }),
            },
        );
        publisher.begin_session(
            exactly_once.then(|| Replay {
                origin,
                history: TimelineHistory::new(0),
                start: crate::lsn::Lsn(0),
            }),
            transactional_id,
        );
        Sender { publisher }
    }

    /// Sends `records` (each with whether it is a dead letter) in order
    /// and returns once every one is in Kafka.
    pub async fn send_all(&mut self, records: Vec<(KafkaRecord, bool)>) -> Result<(), ReplayError> {
        let total = records.len();
        let mut settled = 0;
        for (tag, (record, dead_letter)) in records.into_iter().enumerate() {
            while !self.publisher.accepting() {
                settled += settle(self.publisher.next().await?)?;
            }
            let outcomes = self.publisher.publish(Outgoing {
                record,
                tag,
                position: None,
                dead_letter,
            });
            settled += settle(outcomes)?;
        }
        while settled < total {
            settled += settle(self.publisher.next().await?)?;
        }
        Ok(())
    }
}

/// Records settled among `outcomes`; a record Kafka will never take
/// stops the job (its row stays in the table, nothing is lost).
fn settle(outcomes: Vec<Outcome<usize>>) -> Result<usize, ReplayError> {
    let mut settled = 0;
    for outcome in outcomes {
        match outcome {
            Outcome::Delivered { .. } | Outcome::Skipped { .. } => settled += 1,
            Outcome::Refused { record, error, .. } => {
                return Err(ReplayError::Refused(format!(
                    "Kafka refused the event {} for topic {} ({error:?}): fix the row or the topic's limits (max.message.bytes) and run again; it resumes where it stopped",
                    record
                        .header("id")
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default(),
                    record.topic
                )));
            }
            Outcome::Failed { error, .. } => return Err(ReplayError::Refused(error)),
        }
    }
    Ok(settled)
}
