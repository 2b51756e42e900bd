//! What the publisher knows of each topic: being prepared (created if
//! missing), ready with its partition count, or changing its count. Counts
//! are read again every so often, so keys land where Java's partitioner
//! puts them after partitions are added.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::sink::TopicError;

/// How often a ready topic's partition count is read again.
pub const REFRESH: Duration = Duration::from_secs(30);

#[derive(Debug)]
enum State {
    /// Being prepared; its records wait.
    Preparing,
    Ready {
        partitions: i32,
        checked_at: Instant,
        /// A refresh of its count is under way.
        refreshing: bool,
    },
    /// Its count grew: records of it wait until those already sent are
    /// delivered, so no key's new records overtake its old ones.
    Growing { from: i32, to: i32 },
}

/// What a topic lets its records do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Unknown: prepare it; its records wait.
    Unknown,
    /// Its records wait.
    Waiting,
    /// Ready, with this many partitions; `refresh` when its count should be
    /// read again.
    Ready { partitions: i32, refresh: bool },
    /// Its count grew from `from` to `to`: switch once nothing of it is in
    /// flight.
    Growing { from: i32, to: i32 },
}

/// What a finished preparation or refresh means.
#[derive(Debug, PartialEq, Eq)]
pub enum Prepared {
    /// Ready (or unchanged).
    Ready,
    /// The count grew: the topic's records wait for those in flight.
    Grew,
}

#[derive(Debug, Default)]
pub struct Topics {
    states: HashMap<String, State>,
}

impl Topics {
    pub fn readiness(&self, topic: &str) -> Readiness {
        match self.states.get(topic) {
            None => Readiness::Unknown,
            Some(State::Preparing) => Readiness::Waiting,
            Some(State::Ready {
                partitions,
                checked_at,
                refreshing,
            }) => Readiness::Ready {
                partitions: *partitions,
                refresh: !refreshing && checked_at.elapsed() >= REFRESH,
            },
            Some(State::Growing { from, to }) => Readiness::Growing {
                from: *from,
                to: *to,
            },
        }
    }

    pub fn preparing(&mut self, topic: &str) {
        self.states.insert(topic.to_owned(), State::Preparing);
    }

    pub fn refreshing(&mut self, topic: &str) {
        if let Some(State::Ready { refreshing, .. }) = self.states.get_mut(topic) {
            *refreshing = true;
        }
    }

    /// A preparation or refresh ended with `partitions`.
    pub fn prepared(&mut self, topic: &str, partitions: i32) -> Result<Prepared, TopicError> {
        let ready = State::Ready {
            partitions,
            checked_at: Instant::now(),
            refreshing: false,
        };
        match self.states.get(topic) {
            Some(State::Ready {
                partitions: before, ..
            }) if partitions < *before => Err(TopicError::Shrank {
                topic: topic.to_owned(),
                before: *before,
                now: partitions,
            }),
            Some(State::Ready {
                partitions: before, ..
            }) if partitions > *before => {
                tracing::info!(
                    topic,
                    from = before,
                    to = partitions,
                    "the topic has more partitions now"
                );
                let from = *before;
                self.states.insert(
                    topic.to_owned(),
                    State::Growing {
                        from,
                        to: partitions,
                    },
                );
                Ok(Prepared::Grew)
            }
            _ => {
                self.states.insert(topic.to_owned(), ready);
                Ok(Prepared::Ready)
            }
        }
    }

    /// A refresh failed: try again at the next interval.
    pub fn refresh_failed(&mut self, topic: &str) {
        if let Some(State::Ready {
            checked_at,
            refreshing,
            ..
        }) = self.states.get_mut(topic)
        {
            *checked_at = Instant::now();
            *refreshing = false;
        }
    }

    /// Nothing of a growing topic is in flight any more: use its new count.
    pub fn grown(&mut self, topic: &str) {
        if let Some(State::Growing { to, .. }) = self.states.get(topic) {
            let partitions = *to;
            self.states.insert(
                topic.to_owned(),
                State::Ready {
                    partitions,
                    checked_at: Instant::now(),
                    refreshing: false,
                },
            );
        }
    }

    /// Forgets a topic (its next record prepares it again).
    pub fn forget(&mut self, topic: &str) {
        self.states.remove(topic);
    }

    pub fn is_preparing(&self, topic: &str) -> bool {
        matches!(self.states.get(topic), Some(State::Preparing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_count_is_read_again_after_the_interval_grows_with_a_pause_and_never_shrinks() {
        let mut t = Topics::default();
        assert_eq!(t.readiness("a"), Readiness::Unknown);
        t.preparing("a");
        assert_eq!(t.readiness("a"), Readiness::Waiting);
        assert_eq!(t.prepared("a", 2), Ok(Prepared::Ready));
        assert_eq!(
            t.readiness("a"),
            Readiness::Ready {
                partitions: 2,
                refresh: false
            }
        );
        tokio::time::advance(REFRESH).await;
        assert_eq!(
            t.readiness("a"),
            Readiness::Ready {
                partitions: 2,
                refresh: true
            }
        );
        t.refreshing("a");
        assert_eq!(t.prepared("a", 4), Ok(Prepared::Grew));
        assert_eq!(t.readiness("a"), Readiness::Growing { from: 2, to: 4 });
        t.grown("a");
        assert!(matches!(
            t.readiness("a"),
            Readiness::Ready { partitions: 4, .. }
        ));
        assert!(matches!(t.prepared("a", 3), Err(TopicError::Shrank { .. })));
    }
}
