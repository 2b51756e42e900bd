//! The transaction's rules, each id's state included.

use super::cleanup::CLEANUP_ABORTS;
use super::*;

/// Takes the three ids over, as a session's start does.
/// A session takes its three ids over at once; records go through the
/// first once every one is.
fn ready(t: &mut Transaction) {
    t.restart(Some("walrelay.7.s".into()));
    let ids = ["walrelay.7.s", "walrelay.7.s.spare", "walrelay.7.s.spare2"];
    for id in ids {
        assert_eq!(t.take_initialization().as_deref(), Some(id));
    }
    assert_eq!(t.take_initialization(), None, "all three under way");
    for id in ids[1..].iter().rev() {
        assert!(matches!(t.initialized(id, Ok(())), Next::Go));
        assert!(!t.may_send(), "not before every id is taken over");
    }
    assert!(matches!(t.initialized(ids[0], Ok(())), Next::Use(id) if id == "walrelay.7.s"));
}

#[tokio::test(start_paused = true)]
async fn a_transaction_takes_records_briefly_then_commits_once_they_are_delivered() {
    let mut t = Transaction::new(true);
    assert!(!t.may_send(), "not before the id is taken over");
    ready(&mut t);
    assert!(t.needs_begin() && t.may_send());
    t.began(0);
    assert_eq!(t.due(1, true), None, "a record is outstanding");
    tokio::time::advance(MAX_OPEN).await;
    assert!(!t.may_send(), "closing: new records wait");
    assert_eq!(t.due(0, true), Some(End::Commit));
    assert!(matches!(t.committed(Ok(())), Next::Deliver));
    assert!(t.needs_begin());
    t.began(0);
    t.fail();
    assert!(!t.may_send());
    assert_eq!(t.due(0, true), Some(End::Abort));
    assert!(!Transaction::new(false).is_on());
}

#[tokio::test(start_paused = true)]
async fn a_transaction_that_closes_with_nothing_sent_ends_instead_of_staying_open() {
    let mut t = Transaction::new(true);
    ready(&mut t);
    t.began(0);
    assert_eq!(t.due(0, false), None, "still open: records may come");
    tokio::time::advance(MAX_OPEN).await;
    assert!(!t.may_send());
    assert_eq!(t.due(0, false), Some(End::Abort), "closed and empty");
    assert!(matches!(t.aborted(Ok(()), false), Next::SendAgain));
    assert!(t.needs_begin() && t.may_send());
}

#[tokio::test(start_paused = true)]
async fn a_transaction_begun_with_a_backlog_takes_records_longer() {
    let mut t = Transaction::new(true);
    ready(&mut t);
    t.began(BACKLOG - 1);
    tokio::time::advance(MAX_OPEN).await;
    assert!(!t.may_send(), "a short backlog keeps the short window");
    assert_eq!(t.due(0, true), Some(End::Commit));
    assert!(matches!(t.committed(Ok(())), Next::Deliver));
    t.began(BACKLOG);
    tokio::time::advance(MAX_OPEN).await;
    assert!(t.may_send(), "a backlog keeps the transaction open");
    assert_eq!(
        t.closes_at(),
        Some(Instant::now() + BACKLOG_OPEN - MAX_OPEN)
    );
    tokio::time::advance(BACKLOG_OPEN - MAX_OPEN).await;
    assert!(!t.may_send());
    assert_eq!(t.due(0, true), Some(End::Commit));
}

