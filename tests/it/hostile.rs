//! A hostile or merely unusual upstream: multi-line payloads that must
//! still make one JSON Lines line each, `Retry-After` values that must not
//! spin or park a run, and streams or answers too large to buffer.

use std::time::Duration;

use runhook::simulate::scenario::StreamStyle;
use runhook::simulate::{Fault, FaultKind, Scenario, Simulator};
use serde_json::Value;

use crate::receiver::{Answer, Receiver, SECRET};
use crate::support::*;

/// Payloads whose pretty-printed form spans many lines; some carry escaped
/// line breaks inside strings, which must stay as they are.
const PAYLOADS: [&str; 4] = [
    r#"{"b":1.10,"a":"é\nx","z":{"y":[1.0,2.50,1e5],"x":null}}"#,
    r#"{"text":"line\r\nbreak, \"quoted\" 🚀","list":[{"k":[]},{}]}"#,
    r#"[1,2,3]"#,
    r#"{}"#,
];

/// Cookie only, so that `auto` streams; `poll_runs` poll with the cookie.
fn cookie_env(backend: Backend, sim: &Simulator, runs: &[&str]) -> Env {
    let mut env = Env::on(backend, sim, runs);
    env.token = String::new();
    env.api = format!(
        "session_cookie = \"{}\"\nstream_idle_timeout = \"2s\"\npoll_interval = \"50ms\"\n",
        sim.session()
    );
    env
}

/// Every line of the file, raw, each of which must be a JSON object.
fn raw_lines(env: &Env) -> Vec<Value> {
    let text = std::fs::read_to_string(env.events_path()).unwrap_or_default();
    assert!(text.ends_with('\n'), "the file ends with a complete line");
    text.split('\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            assert!(!line.contains('\r'), "no CR in a line: {line:?}");
            serde_json::from_str(line).unwrap_or_else(|e| {
                panic!("a JSON Lines line must parse on its own: {line:?}: {e}")
            })
        })
        .collect()
}

on_both! {
    async fn multi_line_payloads_make_one_file_line_per_event(backend: Backend) {
        let events = || {
            PAYLOADS
                .iter()
                .map(|p| event("ARTIFACT_CREATED", p))
                .collect()
        };
        let sim = start_sim(Scenario {
            pretty_payloads: true,
            stream: StreamStyle {
                multiline: true,
                ..StreamStyle::default()
            },
            runs: vec![
                scripted("run-sse", events()),
                scripted("run-poll", events()),
            ],
            ..Scenario::default()
        })
        .await;
        let mut env = cookie_env(backend, &sim, &["run-sse", "run-poll"]);
        env.poll_runs = vec!["run-poll".into()];
        let daemon = env.start();
        wait_for("a run_finished line of both runs", || async {
            let text = std::fs::read_to_string(env.events_path()).unwrap_or_default();
            let done = ["run-sse", "run-poll"]
                .iter()
                .all(|run| text.contains(&format!("\"id\":\"{run}:finished:")));
            if done { Ok(()) } else { Err(text) }
        })
        .await;
        daemon.stop().await;
        let lines = raw_lines(&env);
        for run in ["run-sse", "run-poll"] {
            let of_run: Vec<&Value> = lines.iter().filter(|l| l["runId"] == run).collect();
            assert_eq!(
                of_run.len(),
                PAYLOADS.len() + 1,
                "{run}: a line per event, then run_finished"
            );
            for (line, raw) in of_run.iter().zip(PAYLOADS) {
                let expected: Value = serde_json::from_str(raw).unwrap();
                assert_eq!(line["payload"], expected, "{run}: the same JSON value");
            }
        }
        let row = env.run_row("run-sse").await.unwrap();
        assert_eq!(
            row.transport.map(runhook::config::Transport::name),
            Some("sse")
        );
    }
}

