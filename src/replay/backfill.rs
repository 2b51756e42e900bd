//! `walrelay backfill`: rows of the outbox table sent again, as the
//! stream's records, to the usual topics or to topics of their own.
//!
//! Resumable: after each page is in Kafka its last row is written down
//! (`state.rs`); a run that dies resumes after it, and first reads back,
//! from the moment its unfinished page started going out, which of that
//! page's records are in Kafka already (by `id`, among records of this
//! backfill's own origin, `read_committed`), and skips them. So each row
//! goes out once, and an aggregate's rows stay in order.

use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::ReplayError;
use super::rows::{After, Selection, TableReader, stamp};
use super::send::Sender;
use super::state::{self, Progress};
use crate::kafka::{KafkaSink, SinkSettings};
use crate::postgres::ConnectionConfig;
use crate::publish::Origin;
use crate::router::{Router, RouterConfig};
use crate::sql::{self, SqlClient};

/// A record's timestamp is its producer's clock when it was sent; reading
/// back starts this much before a page started, for the clock's jitter.
const READ_BACK_MARGIN_MS: i64 = 60_000;

/// Everything `backfill` needs, validated.
pub struct BackfillOptions {
    pub pg: ConnectionConfig,
    pub router: RouterConfig,
    pub kafka: SinkSettings,
    pub exactly_once: bool,
    /// The job's name: its progress row, origin and transactional id.
    pub name: String,
    pub selection: Selection,
    pub page_size: i64,
    /// Start over although a backfill of this name finished.
    pub restart: bool,
    /// Where the stream keeps events Kafka refused for good: passed over.
    pub dead_letter_table: (String, String),
    /// `--primary-url`: where the progress is kept when `pg` is a standby.
    pub primary: Option<crate::postgres::ConnectionConfig>,
}

/// What a backfill did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub sent: i64,
    pub skipped: i64,
}

