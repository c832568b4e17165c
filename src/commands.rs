//! Command glue: each CLI command as a function. `anyhow` lives here and in
//! `main.rs` only.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use crate::cli::{Cli, Command};
use runhook::config::{Config, StateConfig};
use runhook::store::pg::Replica;
use runhook::store::{Location, Reads, State, StateError};

/// `println!` for command output, returning the write's error instead of
/// panicking; see [`Stdout`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(crate::commands::Stdout, $($arg)*)
    }};
}

mod change;
pub(crate) mod forward;
mod inspect;
mod replay;
mod route;
mod run;
mod send_test;
mod tools;
mod top;

/// Standard output for what commands print. A reader that goes away
/// (`runhook dead --json | head -3`) makes the next write fail with
/// `BrokenPipe`; that error is marked [`StdoutClosed`] here and `main` turns
/// it into a quiet exit 0, as `head` asked for no more. Chosen over
/// resetting SIGPIPE to its default: that would need `unsafe`, kill a
/// command in the middle of a state change it is reporting, and exit by
/// signal (141), not 0; and the daemon keeps ignoring SIGPIPE (Rust's
/// default), so a closed socket stays an error it handles, never its death.
/// Only this writer's errors are marked: a broken pipe anywhere else (a
/// sink's socket) is still a failure.
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stdout().lock().write(buf).map_err(mark_closed)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        std::io::stdout().lock().write_all(buf).map_err(mark_closed)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().lock().flush().map_err(mark_closed)
    }
}

/// The reader of runhook's standard output went away.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed by its reader")]
pub struct StdoutClosed;

fn mark_closed(error: std::io::Error) -> std::io::Error {
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        std::io::Error::new(std::io::ErrorKind::BrokenPipe, StdoutClosed)
    } else {
        error
    }
}

/// Whether `error` is (caused by) [`StdoutClosed`]: nothing to report.
pub fn stdout_closed(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .is_some_and(|inner| inner.is::<StdoutClosed>())
    })
}

/// The state a command changes, beside a running daemon or not: opened
/// (created and migrated) as the daemon opens it. Commands write no run's
/// data path, so they never need a fence.
async fn open_state(location: &Location) -> Result<State, StateError> {
    State::open(location, Replica::bystander()).await
}

/// The state a command only reads (`status`, `dead`, `tail`, `top`): must
/// exist already; nothing is created or migrated.
async fn open_reads(location: &Location) -> Result<Reads, StateError> {
    Reads::open(location, Replica::bystander()).await
}

/// The state of a command that needs nothing else: `--state` (a file or a
/// `postgres://` URL), or the config's `[state]`. Only `[state]` is read:
/// these commands run outside the service unit, where its secret files and
/// environment are not (`state.url_file`, the state's own, aside).
fn state_path(state: Option<&Path>, config: &Path) -> anyhow::Result<Location> {
    match state {
        Some(path) => Ok(location_arg(path)),
        None => Ok(StateConfig::load(config)?.location),
    }
}

/// `--state`: a `postgres://` URL names PostgreSQL, anything else a file.
fn location_arg(path: &Path) -> Location {
    match path.to_str() {
        Some(text) => Location::parse(text),
        None => Location::Sqlite(path.to_owned()),
    }
}

/// [`state_path`] and, when the config was read, `state.retain`: what a
/// replay by time can still reach.
fn state_and_retain(
    state: Option<&Path>,
    config: &Path,
) -> anyhow::Result<(Location, Option<std::time::Duration>)> {
    match state {
        Some(path) => Ok((location_arg(path), None)),
        None => {
            let state = StateConfig::load(config)?;
            Ok((state.location, Some(state.retain)))
        }
    }
}

pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let state = || state_path(cli.state.as_deref(), &cli.config);
    match cli.command {
        Command::Demo => tools::demo().await?,
        Command::Simulate { listen, scenario } => tools::simulate(listen, scenario).await?,
        Command::Check => tools::check(&Config::load(&cli.config)?)?,
        Command::Run => run::run(&cli.config, Config::load(&cli.config)?).await?,
        Command::Tail {
            run,
            event_type,
            json,
        } => inspect::tail(&state()?, run, event_type, json).await?,
        Command::Completions { shell } => tools::completions(shell)?,
        Command::GenerateMan { dir } => tools::generate_man(&dir)?,
        Command::Watch { run_id, labels } => change::watch(state, run_id, &labels).await?,
        Command::Unwatch { run_id } => change::unwatch(&state()?, run_id).await?,
        Command::Status {
            json,
            run_states,
            run,
            active,
        } => {
            let filter = inspect::RunFilter {
                states: run_states,
                run,
                active,
            };
            inspect::status(&state()?, &cli.config, filter, json).await?
        }
        Command::Top { interval } => top::top(&state()?, &cli.config, interval).await?,
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
        Command::Route(question) => route::route(&cli.config, question)?,
        Command::Replay(args) => {
            replay::replay_command(cli.state.as_deref(), &cli.config, args).await?
        }
        Command::Backfill(args) => {
            replay::backfill_command(cli.state.as_deref(), &cli.config, args).await?
        }
        Command::SendTest(args) => return send_test::command(&cli.config, args).await,
        Command::Forward(args) => forward::command(args, cli.state).await?,
    }
    Ok(ExitCode::SUCCESS)
}
