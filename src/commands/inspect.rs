//! The commands that only read the state database, beside a running daemon
//! or without one: `status`, `dead` (listing), `tail`. `top` is beside.

use runhook::store::Location;
use std::collections::BTreeMap;
use std::path::Path;

use comfy_table::{Cell, CellAlignment, Table};
use runhook::config::Transport;
use runhook::store::{PrunedRun, Reads, RunRow, RunState, SinkRow, StateError};
use serde::Serialize;

/// Which runs `status` lists. The summary line always counts them all.
#[derive(Debug, Default)]
pub(super) struct RunFilter {
    /// Only runs shown in one of these states (`unwatched` included).
    pub states: Vec<String>,
    pub run: Option<String>,
    /// Only runs being followed: watched, not finished, not stopped by a
    /// 403 or 404.
    pub active: bool,
}

impl RunFilter {
    fn keeps(&self, run: &RunRow) -> bool {
        (self.states.is_empty() || self.states.iter().any(|s| s == shown_state(run)))
            && self.run.as_ref().is_none_or(|id| *id == run.run_id)
            && (!self.active || is_active(run))
    }

    /// Whether a finished run passes the state filters: a pruned one is
    /// shown only then.
    fn keeps_finished(&self) -> bool {
        let finished = RunState::Finished.as_str();
        (self.states.is_empty() || self.states.iter().any(|s| s == finished)) && !self.active
    }
}

/// A run's state as `status` shows it: an unwatched run is `unwatched`
/// whatever ingest last said.
fn shown_state(run: &RunRow) -> &str {
    if run.watched {
        run.state.as_str()
    } else {
        "unwatched"
    }
}

fn is_active(run: &RunRow) -> bool {
    run.watched && run.state != RunState::Finished && !run.state.is_ended()
}

/// A sink as `status` shows it.
#[derive(Debug, Serialize)]
struct SinkStatus {
    #[serde(flatten)]
    row: SinkRow,
    /// How long the oldest pending delivery has waited since it was queued (seconds).
    oldest_pending_age_s: Option<i64>,
}

pub(super) async fn status(
    state: &Location,
    config: &Path,
    filter: RunFilter,
    json: bool,
) -> anyhow::Result<()> {
    let reader = super::open_reads(state).await?;
    let runs = reader.runs().await?;
    let now = runhook::store::now_ms();
    let (sinks, oldest) = sinks_and_oldest(&reader, config).await?;
    let sinks: Vec<SinkStatus> = sinks
        .into_iter()
        .map(|row| SinkStatus {
            oldest_pending_age_s: oldest.get(&row.sink).map(|at| (now - at).max(0) / 1000),
            row,
        })
        .collect();
    let summary = summary(&runs, reader.pruned_count().await?, &sinks);
    let runs: Vec<RunRow> = runs.into_iter().filter(|r| filter.keeps(r)).collect();
    // Pruned runs are counted, not listed (there may be many); one named
    // with `--run` is shown.
    let pruned = match &filter.run {
        Some(id) if runs.is_empty() && filter.keeps_finished() => {
            reader.pruned_run(id.clone()).await?
        }
        _ => None,
    };
    let mut out = String::new();
    if json {
        let status = serde_json::json!({
            "summary": summary, "runs": runs, "pruned": pruned.as_slice(), "sinks": sinks
        });
        out = serde_json::to_string_pretty(&status)? + "\n";
    } else {
        out.push_str(&format!("{summary}\n\n"));
        let mut runs = runs_table(&runs, now);
        if let Some(pruned) = &pruned {
            add_pruned_row(&mut runs, pruned, now);
        }
        push_table(&mut out, &runs);
        out.push('\n');
        push_table(&mut out, &sinks_table(&sinks, now));
    }
    out!("{}", out.trim_end_matches('\n'))?;
    Ok(())
}

/// The first line of `status`: every run and sink counted, whatever the
/// filter lists, and the finished runs pruned from the runs table.
fn summary(runs: &[RunRow], pruned: i64, sinks: &[SinkStatus]) -> String {
    let mut by_state: BTreeMap<&str, usize> = BTreeMap::new();
    for run in runs {
        *by_state.entry(shown_state(run)).or_default() += 1;
    }
    let states: Vec<String> = by_state
        .iter()
        .map(|(state, n)| format!("{n} {state}"))
        .collect();
    let pending: i64 = sinks.iter().map(|s| s.row.pending).sum();
    let dead: i64 = sinks.iter().map(|s| s.row.dead).sum();
    let down = sinks.iter().filter(|s| s.row.down).count();
    let pruned = match pruned {
        0 => String::new(),
        n => format!("; {n} finished runs pruned"),
    };
    format!(
        "{} runs ({}){pruned}; {} sinks ({} down); {pending} pending, {dead} dead",
        runs.len(),
        if states.is_empty() {
            "none".to_owned()
        } else {
            states.join(", ")
        },
        sinks.len(),
        down,
    )
}

