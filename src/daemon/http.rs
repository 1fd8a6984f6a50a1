//! `/metrics` (Prometheus text) and `/healthz` (200 or 503 with the reason), served when
//! `WSRUNNER_METRICS_ADDR` is set. A paused runner (`ctl pause`) is healthy; `/healthz` says
//! it is paused and `/metrics` has `windshift_runner_paused 1`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::metrics::{Health, Metrics};

/// Binds `addr` and serves in the background; returns the bound address (port 0 picks one).
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .with_state(metrics);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("metrics server stopped: {e}");
        }
    });
    Ok(bound)
}

async fn metrics_text(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.render(),
    )
}

async fn healthz(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    match metrics.health() {
        // Paused is healthy (heartbeats go on); the body says so for humans and probes.
        Health::Healthy if metrics.paused() => (
            StatusCode::OK,
            "ok: paused (no new claims until `windshift-runner ctl resume`)\n".to_owned(),
        ),
        Health::Healthy => (StatusCode::OK, "ok\n".to_owned()),
        Health::Starting => (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: journal recovery not finished\n".to_owned(),
        ),
        Health::Unhealthy(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {reason}\n"),
        ),
    }
}
