//! Parses the command line and dispatches; errors become exit codes here.

mod cli;
mod commands;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};

/// sysexits.h EX_CONFIG: what `check` (and every command) exits with on a bad
/// config, or a bad `RUNHOOK_LOG`.
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Demo | Command::SendTest { .. } => "warn",
        _ => "info",
    };
    let json = matches!(cli.log_format, cli::LogFormat::Json);
    let logging = match cli.command {
        // Its delivery lines come from log events: its own subscriber.
        Command::Forward { .. } => commands::forward::init_logging(cli.log_format),
        _ => runhook::logging::init(json, default_level),
    };
    if let Err(error) = logging {
        eprintln!("runhook: {error}");
        return ExitCode::from(EX_CONFIG);
    }
    // Store reads run on the blocking pool; a small pool keeps threads (and
    // their malloc arenas) few, which keeps memory bounded.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(8)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("runhook: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(commands::dispatch(cli));
    runhook::logging::flush();
    match outcome {
        Ok(code) => code,
        Err(error) => {
            if error
                .downcast_ref::<runhook::config::ConfigError>()
                .is_some()
            {
                eprintln!("runhook: config error: {error}");
                return ExitCode::from(EX_CONFIG);
            }
            if commands::stdout_closed(&error) {
                return ExitCode::SUCCESS;
            }
            eprintln!("runhook: {error:#}");
            ExitCode::FAILURE
        }
    }
}
