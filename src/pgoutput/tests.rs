//! Decoder tests: recorded fixtures from a real PostgreSQL 15
//! (`scripts/record-fixtures`), hand-built messages for what PG 15 cannot
//! produce, and malformed input of every kind.

use std::path::PathBuf;

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;

use super::*;
use crate::lsn::Lsn;

fn fixtures() -> Vec<(String, Bytes)> {
    static FIXTURES: std::sync::OnceLock<Vec<(String, Bytes)>> = std::sync::OnceLock::new();
    FIXTURES.get_or_init(load_fixtures).clone()
}

fn load_fixtures() -> Vec<(String, Bytes)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pgoutput");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("fixtures directory")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    files.sort();
    assert!(
        files.len() > 100,
        "record the fixtures with scripts/record-fixtures"
    );
    files
        .into_iter()
        .map(|p| {
            let name = p.file_stem().unwrap().to_str().unwrap().to_owned();
            (name, Bytes::from(std::fs::read(&p).unwrap()))
        })
        .collect()
}

/// Decodes every fixture in stream order.
fn decode_all() -> Vec<(String, LogicalMessage)> {
    let mut decoder = StreamDecoder::new();
    fixtures()
        .into_iter()
        .map(|(name, bytes)| {
            let message = decoder
                .decode(&bytes)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, message)
        })
        .collect()
}

fn text(value: &ColumnValue) -> &str {
    match value {
        ColumnValue::Text(b) => std::str::from_utf8(b).unwrap(),
        other => panic!("expected text, got {other:?}"),
    }
}

#[test]
fn every_recorded_message_decodes_to_the_kind_its_file_names() {
    let decoded = decode_all();
    for (name, message) in &decoded {
        let label = name.split_once('_').unwrap().1.replace('_', "");
        assert_eq!(message.kind().to_lowercase(), label, "{name}");
    }
    let mut kinds: Vec<_> = decoded.iter().map(|(_, m)| m.kind()).collect();
    kinds.sort();
    kinds.dedup();
    assert_eq!(
        kinds,
        [
            "Begin",
            "BeginPrepare",
            "Commit",
            "CommitPrepared",
            "Delete",
            "Insert",
            "Message",
            "Origin",
            "Prepare",
            "Relation",
            "RollbackPrepared",
            "StreamAbort",
            "StreamCommit",
            "StreamPrepare",
            "StreamStart",
            "StreamStop",
            "Truncate",
            "Type",
            "Update"
        ]
    );
}

#[test]
fn recorded_outbox_insert_carries_its_column_values() {
    let decoded = decode_all();
    let relation = decoded
        .iter()
        .find_map(|(_, m)| match m {
            LogicalMessage::Relation(r) if r.name == "outbox" => Some(r.clone()),
            _ => None,
        })
        .unwrap();
    let names: Vec<_> = relation.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "id",
            "aggregate_type",
            "aggregate_id",
            "event_type",
            "payload",
            "headers",
            "created_at"
        ]
    );
    assert_eq!(relation.columns[0].type_oid, 2950, "uuid");
    assert_eq!(relation.columns[4].type_oid, 3802, "jsonb");
    assert!(relation.columns[0].is_key);
    assert_eq!(relation.replica_identity, ReplicaIdentity::Default);

    let insert = decoded
        .iter()
        .find_map(|(_, m)| match m {
            LogicalMessage::Insert(i) if i.relation_id == relation.id => Some(i.clone()),
            _ => None,
        })
        .unwrap();
    let values: Vec<_> = insert.new.columns.iter().map(text).collect();
    assert_eq!(
        values,
        [
            "6f1c1a52-8d7b-4f3e-9a51-2b0c7e4d9f10",
            "order",
            "order-42",
            "OrderCreated",
            r#"{"note": "Zürich", "total": 12.5, "currency": "EUR"}"#,
            "{}",
            "2026-11-23 08:00:00+00",
        ]
    );
    assert_eq!(insert.xid, None);
}

