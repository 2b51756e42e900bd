//! CloudEvents binary mode: the `ce_*` headers, and PostgreSQL timestamps
//! as RFC 3339.

use bytes::Bytes;

use crate::record::HeaderName;

/// The CloudEvents attributes of one record, appended as headers.
pub struct CloudEvent<'a> {
    pub id: &'a str,
    pub event_type: &'a str,
    pub source: &'a str,
    pub time: &'a str,
    pub content_type: &'a str,
}

impl CloudEvent<'_> {
    pub fn push_headers(&self, headers: &mut Vec<(HeaderName, Bytes)>) {
        let mut push = |name: &'static str, value: &str| {
            headers.push((name.into(), Bytes::copy_from_slice(value.as_bytes())));
        };
        push("ce_specversion", "1.0");
        push("ce_id", self.id);
        push("ce_type", self.event_type);
        push("ce_source", self.source);
        push("ce_time", self.time);
        push("content-type", self.content_type);
    }
}

/// PostgreSQL's ISO timestamp text (`2026-11-23 08:32:03.123456+00`) as
/// RFC 3339 (`2026-11-23T08:32:03.123456Z`). The replication session runs
/// with TimeZone=UTC, so timestamptz values arrive with offset `+00`.
pub fn timestamp_text_to_rfc3339(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    if bytes.len() < 19 || bytes[10] != b' ' || !bytes[..4].iter().all(u8::is_ascii_digit) {
        return None; // infinity, BC dates and the like
    }
    let (datetime, offset) = match text[19..].find(['+', '-']) {
        Some(i) => (&text[..19 + i], &text[19 + i..]),
        None => (text, ""),
    };
    let offset = match offset {
        "" | "+00" | "+00:00" | "-00" => "Z".to_owned(),
        o if o.len() == 3 => format!("{o}:00"),
        o => o.to_owned(),
    };
    Some(format!("{}T{}{offset}", &datetime[..10], &datetime[11..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_convert_to_rfc3339() {
        assert_eq!(
            timestamp_text_to_rfc3339("2026-11-23 08:32:03.123456+00").as_deref(),
            Some("2026-11-23T08:32:03.123456Z")
        );
        assert_eq!(
            timestamp_text_to_rfc3339("2026-11-23 08:32:03+05:30").as_deref(),
            Some("2026-11-23T08:32:03+05:30")
        );
        assert_eq!(
            timestamp_text_to_rfc3339("2026-11-23 08:32:03-02").as_deref(),
            Some("2026-11-23T08:32:03-02:00")
        );
        assert_eq!(
            timestamp_text_to_rfc3339("2026-11-23 08:32:03").as_deref(),
            Some("2026-11-23T08:32:03Z")
        );
        assert_eq!(timestamp_text_to_rfc3339("infinity"), None);
    }
}
