//! The live stream: exactly once through drops, error frames, silence,
//! replays and odd framing; transport choice and fallback; retried runs;
//! many runs at once.

use std::time::Duration;

use runhook::simulate::scenario::{Bulk, StreamStyle};
use runhook::simulate::{Fault, FaultKind, Scenario, Simulator};

use crate::support::*;

/// Cookie only: `auto` picks the stream.
fn sse_env(backend: Backend, sim: &Simulator, runs: &[&str]) -> Env {
    let mut env = Env::on(backend, sim, runs);
    env.token = String::new();
    env.api = format!(
        "session_cookie = \"{}\"\nstream_idle_timeout = \"2s\"\n",
        sim.session()
    );
    env
}

fn stream_fault(kind: FaultKind, count: Option<u32>) -> Fault {
    Fault {
        run: None,
        endpoint: Some("stream".into()),
        count,
        kind,
    }
}

async fn run_to_completion(sim: &Simulator, env: &Env, runs: &[&str]) {
    let daemon = env.start();
    env.wait_finished(runs).await;
    daemon.stop().await;
    let raw = std::fs::read_to_string(env.events_path()).unwrap();
    let lines = env.final_lines();
    for run in runs {
        assert_run_exactly_once(sim, &lines, run, &raw);
    }
    assert_eq!(sim.faults_left(), 0, "every counted fault was served");
}

fn stream_sinces(sim: &Simulator) -> Vec<i64> {
    sim.requests()
        .iter()
        .filter(|r| r.endpoint == "stream")
        .filter_map(|r| r.since)
        .collect()
}

on_both! {
    async fn the_stream_delivers_every_event_once_and_one_run_finished(backend: Backend) {
        let mut run = scripted("run-live", numbered(20));
        run.interval = Duration::from_millis(5);
        let sim = sim_with(vec![run]).await;
        let env = sse_env(backend, &sim, &["run-live"]);
        run_to_completion(&sim, &env, &["run-live"]).await;
        assert!(
            sim.requests().iter().all(|r| r.endpoint != "events"),
            "no polling"
        );
        assert_eq!(stream_sinces(&sim), [0]);
        assert_eq!(transport(&env, "run-live").await, Some("sse"));
    }
}

on_both! {
    async fn dropped_streams_resume_from_the_cursor(backend: Backend) {
        let sim = start_sim(Scenario {
            runs: vec![scripted("run-drop", numbered(30))],
            faults: vec![stream_fault(FaultKind::DropStream { after: 5 }, None)],
            ..Scenario::default()
        })
        .await;
        let env = sse_env(backend, &sim, &["run-drop"]);
        run_to_completion(&sim, &env, &["run-drop"]).await;
        // The last connection (since 25) carries 26..30 and the run_finished.
        assert_eq!(
            stream_sinces(&sim),
            [0, 5, 10, 15, 20, 25],
            "each reconnect asks from the cursor"
        );
    }
}

on_both! {
    async fn replayed_and_stale_events_on_resume_are_dropped(backend: Backend) {
        let sim = start_sim(Scenario {
            runs: vec![scripted("run-stale", numbered(12))],
            faults: vec![
                stream_fault(FaultKind::DropStream { after: 4 }, Some(2)),
                stream_fault(FaultKind::Resend, None),
            ],
            ..Scenario::default()
        })
        .await;
        let env = sse_env(backend, &sim, &["run-stale"]);
        run_to_completion(&sim, &env, &["run-stale"]).await;
        assert_eq!(stream_sinces(&sim), [0, 4, 8]);
    }
}

on_both! {
    async fn error_frames_and_silent_streams_reconnect(backend: Backend) {
        let sim = start_sim(Scenario {
            heartbeat: Duration::from_secs(600),
            runs: vec![scripted("run-err", numbered(10))],
            faults: vec![
                stream_fault(FaultKind::ErrorFrame { after: 3 }, Some(1)),
                stream_fault(FaultKind::Stall { after: 2 }, Some(1)),
            ],
            ..Scenario::default()
        })
        .await;
        let mut env = sse_env(backend, &sim, &["run-err"]);
        env.api = env.api.replace(
            "stream_idle_timeout = \"2s\"",
            "stream_idle_timeout = \"400ms\"",
        );
        run_to_completion(&sim, &env, &["run-err"]).await;
        // Error frame after 3 events, then a stall after 2 more, then the rest.
        assert_eq!(stream_sinces(&sim), [0, 3, 5]);
    }
}

on_both! {
    async fn split_multiline_flat_frames_and_comments_parse(backend: Backend) {
        let sim = start_sim(Scenario {
            stream: StreamStyle {
                flat: true,
                multiline: true,
                split: true,
                comments: true,
            },
            heartbeat: Duration::from_millis(50),
            runs: vec![
                scripted("run-odd", event_payloads()),
                scripted("run-odd2", numbered(8)),
            ],
            ..Scenario::default()
        })
        .await;
        let env = sse_env(backend, &sim, &["run-odd", "run-odd2"]);
        run_to_completion(&sim, &env, &["run-odd", "run-odd2"]).await;
    }
}

