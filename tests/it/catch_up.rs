//! The cursor never passes an event that was not recorded (README.md,
//! guarantee 8): an undecodable event or frame, or a finish announced past
//! the cursor, makes runhook catch up from the cursor; a run is finished
//! only once its cursor reached the run's `lastEventSequence`.

use runhook::simulate::{Fault, FaultKind, Scenario, Simulator};
use runhook::store::RunRow;

use crate::support::*;

fn fault(endpoint: &str, kind: FaultKind) -> Fault {
    Fault {
        run: None,
        endpoint: Some(endpoint.into()),
        count: None,
        kind,
    }
}

/// Stream with the cookie, catch-up polls with the token.
fn sse_env_with_token(backend: Backend, sim: &Simulator, runs: &[&str]) -> Env {
    let mut env = Env::on(backend, sim, runs);
    env.api = format!(
        "session_cookie = \"{}\"\npoll_interval = \"50ms\"\nstream_idle_timeout = \"2s\"\n",
        sim.session()
    );
    env
}

async fn wait_state(env: &Env, run: &str, state: &str) -> RunRow {
    wait_for(state, || async {
        match env.run_row(run).await {
            Some(row) if row.state == state => Ok(row),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

/// Six events of `run-bad`, the 4th served undecodable until the faults
/// are cleared.
async fn sim_bad_at_4() -> Simulator {
    start_sim(Scenario {
        runs: vec![scripted("run-bad", numbered(6))],
        faults: vec![fault("events", FaultKind::BadEvent { sequence: 4 })],
        ..Scenario::default()
    })
    .await
}

fn sequences_of(env: &Env, run: &str) -> Vec<i64> {
    env.lines()
        .iter()
        .filter(|l| l["runId"] == run)
        .filter_map(|l| l["sequence"].as_i64())
        .collect()
}

on_both! {
    async fn an_undecodable_event_on_a_page_stalls_the_run_after_the_good_ones(backend: Backend) {
        let sim = sim_bad_at_4().await;
        let env = Env::on(backend, &sim, &["run-bad"]);
        let daemon = env.start();
        let row = wait_state(&env, "run-bad", "stalled").await;
        assert_eq!(row.cursor, 3, "the good events before the bad one recorded");
        let error = row.last_error.unwrap_or_default();
        assert!(error.contains("sequence 4"), "{error}");
        wait_for("events 1..3 in the file", || async {
            let seen = sequences_of(&env, "run-bad");
            if seen == [1, 2, 3] {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            }
        })
        .await;
        // Slow retries: a handful of polls while stalled, not a hot loop.
        let stalled_at = sim.requests().len();
        wait_for("two more polls while stalled", || async {
            let polls = sim.requests().len() - stalled_at;
            if polls >= 2 {
                Ok(())
            } else {
                Err(format!("{polls} polls"))
            }
        })
        .await;
        // Polls only: a run lookup (the lag) may come right after one.
        let polls: Vec<_> = sim.requests()[stalled_at - 1..]
            .iter()
            .filter(|r| r.endpoint == "events")
            .cloned()
            .collect();
        let gaps: Vec<u64> = polls.windows(2).map(|w| w[1].at_ms - w[0].at_ms).collect();
        assert!(
            gaps.iter().all(|g| *g >= 40),
            "backs off between polls: {gaps:?}"
        );
        assert_eq!(
            env.run_row("run-bad").await.unwrap().state,
            "stalled",
            "no run_finished past the bad event"
        );
        // Upstream heals: the run resumes from the cursor by itself.
        sim.clear_faults();
        env.wait_finished(&["run-bad"]).await;
        daemon.stop().await;
        let raw = std::fs::read_to_string(env.events_path()).unwrap();
        let lines = env.final_lines();
        assert_run_exactly_once(&sim, &lines, "run-bad", &raw);
        assert_eq!(env.run_row("run-bad").await.unwrap().state, "finished");
    }
}

on_both! {
    /// A stalled run reads `stalled` the whole time, not `following` for a
    /// moment after each slow poll: the poll's (empty) batch and the state are
    /// one write, so `status` and `runhook_runs` never flicker.
    async fn a_stalled_run_reads_stalled_between_and_during_its_slow_polls(backend: Backend) {
        let sim = sim_bad_at_4().await;
        let env = Env::on(backend, &sim, &["run-bad"]);
        let daemon = env.start();
        wait_state(&env, "run-bad", "stalled").await;
        let stalled_at = sim.requests().len();
        // Read the state as often as the store answers (no pause: the window
        // to catch is one writer job) until six more polls went out.
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let polls = sim.requests()[stalled_at..]
                .iter()
                .filter(|r| r.endpoint == "events")
                .count();
            if polls >= 6 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for six polls while stalled ({polls} seen)"
            );
            if let Some(row) = env.run_row("run-bad").await {
                *seen.entry(row.state.to_string()).or_default() += 1;
            }
        }
        daemon.stop().await;
        assert_eq!(
            seen.keys().collect::<Vec<_>>(),
            ["stalled"],
            "states read while stalled: {seen:?}"
        );
    }
}

on_both! {
    async fn a_final_poll_status_short_of_last_event_sequence_does_not_finish(backend: Backend) {
        let sim = start_sim(Scenario {
            runs: vec![scripted("run-short", numbered(6))],
            faults: vec![fault("events", FaultKind::Withhold { from: 5 })],
            ..Scenario::default()
        })
        .await;
        let env = Env::on(backend, &sim, &["run-short"]);
        let daemon = env.start();
        let row = wait_state(&env, "run-short", "catching_up").await;
        assert_eq!(row.cursor, 4);
        let error = row.last_error.unwrap_or_default();
        assert!(error.contains("lastEventSequence 6"), "{error}");
        assert!(
            env.lines().iter().all(|l| l["type"] != "run_finished"),
            "no run_finished short of lastEventSequence"
        );
        sim.clear_faults();
        env.wait_finished(&["run-short"]).await;
        daemon.stop().await;
        let raw = std::fs::read_to_string(env.events_path()).unwrap();
        let lines = env.final_lines();
        assert_run_exactly_once(&sim, &lines, "run-short", &raw);
        let finished = lines.iter().find(|l| l["type"] == "run_finished").unwrap();
        assert_eq!(finished["id"], "run-short:finished:6");
    }
}

on_both! {
    async fn an_undecodable_stream_frame_is_caught_up_by_polling(backend: Backend) {
        let sim = start_sim(Scenario {
            runs: vec![scripted("run-frame", numbered(8))],
            faults: vec![fault("stream", FaultKind::BadEvent { sequence: 3 })],
            ..Scenario::default()
        })
        .await;
        let env = sse_env_with_token(backend, &sim, &["run-frame"]);
        let daemon = env.start();
        env.wait_finished(&["run-frame"]).await;
        daemon.stop().await;
        let raw = std::fs::read_to_string(env.events_path()).unwrap();
        let lines = env.final_lines();
        assert_run_exactly_once(&sim, &lines, "run-frame", &raw);
        assert!(
            sim.requests()
                .iter()
                .any(|r| r.endpoint == "events" && r.since == Some(2)),
            "caught up by polling from the cursor"
        );
    }
}

on_both! {
    async fn a_stream_finish_past_the_cursor_is_caught_up_by_polling(backend: Backend) {
        let sim = start_sim(Scenario {
            runs: vec![scripted("run-early", numbered(8))],
            faults: vec![fault("stream", FaultKind::Withhold { from: 6 })],
            ..Scenario::default()
        })
        .await;
        let env = sse_env_with_token(backend, &sim, &["run-early"]);
        let daemon = env.start();
        env.wait_finished(&["run-early"]).await;
        daemon.stop().await;
        let raw = std::fs::read_to_string(env.events_path()).unwrap();
        let lines = env.final_lines();
        assert_run_exactly_once(&sim, &lines, "run-early", &raw);
        let finished = lines.iter().find(|l| l["type"] == "run_finished").unwrap();
        assert_eq!(finished["id"], "run-early:finished:8");
    }
}

on_both! {
    async fn a_stream_finish_past_the_cursor_without_a_token_is_caught_up_by_polling_with_the_cookie(backend: Backend) {
        let sim = start_sim(Scenario {
            runs: vec![scripted("run-cookie", numbered(8))],
            faults: vec![Fault {
                count: Some(1),
                ..fault("stream", FaultKind::Withhold { from: 6 })
            }],
            ..Scenario::default()
        })
        .await;
        let mut env = sse_env_with_token(backend, &sim, &["run-cookie"]);
        env.token = String::new();
        let daemon = env.start();
        env.wait_finished(&["run-cookie"]).await;
        daemon.stop().await;
        let raw = std::fs::read_to_string(env.events_path()).unwrap();
        let lines = env.final_lines();
        assert_run_exactly_once(&sim, &lines, "run-cookie", &raw);
        assert_eq!(sim.faults_left(), 0, "the stream withheld the end");
        let caught_up = sim
            .requests()
            .iter()
            .any(|r| r.endpoint == "events" && r.status == 200 && r.since == Some(5));
        assert!(
            caught_up,
            "polled from the cursor (5) with the session cookie"
        );
    }
}

on_both! {
    /// The guides name `run_finished` but not its fields: a bare one (no
    /// status, no `lastSequence`) must not be taken for `completed`, nor for
    /// the last heartbeat's `running`: the run lookup says how it ended.
    async fn a_bare_run_finished_takes_its_status_from_the_run(backend: Backend) {
        let mut run = scripted("run-bare", numbered(3));
        run.final_status = "failed".into();
        run.error_message = Some("No rooms left".into());
        let sim = start_sim(Scenario {
            runs: vec![run],
            faults: vec![fault("stream", FaultKind::BareFinish)],
            ..Scenario::default()
        })
        .await;
        let env = sse_env_with_token(backend, &sim, &["run-bare"]);
        let daemon = env.start();
        let lines = env.wait_finished(&["run-bare"]).await;
        daemon.stop().await;
        let raw = std::fs::read_to_string(env.events_path()).unwrap();
        assert_run_exactly_once(&sim, &lines, "run-bare", &raw);
        let finished = lines.last().unwrap();
        assert_eq!(finished["payload"]["status"], "failed", "{finished}");
        assert_eq!(finished["payload"]["errorMessage"], "No rooms left");
    }
}
