//! The half of publishing that does not depend on the source, shared by
//! the WAL relay (`relay/outbound.rs`) and the polling source
//! (`poll/batch.rs`): what a routed change sends, the headers that say
//! where an exactly-once record comes from, and what a record the broker
//! refused for good becomes. Each source keeps only its own bookkeeping
//! (tickets and the window, or a batch's rows).

use std::fmt::Display;

use bytes::Bytes;

use super::error::RefusalKind;
use super::position::{ORIGIN_HEADER, Origin, POSITION_HEADER, Position};
use crate::dead_letters::DeadLetter;
use crate::metrics as m;
use crate::record::KafkaRecord;
use crate::router::{RouteError, Routed};

/// What a routed change sends.
#[derive(Debug)]
pub struct ToSend {
    /// The event's record, or the dead letter sent instead.
    pub record: KafkaRecord,
    /// Why the change cannot be an event, if it cannot.
    pub unroutable: Option<RouteError>,
}

/// What a routed change sends, or `None` if it is not an event. A change
/// that cannot be an event goes to the dead-letter topic, counted and
/// logged with where it comes from (`at`).
pub fn to_send(routed: Routed, at: impl Display) -> Option<ToSend> {
    match routed {
        Routed::Ignored => None,
        Routed::Event(record) => Some(ToSend {
            record,
            unroutable: None,
        }),
        Routed::DeadLetter { record, error } => {
            tracing::warn!(%at, reason = %error, kind = error.kind(), "unroutable change sent to the dead-letter topic");
            metrics::counter!(m::DEAD_LETTERS_TOTAL, "kind" => "unroutable").increment(1);
            Some(ToSend {
                record,
                unroutable: Some(error),
            })
        }
    }
}

/// Exactly once: the headers every record of one origin carries, so a
/// later process can tell it is already in its partition (the origin
/// formatted once, not per record).
#[derive(Clone, Debug)]
pub struct OriginStamp {
    origin: Bytes,
}

impl OriginStamp {
    pub fn new(origin: &Origin) -> Self {
        OriginStamp {
            origin: Bytes::from(origin.to_string()),
        }
    }

    /// Adds the position and origin headers to `record`.
    pub fn stamp(&self, record: &mut KafkaRecord, position: Position) {
        record
            .headers
            .push((POSITION_HEADER.into(), position.to_bytes()));
        record
            .headers
            .push((ORIGIN_HEADER.into(), self.origin.clone()));
    }
}

/// A record the broker will never take, as the source keeps it: whole in
/// the dead-letter table, and a notice of it for the dead-letter topic.
#[derive(Debug)]
pub struct RefusedRecord {
    pub letter: DeadLetter,
    pub notice: KafkaRecord,
}

/// What a record the broker refused for good (`kind`, `reason`) becomes:
/// counted, kept whole under `event_key` (where it comes from, so storing
/// it again after a replay changes nothing), and a notice that keeps the
/// value unless the value was the problem.
pub fn refused(
    dead_letter_topic: &str,
    event_key: String,
    record: KafkaRecord,
    reason: String,
    kind: RefusalKind,
) -> RefusedRecord {
    metrics::counter!(m::DEAD_LETTERS_TOTAL, "kind" => "broker_rejected").increment(1);
    let notice = crate::router::broker_dead_letter(
        dead_letter_topic,
        &record,
        &reason,
        kind.as_str(),
        kind.notice_keeps_value(),
    );
    RefusedRecord {
        letter: DeadLetter {
            event_key,
            record,
            kind: kind.as_str().to_owned(),
            error: reason,
        },
        notice,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;

    fn record() -> KafkaRecord {
        KafkaRecord {
            topic: "outbox.event.a".into(),
            key: Some(Bytes::from_static(b"k")),
            value: Some(Bytes::from_static(b"{}")),
            headers: vec![("id".into(), Bytes::from_static(b"x"))],
        }
    }

    fn header<'a>(record: &'a KafkaRecord, name: &str) -> Option<&'a [u8]> {
        record.header(name).map(|v| v.as_ref())
    }

    #[test]
    fn an_ignored_change_sends_nothing_and_an_unroutable_one_its_dead_letter() {
        assert!(to_send(Routed::Ignored, "0/1").is_none());
        let sent = to_send(Routed::Event(record()), "0/1").unwrap();
        assert!(sent.unroutable.is_none());
        let sent = to_send(
            Routed::DeadLetter {
                record: record(),
                error: RouteError::NullColumn("aggregate_id".into()),
            },
            "0/1",
        )
        .unwrap();
        assert_eq!(
            sent.unroutable,
            Some(RouteError::NullColumn("aggregate_id".into()))
        );
    }

    #[test]
    fn a_stamped_record_carries_its_position_and_origin() {
        let origin = Origin {
            system_id: "7".into(),
            slot: "walrelay".into(),
            timeline: 1,
        };
        let position = Position {
            commit: Lsn(0x10),
            change: Lsn(0x8),
            rank: 2,
        };
        let mut record = record();
        OriginStamp::new(&origin).stamp(&mut record, position);
        assert_eq!(
            header(&record, POSITION_HEADER),
            Some(position.to_bytes().as_ref())
        );
        assert_eq!(
            header(&record, ORIGIN_HEADER),
            Some(origin.to_string().as_bytes())
        );
    }

    #[test]
    fn a_refused_record_is_kept_whole_and_its_notice_drops_only_a_value_too_large() {
        let kept = refused(
            "dl",
            "o/1".into(),
            record(),
            "too big".into(),
            RefusalKind::TooLarge,
        );
        assert_eq!(kept.letter.record, record());
        assert_eq!(kept.letter.event_key, "o/1");
        assert_eq!(kept.letter.kind, "too_large");
        assert_eq!(kept.notice.topic, "dl");
        assert_eq!(kept.notice.value, None);
        let kept = refused(
            "dl",
            "o/1".into(),
            record(),
            "bad".into(),
            RefusalKind::InvalidRecord,
        );
        assert_eq!(kept.notice.value, record().value);
    }
}