/// The transport the run's row says it is followed by.
async fn transport(env: &Env, run: &str) -> Option<&'static str> {
    env.run_row(run)
        .await
        .unwrap()
        .transport
        .map(runhook::config::Transport::name)
}

fn event_payloads() -> Vec<runhook::simulate::scenario::ScriptedEvent> {
    [
        r#"{"b":1.10,"a":"é\nx"}"#,
        r#"{"data: ":"not a field","\n\n":true}"#,
        "[]",
    ]
    .iter()
    .map(|p| event("ARTIFACT_CREATED", p))
    .collect()
}

on_both! {
    async fn bearer_only_polls_and_never_opens_the_stream(backend: Backend) {
        let sim = sim_with(vec![scripted("run-b", numbered(4))]).await;
        let mut env = Env::on(backend, &sim, &["run-b"]);
        env.api = "poll_interval = \"50ms\"\n".into(); // transport auto, no cookie
        run_to_completion(&sim, &env, &["run-b"]).await;
        assert!(sim.requests().iter().all(|r| r.endpoint != "stream"));
        assert_eq!(transport(&env, "run-b").await, Some("poll"));
    }
}

on_both! {
    async fn a_rejected_cookie_falls_back_to_polling_with_the_token(backend: Backend) {
        let sim = sim_with(vec![scripted("run-fb", numbered(6))]).await;
        let mut env = Env::on(backend, &sim, &["run-fb"]);
        env.api = "session_cookie = \"stale-cookie\"\npoll_interval = \"50ms\"\n".into();
        run_to_completion(&sim, &env, &["run-fb"]).await;
        let log = sim.requests();
        let streams: Vec<u16> = log
            .iter()
            .filter(|r| r.endpoint == "stream")
            .map(|r| r.status)
            .collect();
        assert_eq!(streams, [401], "one refused stream, then no more");
        assert!(
            log.iter()
                .any(|r| r.endpoint == "events" && r.status == 200)
        );
        assert_eq!(transport(&env, "run-fb").await, Some("poll"));
    }
}

on_both! {
    async fn a_failed_run_retried_upstream_gets_its_new_events_and_a_second_run_finished(backend: Backend) {
        let mut run = scripted("run-retry", numbered(3));
        run.final_status = "failed".into();
        run.error_message = Some("Out of hotels".into());
        run.retry_events = numbered(2);
        let sim = sim_with(vec![run]).await;
        let mut env = sse_env(backend, &sim, &["run-retry"]);
        env.api
            .push_str("finished_recheck = \"100ms\"\nfinished_linger = \"1m\"\n");
        let daemon = env.start();
        env.wait_finished(&["run-retry"]).await;
        let control = reqwest::Client::new()
            .post(format!("{}/v1/agent-runs/run-retry/control", sim.url()))
            .bearer_auth(sim.token())
            .json(&serde_json::json!({"action": "retry"}))
            .send()
            .await
            .unwrap();
        assert!(control.status().is_success());
        wait_for("a second run_finished", || async {
            let lines = env.lines();
            let finished = lines.iter().filter(|l| l["type"] == "run_finished").count();
            if finished == 2 {
                Ok(())
            } else {
                Err(format!("{finished} run_finished"))
            }
        })
        .await;
        daemon.stop().await;
        let lines = env.final_lines();
        let ids: Vec<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
        assert_eq!(
            ids,
            [
                "run-retry:1",
                "run-retry:2",
                "run-retry:3",
                "run-retry:finished:3",
                "run-retry:4",
                "run-retry:5",
                "run-retry:finished:5"
            ]
        );
        assert_eq!(lines[3]["payload"]["status"], "failed");
        assert_eq!(lines[3]["payload"]["errorMessage"], "Out of hotels");
        assert_eq!(lines[6]["payload"]["status"], "completed");
    }
}

on_both! {
    async fn a_thousand_runs_over_sse_at_once_each_event_once(backend: Backend) {
        let bulk = Bulk {
            runs: 1000,
            events: 5,
            interval: Duration::from_millis(200),
            prefix: "many".into(),
        };
        let sim = start_sim(Scenario {
            bulk: Some(bulk),
            ..Scenario::default()
        })
        .await;
        let ids = sim.run_ids();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let env = sse_env(backend, &sim, &refs);
        let daemon = env.start();
        env.wait_finished(&refs).await;
        daemon.stop().await;
        let lines = env.final_lines();
        assert_eq!(
            lines.len(),
            1000 * 6,
            "every event once, one run_finished each"
        );
        let mut seen = std::collections::HashSet::new();
        for line in &lines {
            assert!(
                seen.insert(line["id"].as_str().unwrap().to_owned()),
                "duplicate {}",
                line["id"]
            );
        }
        let streams = sim
            .requests()
            .iter()
            .filter(|r| r.endpoint == "stream")
            .count();
        assert_eq!(streams, 1000, "one connection per run");
    }
}
