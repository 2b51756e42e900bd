//! What can go wrong while publishing, and the one function that decides
//! what a failed delivery means.

use super::sink::{BrokerError, BrokerErrorClass, TopicError};

/// Why the publisher cannot go on; the source ends its session (or stops).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// A topic cannot be used and someone must fix that.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// Another relay took over the transactional id: this producer's open
    /// transaction is aborted and it may write no more.
    #[error(
        "another relay took over (Kafka fenced transactional id {transactional_id:?}): {error}; standing by"
    )]
    Fenced {
        transactional_id: String,
        error: BrokerError,
    },
    /// The producer failed for good; a new one is made for the next session.
    #[error("the Kafka producer failed for good and is made anew: {0}")]
    Producer(BrokerError),
}

impl PublishError {
    /// The error for a broker error that ends the producer.
    pub(super) fn ending(error: BrokerError, transactional_id: Option<&str>) -> Self {
        match (error.class, transactional_id) {
            (BrokerErrorClass::Fenced, Some(id)) => PublishError::Fenced {
                transactional_id: id.to_owned(),
                error,
            },
            _ => PublishError::Producer(error),
        }
    }
}

/// Why the broker will never take a record: the kind its dead letter and
/// its row in the dead-letter table carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalKind {
    TooLarge,
    InvalidRecord,
}

impl RefusalKind {
    /// The stable snake_case name (`walrelay_error_kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalKind::TooLarge => "too_large",
            RefusalKind::InvalidRecord => "invalid_record",
        }
    }

    /// Whether the record's value can travel in its notice: a value too
    /// large cannot.
    pub fn notice_keeps_value(self) -> bool {
        self != RefusalKind::TooLarge
    }
}

impl std::fmt::Display for RefusalKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a failed delivery means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryDecision {
    /// Send it again after a pause (it stays in flight meanwhile): the
    /// broker is away, electing a leader, or an authorization is being
    /// rotated.
    Retry,
    /// The broker will never take this record: the source keeps it whole
    /// somewhere durable and sends its dead letter.
    Refuse { kind: RefusalKind },
    /// The producer as a whole is done for.
    EndProducer,
}

/// The one place that decides.
pub fn decide(error: &BrokerError) -> DeliveryDecision {
    match error.class {
        BrokerErrorClass::Transient
        | BrokerErrorClass::NotAuthorized
        | BrokerErrorClass::Abortable => DeliveryDecision::Retry,
        BrokerErrorClass::TooLarge => DeliveryDecision::Refuse {
            kind: RefusalKind::TooLarge,
        },
        BrokerErrorClass::InvalidRecord => DeliveryDecision::Refuse {
            kind: RefusalKind::InvalidRecord,
        },
        BrokerErrorClass::Fenced | BrokerErrorClass::Fatal => DeliveryDecision::EndProducer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(class: BrokerErrorClass) -> BrokerError {
        BrokerError {
            class,
            message: "m".into(),
        }
    }

    #[test]
    fn an_authorization_failure_is_waited_out_and_only_size_or_content_refuses_a_record() {
        assert_eq!(
            decide(&error(BrokerErrorClass::NotAuthorized)),
            DeliveryDecision::Retry
        );
        assert_eq!(
            decide(&error(BrokerErrorClass::Transient)),
            DeliveryDecision::Retry
        );
        assert_eq!(
            decide(&error(BrokerErrorClass::TooLarge)),
            DeliveryDecision::Refuse {
                kind: RefusalKind::TooLarge
            }
        );
        assert_eq!(
            decide(&error(BrokerErrorClass::Fenced)),
            DeliveryDecision::EndProducer
        );
    }
}