/// Gaps between the answers with `status` to `endpoint` requests of `run`.
fn gaps(sim: &Simulator, endpoint: &str, run: &str, status: u16) -> Vec<u64> {
    let at: Vec<u64> = sim
        .requests()
        .iter()
        .filter(|r| {
            r.endpoint == endpoint && r.run_id.as_deref() == Some(run) && r.status == status
        })
        .map(|r| r.at_ms)
        .collect();
    at.windows(2).map(|w| w[1] - w[0]).collect()
}

on_both! {
    async fn upstream_retry_after_zero_does_not_spin(backend: Backend) {
        let fault = |run: &str, endpoint: &str| Fault {
            run: Some(run.into()),
            endpoint: Some(endpoint.into()),
            count: Some(3),
            kind: FaultKind::Status {
                status: 503,
                retry_after: Some(0),
            },
        };
        let sim = start_sim(Scenario {
            runs: vec![
                scripted("run-poll", numbered(3)),
                scripted("run-sse", numbered(3)),
            ],
            faults: vec![fault("run-poll", "events"), fault("run-sse", "stream")],
            ..Scenario::default()
        })
        .await;
        let mut env = cookie_env(backend, &sim, &["run-poll", "run-sse"]);
        env.poll_runs = vec!["run-poll".into()];
        let daemon = env.start();
        env.wait_finished(&["run-poll", "run-sse"]).await;
        daemon.stop().await;
        assert_eq!(sim.faults_left(), 0, "every 503 was served");
        for (endpoint, run) in [("events", "run-poll"), ("stream", "run-sse")] {
            let gaps = gaps(&sim, endpoint, run, 503);
            assert_eq!(gaps.len(), 2, "{run}: three 503 answers");
            assert!(
                gaps.iter().all(|gap| *gap >= 950),
                "{run}: `Retry-After: 0` waits at least the 1 s floor, waited {gaps:?} ms"
            );
        }
    }
}

on_both! {
    async fn a_sink_retry_after_past_max_age_dead_letters_at_max_age(backend: Backend) {
        let sim = sim_with(vec![scripted("run-week", numbered(2))]).await;
        let receiver = Receiver::start().await;
        receiver.script([Answer::TooMany(604_800), Answer::TooMany(604_800)]);
        let mut env = Env::on(backend, &sim, &["run-week"]);
        env.extra = format!(
            "\n[sinks.ops]\ntype = \"webhook\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n\
             max_age = \"2s\"\ninitial_backoff = \"100ms\"\nmax_backoff = \"1s\"\n\n[[routes]]\nsinks = [\"ops\"]\n",
            receiver.url()
        );
        let daemon = env.start();
        let accepted = wait_for_within(
            Duration::from_secs(30),
            "the rest of the run delivered after the first event's dead letter",
            || async {
                let accepted: Vec<String> = receiver.accepted().iter().map(|r| r.id.clone()).collect();
                if accepted.len() >= 2 {
                    Ok(accepted)
                } else {
                    Err(format!("{accepted:?}"))
                }
            },
        )
        .await;
        daemon.stop().await;
        assert_eq!(accepted, ["run-week:2", "run-week:finished:2"]);
        let requests = receiver.requests();
        let waited = requests[1].at - requests[0].at;
        assert!(
            waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10),
            "the last attempt comes at max_age (2 s after queueing), waited {waited:?}"
        );
        let reader = env.reads().await.unwrap();
        let dead = reader.dead_letters(None, None).await.unwrap();
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(
            (dead[0].id.as_str(), dead[0].last_status),
            ("run-week:1", Some(429))
        );
    }
}

