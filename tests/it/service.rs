//! Running as a service: reload, SIGTERM during busy delivery, /metrics and
//! /readyz, and secrets that never reach the logs (the systemd unit: packaging.rs).

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runhook::config::Config;
use runhook::simulate::{Fault, FaultKind, Scenario};
use tokio_util::sync::CancellationToken;

use crate::receiver::{Receiver, SECRET};
use crate::support::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

on_both! {
    async fn reload_applies_new_routes_to_new_events_and_starts_new_runs(backend: Backend) {
        let mut slow = scripted("run-a", numbered(30));
        slow.interval = Duration::from_millis(60);
        let sim = sim_with(vec![slow, scripted("run-b", numbered(5))]).await;
        let mut env = Env::on(backend, &sim, &["run-a"]);
        let config = Arc::new(env.config());
        let (reloads, reloaded) = tokio::sync::mpsc::channel(1);
        let shutdown = CancellationToken::new();
        let daemon = tokio::spawn(runhook::daemon::run_reloadable(
            config,
            shutdown.clone(),
            reloaded,
        ));
        wait_for("some of run-a", || async {
            let n = env.lines().len();
            if n >= 5 { Ok(()) } else { Err(format!("{n}")) }
        })
        .await;
        // Hold run-a's ingest still across the reload (its polls refused), so
        // that its cursor says exactly which events came before the reload.
        sim.inject(Fault {
            run: Some("run-a".into()),
            endpoint: Some("events".into()),
            count: None,
            kind: FaultKind::Status {
                status: 503,
                retry_after: None,
            },
        });
        wait_for("a refused poll of run-a", || async {
            let refused = sim.requests().iter().any(|r| {
                r.endpoint == "events" && r.run_id.as_deref() == Some("run-a") && r.status == 503
            });
            if refused {
                Ok(())
            } else {
                Err("none yet".into())
            }
        })
        .await;
        let at_reload = env.run_row("run-a").await.expect("run-a's row").cursor;
        assert!(
            at_reload < 30,
            "the test needs run-a unfinished at the reload"
        );
        let second = env.dir.path().join("second.jsonl");
        env.runs.push("run-b".into());
        env.extra = format!(
            "\n[sinks.second]\ntype = \"file\"\npath = \"{}\"\n{}\n[[routes]]\nsinks = [\"second\"]\n",
            second.display(),
            env.file_sink_node()
        );
        reloads.send(env.config()).await.unwrap();
        // The new routes are in place before new runs are subscribed.
        wait_for("run-b subscribed by the reload", || async {
            match env.run_row("run-b").await {
                Some(_) => Ok(()),
                None => Err("not yet".into()),
            }
        })
        .await;
        assert_eq!(
            env.run_row("run-a").await.unwrap().cursor,
            at_reload,
            "run-a held still during the reload"
        );
        sim.clear_faults();
        env.wait_finished(&["run-a", "run-b"]).await;
        wait_for("run-a's end on the new sink", || async {
            let lines = read_lines(&second);
            if lines.iter().any(|l| l["id"] == "run-a:finished:30") {
                Ok(())
            } else {
                Err(format!("{}", lines.len()))
            }
        })
        .await;
        shutdown.cancel();
        daemon.await.unwrap().unwrap();
        // Read once everything stopped: late duplicates are caught too.
        let raw = std::fs::read_to_string(env.events_path()).unwrap();
        let lines = final_lines(&env.events_path());
        assert_run_exactly_once(&sim, &lines, "run-a", &raw);
        assert_run_exactly_once(&sim, &lines, "run-b", &raw);
        // The new sink got every event recorded after the reload, each once,
        // in order, and none before it.
        let second_raw = std::fs::read_to_string(&second).unwrap();
        let on_second = final_lines(&second);
        assert_run_exactly_once(&sim, &on_second, "run-b", &second_raw);
        let run_a: Vec<String> = on_second
            .iter()
            .filter(|l| l["runId"] == "run-a")
            .map(|l| l["id"].as_str().unwrap().to_owned())
            .collect();
        let mut expected: Vec<String> = (at_reload + 1..=30).map(|s| format!("run-a:{s}")).collect();
        expected.push("run-a:finished:30".into());
        assert_eq!(
            run_a, expected,
            "run-a on the new sink: every event after the cursor at the reload ({at_reload})"
        );
    }
}

fn spawn_daemon(config: &std::path::Path, log: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_runhook"))
        .args(["--config", &config.display().to_string(), "run"])
        .env("RUNHOOK_LOG", log)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runhook starts")
}

fn signal(child: &std::process::Child, name: &str) {
    Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
}

