//! Polling ingest to a file sink: exactly once, in order, bytes intact,
//! through crashes, misbehaving servers and every error class.

use runhook::store::Fence;
use std::time::Duration;

use runhook::simulate::scenario::ScriptedEvent;
use runhook::simulate::{Fault, FaultKind, Scenario};

use crate::support::*;

/// Payloads a re-serialiser would change: float formatting, escapes, key order.
const TRICKY: [&str; 4] = [
    r#"{"b":1.10,"a":"é","z":{"y":[1.0,2.50,1e5],"x":null}}"#,
    r#"{"text":"line\nbreak \u00e9 \"quoted\" 🚀","n":-0.0}"#,
    r#"{ "spaced" : true ,"big":12345678901234567890}"#,
    r#"[1,2,3]"#,
];

on_both! {
    async fn every_event_lands_once_in_order_with_payload_bytes_intact(backend: Backend) {
        let tricky: Vec<ScriptedEvent> = TRICKY
            .iter()
            .map(|p| event("ARTIFACT_CREATED", p))
            .collect();
        let scenario = Scenario {
            // Small pages: runhook must ask again at once while events flow.
            page_size: 3,
            runs: vec![scripted("run-a", tricky), scripted("run-b", numbered(40))],
            ..Scenario::default()
        };
        let sim = start_sim(scenario).await;
        let env = Env::on(backend, &sim, &["run-a", "run-b"]);
        let daemon = env.start();
        env.wait_finished(&["run-a", "run-b"]).await;
        daemon.stop().await;
        let raw = std::fs::read_to_string(env.events_path()).unwrap();
        let lines = env.final_lines();
        assert_run_exactly_once(&sim, &lines, "run-a", &raw);
        assert_run_exactly_once(&sim, &lines, "run-b", &raw);
        let first = &lines.iter().find(|l| l["runId"] == "run-a").unwrap();
        assert_eq!(first["id"], "run-a:1");
        assert_eq!(first["labels"]["team"], "rome");
        assert_eq!(first["runStatus"], "running");
        let finished = lines
            .iter()
            .find(|l| l["type"] == "run_finished" && l["runId"] == "run-b")
            .unwrap();
        assert_eq!(finished["id"], "run-b:finished:40");
        assert_eq!(finished["payload"]["status"], "completed");
        assert_eq!(finished["payload"]["lastSequence"], 40);
        assert!(finished["sequence"].is_null());
        let row = env.run_row("run-b").await.unwrap();
        assert_eq!(
            (row.state.as_str(), row.cursor, row.status.as_deref()),
            ("finished", 40, Some("completed"))
        );
    }
}

on_both! {
    async fn gap_unknown_type_and_missing_created_at_pass_through(backend: Backend) {
        let sim = start_sim(Scenario::demo()).await;
        let env = Env::on(backend, &sim, &["demo-lima-0004", "demo-oslo-0002"]);
        let daemon = env.start();
        env.wait_finished(&["demo-lima-0004", "demo-oslo-0002"])
            .await;
        daemon.stop().await;
        let raw = std::fs::read_to_string(env.events_path()).unwrap();
        let lines = env.final_lines();
        assert_run_exactly_once(&sim, &lines, "demo-lima-0004", &raw);
        let lima: Vec<_> = lines
            .iter()
            .filter(|l| l["runId"] == "demo-lima-0004")
            .collect();
        let sequences: Vec<i64> = lima.iter().filter_map(|l| l["sequence"].as_i64()).collect();
        assert_eq!(
            sequences,
            [1, 2, 5, 6, 7, 8],
            "the gap after 2 is kept as is"
        );
        assert!(
            lima.iter().any(|l| l["type"] == "TOOL_CALLED"),
            "unknown type is ordinary data"
        );
        let undated = lima
            .iter()
            .find(|l| l["payload"]["artifactType"] == "entities")
            .unwrap();
        assert!(undated["createdAt"].is_null() && undated.get("createdAt").is_some());
        assert!(
            lima.iter()
                .filter(|l| l["sequence"].is_i64())
                .filter(|l| l["id"] != undated["id"])
                .all(|l| l["createdAt"].is_string())
        );
        let failed = lines
            .iter()
            .find(|l| l["id"] == "demo-oslo-0002:finished:5")
            .expect("failed run_finished");
        assert_eq!(failed["payload"]["status"], "failed");
        assert_eq!(failed["payload"]["errorMessage"], "Flight search timed out");
    }
}

