//! The HTTP server: `/metrics` (Prometheus text), `/healthz` (process
//! alive), `/readyz` (streaming and the broker reachable), `/api/status`
//! (the dashboard's data) and `/`, the live dashboard.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use serde_json::json;

use crate::kafka::ProducerSettings;
use crate::live::LiveState;

/// The page, self-contained: no CDN, so it works offline.
const DASHBOARD: &str = include_str!("dashboard.html");

/// How often the broker is probed for `/readyz`.
const BROKER_PROBE_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    live: Arc<LiveState>,
    slot: String,
    /// `exactly-once` or `at-least-once`.
    delivery: &'static str,
}

/// Installs the Prometheus recorder and describes every metric.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(crate::metrics::COMMIT_TO_ACK_SECONDS.to_owned()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ],
        )?
        .install_recorder()?;
    crate::metrics::describe();
    // Export the gauges from the start, so dashboards see them at zero.
    metrics::gauge!(crate::metrics::REPLICATION_CONNECTED).set(0.0);
    metrics::gauge!(crate::metrics::EVENTS_IN_FLIGHT).set(0.0);
    metrics::gauge!(crate::metrics::CONFIRMED_LSN).set(0.0);
    metrics::gauge!(crate::metrics::WAITING_FOR_BROKER).set(0.0);
    metrics::counter!(crate::metrics::RECONNECTS_TOTAL).absolute(0);
    metrics::counter!(crate::metrics::EVENTS_SKIPPED_TOTAL).absolute(0);
    metrics::counter!(crate::metrics::PARTITION_RECOVERIES_TOTAL).absolute(0);
    Ok(handle)
}

/// Serves the endpoints on `listener` and probes the broker in the background.
pub fn spawn(
    listener: tokio::net::TcpListener,
    metrics: PrometheusHandle,
    live: Arc<LiveState>,
    producer: ProducerSettings,
    slot: String,
    delivery: &'static str,
) -> anyhow::Result<()> {
    let config = producer.client_config().map_err(anyhow::Error::msg)?;
    let admin: Arc<AdminClient<DefaultClientContext>> = Arc::new(config.create()?);
    let probe_live = Arc::clone(&live);
    tokio::spawn(async move {
        loop {
            let admin = Arc::clone(&admin);
            let ok = tokio::task::spawn_blocking(move || {
                admin
                    .inner()
                    .fetch_metadata(None, Duration::from_secs(3))
                    .is_ok()
            })
            .await
            .unwrap_or(false);
            probe_live
                .counters
                .broker_reachable
                .store(ok, Ordering::Relaxed);
            tokio::time::sleep(BROKER_PROBE_INTERVAL).await;
        }
    });
    let app = router(AppState {
        metrics,
        live,
        slot,
        delivery,
    });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    Ok(())
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/status", get(api_status))
        .with_state(state)
}

async fn dashboard() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        DASHBOARD,
    )
        .into_response()
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

async fn readyz(State(state): State<AppState>) -> Response {
    let streaming = state.live.connected();
    let broker = state.live.counters.broker_reachable.load(Ordering::Relaxed);
    let body = json!({
        "ready": streaming && broker,
        "role": state.live.role(),
        "streaming": streaming,
        "reason": state.live.reason(),
        "waiting_for_broker": state.live.waiting_for_broker(),
        "broker_reachable": broker,
        "host": state.live.host(),
        "slot": state.slot,
    });
    let code = if streaming && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn api_status(State(state): State<AppState>) -> Response {
    let s = &state.live;
    let c = &s.counters;
    Json(json!({
        "source": s.source(),
        "backlog": s.backlog(),
        "consumer_lag": s.consumer_lag(),
        "inbox": s.inbox(),
        "slot_name": state.slot,
        "delivery": state.delivery,
        "events_skipped": c.events_skipped.load(Ordering::Relaxed),
        "slot": s.slot(),
        "streaming": s.connected(),
        "reason": s.reason(),
        "waiting_for_broker": s.waiting_for_broker(),
        "host": s.host(),
        "role": s.role(),
        "broker_reachable": c.broker_reachable.load(Ordering::Relaxed),
        "confirmed_lsn": s.confirmed().to_string(),
        "events_published": c.events_published.load(Ordering::Relaxed),
        "dead_letters": c.dead_letters.load(Ordering::Relaxed),
        "in_flight": c.in_flight.load(Ordering::Relaxed),
        "reconnects": c.reconnects.load(Ordering::Relaxed),
        "monitor_errors": c.monitor_errors.load(Ordering::Relaxed),
        "last_ack_unix_ms": s.last_ack_unix_micros() / 1000,
        "p50_commit_to_ack_ms": s.latency.quantile(0.5).map(|v| v * 1000.0),
        "p99_commit_to_ack_ms": s.latency.quantile(0.99).map(|v| v * 1000.0),
        "last_error": s.last_error(),
        "commit_to_ack_since_start": {
            "count": s.latency_histogram.count(),
            "p50_ms": s.latency_histogram.quantile(0.5).map(|v| v * 1000.0),
            "p99_ms": s.latency_histogram.quantile(0.99).map(|v| v * 1000.0),
            "max_ms": s.latency_histogram.max_seconds() * 1000.0,
        },
        "history": s.history.snapshot(),
    }))
    .into_response()
}
