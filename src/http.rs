//! The HTTP server: `/metrics` (Prometheus text), `/healthz` (process
//! alive), `/readyz` (streaming and the broker reachable; with
//! `?standby=ready` a relay standing by counts as ready too, for
//! Kubernetes: see deploy/kubernetes/poddisruptionbudget.yaml), `/api/status`
//! (the dashboard's current values), `/api/history` (its hour of samples)
//! and `/`, the live dashboard.
//!
//! The page and its charting library ([uPlot](https://github.com/leeoniya/uPlot),
//! MIT, vendored under `src/dashboard/vendor/` with its license) are
//! compiled into the binary: the dashboard needs no network but the
//! process's own.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;

use crate::live::{self, LiveState, Subject};
use crate::publish::DeliveryGuarantee;
use crate::shutdown::Shutdown;

/// The page and what it loads, by path.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("dashboard/index.html"),
    ),
    (
        "/assets/dashboard.js",
        "text/javascript; charset=utf-8",
        include_str!("dashboard/dashboard.js"),
    ),
    (
        "/assets/dashboard.css",
        "text/css; charset=utf-8",
        include_str!("dashboard/dashboard.css"),
    ),
    (
        "/assets/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!("dashboard/vendor/uPlot.iife.min.js"),
    ),
    (
        "/assets/uPlot.min.css",
        "text/css; charset=utf-8",
        include_str!("dashboard/vendor/uPlot.min.css"),
    ),
    (
        "/assets/uPlot.LICENSE.txt",
        "text/plain; charset=utf-8",
        include_str!("dashboard/vendor/uPlot.LICENSE"),
    ),
];

/// The `reason`s of `walrelay_partitions_at_least_once_total` a partition
/// scan gives: `ScanEnd::reason` and an unreadable tail.
const SCAN_FALLBACK_REASONS: [&str; 5] = [
    "lookback",
    "truncated",
    "open_transaction",
    "disorder",
    "unreadable",
];

/// Buckets of the latency histograms (seconds).
/// How often recorded histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    live: Arc<LiveState>,
    subject: Arc<Subject>,
    started_ms: u64,
}

/// Installs the Prometheus recorder and describes every metric.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let mut builder = PrometheusBuilder::new();
    for name in [
        crate::metrics::COMMIT_TO_ACK_SECONDS,
        crate::metrics::KAFKA_COMMIT_SECONDS,
        crate::metrics::INBOX_PRODUCED_TO_STORED_SECONDS,
        crate::metrics::POLL_CLAIM_SECONDS,
        crate::metrics::POLL_SETTLE_SECONDS,
        // Buckets, not a summary's quantiles: quantiles cannot be summed
        // across pods.
        crate::metrics::PARTITION_RECOVERY_SECONDS,
        crate::metrics::INBOX_BATCH_SECONDS,
    ] {
        builder =
            builder.set_buckets_for_metric(Matcher::Full(name.to_owned()), LATENCY_BUCKETS)?;
    }
    let handle = builder.install_recorder()?;
    crate::metrics::describe();
    // Export the gauges from the start, so dashboards see them at zero.
    metrics::gauge!(crate::metrics::REPLICATION_CONNECTED).set(0.0);
    metrics::gauge!(crate::metrics::EVENTS_IN_FLIGHT).set(0.0);
    metrics::gauge!(crate::metrics::IN_FLIGHT_BYTES).set(0.0);
    metrics::gauge!(crate::metrics::CONFIRMED_LSN).set(0.0);
    metrics::gauge!(crate::metrics::WAITING_FOR_BROKER).set(0.0);
    metrics::counter!(crate::metrics::RECONNECTS_TOTAL).absolute(0);
    metrics::counter!(crate::metrics::MONITOR_ERRORS_TOTAL).absolute(0);
    metrics::counter!(crate::metrics::EVENTS_SKIPPED_TOTAL).absolute(0);
    metrics::counter!(crate::metrics::PARTITION_RECOVERIES_TOTAL).absolute(0);
    Ok(handle)
}

