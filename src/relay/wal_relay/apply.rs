//! Applying the stream: each item a session yields (a transaction's begin
//! and commit, an insert or a logical message routed and handed to the
//! publisher, our own heartbeat, a keepalive) becomes tickets in the ack
//! tracker and records on their way, in stream order, so the watermark
//! never passes an event that is not in Kafka.

use futures_util::FutureExt;

use super::super::error::RelayError;
use super::super::link::Link;
use super::super::session::{Connector, WalItem};
use super::{ApplyingTxn, WalRelay};
use crate::publish::Sink;
use crate::router::{Routed, Router};

/// Items of the stream applied in one turn of the loop, at most, when
/// they are already received.
const READY_BATCH: usize = 256;

impl<C: Connector, S: Sink> WalRelay<C, S> {
    /// Applies an item of the stream, then those already received behind
    /// it (as many as the window takes, up to a batch): one turn of the
    /// loop for what one read of the socket brought.
    pub(super) async fn apply_ready(
        &mut self,
        item: WalItem,
        link: &mut Link<C::Stream>,
    ) -> Result<(), RelayError> {
        self.apply(item, link).await?;
        for _ in 0..READY_BATCH {
            if !self.out.takes_more() {
                break;
            }
            let Link::Streaming(session) = link else {
                break;
            };
            match session.next().now_or_never() {
                Some(Ok(item)) => self.apply(item, link).await?,
                Some(Err(error)) => return Err(error),
                None => break,
            }
        }
        Ok(())
    }

    /// Applies one item of the stream.
    async fn apply(&mut self, item: WalItem, link: &mut Link<C::Stream>) -> Result<(), RelayError> {
        match item {
            WalItem::Begin { commit_time, .. } => {
                self.open = Some(ApplyingTxn {
                    ticket: self.confirmer.begin(),
                    commit_time,
                    heartbeat_emitted_at: None,
                });
                self.transactions.increment(1);
            }
            WalItem::Commit { end_lsn } => {
                let txn = self
                    .open
                    .take()
                    .expect("the session pairs Begin and Commit");
                self.confirmer
                    .commit(txn.ticket, end_lsn, txn.heartbeat_emitted_at)?;
            }
            WalItem::Insert {
                relation,
                tuple,
                ctx,
                position,
            } => {
                let txn = self
                    .open
                    .as_ref()
                    .expect("the session checks inserts are in a transaction");
                let (ticket, commit_time) = (txn.ticket, txn.commit_time);
                let routed = self.router().route_insert(&relation, &tuple.columns, ctx);
                self.out
                    .publish(routed, ticket, commit_time, position, &mut self.confirmer)?;
            }
            WalItem::Message {
                message,
                ctx,
                in_transaction,
                position,
            } => {
                if message.prefix == self.config.heartbeat_prefix {
                    // Our own heartbeat: never published. Its transaction
                    // has no events, so it is confirmed as soon as
                    // everything before it is, which measures latency.
                    if let (Some(txn), true) = (self.open.as_mut(), in_transaction) {
                        txn.heartbeat_emitted_at =
                            super::super::heartbeat::emitted_at(&message.content);
                    }
                    return Ok(());
                }
                let routed = self.router().route_message(&message, ctx);
                if routed == Routed::Ignored {
                    return Ok(());
                }
                match self.open.as_ref() {
                    Some(txn) if in_transaction => {
                        let (ticket, commit_time) = (txn.ticket, txn.commit_time);
                        self.out.publish(
                            routed,
                            ticket,
                            commit_time,
                            position,
                            &mut self.confirmer,
                        )?;
                    }
                    _ => {
                        // A non-transactional message stands alone in the
                        // stream: it gets a transaction of its own in the
                        // tracker, ending at its LSN, so it is confirmed in
                        // stream order.
                        let ticket = self.confirmer.begin();
                        self.out.publish(
                            routed,
                            ticket,
                            ctx.commit_time,
                            position,
                            &mut self.confirmer,
                        )?;
                        self.confirmer.commit(ticket, message.lsn, None)?;
                    }
                }
            }
            WalItem::Keepalive {
                wal_end,
                reply_requested,
            } => {
                self.confirmer.server_idle_at(wal_end);
                if reply_requested {
                    self.send_feedback(link, false).await?;
                }
            }
            WalItem::Other => {}
        }
        Ok(())
    }

    fn router(&self) -> &Router {
        self.router
            .as_ref()
            .expect("the router is built when the first session starts")
    }
}
