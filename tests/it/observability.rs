//! What an operator sees of a running daemon: metrics without a series per
//! run, counters present before their first event, dead letters that say
//! why, journald priorities, repeated warnings summarised, a bad
//! `RUNHOOK_LOG` refused. The daemon runs as the built binary, so its
//! metrics registry starts empty.

use std::process::{Command, Stdio};

use crate::receiver::SECRET;
use crate::support::*;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// A port nothing listens on: deliveries there are refused.
fn closed_port() -> u16 {
    free_port()
}

/// A daemon's `/metrics`.
pub struct Metrics {
    url: String,
}

impl Metrics {
    pub fn at(port: u16) -> Self {
        Self {
            url: format!("http://127.0.0.1:{port}/metrics"),
        }
    }

    pub async fn scrape(&self) -> Result<String, String> {
        let response = reqwest::get(&self.url).await.map_err(|e| e.to_string())?;
        response.text().await.map_err(|e| e.to_string())
    }
}

/// The value of the sample whose name and labels are exactly these.
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
}

fn webhook(name: &str, port: u16, max_attempts: u32) -> String {
    format!(
        "\n[sinks.{name}]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:{port}/hook\"\n\
         secret = \"{SECRET}\"\ntimeout = \"2s\"\nmax_attempts = {max_attempts}\n\
         initial_backoff = \"5s\"\nmax_backoff = \"5s\"\n"
    )
}

on_both! {
    async fn metrics_have_no_series_per_run_and_show_a_stuck_sinks_oldest_delivery(backend: Backend) {
        let runs = ["run-o1", "run-o2", "run-o3"];
        let sim = sim_with(runs.iter().map(|r| scripted(r, numbered(2))).collect()).await;
        let port = free_port();
        let mut env = Env::on(backend, &sim, &runs);
        env.extra = format!(
            "\n[server]\nlisten = \"127.0.0.1:{port}\"\n{}\n[[routes]]\nsinks = [\"ops\"]\n",
            webhook("ops", closed_port(), 1000)
        );
        let _daemon = env.start_process();
        let metrics = Metrics::at(port);
        let text = wait_for("ops's oldest pending delivery ageing", || async {
            let text = metrics.scrape().await?;
            match sample(
                &text,
                "runhook_oldest_pending_delivery_age_seconds{sink=\"ops\"}",
            ) {
                Some(age) if age >= 0.5 => Ok(text),
                other => Err(format!("age {other:?} in\n{text}")),
            }
        })
        .await;
        assert!(!text.contains("run_id="), "a series per run:\n{text}");
        assert_eq!(
            sample(
                &text,
                "runhook_oldest_pending_delivery_age_seconds{sink=\"archive\"}"
            ),
            Some(0.0),
            "the file sink keeps up:\n{text}"
        );
        assert!(
            sample(&text, "runhook_longest_run_silence_seconds").is_some(),
            "{text}"
        );
        assert_eq!(
            sample(&text, "runhook_runs{state=\"stalled\"}"),
            Some(0.0),
            "{text}"
        );
        // Never happened, and exported anyway: increase() needs the 0 first.
        for zero in [
            "runhook_deliveries_total{outcome=\"dead\",sink=\"ops\"}",
            "runhook_deliveries_total{outcome=\"delivered\",sink=\"ops\"}",
            "runhook_sink_restarts_total{sink=\"ops\"}",
            "runhook_events_ingested_total{transport=\"sse\"}",
        ] {
            assert_eq!(sample(&text, zero), Some(0.0), "{zero} in\n{text}");
        }
        let build = format!(
            "runhook_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(sample(&text, &build), Some(1.0), "{text}");
        assert!(
            sample(&text, "runhook_upstream_request_duration_seconds_count").unwrap_or(0.0) >= 1.0,
            "{text}"
        );
        assert!(
            sample(&text, "process_resident_memory_bytes").is_some(),
            "{text}"
        );
    }
}

on_both! {
    async fn a_dead_letter_says_why_the_delivery_failed(backend: Backend) {
        let sim = sim_with(vec![scripted("run-d", numbered(1))]).await;
        let mut env = Env::on(backend, &sim, &["run-d"]);
        env.extra = format!(
            "{}\n[[routes]]\nsinks = [\"dlq\"]\n",
            webhook("dlq", closed_port(), 1)
        );
        let daemon = env.start();
        let state = env.state_arg();
        let listed = wait_for("the dead letters listed", || async {
            let output = Command::new(env!("CARGO_BIN_EXE_runhook"))
                .args([
                    "--state",
                    &state,
                    "dead",
                    "--sink",
                    "dlq",
                ])
                .env("RUNHOOK_LOG", "error")
                .output()
                .map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&output.stdout).into_owned();
            if text.contains("run-d:1") && text.contains("run-d:finished:1") {
                Ok(text)
            } else {
                Err(text)
            }
        })
        .await;
        daemon.stop().await;
        assert!(
            listed.to_lowercase().contains("connection refused"),
            "the cause, not just 'error sending request':\n{listed}"
        );
    }
}

