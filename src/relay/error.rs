//! What can go wrong in the relay, and the one function that decides what
//! to do about it: retry, stand by, dead-letter, give up, or stop.

use super::ack_tracker::AckError;
use crate::monitor::OutboxProblem;
use crate::replication::ReplicationError;
use crate::sink::{BrokerError, BrokerErrorClass, TopicError};

/// Everything that can end a replication session or the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error("the replication stream broke the protocol: {0}")]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error("cannot create the Kafka producer: {0}")]
    Producer(String),
    #[error("{0}")]
    Outbox(#[from] OutboxProblem),
    #[error("internal error, please report it: {0}")]
    Ack(#[from] AckError),
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
}

/// A failure to decide about.
#[derive(Clone, Copy, Debug)]
pub enum Failure<'a> {
    /// The replication session (or the relay) failed.
    Session(&'a RelayError),
    /// The broker did not take a record; `dead_letter` when the record was
    /// already a dead letter.
    Delivery {
        error: &'a BrokerError,
        dead_letter: bool,
    },
}

/// What to do about a failure.
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
    /// The record can never be delivered: send its dead letter instead.
    DeadLetter {
        kind: &'static str,
        keep_value: bool,
    },
    /// A dead letter that cannot be delivered either: log every detail and
    /// let the slot move on rather than wedge it forever.
    GiveUp,
}

/// The one place that decides.
pub fn decide(failure: Failure<'_>) -> Decision {
    match failure {
        Failure::Session(error) => match error {
            RelayError::Replication(e) if e.sqlstate() == Some("55006") => Decision::StandBy,
            RelayError::Replication(e) if e.is_transient() => Decision::Retry,
            RelayError::Replication(_) => Decision::StopAfterRetries,
            RelayError::Stream(StreamError::Ended) => Decision::Retry,
            RelayError::Stream(_) => Decision::StopAfterRetries,
            RelayError::Topic(TopicError::Metadata { .. })
            | RelayError::Topic(TopicError::Create {
                permanent: false, ..
            }) => Decision::Retry,
            RelayError::Topic(_)
            | RelayError::Producer(_)
            | RelayError::Outbox(_)
            | RelayError::Ack(_) => Decision::Stop,
        },
        Failure::Delivery { error, dead_letter } => {
            let (kind, keep_value) = match error.class {
                BrokerErrorClass::Transient => return Decision::Retry,
                // An oversize value cannot travel in its dead letter either.
                BrokerErrorClass::TooLarge => ("too_large", false),
                BrokerErrorClass::InvalidRecord => ("invalid_record", true),
                BrokerErrorClass::NotAuthorized => ("not_authorized", true),
            };
            if dead_letter {
                Decision::GiveUp
            } else {
                Decision::DeadLetter { kind, keep_value }
            }
        }
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
        assert_eq!(decide(Failure::Session(&busy)), Decision::StandBy);
        let closed = RelayError::Replication(ReplicationError::Closed {
            address: "db:5432".into(),
        });
        assert_eq!(decide(Failure::Session(&closed)), Decision::Retry);
        let dropped = server("42704", "replication slot \"walrelay\" does not exist");
        assert_eq!(
            decide(Failure::Session(&dropped)),
            Decision::StopAfterRetries
        );
        let missing = RelayError::Topic(TopicError::Missing("t".into()));
        assert_eq!(decide(Failure::Session(&missing)), Decision::Stop);
    }

    #[test]
    fn oversize_records_become_dead_letters_without_their_value_and_dead_letters_give_up() {
        let too_large = BrokerError {
            class: BrokerErrorClass::TooLarge,
            message: "Broker: Message size too large".into(),
        };
        assert_eq!(
            decide(Failure::Delivery {
                error: &too_large,
                dead_letter: false
            }),
            Decision::DeadLetter {
                kind: "too_large",
                keep_value: false
            }
        );
        assert_eq!(
            decide(Failure::Delivery {
                error: &too_large,
                dead_letter: true
            }),
            Decision::GiveUp
        );
        let away = BrokerError::transient("all brokers down");
        assert_eq!(
            decide(Failure::Delivery {
                error: &away,
                dead_letter: true
            }),
            Decision::Retry
        );
    }
}
