//! librdkafka's errors, classified once into [`BrokerError`]s (what to do
//! about them is decided in `publish::error`); the producer and the tail
//! reader both use it.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::publish::{BrokerError, BrokerErrorClass};

/// librdkafka's error, classified by what sending again can do.
pub fn classify(error: &KafkaError) -> BrokerError {
    use RDKafkaErrorCode as C;
    let class = match error {
        KafkaError::Transaction(e) if e.is_fatal() => fatal_class(e.code()),
        // A transactional call that failed: a retriable error means "call it
        // again" (a commit may still complete), anything else that the
        // transaction must be aborted.
        KafkaError::Transaction(e) if e.is_retriable() => BrokerErrorClass::Transient,
        KafkaError::Transaction(e) if e.txn_requires_abort() => BrokerErrorClass::Abortable,
        KafkaError::Transaction(e) => match e.code() {
            C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::TransactionalIdAuthorizationFailed => BrokerErrorClass::NotAuthorized,
            _ => BrokerErrorClass::Abortable,
        },
        _ => match error.rdkafka_error_code() {
            Some(C::MessageSizeTooLarge | C::InvalidMessageSize) => BrokerErrorClass::TooLarge,
            Some(C::InvalidRecord | C::InvalidMessage | C::PolicyViolation | C::InvalidTopic) => {
                BrokerErrorClass::InvalidRecord
            }
            Some(
                C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::TransactionalIdAuthorizationFailed,
            ) => BrokerErrorClass::NotAuthorized,
            Some(code @ (C::ProducerFenced | C::InvalidProducerEpoch | C::Fatal)) => {
                fatal_class(code)
            }
            _ => BrokerErrorClass::Transient,
        },
    };
    BrokerError {
        class,
        message: error.to_string(),
    }
}

fn fatal_class(code: RDKafkaErrorCode) -> BrokerErrorClass {
    match code {
        RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch => {
            BrokerErrorClass::Fenced
        }
        _ => BrokerErrorClass::Fatal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_and_authorization_errors_are_classified_fencing_ends_the_producer_others_are_transient()
    {
        let class = |code| classify(&KafkaError::MessageProduction(code)).class;
        assert_eq!(
            class(RDKafkaErrorCode::MessageSizeTooLarge),
            BrokerErrorClass::TooLarge
        );
        assert_eq!(
            class(RDKafkaErrorCode::TopicAuthorizationFailed),
            BrokerErrorClass::NotAuthorized
        );
        assert_eq!(
            class(RDKafkaErrorCode::ProducerFenced),
            BrokerErrorClass::Fenced
        );
        assert_eq!(class(RDKafkaErrorCode::Fatal), BrokerErrorClass::Fatal);
        assert_eq!(
            class(RDKafkaErrorCode::MessageTimedOut),
            BrokerErrorClass::Transient
        );
        assert_eq!(
            class(RDKafkaErrorCode::BrokerTransportFailure),
            BrokerErrorClass::Transient
        );
    }
}
