//! `runhook run`: the daemon under signals. SIGTERM/SIGINT drain and stop
//! (a second one exits at once); SIGHUP reloads the config.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use runhook::config::Config;
use runhook::store::Location;

/// `config` comes loaded, so a bad one fails before any signal is caught;
/// `path` is read again on each SIGHUP.
pub(super) async fn run(path: &std::path::Path, config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Installed here, before anything starts, not in the tasks: a signal
    // that came before a task first ran would take its default action
    // (SIGTERM and SIGHUP both end the process).
    let terms = signal(SignalKind::terminate())?;
    let interrupts = signal(SignalKind::interrupt())?;
    let hangups = signal(SignalKind::hangup())?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signals(terms, interrupts, shutdown.clone()));
    let (reloads, reloaded) = tokio::sync::mpsc::channel(4);
    tokio::spawn(reload_on_sighup(path.to_owned(), hangups, reloads));
    // A shared database says why it cannot be used (no server, a refused
    // login, a missing grant) before anything starts, in the words of
    // `check --online`. SQLite's own errors already say so at open.
    if let Location::Postgres(_) = &config.state.location {
        runhook::store::check_access(&config.state.location).await?;
    }
    runhook::daemon::run_reloadable(Arc::new(config), shutdown, reloaded).await?;
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP: read the config again; a valid one is applied, an invalid one
/// is refused with its error and the running config stays.
async fn reload_on_sighup(
    path: std::path::PathBuf,
    mut hangups: tokio::signal::unix::Signal,
    reloads: tokio::sync::mpsc::Sender<Config>,
) {
    while hangups.recv().await.is_some() {
        match Config::load(&path) {
            Ok(config) => {
                tracing::info!(config = %path.display(), "SIGHUP: reloading the config");
                if reloads.send(config).await.is_err() {
                    return;
                }
            }
            Err(error) => {
                tracing::error!(%error, "SIGHUP: the new config is invalid; keeping the running one");
            }
        }
    }
}

/// First SIGTERM/SIGINT: drain and stop. Second: exit at once.
async fn stop_on_signals(
    mut term: tokio::signal::unix::Signal,
    mut int: tokio::signal::unix::Signal,
    shutdown: CancellationToken,
) {
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("signal received: draining (a second signal exits at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: exiting now");
    std::process::exit(1);
}
