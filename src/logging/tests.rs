//! Unit tests of the logging setup: filters, syslog priorities, the
//! once-per-window warnings and their summaries, journald lines.

use super::*;
use std::sync::{Arc, Mutex as StdMutex};

#[test]
fn an_invalid_filter_is_an_error_and_unset_means_the_default() {
    let bad = filter(Ok("runhook=loud".into()), "info").unwrap_err();
    assert!(bad.to_string().contains("runhook=loud"), "{bad}");
    assert!(filter(Ok("info,runhook::ingest=debug".into()), "info").is_ok());
    assert!(filter(Err(std::env::VarError::NotPresent), "info").is_ok());
    assert!(filter(Ok(" ".into()), "warn").is_ok());
}

#[test]
fn priorities_follow_syslog() {
    assert_eq!(priority(&Level::ERROR), 3);
    assert_eq!(priority(&Level::WARN), 4);
    assert_eq!(priority(&Level::INFO), 6);
    assert_eq!(priority(&Level::DEBUG), 7);
}

/// Collects what the formatter writes, for a scoped subscriber.
#[derive(Clone, Default)]
struct Captured(Arc<StdMutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logged(window: Duration, journald: bool, body: impl FnOnce()) -> String {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .event_format(Lines {
            inner: tracing_subscriber::fmt::format().without_time(),
            style: Style {
                journald,
                json: false,
            },
            repeats: Arc::new(Mutex::new(Repeats::new(window))),
        })
        .finish();
    tracing::subscriber::with_default(subscriber, body);
    let bytes = captured.0.lock().unwrap().clone();
    String::from_utf8(bytes).unwrap()
}

fn bad_token_for_five_runs() {
    // 20 lines for 5 runs, as a bad token gave in 3 s.
    for attempt in 0..4 {
        for run in 1..=5 {
            let run_id = format!("run-{run}");
            tracing::warn!(run_id = %run_id, error = "401 Unauthorized", attempt, wait = ?Duration::from_millis(200 * run), "poll failed; backing off");
        }
    }
}

#[test]
fn a_warning_repeated_per_run_is_logged_once() {
    let text = logged(REPEAT_WINDOW, false, || {
        bad_token_for_five_runs();
        tracing::warn!(
            run_id = "run-1",
            error = "403 Forbidden",
            "poll failed; backing off"
        );
        tracing::warn!(sink = "ops", "not about a run");
        tracing::warn!(sink = "ops", "not about a run");
    });
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "one line for the 20 repeats: {text}");
    assert!(lines[0].contains("run_id=run-1"), "{text}");
    assert!(
        lines[1].contains("403 Forbidden"),
        "another error is another warning: {text}"
    );
}

#[test]
fn summaries_are_lines_of_the_chosen_format() {
    let summary = Summary {
        level: Level::WARN,
        what: "poll failed; backing off error=401".into(),
        repeats: 19,
        runs: 7,
        named_runs: vec!["a".into(), "b".into()],
        window: REPEAT_WINDOW,
    };
    let lines = |json, journald| {
        let mut out = String::new();
        write_summary(
            &mut Writer::new(&mut out),
            &summary,
            Style { journald, json },
        )
        .unwrap();
        out
    };
    let journal = lines(false, true);
    assert_eq!(
        journal,
        "<4> WARN runhook::logging: repeated 19 more times for 7 runs (a, b, ...) within 1m: poll failed; backing off error=401\n"
    );
    let json: serde_json::Value = serde_json::from_str(&lines(true, false)).unwrap();
    assert_eq!(json["fields"]["repeated"], 19);
    assert_eq!(json["level"], "WARN");
}

#[test]
fn the_summary_counts_repeats_and_runs() {
    let mut repeats = Repeats::new(Duration::from_secs(60));
    let start = Instant::now();
    let key = |run: u32| Seen {
        key: (identifier(), "poll failed; backing off error=401".into()),
        level: Level::WARN,
        run_id: format!("run-{run}"),
    };
    let mut shown = 0;
    for attempt in 0..4u32 {
        for run in 1..=5 {
            shown += usize::from(repeats.see(
                key(run),
                start + Duration::from_millis(u64::from(attempt) * 700),
            ));
        }
    }
    assert_eq!(shown, 1);
    assert!(repeats.due(start + Duration::from_secs(59)).is_empty());
    let summaries = repeats.due(start + Duration::from_secs(60));
    assert_eq!(summaries.len(), 1);
    let summary = &summaries[0];
    assert_eq!((summary.repeats, summary.runs), (19, 5));
    assert_eq!(
        summary.message(),
        "repeated 19 more times for 5 runs (run-1, run-2, run-3, run-4, run-5) within 1m: poll failed; backing off error=401"
    );
    // The window is over: the next one is shown again.
    assert!(repeats.see(key(1), start + Duration::from_secs(61)));
    // At exit, a window still open is summarised too.
    assert!(!repeats.see(key(2), start + Duration::from_secs(62)));
    let at_exit = repeats.drain();
    assert_eq!(
        (at_exit.len(), at_exit[0].repeats, at_exit[0].runs),
        (1, 1, 2)
    );
}

#[test]
fn journald_lines_carry_their_priority() {
    let text = logged(REPEAT_WINDOW, true, || {
        tracing::error!("broken");
        tracing::warn!(run_id = "r", "odd");
        tracing::info!("fine");
    });
    let prefixes: Vec<&str> = text.lines().map(|l| &l[..3]).collect();
    assert_eq!(prefixes, ["<3>", "<4>", "<6>"], "{text}");
}

fn identifier() -> Identifier {
    struct Site;
    static SITE: Site = Site;
    impl tracing::callsite::Callsite for Site {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &tracing::Metadata<'_> {
            unimplemented!()
        }
    }
    Identifier(&SITE)
}
