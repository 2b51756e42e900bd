//! How the loop stops: a store that refuses for good, and a stop request
//! during an outage or while a write gets no answer.

use super::*;

#[test]
fn a_permanent_store_error_stops_the_loop_with_the_error() {
    let (broker, store, inbox) = one_member_on_partition_0(2);
    store.set_fault(Some(Fault::Refused));
    produce_numbered(&broker, &[0], 0..2);
    wait_until("the loop stops", || inbox.thread.is_finished());

    let result = inbox.thread.join().unwrap();
    assert!(
        matches!(result, Err(InboxError::Store(StoreError::NotSetUp(_)))),
        "{result:?}"
    );
    let tables = store.tables();
    assert!(tables.rows.is_empty());
    assert!(tables.next_offsets.is_empty());
    assert_eq!(tables.failed_attempts().len(), 1, "not tried again");
}

#[test]
fn shutdown_during_a_store_outage_exits_promptly_without_waiting_out_the_backoff() {
    let broker = MemoryBroker::default();
    let store = MemoryStore::new("a");
    let max_backoff = Duration::from_secs(60);
    let inbox = start(&broker, store.another("a"), config(1, FOREVER, max_backoff));
    inbox.member.assign(&[tp(0)]);
    wait_until("partition 0 is placed", || inbox.placed(&[tp(0)]));
    store.set_fault(Some(Fault::ConnectionLost));
    produce_numbered(&broker, &[0], 0..1);
    // Failures at 0, 0.1, 0.3, 0.7 and 1.5 s: the next is 1.6 s later.
    wait_until("five attempts failed", || {
        store.tables().failed_attempts().len() >= 5
    });
    let attempts = store.tables().attempts.len();

    let asked = Instant::now();
    let result = inbox.stop();
    let took = asked.elapsed();
    assert!(result.is_ok(), "{result:?}");
    // One poll (100 ms) and the exit; not the 1.6 s backoff.
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let tables = store.tables();
    assert_eq!(tables.attempts.len(), attempts, "nothing tried at exit");
    assert!(tables.rows.is_empty());
}

/// SIGTERM while PostgreSQL answers nothing (a frozen server, or a write
/// waiting on a lock): the write is given up `STOP_GRACE` after the stop
/// request, the loop exits, and the batch stays unstored with its offset,
/// for the next owner to read again.
#[test]
fn shutdown_while_a_write_gets_no_answer_exits_after_the_grace() {
    let (broker, store, inbox) = one_member_on_partition_0(1);
    store.set_fault(Some(Fault::Hang));
    produce_numbered(&broker, &[0], 0..1);
    wait_until("the write gets no answer", || store.tables().hanging == 1);

    inbox.shutdown.store(true, Ordering::Relaxed);
    let asked = Instant::now();
    while !inbox.thread.is_finished() && asked.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let finished = inbox.thread.is_finished();
    store.set_fault(None);
    let result = inbox.thread.join().unwrap();
    assert!(
        finished,
        "asked to stop 10 s ago, the loop is still in the store's write"
    );
    assert!(result.is_ok(), "{result:?}");
    let tables = store.tables();
    assert_eq!(tables.hanging, 0, "the write was given up");
    assert!(tables.rows.is_empty() && tables.next_offsets.is_empty());
}
