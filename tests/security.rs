//! Kafka as users secure it: TLS and SASL/SCRAM to the broker, ACLs on, the
//! relay and the inbox each a principal that may use only its own topics
//! (and the dead-letter topic, its transactional id, the inbox's group).
//! And an ACL rotation: WRITE taken away mid-run and given back loses
//! nothing and doubles nothing.

mod support;

use std::time::Duration;

use support::workload::{commit_order, confirmed};
use support::{BrokerChoice, Stack, StackOptions, wait_for};

/// What the relay's principal needs (docs/configuration.md, "TLS"): its topics and the
/// dead-letter topic (here all under the test's namespace), its
/// transactional id, idempotent writes.
fn grant_relay(stack: &Stack) {
    let prefix = format!("{}.", stack.topics.ns);
    stack.broker.acl(&[
        "--add",
        "--allow-principal",
        "User:relay",
        "--operation",
        "Write",
        "--operation",
        "Describe",
        "--operation",
        "Create",
        "--operation",
        "Read",
        "--topic",
        &prefix,
        "--resource-pattern-type",
        "prefixed",
    ]);
    stack.broker.acl(&[
        "--add",
        "--allow-principal",
        "User:relay",
        "--operation",
        "Write",
        "--operation",
        "Describe",
        "--transactional-id",
        "walrelay.",
        "--resource-pattern-type",
        "prefixed",
    ]);
    stack.broker.acl(&[
        "--add",
        "--allow-principal",
        "User:relay",
        "--operation",
        "IdempotentWrite",
        "--cluster",
    ]);
}

fn args<'a>(credentials: &'a [String], more: &[&'a str]) -> Vec<&'a str> {
    let mut all: Vec<&str> = more.to_vec();
    all.extend(credentials.iter().map(String::as_str));
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn over_tls_and_scram_with_acls_each_principal_uses_only_its_own_topics() {
    let stack = Stack::start_with(
        "secure",
        StackOptions {
            broker: BrokerChoice::Secure,
            ..Default::default()
        },
    )
    .await;
    grant_relay(&stack);
    // The inbox reads its topics and uses its group, nothing else.
    let prefix = format!("{}.", stack.topics.ns);
    stack.broker.acl(&[
        "--add",
        "--allow-principal",
        "User:inbox",
        "--operation",
        "Read",
        "--operation",
        "Describe",
        "--topic",
        &prefix,
        "--resource-pattern-type",
        "prefixed",
    ]);
    stack.broker.acl(&[
        "--add",
        "--allow-principal",
        "User:inbox",
        "--operation",
        "Read",
        "--group",
        &stack.topics.group(),
    ]);
    let relay_credentials = stack.broker.credentials("relay");
    let mut relay = stack.relay(&args(&relay_credentials, &[]));
    let inbox_db = stack.pg.create_database("secureinbox").await;
    let inbox_url = stack.pg.url(&inbox_db);
    support::workload::setup(&inbox_url, &["--inbox"]);
    let inbox_credentials = stack.broker.credentials("inbox");
    let topic_pattern = stack.topics.pattern();
    let mut inbox = stack.inbox(
        &inbox_url,
        &args(&inbox_credentials, &["--topic", &topic_pattern]),
    );
    stack.insert_events("sec", 100).await;
    let inbox_client = stack.pg.client(&inbox_db).await;
    wait_for(
        "the events in the inbox, through both principals",
        Duration::from_secs(90),
        async || {
            let n: i64 = inbox_client
                .query_one("SELECT count(*) FROM inbox", &[])
                .await
                .ok()?
                .get(0);
            (n == 100).then_some(())
        },
    )
    .await;
    let records = stack
        .broker
        .consume(&stack.topic("sec"), 100, Duration::from_secs(30));
    assert_eq!(records.len(), 100, "{}", relay.log());

    // The inbox's principal may not write: a relay run with its
    // credentials publishes nothing, dead-letters nothing, confirms
    // nothing, and says why.
    let mut impostor = stack.relay(&args(
        &inbox_credentials,
        &["--slot", "impostor", "--create-slot"],
    ));
    stack.insert_events("sec", 10).await;
    wait_for(
        "the impostor to be refused",
        Duration::from_secs(60),
        async || {
            let log = impostor.log();
            (log.contains("Authorization") || log.contains("authorization")).then_some(())
        },
    )
    .await;
    let slot: Option<String> = stack
        .client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'impostor'",
            &[],
        )
        .await
        .unwrap()
        .map(|r| r.get(0));
    let dead: i64 = stack
        .client
        .query_one("SELECT count(*) FROM walrelay_dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(dead, 0, "nothing dead-lettered: {}", impostor.log());
    assert!(slot.is_some());
    impostor.kill9().await;
    assert!(relay.terminate(Duration::from_secs(30)).await.success());
    assert!(inbox.terminate(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn write_taken_away_mid_run_and_given_back_loses_nothing_and_doubles_nothing() {
    let stack = Stack::start_with(
        "aclrotation",
        StackOptions {
            broker: BrokerChoice::Secure,
            twin: true,
            ..Default::default()
        },
    )
    .await;
    grant_relay(&stack);
    let credentials = stack.broker.credentials("relay");
    let mut relay = stack.relay(&args(&credentials, &["--max-backoff", "1s"]));
    stack.insert_events("rot", 50).await;
    let topic = stack.topic("rot");
    assert_eq!(
        stack
            .broker
            .consume(&topic, 50, Duration::from_secs(60))
            .len(),
        50
    );
    // An ACL rotation: WRITE on the relay's topics is gone for a while.
    let prefix = format!("{}.", stack.topics.ns);
    stack.broker.acl(&[
        "--remove",
        "--allow-principal",
        "User:relay",
        "--operation",
        "Write",
        "--topic",
        &prefix,
        "--resource-pattern-type",
        "prefixed",
    ]);
    stack.insert_events("rot", 50).await;
    let truth = commit_order(&stack.pg, &stack.db, "twin", 100).await;
    let waiting_commit = truth[50].2;
    // Refused meanwhile: waited out, not dropped, not dead-lettered, and
    // nothing confirmed past the waiting events.
    wait_for(
        "the relay to be refused",
        Duration::from_secs(60),
        async || relay.log().contains("uthorization").then_some(()),
    )
    .await;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let at = confirmed(&stack.client, "walrelay").await;
        assert!(
            at < waiting_commit,
            "confirmed {at} past refused events committed at {waiting_commit}"
        );
    }
    stack.broker.acl(&[
        "--add",
        "--allow-principal",
        "User:relay",
        "--operation",
        "Write",
        "--topic",
        &prefix,
        "--resource-pattern-type",
        "prefixed",
    ]);
    stack
        .wait_confirmed(truth.last().unwrap().2, Duration::from_secs(120))
        .await;
    let records = stack.broker.consume_all(&topic);
    support::workload::assert_exactly_once_in_order(&truth, &records);
    let dead: i64 = stack
        .client
        .query_one("SELECT count(*) FROM walrelay_dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(dead, 0, "nothing dead-lettered");
    assert!(
        stack
            .broker
            .consume_all(&stack.topics.dead_letters())
            .is_empty()
    );
    assert!(relay.terminate(Duration::from_secs(30)).await.success());
}
