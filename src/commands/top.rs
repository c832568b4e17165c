//! `runhook top`: a live terminal view of runs and sinks, like `vector
//! top`. It reads the state database on an interval (beside a running
//! daemon, through WAL read connections, so it never slows ingest). What it
//! shows is [`view`], a pure function of two samples, tested without a
//! terminal; [`draw`] renders a view and is tested on ratatui's
//! `TestBackend`.

use runhook::store::Location;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};
use runhook::store::{Reads, RunState};

use super::inspect::{age, sinks_and_oldest};

/// One look at the state database.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    /// When it was taken (unix ms).
    pub at_ms: i64,
    /// Watched runs by state.
    pub runs: BTreeMap<String, i64>,
    /// The newest event row: rows are numbered in ingest order, so its
    /// growth is the events recorded meanwhile.
    pub last_event_row: i64,
    pub sinks: Vec<SinkSample>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SinkSample {
    pub sink: String,
    pub pending: i64,
    /// Delivered so far (prune removes old ones, so this may shrink).
    pub done: i64,
    pub dead: i64,
    pub down: bool,
    /// When the oldest pending delivery was queued (unix ms).
    pub oldest_pending_at: Option<i64>,
}

/// What the screen shows.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub following: i64,
    pub reconnecting: i64,
    pub stalled: i64,
    /// Every other state of a watched run, by name (starting, retrying,
    /// finished, ...).
    pub other_runs: BTreeMap<String, i64>,
    /// `None` on the first sample: a rate needs two.
    pub events_per_sec: Option<f64>,
    pub sinks: Vec<SinkView>,
    pub sinks_down: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SinkView {
    pub sink: String,
    pub delivered_per_sec: Option<f64>,
    pub pending: i64,
    pub dead: i64,
    pub down: bool,
    /// How long the oldest pending delivery has waited (ms).
    pub oldest_pending_ms: Option<i64>,
}

/// The run states the view counts by name; the others are listed as they come.
const COUNTED: [RunState; 3] = [
    RunState::Following,
    RunState::Reconnecting,
    RunState::Stalled,
];

/// The view of `now`, with rates over the time since `before`.
pub fn view(before: Option<&Sample>, now: &Sample) -> View {
    let seconds = before
        .map(|b| (now.at_ms - b.at_ms) as f64 / 1000.0)
        .filter(|s| *s > 0.0);
    let rate = |then: i64, now: i64| seconds.map(|s| (now - then).max(0) as f64 / s);
    let count = |state: RunState| now.runs.get(state.as_str()).copied().unwrap_or(0);
    let other_runs = now
        .runs
        .iter()
        .filter(|(state, _)| !COUNTED.iter().any(|c| c.as_str() == state.as_str()))
        .map(|(state, n)| (state.clone(), *n))
        .collect();
    let sinks: Vec<SinkView> = now
        .sinks
        .iter()
        .map(|sink| {
            let done_before = before
                .and_then(|b| b.sinks.iter().find(|s| s.sink == sink.sink))
                .map_or(sink.done, |s| s.done);
            SinkView {
                sink: sink.sink.clone(),
                delivered_per_sec: rate(done_before, sink.done),
                pending: sink.pending,
                dead: sink.dead,
                down: sink.down,
                oldest_pending_ms: sink.oldest_pending_at.map(|at| (now.at_ms - at).max(0)),
            }
        })
        .collect();
    View {
        following: count(RunState::Following),
        reconnecting: count(RunState::Reconnecting),
        stalled: count(RunState::Stalled),
        other_runs,
        events_per_sec: before.and_then(|b| rate(b.last_event_row, now.last_event_row)),
        sinks_down: sinks.iter().filter(|s| s.down).count(),
        sinks,
    }
}

/// Renders a view: the runs and ingest rate on top, a table of sinks below.
pub fn draw(frame: &mut Frame, view: &View, state: &Location) {
    let [runs_area, sinks_area, help_area] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(runs_panel(view, state), runs_area);
    frame.render_widget(sinks_table(view), sinks_area);
    frame.render_widget(
        Paragraph::new("q: quit").style(Style::default().add_modifier(Modifier::DIM)),
        help_area,
    );
}

fn runs_panel<'a>(view: &View, state: &Location) -> Paragraph<'a> {
    let mut others: Vec<String> = view
        .other_runs
        .iter()
        .map(|(state, n)| format!("{n} {state}"))
        .collect();
    if others.is_empty() {
        others.push("none other".into());
    }
    let lines = vec![
        Line::from(format!(
            "runs: {} following, {} reconnecting, {} stalled; {}",
            view.following,
            view.reconnecting,
            view.stalled,
            others.join(", ")
        )),
        Line::from(format!(
            "in: {} events/s    sinks down: {}",
            per_sec(view.events_per_sec),
            view.sinks_down
        )),
    ];
    Paragraph::new(lines).block(Block::bordered().title(format!(" runhook top: {state} ")))
}