on_both! {
    async fn a_poll_answer_over_the_cap_is_a_clear_run_error_not_a_loop(backend: Backend) {
        let sim = start_sim(Scenario {
            runs: vec![scripted("run-big", numbered(2))],
            faults: vec![Fault {
                run: None,
                endpoint: Some("events".into()),
                count: None,
                kind: FaultKind::BigAnswer {
                    bytes: 65 * 1024 * 1024,
                },
            }],
            ..Scenario::default()
        })
        .await;
        let env = Env::on(backend, &sim, &["run-big"]);
        let daemon = env.start();
        let row = wait_for_within(Duration::from_secs(30), "the run's error", || async {
            match env.run_row("run-big").await {
                Some(row)
                    if row
                        .last_error
                        .as_deref()
                        .is_some_and(|e| e.contains("64 MiB")) =>
                {
                    Ok(row)
                }
                row => Err(format!("{row:?}")),
            }
        })
        .await;
        let asked = sim
            .requests()
            .iter()
            .filter(|r| r.endpoint == "events")
            .count();
        daemon.stop().await;
        assert_eq!(row.state, "retrying", "{row:?}");
        assert_eq!(asked, 1, "not downloaded again at once");
    }
}

/// `(since)` of each request to `endpoint`.
fn sinces(sim: &Simulator, endpoint: &str) -> Vec<i64> {
    sim.requests()
        .iter()
        .filter(|r| r.endpoint == endpoint && r.status == 200)
        .filter_map(|r| r.since)
        .collect()
}

on_both! {
    async fn a_stream_event_over_the_cap_is_caught_up_by_polling(backend: Backend) {
        let mut events = numbered(3);
        let blob = "x".repeat(1536 * 1024);
        events.push(event(
            "ARTIFACT_CREATED",
            &format!(r#"{{"blob":"{blob}"}}"#),
        ));
        events.extend(numbered(10));
        // Still live for 3 s after the oversize event, so the stream has a
        // reason to come back once polling got past it, even on a loaded machine
        // (with 0.6 s left the run could end before the catch-up did).
        let mut run = scripted("run-huge", events);
        run.interval = Duration::from_millis(300);
        let sim = sim_with(vec![run]).await;
        let env = cookie_env(backend, &sim, &["run-huge"]);
        let daemon = env.start();
        env.wait_finished(&["run-huge"]).await;
        daemon.stop().await;
        let raw = std::fs::read_to_string(env.events_path()).unwrap();
        let lines = env.final_lines();
        assert_run_exactly_once(&sim, &lines, "run-huge", &raw);
        assert_eq!(
            sinces(&sim, "events").first(),
            Some(&3),
            "the oversize event (4) is fetched by polling from the cursor"
        );
        let streams = sinces(&sim, "stream");
        assert!(
            streams.len() == 2 && streams[0] == 0 && streams[1] >= 4,
            "then the stream resumes after it: {streams:?}"
        );
    }
}

on_both! {
    async fn bytes_that_are_not_utf8_drop_the_stream_at_once(backend: Backend) {
        let sim = start_sim(Scenario {
            runs: vec![scripted("run-bad", numbered(5))],
            faults: vec![Fault {
                run: None,
                endpoint: Some("stream".into()),
                count: Some(1),
                kind: FaultKind::InvalidUtf8 { after: 2 },
            }],
            ..Scenario::default()
        })
        .await;
        let mut env = cookie_env(backend, &sim, &["run-bad"]);
        // Catch-up polls with the token (without one, runhook reconnects).
        env.token = sim.token().to_owned();
        // Far longer than the test waits: only the decoding error can end the
        // poisoned connection in time.
        env.api = env.api.replace(
            "stream_idle_timeout = \"2s\"",
            "stream_idle_timeout = \"120s\"",
        );
        let daemon = env.start();
        wait_for_within(Duration::from_secs(20), "the run finished", || async {
            let lines = read_lines(&env.events_path());
            if lines.iter().any(|l| l["type"] == "run_finished") {
                Ok(())
            } else {
                Err(format!("{} lines", lines.len()))
            }
        })
        .await;
        daemon.stop().await;
        let raw = std::fs::read_to_string(env.events_path()).unwrap();
        assert_run_exactly_once(&sim, &env.final_lines(), "run-bad", &raw);
        assert_eq!(sim.faults_left(), 0, "the bad bytes were served");
        assert_eq!(
            sinces(&sim, "events").first(),
            Some(&2),
            "caught up by polling"
        );
    }
}