#[tokio::test(start_paused = true)]
async fn a_transaction_takes_no_more_than_its_limit_even_while_the_one_before_commits() {
    let mut t = Transaction::new(true);
    t.limit(2, 1000);
    ready(&mut t);
    t.began(BACKLOG);
    t.sent_to(&key("a", 0), 10);
    assert!(t.may_send() && t.closes_at().is_some());
    t.sent_to(&key("a", 0), 10);
    assert!(!t.may_send(), "two records: it takes no more");
    assert_eq!(t.closes_at(), None, "closed before its time");
    assert_eq!(t.due(1, true), None, "a record is outstanding");
    assert_eq!(t.due(0, true), Some(End::Commit));
    // The next takes records under the other id while that one commits,
    // up to its own limit, here in bytes.
    assert!(t.overlap().is_some());
    assert!(t.needs_begin());
    t.began(0);
    t.sent_to(&key("a", 0), 999);
    assert!(t.may_send());
    t.sent_to(&key("a", 0), 1);
    assert!(
        !t.may_send(),
        "1,000 bytes: full, though the one before still commits"
    );
    assert!(matches!(t.committed(Ok(())), Next::Deliver));
    assert_eq!(t.due(0, true), Some(End::Commit));
    assert!(matches!(t.committed(Ok(())), Next::Deliver));
    t.began(0);
    assert!(t.may_send(), "a new transaction starts empty");
    // With no other id to take the next one, it may take the whole window.
    let current = t.current.unwrap();
    for other in (0..3).filter(|&i| i != current) {
        t.ids[other].ready = false;
    }
    t.sent_to(&key("a", 0), 10);
    t.sent_to(&key("a", 0), 10);
    assert!(t.may_send(), "no overlap: twice the limit");
    t.sent_to(&key("a", 0), 10);
    t.sent_to(&key("a", 0), 10);
    assert!(!t.may_send());
}

#[tokio::test(start_paused = true)]
async fn a_closed_transaction_has_its_lingering_records_sent_once() {
    let mut t = Transaction::new(true);
    ready(&mut t);
    t.began(0);
    t.sent_to(&key("a", 0), 10);
    assert!(
        !t.send_lingering_now(1),
        "open: more records may batch with it"
    );
    tokio::time::advance(MAX_OPEN).await;
    assert!(
        !t.send_lingering_now(0),
        "closed, but nothing is outstanding"
    );
    assert!(t.send_lingering_now(1), "closed with a record outstanding");
    assert!(!t.send_lingering_now(1), "once per transaction");
    assert_eq!(t.due(0, true), Some(End::Commit));
    // The next one, under the other id, stays open while the one before
    // commits: its records may still batch.
    assert!(t.overlap().is_some());
    t.began(0);
    t.sent_to(&key("a", 0), 10);
    tokio::time::advance(MAX_OPEN).await;
    assert!(
        !t.send_lingering_now(1),
        "it takes records while the one before commits"
    );
    assert!(matches!(t.committed(Ok(())), Next::Deliver));
    assert!(
        t.send_lingering_now(1),
        "closed once the one before committed"
    );
    // A full one is closed before its time.
    assert_eq!(t.due(0, true), Some(End::Commit));
    assert!(matches!(t.committed(Ok(())), Next::Deliver));
    t.limit(1, 1000);
    t.began(0);
    t.sent_to(&key("a", 0), 10);
    t.sent_to(&key("a", 0), 10);
    assert!(t.send_lingering_now(2), "full");
    // One to abort sends nothing on: it is never committed.
    assert_eq!(t.due(0, true), Some(End::Commit));
    assert!(matches!(t.committed(Ok(())), Next::Deliver));
    t.began(0);
    t.sent_to(&key("a", 0), 10);
    t.fail();
    tokio::time::advance(MAX_OPEN).await;
    assert!(!t.send_lingering_now(1));
}

#[test]
fn takeovers_that_fail_together_back_off_once_and_are_taken_over_again_after() {
    let transient = || BrokerError {
        class: BrokerErrorClass::Transient,
        message: "coordinator not available".into(),
    };
    let mut t = Transaction::new(true);
    t.restart(Some("walrelay.7.s".into()));
    let ids = ["walrelay.7.s", "walrelay.7.s.spare", "walrelay.7.s.spare2"];
    while t.take_initialization().is_some() {}
    assert!(matches!(t.initialized(ids[1], Err(transient())), Next::Go));
    assert_eq!(
        t.take_initialization(),
        None,
        "a failed id waits for the others' answers, then a backoff"
    );
    assert!(matches!(t.initialized(ids[0], Err(transient())), Next::Go));
    assert!(
        matches!(t.initialized(ids[2], Err(transient())), Next::BackOff),
        "one backoff for the round, not one per id"
    );
    assert!(!t.may_send());
    let mut again: Vec<String> = std::iter::from_fn(|| t.take_initialization()).collect();
    again.sort();
    assert_eq!(again, ids, "every failed id is taken over again");
    assert!(matches!(t.initialized(ids[2], Ok(())), Next::Go));
    assert!(matches!(t.initialized(ids[1], Err(transient())), Next::Go));
    assert!(
        matches!(t.initialized(ids[0], Ok(())), Next::BackOff),
        "the round ends with one failed: one backoff"
    );
    assert_eq!(t.take_initialization().as_deref(), Some(ids[1]));
    assert_eq!(t.take_initialization(), None);
    assert!(matches!(t.initialized(ids[1], Ok(())), Next::Use(id) if id == ids[0]));
    assert!(t.may_send());
}

