//! `runhook run`: open the store, start a delivery loop per sink and an
//! ingest task per watched run, follow `watch`/`unwatch`, drain on shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SinkKind, Transport};
use crate::deliver;
use crate::deliver::runs::SinkRuntime;
use crate::ingest::{Ingest, RunEnd};
use crate::sink::Sender;
use crate::sink::file::FileSink;
use crate::sink::slack::SlackSink;
use crate::sink::webhook::WebhookSink;
use crate::store::{Reader, Store, StoreError};
use crate::upstream::{Client, UpstreamError};

/// How often the daemon looks for `watch`/`unwatch` from the command line.
const CONTROL_POLL: Duration = Duration::from_millis(500);

/// Start-up spread: runs starting together begin within
/// `min(n x STARTUP_SPREAD_PER_RUN, STARTUP_SPREAD_MAX)`.
const STARTUP_SPREAD_PER_RUN: Duration = Duration::from_millis(2);
const STARTUP_SPREAD_MAX: Duration = Duration::from_secs(10);

/// How often delivered events past `state.retain` are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Run states in which ingest does not start the run again by itself
/// (`watch` it again to retry). A finished run's task decides itself whether
/// it still lingers (a failed run may be retried upstream).
const ENDED_STATES: [&str; 2] = ["forbidden", "not_found"];

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
}

