//! One Kafka record, as the router builds it and a sink sends it. Its own
//! module, so the sink does not depend on the router.

use std::borrow::Cow;

use bytes::Bytes;

/// A header's name: walrelay's own names are static, so a record's
/// headers cost no allocation for their names.
pub type HeaderName = Cow<'static, str>;

/// One Kafka record, ready for the producer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaRecord {
    pub topic: String,
    pub key: Option<Bytes>,
    /// `None` is a tombstone (a NULL payload).
    pub value: Option<Bytes>,
    pub headers: Vec<(HeaderName, Bytes)>,
}

impl KafkaRecord {
    /// Bytes this record holds, for the in-flight window.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Bytes::len)
            + self.value.as_ref().map_or(0, Bytes::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    /// A header's value, if present.
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}