on_both! {
    async fn a_crash_mid_run_loses_and_doubles_nothing(backend: Backend) {
        let mut run = scripted("run-long", numbered(400));
        run.interval = std::time::Duration::from_millis(3);
        let sim = start_sim(Scenario {
            page_size: 25,
            runs: vec![run],
            ..Scenario::default()
        })
        .await;
        let env = Env::on(backend, &sim, &["run-long"]);
        // The built binary, killed with SIGKILL: nothing of it runs on.
        for threshold in [40, 150, 300] {
            let daemon = env.start_process();
            wait_for("progress before the crash", || async {
                let n = env.lines().len();
                if n >= threshold {
                    Ok(())
                } else {
                    Err(format!("{n} lines"))
                }
            })
            .await;
            daemon.crash().await;
        }
        let daemon = env.start_process();
        env.wait_finished(&["run-long"]).await;
        daemon.stop().await;
        let raw = std::fs::read_to_string(env.events_path()).unwrap();
        let lines = env.final_lines();
        assert_run_exactly_once(&sim, &lines, "run-long", &raw);
    }
}

// SQLite only: it forges the daemon's writes under Fence::Exclusive; on
// PostgreSQL the file sink's reconciliation runs under its node's fence (pg_file.rs).
#[tokio::test]
async fn lines_written_before_a_crash_but_not_marked_are_not_written_again() {
    let sim = sim_with(vec![scripted("run-r", numbered(10))]).await;
    let env = Env::new(&sim, &["run-r"]);
    let daemon = env.start();
    env.wait_finished(&["run-r"]).await;
    daemon.stop().await;
    // Forge the state a crash between write and mark leaves: three more
    // events recorded and routed but not marked, their lines already in the
    // file, the last one torn.
    let state = crate::support::open_state(&env.state_path()).await.unwrap();
    let extra = (11..=13)
        .map(|sequence| runhook::store::NewEvent {
            sequence,
            event_type: "LATE".into(),
            payload: serde_json::value::RawValue::from_string(format!("{{\"late\":{sequence}}}"))
                .unwrap(),
            created_at: None,
            sinks: vec!["archive".into()],
        })
        .collect();
    state
        .record_batch(
            &Fence::Exclusive,
            runhook::store::Batch {
                run_id: "run-r".into(),
                events: extra,
                run_status: Some("running".into()),
                phase: None,
                finish: None,
                stalled: None,
            },
        )
        .await
        .unwrap();
    drop(state);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(env.events_path())
        .unwrap();
    std::io::Write::write_all(
        &mut file,
        b"{\"id\":\"run-r:11\",\"type\":\"LATE\"}\n{\"id\":\"run-r:12\",\"type\":\"LATE\"}\n{\"id\":\"run-r:13\",\"ty",
    )
    .unwrap();
    let daemon = env.start();
    wait_for("the torn event delivered", || async {
        // Read raw: the torn line is there until the daemon repairs it.
        let raw = std::fs::read_to_string(env.events_path()).unwrap_or_default();
        if raw.contains(r#""id":"run-r:13","type":"LATE","runId""#) {
            Ok(())
        } else {
            Err(raw)
        }
    })
    .await;
    daemon.stop().await;
    let ids: Vec<String> = env
        .lines()
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_owned())
        .collect();
    for id in ["run-r:11", "run-r:12", "run-r:13"] {
        assert_eq!(
            ids.iter().filter(|i| *i == id).count(),
            1,
            "{id} once in {ids:?}"
        );
    }
}