#[tokio::test(start_paused = true)]
async fn a_failed_commit_is_committed_again_or_aborted_by_its_error() {
    let error = |class| BrokerError {
        class,
        message: "test".into(),
    };
    let mut t = Transaction::new(true);
    t.restart(Some("walrelay.7.s".into()));
    while t.take_initialization().is_some() {}
    assert!(matches!(
        t.initialized("walrelay.7.s.spare", Ok(())),
        Next::Go
    ));
    assert!(matches!(
        t.initialized("walrelay.7.s.spare2", Ok(())),
        Next::Go
    ));
    assert!(matches!(
        t.initialized("walrelay.7.s", Err(error(BrokerErrorClass::Transient))),
        Next::BackOff
    ));
    assert!(!t.may_send());
    assert_eq!(
        t.take_initialization().as_deref(),
        Some("walrelay.7.s"),
        "only the one that failed is taken over again"
    );
    assert_eq!(t.take_initialization(), None);
    assert!(matches!(
        t.initialized("walrelay.7.s", Ok(())),
        Next::Use(_)
    ));
    t.began(0);
    tokio::time::advance(MAX_OPEN).await;
    assert_eq!(t.due(0, true), Some(End::Commit));
    assert!(matches!(
        t.committed(Err(error(BrokerErrorClass::Transient))),
        Next::CommitAgain
    ));
    assert_eq!(t.due(0, true), None, "the commit is still under way");
    assert!(matches!(
        t.committed(Err(error(BrokerErrorClass::Abortable))),
        Next::Go
    ));
    assert_eq!(
        t.due(0, true),
        Some(End::Abort),
        "a commit that failed is aborted"
    );
    let Next::Pause(wait) = t.aborted(Err(error(BrokerErrorClass::Transient)), true) else {
        panic!("a failed abort waits");
    };
    assert_eq!(
        t.due(0, true),
        None,
        "not asked again at once: a failing coordinator would be asked in a loop"
    );
    tokio::time::advance(wait).await;
    assert_eq!(t.due(0, true), Some(End::Abort), "and aborted again");
    assert!(matches!(
        t.aborted(Err(error(BrokerErrorClass::Fenced)), true),
        Next::EndProducer(_)
    ));
}

fn key(topic: &str, partition: i32) -> PartitionKey {
    PartitionKey::new(topic, partition)
}

/// A transaction of the current id that wrote to `p`, then committed
/// or aborted.
async fn transaction_in(t: &mut Transaction, p: &PartitionKey, commit: bool) {
    t.began(0);
    t.sent_to(p, 0);
    if !commit {
        t.fail();
    }
    tokio::time::advance(MAX_OPEN).await;
    if commit {
        assert_eq!(t.due(0, true), Some(End::Commit));
        assert!(matches!(t.committed(Ok(())), Next::Deliver));
    } else {
        assert_eq!(t.due(0, true), Some(End::Abort));
        assert!(matches!(t.aborted(Ok(()), true), Next::SendAgain));
    }
}