/// A pruned run's line in the runs table: what its tombstone keeps.
fn add_pruned_row(table: &mut Table, pruned: &PrunedRun, now: i64) {
    table.add_row([
        pruned.run_id.clone(),
        "finished (pruned)".to_owned(),
        "-".to_owned(),
        pruned.cursor.to_string(),
        pruned.status.clone().unwrap_or_else(|| "-".into()),
        "-".to_owned(),
        "-".to_owned(),
        "-".to_owned(),
        format!(
            "finished {} ago, pruned {} ago (state.retain): not ingested again",
            age(now - pruned.finished_at),
            age(now - pruned.pruned_at)
        ),
    ]);
}

/// Columns two spaces apart, no borders: easy to read and to `grep`/`awk`.
fn table(header: &[&str], right_aligned: &[usize]) -> Table {
    let mut table = Table::new();
    table.load_style(comfy_table::presets::NOTHING);
    table.set_header(header.iter().map(Cell::new));
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    for &column in right_aligned {
        if let Some(column) = table.column_mut(column) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
}

/// Lines without the padding of the last column.
fn push_table(out: &mut String, table: &Table) {
    for line in table.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

fn runs_table(runs: &[RunRow], now: i64) -> Table {
    let mut table = table(
        &[
            "RUN",
            "STATE",
            "TRANSPORT",
            "CURSOR",
            "STATUS",
            "PHASE",
            "LAG",
            "LAST EVT",
            "LAST ERROR",
        ],
        &[3, 6, 7],
    );
    for run in runs {
        table.add_row([
            run.run_id.clone(),
            shown_state(run).to_owned(),
            run.transport.map_or("-", Transport::name).to_owned(),
            run.cursor.to_string(),
            run.status.clone().unwrap_or_else(|| "-".into()),
            run.phase.clone().unwrap_or_else(|| "-".into()),
            run.lag.map_or("-".into(), |l| l.to_string()),
            run.last_event_at.map_or("-".into(), |t| age(now - t)),
            run.last_error.clone().unwrap_or_default(),
        ]);
    }
    table
}

fn sinks_table(sinks: &[SinkStatus], now: i64) -> Table {
    let mut table = table(
        &[
            "SINK",
            "PENDING",
            "OLDEST",
            "RETRYING",
            "DONE",
            "DEAD",
            "UP",
            "LAST SUCCESS",
        ],
        &[1, 2, 3, 4, 5],
    );
    for sink in sinks {
        let row = &sink.row;
        table.add_row([
            row.sink.clone(),
            row.pending.to_string(),
            sink.oldest_pending_age_s
                .map_or("-".into(), |s| age(s * 1000)),
            row.retrying.to_string(),
            row.done.to_string(),
            row.dead.to_string(),
            if row.down { "down" } else { "up" }.to_owned(),
            row.last_success_at
                .map_or("-".into(), |t| format!("{} ago", age(now - t))),
        ]);
    }
    table
}

/// [`all_sinks`], and when each one's oldest pending delivery was queued
/// (unix ms; absent when none waits).
pub(super) async fn sinks_and_oldest(
    reader: &Reads,
    config: &Path,
) -> Result<(Vec<SinkRow>, BTreeMap<String, i64>), StateError> {
    let sinks = all_sinks(reader.sinks().await?, config);
    let oldest = reader
        .oldest_pending(sinks.iter().map(|s| s.sink.clone()).collect())
        .await?
        .into_iter()
        .collect();
    Ok((sinks, oldest))
}

/// The sinks the database knows, and the configured ones it does not yet
/// (no deliveries so far) with zero counts, by name. The config is read
/// only for its sink names, as TOML: no env vars, no secret files, and a
/// missing or broken config just leaves the database's sinks.
pub(super) fn all_sinks(known: Vec<SinkRow>, config: &Path) -> Vec<SinkRow> {
    let mut sinks: BTreeMap<String, SinkRow> =
        known.into_iter().map(|s| (s.sink.clone(), s)).collect();
    for name in configured_sink_names(config) {
        sinks.entry(name.clone()).or_insert(SinkRow {
            sink: name,
            pending: 0,
            retrying: 0,
            done: 0,
            dead: 0,
            down: false,
            last_success_at: None,
        });
    }
    sinks.into_values().collect()
}

fn configured_sink_names(config: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(config) else {
        return Vec::new();
    };
    match text.parse::<toml::Table>() {
        Ok(table) => match table.get("sinks") {
            Some(toml::Value::Table(sinks)) => sinks.keys().cloned().collect(),
            _ => Vec::new(),
        },
        Err(error) => {
            eprintln!(
                "note: {} is not valid TOML ({}); listing the sinks the state database knows",
                config.display(),
                error.message()
            );
            Vec::new()
        }
    }
}

pub(super) async fn dead(
    state: &Location,
    sink: Option<String>,
    run: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let reader = super::open_reads(state).await?;
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
    state: &Location,
    run: Option<String>,
    event_type: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let reader = super::open_reads(state).await?;
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
pub(super) fn age(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: &str, watched: bool, state: RunState) -> RunRow {
        RunRow {
            run_id: id.into(),
            watched,
            cursor: 0,
            status: None,
            phase: None,
            transport: None,
            state,
            last_error: None,
            lag: None,
            last_event_at: None,
            owner: None,
        }
    }

    fn sink(name: &str, pending: i64, dead: i64, down: bool) -> SinkStatus {
        SinkStatus {
            row: SinkRow {
                sink: name.into(),
                pending,
                retrying: 0,
                done: 0,
                dead,
                down,
                last_success_at: None,
            },
            oldest_pending_age_s: None,
        }
    }

    fn runs() -> Vec<RunRow> {
        vec![
            run("a", true, RunState::Following),
            run("b", true, RunState::Stalled),
            run("c", true, RunState::Finished),
            run("d", false, RunState::Following),
            run("e", true, RunState::Forbidden),
            run("f", true, RunState::Following),
        ]
    }

    fn kept(filter: RunFilter) -> Vec<String> {
        runs()
            .into_iter()
            .filter(|r| filter.keeps(r))
            .map(|r| r.run_id)
            .collect()
    }

    #[test]
    fn filters_by_shown_state_run_and_activity() {
        assert_eq!(kept(RunFilter::default()).len(), 6);
        let states = |s: &[&str]| RunFilter {
            states: s.iter().map(|s| s.to_string()).collect(),
            ..RunFilter::default()
        };
        assert_eq!(kept(states(&["following"])), ["a", "f"], "d is unwatched");
        assert_eq!(kept(states(&["unwatched", "stalled"])), ["b", "d"]);
        let one = RunFilter {
            run: Some("c".into()),
            ..RunFilter::default()
        };
        assert_eq!(kept(one), ["c"]);
        let active = RunFilter {
            active: true,
            ..RunFilter::default()
        };
        assert_eq!(kept(active), ["a", "b", "f"]);
    }

    #[test]
    fn a_pruned_run_passes_only_filters_that_keep_finished_runs() {
        let filter = |states: &[&str], active| RunFilter {
            states: states.iter().map(|s| s.to_string()).collect(),
            run: Some("gone".into()),
            active,
        };
        assert!(filter(&[], false).keeps_finished());
        assert!(filter(&["stalled", "finished"], false).keeps_finished());
        assert!(!filter(&["following"], false).keeps_finished());
        assert!(
            !filter(&[], true).keeps_finished(),
            "a pruned run is not active"
        );
    }

    #[test]
    fn summary_counts_every_run_and_sink() {
        let sinks = [sink("archive", 0, 0, false), sink("ops", 12, 3, true)];
        assert_eq!(
            summary(&runs(), 0, &sinks),
            "6 runs (1 finished, 2 following, 1 forbidden, 1 stalled, 1 unwatched); \
             2 sinks (1 down); 12 pending, 3 dead"
        );
        assert_eq!(
            summary(&[], 0, &[]),
            "0 runs (none); 0 sinks (0 down); 0 pending, 0 dead"
        );
    }

    /// Finished runs pruned from the runs table are no longer among the
    /// runs, but the summary still counts them.
    #[test]
    fn summary_counts_pruned_finished_runs() {
        assert_eq!(
            summary(&runs()[..1], 40, &[sink("archive", 0, 0, false)]),
            "1 runs (1 following); 40 finished runs pruned; 1 sinks (0 down); 0 pending, 0 dead"
        );
    }

    #[test]
    fn configured_sinks_are_listed_without_deliveries_and_without_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("runhook.toml");
        std::fs::write(
            &config,
            "[api]\ntoken = \"${UNSET_AND_NEVER_READ}\"\n\
             [sinks.quiet]\ntype = \"file\"\npath = \"/x\"\n\
             [sinks.ops]\ntype = \"webhook\"\nsecret_file = \"/nonexistent\"\n",
        )
        .unwrap();
        let known = vec![
            sink("archive", 1, 0, false).row,
            sink("ops", 2, 0, false).row,
        ];
        let names: Vec<(String, i64)> = all_sinks(known.clone(), &config)
            .into_iter()
            .map(|s| (s.sink, s.pending))
            .collect();
        assert_eq!(
            names,
            [
                ("archive".into(), 1),
                ("ops".into(), 2),
                ("quiet".into(), 0)
            ]
        );
        let without_config = all_sinks(known, &dir.path().join("missing.toml"));
        assert_eq!(without_config.len(), 2, "the database's sinks only");
    }
}
