//! The in-memory inbox store: rows by id, each partition's next offset
//! and topic id, a batch all or nothing; the test can make it lose its
//! connection, refuse for good, or hang.

use std::cell::Cell;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::super::incoming::{DeadLetterKind, Incoming};
use super::super::seams::InboxStore;
use super::super::store::{StoreError, StoredOffset, TopicPartition, Written};
use crate::sql::{SqlCause, SqlError};

/// What the test makes the store do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The connection is lost: every call fails (transiently) until the
    /// fault is cleared and the store reconnected.
    ConnectionLost,
    /// Every call is refused for good (the tables went away).
    Refused,
    /// Every call waits until the fault changes.
    Hang,
}

/// A call the loop made to the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Offsets,
    Write,
    Reset,
    Reconnect,
}

#[derive(Clone, Debug)]
pub struct Attempt {
    pub at: Instant,
    pub call: Call,
    pub ok: bool,
}

/// A row of the inbox table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub tp: TopicPartition,
    pub offset: i64,
    /// The store (the consumer) that wrote it.
    pub writer: &'static str,
}

/// The tables, shared by every store of a test.
#[derive(Default)]
pub struct Tables {
    /// The inbox table, by id (its primary key).
    pub rows: BTreeMap<String, Row>,
    /// The group's next offset per partition.
    pub next_offsets: BTreeMap<TopicPartition, i64>,
    /// The topic id stored beside each next offset (none: stored by an
    /// older walrelay).
    pub topic_ids: BTreeMap<TopicPartition, String>,
    /// Records skipped because their id was stored already.
    pub duplicates: u64,
    /// The size of each batch written, in order.
    pub batches: Vec<usize>,
    /// Every call, in order (a call that hangs once it returns).
    pub attempts: Vec<Attempt>,
    /// Calls held by a hang now.
    pub hanging: usize,
    fault: Option<Fault>,
}

impl Tables {
    pub fn failed_attempts(&self) -> Vec<Attempt> {
        self.attempts.iter().filter(|a| !a.ok).cloned().collect()
    }
}

struct Database {
    tables: Mutex<Tables>,
}

/// One consumer's connection to the in-memory tables.
pub struct MemoryStore {
    database: Arc<Database>,
    writer: &'static str,
    /// Lost with the connection, until `reconnect`.
    connected: Cell<bool>,
}

impl MemoryStore {
    pub fn new(writer: &'static str) -> Self {
        let database = Database {
            tables: Mutex::new(Tables::default()),
        };
        MemoryStore {
            database: Arc::new(database),
            writer,
            connected: Cell::new(true),
        }
    }

    /// Another consumer's connection to the same tables.
    pub fn another(&self, writer: &'static str) -> Self {
        MemoryStore {
            database: Arc::clone(&self.database),
            writer,
            connected: Cell::new(true),
        }
    }

    /// From now on every call does as `fault` says (`None`: as it should).
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.tables().fault = fault;
    }

    pub fn tables(&self) -> MutexGuard<'_, Tables> {
        self.database.tables.lock().unwrap()
    }

    /// Waits while the fault is `Hang`, as a server that answers nothing:
    /// the call's future stays pending (the thread is not blocked).
    async fn unless_hanging(&self) {
        if self.tables().fault != Some(Fault::Hang) {
            return;
        }
        self.tables().hanging += 1;
        // Uncounted when the call ends or is abandoned.
        let _hanging = Hanging(self);
        while self.tables().fault == Some(Fault::Hang) {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// The tables, the call recorded; or the
    /// error the fault (or a connection lost before) makes of it.
    fn call(&self, call: Call) -> Result<MutexGuard<'_, Tables>, StoreError> {
        let mut tables = self.database.tables.lock().unwrap();
        let error = match tables.fault {
            Some(Fault::Refused) => Some(StoreError::NotSetUp("the inbox table is gone".into())),
            Some(Fault::ConnectionLost) => {
                self.connected.set(false);
                Some(connection_lost())
            }
            _ if call == Call::Reconnect => {
                self.connected.set(true);
                None
            }
            _ if !self.connected.get() => Some(connection_lost()),
            _ => None,
        };
        tables.attempts.push(Attempt {
            at: Instant::now(),
            call,
            ok: error.is_none(),
        });
        match error {
            Some(e) => Err(e),
            None => Ok(tables),
        }
    }
}

