//! The sink registry: which delivery loop runs for which configured sink,
//! and the factory that builds a sink's sender and starts its loop. Each
//! loop runs under its supervisor (`sinks.rs`).

use std::collections::HashMap;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::DaemonError;
use super::owned::Owned;
use super::sinks::supervise_sink;
use crate::config::{Config, SinkConfig, SinkKind};
use crate::deliver;
use crate::deliver::runs::SinkRuntime;
use crate::deliver::threads::StoredThreads;
use crate::ownership::Ownership;
use crate::sink::Sender;
use crate::sink::file::FileSink;
use crate::sink::slack::SlackSink;
use crate::sink::webhook::WebhookSink;
use crate::store::{State, StateError};

/// The delivery loops, one per sink, each with its own stop switch so a
/// reload can start, stop or restart one without touching the others.
#[derive(Default)]
pub(super) struct Sinks {
    running: HashMap<String, RunningSink>,
}

struct RunningSink {
    config: SinkConfig,
    stop: CancellationToken,
    /// The sink's supervisor; it owns the delivery loop.
    supervisor: Owned<()>,
}

impl Sinks {
    /// Brings the running loops in line with `config`. On reload, file
    /// sinks restart too, which reopens their files (logrotate). A sink that
    /// cannot start does not fail this: its supervisor retries.
    pub(super) async fn apply(
        &mut self,
        config: &Config,
        state: &State,
        ownership: &Ownership,
        reopen_files: bool,
    ) -> Result<(), DaemonError> {
        let stale: Vec<String> = self
            .running
            .iter()
            .filter(|(name, running)| {
                let reopen = reopen_files && matches!(running.config.kind, SinkKind::File(_));
                config.sinks.get(*name) != Some(&running.config) || reopen
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(running) = self.running.remove(&name) {
                running.stop.cancel();
                running.supervisor.join().await;
            }
        }
        for (name, sink) in &config.sinks {
            crate::metrics::metrics().sink_configured(name);
            if !self.running.contains_key(name) {
                if !written_here(sink, state) {
                    tracing::info!(sink = %name, "file sink: written by another node (its `node`); not started here");
                    continue;
                }
                let stop = CancellationToken::new();
                let start = {
                    let (sink, state, ownership) = (sink.clone(), state.clone(), ownership.clone());
                    move |stop| start_sink(&sink, &state, &ownership, stop)
                };
                let supervisor = Owned::new(tokio::spawn(supervise_sink(
                    sink.name.clone(),
                    start,
                    state.clone(),
                    stop.clone(),
                )));
                self.running.insert(
                    name.clone(),
                    RunningSink {
                        config: sink.clone(),
                        stop,
                        supervisor,
                    },
                );
            }
        }
        Ok(())
    }

    pub(super) async fn stop_all(&mut self) {
        for running in self.running.values() {
            running.stop.cancel();
        }
        for (_, running) in self.running.drain() {
            running.supervisor.join().await;
        }
    }
}

/// A file sink in a cluster is written by the replica its `node` names only
/// (SQLite: one machine, every sink here).
fn written_here(sink: &SinkConfig, state: &State) -> bool {
    match &sink.kind {
        SinkKind::File(file) => state.writes_sink_of(file.node.as_deref()),
        SinkKind::Webhook(_) | SinkKind::Slack(_) => true,
    }
}

/// Builds the sink afresh at each start, so that a restart or a reload
/// reopens a file sink's file (logrotate).
fn start_sink(
    sink: &SinkConfig,
    state: &State,
    ownership: &Ownership,
    stop: CancellationToken,
) -> Result<Owned<Result<(), StateError>>, DaemonError> {
    // Each loop reads on a connection of its own.
    let state = || state.with_own_reader();
    let client_error = |error| DaemonError::SinkClient {
        sink: sink.name.to_string(),
        error,
    };
    let sender = match &sink.kind {
        SinkKind::File(file) => {
            // A file sink is owned by its node, not by a run's lease: its
            // loop claims the sink's own fence (`written_here` started it on
            // its node only).
            let opened = FileSink::open(&file.path).map_err(|error| DaemonError::SinkFile {
                sink: sink.name.to_string(),
                path: file.path.display().to_string(),
                error,
            })?;
            return Ok(Owned::new(tokio::spawn(deliver::file::run_file_sink(
                sink.name.clone(),
                Arc::new(opened),
                sink.delivery.clone(),
                state()?,
                stop,
            ))));
        }
        SinkKind::Webhook(webhook) => {
            Sender::Webhook(WebhookSink::new(webhook).map_err(client_error)?)
        }
        SinkKind::Slack(slack) => {
            let threads = StoredThreads::new(sink.name.clone(), state()?, ownership.clone());
            Sender::Slack(
                SlackSink::new(sink.name.clone(), slack, Arc::new(threads))
                    .map_err(client_error)?,
            )
        }
    };
    Ok(Owned::new(tokio::spawn(deliver::runs::run_http_sink(
        Arc::new(SinkRuntime {
            name: sink.name.clone(),
            sender,
            policy: sink.delivery.clone(),
            ordered: sink.ordered,
            pipeline: matches!(&sink.kind, SinkKind::Webhook(w) if w.pipeline),
            concurrency: sink.concurrency,
            state: state()?,
            ownership: ownership.clone(),
            shutdown: stop,
        }),
    ))))
}
