//! `runhook run`: open the store, start a delivery loop per sink and an
//! ingest task per watched run, follow `watch`/`unwatch`, apply reloads,
//! talk to systemd, drain on shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ingest::Ingest;
use crate::store::{Reader, RunState, Store, StoreError, now_ms};
use crate::upstream::{Client, UpstreamError};

mod runs;
mod sinks;

use sinks::Sinks;

/// How often the daemon looks for `watch`/`unwatch` from the command line.
const CONTROL_POLL: Duration = Duration::from_millis(500);

/// Start-up spread: runs starting together begin within
/// `min(n x STARTUP_SPREAD_PER_RUN, STARTUP_SPREAD_MAX)`.
const STARTUP_SPREAD_PER_RUN: Duration = Duration::from_millis(2);
const STARTUP_SPREAD_MAX: Duration = Duration::from_secs(10);

/// How often delivered events past `state.retain` are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// How often systemd's STATUS= line is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("sink {sink}: cannot open {path}: {error}")]
    SinkFile {
        sink: String,
        path: String,
        error: std::io::Error,
    },
    #[error("sink {sink}: cannot build its HTTP client: {error}")]
    SinkClient { sink: String, error: reqwest::Error },
    #[error("[server] cannot listen on {listen}: {error}")]
    Server {
        listen: std::net::SocketAddr,
        error: std::io::Error,
    },
}

/// Runs until `shutdown` is cancelled; see [`run_reloadable`].
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let (_keep, reloads) = mpsc::channel(1);
    run_reloadable(config, shutdown, reloads).await
}

/// Runs until `shutdown` is cancelled, applying each config from `reloads`
/// (already validated) as it comes. On shutdown: stops ingest, lets
/// in-flight deliveries finish within `state.shutdown_grace`, and returns.
pub async fn run_reloadable(
    config: Arc<Config>,
    shutdown: CancellationToken,
    mut reloads: mpsc::Receiver<Config>,
) -> Result<(), DaemonError> {
    // Held until this function returns: one daemon per state database.
    let _lock = crate::store::DaemonLock::acquire(&config.state.path)?;
    let store = Store::open(&config.state.path)?;
    let retried = store.retry_stopped_runs().await?;
    if retried > 0 {
        tracing::info!(runs = retried, "retrying runs stopped by a 403 or 404");
    }
    subscribe_config_runs(&store, &config).await?;
    let mut sinks = Sinks::default();
    sinks.apply(&config, &store, false).await?;
    let background_stop = CancellationToken::new();
    let mut background = JoinSet::new();
    background.spawn(prune_periodically(
        store.clone(),
        config.state.retain,
        background_stop.clone(),
    ));
    let server = match &config.server {
        Some(server) => Some(Owned::new(
            crate::server::serve(
                server.listen,
                store.clone(),
                shutdown.clone(),
                background_stop.clone(),
            )
            .await
            .map_err(|error| DaemonError::Server {
                listen: server.listen,
                error,
            })?,
        )),
        None => None,
    };
    let ingest = Arc::new(Ingest {
        client: Client::new(&config.api)?,
        store: store.clone(),
        router: std::sync::RwLock::new(Arc::new(config.router.clone())),
        transport: config.api.transport,
        poll_interval: config.api.poll_interval,
        stream_idle_timeout: config.api.stream_idle_timeout,
        finished_recheck: config.api.finished_recheck,
        finished_linger: config.api.finished_linger,
        not_found_confirm: config.api.not_found_confirm,
        pages: tokio::sync::Semaphore::new(crate::ingest::PAGES_IN_FLIGHT),
    });
    let heartbeat = Arc::new(AtomicI64::new(now_ms()));
    background.spawn(systemd_watchdog(
        store.clone(),
        heartbeat.clone(),
        background_stop.clone(),
    ));
    background.spawn(systemd_status(store.reader()?, background_stop.clone()));
    tracing::info!(
        state = %config.state.path.display(),
        runs = config.runs.len(),
        sinks = config.sinks.len(),
        "runhook started"
    );
    notify(&[sd_notify::NotifyState::Ready]);

    let mut config = config;
    let follower = ingest.clone();
    let follow: runs::Follow = Box::new(move |run, cancel| {
        let ingest = follower.clone();
        Box::pin(async move { ingest.follow(run, cancel).await })
    });
    let supervisor = runs::supervise_runs(follow, store.reader()?, shutdown.clone(), heartbeat);
    tokio::pin!(supervisor);
    let supervised = loop {
        tokio::select! {
            result = &mut supervisor => break result,
            Some(next) = reloads.recv() => {
                config = reload(&config, next, &store, &ingest, &mut sinks).await?;
            }
        }
    };

    notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("stopping: ingest stopped, finishing in-flight deliveries");
    if tokio::time::timeout(config.state.shutdown_grace, sinks.stop_all())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?config.state.shutdown_grace, "deliveries still in flight at the end of the grace period; they resume on restart");
    }
    background_stop.cancel();
    while background.join_next().await.is_some() {}

    if let Some(server) = server {
        server.join().await;
    }
    supervised
}

