//! One claimed batch on its way: each row's record, what became of it, and
//! what to write back when the batch settles.

use std::time::Duration;

use super::claim::{ClaimedRow, OutboxTable};
use super::settle::{FailedRow, PublishedRow};
use crate::dead_letters::DeadLetter;
use crate::lsn::Lsn;
use crate::metrics as m;
use crate::publish::{
    OriginStamp, Outcome, Outgoing, Position, RefusedRecord, ToSend, backoff, to_send,
};
use crate::record::KafkaRecord;
use crate::router::{ChangeAt, ChangeContext, Router};
use crate::timestamp::PgTimestamp;

/// A row's position: its `seq` in the fields where a WAL event has its
/// LSNs, so it prints, sorts and is looked for as one.
pub fn position_of(seq: i64) -> Position {
    Position {
        commit: Lsn(seq as u64),
        change: Lsn(seq as u64),
        rank: 0,
    }
}

/// What travels with a row's record through the publisher and back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowTag {
    /// The batch it belongs to.
    pub batch: u64,
    /// Its place in the batch.
    pub index: usize,
}

impl RowTag {
    /// The tag of the row an outcome is of.
    pub fn of(outcome: &Outcome<RowTag>) -> RowTag {
        match outcome {
            Outcome::Delivered { tag, .. }
            | Outcome::Refused { tag, .. }
            | Outcome::Failed { tag, .. }
            | Outcome::Skipped { tag } => *tag,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum RowState {
    Sending,
    /// In Kafka (as itself or as its dead letter).
    Published,
    Failed {
        error: String,
    },
}

struct Row {
    row: ClaimedRow,
    /// What was sent: the event's record, or its dead letter.
    record: KafkaRecord,
    /// Why the row went to the dead-letter topic, if it did.
    dead_letter: Option<String>,
    /// The broker refused it for good: kept whole in the dead-letter table
    /// when the batch settles.
    refused: Option<DeadLetter>,
    state: RowState,
}

pub struct Batch {
    pub number: u64,
    pub table: OutboxTable,
    rows: Vec<Row>,
    /// Exactly once: the headers every record carries.
    stamp: Option<OriginStamp>,
    /// The out-of-attempts rows' dead letters were sent.
    last_tries_sent: bool,
}

/// What to write back for a settled batch.
pub struct Settlement {
    pub published: Vec<PublishedRow>,
    pub failed: Vec<FailedRow>,
    /// Rows the broker refused, kept whole before they are deleted.
    pub dead_letters: Vec<DeadLetter>,
}

impl Batch {
    /// The claimed rows as records (or their dead letters, if a row cannot
    /// be one); exactly once, each carries its position and origin.
    pub fn new(
        number: u64,
        table: OutboxTable,
        rows: Vec<ClaimedRow>,
        router: &Router,
        stamp: Option<OriginStamp>,
    ) -> Self {
        let rows = rows
            .into_iter()
            .map(|row| {
                let ctx = ChangeContext {
                    at: ChangeAt::Seq(row.seq),
                    commit_time: row.created,
                };
                let routed = router.route_insert(&table.relation, &row.values, ctx);
                let ToSend {
                    mut record,
                    unroutable,
                } = to_send(routed, format_args!("seq {}", row.seq))
                    .expect("the relation is an outbox table");
                if let Some(stamp) = &stamp {
                    stamp.stamp(&mut record, position_of(row.seq));
                }
                Row {
                    row,
                    record,
                    dead_letter: unroutable.map(|error| error.to_string()),
                    refused: None,
                    state: RowState::Sending,
                }
            })
            .collect();
        Batch {
            number,
            table,
            rows,
            stamp,
            last_tries_sent: false,
        }
    }

    /// The rows' sequence numbers.
    pub fn seqs(&self) -> Vec<i64> {
        self.rows.iter().map(|r| r.row.seq).collect()
    }

    /// Exactly once: the lowest sequence number of a row a relay may have
    /// sent before, if any is.
    pub fn lowest_in_doubt(&self) -> Option<i64> {
        self.rows
            .iter()
            .filter(|r| r.row.in_doubt)
            .map(|r| r.row.seq)
            .min()
    }

    /// Every row's record, to hand to the publisher.
    pub fn outgoing(&self) -> Vec<Outgoing<RowTag>> {
        (0..self.rows.len()).map(|i| self.outgoing_of(i)).collect()
    }

    fn outgoing_of(&self, index: usize) -> Outgoing<RowTag> {
        let row = &self.rows[index];
        Outgoing {
            record: row.record.clone(),
            tag: RowTag {
                batch: self.number,
                index,
            },
            // Only a row in doubt is looked for in its partition.
            position: (self.stamp.is_some() && row.row.in_doubt).then(|| position_of(row.row.seq)),
            dead_letter: row.dead_letter.is_some(),
        }
    }

    /// When a row was created, for its insert-to-ack latency.
    pub fn created(&self, tag: RowTag) -> PgTimestamp {
        self.rows[tag.index].row.created
    }

    /// Applies what became of records; true if any row settled. Records to
    /// send instead (a refused record's dead letter) are returned.
    pub fn apply(
        &mut self,
        outcome: Outcome<RowTag>,
        dead_letter_topic: &str,
    ) -> (bool, Option<Outgoing<RowTag>>) {
        let tag = RowTag::of(&outcome);
        if tag.batch != self.number || self.rows[tag.index].state != RowState::Sending {
            return (false, None); // of a batch given up on
        }
        let (tag, state) = match outcome {
            Outcome::Delivered {
                tag, dead_letter, ..
            } => {
                if dead_letter && self.rows[tag.index].dead_letter.is_none() {
                    self.rows[tag.index].dead_letter = Some("the broker refused the record".into());
                }
                (tag, RowState::Published)
            }
            Outcome::Refused {
                tag,
                record,
                error,
                kind,
                dead_letter: false,
            } => {
                // The broker will never take it: it is kept whole in the
                // dead-letter table when the batch settles, and its notice
                // goes to the dead-letter topic.
                let RefusedRecord { letter, notice } = crate::publish::refused(
                    dead_letter_topic,
                    self.event_key(tag.index),
                    record,
                    error.message.clone(),
                    kind,
                );
                let row = &mut self.rows[tag.index];
                row.refused = Some(letter);
                row.record = notice;
                row.dead_letter = Some(error.message);
                return (false, Some(self.outgoing_of(tag.index)));
            }
            // A dead letter (or notice) the broker refused too: the row is
            // kept whole in the dead-letter table, and moves on rather than
            // wedge its aggregate.
            Outcome::Refused {
                tag,
                record,
                error,
                kind,
                ..
            } => {
                tracing::error!(seq = self.rows[tag.index].row.seq, reason = %error, "the dead-letter topic refused a row's dead letter; the row is kept in the dead-letter table");
                if self.rows[tag.index].refused.is_none() {
                    let key = self.event_key(tag.index);
                    self.rows[tag.index].refused = Some(DeadLetter {
                        event_key: key,
                        record,
                        kind: kind.as_str().to_owned(),
                        error: error.message,
                    });
                }
                (tag, RowState::Published)
            }
            Outcome::Failed { tag, error } => (tag, RowState::Failed { error }),
            Outcome::Skipped { tag } => (tag, RowState::Published),
        };
        self.rows[tag.index].state = state;
        (true, None)
    }

    /// Where a row came from, for the dead-letter table.
    fn event_key(&self, index: usize) -> String {
        format!("poll/{}/{}", self.table.name(), self.rows[index].row.seq)
    }

    /// Rows still on their way.
    pub fn sending(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| r.state == RowState::Sending)
            .count()
    }

    /// Bytes of the records still on their way.
    pub fn sending_bytes(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| r.state == RowState::Sending)
            .map(|r| r.record.size())
            .sum()
    }

    /// Rows that failed their last attempt go to the dead-letter topic,
    /// once: their records, to hand to the publisher.
    pub fn last_tries(
        &mut self,
        max_attempts: u32,
        dead_letter_topic: &str,
    ) -> Vec<Outgoing<RowTag>> {
        if self.last_tries_sent {
            return Vec::new();
        }
        self.last_tries_sent = true;
        let mut out = Vec::new();
        for i in 0..self.rows.len() {
            let row = &mut self.rows[i];
            let RowState::Failed { error } = &row.state else {
                continue;
            };
            if row.row.attempts as u32 + 1 < max_attempts {
                continue;
            }
            let reason = format!("failed {} times; last error: {error}", row.row.attempts + 1);
            tracing::warn!(seq = row.row.seq, %reason, "row out of attempts: sending it to the dead-letter topic");
            metrics::counter!(m::DEAD_LETTERS_TOTAL, "kind" => "max_attempts").increment(1);
            row.record = crate::router::broker_dead_letter(
                dead_letter_topic,
                &row.record,
                &reason,
                "max_attempts",
                true,
            );
            row.dead_letter = Some(reason);
            row.state = RowState::Sending;
            out.push(self.outgoing_of(i));
        }
        out
    }

    /// What to write back: published rows go (or are marked), failed rows
    /// count an attempt and wait.
    pub fn settlement(&self, max_backoff: Duration) -> Settlement {
        let mut settlement = Settlement {
            published: Vec::new(),
            failed: Vec::new(),
            dead_letters: Vec::new(),
        };
        for row in &self.rows {
            settlement.dead_letters.extend(row.refused.clone());
            match &row.state {
                RowState::Published => settlement.published.push(PublishedRow {
                    seq: row.row.seq,
                    row_id: row.row.row_id.clone(),
                    dead_letter: row.dead_letter.clone(),
                }),
                RowState::Failed { error } => {
                    metrics::counter!(m::POLL_ROW_FAILURES_TOTAL).increment(1);
                    settlement.failed.push(FailedRow {
                        seq: row.row.seq,
                        aggregate: row.row.aggregate.clone(),
                        error: error.clone(),
                        retry_in: backoff(row.row.attempts as u32 + 2, max_backoff),
                    });
                }
                RowState::Sending => unreachable!("a batch settles once every row did"),
            }
        }
        settlement
    }
}
