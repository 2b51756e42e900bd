//! A lane's database work in flight, each piece bounded by
//! [`LANE_WORK_TIMEOUT`], and what it finished with.

use std::future::Future;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};

use super::PollError;
use super::claim::Claim;
use super::store::Connected;
use crate::publish::LocalBoxFuture;
use crate::sql::{SqlCause, SqlError};

/// Longest a lane's work (connect, claim, note, settle) may wait on
/// PostgreSQL: a server that froze while its host still answers TCP would
/// otherwise hold the lane for good. The lane then connects again.
pub const LANE_WORK_TIMEOUT: Duration = Duration::from_secs(60);

pub enum Done<C> {
    Connected(Connected<C>),
    Claimed(Claim),
    Marked,
    Settled,
}

impl<C> Done<C> {
    /// What finished, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Done::Connected(_) => "connect",
            Done::Claimed(_) => "claim",
            Done::Marked => "in-flight note",
            Done::Settled => "settle",
        }
    }
}

/// A lane's work, finished: the lane, and what came of it.
type Finished<C> = (usize, Result<Done<C>, PollError>);

/// The lanes' work under way.
pub struct LaneWork<C> {
    /// The server, for the timeout's error.
    address: String,
    work: FuturesUnordered<LocalBoxFuture<Finished<C>>>,
}

impl<C: 'static> LaneWork<C> {
    pub fn new(address: String) -> Self {
        LaneWork {
            address,
            work: FuturesUnordered::new(),
        }
    }

    /// Runs `work` for lane `index`.
    pub fn push(
        &mut self,
        index: usize,
        work: impl Future<Output = Result<Done<C>, PollError>> + 'static,
    ) {
        let address = self.address.clone();
        self.work.push(Box::pin(async move {
            let done = tokio::time::timeout(LANE_WORK_TIMEOUT, work)
                .await
                .unwrap_or_else(|_| {
                    Err(SqlError::new(
                        &address,
                        SqlCause::Os(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("PostgreSQL answered nothing for {LANE_WORK_TIMEOUT:?}"),
                        )),
                    )
                    .into())
                });
            (index, done)
        }));
    }

    pub fn is_empty(&self) -> bool {
        self.work.is_empty()
    }

    /// The next piece of work to finish, and its lane.
    pub async fn next(&mut self) -> Option<Finished<C>> {
        self.work.next().await
    }
}
