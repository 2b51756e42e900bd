//! What can go wrong in the relay, and the one function that decides what
//! to do about it: retry, stand by, or stop.

use super::ack_tracker::AckError;
use super::outbox_watch::OutboxProblem;
use crate::publish::{PublishError, TopicError};
use crate::replication::ReplicationError;
use crate::slot_health::SlotProblem;

/// Everything that can end a replication session or the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error("the replication stream broke the protocol: {0}")]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("cannot create the Kafka producer: {0}")]
    Producer(String),
    #[error("{0}")]
    Outbox(Box<OutboxProblem>),
    #[error("{0}")]
    Slot(Box<SlotProblem>),
    #[error("internal error, please report it: {0}")]
    Ack(#[from] AckError),
}

impl From<OutboxProblem> for RelayError {
    fn from(problem: OutboxProblem) -> Self {
        RelayError::Outbox(Box::new(problem))
    }
}

impl From<SlotProblem> for RelayError {
    fn from(problem: SlotProblem) -> Self {
        RelayError::Slot(Box::new(problem))
    }
}

/// The stream did something the protocol does not allow, or ended.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("Begin inside an open transaction")]
    BeginInTransaction,
    #[error("Commit without Begin")]
    CommitWithoutBegin,
    #[error("Insert outside a transaction")]
    InsertOutsideTransaction,
    #[error("Insert into relation {0} before its Relation message")]
    UnknownRelation(u32),
    #[error("unexpected {0} message (streaming and two-phase messages are never requested)")]
    Unexpected(&'static str),
    #[error("the server ended the stream")]
    Ended,
    #[error(
        "the server sent nothing for {0:?}, though asked to answer: the host or the route to it is gone; connecting again (to another host of --pg-url if there is one)"
    )]
    Silent(std::time::Duration),
}

/// What to do about a failed session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Try again after a backoff: the condition passes by itself.
    Retry,
    /// Another relay streams from the slot: stand by and ask again soon.
    StandBy,
    /// Someone must change something (a dropped slot, a revoked login);
    /// tried a few times first, then the relay stops with the fix.
    StopAfterRetries,
    /// Stop now, with the fix.
    Stop,
}

/// The one place that decides.
pub fn decide(error: &RelayError) -> Decision {
    match error {
        RelayError::Replication(e) if e.sqlstate() == Some("55006") => Decision::StandBy,
        RelayError::Replication(e) if e.is_transient() => Decision::Retry,
        RelayError::Replication(_) => Decision::StopAfterRetries,
        RelayError::Stream(StreamError::Ended | StreamError::Silent(_)) => Decision::Retry,
        RelayError::Stream(_) => Decision::StopAfterRetries,
        RelayError::Publish(PublishError::Topic(
            TopicError::Metadata { .. }
            | TopicError::Create {
                permanent: false, ..
            },
        )) => Decision::Retry,
        // Another relay took over (it holds the slot now, so the next
        // attempt stands by), or the producer is made anew: the events in
        // flight are read again from the slot.
        RelayError::Publish(PublishError::Fenced { .. } | PublishError::Producer(_)) => {
            Decision::Retry
        }
        RelayError::Publish(PublishError::Topic(_))
        | RelayError::Producer(_)
        | RelayError::Outbox(_)
        | RelayError::Slot(_)
        | RelayError::Ack(_) => Decision::Stop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::ServerError;

    fn server(code: &str, message: &str) -> RelayError {
        RelayError::Replication(ReplicationError::Server {
            address: "db:5432".into(),
            error: Box::new(ServerError {
                severity: "ERROR".into(),
                code: code.into(),
                message: message.into(),
                detail: None,
                hint: None,
            }),
        })
    }

    #[test]
    fn a_held_slot_stands_by_a_lost_connection_retries_a_dropped_slot_stops() {
        let busy = server("55006", "replication slot \"walrelay\" is active for PID 7");
        assert_eq!(decide(&busy), Decision::StandBy);
        let closed = RelayError::Replication(ReplicationError::Closed {
            address: "db:5432".into(),
        });
        assert_eq!(decide(&closed), Decision::Retry);
        let dropped = server("42704", "replication slot \"walrelay\" does not exist");
        assert_eq!(decide(&dropped), Decision::StopAfterRetries);
        let missing = RelayError::Publish(TopicError::Missing("t".into()).into());
        assert_eq!(decide(&missing), Decision::Stop);
    }
}
