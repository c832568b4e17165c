//! The command line (clap derive): each command with its help and an example.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "runhook",
    version,
    about = "Follow Travelmode agent runs and deliver their events to webhooks, Slack and files."
)]
pub struct Cli {
    /// The config file.
    #[arg(long, global = true, env = "RUNHOOK_CONFIG", default_value = runhook::config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// The state database, for the commands that only read or change state.
    ///
    /// watch, unwatch, status, top, dead, replay, tail: with --state no config
    /// file is needed; without it they read only the config's `[state]`,
    /// never its secrets or variables (backfill reads its routes too).
    /// For `forward`, a directory that keeps its cursor across restarts.
    #[arg(long, global = true)]
    pub state: Option<PathBuf>,
    /// Log format: human on a terminal, json for machines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon. SIGTERM/SIGINT stop ingest, finish in-flight deliveries and exit 0.
    ///
    /// Example: runhook --config /etc/runhook/runhook.toml run
    Run,
    /// Validate the config and print the routing table; exit 78 on error.
    ///
    /// Offline unless --online: then it also connects to the state (a
    /// PostgreSQL server: reachable, the login accepted, the role's rights;
    /// a SQLite file: its directory writable) and exits 69 (unavailable) or
    /// 77 (a credential or a grant to fix) with the reason.
    ///
    /// Example: runhook --config ./runhook.toml check --online
    Check {
        /// Also try the state where the config puts it, as `runhook run` will.
        #[arg(long)]
        online: bool,
    },
    /// Follow a run (the running daemon picks it up within a second).
    ///
    /// Example: runhook watch 9f2a1c7e-0000-4000-8000-000000000001 --label team=rome
    Watch {
        run_id: String,
        /// A label for routing, key=value; repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Stop following a run; what was recorded is still delivered.
    ///
    /// Example: runhook unwatch 9f2a1c7e-0000-4000-8000-000000000001
    Unwatch { run_id: String },
    /// Show a summary line, runs (cursor, status, phase, transport, state) and every sink (pending, oldest pending, done, dead).
    ///
    /// Example: runhook status --run-state stalled --run-state reconnecting
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Only runs in this state (repeatable): starting, following,
        /// reconnecting, retrying, catching_up, stalled, auth_failed,
        /// finished, not_found, forbidden, unwatched. Not `--state`: that
        /// global flag names the state database.
        #[arg(long = "run-state", value_name = "STATE", value_parser = run_state)]
        run_states: Vec<String>,
        /// Only this run.
        #[arg(long)]
        run: Option<String>,
        /// Only runs being followed: watched, not finished, not stopped by a 403 or 404.
        #[arg(long)]
        active: bool,
    },
    /// A live view of runs and sinks: events/s in, deliveries/s out, pending, dead, sinks down; q quits.
    ///
    /// Example: runhook --state /var/lib/runhook/runhook.db top
    Top {
        /// How often to read the state database again.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
    },
    /// List dead letters (id, sink, attempts, last status and error, age), or purge them.
    ///
    /// Example: runhook dead --sink ops --json
    Dead {
        #[arg(long)]
        sink: Option<String>,
        #[arg(long)]
        run: Option<String>,
        #[arg(long)]
        json: bool,
        /// Delete the matching dead letters for good instead of listing them.
        #[arg(long)]
        purge: bool,
    },
    /// Queue dead letters again, with the same ids; --since: by time recorded.
    ///
    /// Works while the daemon runs. With --since, the dead letters of events
    /// recorded in a time range, and with --delivered the delivered
    /// deliveries too (a receiver lost its database). Delivered events are
    /// pruned after state.retain: that bounds what a range can reach.
    ///
    /// Example: runhook replay --sink ops --run 9f2a1c7e-0000-4000-8000-000000000001
    ///
    /// Example: runhook replay --sink ops --since 2h --until 1h --delivered
    Replay(ReplayArgs),
    /// Give a sink added later the stored events its routes match.
    ///
    /// Routes each event recorded in the range with the config's current
    /// routes (and the run's current labels); an event the sink already has
    /// is left alone, so running it twice queues nothing more. Delivered
    /// events are pruned after state.retain: that bounds what is left.
    ///
    /// Example: runhook backfill archive --since 24h
    Backfill(BackfillArgs),
    /// Which sinks (and routes) an event with these facts would go to.
    ///
    /// Exits 0 even when none would, and says so. Reads only the config's
    /// routes: no secret file, no state.
    ///
    /// Example: runhook route --type run_finished --status failed --label team=rome
    Route(RouteArgs),
    /// Print events as they are recorded (beside a running daemon); Ctrl-C stops.
    ///
    /// Example: runhook tail --run 9f2a1c7e-0000-4000-8000-000000000001 --type 'run_finished'
    Tail {
        #[arg(long)]
        run: Option<String>,
        /// Only this event type.
        #[arg(long = "type")]
        event_type: Option<String>,
        /// One JSON envelope per line (as the file sink writes them).
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script.
    ///
    /// Example: runhook completions bash > /etc/bash_completion.d/runhook
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (runhook.1 and one runhook-COMMAND.1 per command)
    /// into DIR. Hidden: packaging runs it (the .deb ships the pages), so
    /// the pages always describe the binary they ship with.
    #[command(hide = true)]
    GenerateMan { dir: PathBuf },
    /// Serve a local fake of the Agent Runs API with scripted runs and faults.
    ///
    /// Example: runhook simulate --listen 127.0.0.1:8787 --scenario scenario.toml
    Simulate {
        #[arg(long, default_value = "127.0.0.1:8787")]
        listen: std::net::SocketAddr,
        /// A scenario file (TOML); the built-in demo runs when absent.
        #[arg(long)]
        scenario: Option<PathBuf>,
    },
    /// Send one sample event, marked `"test": true`, through a configured sink, exactly as the
    /// daemon would (signature, Block Kit, file line), and print what was sent and what the sink
    /// answered. Records nothing in the state database.
    ///
    /// Example: runhook --config ./runhook.toml send-test chat --type PHASE_STARTED
    SendTest(SendTestArgs),
    /// No config: follow runs and POST each event, signed, to URL, printing one line per
    /// delivery; Ctrl-C stops. `--state DIR` keeps the cursor (and a generated secret) so a
    /// restart resumes; otherwise the state lives in a temp dir.
    ///
    /// Example: TRAVELMODE_TOKEN=... runhook forward 9f2a1c7e-0000-4000-8000-000000000001 --to http://localhost:3000/hooks
    Forward(ForwardArgs),
    /// Simulator + daemon + a file sink in one process, on a temp dir: try runhook in one command.
    ///
    /// Example: cargo run --release -- demo
    Demo,
}

// The options of the commands that take many, handed whole to the command's
// module. Plain comments on these structs, not doc comments: the variant's
// doc comment is the command's help, and clap could take the struct's.

// The options of `runhook replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[arg(long)]
    pub sink: Option<String>,
    #[arg(long)]
    pub run: Option<String>,
    /// One event id, e.g. 9f2a...:15
    #[arg(long, conflicts_with = "since")]
    pub id: Option<String>,
    /// Only events recorded since: a duration ago (2h) or a time (2026-11-30T08:00:00Z).
    #[arg(long)]
    pub since: Option<String>,
    /// Only events recorded before: a duration ago or a time; default now.
    #[arg(long, requires = "since")]
    pub until: Option<String>,
    /// Delivered events too, not only dead letters (a receiver lost its database).
    #[arg(long, requires = "since")]
    pub delivered: bool,
}

