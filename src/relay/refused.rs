//! Events the broker refused for good, on their way into the dead-letter
//! table: each is stored (tried again until PostgreSQL takes it; the event
//! stays unconfirmed meanwhile), and then its notice goes to the
//! dead-letter topic.

use std::rc::Rc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::dead_letters::{DeadLetter, DeadLetterStore};
use crate::publish::LocalBoxFuture;
use crate::record::KafkaRecord;

pub(super) struct Refused<T> {
    store: Rc<dyn DeadLetterStore>,
    max_backoff: Duration,
    /// Each yields the event's tag and its notice once stored.
    storing: FuturesUnordered<LocalBoxFuture<(T, KafkaRecord)>>,
}

impl<T: 'static> Refused<T> {
    pub(super) fn new(store: Rc<dyn DeadLetterStore>, max_backoff: Duration) -> Self {
        Refused {
            store,
            max_backoff,
            storing: FuturesUnordered::new(),
        }
    }

    pub(super) fn set_store(&mut self, store: Rc<dyn DeadLetterStore>) {
        self.store = store;
    }

    /// Keeps `letter` whole; `notice` is handed back once it is stored.
    pub(super) fn keep(&mut self, tag: T, letter: DeadLetter, notice: KafkaRecord) {
        let store = Rc::clone(&self.store);
        let max_backoff = self.max_backoff;
        self.storing.push(Box::pin(async move {
            let mut attempt = 0;
            loop {
                match store.store(letter.clone()).await {
                    Ok(()) => {
                        tracing::warn!(key = %letter.event_key, kind = %letter.kind, "the broker refused an event for good: kept whole in the dead-letter table");
                        return (tag, notice);
                    }
                    Err(error) => {
                        attempt += 1;
                        let wait = crate::publish::backoff(attempt, max_backoff);
                        tracing::error!(%error, retry_in = ?wait, "cannot store a refused event in the dead-letter table; trying again (it stays unconfirmed meanwhile)");
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }));
    }

    /// The next stored event and its notice; never while none is stored.
    /// Cancel-safe.
    pub(super) async fn next(&mut self) -> (T, KafkaRecord) {
        match self.storing.next().await {
            Some(stored) => stored,
            None => std::future::pending().await,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.storing.is_empty()
    }

    /// Forgets the events being stored (they will be read again).
    pub(super) fn clear(&mut self) -> usize {
        let dropped = self.storing.len();
        self.storing.clear();
        dropped
    }
}