/// Applies a new, valid config: routes for new events, runs, sinks. What
/// cannot change without a restart is said so.
async fn reload(
    old: &Arc<Config>,
    new: Config,
    store: &Store,
    ingest: &Ingest,
    sinks: &mut Sinks,
) -> Result<Arc<Config>, DaemonError> {
    notify(&[
        sd_notify::NotifyState::Reloading,
        sd_notify::NotifyState::monotonic_usec_now().unwrap_or(sd_notify::NotifyState::Reloading),
    ]);
    if new.state.path != old.state.path
        || new.api != old.api
        || new.server.as_ref().map(|s| s.listen) != old.server.as_ref().map(|s| s.listen)
    {
        tracing::warn!(
            "[api], [state] and [server] changes take effect on restart; the rest is applied now"
        );
    }
    let mut new = new;
    new.state.path = old.state.path.clone();
    ingest.set_router(new.router.clone());
    subscribe_config_runs(store, &new).await?;
    sinks.apply(&new, store, true).await?;
    tracing::info!(
        runs = new.runs.len(),
        sinks = new.sinks.len(),
        routes = new.router.routes().len(),
        "config reloaded"
    );
    notify(&[sd_notify::NotifyState::Ready]);
    Ok(Arc::new(new))
}

async fn subscribe_config_runs(store: &Store, config: &Config) -> Result<(), StoreError> {
    for run in &config.runs {
        store
            .subscribe(run.id.clone(), run.labels.clone(), "config", run.transport)
            .await?;
    }
    store
        .unsubscribe_config_runs_except(config.runs.iter().map(|r| r.id.clone()).collect())
        .await
}

/// A spawned task that dies with its owner: if the daemon future is dropped
/// (a panic, a test simulating a crash), nothing it started runs on.
struct Owned<T>(Option<tokio::task::JoinHandle<T>>);

impl<T> Owned<T> {
    fn new(handle: tokio::task::JoinHandle<T>) -> Self {
        Self(Some(handle))
    }

    /// Waits for the task; `None` if it panicked or was aborted.
    async fn join(self) -> Option<T> {
        self.join_result().await.ok()
    }

    /// Waits for the task, with its panic if it panicked. The handle stays
    /// owned while waiting, so dropping the waiter still aborts the task.
    async fn join_result(mut self) -> Result<T, tokio::task::JoinError> {
        let result = match self.0.as_mut() {
            Some(handle) => handle.await,
            None => std::future::pending().await,
        };
        self.0 = None;
        result
    }
}

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        if let Some(handle) = &self.0 {
            handle.abort();
        }
    }
}

/// Drops delivered events older than `state.retain`, hourly.
async fn prune_periodically(store: Store, retain: Duration, stop: CancellationToken) {
    loop {
        let cutoff = now_ms() - retain.as_millis() as i64;
        // Prune works in chunks, each committed: stopping between them is safe.
        let pruned = tokio::select! {
            pruned = store.prune(cutoff) => pruned,
            _ = stop.cancelled() => return,
        };
        match pruned {
            Ok((deliveries, events)) if deliveries + events > 0 => {
                tracing::info!(
                    deliveries,
                    events,
                    "pruned delivered events past state.retain"
                );
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "pruning failed; trying again later"),
        }
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Tells systemd (when it asked, `WatchdogSec=`) that the daemon lives, but
/// only while the run supervisor ticks and the store commits: a wedged
/// daemon stops pinging and gets restarted.
async fn systemd_watchdog(store: Store, heartbeat: Arc<AtomicI64>, stop: CancellationToken) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = period / 2;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        let supervisor_alive =
            now_ms() - heartbeat.load(Ordering::Relaxed) < period.as_millis() as i64;
        let store_alive = matches!(tokio::time::timeout(every, store.ping()).await, Ok(Ok(())));
        if supervisor_alive && store_alive {
            notify(&[sd_notify::NotifyState::Watchdog]);
        } else {
            tracing::error!(
                supervisor_alive,
                store_alive,
                "not pinging the systemd watchdog"
            );
        }
    }
}

/// A STATUS= line for `systemctl status`.
async fn systemd_status(reader: Reader, stop: CancellationToken) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    loop {
        if let (Ok(runs), Ok(sinks)) = (reader.runs().await, reader.sinks().await) {
            let following = runs
                .iter()
                .filter(|r| r.watched && r.state == RunState::Following)
                .count();
            let pending: i64 = sinks.iter().map(|s| s.pending).sum();
            let dead: i64 = sinks.iter().map(|s| s.dead).sum();
            let down = sinks.iter().filter(|s| s.down).count();
            let line = format!(
                "{following} runs following, {pending} deliveries pending, {dead} dead, {down} sinks down"
            );
            notify(&[sd_notify::NotifyState::Status(&line)]);
        }
        tokio::select! {
            _ = tokio::time::sleep(STATUS_EVERY) => {}
            _ = stop.cancelled() => return,
        }
    }
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::debug!(%error, "sd_notify failed");
    }
}