/// Serves the endpoints on `listener` and takes the dashboard's samples,
/// until `shutdown`. What `/readyz` reports of the broker is the source's
/// to set (`LiveState::set_broker_reachable`); this only serves it.
pub fn spawn(
    listener: tokio::net::TcpListener,
    metrics: PrometheusHandle,
    live: Arc<LiveState>,
    subject: Subject,
    shutdown: Shutdown,
) {
    export_subject(live.source(), &subject);
    live::spawn_sampler(Arc::clone(&live), shutdown.clone());
    spawn_upkeep(metrics.clone(), shutdown.clone());
    let app = router(AppState {
        metrics,
        live,
        subject: Arc::new(subject),
        started_ms: live::unix_ms(),
    });
    let mut shutdown = shutdown;
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
}

/// The process's fixed facts as metrics: what it is, and its limits.
fn export_subject(source: live::Source, subject: &Subject) {
    let label = match source {
        live::Source::Wal => "wal",
        live::Source::Poll => "poll",
        live::Source::Inbox => "inbox",
    };
    metrics::gauge!(crate::metrics::INFO, "source" => label, "delivery" => subject.delivery, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // Counters with labels exist from the start at zero, for each label
    // value they take, so a scrape shows every series the dashboards use.
    use crate::metrics as m;
    match source {
        // The inbox exports its own (`inbox::counters`), from its command.
        live::Source::Inbox => {}
        live::Source::Wal | live::Source::Poll => {
            let kinds: &[&str] = if source == live::Source::Poll {
                metrics::counter!(m::POLL_BATCHES_TOTAL).absolute(0);
                metrics::counter!(m::POLL_ROW_FAILURES_TOTAL).absolute(0);
                &["unroutable", "broker_rejected", "max_attempts"]
            } else {
                &["unroutable", "broker_rejected"]
            };
            for &kind in kinds {
                metrics::counter!(m::DEAD_LETTERS_TOTAL, "kind" => kind).absolute(0);
            }
            for kind in ["metadata", "topic", "dead_letter_rejected", "delivery"] {
                metrics::counter!(m::PUBLISH_ERRORS_TOTAL, "kind" => kind).absolute(0);
            }
            // From zero, so the first fallback is an increase() that
            // WalrelayExactlyOnceFallback sees (a series born at 1 is not).
            if subject.delivery == DeliveryGuarantee::ExactlyOnce.as_str() {
                let claim: &[&str] = if source == live::Source::Poll {
                    &["claim_lost"]
                } else {
                    &[]
                };
                for &reason in SCAN_FALLBACK_REASONS.iter().chain(claim) {
                    metrics::counter!(m::PARTITIONS_AT_LEAST_ONCE_TOTAL, "reason" => reason)
                        .absolute(0);
                }
            }
        }
    }
    if let Some(events) = subject.max_in_flight_events {
        metrics::gauge!(crate::metrics::IN_FLIGHT_LIMIT_EVENTS).set(events as f64);
    }
    if let Some(bytes) = subject.max_in_flight_bytes {
        metrics::gauge!(crate::metrics::IN_FLIGHT_LIMIT_BYTES).set(bytes as f64);
    }
}

fn router(state: AppState) -> Router {
    let mut router = Router::new();
    for &(path, content_type, body) in ASSETS {
        router = router.route(
            path,
            get(move || async move { ([(header::CONTENT_TYPE, content_type)], body) }),
        );
    }
    router
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/status", get(api_status))
        .route("/api/history", get(api_history))
        .with_state(state)
}

/// Drains the histograms' recorded samples into their buckets every few
/// seconds. The recorder keeps every sample until an upkeep, and without
/// one nothing but a scrape of `/metrics` would drain them: a relay nobody
/// scrapes grew by about 12 bytes per event (37 MiB over 3,000,000 events).
fn spawn_upkeep(metrics: PrometheusHandle, mut shutdown: Shutdown) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while shutdown.unless(tick.tick()).await.is_some() {
            metrics.run_upkeep();
        }
    });
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    state.metrics.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// `/readyz`'s query: `standby=ready` counts a relay standing by as ready.
#[derive(serde::Deserialize)]
struct ReadyQuery {
    standby: Option<String>,
}

