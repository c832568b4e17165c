//! `replay --since` and `backfill`: queue stored events again by the time
//! they were recorded. Both reach only what retention kept, and say so.

use runhook::store::Location;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::cli::{BackfillArgs, ReplayArgs};
use runhook::route::EventFacts;
use runhook::store::{RequeueFilter, StoredEvent, TimeRange};

/// `runhook replay`: without `--since`, the dead letters by id, run or sink
/// (which need only the state path); with it, by the time recorded (which
/// reads `state.retain` too, to say what retention may have pruned).
pub(super) async fn replay_command(
    state: Option<&Path>,
    config: &Path,
    args: ReplayArgs,
) -> anyhow::Result<()> {
    let ReplayArgs {
        sink,
        run,
        id,
        since,
        until,
        delivered,
    } = args;
    match since {
        None => super::change::replay(&super::state_path(state, config)?, sink, run, id).await,
        Some(since) => {
            let (path, retain) = super::state_and_retain(state, config)?;
            let window = Window { since, until };
            replay_range(&path, retain, window, sink, run, delivered).await
        }
    }
}

/// `runhook backfill`: reads `state.retain` too, to say what retention may
/// have pruned.
pub(super) async fn backfill_command(
    state: Option<&Path>,
    config: &Path,
    args: BackfillArgs,
) -> anyhow::Result<()> {
    let BackfillArgs {
        sink,
        since,
        until,
        run,
    } = args;
    let (path, retain) = super::state_and_retain(state, config)?;
    let window = Window { since, until };
    backfill(&path, config, retain, sink, window, run).await
}

/// `--since` / `--until` as typed.
pub(super) struct Window {
    pub since: String,
    pub until: Option<String>,
}

/// `replay --since`: the deliveries of events recorded in the window that
/// are dead (and delivered, with `delivered`), queued again with their ids.
pub(super) async fn replay_range(
    state: &Location,
    retain: Option<Duration>,
    window: Window,
    sink: Option<String>,
    run: Option<String>,
    delivered: bool,
) -> anyhow::Result<()> {
    let now = SystemTime::now();
    let filter = RequeueFilter {
        range: window.resolve(now)?,
        sink,
        run,
        delivered,
    };
    let store = super::open_state(state).await?;
    let queued = store.requeue_range(filter.clone()).await?;
    let what = if filter.delivered {
        "dead or delivered"
    } else {
        "dead"
    };
    out!(
        "queued {queued} {what} deliveries again (same ids) of events recorded {}",
        describe(filter.range)
    )?;
    if filter.delivered {
        retention_note(filter.range, retain, now)?;
    }
    Ok(())
}

/// `backfill SINK`: give a sink the stored events its routes would have
/// sent it, had it been configured when they were recorded.
pub(super) async fn backfill(
    state: &Location,
    config: &Path,
    retain: Option<Duration>,
    sink: String,
    window: Window,
    run: Option<String>,
) -> anyhow::Result<()> {
    let now = SystemTime::now();
    let range = window.resolve(now)?;
    let router = runhook::config::load_router(config)?;
    let sink: Arc<str> = Arc::from(sink);
    if !router.routes().iter().any(|r| r.sinks.contains(&sink)) {
        anyhow::bail!(
            "no route in {} sends anything to a sink named `{sink}`",
            config.display()
        );
    }
    let store = super::open_state(state).await?;
    let wanted = sink.clone();
    let routed = move |event: &StoredEvent| {
        let facts = EventFacts {
            event_type: &event.event_type,
            run_id: &event.run_id,
            labels: &event.labels,
            status: event.run_status.as_deref(),
            phase: event.phase.as_deref(),
        };
        router.sinks_for(&facts).contains(&wanted)
    };
    let done = store.backfill(sink.clone(), range, run, routed).await?;
    out!(
        "queued {} events for {sink} (recorded {}; events it already had left alone)",
        done.queued,
        describe(range)
    )?;
    if done.before_prune > 0 {
        out!(
            "left out {} events recorded before retention last pruned: their delivered rows may be gone, so whether {sink} received them cannot be told",
            done.before_prune
        )?;
    }
    if done.skipped > 0 {
        out!(
            "left out {} events older than one of their run that {sink} already has (queued, sent or dead): they would reach it out of order",
            done.skipped
        )?;
    }
    retention_note(range, retain, now)
}

impl Window {
    fn resolve(&self, now: SystemTime) -> anyhow::Result<TimeRange> {
        let since = when(&self.since, now, "--since")?;
        let until = match &self.until {
            Some(until) => when(until, now, "--until")?,
            None => unix_ms(now),
        };
        if since >= until {
            anyhow::bail!("--since must be before --until");
        }
        Ok(TimeRange { since, until })
    }
}

/// A time as typed: a duration ago (`2h`, `30m`) or an RFC 3339 timestamp
/// (`2026-11-30T08:00:00Z`).
fn when(text: &str, now: SystemTime, flag: &str) -> anyhow::Result<i64> {
    if let Ok(ago) = humantime::parse_duration(text) {
        let at = now.checked_sub(ago).unwrap_or(UNIX_EPOCH);
        return Ok(unix_ms(at));
    }
    match humantime::parse_rfc3339_weak(text) {
        Ok(at) => Ok(unix_ms(at)),
        Err(_) => anyhow::bail!(
            "{flag} {text:?}: write a duration ago (\"2h\", \"30m\") or a time (\"2026-11-30T08:00:00Z\")"
        ),
    }
}

fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn describe(range: TimeRange) -> String {
    let at = |ms: i64| {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64))
    };
    format!("from {} to {}", at(range.since), at(range.until))
}

/// Delivered events are pruned after `state.retain`: a range that reaches
/// further back finds only what is left (dead letters are kept).
/// On stderr: a note, not the answer a script reads.
fn retention_note(
    range: TimeRange,
    retain: Option<Duration>,
    now: SystemTime,
) -> anyhow::Result<()> {
    match retain {
        Some(retain) => {
            let horizon = unix_ms(now.checked_sub(retain).unwrap_or(UNIX_EPOCH));
            if range.since < horizon {
                eprintln!(
                    "note: the range starts before the retention horizon (state.retain = {}): delivered events recorded before {} are pruned and could not be queued",
                    humantime::format_duration(retain),
                    humantime::format_rfc3339_seconds(
                        UNIX_EPOCH + Duration::from_millis(horizon.max(0) as u64)
                    )
                );
            }
        }
        None => eprintln!(
            "note: delivered events are pruned after state.retain; older ones could not be queued"
        ),
    }
    Ok(())
}
