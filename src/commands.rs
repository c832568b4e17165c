//! Command glue: each CLI command as a function. `anyhow` lives here and in
//! `main.rs` only.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command, LogFormat};
use runhook::config::{Config, Transport};
use runhook::store::{DeadFilter, Reader, Store};

pub fn init_logging(format: LogFormat, default_level: &str) {
    let filter =
        EnvFilter::try_from_env("RUNHOOK_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The state database of a command that needs nothing else: `--state`, or
/// the config's `[state] path`.
fn state_path(state: Option<&Path>, config: &Path) -> anyhow::Result<PathBuf> {
    match state {
        Some(path) => Ok(path.to_owned()),
        None => Ok(Config::load(config)?.state.path),
    }
}

pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let state = || state_path(cli.state.as_deref(), &cli.config);
    match cli.command {
        Command::Demo => {
            let mut stdout = std::io::stdout();
            runhook::demo::run(&mut stdout).await?;
        }
        Command::Simulate { listen, scenario } => simulate(listen, scenario).await?,
        Command::Check => check(&Config::load(&cli.config)?),
        Command::Run => run(&cli.config, Config::load(&cli.config)?).await?,
        Command::Tail {
            run,
            event_type,
            json,
        } => tail(&state()?, run, event_type, json).await?,
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "runhook", &mut std::io::stdout());
        }
        Command::Watch { run_id, labels } => {
            let labels = runhook::ingest::parse_labels(&labels).map_err(anyhow::Error::msg)?;
            let store = Store::open(&state()?)?;
            store
                .subscribe(run_id.clone(), labels, "watch", None)
                .await?;
            println!("watching {run_id}");
        }
        Command::Unwatch { run_id } => {
            let store = Store::open(&state()?)?;
            if !store.unsubscribe(run_id.clone()).await? {
                anyhow::bail!("run {run_id} is not known to this state database");
            }
            println!("no longer watching {run_id}");
        }
        Command::Status { json } => status(&state()?, json).await?,
        Command::Dead {
            sink,
            run,
            json,
            purge: false,
        } => dead(&state()?, sink, run, json).await?,
        Command::Dead {
            sink,
            run,
            purge: true,
            ..
        } => {
            let store = Store::open(&state()?)?;
            let purged = store
                .purge_dead(DeadFilter {
                    sink,
                    run,
                    id: None,
                })
                .await?;
            println!("purged {purged} dead letters");
        }
        Command::Replay { sink, run, id } => {
            let store = Store::open(&state()?)?;
            let replayed = store.replay(DeadFilter { sink, run, id }).await?;
            println!("queued {replayed} dead letters again (same ids)");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn run(path: &std::path::Path, config: Config) -> anyhow::Result<()> {
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

/// Prints events as they are recorded, beside a running daemon.
async fn tail(
    state: &Path,
    run: Option<String>,
    event_type: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let reader = Reader::open(state)?;
    let mut after = reader.last_event_row().await?;
    loop {
        let events = reader
            .events_after(after, run.clone(), event_type.clone(), 500)
            .await?;
        for event in &events {
            after = after.max(event.event);
            if json {
                let mut line = Vec::new();
                runhook::sink::write_envelope_line(event, &mut line)?;
                print!("{}", String::from_utf8_lossy(&line));
            } else {
                println!(
                    "{} {:<38} {:>6} {:<20} {}/{} {}",
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH
                            + std::time::Duration::from_millis(event.seen_at.max(0) as u64)
                    ),
                    event.run_id,
                    event.sequence.map_or("-".into(), |s| s.to_string()),
                    event.event_type,
                    event.run_status.as_deref().unwrap_or("-"),
                    event.phase.as_deref().unwrap_or("-"),
                    event.payload,
                );
            }
        }
        if events.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
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

async fn simulate(
    listen: std::net::SocketAddr,
    scenario: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let scenario = match scenario {
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            runhook::simulate::Scenario::from_toml(&text)
                .with_context(|| format!("scenario {}", path.display()))?
        }
        None => runhook::simulate::Scenario::demo(),
    };
    let sim = runhook::simulate::Simulator::start(listen, scenario).await?;
    println!(
        "simulator on {} (bearer token {:?}, session cookie {:?}); {} runs. Ctrl-C to stop.",
        sim.url(),
        sim.token(),
        sim.session(),
        sim.run_ids().len()
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}

fn check(config: &Config) {
    println!("{}: ok", config.source.display());
    println!(
        "api: {} (transport {}, credentials: {})",
        runhook::config::url_origin(&config.api.base_url),
        config.api.transport.name(),
        match (&config.api.token, &config.api.session_cookie) {
            (Some(_), Some(_)) => "token + session cookie",
            (Some(_), None) => "token",
            _ => "session cookie",
        }
    );
    println!("state: {}", config.state.path.display());
    println!("runs: {} static", config.runs.len());
    println!("\nsinks:");
    for sink in config.sinks.values() {
        println!(
            "  {:<12} {:<8} {}{}",
            sink.name,
            sink.kind.type_name(),
            sink.kind.describe_target(),
            if sink.ordered { "" } else { " (unordered)" }
        );
    }
    println!("\nroutes:");
    for (i, route) in config.router.routes().iter().enumerate() {
        let sinks: Vec<&str> = route.sinks.iter().map(|s| &**s).collect();
        println!(
            "  #{:<3} {:<50} -> {}",
            i + 1,
            route.describe_filters(),
            sinks.join(", ")
        );
    }
}

async fn status(state: &Path, json: bool) -> anyhow::Result<()> {
    let reader = Reader::open(state)?;
    let runs = reader.runs().await?;
    let sinks = reader.sinks().await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "runs": runs, "sinks": sinks }))?
        );
        return Ok(());
    }
    let now = runhook::store::now_ms();
    println!(
        "{:<38} {:<12} {:<9} {:>7} {:<10} {:<10} {:>5} {:>9}  LAST ERROR",
        "RUN", "STATE", "TRANSPORT", "CURSOR", "STATUS", "PHASE", "LAG", "LAST EVT"
    );
    for run in &runs {
        println!(
            "{:<38} {:<12} {:<9} {:>7} {:<10} {:<10} {:>5} {:>9}  {}",
            run.run_id,
            if run.watched {
                run.state.as_str()
            } else {
                "unwatched"
            },
            run.transport.map_or("-", Transport::name),
            run.cursor,
            run.status.as_deref().unwrap_or("-"),
            run.phase.as_deref().unwrap_or("-"),
            run.lag.map_or("-".into(), |l| l.to_string()),
            run.last_event_at.map_or("-".into(), |t| age(now - t)),
            run.last_error.as_deref().unwrap_or(""),
        );
    }
    println!(
        "\n{:<16} {:>8} {:>9} {:>9} {:>6} {:<5} LAST SUCCESS",
        "SINK", "PENDING", "RETRYING", "DONE", "DEAD", "UP"
    );
    for sink in &sinks {
        println!(
            "{:<16} {:>8} {:>9} {:>9} {:>6} {:<5} {}",
            sink.sink,
            sink.pending,
            sink.retrying,
            sink.done,
            sink.dead,
            if sink.down { "down" } else { "up" },
            sink.last_success_at
                .map_or("-".into(), |t| format!("{} ago", age(now - t))),
        );
    }
    Ok(())
}

async fn dead(
    state: &Path,
    sink: Option<String>,
    run: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let reader = Reader::open(state)?;
    let letters = reader.dead_letters(sink, run).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&letters)?);
        return Ok(());
    }
    let now = runhook::store::now_ms();
    println!(
        "{:<48} {:<12} {:>8} {:>6} {:>8}  LAST ERROR",
        "ID", "SINK", "ATTEMPTS", "STATUS", "AGE"
    );
    for letter in &letters {
        println!(
            "{:<48} {:<12} {:>8} {:>6} {:>8}  {}",
            letter.id,
            letter.sink,
            letter.attempts,
            letter.last_status.map_or("-".into(), |s| s.to_string()),
            letter.dead_at.map_or("-".into(), |t| age(now - t)),
            letter.last_error.as_deref().unwrap_or(""),
        );
    }
    Ok(())
}

/// "3s", "5m", "2h", "4d".
fn age(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}
