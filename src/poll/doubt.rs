//! Exactly once: the origin a table's records carry, and how far back the
//! publisher reads partitions for rows in doubt (rows a relay claimed
//! before and may have sent).

use super::batch::{Batch, RowTag};
use super::claim::OutboxTable;
use crate::lsn::Lsn;
use crate::publish::{Origin, Publisher, Replay, Sink};
use crate::replication::TimelineHistory;

pub struct Doubt {
    exactly_once: bool,
    /// The lowest `seq` in doubt of the batches in flight, which the
    /// publisher's partition scans look back to.
    start: Option<i64>,
}

impl Doubt {
    pub fn new(exactly_once: bool) -> Self {
        Doubt {
            exactly_once,
            start: None,
        }
    }

    /// Exactly once: the records' origin for rows of `table`.
    pub fn origin(&self, table: &OutboxTable) -> Option<Origin> {
        self.exactly_once.then(|| Origin {
            system_id: table.source_id.clone(),
            slot: format!("poll:{}", table.name()),
            timeline: 0,
        })
    }

    /// Before `batch` is sent: rows a relay may have sent before are
    /// looked for in their partitions first, read afresh from the lowest
    /// of them on. `in_flight` says whether a batch already in flight has
    /// rows in doubt.
    pub fn before_send<S: Sink>(
        &mut self,
        publisher: &mut Publisher<S, RowTag>,
        batch: &Batch,
        tables: &[OutboxTable],
        in_flight: bool,
    ) {
        if !in_flight {
            self.start = None;
        }
        let Some(lowest) = batch.lowest_in_doubt() else {
            return;
        };
        tracing::info!(
            lowest,
            "rows a relay may have sent already: checking their partitions"
        );
        // Read afresh for every batch in doubt (what another relay landed
        // since the last scan must be seen), looking back to the lowest row
        // in doubt of every batch in flight.
        let start = self.start.map_or(lowest, |start| start.min(lowest));
        self.start = Some(start);
        let table = tables
            .iter()
            .find(|t| t.name() == batch.table.name())
            .unwrap_or(&tables[0]);
        publisher.begin_session(
            self.origin(table).map(|origin| Replay {
                origin,
                history: TimelineHistory::new(0),
                start: Lsn(start as u64),
            }),
            None,
        );
    }
}
