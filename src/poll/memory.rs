//! An in-memory outbox, for running the polling loop in-process with
//! tokio's paused time. It keeps what the SQL keeps: rows with their `seq`,
//! aggregate, attempts and next attempt; the locks of each connection's
//! open transaction (`FOR UPDATE SKIP LOCKED`, released at commit, at a
//! rollback, and when the connection goes); the in-flight notes of exactly
//! once (committed on their own); and what was settled. A claim follows the
//! SQL's rule: per aggregate, it stops at the first row with an older
//! unpublished row outside the claim. The test can make calls hang (a
//! frozen server) or fail (the connection lost).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::rc::Rc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::PollError;
use super::batch::Settlement;
use super::claim::{Claim, ClaimedRow, LaneShare, OutboxTable};
use super::store::{Connected, OutboxStore, Wakeups};
use crate::dead_letters::DeadLetter;
use crate::publish::LocalBoxFuture;
use crate::sql::{SqlCause, SqlError};
use crate::table::ColumnValue;
use crate::timestamp::PgTimestamp;

/// A call a lane makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Call {
    Connect,
    Claim,
    Mark,
    Settle,
}

struct Row {
    id: String,
    aggregate_id: String,
    payload: String,
    attempts: i32,
    next_attempt_at: Option<Instant>,
}

/// Whether the record of the row of this id is in Kafka.
type Acked = Box<dyn Fn(&str) -> bool>;

#[derive(Default)]
struct State {
    /// Unpublished rows by `seq` (published rows are deleted).
    rows: BTreeMap<i64, Row>,
    next_seq: i64,
    /// Exactly once: rows noted as possibly sent.
    in_flight: BTreeSet<i64>,
    /// Open connections, each with the rows its transaction locked.
    open: HashMap<u64, BTreeSet<i64>>,
    next_conn: u64,
    listeners: Vec<mpsc::UnboundedSender<String>>,
    hanging: HashSet<Call>,
    failing: VecDeque<Call>,
    connects: usize,
    claims: Vec<Instant>,
    /// Published rows' ids, in the order their settle committed.
    settled: Vec<String>,
    dead_letters: Vec<DeadLetter>,
    /// Whether a row's record is in Kafka, checked at each settle.
    acked: Option<Acked>,
    settled_unacked: Vec<String>,
}

impl State {
    /// The connection went: the server rolls its transaction back.
    fn close(&mut self, conn: u64) {
        self.open.remove(&conn);
    }

    fn locked_by_other(&self, conn: u64, seq: i64) -> bool {
        self.open
            .iter()
            .any(|(c, locks)| *c != conn && locks.contains(&seq))
    }
}

/// The test's handle on the outbox (and the relay's store).
#[derive(Clone, Default)]
pub struct MemoryOutbox {
    state: Rc<RefCell<State>>,
}

/// A lane's connection: when its last handle goes, so does its
/// transaction.
#[derive(Clone)]
pub struct MemoryConn(Rc<ConnHandle>);

struct ConnHandle {
    id: u64,
    state: Rc<RefCell<State>>,
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        if let Ok(mut state) = self.state.try_borrow_mut() {
            state.close(self.id);
        }
    }
}

/// The table the tests' rows are in: the outbox columns, as the scripted
/// walsender's (`relay/scripted.rs`).
pub fn table() -> OutboxTable {
    OutboxTable::for_test(
        "public",
        "outbox",
        &[
            ("id", 2950),
            ("aggregate_type", 25),
            ("aggregate_id", 25),
            ("event_type", 25),
            ("payload", 3802),
        ],
    )
}

fn lost() -> PollError {
    SqlError::new("memory:5432", SqlCause::Closed).into()
}

impl MemoryOutbox {
    /// A writer commits a row of aggregate `order/aggregate_id`; the insert
    /// trigger notifies. Returns its `seq`.
    pub fn insert(&self, id: &str, aggregate_id: &str, payload: &str) -> i64 {
        let mut state = self.state.borrow_mut();
        state.next_seq += 1;
        let seq = state.next_seq;
        state.rows.insert(
            seq,
            Row {
                id: id.to_owned(),
                aggregate_id: aggregate_id.to_owned(),
                payload: payload.to_owned(),
                attempts: 0,
                next_attempt_at: None,
            },
        );
        state.listeners.retain(|l| l.send(String::new()).is_ok());
        seq
    }

