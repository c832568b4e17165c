//! A hostile or merely unusual upstream: multi-line payloads that must
//! still make one JSON Lines line each, `Retry-After` values that must not
//! spin or park a run, and streams or answers too large to buffer.

use runhook::simulate::scenario::StreamStyle;
use runhook::simulate::{Scenario, Simulator};
use serde_json::Value;

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
fn cookie_env(sim: &Simulator, runs: &[&str]) -> Env {
    let mut env = Env::new(sim, runs);
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

#[tokio::test]
async fn multi_line_payloads_make_one_file_line_per_event() {
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
    let mut env = cookie_env(&sim, &["run-sse", "run-poll"]);
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
    assert_eq!(row.transport.as_deref(), Some("sse"));
}