// The options of `runhook backfill`.
#[derive(Debug, Args)]
pub struct BackfillArgs {
    /// A sink of the config, named by a route.
    pub sink: String,
    /// Events recorded since: a duration ago (24h) or a time (2026-11-30T08:00:00Z).
    #[arg(long)]
    pub since: String,
    /// Events recorded before: a duration ago or a time; default now.
    #[arg(long)]
    pub until: Option<String>,
    /// Only this run's events.
    #[arg(long)]
    pub run: Option<String>,
}

// The options of `runhook route`.
#[derive(Debug, Args)]
pub struct RouteArgs {
    /// The event type, e.g. run_finished or ARTIFACT_CREATED.
    #[arg(long = "type")]
    pub event_type: String,
    /// The run's status when the event is seen.
    #[arg(long)]
    pub status: Option<String>,
    /// The run's phase when the event is seen.
    #[arg(long)]
    pub phase: Option<String>,
    /// A run label, key=value; repeatable.
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// The run id; without it, routes with a `runs` filter do not match.
    #[arg(long)]
    pub run: Option<String>,
}

// The options of `runhook send-test`.
#[derive(Debug, Args)]
pub struct SendTestArgs {
    /// The sink's name, as in `[sinks.NAME]`.
    pub sink: String,
    /// The sample's event type: run_finished, PHASE_STARTED, ARTIFACT_CREATED or any other.
    #[arg(long = "type", default_value = "run_finished")]
    pub event_type: String,
    /// The run id the sample carries (with that run's labels if the config lists it).
    #[arg(long)]
    pub run: Option<String>,
}

// The options of `runhook forward`.
#[derive(Debug, Args)]
pub struct ForwardArgs {
    /// The runs to follow.
    #[arg(required = true)]
    pub run_ids: Vec<String>,
    /// Where each event is POSTed (Standard Webhooks).
    #[arg(long)]
    pub to: String,
    /// The signing secret (`whsec_...`); a new one is generated and printed when absent.
    #[arg(long, env = "RUNHOOK_FORWARD_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// The bearer token (polling).
    #[arg(long, env = "TRAVELMODE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The session cookie (the live SSE stream).
    #[arg(long, env = "TRAVELMODE_COOKIE", hide_env_values = true)]
    pub cookie: Option<String>,
    /// The Agent Runs API.
    #[arg(
        long,
        env = "TRAVELMODE_API",
        default_value = "https://api.travelmode.ai"
    )]
    pub api: String,
    /// How often an idle run is polled.
    #[arg(long, default_value = "2s")]
    pub poll_interval: String,
    /// The global `--state` (a directory for `forward`: it keeps the cursor;
    /// `None`: a temp dir), set after parsing.
    #[arg(skip)]
    pub state: Option<std::path::PathBuf>,
}

/// Writes one page per visible command, from the same clap definitions the
/// binary parses with, so the pages cannot drift from the flags.
pub fn generate_man(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), dir)
}

/// A state `status --run-state` can filter on: a stored run state, or
/// `unwatched`.
fn run_state(text: &str) -> Result<String, String> {
    if text == "unwatched" || runhook::store::RunState::parse(text).is_some() {
        return Ok(text.to_owned());
    }
    let known: Vec<&str> = runhook::store::RunState::ALL
        .iter()
        .map(|state| state.as_str())
        .chain(["unwatched"])
        .collect();
    Err(format!("not a run state; one of {}", known.join(", ")))
}