fn connection_lost() -> StoreError {
    SqlError::new("memory", SqlCause::Closed).into()
}

/// The record's id header, as the real store reads it.
fn id(record: &Incoming) -> Option<String> {
    let header = |name: &str| {
        record
            .headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    };
    header("id")
        .or_else(|| header("ce_id"))
        .filter(|id| !id.is_empty())
        .map(|id| String::from_utf8_lossy(id).into_owned())
}

/// A call held by `Fault::Hang`, counted in `Tables::hanging`.
struct Hanging<'a>(&'a MemoryStore);

impl Drop for Hanging<'_> {
    fn drop(&mut self) {
        self.0.tables().hanging -= 1;
    }
}

impl InboxStore for MemoryStore {
    async fn offsets(
        &self,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, StoredOffset>, StoreError> {
        self.unless_hanging().await;
        let tables = self.call(Call::Offsets)?;
        Ok(partitions
            .iter()
            .filter_map(|tp| {
                let stored = StoredOffset {
                    next: *tables.next_offsets.get(tp)?,
                    topic_id: tables.topic_ids.get(tp).cloned(),
                };
                Some((tp.clone(), stored))
            })
            .collect())
    }

    async fn reset(
        &mut self,
        tp: &TopicPartition,
        from: &StoredOffset,
        to: &StoredOffset,
    ) -> Result<bool, StoreError> {
        self.unless_hanging().await;
        let mut tables = self.call(Call::Reset)?;
        if tables.next_offsets.get(tp) != Some(&from.next)
            || tables.topic_ids.get(tp) != from.topic_id.as_ref()
        {
            return Ok(false);
        }
        tables.next_offsets.insert(tp.clone(), to.next);
        match &to.topic_id {
            Some(id) => tables.topic_ids.insert(tp.clone(), id.clone()),
            None => tables.topic_ids.remove(tp),
        };
        Ok(true)
    }

    async fn write(
        &mut self,
        batch: &[Incoming],
        topic_ids: &HashMap<TopicPartition, String>,
    ) -> Result<Written, StoreError> {
        let writer = self.writer;
        self.unless_hanging().await;
        let mut tables = self.call(Call::Write)?;
        let mut written = Written::default();
        for record in batch {
            let tp = (record.topic.clone(), record.partition);
            let next = written.next_offsets.entry(tp.clone()).or_insert(0);
            *next = (*next).max(record.offset + 1);
            let Some(id) = id(record) else {
                written
                    .dead_letters
                    .push((DeadLetterKind::MissingId, "no id header".into()));
                continue;
            };
            match tables.rows.entry(id) {
                Entry::Occupied(_) => written.duplicates += 1,
                Entry::Vacant(row) => {
                    let offset = record.offset;
                    row.insert(Row { tp, offset, writer });
                    written.stored += 1;
                    written.stored_timestamps_ms.extend(record.timestamp_ms);
                }
            }
        }
        // GREATEST, as the real store: a late writer never moves an
        // offset back, nor one that read another topic of the same name.
        for (tp, next) in &written.next_offsets {
            let id = topic_ids.get(tp);
            if let (Some(stored), Some(id)) = (tables.topic_ids.get(tp), id)
                && stored != id
            {
                continue;
            }
            let stored = tables.next_offsets.entry(tp.clone()).or_insert(*next);
            *stored = (*stored).max(*next);
            if let Some(id) = id {
                tables.topic_ids.insert(tp.clone(), id.clone());
            }
        }
        tables.duplicates += written.duplicates;
        tables.batches.push(batch.len());
        Ok(written)
    }

    async fn reconnect(&mut self) -> Result<(), StoreError> {
        self.unless_hanging().await;
        self.call(Call::Reconnect).map(drop)
    }
}
