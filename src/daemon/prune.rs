//! Retention: delivered events past `state.retain` are dropped, hourly,
//! and finished runs with nothing left to deliver leave the runs table for
//! a tombstone.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::{State, now_ms};

/// How often delivered events past `state.retain` are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Drops delivered events older than `state.retain`, hourly.
pub(super) async fn prune_periodically(store: State, retain: Duration, stop: CancellationToken) {
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
        // After the events: a run whose last events were just pruned goes in
        // the same pass. `retain` covers `finished_linger` (the config
        // checks it), so no run still lingering goes.
        let runs = tokio::select! {
            runs = store.prune_finished_runs(cutoff) => runs,
            _ = stop.cancelled() => return,
        };
        match runs {
            Ok(0) => {}
            Ok(runs) => tracing::info!(runs, "pruned finished runs past state.retain"),
            Err(error) => tracing::warn!(%error, "pruning runs failed; trying again later"),
        }
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
            _ = stop.cancelled() => return,
        }
    }
}
