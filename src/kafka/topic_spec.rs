//! What walrelay asks of a topic (`--topic-partitions`,
//! `--topic-replication-factor`) and how an existing topic differs from
//! it, each difference with its fix. Pure, so `check` names the same
//! fixes that `run` logs.

use super::cluster::TopicShape;

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
    pub(super) fn log(&self, topic: &str, brokers: &str) {
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