fn sinks_table<'a>(view: &View) -> Table<'a> {
    let header = Row::new(["SINK", "OUT/S", "PENDING", "OLDEST", "DEAD", "UP"])
        .style(Style::default().add_modifier(Modifier::BOLD));
    let rows = view.sinks.iter().map(|sink| {
        let row = Row::new([
            sink.sink.clone(),
            per_sec(sink.delivered_per_sec),
            sink.pending.to_string(),
            sink.oldest_pending_ms.map_or("-".into(), age),
            sink.dead.to_string(),
            if sink.down { "down" } else { "up" }.to_owned(),
        ]);
        if sink.down {
            row.style(Style::default().fg(Color::Red))
        } else {
            row
        }
    });
    let widths = [
        Constraint::Fill(2),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(5),
    ];
    Table::new(rows, widths)
        .header(header)
        .block(Block::bordered().title(" sinks "))
}

fn per_sec(rate: Option<f64>) -> String {
    rate.map_or("-".into(), |r| format!("{r:.1}"))
}

/// Reads one sample; sinks are the configured ones (when `config` names
/// any) and those the database knows.
pub async fn sample(reader: &Reads, config: &Path) -> anyhow::Result<Sample> {
    let at_ms = runhook::store::now_ms();
    let mut runs = BTreeMap::new();
    for run in reader.runs().await?.iter().filter(|r| r.watched) {
        *runs.entry(run.state.as_str().to_owned()).or_insert(0) += 1;
    }
    let last_event_row = reader.last_event_row().await?;
    let (sinks, oldest) = sinks_and_oldest(reader, config).await?;
    let sinks = sinks
        .into_iter()
        .map(|row| SinkSample {
            oldest_pending_at: oldest.get(&row.sink).copied(),
            sink: row.sink,
            pending: row.pending,
            done: row.done,
            dead: row.dead,
            down: row.down,
        })
        .collect();
    Ok(Sample {
        at_ms,
        runs,
        last_event_row,
        sinks,
    })
}

/// The live view until `q`, Esc or Ctrl-C.
pub(super) async fn top(state: &Location, config: &Path, interval: Duration) -> anyhow::Result<()> {
    let reader = super::open_reads(state).await?;
    let mut before: Option<Sample> = None;
    let mut terminal = ratatui::try_init()?;
    let shown = loop {
        let now = match sample(&reader, config).await {
            Ok(now) => now,
            Err(error) => break Err(error),
        };
        let current = view(before.as_ref(), &now);
        if let Err(error) = terminal.draw(|frame| draw(frame, &current, state)) {
            break Err(error.into());
        }
        before = Some(now);
        match tokio::task::block_in_place(|| quit_pressed_within(interval)) {
            Ok(true) => break Ok(()),
            Ok(false) => {}
            Err(error) => break Err(error.into()),
        }
    };
    ratatui::try_restore()?;
    shown
}

/// Waits up to `interval` for a key; true when it asks to quit.
fn quit_pressed_within(interval: Duration) -> std::io::Result<bool> {
    let deadline = std::time::Instant::now() + interval;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || !event::poll(left)? {
            return Ok(false);
        }
        if let Event::Key(key) = event::read()?
            && key.kind == KeyEventKind::Press
            && is_quit(key.code, key.modifiers)
        {
            return Ok(true);
        }
    }
}

