//! `runhook send-test SINK`: one sample event through a configured sink, by
//! the sink's own code (the signed Standard Webhooks body, the Block Kit
//! message, the JSON line), printing what was sent and what came back. The
//! first thing a team does after wiring a sink up.
//!
//! A test event is not a delivery: nothing is recorded in the state
//! database, and the daemon's database is never opened (so it works beside
//! a running daemon, which holds it). Slack's thread mode keeps a run's
//! thread in a store: the test gets a throwaway one in a temp dir, so it
//! posts its own root and one reply, and never lands in a real run's thread.

use runhook::store::Location;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde_json::json;

use crate::cli::SendTestArgs;
use runhook::config::{Config, SinkConfig, SinkKind, SlackConfig};
use runhook::deliver::threads::StoredThreads;
use runhook::ownership::Ownership;
use runhook::sink::Outcome;
use runhook::sink::file::FileSink;
use runhook::sink::slack::SlackSink;
use runhook::sink::slack::message::Message;
use runhook::sink::webhook::WebhookSink;
use runhook::store::{DaemonLock, Pending, StoreError};

/// The run id a sample carries when `--run` is not given.
const SAMPLE_RUN: &str = "00000000-0000-4000-8000-000000000000";
/// The first line of every test message in Slack.
const SLACK_MARK: &str = ":test_tube: *Test event* sent by `runhook send-test`";

