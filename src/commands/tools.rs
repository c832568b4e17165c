//! The commands that need no state database: `check`, `completions`,
//! `simulate`, `demo`.

use anyhow::Context;

use crate::cli::Cli;
use runhook::config::{Config, SinkKind};

pub(super) fn check(config: &Config) -> std::io::Result<()> {
    for warning in &config.warnings {
        eprintln!("warning: {warning}");
    }
    out!("{}: ok", config.source.display())?;
    out!(
        "api: {} (transport {}, credentials: {})",
        runhook::config::url_origin(&config.api.base_url),
        config.api.transport.name(),
        match (&config.api.token, &config.api.session_cookie) {
            (Some(_), Some(_)) => "token + session cookie",
            (Some(_), None) => "token",
            _ => "session cookie",
        }
    )?;
    out!("state: {}", config.state.location)?;
    out!("runs: {} static", config.runs.len())?;
    out!("\nsinks:")?;
    for sink in config.sinks.values() {
        out!(
            "  {:<12} {:<8} {}{}",
            sink.name,
            sink.kind.type_name(),
            sink.kind.describe_target(),
            match (&sink.kind, sink.ordered) {
                (_, false) => " (unordered)",
                (SinkKind::Webhook(w), true) if w.pipeline => " (pipelined)",
                _ => "",
            }
        )?;
    }
    out!("\nroutes:")?;
    for (i, route) in config.router.routes().iter().enumerate() {
        route_line(i, route)?;
    }
    Ok(())
}

/// One line of the routing table: `#N filters -> sinks`, numbered from 1
/// (`check` and `route` print the same numbers).
pub(super) fn route_line(i: usize, route: &runhook::route::Route) -> std::io::Result<()> {
    let sinks: Vec<&str> = route.sinks.iter().map(|s| &**s).collect();
    out!(
        "  #{:<3} {:<50} -> {}",
        i + 1,
        route.describe_filters(),
        sinks.join(", ")
    )
}

/// Prints a completion script for `shell` on stdout. Generated into memory
/// first: `clap_complete` panics on a write error, and this way a closed
/// pipe is an error like any other command's.
pub(super) fn completions(shell: clap_complete::Shell) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut command = <Cli as clap::CommandFactory>::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "runhook", &mut script);
    super::Stdout.write_all(&script)
}

pub(super) async fn simulate(
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
    out!(
        "simulator on {} (bearer token {:?}, session cookie {:?}); {} runs. Ctrl-C to stop.",
        sim.url(),
        sim.token(),
        sim.session(),
        sim.run_ids().len()
    )?;
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// Simulator, daemon and file sink in one process, printing on stdout.
pub(super) async fn demo() -> anyhow::Result<()> {
    runhook::demo::run(&mut super::Stdout).await?;
    Ok(())
}

/// Writes the man pages (`runhook.1` and one per command) into `dir`.
pub(super) fn generate_man(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    crate::cli::generate_man(dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))
}
