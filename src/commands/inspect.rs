//! The commands that only read the state database, beside a running daemon
//! or without one: `status`, `dead` (listing), `tail`.

use std::path::Path;

use runhook::config::Transport;
use runhook::store::Reader;

pub(super) async fn status(state: &Path, json: bool) -> anyhow::Result<()> {
    let reader = Reader::open(state)?;
    let runs = reader.runs().await?;
    let sinks = reader.sinks().await?;
    if json {
        out!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "runs": runs, "sinks": sinks }))?
        )?;
        return Ok(());
    }
    let now = runhook::store::now_ms();
    out!(
        "{:<38} {:<12} {:<9} {:>7} {:<10} {:<10} {:>5} {:>9}  LAST ERROR",
        "RUN",
        "STATE",
        "TRANSPORT",
        "CURSOR",
        "STATUS",
        "PHASE",
        "LAG",
        "LAST EVT"
    )?;
    for run in &runs {
        out!(
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
        )?;
    }
    out!(
        "\n{:<16} {:>8} {:>9} {:>9} {:>6} {:<5} LAST SUCCESS",
        "SINK",
        "PENDING",
        "RETRYING",
        "DONE",
        "DEAD",
        "UP"
    )?;
    for sink in &sinks {
        out!(
            "{:<16} {:>8} {:>9} {:>9} {:>6} {:<5} {}",
            sink.sink,
            sink.pending,
            sink.retrying,
            sink.done,
            sink.dead,
            if sink.down { "down" } else { "up" },
            sink.last_success_at
                .map_or("-".into(), |t| format!("{} ago", age(now - t))),
        )?;
    }
    Ok(())
}

pub(super) async fn dead(
    state: &Path,
    sink: Option<String>,
    run: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let reader = Reader::open(state)?;
    let letters = reader.dead_letters(sink, run).await?;
    if json {
        out!("{}", serde_json::to_string_pretty(&letters)?)?;
        return Ok(());
    }
    let now = runhook::store::now_ms();
    out!(
        "{:<48} {:<12} {:>8} {:>6} {:>8}  LAST ERROR",
        "ID",
        "SINK",
        "ATTEMPTS",
        "STATUS",
        "AGE"
    )?;
    for letter in &letters {
        out!(
            "{:<48} {:<12} {:>8} {:>6} {:>8}  {}",
            letter.id,
            letter.sink,
            letter.attempts,
            letter.last_status.map_or("-".into(), |s| s.to_string()),
            letter.dead_at.map_or("-".into(), |t| age(now - t)),
            letter.last_error.as_deref().unwrap_or(""),
        )?;
    }
    Ok(())
}

/// Prints events as they are recorded, beside a running daemon.
pub(super) async fn tail(
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
                runhook::sink::write_envelope_line(&event.into(), &mut line)?;
                std::io::Write::write_all(&mut super::Stdout, &line)?;
            } else {
                out!(
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
                )?;
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
