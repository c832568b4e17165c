//! The supervisor of one sink's delivery loop: a loop that cannot start (a
//! file that cannot be opened after logrotate), ends or panics is logged,
//! shown (the sink is marked down: `runhook status`, `runhook_sink_up` 0,
//! `runhook_sink_restarts_total`) and restarted with backoff, while every
//! other sink and every run carries on.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::DaemonError;
use super::owned::Owned;
use crate::store::{State, StateError};

/// Restart backoff of a failed delivery loop, and of a failed run follower
/// (`daemon/runs.rs`): from `RESTART_MIN`, doubling, capped at
/// `RESTART_MAX`, so what panics at once does not spin.
const RESTART_MIN: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(60);
/// A loop that ran this long before it failed starts the backoff afresh.
const RESTARTS_FORGOTTEN: Duration = Duration::from_secs(300);

/// Why a delivery loop is not running.
#[derive(Debug, thiserror::Error)]
enum LoopFailure {
    #[error(transparent)]
    Start(#[from] DaemonError),
    #[error("delivery loop failed: {0}")]
    State(#[from] StateError),
    #[error("delivery loop panicked: {0}")]
    Panicked(String),
    #[error("delivery loop ended by itself")]
    Ended,
}

/// Keeps one sink's delivery loop running until `stop`: starts it, and
/// when it cannot start, ends or panics, logs it, marks the sink down and
/// starts it again after a backoff. Marks the sink up again once a loop it
/// had to restart is running.
pub(super) async fn supervise_sink<S>(
    name: Arc<str>,
    start: S,
    store: State,
    stop: CancellationToken,
) where
    S: Fn(CancellationToken) -> Result<Owned<Result<(), StateError>>, DaemonError>,
{
    let mut failures = 0u32;
    let mut marked_down = false;
    loop {
        let started = tokio::time::Instant::now();
        let failure = match start(stop.clone()) {
            Ok(task) => {
                if marked_down {
                    marked_down = !mark_down(&store, &name, false).await;
                    tracing::info!(sink = %name, "delivery loop running again");
                }
                match task.join_result().await {
                    Ok(Ok(())) if stop.is_cancelled() => return,
                    Ok(Ok(())) => LoopFailure::Ended,
                    Ok(Err(error)) => error.into(),
                    Err(error) if error.is_panic() => {
                        LoopFailure::Panicked(panic_message(error.into_panic()))
                    }
                    Err(_) => LoopFailure::Ended,
                }
            }
            Err(error) => error.into(),
        };
        if stop.is_cancelled() {
            tracing::warn!(sink = %name, error = %failure, "delivery loop stopped with an error during a stop");
            return;
        }
        if started.elapsed() > RESTARTS_FORGOTTEN {
            failures = 0;
        }
        failures += 1;
        let wait = restart_backoff(failures);
        tracing::error!(sink = %name, error = %failure, failures, ?wait, "sink not delivering; restarting its delivery loop");
        crate::metrics::metrics()
            .sink_restarts
            .with_label_values(&[&*name])
            .inc();
        marked_down = mark_down(&store, &name, true).await || marked_down;
        if crate::ingest::sleep_or_cancel(wait, &stop).await {
            return;
        }
    }
}

/// Marks the sink down (or up) for `status` and `/metrics`; true when the
/// store took it. A store that is locked right now is not worth waiting for.
async fn mark_down(store: &State, sink: &Arc<str>, down: bool) -> bool {
    match store.set_sink_down(sink.clone(), down).await {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(sink = %sink, %error, down, "cannot record the sink's state for status");
            false
        }
    }
}

/// 1 s, 2 s, 4 s ... 60 s, jittered to between half and all of it.
pub(super) fn restart_backoff(failures: u32) -> Duration {
    let ceiling = RESTART_MIN
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(RESTART_MAX);
    crate::jitter::random_range(ceiling / 2..=ceiling)
}

pub(super) fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_backoff_doubles_up_to_a_minute() {
        for _ in 0..100 {
            let first = restart_backoff(1);
            assert!(first >= Duration::from_millis(500) && first <= RESTART_MIN);
            let third = restart_backoff(3);
            assert!(third >= Duration::from_secs(2) && third <= Duration::from_secs(4));
            assert!(restart_backoff(50) <= RESTART_MAX);
        }
    }

    #[test]
    fn panic_messages_are_read() {
        assert_eq!(panic_message(Box::new("boom")), "boom");
        assert_eq!(panic_message(Box::new(String::from("bang"))), "bang");
        assert_eq!(panic_message(Box::new(7)), "a panic without a message");
    }

    fn sink_down(path: &std::path::Path, sink: &str) -> Option<bool> {
        let conn = rusqlite::Connection::open(path).ok()?;
        conn.query_row("SELECT down FROM sinks WHERE name = ?1", [sink], |r| {
            r.get(0)
        })
        .ok()
    }

    /// A loop that panics is counted, the sink marked down, and the loop
    /// started again; once it runs again the sink is marked up.
    #[tokio::test]
    async fn a_panicked_loop_is_marked_down_counted_and_restarted() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let store = State::Sqlite(crate::store::Sqlite::open_path(&path).unwrap());
        let starts = Arc::new(AtomicUsize::new(0));
        let start = {
            let starts = starts.clone();
            move |stop: CancellationToken| {
                let first = starts.fetch_add(1, Ordering::SeqCst) == 0;
                Ok(Owned::new(tokio::spawn(async move {
                    if first {
                        panic!("sink bug");
                    }
                    stop.cancelled().await;
                    Ok(())
                })))
            }
        };
        let name: Arc<str> = Arc::from("panicky");
        let restarts = || {
            crate::metrics::metrics()
                .sink_restarts
                .with_label_values(&["panicky"])
                .get()
        };
        let stop = CancellationToken::new();
        let supervisor = tokio::spawn(supervise_sink(name, start, store.clone(), stop.clone()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !(starts.load(Ordering::SeqCst) == 2 && sink_down(&path, "panicky") == Some(false)) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "starts {}, down {:?}",
                starts.load(Ordering::SeqCst),
                sink_down(&path, "panicky")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(restarts(), 1);
        stop.cancel();
        supervisor.await.unwrap();
        assert_eq!(
            starts.load(Ordering::SeqCst),
            2,
            "no restart after the stop"
        );
    }
}