#[tokio::test(start_paused = true)]
async fn only_an_id_whose_last_transaction_in_a_partition_was_aborted_cleans_up_there() {
    let p = key("outbox.event.order", 0);
    let mut t = Transaction::new(true);
    ready(&mut t);
    transaction_in(&mut t, &p, true).await;
    assert!(
        !t.clean_up(&p),
        "an abort could take back what the id committed there"
    );
    assert_eq!(t.next_cleanup(), None);
    transaction_in(&mut t, &p, false).await;
    assert!(
        !t.clean_up(&p),
        "the transaction before wrote there too: what is left open may be that one, committed"
    );

    transaction_in(&mut t, &key("outbox.event.invoice", 0), true).await;
    transaction_in(&mut t, &p, false).await;
    assert!(t.clean_up(&p));
    assert_eq!(
        t.next_cleanup(),
        Some(CleanupStep::Abort("walrelay.7.s".into(), vec![p.clone()]))
    );
    assert!(!t.may_send(), "no records while the cleanup is under way");
    assert!(
        matches!(t.cleaned(Ok(()), std::slice::from_ref(&p)), Next::Cleaned(Some(id), ps) if id == "walrelay.7.s" && ps == [p.clone()])
    );
    assert!(t.may_send());
    assert!(!t.clean_up(&p), "once ended, never again");

    // An aborted transaction followed by a committed one: no cleanup.
    transaction_in(&mut t, &key("outbox.event.invoice", 0), true).await;
    transaction_in(&mut t, &p, false).await;
    transaction_in(&mut t, &p, true).await;
    assert!(!t.clean_up(&p));
}

#[tokio::test(start_paused = true)]
async fn a_cleanup_whose_record_was_not_written_is_not_counted_as_done() {
    let p = key("outbox.event.order", 0);
    let mut t = Transaction::new(true);
    ready(&mut t);
    transaction_in(&mut t, &p, false).await;
    assert!(t.clean_up(&p));
    assert!(t.next_cleanup().is_some());
    assert!(matches!(t.cleaned(Ok(()), &[]), Next::Cleaned(..)));
    assert!(
        t.clean_up(&p),
        "the abort ended nothing there: a later hidden tail is cleaned again"
    );
}

#[tokio::test(start_paused = true)]
async fn a_cleanup_abort_that_keeps_failing_is_given_up_and_its_producer_dropped() {
    let error = |class| BrokerError {
        class,
        message: "test".into(),
    };
    let p = key("outbox.event.order", 0);
    let mut t = Transaction::new(true);
    ready(&mut t);
    transaction_in(&mut t, &p, false).await;
    assert!(t.clean_up(&p));
    assert!(t.next_cleanup().is_some());
    for _ in 1..CLEANUP_ABORTS {
        assert!(matches!(
            t.cleaned(
                Err(error(BrokerErrorClass::Abortable)),
                std::slice::from_ref(&p)
            ),
            Next::Pause(_)
        ));
        assert!(!t.may_send(), "aborted again, never begun");
    }
    assert!(matches!(
        t.cleaned(Err(error(BrokerErrorClass::Abortable)), std::slice::from_ref(&p)),
        Next::CleanupGivenUp(id, ps) if id == "walrelay.7.s" && ps == [p.clone()]
    ));
    assert_eq!(t.next_cleanup(), None, "not tried again");
    assert_eq!(
        t.id.as_deref(),
        Some("walrelay.7.s.spare"),
        "the spare carries on"
    );
    assert!(t.may_send());
}

#[tokio::test(start_paused = true)]
async fn a_partition_back_is_not_held_for_an_id_resting_on_another() {
    let mut t = Transaction::new(true);
    ready(&mut t);
    t.began(0);
    t.sent_to(&key("a", 0), 0);
    t.sent_to(&key("b", 1), 0);
    assert!(t.leaderless(&[key("b", 1)].into()).is_none());
    assert_eq!(t.due(2, false), Some(End::Abort));
    assert!(matches!(t.aborted(Ok(()), true), Next::Rest { .. }));
    assert!(
        !t.clean_up(&key("a", 0)),
        "the id that aborted there rests on b: a's read stands, unsure, rather than wait for b"
    );
    t.back(&[key("b", 1)].into());
    assert!(t.clean_up(&key("a", 0)), "once b is back, it cleans up");
}