on_both! {
    async fn an_invalid_config_on_sighup_is_refused_and_the_old_one_keeps_running(backend: Backend) {
        let mut run = scripted("run-h", numbered(20));
        run.interval = Duration::from_millis(100);
        let sim = sim_with(vec![run]).await;
        let env = Env::on(backend, &sim, &["run-h"]);
        let config = env.write_config();
        let mut child = spawn_daemon(&config, "info");
        wait_for("first events", || async {
            if env.lines().len() >= 2 {
                Ok(())
            } else {
                Err("waiting".into())
            }
        })
        .await;
        std::fs::write(&config, "[api]\ntoken = \"t\"\nbogus = 1\n").unwrap();
        signal(&child, "HUP");
        env.wait_finished(&["run-h"]).await;
        signal(&child, "TERM");
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(status.success(), "{stderr}");
        assert!(
            stderr.contains("the new config is invalid; keeping the running one"),
            "{stderr}"
        );
        assert!(
            stderr.contains("runhook.toml:3:1"),
            "the error names the place: {stderr}"
        );
        let raw = std::fs::read_to_string(env.events_path()).unwrap();
        assert_run_exactly_once(&sim, &env.final_lines(), "run-h", &raw);
    }
}

/// Waits for the process to exit off the runtime, so that a receiver on the
/// runtime keeps answering the requests the process is draining.
async fn exit_of(mut child: std::process::Child) -> std::process::ExitStatus {
    tokio::task::spawn_blocking(move || child.wait().expect("wait for runhook"))
        .await
        .expect("waiting task")
}

on_both! {
    async fn sigterm_during_busy_delivery_exits_in_time_and_loses_nothing(backend: Backend) {
        let sim = sim_with(vec![scripted("run-busy", numbered(40))]).await;
        let receiver = Receiver::start().await;
        receiver.set_delay(Duration::from_millis(150));
        let mut env = Env::on(backend, &sim, &["run-busy"]);
        env.extra = format!(
            "\n[sinks.ops]\ntype = \"webhook\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n\n[[routes]]\nsinks = [\"ops\"]\n",
            receiver.url()
        );
        let config = env.write_config();
        let child = spawn_daemon(&config, "warn");
        wait_for("deliveries under way", || async {
            let n = receiver.accepted().len();
            if n >= 3 { Ok(()) } else { Err(format!("{n}")) }
        })
        .await;
        let asked = Instant::now();
        signal(&child, "TERM");
        let status = exit_of(child).await;
        assert!(status.success(), "SIGTERM exits 0");
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "the in-flight delivery drained before shutdown_grace ran out: {:?}",
            asked.elapsed()
        );
        let at_stop = receiver.accepted().len();
        assert!(at_stop < 41, "the test needs a busy daemon at SIGTERM");
        // Nothing was in flight when the daemon exited: every request it sent
        // was answered (a dropped one stays unanswered, `answered` 0).
        let unanswered: Vec<String> = receiver
            .requests()
            .iter()
            .filter(|r| r.answered == 0)
            .map(|r| r.id.clone())
            .collect();
        assert!(
            unanswered.is_empty(),
            "requests dropped at SIGTERM, not drained: {unanswered:?}"
        );
        let child = spawn_daemon(&config, "warn");
        wait_for("everything after the restart", || async {
            let n = receiver.accepted().len();
            if n >= 41 {
                Ok(())
            } else {
                Err(format!("{n} accepted"))
            }
        })
        .await;
        signal(&child, "TERM");
        assert!(exit_of(child).await.success());
        let seen: Vec<(String, u16)> = receiver
            .requests()
            .iter()
            .map(|r| (r.id.clone(), r.answered))
            .collect();
        let mut expected: Vec<(String, u16)> =
            (1..=40).map(|s| (format!("run-busy:{s}"), 204)).collect();
        expected.push(("run-busy:finished:40".into(), 204));
        assert_eq!(
            seen, expected,
            "every event sent once, in order, each answered: the in-flight one \
             finished at SIGTERM and was not sent again"
        );
    }
}

async fn get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(response) => (
            response.status().as_u16(),
            response.text().await.unwrap_or_default(),
        ),
        Err(error) => (0, error.to_string()),
    }
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