/// `runhook send-test`: exit 1 when the sink did not accept the sample, so
/// a script can tell.
pub(super) async fn command(config: &Path, args: SendTestArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(config)?;
    let accepted = send_test(&config, &args.sink, &args.event_type, args.run.as_deref()).await?;
    Ok(if accepted {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Sends the sample through `sink_name`; `Ok(false)` when the sink did not
/// accept it (the command then exits 1).
pub(super) async fn send_test(
    config: &Config,
    sink_name: &str,
    event_type: &str,
    run: Option<&str>,
) -> anyhow::Result<bool> {
    let Some(sink) = config.sinks.get(sink_name) else {
        let known: Vec<&str> = config.sinks.keys().map(String::as_str).collect();
        bail!(
            "no sink named {sink_name:?} in {} (sinks: {})",
            config.source.display(),
            known.join(", ")
        );
    };
    let event = sample(config, event_type, run)?;
    let mut out = crate::commands::Stdout;
    writeln!(
        out,
        "sink {} ({}): {}",
        sink.name,
        sink.kind.type_name(),
        sink.kind.describe_target()
    )?;
    let outcome = match &sink.kind {
        SinkKind::Webhook(webhook) => to_webhook(webhook, &event, &mut out).await?,
        SinkKind::Slack(slack) => to_slack(sink, slack, &event, &mut out).await?,
        SinkKind::File(file) => to_file(&file.path, &config.state.location, &event, &mut out)?,
    };
    Ok(outcome == Outcome::Delivered)
}

/// A test event's id: `test_` and 32 hex digits (16 random bytes). Every
/// real id has a colon (`{runId}:{sequence}`, `{runId}:finished:{n}`) and
/// this one has none, so it can never equal a real id, and a receiver that
/// de-duplicates by `webhook-id` never mistakes a test for a real event.
pub(super) fn test_id() -> String {
    let bytes: [u8; 16] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("test_{hex}")
}

/// A realistic event of `event_type`, as ingest would have recorded it.
fn sample(config: &Config, event_type: &str, run: Option<&str>) -> anyhow::Result<Pending> {
    let run_id = run.unwrap_or(SAMPLE_RUN).to_owned();
    let labels = config
        .runs
        .iter()
        .find(|spec| spec.id == run_id)
        .map(|spec| serde_json::to_string(&spec.labels))
        .transpose()?
        .unwrap_or_else(|| "{}".to_owned());
    let finished = event_type == "run_finished";
    let payload = match event_type {
        "run_finished" => json!({"status": "completed", "lastSequence": 42}),
        "PHASE_STARTED" => json!({"phase": "compose"}),
        "ARTIFACT_CREATED" => json!({"artifactType": "proposals", "isPartial": false}),
        _ => json!({}),
    };
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let now = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(now_ms as u64));
    Ok(Pending {
        event: 0,
        id: test_id(),
        run_id,
        sequence: (!finished).then_some(42),
        event_type: event_type.to_owned(),
        payload: payload.to_string(),
        created_at: (!finished).then(|| now.to_string()),
        run_status: Some(if finished { "completed" } else { "running" }.to_owned()),
        phase: Some(if finished { "done" } else { "compose" }.to_owned()),
        labels,
        attempts: 0,
        next_attempt_at: 0,
        seen_at: now_ms,
        queued_at: now_ms,
    })
}

async fn to_webhook(
    config: &runhook::config::WebhookConfig,
    event: &Pending,
    out: &mut impl Write,
) -> anyhow::Result<Outcome> {
    let sink = WebhookSink::new(config).context("building the webhook's HTTP client")?;
    let body = WebhookSink::test_body(&event.into())?;
    writeln!(
        out,
        "--> POST webhook-id: {} ({} signature{})",
        event.id,
        config.secrets.len(),
        if config.secrets.len() == 1 { "" } else { "s" }
    )?;
    writeln!(out, "{}", String::from_utf8_lossy(&body))?;
    let started = Instant::now();
    let answer = sink.post(&event.id, &event.event_type, body).await;
    let status = answer
        .status
        .map_or_else(|| "no answer".to_owned(), |s| s.to_string());
    writeln!(
        out,
        "<-- {status} ({} ms) {}",
        started.elapsed().as_millis(),
        answer.excerpt
    )?;
    report(&answer.outcome, out)?;
    Ok(answer.outcome)
}

async fn to_slack(
    sink: &SinkConfig,
    config: &SlackConfig,
    event: &Pending,
    out: &mut impl Write,
) -> anyhow::Result<Outcome> {
    // Thread mode keeps the test's thread here, never in the real database;
    // and the root's metadata names a sink the daemon does not have, so the
    // daemon's look-up for a root it may have posted never adopts a test's.
    let scratch = tempfile::tempdir()?;
    let state = super::open_state(&Location::Sqlite(scratch.path().join("send-test.db"))).await?;
    let name: std::sync::Arc<str> = format!("{} (send-test)", sink.name).into();
    // The scratch database is this command's alone: nothing else writes it.
    let threads = StoredThreads::new(name.clone(), state, Ownership::exclusive());
    let slack = SlackSink::new(name, config, std::sync::Arc::new(threads))
        .context("building the Slack HTTP client")?;
    let message = mark_as_test(slack.render(&event.into()));
    writeln!(out, "--> {}", serde_json::to_string_pretty(&message)?)?;
    let started = Instant::now();
    let outcome = slack.send_message(&event.into(), &message).await;
    writeln!(
        out,
        "<-- {} ({} ms)",
        describe(&outcome),
        started.elapsed().as_millis()
    )?;
    report(&outcome, out)?;
    Ok(outcome)
}

/// The daemon's message with a first block and a text prefix that say it is
/// a test: within Slack's limits still (the daemon's messages have at most
/// two blocks).
fn mark_as_test(mut message: Message) -> Message {
    message.blocks.insert(
        0,
        json!({"type": "context", "elements": [{"type": "mrkdwn", "text": SLACK_MARK}]}),
    );
    message.text = format!("[test] {}", message.text);
    message
}

/// Appends the test line, but only where the daemon's file protocol allows
/// another writer: the daemon is the file's only writer while it runs (its
/// cut-back after a failed write assumes so), and after a crash it mends a
/// torn last line when it starts. A line glued onto a torn one would pass
/// for that event's line and lose it; so the daemon must be stopped (its
/// lock is held here while writing, so it cannot start meanwhile) and the
/// file must end with a whole line.
fn to_file(
    path: &Path,
    state: &Location,
    event: &Pending,
    out: &mut impl Write,
) -> anyhow::Result<Outcome> {
    // A replica may be writing the file right now, and no lock here can
    // tell: only the SQLite state has the one daemon's lock to take.
    let Some(state) = state.sqlite_path() else {
        bail!(
            "with the state in PostgreSQL the file sink's node writes {}, and send-test cannot tell whether it is running; send a test through a webhook or Slack sink, or stop that replica",
            path.display()
        );
    };
    let _lock = match DaemonLock::acquire(state) {
        Ok(lock) => Some(lock),
        Err(StoreError::Locked { holder, .. }) => bail!(
            "the daemon (pid {holder}) is running on {} and is the only writer of {} while it runs; stop it to send a test line there",
            state.display(),
            path.display()
        ),
        // No directory for the state: no daemon can be running on it.
        Err(_) if !state.parent().is_some_and(Path::exists) => None,
        Err(error) => return Err(error.into()),
    };
    if ends_torn(path)? {
        bail!(
            "{} ends in a torn line (a write the daemon did not finish); the daemon mends it when it starts: start it, then send the test",
            path.display()
        );
    }
    let mut line = Vec::new();
    runhook::sink::write_test_line(&event.into(), &mut line)?;
    write!(out, "--> {}", String::from_utf8_lossy(&line))?;
    let started = Instant::now();
    let sink = FileSink::open(path).with_context(|| format!("opening {}", path.display()))?;
    let outcome = match sink.append(&line) {
        Ok(length) => {
            writeln!(
                out,
                "<-- appended and fsynced ({} ms); {} is {length} bytes",
                started.elapsed().as_millis(),
                path.display()
            )?;
            Outcome::Delivered
        }
        Err(error) => Outcome::Retry {
            status: None,
            error: format!("{}: {error}", path.display()),
            after: None,
        },
    };
    report(&outcome, out)?;
    Ok(outcome)
}

/// Whether the file exists and its last byte is not a newline.
fn ends_torn(path: &Path) -> anyhow::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
    };
    if file.metadata()?.len() == 0 {
        return Ok(false);
    }
    let mut last = [0u8];
    file.seek(SeekFrom::End(-1))?;
    file.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Delivered => "ok".to_owned(),
        Outcome::Retry { error, .. } => error.clone(),
        Outcome::Permanent { error, .. } => error.clone(),
    }
}

/// The verdict, as the daemon would have taken it.
fn report(outcome: &Outcome, out: &mut impl Write) -> std::io::Result<()> {
    match outcome {
        Outcome::Delivered => writeln!(out, "delivered: the daemon would mark this done"),
        Outcome::Retry { error, .. } => {
            writeln!(out, "failed: the daemon would retry this later ({error})")
        }
        Outcome::Permanent { error, .. } => {
            writeln!(
                out,
                "failed: the daemon would dead-letter this at once ({error})"
            )
        }
    }
}
