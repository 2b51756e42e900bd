//! `walrelay backfill` and `walrelay recover`: `run`'s connection and
//! routing flags, and their own.

use clap::Args;

use super::UsageError;
use super::run_args::RunArgs;
use crate::replay::backfill::BackfillOptions;
use crate::replay::recover::RecoverOptions;

#[derive(Debug, Args)]
pub struct BackfillArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// The backfill's name: its progress is kept under it in
    /// public.walrelay_backfill, and a second run of the same name resumes.
    #[arg(long, env = "WALRELAY_BACKFILL_NAME", default_value = "backfill")]
    pub name: String,
    /// Rows created at or after this time (an ISO 8601 timestamp).
    #[arg(long, env = "WALRELAY_BACKFILL_SINCE")]
    pub since: Option<String>,
    /// Rows created before this time.
    #[arg(long, env = "WALRELAY_BACKFILL_UNTIL")]
    pub until: Option<String>,
    /// An SQL predicate over the outbox table's columns, as alias `t`
    /// or bare names: `aggregate_type = 'order'`.
    #[arg(long = "where", env = "WALRELAY_BACKFILL_WHERE")]
    pub predicate: Option<String>,
    /// Rows read and sent per page; progress is written after each.
    #[arg(long, env = "WALRELAY_BACKFILL_PAGE_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub page_size: i64,
    /// Send everything again although a backfill of this name finished.
    #[arg(long, env = "WALRELAY_BACKFILL_RESTART")]
    pub restart: bool,
}

impl BackfillArgs {
    pub fn options(&self) -> Result<BackfillOptions, UsageError> {
        let poll = self.run.poll_config()?;
        if self.name.is_empty() || self.name.contains('/') {
            return Err(UsageError(format!(
                "--name {:?}: give a non-empty name without '/'",
                self.name
            )));
        }
        Ok(BackfillOptions {
            pg: poll.pg,
            router: poll.router,
            kafka: self.run.sink_settings()?,
            exactly_once: poll.delivery.is_exactly_once(),
            name: self.name.clone(),
            selection: crate::replay::rows_selection(
                self.since.clone(),
                self.until.clone(),
                self.predicate.clone(),
            ),
            page_size: self.page_size,
            restart: self.restart,
            dead_letter_table: self.run.outbox.dead_letter_table()?,
            primary: self.run.primary.connection_config()?,
        })
    }
}

#[derive(Debug, Args)]
pub struct RecoverArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Only rows created at or after this time are candidates (when older
    /// rows are surely in Kafka and their topics are long).
    #[arg(long, env = "WALRELAY_RECOVER_SINCE")]
    pub since: Option<String>,
    /// Go on although events whose rows were deleted cannot be recovered.
    #[arg(long, env = "WALRELAY_ACCEPT_LOSS")]
    pub accept_loss: bool,
    /// There was no slot before: the outbox was published by a polling
    /// relay, now stopped. Makes the slot and publishes every row of its
    /// snapshot whose id is not in Kafka yet.
    #[arg(
        long,
        env = "WALRELAY_RECOVER_FIRST_SLOT",
        conflicts_with = "accept_loss"
    )]
    pub first_slot: bool,
}

impl RecoverArgs {
    pub fn options(&self) -> Result<RecoverOptions, UsageError> {
        let poll = self.run.poll_config()?;
        Ok(RecoverOptions {
            pg: poll.pg,
            router: poll.router,
            kafka: self.run.sink_settings()?,
            exactly_once: poll.delivery.is_exactly_once(),
            slot: self.run.outbox.slot.clone(),
            since: self.since.clone(),
            accept_loss: self.accept_loss,
            publication: self.run.outbox.publication.clone(),
            dead_letter_table: self.run.outbox.dead_letter_table()?,
            first_slot: self.first_slot,
            primary: self.run.primary.connection_config()?,
        })
    }
}
