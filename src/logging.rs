//! Logging setup: `tracing` to stderr, human or JSON, filtered by
//! `RUNHOOK_LOG`. Under systemd (stderr is the journal stream named by
//! `JOURNAL_STREAM`) each line starts with its syslog priority (`<4>` for a
//! warning), so `journalctl -p warning` works, and carries no timestamp of
//! its own (the journal stamps it). A warning that every run repeats (a bad
//! token fails 5 runs in the same way) is logged once, then summarised.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use tracing::callsite::Identifier;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// How long repeats of one warning are counted before they are summarised.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(60);
/// Fields that differ between repeats of the same trouble: not part of what
/// makes two warnings "the same".
const VARYING_FIELDS: [&str; 6] = [
    "run_id", "wait", "cursor", "attempt", "attempts", "failures",
];
/// Warnings tracked at once; past this, new ones are logged untracked.
const TRACKED_MAX: usize = 1024;
/// Run ids named in a summary.
const RUNS_NAMED: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(
        "RUNHOOK_LOG={value:?} is not a valid filter: {reason} (e.g. RUNHOOK_LOG=info,runhook::ingest=debug)"
    )]
    Filter { value: String, reason: String },
    #[error("RUNHOOK_LOG is not valid UTF-8")]
    NotUnicode,
    #[error("cannot install the logger: {0}")]
    Install(String),
}

/// Installs the process-wide logger: JSON lines when `json`, else human.
/// An invalid `RUNHOOK_LOG` is an error: silently falling back to the
/// default would hide the debug output the operator asked for.
pub fn init(json: bool, default_level: &str) -> Result<(), LogError> {
    init_with(json, default_level, None)
}

/// [`init`] plus a layer of the caller's with its own filter (`runhook
/// forward` prints its delivery lines from log events), so that every
/// command logs alike: the same filter, journald priorities and summaries.
pub fn init_with(
    json: bool,
    default_level: &str,
    extra: Option<Box<dyn Layer<Registry> + Send + Sync>>,
) -> Result<(), LogError> {
    let filter = filter(std::env::var("RUNHOOK_LOG"), default_level)?;
    let journald = stderr_is_journal();
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(!journald && std::io::stderr().is_terminal());
    let lines: Box<dyn Layer<Registry> + Send + Sync> = if json {
        layer
            .fmt_fields(JsonFields::new())
            .event_format(Lines::installed(
                tracing_subscriber::fmt::format().json(),
                journald,
                json,
            ))
            .boxed()
    } else if journald {
        layer
            .event_format(Lines::installed(
                tracing_subscriber::fmt::format().without_time(),
                journald,
                json,
            ))
            .boxed()
    } else {
        layer
            .event_format(Lines::installed(
                tracing_subscriber::fmt::format(),
                journald,
                json,
            ))
            .boxed()
    };
    let mut layers = vec![lines.with_filter(filter).boxed()];
    layers.extend(extra);
    tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .map_err(|error| LogError::Install(error.to_string()))
}

/// The filter from `RUNHOOK_LOG` (unset or empty: `default_level`).
fn filter(
    value: Result<String, std::env::VarError>,
    default_level: &str,
) -> Result<EnvFilter, LogError> {
    match value {
        Err(std::env::VarError::NotPresent) => Ok(EnvFilter::new(default_level)),
        Err(std::env::VarError::NotUnicode(_)) => Err(LogError::NotUnicode),
        Ok(value) if value.trim().is_empty() => Ok(EnvFilter::new(default_level)),
        Ok(value) => EnvFilter::builder()
            .parse(&value)
            .map_err(|error| LogError::Filter {
                reason: error.to_string(),
                value,
            }),
    }
}

/// systemd sets `JOURNAL_STREAM=<device>:<inode>` of the journal's socket;
/// it counts only while stderr is still that socket (not when the daemon's
/// stderr was redirected, say by a wrapper script, and the variable inherited).
fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    stderr_identity().is_some_and(|(device, inode)| stream == format!("{device}:{inode}"))
}

fn stderr_identity() -> Option<(u64, u64)> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let metadata = std::fs::File::from(fd).metadata().ok()?;
    Some((metadata.dev(), metadata.ino()))
}

/// The syslog priority journald reads from a `<N>` line prefix.
fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// Wraps tracing's own formats: adds the journal priority, drops repeats and
/// writes their summaries.
struct Lines<F> {
    inner: F,
    style: Style,
    repeats: Arc<Mutex<Repeats>>,
}

/// How lines are written: what a summary must match.
#[derive(Clone, Copy)]
struct Style {
    journald: bool,
    json: bool,
}

/// The installed logger's repeats, for [`flush`] at exit.
static INSTALLED: OnceLock<(Style, Arc<Mutex<Repeats>>)> = OnceLock::new();

/// Writes the summaries of repeats still being counted: called at exit, so
/// that a count is not lost when nothing is logged after its window.
pub fn flush() {
    let Some((style, repeats)) = INSTALLED.get() else {
        return;
    };
    let summaries = match repeats.lock() {
        Ok(mut repeats) => repeats.drain(),
        Err(_) => return,
    };
    let mut text = String::new();
    for summary in &summaries {
        let _ = write_summary(&mut Writer::new(&mut text), summary, *style);
    }
    eprint!("{text}");
}

