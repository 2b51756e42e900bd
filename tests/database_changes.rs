//! The database changing under the relay (issue 26): a publication altered
//! so that pgoutput decodes inserts away, an outbox table renamed, a slot
//! dropped and a slot invalidated by max_slot_wal_keep_size. In each case
//! nothing is confirmed past what the relay could see, the relay stops
//! (no retrying forever) and its error names the fix; `setup` never makes
//! again a slot walrelay streamed from.

mod support;

use std::time::Duration;

use support::relay::RelayProcess;
use support::workload::{current_lsn, lsn_of};
use support::{PgOptions, Stack, StackOptions, pg_major, wait_for};
use walrelay::lsn::Lsn;

/// Waits until the relay exits, and returns its exit code and log.
async fn exit_of(relay: &mut RelayProcess) -> (Option<i32>, String) {
    let status = relay.wait(Duration::from_secs(60)).await;
    (status.code(), relay.log())
}

/// Streams a first event, applies `change`, then commits an event the
/// changed publication hides (`insert`) and more transactions behind it.
/// The relay must stop with `expected` in its error, and the slot must
/// never confirm the hidden insert: its confirmed_flush_lsn stays below
/// the WAL position read just before that insert.
async fn stops_before_the_first_hidden_insert(
    stack: &Stack,
    change: &str,
    insert: &str,
    expected: &[&str],
    on_restart: &str,
) {
    let client = &stack.client;
    let mut relay = stack.relay(&[]);
    stack.insert_events("before", 3).await;
    assert_eq!(
        stack
            .broker
            .consume(&stack.topic("before"), 3, Duration::from_secs(30))
            .len(),
        3,
        "{}",
        relay.log()
    );
    let streamed = current_lsn(client).await;
    stack
        .wait_confirmed(streamed, Duration::from_secs(30))
        .await;

    client.batch_execute(change).await.unwrap();
    let before_hidden = lsn_of(client, "SELECT pg_current_wal_insert_lsn()::text").await;
    client.batch_execute(insert).await.unwrap();
    // Transactions behind it give the relay commits and keepalives it
    // could confirm past the hidden insert.
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS busy (n int)")
        .await
        .unwrap();
    for n in 0..20 {
        client
            .execute("INSERT INTO busy VALUES ($1)", &[&n])
            .await
            .unwrap();
    }

    let (code, log) = exit_of(&mut relay).await;
    assert_eq!(code, Some(1), "{log}");
    for text in expected {
        assert!(log.contains(text), "expected {text:?} in:\n{log}");
    }
    assert!(log.contains("walrelay recover --slot walrelay"), "{log}");
    let confirmed = stack.confirmed().await;
    assert!(
        confirmed < before_hidden,
        "the slot confirmed {confirmed}, past the hidden insert (after {before_hidden})"
    );
    assert!(
        stack.broker.consume_all(&stack.topic("hidden")).is_empty(),
        "the hidden insert cannot have been published"
    );

    // Started again on the changed publication, it stops before streaming.
    let mut again = stack.relay(&[]);
    let (code, log) = exit_of(&mut again).await;
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains(on_restart), "{log}");
    assert_eq!(stack.confirmed().await, confirmed);
}

const HIDDEN_INSERT: &str = "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
     VALUES ('hidden', 'k', 'E', '{}')";