on_both! {
    async fn metrics_pass_promtool_and_move_and_readyz_turns_unready_on_shutdown(backend: Backend) {
        let sim = sim_with(vec![scripted("run-m", numbered(10))]).await;
        let receiver = Receiver::start().await;
        receiver.set_delay(Duration::from_millis(300));
        let port = free_port();
        let mut env = Env::on(backend, &sim, &["run-m"]);
        env.extra = format!(
            "\n[server]\nlisten = \"127.0.0.1:{port}\"\n\n[sinks.ops]\ntype = \"webhook\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n\n[[routes]]\nsinks = [\"ops\"]\n",
            receiver.url()
        );
        let base = format!("http://127.0.0.1:{port}");
        let config: Config = env.config();
        let shutdown = CancellationToken::new();
        let daemon = tokio::spawn(runhook::daemon::run(Arc::new(config), shutdown.clone()));
        let text = wait_for("events counted in /metrics", || async {
            let (status, text) = get(&format!("{base}/metrics")).await;
            let ingested = metric(&text, "runhook_events_ingested_total{transport=\"poll\"}");
            let archived = metric(
                &text,
                "runhook_deliveries_total{outcome=\"delivered\",sink=\"archive\"}",
            );
            if status == 200 && ingested >= 11.0 && archived >= 11.0 && receiver.accepted().len() >= 2 {
                Ok(text)
            } else {
                Err(format!("{status} {ingested}"))
            }
        })
        .await;
        assert!(
            metric(
                &text,
                "runhook_deliveries_total{outcome=\"delivered\",sink=\"archive\"}"
            ) >= 11.0,
            "{text}"
        );
        assert!(
            text.contains("runhook_delivery_latency_seconds_bucket"),
            "{text}"
        );
        assert!(
            text.contains("runhook_pending_deliveries{sink=\"ops\"}"),
            "{text}"
        );
        assert!(text.contains("runhook_sink_up{sink=\"ops\"} 1"), "{text}");
        assert!(
            text.contains("runhook_upstream_requests_total{class=\"2xx\"}"),
            "{text}"
        );
        assert!(text.contains("runhook_runs{state="), "{text}");
        promtool_check(&text);
        assert_eq!(get(&format!("{base}/healthz")).await.0, 200);
        assert_eq!(get(&format!("{base}/readyz")).await.0, 200);
        shutdown.cancel();
        // The slow receiver keeps the drain going: /readyz must say so.
        wait_for("/readyz unready while draining", || async {
            let (status, body) = get(&format!("{base}/readyz")).await;
            if status == 503 {
                Ok(())
            } else {
                Err(format!("{status} {body}"))
            }
        })
        .await;
        daemon.await.unwrap().unwrap();
    }
}

/// `promtool check metrics`; CI installs it (Debian package `prometheus`).
fn promtool_check(text: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool must be installed in CI"
        );
        eprintln!("SKIPPED promtool check: promtool is not installed here");
        return;
    };
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

on_both! {
    async fn no_secret_reaches_the_logs_check_or_debug_output(backend: Backend) {
        const TOKEN: &str = "tok-SECRET-1f3a";
        const COOKIE: &str = "cookie-SECRET-77b2";
        const SLACK_PATH: &str = "SECRETSLACKPATH9";
        const BOT: &str = "xoxb-SECRET-bot-42";
        let mut run = scripted("run-sec", numbered(3));
        run.interval = Duration::from_millis(5);
        let scenario = Scenario {
            token: TOKEN.into(),
            session: COOKIE.into(),
            runs: vec![run],
            ..Scenario::default()
        };
        let sim = start_sim(scenario).await;
        let receiver = Receiver::start().await;
        let mut env = Env::on(backend, &sim, &["run-sec"]);
        env.api = format!("session_cookie = \"{COOKIE}\"\nstream_idle_timeout = \"2s\"\n");
        env.extra = format!(
            "\n[sinks.ops]\ntype = \"webhook\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n\n\
             [sinks.chat]\ntype = \"slack\"\nwebhook_url = \"{}/{SLACK_PATH}\"\n\n\
             [sinks.thread]\ntype = \"slack\"\nbot_token = \"{BOT}\"\nchannel = \"C1\"\napi_base = \"http://{}/api/\"\n\n\
             [[routes]]\nsinks = [\"ops\", \"chat\", \"thread\"]\n",
            receiver.url(),
            receiver.url(),
            receiver.addr
        );
        let config = env.write_config();
        let mut child = spawn_daemon(&config, "trace");
        let stderr = child.stderr.take().unwrap();
        let collected = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::BufReader::new(stderr).read_to_string(&mut text);
            text
        });
        env.wait_finished(&["run-sec"]).await;
        wait_for("webhook deliveries", || async {
            if receiver.requests().len() >= 4 {
                Ok(())
            } else {
                Err("waiting".into())
            }
        })
        .await;
        signal(&child, "TERM");
        exit_of(child).await;
        let logs = collected.join().unwrap();
        let check = Command::new(env!("CARGO_BIN_EXE_runhook"))
            .arg("--config")
            .arg(&config)
            .arg("check")
            .output()
            .unwrap();
        let check = String::from_utf8_lossy(&check.stdout).into_owned();
        let debug = format!("{:?}", env.config());
        assert!(
            logs.contains("TRACE") && logs.contains("DEBUG"),
            "trace logging was on: {logs}"
        );
        for secret in [TOKEN, COOKIE, SLACK_PATH, BOT, &SECRET[6..]] {
            assert!(!logs.contains(secret), "{secret} in the logs");
            assert!(!check.contains(secret), "{secret} in check: {check}");
            assert!(!debug.contains(secret), "{secret} in Debug");
        }
    }
}

