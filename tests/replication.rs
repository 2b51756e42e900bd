//! The replication transport and the decoder against a real PostgreSQL.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::workload::parse_test_decoding_insert;
use support::{PgCluster, unique_name};
use walrelay::lsn::Lsn;
use walrelay::pgoutput::{ColumnValue, LogicalMessage, OldTuple, StreamDecoder};
use walrelay::relay::relation_cache::RelationCache;
use walrelay::replication::{
    ConnectionConfig, FeedbackPositions, ReplicationConnection, ReplicationError, ReplicationEvent,
    StartOptions,
};

/// One test's database with a table `t`, a publication and a slot.
struct Fixture {
    pg: PgCluster,
    db: String,
    slot: String,
    publication: String,
}

impl Fixture {
    async fn new(table_sql: &str) -> Self {
        let pg = PgCluster::start();
        let db = pg.create_database("repl").await;
        let slot = unique_name("slot");
        let publication = unique_name("pub");
        let client = pg.client(&db).await;
        client.batch_execute(table_sql).await.unwrap();
        client
            .batch_execute(&format!("CREATE PUBLICATION {publication} FOR ALL TABLES"))
            .await
            .unwrap();
        let mut conn = ReplicationConnection::connect(&config(&pg.url(&db)))
            .await
            .unwrap();
        conn.create_slot(&slot, false).await.unwrap();
        conn.close().await.unwrap();
        Fixture {
            pg,
            db,
            slot,
            publication,
        }
    }

    async fn sql(&self, sql: &str) {
        self.pg
            .client(&self.db)
            .await
            .batch_execute(sql)
            .await
            .unwrap();
    }

    /// Streams from the slot until `commits` transactions have arrived (or
    /// `timeout` passes), confirming each commit when `confirm` is set.
    async fn collect(
        &self,
        commits: usize,
        timeout: Duration,
        confirm: bool,
    ) -> Vec<(Lsn, LogicalMessage)> {
        let conn = ReplicationConnection::connect(&config(&self.pg.url(&self.db)))
            .await
            .unwrap();
        let mut stream = conn
            .start_replication(&StartOptions {
                slot: self.slot.clone(),
                start_lsn: Lsn::ZERO,
                publications: vec![self.publication.clone()],
                proto_version: None,
                messages: true,
            })
            .await
            .unwrap();
        let mut decoder = StreamDecoder::new();
        let mut out = Vec::new();
        let mut seen_commits = 0;
        let deadline = tokio::time::Instant::now() + timeout;
        while seen_commits < commits {
            let event = match tokio::time::timeout_at(deadline, stream.recv()).await {
                Ok(event) => event.unwrap(),
                Err(_) => break,
            };
            match event {
                Some(ReplicationEvent::XLogData {
                    wal_start, data, ..
                }) => {
                    let message = decoder.decode(&data).unwrap();
                    if let LogicalMessage::Commit(c) = &message {
                        seen_commits += 1;
                        if confirm {
                            stream
                                .send_feedback(FeedbackPositions::all(c.end_lsn), false)
                                .await
                                .unwrap();
                        }
                    }
                    out.push((wal_start, message));
                }
                Some(ReplicationEvent::Keepalive {
                    reply_requested: true,
                    ..
                }) => {
                    stream
                        .send_feedback(FeedbackPositions::default(), false)
                        .await
                        .unwrap();
                }
                Some(_) => {}
                None => break,
            }
        }
        stream.finish().await.unwrap();
        out
    }
}

fn config(url: &str) -> ConnectionConfig {
    ConnectionConfig::from_url(url).unwrap()
}

fn text(value: &ColumnValue) -> &str {
    match value {
        ColumnValue::Text(b) => std::str::from_utf8(b).unwrap(),
        other => panic!("expected a text value, got {other:?}"),
    }
}

/// Rows of Insert messages, as (relation, column name -> value) via the cache.
fn inserted_rows(messages: &[(Lsn, LogicalMessage)]) -> Vec<Vec<(String, ColumnValue)>> {
    let mut cache = RelationCache::new();
    let mut rows = Vec::new();
    for (_, message) in messages {
        match message {
            LogicalMessage::Relation(r) => {
                cache.update(r);
            }
            LogicalMessage::Insert(i) => {
                let info = cache.get(i.relation_id).expect("Relation before Insert");
                let row = info.row(&i.new.columns).unwrap();
                rows.push(
                    row.iter()
                        .map(|(c, v)| (c.name.clone(), v.clone()))
                        .collect(),
                );
            }
            _ => {}
        }
    }
    rows
}

