//! The optional HTTP endpoint (`[server]`): `/metrics` (Prometheus text
//! format), `/healthz` (the process answers), `/readyz` (the store commits
//! and the daemon is not shutting down); with `[server] token`, the watch
//! endpoints of `server/watch.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::config::Secret;
use crate::metrics::metrics;
use crate::store::{self, RunState, StateError, now_ms};

mod watch;

struct Shared {
    /// With its own read connection, so a scrape never waits on a
    /// delivery loop's reads.
    state: store::State,
    /// Cancelled when the daemon starts shutting down.
    shutting_down: CancellationToken,
}

/// Binds `listen` and serves until `stop`. The watch endpoints exist only
/// with a `watch_token`.
pub async fn serve(
    listen: SocketAddr,
    state: store::State,
    watch_token: Option<Secret>,
    shutting_down: CancellationToken,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, std::io::Error> {
    let watch_routes = watch_token.map(|token| watch::routes(state.clone(), token));
    let shared = Arc::new(Shared {
        state: state.with_own_reader().map_err(std::io::Error::other)?,
        shutting_down,
    });
    let app = Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(shared);
    let watch = watch_routes.is_some();
    let app = match watch_routes {
        Some(routes) => app.merge(routes),
        None => app,
    };
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(addr = %listener.local_addr()?, watch, "serving /metrics, /healthz, /readyz");
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
    match tokio::time::timeout(Duration::from_secs(2), shared.state.ping()).await {
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
    if let Err(error) = refresh_gauges(&shared.state).await {
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
async fn refresh_gauges(reader: &store::State) -> Result<(), StateError> {
    let now = now_ms();
    refresh_sinks(reader, now).await?;
    let runs = reader.runs().await?;
    let m = metrics();
    m.runs.reset();
    for state in RunState::ALL {
        m.runs.with_label_values(&[state.as_str()]).set(0);
    }
    let watched: Vec<_> = runs.iter().filter(|r| r.watched).collect();
    for run in &watched {
        m.runs.with_label_values(&[run.state.as_str()]).inc();
    }
    m.longest_run_silence
        .set(longest_silence_ms(&watched, now) as f64 / 1000.0);
    Ok(())
}

async fn refresh_sinks(reader: &store::State, now: i64) -> Result<(), StateError> {
    let m = metrics();
    let sinks = reader.sinks().await?;
    let names = sinks.iter().map(|sink| sink.sink.clone()).collect();
    let oldest = reader.oldest_pending(names).await?;
    m.pending.reset();
    m.dead.reset();
    m.sink_up.reset();
    m.oldest_pending_age.reset();
    for sink in &sinks {
        let name = sink.sink.as_str();
        m.pending.with_label_values(&[name]).set(sink.pending);
        m.dead.with_label_values(&[name]).set(sink.dead);
        m.sink_up
            .with_label_values(&[name])
            .set(i64::from(!sink.down));
        m.oldest_pending_age.with_label_values(&[name]).set(0.0);
    }
    for (name, queued_at) in &oldest {
        m.oldest_pending_age
            .with_label_values(&[name.as_str()])
            .set((now - queued_at).max(0) as f64 / 1000.0);
    }
    Ok(())
}

/// The longest time any followed run has gone without an event, in ms (0
/// when none is followed): one number instead of a series per run.
fn longest_silence_ms(runs: &[&crate::store::RunRow], now: i64) -> i64 {
    runs.iter()
        .filter(|run| run.state.is_following())
        .filter_map(|run| run.last_event_at)
        .map(|at| (now - at).max(0))
        .max()
        .unwrap_or(0)
}