    /// Calls of this kind hang (the server froze), until `answer`.
    pub fn hang(&self, call: Call) {
        self.state.borrow_mut().hanging.insert(call);
    }

    pub fn answer(&self, call: Call) {
        self.state.borrow_mut().hanging.remove(&call);
    }

    /// The next call of this kind loses its connection.
    pub fn fail_next(&self, call: Call) {
        self.state.borrow_mut().failing.push_back(call);
    }

    /// Checks at each settle that every published row's record is in
    /// Kafka (see [`MemoryOutbox::settled_unacked`]).
    pub fn check_acked(&self, acked: impl Fn(&str) -> bool + 'static) {
        self.state.borrow_mut().acked = Some(Box::new(acked));
    }

    /// Ids of rows settled as published while their record was not in
    /// Kafka.
    pub fn settled_unacked(&self) -> Vec<String> {
        self.state.borrow().settled_unacked.clone()
    }

    /// Ids of the rows settled as published, in the order of the commits.
    pub fn settled(&self) -> Vec<String> {
        self.state.borrow().settled.clone()
    }

    /// Rows not yet published.
    pub fn pending(&self) -> usize {
        self.state.borrow().rows.len()
    }

    /// Rows noted in flight and not settled.
    pub fn in_doubt(&self) -> Vec<i64> {
        self.state.borrow().in_flight.iter().copied().collect()
    }

    /// Rows some open transaction holds.
    pub fn locked(&self) -> usize {
        self.state.borrow().open.values().map(BTreeSet::len).sum()
    }

    pub fn connects(&self) -> usize {
        self.state.borrow().connects
    }

    /// When each claim started.
    pub fn claims(&self) -> Vec<Instant> {
        self.state.borrow().claims.clone()
    }

    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.state.borrow().dead_letters.clone()
    }

    /// Waits out a hanging call, or fails the connection: what each call
    /// does first.
    fn enter(
        &self,
        call: Call,
        conn: Option<&MemoryConn>,
    ) -> LocalBoxFuture<Result<(), PollError>> {
        let state = Rc::clone(&self.state);
        let conn = conn.map(|c| c.0.id);
        Box::pin(async move {
            if state.borrow().hanging.contains(&call) {
                std::future::pending::<()>().await;
            }
            let mut state = state.borrow_mut();
            if let Some(at) = state.failing.iter().position(|c| *c == call) {
                state.failing.remove(at);
                if let Some(conn) = conn {
                    state.close(conn);
                }
                return Err(lost());
            }
            match conn {
                Some(conn) if !state.open.contains_key(&conn) => Err(lost()),
                _ => Ok(()),
            }
        })
    }
}

impl OutboxStore for MemoryOutbox {
    type Conn = MemoryConn;

