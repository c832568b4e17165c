//! The optional HTTP endpoint (`[server]`): `/metrics` (Prometheus text
//! format), `/healthz` (the process answers), `/readyz` (the store commits
//! and the daemon is not shutting down).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::metrics::metrics;
use crate::store::{Reader, Store, now_ms};

struct Shared {
    store: Store,
    reader: Reader,
    /// Cancelled when the daemon starts shutting down.
    shutting_down: CancellationToken,
}

/// Binds `listen` and serves until `stop`.
pub async fn serve(
    listen: SocketAddr,
    store: Store,
    shutting_down: CancellationToken,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, std::io::Error> {
    let shared = Arc::new(Shared {
        reader: store.reader().map_err(std::io::Error::other)?,
        store,
        shutting_down,
    });
    let app = Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(shared);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "metrics server stopped");
        }
    }))
}

async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    if shared.shutting_down.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    match tokio::time::timeout(Duration::from_secs(2), shared.store.ping()).await {
        Ok(Ok(())) => "ready\n".into_response(),
        Ok(Err(error)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("state database: {error}\n"),
        )
            .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "state database not answering\n",
        )
            .into_response(),
    }
}

async fn scrape(State(shared): State<Arc<Shared>>) -> Response {
    if let Err(error) = refresh_gauges(&shared.reader).await {
        tracing::warn!(%error, "metrics: cannot read the state database");
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics().encode(),
    )
        .into_response()
}

/// Gauges come from the store, so they are right after a restart too.
async fn refresh_gauges(reader: &Reader) -> Result<(), crate::store::StoreError> {
    let m = metrics();
    let sinks = reader.sinks().await?;
    m.pending.reset();
    m.dead.reset();
    m.sink_up.reset();
    for sink in &sinks {
        m.pending
            .with_label_values(&[sink.sink.as_str()])
            .set(sink.pending);
        m.dead
            .with_label_values(&[sink.sink.as_str()])
            .set(sink.dead);
        m.sink_up
            .with_label_values(&[sink.sink.as_str()])
            .set(i64::from(!sink.down));
    }
    let runs = reader.runs().await?;
    m.runs.reset();
    m.last_event_age.reset();
    let now = now_ms();
    for run in runs.iter().filter(|r| r.watched) {
        m.runs.with_label_values(&[run.state.as_str()]).inc();
        if let Some(at) = run.last_event_at.filter(|_| run.state.is_following()) {
            m.last_event_age
                .with_label_values(&[run.run_id.as_str()])
                .set((now - at).max(0) as f64 / 1000.0);
        }
    }
    Ok(())
}