#[test]
fn recorded_updates_carry_old_rows_and_unchanged_toast() {
    let decoded = decode_all();
    let updates: Vec<_> = decoded
        .iter()
        .filter_map(|(_, m)| match m {
            LogicalMessage::Update(u) => Some(u.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(updates.len(), 3);
    assert_eq!(
        updates[0].old, None,
        "default identity, key unchanged: no old row"
    );
    let Some(OldTuple::Full(old)) = &updates[1].old else {
        panic!("REPLICA IDENTITY FULL sends the old row")
    };
    assert_eq!(text(&old.columns[1]), "sad");
    assert_eq!(updates[1].new.columns[2], ColumnValue::Null);
    // The big text column was not changed: its TOASTed value is not resent.
    assert!(
        matches!(updates[2].new.columns[3], ColumnValue::UnchangedToast),
        "expected an unchanged TOAST marker"
    );
}

#[test]
fn recorded_messages_origin_type_and_two_phase_fields() {
    let decoded = decode_all();
    let find = |kind: &str| -> Vec<LogicalMessage> {
        decoded
            .iter()
            .filter(|(_, m)| m.kind() == kind)
            .map(|(_, m)| m.clone())
            .collect()
    };
    let messages = find("Message");
    let LogicalMessage::Message(m) = &messages[0] else {
        unreachable!()
    };
    assert!(m.transactional);
    assert_eq!(m.prefix, "walrelay");
    assert!(m.content.starts_with(b"{\"aggregate_type\""));
    let LogicalMessage::Message(m) = &messages[1] else {
        unreachable!()
    };
    assert!(!m.transactional);
    assert_eq!(&m.content[..], b"not transactional");

    let LogicalMessage::Origin(o) = &find("Origin")[0] else {
        unreachable!()
    };
    assert_eq!(o.name, "upstream");
    assert_eq!(o.commit_lsn, "0/ABCDEF".parse::<Lsn>().unwrap());

    assert!(
        find("Type")
            .iter()
            .any(|t| matches!(t, LogicalMessage::Type(t) if t.name == "mood"))
    );

    let gids: Vec<String> = decoded
        .iter()
        .filter_map(|(_, m)| match m {
            LogicalMessage::CommitPrepared(c) => Some(c.gid.clone()),
            LogicalMessage::RollbackPrepared(r) => Some(r.gid.clone()),
            LogicalMessage::StreamPrepare(p) => Some(p.gid.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        gids,
        ["gid-commit", "gid-rollback", "gid-stream", "gid-stream"]
    );

    let LogicalMessage::Truncate(t) = &find("Truncate")[0] else {
        unreachable!()
    };
    assert_eq!(t.relation_ids.len(), 1);
    assert!(!t.cascade && !t.restart_identity);
}

#[test]
fn streamed_changes_carry_the_transaction_id_of_their_stream() {
    let decoded = decode_all();
    let mut current = None;
    let mut streamed_inserts = 0;
    for (name, m) in &decoded {
        match m {
            LogicalMessage::StreamStart(s) => current = Some(s.xid),
            LogicalMessage::StreamStop => current = None,
            LogicalMessage::Insert(i) => {
                assert_eq!(i.xid, current, "{name}");
                streamed_inserts += usize::from(current.is_some());
            }
            LogicalMessage::StreamCommit(c) => assert!(c.end_lsn > c.commit_lsn),
            LogicalMessage::StreamAbort(a) => {
                assert_eq!(a.abort_lsn, None, "protocol 3 sends no abort LSN");
                assert_eq!(a.xid, a.subtransaction_xid);
            }
            _ => {}
        }
    }
    assert!(streamed_inserts > 0);
}

#[test]
fn every_fixture_truncated_at_every_offset_is_a_truncation_error_not_a_panic() {
    let mut decoder = StreamDecoder::new();
    for (name, bytes) in fixtures() {
        let in_stream = decoder.in_stream();
        for cut in 0..bytes.len() {
            let err = decode(&bytes.slice(..cut), in_stream).expect_err(&name);
            assert!(
                matches!(
                    err,
                    DecodeError::Empty
                        | DecodeError::Truncated { .. }
                        | DecodeError::UnterminatedString { .. }
                ),
                "{name} cut at {cut}: {err}"
            );
        }
        decoder.decode(&bytes).unwrap();
    }
}

/// Builds message bodies the way the server writes them.
#[derive(Default)]
struct Body(BytesMut);

impl Body {
    fn tag(t: u8) -> Self {
        let mut b = Body::default();
        b.0.put_u8(t);
        b
    }
    fn u8(mut self, v: u8) -> Self {
        self.0.put_u8(v);
        self
    }
    fn i16(mut self, v: i16) -> Self {
        self.0.put_i16(v);
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.put_u32(v);
        self
    }
    fn i32(mut self, v: i32) -> Self {
        self.0.put_i32(v);
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.put_u64(v);
        self
    }
    fn str(mut self, s: &str) -> Self {
        self.0.put_slice(s.as_bytes());
        self.0.put_u8(0);
        self
    }
    fn raw(mut self, b: &[u8]) -> Self {
        self.0.put_slice(b);
        self
    }
    fn bytes(self) -> Bytes {
        self.0.freeze()
    }
}

#[test]
fn hand_built_protocol_4_stream_abort_carries_abort_lsn_and_time() {
    let body = Body::tag(b'A')
        .u32(700)
        .u32(701)
        .u64(0x1_0000_0010)
        .u64(42)
        .bytes();
    assert_eq!(
        decode(&body, false).unwrap(),
        LogicalMessage::StreamAbort(StreamAbort {
            xid: 700,
            subtransaction_xid: 701,
            abort_lsn: Some(Lsn(0x1_0000_0010)),
            abort_time: Some(PgTimestamp(42)),
        })
    );
    // Half of the optional fields is truncation, not silence.
    let half = Body::tag(b'A').u32(700).u32(701).u64(1).bytes();
    assert!(matches!(
        decode(&half, false),
        Err(DecodeError::Truncated { .. })
    ));
}

#[test]
fn hand_built_streamed_relation_insert_and_message_read_the_xid_first() {
    let relation = Body::tag(b'R')
        .u32(900)
        .u32(16384)
        .str("public")
        .str("outbox")
        .u8(b'f')
        .i16(2)
        .u8(1)
        .str("id")
        .u32(23)
        .i32(-1)
        .u8(0)
        .str("data")
        .u32(17)
        .i32(-1)
        .bytes();
    let LogicalMessage::Relation(r) = decode(&relation, true).unwrap() else {
        panic!()
    };
    assert_eq!(r.xid, Some(900));
    assert_eq!(r.replica_identity, ReplicaIdentity::Full);
    assert_eq!(r.columns[1].name, "data");
    assert!(!r.columns[1].is_key);

    let insert = Body::tag(b'I')
        .u32(900)
        .u32(16384)
        .u8(b'N')
        .i16(2)
        .u8(b't')
        .i32(2)
        .raw(b"42")
        .u8(b'b')
        .i32(3)
        .raw(&[0, 1, 2])
        .bytes();
    assert_eq!(
        decode(&insert, true).unwrap(),
        LogicalMessage::Insert(Insert {
            xid: Some(900),
            relation_id: 16384,
            new: TupleData {
                columns: vec![
                    ColumnValue::Text(Bytes::from_static(b"42")),
                    ColumnValue::Binary(Bytes::from_static(&[0, 1, 2]))
                ]
            },
        })
    );
    // Outside a stream the same bytes are misread and rejected, never a panic.
    assert!(decode(&insert, false).is_err());

    let message = Body::tag(b'M')
        .u32(900)
        .u8(1)
        .u64(5)
        .str("p")
        .i32(2)
        .raw(b"hi")
        .bytes();
    let LogicalMessage::Message(m) = decode(&message, true).unwrap() else {
        panic!()
    };
    assert_eq!(
        (m.xid, m.transactional, m.prefix.as_str(), &m.content[..]),
        (Some(900), true, "p", &b"hi"[..])
    );
}

#[test]
fn hand_built_two_phase_and_stream_messages_decode() {
    let prepare = |tag| {
        Body::tag(tag)
            .u8(0)
            .u64(10)
            .u64(20)
            .u64(30)
            .u32(7)
            .str("g1")
            .bytes()
    };
    let expected = Prepare {
        flags: 0,
        prepare_lsn: Lsn(10),
        end_lsn: Lsn(20),
        prepare_time: PgTimestamp(30),
        xid: 7,
        gid: "g1".into(),
    };
    assert_eq!(
        decode(&prepare(b'P'), false).unwrap(),
        LogicalMessage::Prepare(expected.clone())
    );
    assert_eq!(
        decode(&prepare(b'p'), false).unwrap(),
        LogicalMessage::StreamPrepare(expected)
    );
    let begin_prepare = Body::tag(b'b')
        .u64(10)
        .u64(20)
        .u64(30)
        .u32(7)
        .str("g1")
        .bytes();
    assert!(
        matches!(decode(&begin_prepare, false).unwrap(), LogicalMessage::BeginPrepare(b) if b.gid == "g1")
    );
    let rollback = Body::tag(b'r')
        .u8(0)
        .u64(1)
        .u64(2)
        .u64(3)
        .u64(4)
        .u32(7)
        .str("g2")
        .bytes();
    assert!(matches!(
        decode(&rollback, false).unwrap(),
        LogicalMessage::RollbackPrepared(r) if r.rollback_time == PgTimestamp(4) && r.gid == "g2"
    ));
    let start = Body::tag(b'S').u32(5).u8(1).bytes();
    assert_eq!(
        decode(&start, false).unwrap(),
        LogicalMessage::StreamStart(StreamStart {
            xid: 5,
            first_segment: true
        })
    );
    assert_eq!(
        decode(&Body::tag(b'E').bytes(), true).unwrap(),
        LogicalMessage::StreamStop
    );
    let truncate = Body::tag(b'T').u32(2).u8(3).u32(1).u32(2).bytes();
    assert_eq!(
        decode(&truncate, false).unwrap(),
        LogicalMessage::Truncate(Truncate {
            xid: None,
            cascade: true,
            restart_identity: true,
            relation_ids: vec![1, 2]
        })
    );
}

#[test]
fn stream_decoder_tracks_stream_start_and_stop() {
    let mut decoder = StreamDecoder::new();
    let insert_in_stream = Body::tag(b'I')
        .u32(9)
        .u32(1)
        .u8(b'N')
        .i16(1)
        .u8(b'n')
        .bytes();
    let insert_plain = Body::tag(b'I').u32(1).u8(b'N').i16(1).u8(b'n').bytes();
    decoder
        .decode(&Body::tag(b'S').u32(9).u8(1).bytes())
        .unwrap();
    assert!(
        matches!(decoder.decode(&insert_in_stream).unwrap(), LogicalMessage::Insert(i) if i.xid == Some(9))
    );
    decoder.decode(&Body::tag(b'E').bytes()).unwrap();
    assert!(
        matches!(decoder.decode(&insert_plain).unwrap(), LogicalMessage::Insert(i) if i.xid.is_none())
    );
}

#[test]
fn malformed_input_is_an_error_that_says_what_is_wrong() {
    assert_eq!(decode(&Bytes::new(), false), Err(DecodeError::Empty));
    assert_eq!(
        decode(&Bytes::from_static(b"Z"), false),
        Err(DecodeError::UnknownTag('Z'))
    );
    // A text column whose length runs past the end of the buffer.
    let past = Body::tag(b'I')
        .u32(1)
        .u8(b'N')
        .i16(1)
        .u8(b't')
        .i32(1000)
        .raw(b"short")
        .bytes();
    assert!(matches!(
        decode(&past, false),
        Err(DecodeError::Truncated { needed: 995, .. })
    ));
    // A negative length.
    let negative = Body::tag(b'I')
        .u32(1)
        .u8(b'N')
        .i16(1)
        .u8(b't')
        .i32(-5)
        .bytes();
    assert!(matches!(
        decode(&negative, false),
        Err(DecodeError::InvalidValue {
            field: "length",
            ..
        })
    ));
    // A negative column count.
    let count = Body::tag(b'I').u32(1).u8(b'N').i16(-1).bytes();
    assert!(matches!(
        decode(&count, false),
        Err(DecodeError::InvalidValue { field: "count", .. })
    ));
    // A huge column count with no columns behind it.
    let huge = Body::tag(b'I').u32(1).u8(b'N').i16(i16::MAX).bytes();
    assert!(matches!(
        decode(&huge, false),
        Err(DecodeError::Truncated { .. })
    ));
    // Names that are not UTF-8.
    let bad_utf8 = Body::tag(b'Y')
        .u32(1)
        .raw(&[0xff, 0xfe, 0])
        .str("t")
        .bytes();
    assert!(matches!(
        decode(&bad_utf8, false),
        Err(DecodeError::InvalidUtf8 { .. })
    ));
    // A string without its NUL.
    let unterminated = Body::tag(b'O').u64(1).raw(b"origin").bytes();
    assert!(matches!(
        decode(&unterminated, false),
        Err(DecodeError::UnterminatedString { .. })
    ));
    // An unknown column kind, tuple kind and replica identity.
    let kind = Body::tag(b'I').u32(1).u8(b'N').i16(1).u8(b'x').bytes();
    assert!(matches!(
        decode(&kind, false),
        Err(DecodeError::InvalidValue {
            field: "column kind",
            ..
        })
    ));
    let tuple = Body::tag(b'I').u32(1).u8(b'Q').bytes();
    assert!(matches!(
        decode(&tuple, false),
        Err(DecodeError::InvalidValue {
            field: "tuple kind",
            ..
        })
    ));
    let ident = Body::tag(b'R')
        .u32(1)
        .str("s")
        .str("t")
        .u8(b'z')
        .i16(0)
        .bytes();
    assert!(matches!(
        decode(&ident, false),
        Err(DecodeError::InvalidValue {
            field: "replica identity",
            ..
        })
    ));
    // Bytes after the end.
    let trailing = Body::tag(b'E').u8(0).bytes();
    assert_eq!(
        decode(&trailing, false),
        Err(DecodeError::TrailingBytes {
            message: "Stream Stop",
            extra: 1
        })
    );
}

#[test]
fn decoded_values_share_the_input_buffer() {
    let body = Body::tag(b'I')
        .u32(1)
        .u8(b'N')
        .i16(1)
        .u8(b't')
        .i32(5)
        .raw(b"hello")
        .bytes();
    let LogicalMessage::Insert(insert) = decode(&body, false).unwrap() else {
        panic!()
    };
    let ColumnValue::Text(value) = &insert.new.columns[0] else {
        panic!()
    };
    let start = body.as_ptr() as usize;
    let at = value.as_ptr() as usize;
    assert!(
        at > start && at < start + body.len(),
        "the value is a slice of the input, not a copy"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256), in_stream in any::<bool>()) {
        let _ = decode(&Bytes::from(data), in_stream);
    }

    #[test]
    fn arbitrary_bytes_behind_a_valid_tag_never_panic(
        tag in proptest::sample::select(b"BCORYIUDTMSEcAbPpKr".to_vec()),
        rest in proptest::collection::vec(any::<u8>(), 0..128),
        in_stream in any::<bool>(),
    ) {
        let mut data = vec![tag];
        data.extend(rest);
        let _ = decode(&Bytes::from(data), in_stream);
    }

    #[test]
    fn corrupted_fixture_bytes_never_panic(index in 0usize..130, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4)) {
        let all = fixtures();
        let (_, bytes) = &all[index % all.len()];
        let bytes = bytes.slice(..bytes.len().min(512));
        let mut data = bytes.to_vec();
        for (pos, value) in flips {
            let len = data.len();
            data[pos % len] = value;
        }
        let _ = decode(&Bytes::from(data.clone()), false);
        let _ = decode(&Bytes::from(data), true);
    }
}
