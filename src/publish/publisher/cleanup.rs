//! Ending a transaction left open in a partition (`transaction/cleanup.rs`):
//! one record to each partition, in a transaction that is then aborted.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;

use super::Publisher;
use crate::lsn::Lsn;
use crate::publish::broker_io::SessionIo;
use crate::publish::error::PublishError;
use crate::publish::ledgers::PartitionKey;
use crate::publish::scan::LedgerScan;
use crate::publish::sink::{RecordId, SendId, Sink};
use crate::publish::transaction::Transaction;
use crate::record::KafkaRecord;

#[derive(Default)]
pub(super) struct CleanupSends {
    pub(super) round: u16,
    pub(super) partitions: Vec<PartitionKey>,
    pub(super) written: Vec<PartitionKey>,
    pub(super) outstanding: usize,
}

/// Whether a cleanup of `key`, whose tail an open transaction hides, is
/// scheduled (once a session): where an id's last transaction there was
/// aborted, or where all the transaction hides is events this session
/// streams again (from `replayed_from`) and the session has not used the
/// partition yet, so nothing there counts as delivered.
pub(super) fn clean_up(
    txn: &mut Transaction,
    cleaned: &mut HashSet<PartitionKey>,
    used_in_session: &HashSet<PartitionKey>,
    replayed_from: Option<Lsn>,
    key: &PartitionKey,
    scan: &LedgerScan,
) -> bool {
    if cleaned.contains(key) {
        return false;
    }
    let replayed = !used_in_session.contains(key)
        && replayed_from.is_some_and(|from| scan.hides_only_replayed(from));
    let scheduled = txn.clean_up(key) || (replayed && txn.clean_up_unconfirmed(key));
    if scheduled {
        cleaned.insert(key.clone());
    }
    scheduled
}

/// Cleanup records' ids count down from here, one per partition: never
/// one of a record in hand, so the records' bookkeeping passes them over.
pub(super) const CLEANUP_RECORDS: u64 = (1 << 48) - 1;
/// At most this many partitions in one cleanup (the ids below are the
/// records').
pub(super) const CLEANUP_PARTITIONS: u64 = 1 << 16;

/// A cleanup record's index among its cleanup's partitions.
pub(super) fn cleanup_index(id: RecordId) -> Option<usize> {
    CLEANUP_RECORDS
        .checked_sub(id.0)
        .filter(|index| *index < CLEANUP_PARTITIONS)
        .map(|index| index as usize)
}
/// How long a cleanup waits for its records to be written before it
/// aborts anyway (a partition that cannot be written is not cleaned):
/// below the broker-stall timeout's default (5 s).
const CLEANUP_WAIT: Duration = Duration::from_secs(4);
/// How long a partition whose tail an open transaction hides is read
/// again, waiting for Kafka to end that transaction, before its events are
/// published again unsure: past the transaction timeout (60 s), after
/// which the broker aborts an abandoned producer's transaction.
pub(super) const HIDDEN_WAIT: Duration = Duration::from_secs(75);
/// How often it is read again meanwhile.
pub(super) const HIDDEN_RETRY: Duration = Duration::from_secs(2);
/// The header a cleanup record carries.
pub const CLEANUP_HEADER: &str = "walrelay_cleanup";

impl<S: Sink, T: Copy> Publisher<S, T> {
    /// Ends what `id` left open in `partitions`: a transaction with one
    /// record to each, aborted (`transaction.rs`).
    pub(super) fn clean_up_under(&mut self, id: &str, partitions: &[PartitionKey]) {
        self.sink.switch_to(id);
        if let Err(error) = self.sink.begin() {
            self.failed = Some(PublishError::ending(error, Some(id)));
            return;
        }
        let round = self.cleanup.round.wrapping_add(1);
        self.cleanup = CleanupSends {
            round,
            partitions: partitions.to_vec(),
            written: Vec::new(),
            outstanding: 0,
        };
        for (index, PartitionKey { topic, partition }) in partitions
            .iter()
            .take(CLEANUP_PARTITIONS as usize)
            .enumerate()
        {
            let record = KafkaRecord {
                topic: topic.clone(),
                key: Some(Bytes::from_static(b"walrelay-cleanup")),
                value: Some(Bytes::new()),
                headers: vec![(
                    CLEANUP_HEADER.into(),
                    Bytes::from_static(b"an aborted record ending a transaction left open"),
                )],
            };
            let send = SendId {
                id: RecordId(CLEANUP_RECORDS - index as u64),
                attempt: round,
            };
            match self.sink.send(&record, *partition, send) {
                Ok(()) => self.cleanup.outstanding += 1,
                Err(refused) => {
                    tracing::debug!(
                        ?refused,
                        topic,
                        partition,
                        "the cleanup record was not queued"
                    )
                }
            }
        }
        // Aborted once written: a record never sent would not put the
        // partition in the transaction, and the abort would end nothing
        // there.
        if self.cleanup.outstanding == 0 {
            self.abort_cleanup();
        } else {
            self.io.watch(async move {
                tokio::time::sleep(CLEANUP_WAIT).await;
                SessionIo::CleanupWaited(round)
            });
        }
    }

    pub(super) fn abort_cleanup(&mut self) {
        let abort = self.sink.abort();
        self.io
            .watch(async move { SessionIo::Aborted(abort.await) });
    }
}
