//! Command glue: each CLI command as a function. `anyhow` lives here and in
//! `main.rs` only.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::cli::{Cli, Command};
use runhook::config::Config;

mod change;
pub(crate) mod forward;
mod inspect;
mod run;
mod send_test;
mod tools;

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
        Command::Demo => tools::demo().await?,
        Command::Simulate { listen, scenario } => tools::simulate(listen, scenario).await?,
        Command::Check => tools::check(&Config::load(&cli.config)?),
        Command::Run => run::run(&cli.config, Config::load(&cli.config)?).await?,
        Command::Tail {
            run,
            event_type,
            json,
        } => inspect::tail(&state()?, run, event_type, json).await?,
        Command::Completions { shell } => tools::completions(shell),
        Command::GenerateMan { dir } => tools::generate_man(&dir)?,
        Command::Watch { run_id, labels } => change::watch(state, run_id, &labels).await?,
        Command::Unwatch { run_id } => change::unwatch(&state()?, run_id).await?,
        Command::Status { json } => inspect::status(&state()?, json).await?,
        Command::Dead {
            sink,
            run,
            json,
            purge: false,
        } => inspect::dead(&state()?, sink, run, json).await?,
        Command::Dead {
            sink,
            run,
            purge: true,
            ..
        } => change::purge_dead(&state()?, sink, run).await?,
        Command::Replay { sink, run, id } => change::replay(&state()?, sink, run, id).await?,
        Command::SendTest {
            sink,
            event_type,
            run,
        } => {
            let config = Config::load(&cli.config)?;
            if !send_test::send_test(&config, &sink, &event_type, run.as_deref()).await? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Forward {
            run_ids,
            to,
            secret,
            token,
            cookie,
            api,
            poll_interval,
        } => {
            let options = forward::Options {
                run_ids,
                to,
                secret,
                token,
                cookie,
                api,
                poll_interval,
                state: cli.state,
            };
            forward::forward(options).await?
        }
    }
    Ok(ExitCode::SUCCESS)
}
