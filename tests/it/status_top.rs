//! `runhook status` at scale: filters, the summary line, every configured
//! sink (even one with no deliveries yet), the oldest pending delivery's
//! age; and working from `--state` alone. (`top` is tested in the binary's
//! unit tests: its view is a pure function, its screen a ratatui
//! `TestBackend`.)

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::receiver::{Answer, Receiver, SECRET};
use crate::support::*;

fn runhook(config: &Path, state: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_runhook"))
        .arg("--config")
        .arg(config)
        .arg("--state")
        .arg(state)
        .args(args)
        .output()
        .expect("runhook runs")
}

fn status_json(config: &Path, state: &str, args: &[&str]) -> Value {
    let output = runhook(config, state, &[&["status", "--json"], args].concat());
    assert!(
        output.status.success(),
        "status {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("status --json is JSON")
}

fn run_ids(status: &Value) -> Vec<&str> {
    status["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| r["run_id"].as_str().expect("run_id"))
        .collect()
}

fn sink<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["sinks"]
        .as_array()
        .expect("sinks")
        .iter()
        .find(|s| s["sink"] == name)
        .unwrap_or_else(|| panic!("sink {name} in {status}"))
}

on_both! {
    async fn status_filters_summarises_and_lists_every_configured_sink(backend: Backend) {
        let mut slow = scripted("run-slow", numbered(200));
        slow.interval = Duration::from_millis(200);
        let sim = sim_with(vec![scripted("run-done", numbered(3)), slow]).await;
        let receiver = Receiver::start().await;
        receiver.set_default(Some(Answer::Status(503)));
        let mut env = Env::on(backend, &sim, &["run-done", "run-slow"]);
        env.extra = format!(
            "\n[sinks.ops]\ntype = \"webhook\"\nurl = \"http://{}/ops\"\nsecret = \"{SECRET}\"\n\
             initial_backoff = \"1m\"\n\n[[routes]]\nsinks = [\"ops\"]\n\n\
             [sinks.quiet]\ntype = \"file\"\npath = \"{}\"\n{}\n\
             [[routes]]\nevent_types = [\"NEVER_SENT\"]\nsinks = [\"quiet\"]\n",
            receiver.addr,
            env.dir.path().join("quiet.jsonl").display(),
            env.file_sink_node()
        );
        let config = env.write_config();
        let state = env.state_arg();
        let daemon = env.start();
        env.wait_finished(&["run-done"]).await;
        wait_for("run-slow following, ops backlog", || async {
            let status = status_json(&config, &state, &[]);
            let slow_following = status["runs"].as_array().is_some_and(|runs| {
                runs.iter()
                    .any(|r| r["run_id"] == "run-slow" && r["state"] == "following")
            });
            if slow_following && sink(&status, "ops")["pending"].as_i64() > Some(3) {
                Ok(())
            } else {
                Err(status.to_string())
            }
        })
        .await;

        let all = status_json(&config, &state, &[]);
        assert_eq!(run_ids(&all), ["run-done", "run-slow"]);
        let quiet = sink(&all, "quiet");
        assert_eq!(
            quiet["pending"], 0,
            "a configured sink with no deliveries: {all}"
        );
        assert_eq!(quiet["oldest_pending_age_s"], Value::Null);
        assert!(sink(&all, "ops")["oldest_pending_age_s"].is_i64(), "{all}");

        let finished = status_json(&config, &state, &["--run-state", "finished"]);
        assert_eq!(run_ids(&finished), ["run-done"]);
        let summary = finished["summary"].as_str().expect("summary");
        assert!(
            summary.starts_with("2 runs (1 finished, 1 following); 3 sinks (0 down); "),
            "the summary counts every run, whatever the filter: {summary}"
        );
        assert_eq!(
            run_ids(&status_json(&config, &state, &["--active"])),
            ["run-slow"]
        );
        assert_eq!(
            run_ids(&status_json(&config, &state, &["--run", "run-slow"])),
            ["run-slow"]
        );
        let both = status_json(
            &config,
            &state,
            &["--run-state", "following", "--run-state", "finished"],
        );
        assert_eq!(run_ids(&both), ["run-done", "run-slow"]);

        let text = runhook(&config, &state, &["status", "--run-state", "following"]);
        assert!(text.status.success());
        let text = String::from_utf8_lossy(&text.stdout);
        let mut lines = text.lines();
        assert!(
            lines.next().is_some_and(|l| l.starts_with("2 runs (")),
            "summary first: {text}"
        );
        assert!(
            text.contains("run-slow") && !text.contains("run-done"),
            "{text}"
        );
        let quiet_line = text
            .lines()
            .find(|l| l.trim_start().starts_with("quiet"))
            .expect(&text);
        assert!(quiet_line.contains(" 0 "), "{quiet_line}");
        let ops_line = text
            .lines()
            .find(|l| l.trim_start().starts_with("ops"))
            .expect(&text);
        assert!(
            ops_line
                .split_whitespace()
                .nth(2)
                .is_some_and(|oldest| oldest.ends_with('s') || oldest.ends_with('m')),
            "the oldest pending age: {ops_line}"
        );

        let bogus = runhook(&config, &state, &["status", "--run-state", "stuck"]);
        assert!(!bogus.status.success());
        let stderr = String::from_utf8_lossy(&bogus.stderr);
        assert!(
            stderr.contains("stalled") && stderr.contains("unwatched"),
            "{stderr}"
        );

        let no_config = status_json(&env.dir.path().join("missing.toml"), &state, &[]);
        assert_eq!(
            run_ids(&no_config),
            ["run-done", "run-slow"],
            "--state alone is enough"
        );
        assert!(
            no_config["sinks"]
                .as_array()
                .expect("sinks")
                .iter()
                .all(|s| s["sink"] != "quiet"),
            "without a config, the sinks the database knows: {no_config}"
        );
        daemon.stop().await;
    }
}