impl<S, N, F> FormatEvent<S, N> for Lines<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let now = Instant::now();
        let (summaries, show) = match self.repeats.lock() {
            Ok(mut repeats) => {
                let summaries = repeats.due(now);
                let show = match Seen::of(event) {
                    Some(seen) => repeats.see(seen, now),
                    None => true,
                };
                (summaries, show)
            }
            // A panic while logging elsewhere: log everything rather than nothing.
            Err(_) => (Vec::new(), true),
        };
        for summary in &summaries {
            write_summary(&mut writer, summary, self.style)?;
        }
        if !show {
            return Ok(());
        }
        if self.style.journald {
            write!(writer, "<{}>", priority(event.metadata().level()))?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}

impl<F> Lines<F> {
    /// The process's formatter: its repeats are the ones [`flush`] writes.
    fn installed(inner: F, journald: bool, json: bool) -> Self {
        let style = Style { journald, json };
        let repeats = Arc::new(Mutex::new(Repeats::new(REPEAT_WINDOW)));
        let _ = INSTALLED.set((style, repeats.clone()));
        Self {
            inner,
            style,
            repeats,
        }
    }
}

fn write_summary(writer: &mut Writer<'_>, summary: &Summary, style: Style) -> std::fmt::Result {
    if style.journald {
        write!(writer, "<{}>", priority(&summary.level))?;
    }
    let message = summary.message();
    if style.json {
        let line = serde_json::json!({
            "timestamp": humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            "level": summary.level.as_str(),
            "fields": {
                "message": message,
                "repeated": summary.repeats,
                "runs": summary.runs,
                "run_ids": summary.named_runs,
            },
            "target": "runhook::logging",
        });
        return writeln!(writer, "{line}");
    }
    if !style.journald {
        tracing_subscriber::fmt::time::SystemTime.format_time(writer)?;
        writer.write_char(' ')?;
    }
    writeln!(
        writer,
        "{:>5} runhook::logging: {message}",
        summary.level.as_str()
    )
}

/// A warning or error about one run, as far as repeats are concerned.
struct Seen {
    key: (Identifier, String),
    level: Level,
    run_id: String,
}

impl Seen {
    /// `None` for events that are not a per-run warning or error.
    fn of(event: &Event<'_>) -> Option<Self> {
        let level = *event.metadata().level();
        if level > Level::WARN {
            return None;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        Some(Self {
            key: (event.metadata().callsite(), fields.same),
            level,
            run_id: fields.run_id?,
        })
    }
}

/// What makes two warnings the same (message, error, state), and the run.
#[derive(Default)]
struct Fields {
    same: String,
    run_id: Option<String>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        self.record_text(field, text);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.record_text(field, value.to_owned());
    }
}

impl Fields {
    fn record_text(&mut self, field: &Field, text: String) {
        match field.name() {
            "run_id" => self.run_id = Some(text),
            name if VARYING_FIELDS.contains(&name) => {}
            "message" => self.same.insert_str(0, &text),
            name => {
                let _ = write!(self.same, " {name}={text}");
            }
        }
    }
}

/// Repeats of per-run warnings, counted over a window from the first one.
struct Repeats {
    window: Duration,
    tracked: HashMap<(Identifier, String), Tracked>,
}

struct Tracked {
    since: Instant,
    level: Level,
    repeats: u64,
    runs: BTreeSet<String>,
}

/// One line that stands for the repeats of a window.
#[derive(Debug, PartialEq)]
struct Summary {
    level: Level,
    what: String,
    repeats: u64,
    runs: usize,
    named_runs: Vec<String>,
    window: Duration,
}

impl Summary {
    fn message(&self) -> String {
        let mut named = self.named_runs.join(", ");
        if self.runs > self.named_runs.len() {
            named.push_str(", ...");
        }
        format!(
            "repeated {} more times for {} runs ({named}) within {}: {}",
            self.repeats,
            self.runs,
            humantime::format_duration(self.window),
            self.what
        )
    }
}

impl Repeats {
    fn new(window: Duration) -> Self {
        Self {
            window,
            tracked: HashMap::new(),
        }
    }

    /// Whether to show this warning: the first of a window is shown, the
    /// rest are counted.
    fn see(&mut self, seen: Seen, now: Instant) -> bool {
        if let Some(tracked) = self.tracked.get_mut(&seen.key) {
            tracked.repeats += 1;
            tracked.runs.insert(seen.run_id);
            return false;
        }
        if self.tracked.len() < TRACKED_MAX {
            let runs = BTreeSet::from([seen.run_id]);
            self.tracked.insert(
                seen.key,
                Tracked {
                    since: now,
                    level: seen.level,
                    repeats: 0,
                    runs,
                },
            );
        }
        true
    }

    /// Ends the windows that are over: a summary for each that saw repeats.
    fn due(&mut self, now: Instant) -> Vec<Summary> {
        let window = self.window;
        self.end(|tracked| now.duration_since(tracked.since) >= window)
    }

    /// Ends every window, over or not (at exit).
    fn drain(&mut self) -> Vec<Summary> {
        self.end(|_| true)
    }

    fn end(&mut self, over: impl Fn(&Tracked) -> bool) -> Vec<Summary> {
        let window = self.window;
        let mut summaries = Vec::new();
        self.tracked.retain(|(_, what), tracked| {
            if !over(tracked) {
                return true;
            }
            if tracked.repeats > 0 {
                summaries.push(Summary {
                    level: tracked.level,
                    what: what.clone(),
                    repeats: tracked.repeats,
                    runs: tracked.runs.len(),
                    named_runs: tracked.runs.iter().take(RUNS_NAMED).cloned().collect(),
                    window,
                });
            }
            false
        });
        summaries
    }
}

#[cfg(test)]
mod tests;