fn kinds(messages: &[(Lsn, LogicalMessage)]) -> Vec<&'static str> {
    messages.iter().map(|(_, m)| m.kind()).collect()
}

#[tokio::test]
async fn insert_update_delete_and_truncate_decode_with_their_values() {
    let f = Fixture::new("CREATE TABLE t (id int PRIMARY KEY, name text, n bigint)").await;
    f.sql("INSERT INTO t VALUES (1, 'one', 10)").await;
    f.sql("UPDATE t SET name = 'uno' WHERE id = 1").await;
    f.sql("ALTER TABLE t REPLICA IDENTITY FULL; UPDATE t SET n = 11 WHERE id = 1")
        .await;
    f.sql("DELETE FROM t WHERE id = 1").await;
    f.sql("INSERT INTO t VALUES (2, NULL, 20); TRUNCATE t")
        .await;
    let messages = f.collect(6, Duration::from_secs(20), true).await;

    let mut cache = RelationCache::new();
    let mut seen = Vec::new();
    for (_, m) in &messages {
        match m {
            LogicalMessage::Relation(r) => {
                cache.update(r);
                assert_eq!(r.namespace, "public");
                assert_eq!(r.name, "t");
                assert_eq!(
                    r.columns
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>(),
                    ["id", "name", "n"]
                );
                assert!(r.columns[0].is_key);
                assert_eq!(r.columns[0].type_oid, 23);
                assert_eq!(r.columns[2].type_oid, 20);
            }
            LogicalMessage::Insert(i) => {
                let info = cache.get(i.relation_id).unwrap();
                let row = info.row(&i.new.columns).unwrap();
                seen.push(format!(
                    "insert {} {:?} {}",
                    text(row.get("id").unwrap()),
                    row.get("name").unwrap(),
                    text(row.get("n").unwrap())
                ));
            }
            LogicalMessage::Update(u) => {
                let info = cache.get(u.relation_id).unwrap();
                let row = info.row(&u.new.columns).unwrap();
                let old = match &u.old {
                    None => "none".to_string(),
                    Some(OldTuple::Key(_)) => "key".to_string(),
                    Some(OldTuple::Full(t)) => {
                        format!(
                            "full n={}",
                            text(info.row(&t.columns).unwrap().get("n").unwrap())
                        )
                    }
                };
                seen.push(format!(
                    "update {} {} {} old={old}",
                    text(row.get("id").unwrap()),
                    text(row.get("name").unwrap()),
                    text(row.get("n").unwrap())
                ));
            }
            LogicalMessage::Delete(d) => {
                let info = cache.get(d.relation_id).unwrap();
                let OldTuple::Full(old) = &d.old else {
                    panic!("replica identity full sends the whole old row")
                };
                seen.push(format!(
                    "delete {}",
                    text(info.row(&old.columns).unwrap().get("id").unwrap())
                ));
            }
            LogicalMessage::Truncate(t) => {
                assert_eq!(t.relation_ids.len(), 1);
                assert_eq!(cache.get(t.relation_ids[0]).unwrap().table, "t");
                seen.push("truncate".into());
            }
            _ => {}
        }
    }
    assert_eq!(
        seen,
        [
            "insert 1 Text(b\"one\") 10",
            "update 1 uno 10 old=none",
            "update 1 uno 11 old=full n=10",
            "delete 1",
            "insert 2 Null 20",
            "truncate",
        ]
    );
}

#[tokio::test]
async fn hundred_row_transaction_arrives_between_one_begin_and_commit() {
    let f = Fixture::new("CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    f.sql("INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 100) g")
        .await;
    let messages = f.collect(1, Duration::from_secs(20), true).await;
    let k = kinds(&messages);
    assert_eq!(k.first(), Some(&"Begin"));
    assert_eq!(k.last(), Some(&"Commit"));
    let rows = inserted_rows(&messages);
    assert_eq!(rows.len(), 100);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(text(&row[0].1), (i + 1).to_string());
        assert_eq!(text(&row[1].1), format!("row {}", i + 1));
    }
    // The Begin announces the commit LSN the Commit carries.
    let LogicalMessage::Begin(begin) = &messages[0].1 else {
        unreachable!()
    };
    let LogicalMessage::Commit(commit) = &messages.last().unwrap().1 else {
        unreachable!()
    };
    assert_eq!(begin.final_lsn, commit.commit_lsn);
    assert!(commit.end_lsn > commit.commit_lsn);
}