async fn readyz(State(state): State<AppState>, Query(query): Query<ReadyQuery>) -> Response {
    let streaming = state.live.connected();
    let broker = state.live.counters.broker_reachable.load(Ordering::Relaxed);
    // A standby is a working member of a pair: counting it as ready lets a
    // PodDisruptionBudget allow one eviction of two, either pod.
    let standing_by =
        query.standby.as_deref() == Some("ready") && state.live.role() == live::Role::Standby;
    let ready = (streaming && broker) || standing_by;
    let body = json!({
        "ready": ready,
        "role": state.live.role(),
        "streaming": streaming,
        "reason": state.live.reason(),
        "waiting_for_broker": state.live.waiting_for_broker(),
        "broker_reachable": broker,
        "host": state.live.host(),
        "slot": state.subject.name,
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn api_status(State(state): State<AppState>) -> Response {
    let s = &state.live;
    let c = &s.counters;
    let transitions = s.history.transitions();
    Json(json!({
        "source": s.source(),
        "subject": *state.subject,
        "started_unix_ms": state.started_ms,
        "now_unix_ms": live::unix_ms(),
        "state": s.state(),
        "state_since_unix_ms": transitions.last().map(|t| t.unix_ms),
        "backlog": s.backlog(),
        "consumer_lag": s.consumer_lag(),
        "inbox": s.inbox(),
        "slot_name": state.subject.name,
        "delivery": state.subject.delivery,
        "events_skipped": c.events_skipped.load(Ordering::Relaxed),
        "slot": s.slot(),
        "max_slot_wal_keep_size_bytes": s.wal_keep_limit(),
        "streaming": s.connected(),
        "reason": s.reason(),
        "waiting_for_broker": s.waiting_for_broker(),
        "held_partitions": s.held_partitions.get(),
        "host": s.host(),
        "role": s.role(),
        "broker_reachable": c.broker_reachable.load(Ordering::Relaxed),
        "confirmed_lsn": s.confirmed().to_string(),
        "events_published": c.events_delivered.load(Ordering::Relaxed),
        "dead_letters": c.dead_letters.load(Ordering::Relaxed),
        "in_flight": c.in_flight.load(Ordering::Relaxed),
        "in_flight_bytes": c.in_flight_bytes.load(Ordering::Relaxed),
        "reconnects": c.reconnects.load(Ordering::Relaxed),
        "monitor_errors": c.monitor_errors.load(Ordering::Relaxed),
        "last_ack_unix_ms": s.last_ack_unix_micros() / 1000,
        "p50_commit_to_ack_ms": s.latency.quantile(0.5).map(|v| v * 1000.0),
        "p99_commit_to_ack_ms": s.latency.quantile(0.99).map(|v| v * 1000.0),
        "last_error": s.last_error(),
        "errors": s.errors(),
        "commit_to_ack_since_start": {
            "count": s.latency_histogram.count(),
            "p50_ms": s.latency_histogram.quantile(0.5).map(|v| v * 1000.0),
            "p99_ms": s.latency_histogram.quantile(0.99).map(|v| v * 1000.0),
            "max_ms": s.latency_histogram.max_seconds() * 1000.0,
        },
        "history": {
            "samples": s.history.len(),
            "capacity": live::CAPACITY,
            "interval_ms": live::INTERVAL.as_millis() as u64,
            "heap_bytes": s.heap_bytes(),
        },
    }))
    .into_response()
}

/// `/api/history?since=<Unix ms>`: the samples taken after `since` (all of
/// them without it), as columns.
async fn api_history(State(state): State<AppState>, uri: Uri) -> Response {
    let since = uri
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("since="))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        state.live.history.to_json(state.live.source(), since),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::SCAN_FALLBACK_REASONS;
    use crate::publish::scan::ScanEnd;

    #[test]
    fn every_scan_fallback_reason_is_exported_from_zero() {
        for end in [
            ScanEnd::LookbackExceeded,
            ScanEnd::Truncated,
            ScanEnd::Hidden,
            ScanEnd::Disordered,
        ] {
            let reason = end.reason().unwrap();
            assert!(SCAN_FALLBACK_REASONS.contains(&reason), "{reason}");
        }
    }
}