fn is_quit(code: KeyCode, modifiers: KeyModifiers) -> bool {
    matches!(code, KeyCode::Char('q') | KeyCode::Esc)
        || (code == KeyCode::Char('c') && modifiers.contains(KeyModifiers::CONTROL))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    fn sink(name: &str, done: i64, pending: i64, down: bool) -> SinkSample {
        SinkSample {
            sink: name.into(),
            pending,
            done,
            dead: 1,
            down,
            oldest_pending_at: (pending > 0).then_some(1_000),
        }
    }

    fn sample(at_ms: i64, events: i64, runs: &[(&str, i64)], sinks: Vec<SinkSample>) -> Sample {
        Sample {
            at_ms,
            runs: runs.iter().map(|(s, n)| (s.to_string(), *n)).collect(),
            last_event_row: events,
            sinks,
        }
    }

    #[test]
    fn rates_come_from_two_samples_and_never_go_negative() {
        let before = sample(10_000, 100, &[], vec![sink("ops", 50, 0, false)]);
        let now = sample(
            12_000,
            300,
            &[
                ("following", 7),
                ("reconnecting", 2),
                ("stalled", 1),
                ("finished", 4),
            ],
            vec![sink("ops", 30, 5, true), sink("new", 8, 0, false)],
        );
        let first = view(None, &now);
        assert_eq!(first.events_per_sec, None, "one sample gives no rate");
        assert_eq!(first.sinks[0].delivered_per_sec, None);

        let v = view(Some(&before), &now);
        assert_eq!((v.following, v.reconnecting, v.stalled), (7, 2, 1));
        assert_eq!(v.other_runs, BTreeMap::from([("finished".to_owned(), 4)]));
        assert_eq!(v.events_per_sec, Some(100.0), "200 events over 2 s");
        let ops = &v.sinks[0];
        assert_eq!(
            ops.delivered_per_sec,
            Some(0.0),
            "prune shrank done: 0, not negative"
        );
        assert_eq!(ops.oldest_pending_ms, Some(11_000));
        assert_eq!(
            v.sinks[1].delivered_per_sec,
            Some(0.0),
            "a sink new in this sample"
        );
        assert_eq!(v.sinks_down, 1);
    }

    #[test]
    fn draws_runs_rates_and_sinks() {
        let before = sample(0, 0, &[], vec![sink("archive", 0, 0, false)]);
        let now = sample(
            1_000,
            42,
            &[("following", 3), ("stalled", 1)],
            vec![sink("archive", 40, 2, false), sink("ops", 0, 9, true)],
        );
        let mut terminal = Terminal::new(TestBackend::new(80, 12)).unwrap();
        terminal
            .draw(|frame| {
                draw(
                    frame,
                    &view(Some(&before), &now),
                    &Location::Sqlite("/s.db".into()),
                )
            })
            .unwrap();
        let screen: String = terminal
            .backend()
            .buffer()
            .content()
            .chunks(80)
            .map(|line| line.iter().map(|cell| cell.symbol()).collect::<String>() + "\n")
            .collect();
        for expected in [
            "runhook top: /s.db",
            "3 following, 0 reconnecting, 1 stalled",
            "in: 42.0 events/s",
            "sinks down: 1",
            "q: quit",
        ] {
            assert!(screen.contains(expected), "{expected:?} in\n{screen}");
        }
        let row = |sink: &str| {
            let found = screen.lines().find(|l| l.contains(sink));
            found.unwrap_or_else(|| panic!("a row for {sink} in\n{screen}"))
        };
        let archive = row("archive");
        assert!(
            archive.contains("40.0") && archive.contains("up"),
            "{archive}"
        );
        let ops = row("ops");
        assert!(ops.contains(" 9 ") && ops.contains("down"), "{ops}");
    }

    /// The read side on a real state database: watched runs by state,
    /// configured sinks listed before they have deliveries.
    #[tokio::test]
    async fn samples_a_state_database() {
        use runhook::store::{Fence, RunState, Sqlite, State};
        let dir = tempfile::tempdir().unwrap();
        let store = State::Sqlite(Sqlite::open_path(&dir.path().join("state.db")).unwrap());
        for (run, state) in [
            ("a", RunState::Following),
            ("b", RunState::Following),
            ("c", RunState::Stalled),
            ("d", RunState::Following),
        ] {
            store
                .subscribe(run.into(), BTreeMap::new(), "watch", None)
                .await
                .unwrap();
            store
                .set_run_state(&Fence::Exclusive, run.into(), state, None, None)
                .await
                .unwrap();
        }
        assert!(store.unsubscribe("d".into()).await.unwrap());
        let config = dir.path().join("runhook.toml");
        std::fs::write(&config, "[sinks.archive]\ntype = \"file\"\n").unwrap();
        let reader = store.reads();
        let sampled = super::sample(&reader, &config).await.unwrap();
        assert_eq!(
            sampled.runs,
            BTreeMap::from([("following".to_owned(), 2), ("stalled".to_owned(), 1)]),
            "watched runs only"
        );
        assert_eq!(sampled.last_event_row, 0);
        assert_eq!(sampled.sinks.len(), 1);
        assert_eq!(
            (sampled.sinks[0].sink.as_str(), sampled.sinks[0].pending),
            ("archive", 0)
        );
    }

    #[test]
    fn q_esc_and_ctrl_c_quit() {
        assert!(is_quit(KeyCode::Char('q'), KeyModifiers::NONE));
        assert!(is_quit(KeyCode::Esc, KeyModifiers::NONE));
        assert!(is_quit(KeyCode::Char('c'), KeyModifiers::CONTROL));
        assert!(!is_quit(KeyCode::Char('c'), KeyModifiers::NONE));
    }
}