#[tokio::test]
async fn rolled_back_transaction_yields_nothing() {
    let f = Fixture::new("CREATE TABLE t (id int PRIMARY KEY)").await;
    f.sql("BEGIN; INSERT INTO t VALUES (1); ROLLBACK").await;
    f.sql("INSERT INTO t VALUES (2)").await;
    let messages = f.collect(1, Duration::from_secs(20), true).await;
    let rows = inserted_rows(&messages);
    assert_eq!(rows.len(), 1);
    assert_eq!(text(&rows[0][0].1), "2");
}

#[tokio::test]
async fn columns_added_and_dropped_mid_stream_are_decoded_by_name() {
    let f = Fixture::new("CREATE TABLE t (id int PRIMARY KEY, a text, b text)").await;
    f.sql("INSERT INTO t VALUES (1, 'a1', 'b1')").await;
    f.sql(
        "ALTER TABLE t ADD COLUMN c text; INSERT INTO t (id, a, b, c) VALUES (2, 'a2', 'b2', 'c2')",
    )
    .await;
    f.sql("ALTER TABLE t DROP COLUMN a; INSERT INTO t (id, b, c) VALUES (3, 'b3', 'c3')")
        .await;
    let messages = f.collect(3, Duration::from_secs(20), true).await;
    let rows = inserted_rows(&messages);
    let by_name = |row: &Vec<(String, ColumnValue)>, name: &str| {
        row.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| text(v).to_owned())
    };
    assert_eq!(rows.len(), 3);
    assert_eq!(by_name(&rows[0], "b").as_deref(), Some("b1"));
    assert_eq!(by_name(&rows[0], "c"), None);
    assert_eq!(by_name(&rows[1], "c").as_deref(), Some("c2"));
    assert_eq!(by_name(&rows[1], "a").as_deref(), Some("a2"));
    assert_eq!(by_name(&rows[2], "a"), None);
    assert_eq!(by_name(&rows[2], "b").as_deref(), Some("b3"));
    assert_eq!(by_name(&rows[2], "c").as_deref(), Some("c3"));
    let relations = messages
        .iter()
        .filter(|(_, m)| m.kind() == "Relation")
        .count();
    assert_eq!(
        relations, 3,
        "the server re-sends the relation after each ALTER TABLE"
    );
}

