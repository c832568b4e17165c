//! What the daemon tells systemd: READY/RELOADING/STOPPING, a watchdog ping
//! that stops when the daemon is wedged, and a STATUS= line. Outside
//! systemd every call is a no-op.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::{RunState, State, now_ms};

/// How often systemd's STATUS= line is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// Tells systemd (when it asked, `WatchdogSec=`) that the daemon lives, but
/// only while the run supervisor ticks and the store commits: a wedged
/// daemon stops pinging and gets restarted.
pub(super) async fn watchdog(store: State, heartbeat: Arc<AtomicI64>, stop: CancellationToken) {
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
pub(super) async fn status(reader: State, stop: CancellationToken) {
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

pub(super) fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::debug!(%error, "sd_notify failed");
    }
}