/// `<device>:<inode>` of a file, as systemd puts it in `JOURNAL_STREAM`.
fn journal_stream_of(file: &std::fs::File) -> String {
    use std::os::unix::fs::MetadataExt;
    let metadata = file.metadata().expect("stat");
    format!("{}:{}", metadata.dev(), metadata.ino())
}

on_both! {
    async fn under_journald_lines_carry_priorities_and_a_bad_token_warns_once_for_all_runs(backend: Backend) {
        let runs = ["run-j1", "run-j2", "run-j3", "run-j4", "run-j5"];
        let sim = sim_with(runs.iter().map(|r| scripted(r, numbered(1))).collect()).await;
        let mut env = Env::on(backend, &sim, &runs);
        env.token = "wrong-token".into();
        let config = env.write_config();
        let log_path = env.dir.path().join("stderr.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let stream = journal_stream_of(&log);
        let mut child = Command::new(env!("CARGO_BIN_EXE_runhook"))
            .args(["--config", &config.display().to_string(), "run"])
            .env("RUNHOOK_LOG", "info")
            .env("JOURNAL_STREAM", stream)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("runhook starts");
        wait_for("every run auth_failed", || async {
            let rows = env.runs().await;
            let failed = rows.iter().filter(|r| r.state == "auth_failed").count();
            if failed == runs.len() {
                Ok(())
            } else {
                Err(format!("{failed} of {} auth_failed", runs.len()))
            }
        })
        .await;
        let stopped = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(stopped.success());
        let exit = tokio::task::spawn_blocking(move || child.wait().expect("wait"))
            .await
            .expect("waiting task");
        assert!(exit.success(), "{exit}");
        let text = std::fs::read_to_string(&log_path).expect("log");
        let warned: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("auth_failed") && l.contains("run_id="))
            .collect();
        assert_eq!(warned.len(), 1, "one warning for the five runs:\n{text}");
        // The four others are counted, and the count written at exit.
        assert!(
            text.lines().any(|l| l.starts_with("<4>")
                && l.contains("repeated 4 more times for 5 runs")
                && l.contains("auth_failed")),
            "a summary of the repeats:\n{text}"
        );
        for line in text.lines() {
            let priority = line.get(..3).unwrap_or_default();
            assert!(
                matches!(priority, "<3>" | "<4>" | "<6>"),
                "a log line without its journald priority: {line:?}\n{text}"
            );
        }
    }
}

#[test]
fn an_invalid_runhook_log_is_an_error_not_ignored() {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("s.db").display().to_string();
    // `forward` installs its own delivery lines beside the same logger.
    let forward = [
        "forward",
        "run-1",
        "--to",
        "http://127.0.0.1:9/hooks",
        "--token",
        "t",
    ];
    for args in [&["--state", &state, "status"][..], &forward[..]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_runhook"))
            .args(args)
            .env("RUNHOOK_LOG", "runhook=loud")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("runhook runs");
        // A command that ignored the filter would run on (forward does):
        // killed at the deadline, it fails below rather than hanging here.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while child.try_wait().expect("wait").is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = child.kill();
        let output = child.wait_with_output().expect("runhook output");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(78), "{args:?}: {stderr}");
        assert!(
            stderr.contains("RUNHOOK_LOG=\"runhook=loud\""),
            "{args:?}: {stderr}"
        );
    }
}