#[tokio::test]
async fn logical_decoding_messages_arrive_transactional_or_not() {
    let f = Fixture::new("CREATE TABLE t (id int PRIMARY KEY)").await;
    f.sql("SELECT pg_logical_emit_message(true, 'walrelay', '{\"a\":1}')")
        .await;
    f.sql("SELECT pg_logical_emit_message(false, 'other', 'plain')")
        .await;
    f.sql("INSERT INTO t VALUES (1)").await;
    let messages = f.collect(2, Duration::from_secs(20), true).await;
    let decoded: Vec<_> = messages
        .iter()
        .filter_map(|(_, m)| match m {
            LogicalMessage::Message(msg) => Some(msg.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(decoded.len(), 2);
    assert!(decoded[0].transactional);
    assert_eq!(decoded[0].prefix, "walrelay");
    assert_eq!(decoded[0].content, Bytes::from_static(b"{\"a\":1}"));
    assert!(!decoded[1].transactional);
    assert_eq!(decoded[1].prefix, "other");
    assert_eq!(decoded[1].content, Bytes::from_static(b"plain"));
    // The transactional one sits inside a Begin/Commit; the other stands alone.
    let k = kinds(&messages);
    assert_eq!(&k[..3], ["Begin", "Message", "Commit"]);
    assert_eq!(k[3], "Message");
}

#[tokio::test]
async fn unicode_text_and_a_one_megabyte_toasted_jsonb_match_the_table_byte_for_byte() {
    let f = Fixture::new("CREATE TABLE t (id int PRIMARY KEY, label text, payload jsonb)").await;
    f.sql(
        "INSERT INTO t VALUES (1, 'Zürich 東京 🚀 \"quoted\" \\ back', jsonb_build_object('emoji', '🚀', 'text', 'naïve'));
         INSERT INTO t SELECT 2, 'big', jsonb_build_object('items', jsonb_agg(jsonb_build_object('i', g, 'pad', md5(g::text)))) FROM generate_series(1, 25000) g;",
    )
    .await;
    let client = f.pg.client(&f.db).await;
    let expected: Vec<(String, String)> = client
        .query("SELECT label, payload::text FROM t ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(expected[1].1.len() > 1_000_000, "the payload is over 1 MB");
    let messages = f.collect(1, Duration::from_secs(30), true).await;
    let rows = inserted_rows(&messages);
    assert_eq!(rows.len(), 2);
    for (row, (label, payload)) in rows.iter().zip(&expected) {
        assert_eq!(text(&row[1].1), label);
        assert_eq!(text(&row[2].1).as_bytes(), payload.as_bytes());
    }
}

#[tokio::test]
async fn reconnecting_resumes_after_the_confirmed_lsn_without_redelivery() {
    let f = Fixture::new("CREATE TABLE t (id int PRIMARY KEY)").await;
    f.sql("INSERT INTO t VALUES (1)").await;
    f.sql("INSERT INTO t VALUES (2)").await;
    let first = f.collect(2, Duration::from_secs(20), true).await;
    assert_eq!(inserted_rows(&first).len(), 2);
    f.sql("INSERT INTO t VALUES (3)").await;
    let second = f.collect(1, Duration::from_secs(20), true).await;
    let rows = inserted_rows(&second);
    assert_eq!(rows.len(), 1, "confirmed transactions are not sent again");
    assert_eq!(text(&rows[0][0].1), "3");

    // Without confirming, the same transaction comes back on reconnect.
    f.sql("INSERT INTO t VALUES (4)").await;
    let unconfirmed = f.collect(1, Duration::from_secs(20), false).await;
    let again = f.collect(1, Duration::from_secs(20), true).await;
    assert_eq!(inserted_rows(&unconfirmed), inserted_rows(&again));
    assert_eq!(text(&inserted_rows(&again)[0][0].1), "4");
}

#[tokio::test]
async fn scram_md5_and_cleartext_logins_work_and_a_wrong_password_is_a_clear_error() {
    let pg = PgCluster::start();
    let db = pg.create_database("auth").await;
    pg.client(&db)
        .await
        .batch_execute(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'scram pw';
             SET password_encryption = 'md5';
             CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'md5 pw';
             CREATE ROLE walrelay_cleartext;
             CREATE ROLE plain_user LOGIN REPLICATION PASSWORD 'plain pw' IN ROLE walrelay_cleartext;",
        )
        .await
        .unwrap();
    for (user, password) in [
        ("scram_user", "scram%20pw"),
        ("md5_user", "md5%20pw"),
        ("plain_user", "plain%20pw"),
    ] {
        let mut conn = ReplicationConnection::connect(&config(&pg.url_as(user, password, &db)))
            .await
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        let identity = conn.identify_system().await.unwrap();
        assert_eq!(identity.dbname.as_deref(), Some(db.as_str()));
        assert!(identity.timeline >= 1);
        conn.close().await.unwrap();
    }
    let err = ReplicationConnection::connect(&config(&pg.url_as("scram_user", "wrong", &db)))
        .await
        .err()
        .expect("a wrong password must fail");
    assert_eq!(err.sqlstate(), Some("28P01"));
    assert!(!err.is_transient());
    let text = err.to_string();
    assert!(text.contains("password authentication failed"), "{text}");
    assert!(text.contains("fix: the password is wrong"), "{text}");

    let missing = ReplicationConnection::connect(&config(&format!(
        "postgres://scram_user@127.0.0.1:{}/{db}?sslmode=disable",
        pg.port
    )))
    .await
    .err()
    .expect("no password must fail");
    assert!(
        matches!(missing, ReplicationError::PasswordRequired),
        "{missing}"
    );
}

#[tokio::test]
async fn server_errors_name_their_fix() {
    let f = Fixture::new("CREATE TABLE t (id int PRIMARY KEY)").await;
    let cfg = config(&f.pg.url(&f.db));
    // A slot that does not exist.
    let conn = ReplicationConnection::connect(&cfg).await.unwrap();
    let err = conn
        .start_replication(&StartOptions {
            slot: "no_such_slot".into(),
            start_lsn: Lsn::ZERO,
            publications: vec![f.publication.clone()],
            proto_version: None,
            messages: true,
        })
        .await
        .err()
        .unwrap();
    assert_eq!(err.sqlstate(), Some("42704"));
    assert!(err.to_string().contains("walrelay setup"), "{err}");

    // A slot held by another connection.
    let holder = ReplicationConnection::connect(&cfg).await.unwrap();
    let options = StartOptions {
        slot: f.slot.clone(),
        start_lsn: Lsn::ZERO,
        publications: vec![f.publication.clone()],
        proto_version: None,
        messages: true,
    };
    let _held = holder.start_replication(&options).await.unwrap();
    let second = ReplicationConnection::connect(&cfg).await.unwrap();
    let err = second.start_replication(&options).await.err().unwrap();
    assert_eq!(err.sqlstate(), Some("55006"));
    assert!(err.is_transient(), "a busy slot may free up");
    assert!(
        err.to_string()
            .contains("another process holds this replication slot"),
        "{err}"
    );

    // A role without REPLICATION.
    f.sql("CREATE ROLE norepl LOGIN PASSWORD 'pw'").await;
    let err = ReplicationConnection::connect(&config(&f.pg.url_as("norepl", "pw", &f.db)))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("WITH REPLICATION"), "{err}");
}

#[tokio::test]
async fn a_missing_publication_is_a_clear_error() {
    // PostgreSQL 18's pgoutput only warns about a missing publication and
    // streams nothing, so walrelay checks before it starts streaming, on
    // every version.
    let f = Fixture::new("CREATE TABLE t (id int PRIMARY KEY)").await;
    let conn = ReplicationConnection::connect(&config(&f.pg.url(&f.db)))
        .await
        .unwrap();
    let err = conn
        .start_replication(&StartOptions {
            slot: f.slot.clone(),
            start_lsn: Lsn::ZERO,
            publications: vec![f.publication.clone(), "no_such_publication".into()],
            proto_version: None,
            messages: true,
        })
        .await
        .err()
        .expect("streaming from a missing publication must fail");
    assert!(
        matches!(&err, ReplicationError::MissingPublication { publication, .. } if publication == "no_such_publication"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("CREATE PUBLICATION no_such_publication"),
        "{err}"
    );
    assert!(!err.is_transient());
}

#[tokio::test]
async fn wal_level_replica_is_refused_with_the_setting_to_change() {
    let pg = PgCluster::start_with(support::PgOptions {
        wal_level: "replica",
        ..Default::default()
    });
    let mut conn = ReplicationConnection::connect(&config(&pg.url("postgres")))
        .await
        .unwrap();
    let err = conn.create_slot("s", false).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("55000"));
    assert!(err.to_string().contains("wal_level = logical"), "{err}");
}

#[tokio::test]
async fn pgoutput_values_agree_with_test_decoding_for_many_column_types() {
    let f = Fixture::new(
        "CREATE TYPE mood AS ENUM ('happy', 'sad');
         CREATE TABLE t (
           id int PRIMARY KEY, i2 smallint, i8 bigint, num numeric(20,5), f4 real, f8 double precision,
           b boolean, txt text, vc varchar(20), ch char(5), by bytea, d date, tm time, ts timestamp,
           tstz timestamptz, iv interval, u uuid, j json, jb jsonb, ia integer[], ta text[], ip inet,
           mac macaddr, pt point, r int4range, m mood
         )",
    )
    .await;
    let client = f.pg.client(&f.db).await;
    client
        .batch_execute("SELECT pg_create_logical_replication_slot('td', 'test_decoding')")
        .await
        .unwrap();
    client
        .batch_execute(
            "SET TimeZone = 'UTC'; SET DateStyle = 'ISO';
             INSERT INTO t VALUES
              (1, -32768, 9223372036854775807, 12345.67891, 3.14159, 2.718281828459045, true,
               'it''s \"quoted\" \\ 東京 🚀', 'varchar', 'ab', '\\x00ff7f', '2026-11-23', '08:30:00.123',
               '2026-11-23 08:30:00.5', '2026-11-23 08:30:00.5+02', '1 day 02:03:04', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
               '{\"k\": [1, 2]}', '{\"k\": [1, 2], \"u\": \"ü\"}', '{1,2,3}', '{\"a b\",NULL,c}', '10.0.0.1/8',
               '08:00:2b:01:02:03', '(1.5,-2)', '[1,10)', 'sad'),
              (2, NULL, NULL, NULL, 'NaN', '-Infinity', false, '', NULL, NULL, '\\x', NULL, NULL, NULL, NULL,
               NULL, NULL, 'null', '[]', '{}', '{}', NULL, NULL, NULL, 'empty', NULL),
              (3, 1, 2, 0.00001, 1e-30, 1e300, NULL, 'line1\nline2\ttab', 'x', 'abcde', NULL, '0001-01-01', '24:00',
               '1999-12-31 23:59:59.999999', '1970-01-01 00:00:00+00', '-3 mons', NULL, '\"s\"', '\"s\"', '{{1,2},{3,4}}',
               '{}', '::1', NULL, NULL, NULL, 'happy');",
        )
        .await
        .unwrap();
    let expected: Vec<Vec<(String, Option<String>)>> = client
        .query(
            "SELECT data FROM pg_logical_slot_get_changes('td', NULL, NULL, 'include-xids', '0', 'skip-empty-xacts', '1')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .filter(|line| line.contains(": INSERT: "))
        .map(|line| parse_test_decoding_insert(&line))
        .collect();
    assert_eq!(expected.len(), 3);

    let messages = f.collect(1, Duration::from_secs(20), true).await;
    let actual: Vec<Vec<(String, Option<String>)>> = inserted_rows(&messages)
        .into_iter()
        .map(|row| {
            row.into_iter()
                .map(|(name, value)| {
                    let value = match value {
                        ColumnValue::Null => None,
                        other => Some(text(&other).to_owned()),
                    };
                    (name, value)
                })
                .collect()
        })
        .collect();
    assert_eq!(actual.len(), 3);
    for (a, e) in actual.iter().zip(&expected) {
        assert_eq!(a.len(), 26);
        for (column_a, column_e) in a.iter().zip(e) {
            assert_eq!(column_a, column_e);
        }
    }
}

#[tokio::test]
async fn tail_prints_each_decoded_message_as_a_json_line() {
    let pg = PgCluster::start();
    let db = pg.create_database("tail").await;
    let client = pg.client(&db).await;
    client
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION walrelay FOR TABLE t",
        )
        .await
        .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_walrelay"))
        .args(["tail", "--pg-url", &pg.url(&db)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Wait until the temporary slot exists, so the insert is after its start.
    support::wait_for("the temporary slot", Duration::from_secs(20), async || {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE temporary",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n == 1).then_some(())
    })
    .await;
    client
        .batch_execute("INSERT INTO t VALUES (7, 'Zürich')")
        .await
        .unwrap();

    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("tail printed nothing")
            .unwrap()
            .expect("tail exited");
        seen.push(serde_json::from_str::<serde_json::Value>(&line).unwrap());
    }
    let kinds: Vec<&str> = seen.iter().map(|v| v["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["Begin", "Relation", "Insert", "Commit"]);
    assert_eq!(seen[2]["relation"], "public.t");
    assert_eq!(
        seen[2]["new"],
        serde_json::json!({"id": "7", "v": "Zürich"})
    );
    assert!(seen[0]["xid"].as_u64().unwrap() > 0);
    assert!(seen[3]["end_lsn"].as_str().unwrap().contains('/'));

    // Ctrl-C ends it cleanly and the temporary slot goes with it.
    let pid = child.id().unwrap();
    std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "tail exited with {status}");
    // The server drops a temporary slot when its walsender ends, which can
    // be a moment after the client has gone.
    support::wait_for(
        "the temporary slot to go",
        Duration::from_secs(10),
        async || {
            let n: i64 = client
                .query_one("SELECT count(*) FROM pg_replication_slots", &[])
                .await
                .unwrap()
                .get(0);
            (n == 0).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn the_pgoutput_version_follows_the_server_under_test() {
    let f = Fixture::new("CREATE TABLE t (id int PRIMARY KEY)").await;
    let conn = ReplicationConnection::connect(&config(&f.pg.url(&f.db)))
        .await
        .unwrap();
    assert_eq!(
        conn.server_major_version(),
        Some(f.pg.major),
        "the harness runs the version WALRELAY_TEST_PG names"
    );
    let expected = match f.pg.major {
        14 => 2,
        15 => 3,
        _ => 4,
    };
    assert_eq!(conn.best_proto_version(), expected);
    let stream = conn
        .start_replication(&StartOptions {
            slot: f.slot.clone(),
            start_lsn: Lsn::ZERO,
            publications: vec![f.publication.clone()],
            proto_version: None,
            messages: true,
        })
        .await
        .unwrap();
    assert_eq!(stream.proto_version(), expected);
    stream.finish().await.unwrap();
}
