//! Reloads (SIGHUP): while the run supervisor follows the watched runs,
//! each new config (already validated) is applied as it comes: routes for
//! new events, runs, sinks. What cannot change without a restart is said so.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use backon::{BackoffBuilder, ConstantBuilder};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::registry::Sinks;
use super::systemd::notify;
use super::{DaemonError, runs};
use crate::config::Config;
use crate::ingest::Ingest;
use crate::ownership::Ownership;
use crate::store::{State, StateError, Subscribed};

/// How the run supervisor ended, with the config in force then (its
/// `shutdown_grace` bounds the drain).
pub(super) struct Supervised {
    pub(super) result: Result<(), DaemonError>,
    pub(super) config: Arc<Config>,
}

/// Runs the run supervisor until shutdown, applying each config from
/// `reloads` meanwhile. A reload that fails is returned as the error at
/// once: the daemon ends without a drain.
// Each is a different part of the daemon it ties together; a struct made
// only to carry them here would hide that.
#[allow(clippy::too_many_arguments)]
pub(super) async fn follow_runs(
    config: Arc<Config>,
    ingest: &Arc<Ingest>,
    state: &State,
    ownership: &Ownership,
    sinks: &mut Sinks,
    mut reloads: mpsc::Receiver<Config>,
    shutdown: CancellationToken,
    heartbeat: Arc<AtomicI64>,
) -> Result<Supervised, DaemonError> {
    let mut config = config;
    let follower = ingest.clone();
    let follow: runs::Follow = Box::new(move |run, fence, cancel| {
        let ingest = follower.clone();
        Box::pin(async move { ingest.follow(run, fence, cancel).await })
    });
    // The supervisor is the one reader of `state`'s own connection; every
    // other reading task has its own.
    let supervisor = runs::supervise_runs(
        follow,
        state.clone(),
        ownership.clone(),
        shutdown.clone(),
        heartbeat,
    );
    tokio::pin!(supervisor);
    let result = loop {
        tokio::select! {
            result = &mut supervisor => break result,
            Some(next) = reloads.recv() => {
                config = reload_retrying(&config, next, state, ownership, ingest, sinks).await?;
            }
        }
    };
    Ok(Supervised { result, config })
}

/// How often a reload that met a PostgreSQL error is tried, a second apart.
const RELOAD_TRIES: usize = 5;

/// On PostgreSQL, a reload that met a database error (a connection the
/// server closed while this replica was paused past its idle-in-transaction
/// timeout, a server restart) is tried again: the other replicas go on, and
/// exiting would only hand this one's runs over. Applying a config twice
/// changes nothing more than once. On SQLite a store error ends the daemon
/// as before.
async fn reload_retrying(
    old: &Arc<Config>,
    new: Config,
    state: &State,
    ownership: &Ownership,
    ingest: &Ingest,
    sinks: &mut Sinks,
) -> Result<Arc<Config>, DaemonError> {
    let mut waits = ConstantBuilder::default()
        .with_delay(std::time::Duration::from_secs(1))
        .with_max_times(RELOAD_TRIES - 1)
        .build();
    loop {
        match reload(old, new.clone(), state, ownership, ingest, sinks).await {
            Err(DaemonError::State(StateError::Postgres(error))) => match waits.next() {
                Some(wait) => {
                    tracing::warn!(%error, ?wait, "reload: PostgreSQL error; trying again");
                    tokio::time::sleep(wait).await;
                }
                None => return Err(DaemonError::State(StateError::Postgres(error))),
            },
            done => return done,
        }
    }
}

/// Applies a new, valid config: routes for new events, runs, sinks. What
/// cannot change without a restart is said so.
async fn reload(
    old: &Arc<Config>,
    new: Config,
    state: &State,
    ownership: &Ownership,
    ingest: &Ingest,
    sinks: &mut Sinks,
) -> Result<Arc<Config>, DaemonError> {
    notify(&[
        sd_notify::NotifyState::Reloading,
        sd_notify::NotifyState::monotonic_usec_now().unwrap_or(sd_notify::NotifyState::Reloading),
    ]);
    if new.state.location != old.state.location
        || new.cluster != old.cluster
        || new.api != old.api
        || new.server != old.server
    {
        tracing::warn!(
            "[api], [state], [cluster] and [server] changes take effect on restart; the rest is applied now"
        );
    }
    let mut new = new;
    new.state.location = old.state.location.clone();
    new.cluster = old.cluster.clone();
    ingest.set_router(new.router.clone());
    subscribe_config_runs(state, &new).await?;
    sinks.apply(&new, state, ownership, true).await?;
    tracing::info!(
        runs = new.runs.len(),
        sinks = new.sinks.len(),
        routes = new.router.routes().len(),
        "config reloaded"
    );
    notify(&[sd_notify::NotifyState::Ready]);
    Ok(Arc::new(new))
}

/// The config's runs are watched; runs an earlier config watched and this
/// one drops are unwatched, but not those watched from the command line.
pub(super) async fn subscribe_config_runs(
    store: &State,
    config: &Config,
) -> Result<(), StateError> {
    let mut pruned = 0;
    for run in &config.runs {
        let subscribed = store
            .subscribe(run.id.clone(), run.labels.clone(), "config", run.transport)
            .await?;
        if matches!(subscribed, Subscribed::Pruned(_)) {
            pruned += 1;
        }
    }
    if pruned > 0 {
        // One line, not one per run: a config may list thousands.
        tracing::info!(
            runs = pruned,
            "config runs finished and were pruned after state.retain; not followed again"
        );
    }
    store
        .unsubscribe_config_runs_except(config.runs.iter().map(|r| r.id.clone()).collect())
        .await
}