pub async fn run(options: BackfillOptions) -> Result<Summary, ReplayError> {
    let client = sql::connect(&options.pg).await?;
    // On a standby the rows are read there and the progress is kept on
    // the primary.
    let primary = crate::standby::primary_for(
        &client,
        options.primary.as_ref(),
        "backfill keeps its progress on the primary",
    )
    .await
    .map_err(|e| ReplayError::Refused(e.to_string()))?;
    let writer = primary.as_ref().unwrap_or(&client);
    state::ensure_table(writer).await?;
    let system_id = system_identifier(&client).await?;
    let router = Router::new(options.router.clone(), system_id.clone());
    let mut summary = Summary::default();
    let sink = KafkaSink::new(&options.kafka).map_err(|e| ReplayError::Kafka(e.to_string()))?;
    let origin = Origin {
        system_id,
        slot: format!("backfill:{}", options.name),
        timeline: 0,
    };
    let origin_text = origin.to_string();
    let mut sender = Sender::new(
        sink,
        &options.router.dead_letter_topic,
        options.exactly_once,
        origin,
        options
            .exactly_once
            .then(|| format!("walrelay-backfill-{}", options.name)),
    );
    let producer = options
        .kafka
        .producer
        .client_config()
        .map_err(ReplayError::Kafka)?;
    for (schema, table) in &options.router.tables {
        let key = format!("{}/{schema}.{table}", options.name);
        let reader = TableReader::load(
            &client,
            schema,
            table,
            &options.router.columns,
            options.selection.clone(),
        )
        .await?;
        let selection = format!(
            "{:?} to {}",
            options.selection, options.router.topic_template
        );
        let mut progress = match state::load(writer, &key).await? {
            Some(p) if !p.selection.is_empty() && p.selection != selection && !options.restart => {
                return Err(ReplayError::Refused(format!(
                    "a backfill named {key} of other rows is recorded ({}); this one asks for {selection}: give it a --name of its own, or pass --restart to start that name over",
                    p.selection
                )));
            }
            Some(p) if p.done && !options.restart => {
                println!(
                    "backfill {key} finished before ({} sent): nothing to do (--restart sends everything again)",
                    p.sent
                );
                continue;
            }
            Some(p) if !p.done && !options.restart => p,
            _ => Progress::default(),
        };
        progress.selection = selection;
        // A run that died mid-page: its records since then are read back.
        let resumed_from = progress.page_started_ms;
        let mut read_topics: HashSet<String> = HashSet::new();
        let mut in_kafka: HashSet<String> = HashSet::new();
        let total =
            progress.sent + progress.skipped + reader.count(&client, &progress.after).await?;
        let bar = Bar::new(&key, total);
        loop {
            let page = reader
                .page(&client, &router, &progress.after, options.page_size)
                .await?;
            let Some(last) = page.last() else { break };
            let last_after = After {
                created_at: Some(last.created_at.clone()),
                id: Some(last.id.clone()),
            };
            if let Some(since) = resumed_from {
                let topics: Vec<String> = page
                    .iter()
                    .map(|r| r.record.topic.clone())
                    .filter(|t| !read_topics.contains(t))
                    .collect::<HashSet<_>>()
                    .into_iter()
                    .collect();
                if !topics.is_empty() {
                    let (producer, origin) = (producer.clone(), origin_text.clone());
                    let found = tokio::task::spawn_blocking(move || {
                        super::ids::ids_since(
                            &producer,
                            &topics,
                            since - READ_BACK_MARGIN_MS,
                            Some(&origin),
                        )
                        .map(|ids| (topics, ids))
                    })
                    .await
                    .map_err(|e| ReplayError::Kafka(e.to_string()))?
                    .map_err(|e| {
                        ReplayError::Kafka(format!(
                            "cannot read back what the previous run sent ({e}): is the broker up? run again once it is"
                        ))
                    })?;
                    read_topics.extend(found.0);
                    in_kafka.extend(found.1);
                }
            }
            progress.page_started_ms = Some(now_ms());
            state::save(writer, &key, &progress).await?;
            let origin_bytes = Bytes::from(origin_text.clone());
            let mut records = Vec::with_capacity(page.len());
            let dead_lettered =
                crate::dead_letters::ids(&client, &options.dead_letter_table).await?;
            for mut row in page {
                if in_kafka.contains(&row.id) || dead_lettered.contains(&row.id) {
                    progress.skipped += 1;
                    metrics::counter!(super::EVENTS_REPLAY_SKIPPED_TOTAL, "job" => "backfill")
                        .increment(1);
                    continue;
                }
                stamp(&mut row.record, &origin_bytes, row.created_micros as u64);
                records.push((row.record, row.dead_letter));
            }
            let n = records.len() as i64;
            sender.send_all(records).await?;
            metrics::counter!(super::EVENTS_REPLAYED_TOTAL, "job" => "backfill")
                .increment(n as u64);
            progress.sent += n;
            progress.after = last_after;
            state::save(writer, &key, &progress).await?;
            metrics::gauge!(super::REPLAY_REMAINING, "job" => "backfill")
                .set((total - progress.sent - progress.skipped).max(0) as f64);
            bar.show(progress.sent + progress.skipped);
        }
        progress.done = true;
        progress.page_started_ms = None;
        state::save(writer, &key, &progress).await?;
        bar.finish();
        println!(
            "backfill {key}: {} events sent, {} found already in Kafka",
            progress.sent, progress.skipped
        );
        summary.sent += progress.sent;
        summary.skipped += progress.skipped;
    }
    Ok(summary)
}

pub async fn system_identifier(client: &SqlClient) -> Result<String, ReplayError> {
    let row = client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A one-line progress bar on a terminal (stderr); nothing otherwise.
pub struct Bar {
    label: String,
    total: i64,
    on: bool,
}

impl Bar {
    pub fn new(label: &str, total: i64) -> Self {
        Bar {
            label: label.to_owned(),
            total,
            on: std::io::stderr().is_terminal(),
        }
    }

    pub fn show(&self, done: i64) {
        if !self.on {
            return;
        }
        let total = self.total.max(done).max(1);
        let width = 30;
        let filled = (done * width / total) as usize;
        eprint!(
            "\r{} [{}{}] {done}/{total}",
            self.label,
            "#".repeat(filled),
            " ".repeat(width as usize - filled)
        );
        let _ = std::io::stderr().flush();
    }

    pub fn finish(&self) {
        if self.on {
            eprintln!();
        }
    }
}