/// `runhook --config CONFIG ARGS...`: stdout and stderr together.
fn runhook_output(config: &std::path::Path, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_runhook"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    assert!(output.status.success(), "runhook {args:?}: {output:?}");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

on_both! {
    async fn no_url_secret_reaches_check_status_logs_or_debug(backend: Backend) {
        // Secrets that live in URLs (userinfo, path, query) and header values.
        const BASE_USER: &str = "baseuser-SECRET-a9";
        const BASE_PASS: &str = "basepass-SECRET-5e1";
        const COOKIE: &str = "cookie-SECRET-3d0";
        const FILE_PATH: &str = "FILEPATH-SECRET-77";
        const QUERY: &str = "querytok-SECRET-31";
        const HEADER: &str = "hdr-SECRET-0c4";
        const DISCORD: &str = "DISCORD-SECRET-b2";
        const SLACK: &str = "SLACKFILE-SECRET-8";
        let mut run = scripted("run-url", numbered(3));
        run.interval = Duration::from_millis(5);
        let scenario = Scenario {
            session: COOKIE.into(),
            runs: vec![run],
            ..Scenario::default()
        };
        let sim = start_sim(scenario).await;
        let receiver = Receiver::start().await;
        let mut env = Env::on(backend, &sim, &["run-url"]);
        // The cookie authenticates; the URL's userinfo is only there to leak.
        env.token = String::new();
        env.base_url = sim
            .url()
            .replacen("http://", &format!("http://{BASE_USER}:{BASE_PASS}@"), 1);
        env.api = format!("session_cookie = \"{COOKIE}\"\nstream_idle_timeout = \"2s\"\n");
        let hook_file = env.dir.path().join("hook-url");
        std::fs::write(
            &hook_file,
            format!("http://{}/hooks/{FILE_PATH}?token={QUERY}\n", receiver.addr),
        )
        .unwrap();
        let slack_file = env.dir.path().join("slack-url");
        std::fs::write(
            &slack_file,
            format!("http://{}/services/T0/B0/{SLACK}\n", receiver.addr),
        )
        .unwrap();
        env.extra = format!(
            "\n[sinks.ops]\ntype = \"webhook\"\nurl_file = \"{}\"\nsecret = \"{SECRET}\"\n\
             headers = {{ \"x-api-key\" = \"{HEADER}\" }}\n\n\
             [sinks.discord]\ntype = \"webhook\"\nurl = \"http://{}/api/webhooks/1234/{DISCORD}\"\nsecret = \"{SECRET}\"\n\n\
             [sinks.chat]\ntype = \"slack\"\nwebhook_url_file = \"{}\"\n\n\
             [[routes]]\nsinks = [\"ops\", \"discord\", \"chat\"]\n",
            hook_file.display(),
            receiver.addr,
            slack_file.display()
        );
        let config = env.write_config();
        let mut child = spawn_daemon(&config, "trace");
        let stderr = child.stderr.take().unwrap();
        let collected = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::BufReader::new(stderr).read_to_string(&mut text);
            text
        });
        env.wait_finished(&["run-url"]).await;
        wait_for("webhook deliveries", || async {
            let n = receiver.requests().len();
            if n >= 8 { Ok(()) } else { Err(format!("{n}")) }
        })
        .await;
        signal(&child, "TERM");
        exit_of(child).await;
        let outputs = [
            ("logs", collected.join().unwrap()),
            ("check", runhook_output(&config, &["check"])),
            ("status", runhook_output(&config, &["status"])),
            (
                "status --json",
                runhook_output(&config, &["status", "--json"]),
            ),
            ("Debug", format!("{:?}", env.config())),
        ];
        assert!(outputs[0].1.contains("TRACE"), "trace logging was on");
        assert!(
            outputs[1].1.contains(&format!("http://{}", receiver.addr)),
            "check still says where each sink delivers: {}",
            outputs[1].1
        );
        for (what, text) in &outputs {
            for secret in [
                BASE_USER, BASE_PASS, COOKIE, FILE_PATH, QUERY, HEADER, DISCORD, SLACK,
            ] {
                assert!(!text.contains(secret), "{secret} in {what}: {text}");
            }
        }
    }
}
