//! `runhook forward RUN_ID... --to URL`: the receiver developer's loop, like
//! `stripe listen --forward-to`. No config file: a config is built here (the
//! given runs, one webhook sink, one catch-all route) and the normal daemon
//! runs it, so what the receiver gets is exactly what a deployed runhook
//! sends. One line per attempt comes from the webhook sink's attempt events
//! (`runhook::attempt`), printed by a tracing layer.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use base64::Engine as _;
use tokio_util::sync::CancellationToken;
use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::Context as LayerContext;

use crate::cli::{ForwardArgs, LogFormat};
use runhook::config::{Config, ConfigError};
use runhook::sink::webhook::ATTEMPT_TARGET;

/// The sink's name in the built config (and in logs).
const SINK: &str = "forward";
/// Where a generated secret is kept under `--state DIR`, so a restart signs
/// with the secret the receiver was already given.
const SECRET_FILE: &str = "secret";
/// A receiver under development fails often; a fix should be picked up soon.
const MAX_BACKOFF: &str = "10s";

/// Cancelled when a delivery line finds stdout closed (`runhook forward
/// ... | head -2`): the lines are what forward is for, so it stops as on
/// Ctrl-C (in-flight deliveries finish) and exits 0, as `head` asked for
/// no more. A static because the lines are printed by the tracing layer,
/// set up in `main` before the command runs.
static STDOUT_CLOSED: std::sync::LazyLock<CancellationToken> =
    std::sync::LazyLock::new(CancellationToken::new);

/// `runhook forward`; `state` is the global `--state`.
pub(super) async fn command(mut args: ForwardArgs, state: Option<PathBuf>) -> anyhow::Result<()> {
    args.state = state;
    forward(args).await
}

/// Follows the runs until SIGINT/SIGTERM, then lets in-flight deliveries
/// finish and returns.
pub(crate) async fn forward(options: ForwardArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Before anything starts: a signal arriving earlier would kill the process.
    let mut interrupts = signal(SignalKind::interrupt())?;
    let mut terms = signal(SignalKind::terminate())?;
    let temp;
    let dir = match &options.state {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            dir.clone()
        }
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_owned()
        }
    };
    let (secret, generated) = signing_secret(options.secret.as_deref(), options.state.as_deref())?;
    let config = build_config(&options, &secret, &dir)?;
    print_banner(&options, &config, &secret, generated)?;

    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupts.recv() => {}
            _ = terms.recv() => {}
            // Nobody reads the lines any more: nothing to say, just stop.
            _ = STDOUT_CLOSED.cancelled() => {
                stop.cancel();
                return;
            }
        }
        let _ = out!("stopping: finishing in-flight deliveries (again to exit at once)");
        stop.cancel();
        tokio::select! { _ = interrupts.recv() => {}, _ = terms.recv() => {} }
        std::process::exit(1);
    });
    runhook::daemon::run(Arc::new(config), shutdown).await?;
    Ok(())
}