    fn connect(&self, listen: bool) -> LocalBoxFuture<Result<Connected<MemoryConn>, PollError>> {
        let enter = self.enter(Call::Connect, None);
        let shared = Rc::clone(&self.state);
        Box::pin(async move {
            enter.await?;
            let mut state = shared.borrow_mut();
            state.connects += 1;
            state.next_conn += 1;
            let id = state.next_conn;
            state.open.insert(id, BTreeSet::new());
            let wakeups = listen.then(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                state.listeners.push(tx.clone());
                Wakeups::new(rx, move || !tx.is_closed())
            });
            drop(state);
            Ok(Connected {
                conn: MemoryConn(Rc::new(ConnHandle { id, state: shared })),
                host: "memory:5432".into(),
                tables: vec![table()],
                wakeups,
            })
        })
    }

    fn claim(
        &self,
        conn: MemoryConn,
        _table: OutboxTable,
        limit: i64,
        share: LaneShare,
    ) -> LocalBoxFuture<Result<Claim, PollError>> {
        self.state.borrow_mut().claims.push(Instant::now());
        let enter = self.enter(Call::Claim, Some(&conn));
        let state = Rc::clone(&self.state);
        Box::pin(async move {
            enter.await?;
            let mut state = state.borrow_mut();
            let now = Instant::now();
            let id = conn.0.id;
            // The oldest rows due of this lane's share no one else holds.
            let lane_of = |aggregate: &str| {
                aggregate.bytes().map(u32::from).sum::<u32>() as i32 % share.count
            };
            let candidates: Vec<i64> = state
                .rows
                .iter()
                .filter(|(seq, row)| {
                    row.next_attempt_at.is_none_or(|at| at <= now)
                        && lane_of(&row.aggregate_id) == share.index
                        && !state.locked_by_other(id, **seq)
                })
                .map(|(seq, _)| *seq)
                .take(limit as usize)
                .collect();
            let held: BTreeSet<i64> = candidates.iter().copied().collect();
            let mut stopped: HashSet<String> = HashSet::new();
            let (mut rows, mut left) = (Vec::new(), 0);
            for seq in &candidates {
                let row = &state.rows[seq];
                let older_outside = state
                    .rows
                    .range(..*seq)
                    .any(|(older, o)| o.aggregate_id == row.aggregate_id && !held.contains(older));
                if stopped.contains(&row.aggregate_id) || older_outside {
                    stopped.insert(row.aggregate_id.clone());
                    left += 1;
                    continue;
                }
                let text = |v: &str| ColumnValue::Text(Bytes::copy_from_slice(v.as_bytes()));
                rows.push(ClaimedRow {
                    seq: *seq,
                    row_id: row_id(*seq),
                    attempts: row.attempts,
                    aggregate: (Some("order".into()), Some(row.aggregate_id.clone())),
                    values: vec![
                        text(&row.id),
                        text("order"),
                        text(&row.aggregate_id),
                        text("Placed"),
                        text(&row.payload),
                    ],
                    created: PgTimestamp::now(),
                    in_doubt: state.in_flight.contains(seq),
                });
            }
            if !rows.is_empty() {
                state.open.insert(id, held);
            }
            Ok(Claim {
                rows,
                stopped: left,
            })
        })
    }

    fn mark_in_flight(
        &self,
        conn: MemoryConn,
        _table: OutboxTable,
        seqs: Vec<i64>,
    ) -> LocalBoxFuture<Result<(), PollError>> {
        let enter = self.enter(Call::Mark, Some(&conn));
        let state = Rc::clone(&self.state);
        Box::pin(async move {
            enter.await?;
            state.borrow_mut().in_flight.extend(seqs);
            Ok(())
        })
    }

    fn settle(
        &self,
        conn: MemoryConn,
        _table: OutboxTable,
        settlement: Settlement,
    ) -> LocalBoxFuture<Result<(), PollError>> {
        let enter = self.enter(Call::Settle, Some(&conn));
        let state = Rc::clone(&self.state);
        Box::pin(async move {
            enter.await?;
            let mut guard = state.borrow_mut();
            let state = &mut *guard;
            let id = conn.0.id;
            let locks = state.open.get(&id).cloned().unwrap_or_default();
            let now = Instant::now();
            for published in &settlement.published {
                let seq = &published.seq;
                assert!(locks.contains(seq), "row {seq} settled without its lock");
                assert_eq!(
                    published.row_id,
                    row_id(*seq),
                    "row {seq} settled by another's place"
                );
                let row = state.rows.remove(seq).expect("a claimed row");
                if state.acked.as_ref().is_some_and(|acked| !acked(&row.id)) {
                    state.settled_unacked.push(row.id.clone());
                }
                state.settled.push(row.id);
                state.in_flight.remove(seq);
            }
            for failed in &settlement.failed {
                let row = state.rows.get_mut(&failed.seq).expect("a claimed row");
                row.attempts += 1;
                row.next_attempt_at = Some(now + failed.retry_in);
                state.in_flight.remove(&failed.seq);
            }
            state.dead_letters.extend(settlement.dead_letters);
            // COMMIT: the locks go.
            state.open.insert(id, BTreeSet::new());
            Ok(())
        })
    }
}

/// Where the in-memory outbox says row `seq` is (the claim's `row_id`).
fn row_id(seq: i64) -> String {
    format!("(0,{seq})")
}
