//! `runhook run`: open the store, start a delivery loop per sink and an
//! ingest task per watched run, follow `watch`/`unwatch`, apply reloads,
//! talk to systemd, drain on shutdown.
//!
//! On SQLite the daemon takes the state database's exclusive lock and owns
//! every run. On PostgreSQL it is one replica of many: no lock, a lease
//! task ([`leases`]) decides which runs it works, and on shutdown, once
//! ingest stopped and deliveries drained, it gives its leases up.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ingest::Ingest;
use crate::ownership::Ownership;
use crate::store::{DaemonLock, Location, State, StateError, StoreError, now_ms};
use crate::upstream::{Client, UpstreamError};

mod leases;
mod owned;
mod prune;
mod registry;
mod reload;
mod runs;
mod sinks;
mod systemd;

use leases::Leases;
use owned::Owned;
use registry::Sinks;
use reload::Supervised;

/// How often the daemon looks for `watch`/`unwatch` from the command line.
const CONTROL_POLL: Duration = Duration::from_millis(500);

/// Start-up spread: runs starting together begin within
/// `min(n x STARTUP_SPREAD_PER_RUN, STARTUP_SPREAD_MAX)`.
const STARTUP_SPREAD_PER_RUN: Duration = Duration::from_millis(2);
const STARTUP_SPREAD_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Taking the state database's lock.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    State(#[from] StateError),
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
    reloads: mpsc::Receiver<Config>,
) -> Result<(), DaemonError> {
    let location = config.state.location.clone();
    // SQLite: held until this function returns, one daemon per state
    // database. PostgreSQL: replicas share the state; leases divide the runs.
    let _lock = match &location {
        Location::Sqlite(path) => Some(DaemonLock::acquire(path)?),
        Location::Postgres(_) => None,
    };
    let state = open_state(&config, &location).await?;
    let (leases, ownership) = own_runs(&config, &state);
    let mut sinks = Sinks::default();
    sinks.apply(&config, &state, &ownership, false).await?;
    let background_stop = CancellationToken::new();
    let mut background = JoinSet::new();
    background.spawn(prune::prune_periodically(
        state.clone(),
        config.state.retain,
        background_stop.clone(),
    ));
    let server = start_server(&config, &state, &shutdown, &background_stop).await?;
    let ingest = Arc::new(new_ingest(&config, &state)?);
    let heartbeat = Arc::new(AtomicI64::new(now_ms()));
    background.spawn(systemd::watchdog(
        state.clone(),
        heartbeat.clone(),
        background_stop.clone(),
    ));
    background.spawn(systemd::status(
        state.with_own_reader()?,
        background_stop.clone(),
    ));
    tracing::info!(
        state = %location,
        runs = config.runs.len(),
        sinks = config.sinks.len(),
        "runhook started"
    );
    systemd::notify(&[sd_notify::NotifyState::Ready]);

    let Supervised { result, config } = reload::follow_runs(
        config, &ingest, &state, &ownership, &mut sinks, reloads, shutdown, heartbeat,
    )
    .await?;

    systemd::notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("stopping: ingest stopped, finishing in-flight deliveries");
    if let Some(leases) = &leases {
        leases.drain();
    }
    drain(&config, &mut sinks).await;
    if let Some(leases) = leases {
        leases.leave().await;
    }
    background_stop.cancel();
    while background.join_next().await.is_some() {}

    if let Some(server) = server {
        server.join().await;
    }
    result
}

/// Which runs this daemon works: every run on SQLite (the lock makes it
/// their one owner), the runs its leases name on PostgreSQL.
fn own_runs(config: &Config, state: &State) -> (Option<Leases>, Ownership) {
    let Some(pg) = state.postgres() else {
        return (None, Ownership::exclusive());
    };
    crate::metrics::metrics().cluster_node(pg.node());
    let (leases, ownership) =
        Leases::start(pg.clone(), config.cluster.lease_ttl, longest_send(config));
    (Some(leases), ownership)
}

/// The longest a send of an HTTP sink may take: its request timeout (a
/// Slack call's is fixed). File sinks write under their node's own lease.
fn longest_send(config: &Config) -> Duration {
    config
        .sinks
        .values()
        .map(|sink| match &sink.kind {
            crate::config::SinkKind::Webhook(webhook) => webhook.timeout,
            crate::config::SinkKind::Slack(_) => crate::sink::slack::TIMEOUT,
            crate::config::SinkKind::File(_) => Duration::ZERO,
        })
        .max()
        .unwrap_or(Duration::ZERO)
}

/// Opens the state database and brings its watched runs in line with the
/// config. Runs stopped by a 403 or 404 get another try at each start: the
/// credential or the run may have been fixed meanwhile.
async fn open_state(config: &Config, location: &Location) -> Result<State, DaemonError> {
    let store = State::open(location, config.cluster.replica()).await?;
    let retried = store.retry_stopped_runs().await?;
    if retried > 0 {
        tracing::info!(runs = retried, "retrying runs stopped by a 403 or 404");
    }
    reload::subscribe_config_runs(&store, config).await?;
    Ok(store)
}

/// `/metrics`, `/healthz` and `/readyz`, when `[server]` asks for them.
/// `/readyz` fails from `shutdown` on, but the server serves until the drain
/// is over (`background_stop`), so the drain can still be watched.
async fn start_server(
    config: &Config,
    state: &State,
    shutdown: &CancellationToken,
    background_stop: &CancellationToken,
) -> Result<Option<Owned<()>>, DaemonError> {
    let Some(server) = &config.server else {
        return Ok(None);
    };
    let task = crate::server::serve(
        server.listen,
        state.clone(),
        server.watch_token.clone(),
        shutdown.clone(),
        background_stop.clone(),
    )
    .await
    .map_err(|error| DaemonError::Server {
        listen: server.listen,
        error,
    })?;
    Ok(Some(Owned::new(task)))
}

fn new_ingest(config: &Config, state: &State) -> Result<Ingest, DaemonError> {
    Ok(Ingest {
        client: Client::new(&config.api)?,
        store: state.clone(),
        router: std::sync::RwLock::new(Arc::new(config.router.clone())),
        transport: config.api.transport,
        poll_interval: config.api.poll_interval,
        stream_idle_timeout: config.api.stream_idle_timeout,
        finished_recheck: config.api.finished_recheck,
        finished_linger: config.api.finished_linger,
        not_found_confirm: config.api.not_found_confirm,
        pages: tokio::sync::Semaphore::new(crate::ingest::PAGES_IN_FLIGHT),
    })
}

/// Lets in-flight deliveries finish within `state.shutdown_grace`; what is
/// still in flight then is delivered again after the restart.
async fn drain(config: &Config, sinks: &mut Sinks) {
    if tokio::time::timeout(config.state.shutdown_grace, sinks.stop_all())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?config.state.shutdown_grace, "deliveries still in flight at the end of the grace period; they resume on restart");
    }
}