/// `--secret`; else the one kept under `--state DIR`; else a new one (kept
/// there when there is a DIR). `true` when it was generated or kept, so the
/// user has to be told it.
fn signing_secret(given: Option<&str>, state: Option<&Path>) -> anyhow::Result<(String, bool)> {
    if let Some(secret) = given {
        return Ok((secret.to_owned(), false));
    }
    let Some(dir) = state else {
        return Ok((generate_secret(), true));
    };
    let path = dir.join(SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(kept) => return Ok((kept.trim().to_owned(), true)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
    }
    let secret = generate_secret();
    write_private(&path, &secret).with_context(|| format!("writing {}", path.display()))?;
    Ok((secret, true))
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    let mut file = runhook::files::open_private(path, &mut options)?;
    writeln!(file, "{text}")?;
    file.sync_all()
}

/// A fresh signing secret: `whsec_` and 32 random bytes in base64, above
/// the 24 bytes the Standard Webhooks guidance asks for at least.
fn generate_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// The config `runhook run` would need for this, validated by the same
/// code as a config file (so a bad URL or secret fails the same way).
fn build_config(options: &ForwardArgs, secret: &str, dir: &Path) -> anyhow::Result<Config> {
    use toml::{Table, Value};
    // Values are taken literally: `$` would start a `${VAR}` expansion.
    let text = |s: &str| Value::String(s.replace('$', "$$"));
    let mut api = Table::new();
    api.insert("base_url".into(), text(&options.api));
    api.insert("poll_interval".into(), text(&options.poll_interval));
    if let Some(token) = &options.token {
        api.insert("token".into(), text(token));
    }
    if let Some(cookie) = &options.cookie {
        api.insert("session_cookie".into(), text(cookie));
    }
    let mut state = Table::new();
    let db = dir.join("runhook.db");
    state.insert("path".into(), text(&db.to_string_lossy()));
    state.insert("shutdown_grace".into(), text("5s"));
    let runs: Vec<Value> = options
        .run_ids
        .iter()
        .map(|id| Value::Table(Table::from_iter([("id".to_owned(), text(id))])))
        .collect();
    let mut sink = Table::new();
    sink.insert("type".into(), text("webhook"));
    sink.insert("url".into(), text(&options.to));
    sink.insert("secret".into(), text(secret));
    // One request at a time: each `-->` line is followed by its `<--`.
    sink.insert("concurrency".into(), Value::Integer(1));
    sink.insert("max_backoff".into(), text(MAX_BACKOFF));
    let route = Table::from_iter([("sinks".to_owned(), Value::Array(vec![text(SINK)]))]);
    let mut root = Table::new();
    root.insert("api".into(), Value::Table(api));
    root.insert("state".into(), Value::Table(state));
    root.insert("runs".into(), Value::Array(runs));
    root.insert(
        "sinks".into(),
        Value::Table(Table::from_iter([(SINK.to_owned(), Value::Table(sink))])),
    );
    root.insert("routes".into(), Value::Array(vec![Value::Table(route)]));
    let source = dir.join("forward.toml");
    Config::parse(&toml::to_string(&root)?, &source, &|_| None).map_err(option_error)
}

/// A config error in the config built from the options, told as the option
/// the user typed: the file it names exists only in memory.
fn option_error(error: ConfigError) -> anyhow::Error {
    let option = match error.key.as_str() {
        "api" => {
            return anyhow::anyhow!(
                "no credential: give --token (or TRAVELMODE_TOKEN) to poll, and/or --cookie \
                 (or TRAVELMODE_COOKIE) for the live stream"
            );
        }
        "sinks.forward.url" => "--to",
        "sinks.forward.secret" => "--secret",
        "api.base_url" => "--api",
        "api.poll_interval" => "--poll-interval",
        "api.token" => "--token",
        "api.session_cookie" => "--cookie",
        key if key.starts_with("runs") => "RUN_ID",
        key => key,
    };
    anyhow::anyhow!("{option}: {}", error.message)
}

fn print_banner(
    options: &ForwardArgs,
    config: &Config,
    secret: &str,
    generated: bool,
) -> std::io::Result<()> {
    let mut out = crate::commands::Stdout;
    writeln!(out, "signing secret: {secret}")?;
    if generated {
        writeln!(
            out,
            "  (give it to the receiver to verify with; --secret sets one)"
        )?;
    }
    writeln!(
        out,
        "forwarding {} run{} from {} to {}",
        options.run_ids.len(),
        if options.run_ids.len() == 1 { "" } else { "s" },
        runhook::config::url_origin(&config.api.base_url),
        options.to
    )?;
    match &options.state {
        Some(dir) => writeln!(out, "state: {} (a restart resumes)", dir.display())?,
        None => writeln!(
            out,
            "state: temporary (--state DIR resumes after a restart)"
        )?,
    }
    writeln!(out, "Ctrl-C to stop.")
}

/// Logs as every command does (stderr, `RUNHOOK_LOG`, default `warn`), plus
/// the delivery lines on stdout.
pub(crate) fn init_logging(format: LogFormat) -> Result<(), runhook::logging::LogError> {
    let lines = DeliveryLines {
        colour: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    }
    .with_filter(Targets::new().with_target(ATTEMPT_TARGET, tracing::Level::DEBUG))
    .boxed();
    runhook::logging::init_with(matches!(format, LogFormat::Json), "warn", Some(lines))
}

/// Prints `--> id type` when an attempt starts and `<-- 200 (3 ms)` when it
/// is answered, red when it failed.
struct DeliveryLines {
    colour: bool,
}

/// The fields of one attempt event.
#[derive(Default)]
struct Attempt {
    id: String,
    event_type: String,
    status: Option<u64>,
    latency_ms: u64,
    delivered: bool,
    excerpt: String,
}

impl Visit for Attempt {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "id" => self.id = value.to_owned(),
            "event_type" => self.event_type = value.to_owned(),
            _ => {}
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "status" => self.status = Some(value),
            "latency_ms" => self.latency_ms = value,
            _ => {}
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if field.name() == "delivered" {
            self.delivered = value;
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "excerpt" => self.excerpt = format!("{value:?}"),
            "id" => self.id = format!("{value:?}"),
            "event_type" => self.event_type = format!("{value:?}"),
            _ => {}
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for DeliveryLines {
    fn on_event(&self, event: &tracing::Event<'_>, _: LayerContext<'_, S>) {
        let mut attempt = Attempt::default();
        event.record(&mut attempt);
        let line = match attempt.status {
            None => format!("--> {} {}", attempt.id, attempt.event_type),
            Some(status) => self.answer_line(&attempt, status),
        };
        if let Err(error) = writeln!(std::io::stdout().lock(), "{line}") {
            // Its reader went away; any other error (a full disk behind a
            // redirect) leaves the deliveries going.
            if error.kind() == std::io::ErrorKind::BrokenPipe {
                STDOUT_CLOSED.cancel();
            }
        }
    }
}

impl DeliveryLines {
    fn answer_line(&self, attempt: &Attempt, status: u64) -> String {
        let status = match status {
            0 => "no answer".to_owned(),
            code => code.to_string(),
        };
        if attempt.delivered {
            return format!("<-- {status} ({} ms)", attempt.latency_ms);
        }
        let line = format!(
            "<-- {status} ({} ms) {}",
            attempt.latency_ms, attempt.excerpt
        );
        if self.colour {
            format!("\x1b[31m{line}\x1b[0m")
        } else {
            line
        }
    }
}