#[tokio::test(flavor = "multi_thread")]
async fn a_publication_altered_to_drop_inserts_stops_the_relay_before_it_confirms_past_them() {
    let stack = Stack::start("nopubinsert").await;
    stops_before_the_first_hidden_insert(
        &stack,
        "ALTER PUBLICATION walrelay SET (publish = 'update, delete')",
        HIDDEN_INSERT,
        &[
            "publication \"walrelay\" no longer publishes inserts",
            "ALTER PUBLICATION \"walrelay\" SET (publish = 'insert, update, delete, truncate')",
        ],
        "publication \"walrelay\" no longer publishes inserts",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_filter_on_the_outbox_stops_the_relay_before_it_confirms_past_a_filtered_insert() {
    if pg_major() < 15 {
        eprintln!("row filters need PostgreSQL 15");
        return;
    }
    let stack = Stack::start("rowfilter").await;
    stops_before_the_first_hidden_insert(
        &stack,
        "ALTER PUBLICATION walrelay SET TABLE public.outbox WHERE (aggregate_type <> 'hidden')",
        HIDDEN_INSERT,
        &[
            "publishes outbox table public.outbox only WHERE",
            "ALTER PUBLICATION \"walrelay\" DROP TABLE \"public\".\"outbox\"; ALTER PUBLICATION \"walrelay\" ADD TABLE \"public\".\"outbox\"",
        ],
        "publishes outbox table public.outbox only WHERE",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_column_list_without_the_relays_columns_stops_the_relay_and_names_them() {
    if pg_major() < 15 {
        eprintln!("column lists need PostgreSQL 15");
        return;
    }
    let stack = Stack::start("columnlist").await;
    stops_before_the_first_hidden_insert(
        &stack,
        "ALTER PUBLICATION walrelay SET TABLE public.outbox (id, aggregate_type, aggregate_id, event_type)",
        HIDDEN_INSERT,
        &[
            "publishes only some columns of outbox table public.outbox, not payload, headers, created_at",
        ],
        "publishes only some columns of outbox table public.outbox",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renamed_outbox_table_stops_the_relay_before_it_confirms_past_its_inserts() {
    let stack = Stack::start("renamed").await;
    stops_before_the_first_hidden_insert(
        &stack,
        "ALTER TABLE outbox RENAME TO outbox_old",
        &HIDDEN_INSERT.replace("INTO outbox", "INTO outbox_old"),
        &[
            "outbox table public.outbox was renamed to public.outbox_old",
            "ALTER TABLE public.outbox_old RENAME TO \"outbox\"",
        ],
        // A new process cannot know the table's OID from before.
        "outbox table public.outbox was dropped (or renamed while the relay was not running)",
    )
    .await;
}

fn walrelay(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_walrelay"))
        .args(args)
        .output()
        .unwrap()
}

async fn slot_exists(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'walrelay')",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn setup_after_a_dropped_slot_refuses_to_make_it_again_and_names_recover() {
    let stack = Stack::start("slotdropped").await;
    let client = &stack.client;
    let url = stack.url();
    // The relay streams once, so walrelay has seen the slot in use.
    let mut relay = stack.relay(&[]);
    stack.insert_events("once", 1).await;
    assert_eq!(
        stack
            .broker
            .consume(&stack.topic("once"), 1, Duration::from_secs(30))
            .len(),
        1
    );
    relay.terminate(Duration::from_secs(30)).await;
    client
        .batch_execute("SELECT pg_drop_replication_slot('walrelay')")
        .await
        .unwrap();
    stack.insert_events("lost", 1).await;

    // What the Kubernetes init container runs, again and again.
    for _ in 0..2 {
        let out = walrelay(&["setup", "--pg-url", &url]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("replication slot \"walrelay\" does not exist, but walrelay made or streamed from it before"),
            "{stderr}"
        );
        assert!(
            stderr.contains("walrelay recover --slot walrelay"),
            "{stderr}"
        );
        assert!(stderr.contains("walrelay setup --new-slot"), "{stderr}");
        assert!(!slot_exists(client).await, "setup made the slot again");
    }

    // run refuses too, with or without --create-slot.
    for args in [&[][..], &["--create-slot"][..]] {
        let mut relay = stack.relay(args);
        let (code, log) = exit_of(&mut relay).await;
        assert_eq!(code, Some(1), "{log}");
        assert!(log.contains("walrelay recover --slot walrelay"), "{log}");
        assert!(
            !slot_exists(client).await,
            "run {args:?} made the slot again"
        );
    }

    // The preflight says so too.
    let out = walrelay(&["check", "--pg-url", &url]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL  replication slot \"walrelay\" does not exist, but walrelay made or streamed from it before"),
        "{stdout}"
    );

    // The operator accepts the loss explicitly.
    let out = walrelay(&["setup", "--pg-url", &url, "--new-slot"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(slot_exists(client).await);
    // And a second setup, with the slot there, changes nothing.
    let out = walrelay(&["setup", "--pg-url", &url]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("replication slot walrelay exists"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_invalidated_by_max_slot_wal_keep_size_stops_the_relay_with_the_recover_command() {
    // A tiny max_slot_wal_keep_size (this test's setting), so a few WAL
    // segments invalidate the slot at the next checkpoint.
    let stack = Stack::start_with(
        "invalidated",
        StackOptions {
            pg: PgOptions {
                extra_conf: vec!["max_slot_wal_keep_size = 1MB".into()],
                ..PgOptions::default()
            },
            ..StackOptions::default()
        },
    )
    .await;
    let client = &stack.client;
    let mut relay = stack.relay(&[]);
    stack.insert_events("before", 3).await;
    assert_eq!(
        stack
            .broker
            .consume(&stack.topic("before"), 3, Duration::from_secs(30))
            .len(),
        3
    );
    let streamed = current_lsn(client).await;
    stack
        .wait_confirmed(streamed, Duration::from_secs(30))
        .await;
    // The relay keeps a record of where its slot was, and when.
    wait_for(
        "walrelay's record of the slot's position",
        Duration::from_secs(30),
        async || {
            let row = client
                .query_one(
                    "SELECT confirmed_lsn::text FROM walrelay_slots WHERE slot_name = 'walrelay'",
                    &[],
                )
                .await
                .ok()?;
            let recorded: Lsn = row.get::<_, Option<String>>(0)?.parse().ok()?;
            // Each record is WAL the relay confirms after: the two agree
            // only between a record and that confirm.
            (recorded >= streamed).then_some(())
        },
    )
    .await;
    relay.terminate(Duration::from_secs(30)).await;
    let confirmed = stack.confirmed().await;

    // The relay is down; the outbox goes on, and WAL moves past the limit.
    wait_for(
        "the slot to be invalidated",
        Duration::from_secs(60),
        async || {
            stack.insert_events("while_down", 10).await;
            client.batch_execute("SELECT pg_switch_wal()").await.ok()?;
            client.batch_execute("CHECKPOINT").await.ok()?;
            let status: Option<String> = client
                .query_one(
                    "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'walrelay'",
                    &[],
                )
                .await
                .ok()?
                .get(0);
            (status.as_deref() == Some("lost")).then_some(())
        },
    )
    .await;

    let mut relay = stack.relay(&[]);
    let (code, log) = exit_of(&mut relay).await;
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("replication slot \"walrelay\" was invalidated (wal_status lost"),
        "{log}"
    );
    // The position the slot kept, and when walrelay saw it there (or
    // saw it last, if the relay's last status update moved it after).
    assert!(
        log.contains(&format!("last confirmed LSN {confirmed}")),
        "{log}"
    );
    assert!(
        log.contains(" at 20"),
        "no time of the last confirmed position: {log}"
    );
    assert!(log.contains("walrelay recover --slot walrelay"), "{log}");
    if pg_major() >= 17 {
        assert!(log.contains("reason wal_removed"), "{log}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walrelay"))
        .args(["check", "--pg-url", &stack.url()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("FAIL  replication slot \"walrelay\" was invalidated"),
        "{stdout}"
    );
    assert!(
        stack
            .broker
            .consume_all(&stack.topic("while_down"))
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn publications_for_all_tables_or_a_schema_count_as_covering_the_outbox() {
    let stack = Stack::start("allpubs").await;
    let client = &stack.client;
    let mut kinds = vec![("all_tables", "FOR ALL TABLES")];
    if pg_major() >= 15 {
        kinds.push(("in_schema", "FOR TABLES IN SCHEMA public"));
    }
    for (name, what) in kinds {
        client
            .batch_execute(&format!("CREATE PUBLICATION {name} {what}"))
            .await
            .unwrap();
        let slot = format!("slot_{name}");
        let mut relay = stack.relay(&["--publication", name, "--slot", &slot, "--create-slot"]);
        // The slot starts where the relay makes it: write after that.
        wait_for("the relay to stream", Duration::from_secs(30), async || {
            let (code, _) = relay.http_get("/readyz").await?;
            (code == 200).then_some(())
        })
        .await;
        stack.insert_events(name, 2).await;
        assert_eq!(
            stack
                .broker
                .consume(&stack.topic(name), 2, Duration::from_secs(30))
                .len(),
            2,
            "{}",
            relay.log()
        );
        // The checks pass, so the slot confirms the events.
        let written = current_lsn(client).await;
        wait_for(
            &format!("slot {slot} to confirm {written}"),
            Duration::from_secs(30),
            async || (support::workload::confirmed(client, &slot).await >= written).then_some(()),
        )
        .await;
        assert_eq!(
            relay.terminate(Duration::from_secs(30)).await.code(),
            Some(0)
        );
    }
}