on_both! {
    async fn a_server_that_resends_or_ignores_since_doubles_nothing(backend: Backend) {
        let fault = |kind, count| Fault {
            run: None,
            endpoint: Some("events".into()),
            count,
            kind,
        };
        let scenario = Scenario {
            page_size: 7,
            runs: vec![scripted("run-echo", numbered(30))],
            faults: vec![
                fault(FaultKind::IgnoreSince, Some(4)),
                fault(FaultKind::Resend, None),
            ],
            ..Scenario::default()
        };
        let sim = start_sim(scenario).await;
        let env = Env::on(backend, &sim, &["run-echo"]);
        let daemon = env.start();
        env.wait_finished(&["run-echo"]).await;
        daemon.stop().await;
        let raw = std::fs::read_to_string(env.events_path()).unwrap();
        let lines = env.final_lines();
        assert_run_exactly_once(&sim, &lines, "run-echo", &raw);
        assert_eq!(sim.faults_left(), 0, "four polls ignored `since`");
    }
}

on_both! {
    async fn a_rejected_token_keeps_retrying_slowly_and_shows_auth_failed(backend: Backend) {
        let sim = sim_with(vec![scripted("run-x", numbered(3))]).await;
        let mut env = Env::on(backend, &sim, &["run-x"]);
        env.token = "wrong-token".into();
        let daemon = env.start();
        let row = wait_for("auth_failed in status", || async {
            match env.run_row("run-x").await {
                Some(row) if row.state == "auth_failed" => Ok(row),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        assert!(
            row.last_error
                .unwrap_or_default()
                .contains("Authentication required")
        );
        let refused = wait_for("four polls refused with 401", || async {
            let refused: Vec<u64> = sim
                .requests()
                .iter()
                .filter(|r| r.status == 401)
                .map(|r| r.at_ms)
                .collect();
            if refused.len() >= 4 {
                Ok(refused)
            } else {
                Err(format!("{refused:?} (ms)"))
            }
        })
        .await;
        daemon.stop().await;
        // The auth backoff starts at 100 ms (poll_interval is 50 ms) and doubles:
        // no gap may be shorter than that, however the jitter falls.
        let gaps: Vec<u64> = refused.windows(2).map(|w| w[1] - w[0]).collect();
        for (i, gap) in gaps.iter().take(3).enumerate() {
            let least = 100 << i;
            assert!(
                *gap >= least,
                "retry {} after a 401 came {gap} ms after the one before, under {least} ms: {gaps:?}",
                i + 1
            );
        }
        let written = std::fs::read_to_string(env.events_path()).unwrap_or_default();
        assert!(written.is_empty(), "nothing written: {written}");
    }
}

on_both! {
    async fn forbidden_and_unknown_runs_stop_with_the_servers_message(backend: Backend) {
        let mut theirs = scripted("run-theirs", numbered(2));
        theirs.owner = "user-2".into();
        let sim = sim_with(vec![theirs, scripted("run-ok", numbered(2))]).await;
        let mut env = Env::on(backend, &sim, &["run-theirs", "run-missing", "run-ok"]);
        env.api.push_str("not_found_confirm = \"300ms\"\n");
        let daemon = env.start();
        for (run, state, message) in [
            ("run-theirs", "forbidden", "Forbidden"),
            ("run-missing", "not_found", "Run not found"),
        ] {
            let row = wait_for(state, || async {
                match env.run_row(run).await {
                    Some(row) if row.state == state => Ok(row),
                    other => Err(format!("{other:?}")),
                }
            })
            .await;
            assert!(row.last_error.unwrap_or_default().contains(message));
        }
        env.wait_finished(&["run-ok"]).await;
        daemon.stop().await;
        // A 403 stops at once; a 404 only once five tries over
        // `not_found_confirm` all answered 404.
        for (run, tries) in [("run-theirs", 1), ("run-missing", 5)] {
            let asked: Vec<u64> = sim
                .requests()
                .iter()
                .filter(|r| r.run_id.as_deref() == Some(run))
                .map(|r| r.at_ms)
                .collect();
            assert_eq!(asked.len(), tries, "{run}: stopped after {tries} refusals");
            let span = asked[tries - 1] - asked[0];
            assert!(
                tries == 1 || span >= 290,
                "{run}: tries spread over the window: {span} ms"
            );
        }
    }
}

on_both! {
    async fn server_errors_and_429_back_off_then_everything_arrives(backend: Backend) {
        let fault = |status, retry_after, count| Fault {
            run: None,
            endpoint: Some("events".into()),
            count: Some(count),
            kind: FaultKind::Status {
                status,
                retry_after,
            },
        };
        let scenario = Scenario {
            runs: vec![scripted("run-flaky", numbered(12))],
            faults: vec![
                fault(500, None, 2),
                fault(502, None, 1),
                fault(429, Some(1), 1),
            ],
            ..Scenario::default()
        };
        let sim = start_sim(scenario).await;
        let env = Env::on(backend, &sim, &["run-flaky"]);
        let daemon = env.start();
        env.wait_finished(&["run-flaky"]).await;
        daemon.stop().await;
        let raw = std::fs::read_to_string(env.events_path()).unwrap();
        let lines = env.final_lines();
        assert_run_exactly_once(&sim, &lines, "run-flaky", &raw);
        assert_eq!(sim.faults_left(), 0, "every injected error was served");
        let log: Vec<_> = sim
            .requests()
            .into_iter()
            .filter(|r| r.endpoint == "events")
            .collect();
        let statuses: Vec<u16> = log.iter().take(5).map(|r| r.status).collect();
        assert_eq!(statuses, [500, 500, 502, 429, 200]);
        let waited = log[4].at_ms - log[3].at_ms;
        assert!(
            waited >= 1000,
            "Retry-After: 1 honoured, waited {waited} ms"
        );
    }
}

on_both! {
    /// A failed run retried upstream is followed again; if the daemon restarts
    /// meanwhile and the run then fails again, its linger counts from that
    /// second failure, not the first, so a second retry is still followed.
    async fn a_run_that_fails_again_after_a_restart_lingers_from_its_latest_failure(backend: Backend) {
        let mut run = scripted("run-twice", numbered(2));
        run.final_status = "failed".into();
        run.error_message = Some("Out of hotels".into());
        run.interval = Duration::from_millis(400);
        run.retry_events = numbered(10);
        run.retry_final_status = Some("failed".into());
        let sim = sim_with(vec![run]).await;
        let mut env = Env::on(backend, &sim, &["run-twice"]);
        env.api
            .push_str("finished_recheck = \"100ms\"\nfinished_linger = \"3s\"\n");
        let finished = |n: usize| {
            let env = &env;
            async move {
                let count = env
                    .lines()
                    .iter()
                    .filter(|l| l["type"] == "run_finished")
                    .count();
                if count >= n {
                    Ok(())
                } else {
                    Err(format!("{count} run_finished"))
                }
            }
        };
        let retry = || async {
            let answer = reqwest::Client::new()
                .post(format!("{}/v1/agent-runs/run-twice/control", sim.url()))
                .bearer_auth(sim.token())
                .json(&serde_json::json!({"action": "retry"}))
                .send()
                .await
                .unwrap();
            assert!(answer.status().is_success(), "retry: {}", answer.status());
        };

        let daemon = env.start();
        wait_for("the first failure", || finished(1)).await;
        retry().await;
        wait_for("the retried run followed", || async {
            let lines = env.lines();
            if lines.iter().any(|l| l["sequence"] == 3) {
                Ok(())
            } else {
                Err(format!("{} lines", lines.len()))
            }
        })
        .await;
        // A restart while the run runs again: the new follower starts from the
        // stored row, which still holds the first failure's time.
        daemon.stop().await;
        let daemon = env.start();
        // The retried run takes 4 s: it fails again past the first linger.
        wait_for("the second failure", || finished(2)).await;
        retry().await;
        wait_for_within(Duration::from_secs(30), "a third run_finished", || {
            finished(3)
        })
        .await;
        daemon.stop().await;
    }
}
