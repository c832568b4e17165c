//! What an operator's command or a downgrade must not break, each found by
//! an adversarial review and shown failing before its fix: `send-test`
//! beside the daemon's file sink, a state this build does not know,
//! `backfill` and per-run order. One known limit stays `#[ignore]`d: it
//! reproduces what the README says of the oldest-pending metric.

use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use runhook::store::{Batch, Failure, Fence, NewEvent, TimeRange, now_ms};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::state::Backend;
use crate::support::*;

fn event(sequence: i64, payload: String, sinks: &[&str]) -> NewEvent {
    NewEvent {
        sequence,
        event_type: "LOG".into(),
        payload: RawValue::from_string(payload).unwrap(),
        created_at: None,
        sinks: sinks.iter().map(|s| Arc::from(*s)).collect(),
    }
}

fn batch(run: &str, events: Vec<NewEvent>) -> Batch {
    Batch {
        run_id: run.into(),
        events,
        run_status: Some("running".into()),
        phase: None,
        finish: None,
        stalled: None,
    }
}

/// `send-test` on a file sink refused (exit 1), naming the torn line.
fn assert_refused_torn(output: &Output) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("torn line"),
        "send-test must refuse a torn tail: {:?} {stderr}",
        output.status
    );
}

/// R6. While the daemon runs it is the file's only writer: its cut-back
/// after a failed write would take another writer's line (or, the other
/// way round, a failed test append would cut the daemon's marked lines).
// SQLite only: the refusal rests on the daemon lock beside the state file.
#[tokio::test]
async fn send_test_to_a_file_refuses_while_the_daemon_runs() {
    let sim = sim_with(vec![]).await;
    let env = Env::new(&sim, &[]);
    let config = env.write_config();
    let daemon = env.start();
    wait_for("the daemon's lock", || async {
        let lock = env.state_path().with_extension("db.lock");
        match std::fs::read_to_string(&lock) {
            Ok(pid) if !pid.trim().is_empty() => Ok(()),
            other => Err(format!("{}: {other:?}", lock.display())),
        }
    })
    .await;
    let output = send_test(&config, &["archive"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("is running"),
        "{:?} {stderr}",
        output.status
    );
    daemon.stop().await;
    let text = std::fs::read_to_string(env.events_path()).unwrap_or_default();
    assert!(!text.contains("\"test\":true"), "nothing appended: {text}");
    // Stopped: the same command appends its line.
    let output = send_test(&config, &["archive"]).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(env.events_path()).unwrap();
    assert!(
        text.ends_with('\n') && text.contains("\"test\":true"),
        "{text}"
    );
}

/// A daemon died in the middle of writing `r1:1` (with `payload`) to the
/// file sink: half its line is on disk, as the `file.mid_append` crash point
/// leaves it. `send-test` to that sink is refused; the daemon then starts,
/// mends the tail and delivers. Returns the file's text once it stopped.
async fn torn_tail_then_send_test_then_restart(payload: String) -> String {
    let sim = sim_with(vec![]).await;
    let env = Env::new(&sim, &[]);
    let config = env.write_config();
    {
        let store = crate::support::open_state(&env.state_path()).await.unwrap();
        store
            .subscribe("r1".into(), Default::default(), "watch", None)
            .await
            .unwrap();
        store
            .record_batch(
                &Fence::Exclusive,
                batch("r1", vec![event(1, payload, &["archive"])]),
            )
            .await
            .unwrap();
        let pending = store.reads().pending_in_order("archive", 10).await.unwrap();
        let mut line = Vec::new();
        runhook::sink::write_envelope_line(&(&pending[0]).into(), &mut line).unwrap();
        // The daemon died in the middle of write(2): half the line is on
        // disk, as the `file.mid_append` crash point leaves it.
        std::fs::write(env.events_path(), &line[..line.len() / 2]).unwrap();
    }
    // Before the daemon is started again, someone tries the sink: refused,
    // the torn line is the daemon's to mend.
    let output = send_test(&config, &["archive"]).await;
    assert_refused_torn(&output);
    // The daemon starts, reconciles with the file's tail and delivers.
    let daemon = env.start();
    let reader = wait_for("the state database", || async {
        crate::support::reads(&env.state_path())
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    wait_for_within(
        Duration::from_secs(30),
        "nothing pending for archive",
        || {
            let reader = reader.clone();
            async move {
                match reader.pending_count("archive").await {
                    Ok(0) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;
    daemon.stop().await;
    std::fs::read_to_string(env.events_path()).unwrap()
}

/// R1. `send-test` appends to a file sink's file from another process,
/// outside the daemon's offset protocol (which assumes the daemon is the
/// only writer: everything past the recorded offset is its own lines, a torn
/// last line its own half-written batch). After a crash in the middle of a
/// write (the `file.mid_append` crash point leaves exactly this), a
/// `send-test` glues its line onto the torn one; the restarted daemon then
/// finds one "complete" line past the offset that starts with the torn
/// event's id. The line is longer than the 64 KiB recovery keeps, so its id
/// is read from its prefix and the event is marked done: its line in the
/// file is corrupt JSON and it is never written again. Lost.
#[tokio::test]
async fn send_test_refuses_a_torn_file_tail_and_the_daemon_then_writes_the_event_whole() {
    let text =
        torn_tail_then_send_test_then_restart(format!("{{\"blob\":\"{}\"}}", "x".repeat(300_000)))
            .await;
    let mut whole = false;
    let mut corrupt = Vec::new();
    for (n, line) in text.lines().enumerate() {
        match serde_json::from_str::<Value>(line) {
            Ok(parsed) => whole |= parsed["id"] == "r1:1",
            Err(error) => corrupt.push(format!(
                "line {n} ({error}): {}...",
                line.chars().take(60).collect::<String>()
            )),
        }
    }
    assert!(
        whole,
        "r1:1 is marked done (nothing pending) but no whole line of it is in the file; corrupt lines: {corrupt:?}"
    );
    assert!(corrupt.is_empty(), "{corrupt:?}");
}

/// R2. `runhook_oldest_pending_delivery_age_seconds` reads the `queued_at`
/// of the first pending delivery in ingest order. `backfill` (and `replay
/// --since`) queue old events (low rows) with `queued_at = now`, so while
/// they are pending the metric reads ~0 even when a delivery queued hours
/// ago is still stuck behind them: the alert on a stuck sink goes quiet
/// exactly while an operator is backfilling.
#[tokio::test]
#[ignore = "known limit (README, metrics): a backfilled head hides the oldest pending delivery's age"]
async fn oldest_pending_age_is_hidden_by_a_backfilled_head() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let store = crate::support::open_state(&path).await.unwrap();
    store
        .subscribe("r1".into(), Default::default(), "watch", None)
        .await
        .unwrap();
    let events = vec![
        event(1, "{}".into(), &["a"]),
        event(2, "{}".into(), &["a"]),
        event(3, "{}".into(), &["a", "late"]),
    ];
    store
        .record_batch(&Fence::Exclusive, batch("r1", events))
        .await
        .unwrap();
    // All of it was queued three hours ago; `late`'s delivery of event 3 is
    // still pending since.
    let three_hours = 3 * 3600 * 1000;
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE deliveries SET queued_at = queued_at - ?1",
            [three_hours],
        )
        .unwrap();
    let everything = TimeRange {
        since: 0,
        until: i64::MAX,
    };
    let queued = store
        .backfill(Arc::from("late"), everything, None, |_| true)
        .await
        .unwrap()
        .queued;
    assert_eq!(queued, 2, "events 1 and 2");
    let oldest = store
        .reads()
        .oldest_pending(vec!["late".into()])
        .await
        .unwrap();
    let age = now_ms() - oldest[0].1;
    assert!(
        age >= three_hours - 60_000,
        "the oldest pending delivery of `late` was queued 3 h ago; the metric says {} s",
        age / 1000
    );
}

/// R3 (probe). glob-match (6aeb124) took any text as a glob; globset
/// rejects some of it. A route that loaded yesterday must still load.
#[test]
fn yesterdays_globs_still_compile_and_match() {
    use runhook::route::EventTypes;
    for (glob, event_type) in [
        ("ARTIFACT_*", "ARTIFACT_CREATED"),
        ("RUN**", "RUN_STARTED"),
        ("*_**", "PHASE_STARTED"),
        ("PHASE_{STARTED,DONE}", "PHASE_DONE"),
        ("[A-Z]*", "LOG"),
    ] {
        let types = EventTypes::new(vec![glob.into()]).unwrap_or_else(|e| panic!("{glob}: {e}"));
        assert!(types.matches(event_type), "{glob} matches {event_type}");
    }
}

/// R1b. As R1 with a short line: the event is not lost (its torn line has
/// no id, so it stays pending and is written again), but the torn bytes
/// glued to the test line are never cut: the file keeps a line that is not
/// JSON, which every reader of the JSON Lines file trips on.
#[tokio::test]
async fn send_test_refuses_a_short_torn_tail_and_no_line_stays_corrupt() {
    let text = torn_tail_then_send_test_then_restart("{\"n\":1}".into()).await;
    let corrupt: Vec<&str> = text
        .lines()
        .filter(|line| serde_json::from_str::<Value>(line).is_err())
        .collect();
    assert!(corrupt.is_empty(), "lines that are not JSON: {corrupt:?}");
}

on_both! {
    /// R4. Run states are parsed into `RunState` on every read now; at 6aeb124
    /// they were text. One row whose state this build does not know (written by
    /// a newer runhook before a downgrade: a new state bumps no schema version)
    /// makes `watched_runs` fail, and the run supervisor retries that read
    /// forever: no run at all is followed. `status` fails the same way.
    async fn one_unknown_run_state_does_not_stop_every_run(b: &Backend) {
        let store = &b.state;
        for run in ["r1", "r2"] {
            store
                .subscribe(run.into(), Default::default(), "watch", None)
                .await
                .unwrap();
        }
        b.sql("UPDATE runs SET state = 'paused', transport = 'quic' WHERE run_id = 'r2'")
            .await;
        let reader = store.reads();
        let watched = reader.watched_runs().await;
        assert!(
            watched
                .as_ref()
                .is_ok_and(|w| w.iter().any(|r| r.run_id == "r1")
                    && w.iter().any(|r| r.run_id == "r2")),
            "r1 and r2 are still followed: {watched:?}"
        );
        let runs = reader.runs().await;
        assert!(
            runs.as_ref().is_ok_and(|r| r.len() == 2),
            "status still lists both runs: {runs:?}"
        );
    }
}

on_both! {
    /// R5 (by design? undocumented). `backfill` gives a sink older events of a
    /// run after the sink already received later ones live (it was added to
    /// the config, and reloaded, before the backfill): for that sink, event 3
    /// of the run is delivered before events 1 and 2 (guarantee 4).
    async fn backfill_keeps_per_run_order_for_a_sink_that_went_live_first(b: &Backend) {
        let store = &b.state;
        store
            .subscribe("r1".into(), Default::default(), "watch", None)
            .await
            .unwrap();
        let early = vec![event(1, "{}".into(), &["a"]), event(2, "{}".into(), &["a"])];
        store
            .record_batch(&b.fence("r1").await, batch("r1", early))
            .await
            .unwrap();
        // `late` is added and reloaded: event 3 is routed to it live, and sent.
        let live = vec![event(3, "{}".into(), &["a", "late"])];
        store
            .record_batch(&b.fence("r1").await, batch("r1", live))
            .await
            .unwrap();
        let reader = store.reads();
        let sent = reader.pending_in_order("late", 10).await.unwrap();
        assert_eq!(sent.len(), 1);
        store
            .mark_delivered(
                &b.fence("r1").await,
                Arc::from("late"),
                vec![sent[0].event],
                None,
            )
            .await
            .unwrap();
        // The operator backfills, as the README says.
        let everything = TimeRange {
            since: 0,
            until: i64::MAX,
        };
        let done = store
            .backfill(Arc::from("late"), everything, None, |_| true)
            .await
            .unwrap();
        assert_eq!((done.queued, done.skipped), (0, 2), "1 and 2 left out");
        let after: Vec<String> = reader
            .pending_in_order("late", 10)
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.id)
            .collect();
        assert!(
            after.is_empty(),
            "r1:3 went out to `late` and now r1:1 and r1:2 are queued behind it: {after:?}"
        );
    }
}

/// Events of `run` with these sequences, each routed to `sinks`.
fn batch_of(run: &str, sequences: std::ops::RangeInclusive<i64>, sinks: &[&str]) -> Batch {
    let events = sequences.map(|s| event(s, "{}".into(), sinks)).collect();
    batch(run, events)
}

on_both! {
    /// D1 (second review). `backfill` decides "the sink already has it" (and, since the fix in
    /// `newest_with_a_row`, "the sink has a later event of this run") from the
    /// sink's delivery rows. Retention deletes a sink's *delivered* rows after
    /// `state.retain`, but keeps the event itself while another sink's dead
    /// letter (kept until purged) or pending row refers to it. A backfill of the
    /// first sink then finds no row at all for the run and queues again an
    /// event the sink received long ago: delivered twice (a new attempt, not a
    /// crash between 2xx and record), and after later events of its run that
    /// the sink already got (per-run order). README: "queues a delivery ... where
    /// the sink has none for that event yet, so running it twice queues nothing
    /// the second time".
    async fn backfill_does_not_resend_what_the_sink_received_before_retention_pruned_its_rows(b: &Backend) {
        let store = &b.state;
        store
            .subscribe("r".into(), Default::default(), "watch", None)
            .await
            .unwrap();
        // Events 1 and 2 of run r go to `archive` and `ops`.
        store
            .record_batch(&b.fence("r").await, batch_of("r", 1..=2, &["archive", "ops"]))
            .await
            .unwrap();
        let reader = store.reads();
        let rows: Vec<i64> = reader
            .pending_for_run("archive", "r", 10)
            .await
            .unwrap()
            .iter()
            .map(|p| p.event)
            .collect();
        assert_eq!(rows.len(), 2);
        // `archive` received both; `ops` received 2 and dead-lettered 1.
        store
            .mark_delivered(&b.fence("r").await, "archive".into(), rows.clone(), None)
            .await
            .unwrap();
        store
            .mark_delivered(&b.fence("r").await, "ops".into(), vec![rows[1]], None)
            .await
            .unwrap();
        let dead = Failure {
            events: vec![rows[0]],
            status: Some(404),
            error: "HTTP 404".into(),
            next_attempt_at: 0,
            dead: true,
        };
        store
            .record_failure(&b.fence("r").await, "ops".into(), dead)
            .await
            .unwrap();
        // `state.retain` later: the delivered rows go; event 1 stays, for the
        // dead letter of `ops`.
        let (deliveries, events) = store.prune(now_ms() + 60_000).await.unwrap();
        assert_eq!((deliveries, events), (3, 1), "r:2 pruned, r:1 kept");

        // The operator backfills `archive` (say, a route now gives it more
        // event types) over a range that reaches r:1.
        let everything = TimeRange {
            since: 0,
            until: i64::MAX,
        };
        let done = store
            .backfill(Arc::from("archive"), everything, None, |_| true)
            .await
            .unwrap();
        let queued: Vec<String> = reader
            .pending_in_order("archive", 10)
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.id)
            .collect();
        assert!(
            queued.is_empty() && done.queued == 0,
            "`archive` received r:1 (and r:2 after it) before retention; backfill queued it again ({done:?}): {queued:?}"
        );
    }
}