#[tokio::test(start_paused = true)]
async fn what_an_id_aborted_is_not_carried_into_a_new_session_but_unconfirmed_records_may_be_cleaned()
 {
    let p = key("outbox.event.order", 0);
    let mut t = Transaction::new(true);
    ready(&mut t);
    transaction_in(&mut t, &p, false).await;
    ready(&mut t);
    assert!(
        !t.clean_up(&p),
        "another process may have committed there under the id since"
    );
    assert!(
        t.clean_up_unconfirmed(&p),
        "where nothing hidden was confirmed, every id may abort there"
    );
    assert_eq!(
        t.next_cleanup(),
        Some(CleanupStep::Abort("walrelay.7.s".into(), vec![p.clone()]))
    );
}

#[tokio::test(start_paused = true)]
async fn an_id_stuck_on_a_partition_without_a_leader_rests_and_the_spare_carries_on() {
    let mut t = Transaction::new(true);
    ready(&mut t);
    t.began(0);
    t.sent_to(&key("a", 0), 0);
    t.sent_to(&key("b", 1), 0);
    assert_eq!(t.touched(), [key("a", 0), key("b", 1)].into());
    assert!(
        t.leaderless(&[key("c", 0)].into()).is_none(),
        "a partition it never touched does not stick it"
    );
    assert!(
        t.leaderless(&[key("b", 1)].into()).is_none(),
        "open: abort first"
    );
    assert!(!t.may_send());
    assert_eq!(
        t.due(3, false),
        Some(End::Abort),
        "aborted at once, records outstanding or not"
    );
    assert!(t.is_aborting());
    match t.aborted(Ok(()), true) {
        Next::Rest { abandon, next } => {
            assert_eq!(abandon, "walrelay.7.s");
            assert_eq!(next.as_deref(), Some("walrelay.7.s.spare"));
        }
        other => panic!("{other:?}"),
    }
    assert!(t.needs_begin() && t.may_send(), "the spare takes records");
    assert_eq!(t.id.as_deref(), Some("walrelay.7.s.spare"));
    // The spare gets stuck too, between transactions: its last one
    // touched the partition.
    t.began(0);
    t.sent_to(&key("a", 3), 0);
    tokio::time::advance(MAX_OPEN).await;
    assert_eq!(t.due(0, true), Some(End::Commit));
    assert!(matches!(t.committed(Ok(())), Next::Deliver));
    match t.leaderless(&[key("a", 3)].into()) {
        Some(Next::Rest { abandon, next }) => {
            assert_eq!(abandon, "walrelay.7.s.spare");
            assert_eq!(next.as_deref(), Some("walrelay.7.s.spare2"));
        }
        other => panic!("{other:?}"),
    }
    // And so does the third.
    t.began(0);
    t.sent_to(&key("c", 5), 0);
    tokio::time::advance(MAX_OPEN).await;
    assert_eq!(t.due(0, true), Some(End::Commit));
    assert!(matches!(t.committed(Ok(())), Next::Deliver));
    match t.leaderless(&[key("c", 5)].into()) {
        Some(Next::Rest {
            abandon,
            next: None,
        }) => assert_eq!(abandon, "walrelay.7.s.spare2"),
        other => panic!("{other:?}"),
    }
    assert!(!t.may_send(), "no id to use");
    assert_eq!(t.take_initialization(), None, "all rest");
    // The first id's partition is back: it is taken over again.
    t.back(&[key("b", 1)].into());
    assert_eq!(t.take_initialization().as_deref(), Some("walrelay.7.s"));
    assert!(matches!(t.initialized("walrelay.7.s", Ok(())), Next::Use(id) if id == "walrelay.7.s"));
    assert!(t.may_send());
    // A new session leaves the resting spare out.
    t.restart(Some("walrelay.7.s".into()));
    assert_eq!(t.take_initialization().as_deref(), Some("walrelay.7.s"));
    assert_eq!(t.take_initialization(), None);
    assert!(matches!(
        t.initialized("walrelay.7.s", Ok(())),
        Next::Use(_)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_partition_back_before_the_stuck_ids_abort_ends_leaves_no_id_resting_on_it() {
    let mut t = Transaction::new(true);
    ready(&mut t);
    t.began(0);
    t.sent_to(&key("b", 1), 0);
    assert!(t.leaderless(&[key("b", 1)].into()).is_none(), "open");
    assert_eq!(t.due(1, false), Some(End::Abort));
    // The partition is back while the abort is still under way (its
    // coordinator was on the broker that went away).
    t.back(&[key("b", 1)].into());
    match t.aborted(Ok(()), true) {
        Next::Rest { abandon, next } => {
            assert_eq!(abandon, "walrelay.7.s");
            assert_eq!(next.as_deref(), Some("walrelay.7.s.spare"));
        }
        other => panic!("{other:?}"),
    }
    // No answer will say b-1 is back again: the first id must not rest on
    // it, or a later outage of the spare's partition would leave no id.
    t.began(0);
    t.sent_to(&key("a", 3), 0);
    tokio::time::advance(MAX_OPEN).await;
    assert_eq!(t.due(0, true), Some(End::Commit));
    assert!(matches!(t.committed(Ok(())), Next::Deliver));
    assert!(matches!(
        t.leaderless(&[key("a", 3)].into()),
        Some(Next::Rest { next: Some(_), .. })
    ));
    t.began(0);
    t.sent_to(&key("c", 5), 0);
    tokio::time::advance(MAX_OPEN).await;
    assert_eq!(t.due(0, true), Some(End::Commit));
    assert!(matches!(t.committed(Ok(())), Next::Deliver));
    assert!(matches!(
        t.leaderless(&[key("c", 5)].into()),
        Some(Next::Rest { next: None, .. })
    ));
    assert_eq!(
        t.take_initialization().as_deref(),
        Some("walrelay.7.s"),
        "the first id is taken over again and carries the other partitions"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stuck_id_whose_commit_was_under_way_rests_once_it_ends() {
    let mut t = Transaction::new(true);
    ready(&mut t);
    t.began(0);
    t.sent_to(&key("a", 0), 0);
    tokio::time::advance(MAX_OPEN).await;
    assert_eq!(t.due(0, true), Some(End::Commit));
    assert!(t.leaderless(&[key("a", 0)].into()).is_none(), "committing");
    assert!(matches!(t.committed(Ok(())), Next::Deliver));
    assert!(matches!(
        t.rest_if_stuck(),
        Some(Next::Rest { next: Some(_), .. })
    ));
    assert!(t.may_send());
}

#[tokio::test(start_paused = true)]
async fn a_stuck_transaction_that_wrote_is_aborted_until_it_goes_through() {
    let error = BrokerError::transient("Coordinator load in progress");
    let mut t = Transaction::new(true);
    ready(&mut t);
    t.began(0);
    t.sent_to(&key("a", 0), 0);
    t.sent_to(&key("b", 0), 0);
    assert!(t.leaderless(&[key("a", 0)].into()).is_none());
    assert_eq!(t.due(1, true), Some(End::Abort));
    let Next::Pause(wait) = t.aborted(Err(error.clone()), true) else {
        panic!("its records in b would hold b's readers back: abort again");
    };
    assert_eq!(t.due(0, true), None, "after a backoff");
    tokio::time::advance(wait).await;
    assert_eq!(t.due(0, true), Some(End::Abort));
    assert!(matches!(
        t.aborted(Ok(()), true),
        Next::Rest { next: Some(_), .. }
    ));
    // One that wrote nothing is given up at once.
    t.began(0);
    t.sent_to(&key("a", 1), 0);
    assert!(t.leaderless(&[key("a", 1)].into()).is_none());
    assert_eq!(t.due(1, false), Some(End::Abort));
    assert!(matches!(
        t.aborted(Err(error), false),
        Next::Rest { next: Some(id), .. } if id == "walrelay.7.s.spare2"
    ));
}

#[test]
fn a_new_session_leaves_a_stuck_id_resting_whatever_became_of_its_abort() {
    let mut t = Transaction::new(true);
    ready(&mut t);
    t.began(0);
    t.sent_to(&key("a", 0), 0);
    assert!(t.leaderless(&[key("a", 0)].into()).is_none());
    t.abandon();
    t.restart(Some("walrelay.7.s".into()));
    assert_eq!(
        t.take_initialization().as_deref(),
        Some("walrelay.7.s.spare"),
        "only the spares are taken over"
    );
    assert_eq!(
        t.take_initialization().as_deref(),
        Some("walrelay.7.s.spare2")
    );
    assert_eq!(t.take_initialization(), None);
    assert!(matches!(
        t.initialized("walrelay.7.s.spare", Ok(())),
        Next::Go
    ));
    assert!(
        matches!(t.initialized("walrelay.7.s.spare2", Ok(())), Next::Use(id) if id == "walrelay.7.s.spare")
    );
}

#[tokio::test(start_paused = true)]
async fn a_stuck_id_begins_nothing_while_the_transaction_before_ends() {
    let mut t = Transaction::new(true);
    ready(&mut t);
    t.began(0);
    t.sent_to(&key("a", 0), 0);
    tokio::time::advance(MAX_OPEN).await;
    assert_eq!(t.due(0, true), Some(End::Commit));
    assert_eq!(t.overlap().as_deref(), Some("walrelay.7.s.spare"));
    t.began(0);
    t.sent_to(&key("b", 1), 0);
    assert!(matches!(t.committed(Ok(())), Next::Deliver));
    tokio::time::advance(MAX_OPEN).await;
    assert_eq!(t.due(0, true), Some(End::Commit));
    assert_eq!(t.overlap().as_deref(), Some("walrelay.7.s"), "turns");
    // The first id's transaction before touched a-0, which has no leader
    // now: it is stuck, with the spare's commit still under way.
    assert!(t.leaderless(&[key("a", 0)].into()).is_none());
    assert!(!t.may_send(), "the stuck id begins no transaction");
    assert!(matches!(t.committed(Ok(())), Next::Deliver));
    match t.rest_if_stuck() {
        Some(Next::Rest { abandon, next }) => {
            assert_eq!(abandon, "walrelay.7.s");
            assert_eq!(next.as_deref(), Some("walrelay.7.s.spare"));
        }
        other => panic!("{other:?}"),
    }
    assert!(t.may_send());
}

#[tokio::test(start_paused = true)]
async fn a_partition_back_before_the_commit_before_ends_does_not_retire_its_id() {
    let mut t = Transaction::new(true);
    ready(&mut t);
    t.began(0);
    t.sent_to(&key("a", 0), 0);
    tokio::time::advance(MAX_OPEN).await;
    assert_eq!(t.due(0, true), Some(End::Commit));
    assert_eq!(t.overlap().as_deref(), Some("walrelay.7.s.spare"));
    t.began(0);
    t.sent_to(&key("a", 0), 0);
    // Both ids wrote to a-0, which has no leader, then is back before the
    // commit before ends.
    assert!(t.leaderless(&[key("a", 0)].into()).is_none());
    t.back(&[key("a", 0)].into());
    assert!(matches!(t.committed(Ok(())), Next::Deliver));
    assert_eq!(t.due(1, false), Some(End::Abort), "still aborted");
    match t.aborted(Ok(()), true) {
        Next::Rest { abandon, next } => {
            assert_eq!(abandon, "walrelay.7.s.spare");
            assert_eq!(
                next.as_deref(),
                Some("walrelay.7.s"),
                "the committing id is not retired on a-0"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn an_id_that_rests_drops_its_cleanups_so_their_partitions_are_read_again() {
    let p = key("outbox.event.order", 0);
    let q = key("outbox.event.invoice", 0);
    let mut t = Transaction::new(true);
    ready(&mut t);
    transaction_in(&mut t, &q, true).await;
    transaction_in(&mut t, &p, false).await;
    assert!(t.clean_up(&p), "the id's last transaction in p was aborted");
    assert!(t.take_dropped_cleanups().is_empty());
    // Before the cleanup begins, a partition the id wrote to loses its
    // leader: the id rests, and could not clean up p until q is back.
    t.sent_to(&q, 0);
    match t.leaderless(&[q.clone()].into()) {
        Some(Next::Rest { abandon, .. }) => assert_eq!(abandon, "walrelay.7.s"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        t.take_dropped_cleanups(),
        vec![p.clone()],
        "p's tail is read again rather than wait for q"
    );
    assert_eq!(t.next_cleanup(), None);
    assert!(t.take_dropped_cleanups().is_empty(), "once");
}