/// Runs until `shutdown` is cancelled, then stops ingest, lets in-flight
/// deliveries finish within `state.shutdown_grace`, and returns.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let store = Store::open(&config.state.path)?;
    subscribe_config_runs(&store, &config).await?;

    let sinks_stop = CancellationToken::new();
    let mut sinks = start_sinks(&config, &store, &sinks_stop)?;
    sinks.spawn(prune_periodically(
        store.clone(),
        config.state.retain,
        sinks_stop.clone(),
    ));
    let ingest = Arc::new(Ingest {
        client: Client::new(&config.api)?,
        store: store.clone(),
        router: Arc::new(config.router.clone()),
        transport: config.api.transport,
        poll_interval: config.api.poll_interval,
        stream_idle_timeout: config.api.stream_idle_timeout,
        finished_recheck: config.api.finished_recheck,
        finished_linger: config.api.finished_linger,
    });
    tracing::info!(
        state = %config.state.path.display(),
        runs = config.runs.len(),
        sinks = config.sinks.len(),
        "runhook started"
    );
    let supervised = supervise_runs(ingest, store.reader()?, shutdown.clone()).await;

    tracing::info!("stopping: ingest stopped, finishing in-flight deliveries");
    sinks_stop.cancel();
    let drained = tokio::time::timeout(config.state.shutdown_grace, async {
        while let Some(result) = sinks.join_next().await {
            if let Ok(Err(error)) = result {
                tracing::error!(%error, "delivery loop failed");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(grace = ?config.state.shutdown_grace, "deliveries still in flight at the end of the grace period; they resume on restart");
        sinks.abort_all();
    }
    supervised
}

async fn subscribe_config_runs(store: &Store, config: &Config) -> Result<(), StoreError> {
    for run in &config.runs {
        store
            .subscribe(
                run.id.clone(),
                run.labels.clone(),
                "config",
                run.transport.map(transport_name),
            )
            .await?;
    }
    store
        .unsubscribe_config_runs_except(config.runs.iter().map(|r| r.id.clone()).collect())
        .await
}

fn transport_name(transport: Transport) -> &'static str {
    match transport {
        Transport::Auto => "auto",
        Transport::Sse => "sse",
        Transport::Poll => "poll",
    }
}

fn start_sinks(
    config: &Config,
    store: &Store,
    stop: &CancellationToken,
) -> Result<JoinSet<Result<(), StoreError>>, DaemonError> {
    let mut tasks = JoinSet::new();
    for sink in config.sinks.values() {
        let client_error = |error| DaemonError::SinkClient {
            sink: sink.name.to_string(),
            error,
        };
        let sender = match &sink.kind {
            SinkKind::File(file) => {
                let opened = FileSink::open(&file.path).map_err(|error| DaemonError::SinkFile {
                    sink: sink.name.to_string(),
                    path: file.path.display().to_string(),
                    error,
                })?;
                tasks.spawn(deliver::file::run_file_sink(
                    sink.name.clone(),
                    Arc::new(opened),
                    sink.delivery.clone(),
                    store.clone(),
                    store.reader()?,
                    stop.clone(),
                ));
                continue;
            }
            SinkKind::Webhook(webhook) => {
                Sender::Webhook(WebhookSink::new(webhook).map_err(client_error)?)
            }
            SinkKind::Slack(slack) => Sender::Slack(
                SlackSink::new(sink.name.clone(), slack, store.clone(), store.reader()?)
                    .map_err(client_error)?,
            ),
        };
        tasks.spawn(deliver::runs::run_http_sink(Arc::new(SinkRuntime {
            name: sink.name.clone(),
            sender,
            policy: sink.delivery.clone(),
            ordered: sink.ordered,
            concurrency: sink.concurrency,
            store: store.clone(),
            reader: store.reader()?,
            shutdown: stop.clone(),
        })));
    }
    Ok(tasks)
}

/// Drops delivered events older than `state.retain`, hourly.
async fn prune_periodically(
    store: Store,
    retain: Duration,
    stop: CancellationToken,
) -> Result<(), StoreError> {
    loop {
        let cutoff = crate::store::now_ms() - retain.as_millis() as i64;
        let (deliveries, events) = store.prune(cutoff).await?;
        if deliveries + events > 0 {
            tracing::info!(
                deliveries,
                events,
                "pruned delivered events past state.retain"
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
            _ = stop.cancelled() => return Ok(()),
        }
    }
}

/// Keeps one ingest task per watched run, following `watch`/`unwatch`
/// through the store, until `shutdown`.
async fn supervise_runs(
    ingest: Arc<Ingest>,
    reader: Reader,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let mut running: HashMap<String, CancellationToken> = HashMap::new();
    let mut tasks: JoinSet<(String, Result<RunEnd, StoreError>)> = JoinSet::new();
    let mut seen_generation = None;
    loop {
        let generation = reader.control_generation().await?;
        if seen_generation != Some(generation) {
            seen_generation = Some(generation);
            let watched = reader.watched_runs().await?;
            running.retain(|run_id, cancel| {
                let keep = watched.iter().any(|w| &w.run_id == run_id);
                if !keep {
                    tracing::info!(run_id = %run_id, "unwatched; stopping ingest");
                    cancel.cancel();
                }
                keep
            });
            let starting: Vec<_> = watched
                .into_iter()
                .filter(|run| {
                    !running.contains_key(&run.run_id)
                        && !ENDED_STATES.contains(&run.state.as_str())
                })
                .collect();
            // Many runs at once (a start, a big `watch`) connect over a few
            // seconds rather than in one stampede.
            let spread = STARTUP_SPREAD_PER_RUN * starting.len() as u32;
            for run in starting {
                let cancel = shutdown.child_token();
                running.insert(run.run_id.clone(), cancel.clone());
                let ingest = ingest.clone();
                let delay = spread
                    .min(STARTUP_SPREAD_MAX)
                    .mul_f64(rand::random::<f64>());
                tasks.spawn(async move {
                    let run_id = run.run_id.clone();
                    if crate::ingest::sleep_or_cancel(delay, &cancel).await {
                        return (run_id, Ok(RunEnd::Stopped));
                    }
                    (run_id, ingest.follow(run, cancel).await)
                });
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(joined) = tasks.join_next() => {
                if let Ok((run_id, result)) = joined {
                    if let Err(error) = result {
                        tracing::error!(run_id = %run_id, %error, "ingest stopped on a state database error");
                        return Err(error.into());
                    }
                    running.remove(&run_id);
                }
            }
            _ = tokio::time::sleep(CONTROL_POLL) => {}
        }
    }
    while let Some(joined) = tasks.join_next().await {
        if let Ok((run_id, Err(error))) = joined {
            tracing::warn!(run_id = %run_id, %error, "ingest ended with an error during shutdown");
        }
    }
    Ok(())
}
