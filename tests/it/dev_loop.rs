//! The developer's loop, with the built binary: `runhook forward` against
//! the simulator and the test receiver (every event once, in order, signed
//! with the printed secret; `--state` resumes), and `runhook send-test`
//! through a webhook, Slack (the fake of `slack.rs`) and a file.

use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::receiver::{Received, Receiver, SECRET};
use crate::slack::{FakeSlack, assert_within_limits};
use crate::support::*;

/// `runhook forward` as a child process, its stdout collected line by line.
struct Forward {
    child: Option<Child>,
    stdout: Arc<Mutex<String>>,
}

impl Forward {
    fn start(sim: &runhook::simulate::Simulator, runs: &[&str], to: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_runhook"))
            .arg("forward")
            .args(runs)
            .args(["--to", to, "--api", &sim.url(), "--poll-interval", "50ms"])
            .args(extra)
            .env("TRAVELMODE_TOKEN", sim.token())
            .env_remove("TRAVELMODE_COOKIE")
            .env_remove("RUNHOOK_FORWARD_SECRET")
            .env("RUNHOOK_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("runhook forward starts");
        let stdout = Arc::new(Mutex::new(String::new()));
        let pipe = child.stdout.take().expect("piped stdout");
        let sink = stdout.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut out = sink.lock().unwrap();
                out.push_str(&line);
                out.push('\n');
            }
        });
        Self {
            child: Some(child),
            stdout,
        }
    }

    fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// The secret it printed first.
    async fn secret(&self) -> String {
        wait_for("the printed signing secret", || async {
            let out = self.stdout();
            out.lines()
                .find_map(|l| l.strip_prefix("signing secret: "))
                .map(str::to_owned)
                .ok_or(out)
        })
        .await
    }

    /// Ctrl-C: it must drain and exit 0.
    async fn interrupt(mut self) -> String {
        let child = self.child.take().expect("running");
        let sent = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .expect("kill -INT");
        assert!(sent.success());
        let status = tokio::task::spawn_blocking(move || {
            let mut child = child;
            child.wait().expect("wait for forward")
        })
        .await
        .unwrap();
        assert!(status.success(), "forward exits 0 on Ctrl-C: {status}");
        self.stdout()
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Accepted requests of `run` by `webhook-id`, in arrival order.
fn accepted_ids(receiver: &Receiver, run: &str) -> Vec<String> {
    receiver
        .accepted()
        .into_iter()
        .filter(|r| r.id.starts_with(&format!("{run}:")))
        .map(|r| r.id)
        .collect()
}

async fn wait_accepted(receiver: &Receiver, runs: &[&str]) {
    wait_for("run_finished of every run accepted", || async {
        let done = runs.iter().all(|run| {
            accepted_ids(receiver, run)
                .iter()
                .any(|id| id.contains(":finished:"))
        });
        if done {
            Ok(())
        } else {
            Err(format!("{} accepted", receiver.accepted().len()))
        }
    })
    .await
}

/// The ids a run's events carry, in order: what the receiver must accept.
fn expected_ids(sim: &runhook::simulate::Simulator, run: &str) -> Vec<String> {
    let script = sim.script(run);
    let mut ids: Vec<String> = script.iter().map(|e| format!("{run}:{}", e.0)).collect();
    let last = script.last().map_or(0, |e| e.0);
    ids.push(format!("{run}:finished:{last}"));
    ids
}

fn verifies_with(secret: &str, request: &Received) -> bool {
    let mut headers = axum::http::HeaderMap::new();
    for (name, value) in [
        ("webhook-id", &request.id),
        ("webhook-timestamp", &request.timestamp),
        ("webhook-signature", &request.signature),
    ] {
        headers.insert(name, value.parse().unwrap());
    }
    standardwebhooks::Webhook::new(secret)
        .expect("a valid whsec_ secret")
        .verify(&request.body, &headers)
        .is_ok()
}

#[tokio::test]
async fn forward_delivers_every_event_of_two_runs_once_in_order_signed_with_the_printed_secret() {
    let (a, b) = ("fwd-a", "fwd-b");
    let sim = sim_with(vec![scripted(a, numbered(5)), scripted(b, numbered(7))]).await;
    let receiver = Receiver::start().await;
    let forward = Forward::start(&sim, &[a, b], &receiver.url(), &[]);
    let secret = forward.secret().await;
    // Until trusted, the receiver answers 401: forward retries those.
    receiver.trust(&secret);
    wait_accepted(&receiver, &[a, b]).await;
    let out = forward.interrupt().await;

    let key = secret.strip_prefix("whsec_").expect("whsec_ prefix");
    let key = base64_len(key);
    assert!(key >= 24, "a generated secret has 24+ random bytes: {key}");
    for run in [a, b] {
        assert_eq!(
            accepted_ids(&receiver, run),
            expected_ids(&sim, run),
            "run {run}: every event accepted once, in order"
        );
    }
    for request in receiver.requests() {
        assert!(
            verifies_with(&secret, &request),
            "{} verifies with the printed secret",
            request.id
        );
    }
    for request in receiver.accepted() {
        let kind = request.json()["type"].as_str().unwrap().to_owned();
        assert!(
            out.contains(&format!("--> {} {kind}\n", request.id)),
            "a line for {}: {out}",
            request.id
        );
    }
    let answered = out.lines().filter(|l| l.starts_with("<-- 204 (")).count();
    assert_eq!(answered, receiver.accepted().len(), "{out}");
    assert!(!out.contains("\x1b["), "no colour when stdout is a pipe");
}

/// Bytes that the base64 text `encoded` decodes to.
fn base64_len(encoded: &str) -> usize {
    let pad = encoded.chars().rev().take_while(|&c| c == '=').count();
    encoded.len() / 4 * 3 - pad
}

// SQLite only: `forward --state DIR` keeps its cursor in a file there.
#[tokio::test]
async fn forward_with_state_resumes_after_a_restart_without_repeats() {
    let run = "fwd-resume";
    // Long enough that the first forward stops mid-run (asserted below).
    let mut paced = scripted(run, numbered(30));
    paced.interval = Duration::from_millis(200);
    let sim = sim_with(vec![paced]).await;
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("forward");
    let state_arg = state.display().to_string();
    let args = ["--state", state_arg.as_str()];

    let first = Forward::start(&sim, &[run], &receiver.url(), &args);
    let secret = first.secret().await;
    receiver.trust(&secret);
    wait_for("some events accepted", || async {
        let n = accepted_ids(&receiver, run).len();
        if n >= 3 { Ok(()) } else { Err(format!("{n}")) }
    })
    .await;
    let first_out = first.interrupt().await;
    let before = accepted_ids(&receiver, run);
    assert!(
        !before.iter().any(|id| id.contains(":finished:")),
        "the first forward stopped before the run ended: {before:?}"
    );

    let second = Forward::start(&sim, &[run], &receiver.url(), &args);
    assert_eq!(
        second.secret().await,
        secret,
        "the generated secret is kept under --state"
    );
    wait_accepted(&receiver, &[run]).await;
    let second_out = second.interrupt().await;

    assert_eq!(
        accepted_ids(&receiver, run),
        expected_ids(&sim, run),
        "every event once, in order, across the restart"
    );
    for id in &before {
        assert!(
            !second_out.contains(&format!("--> {id} ")),
            "{id} was delivered before the restart and not sent again:\n{first_out}\n---\n{second_out}"
        );
    }
    assert!(first_out.contains(&format!("state: {}", state.display())));
}

#[test]
fn forward_names_the_option_that_is_wrong() {
    let forward = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_runhook"))
            .arg("forward")
            .args(args)
            .env_remove("TRAVELMODE_TOKEN")
            .env_remove("TRAVELMODE_COOKIE")
            .env_remove("RUNHOOK_FORWARD_SECRET")
            .output()
            .expect("runhook runs");
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let stderr = forward(&["r1", "--to", "not a url", "--token", "t"]);
    assert!(stderr.contains("--to: not a URL"), "{stderr}");
    let stderr = forward(&[
        "r1",
        "--to",
        "http://127.0.0.1:1/",
        "--token",
        "t",
        "--secret",
        "whsec_abc",
    ]);
    assert!(stderr.contains("--secret: "), "{stderr}");
    let stderr = forward(&["r1", "--to", "http://127.0.0.1:1/"]);
    assert!(stderr.contains("give --token"), "{stderr}");
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A test event's id: `test_` + 32 hex digits, no colon (real ids have one).
fn assert_test_id(id: &str) {
    let hex = id.strip_prefix("test_").unwrap_or_else(|| panic!("{id}"));
    assert_eq!(hex.len(), 32, "{id}");
    assert!(hex.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
}

// SQLite only: "records nothing" is seen as no state file created.
#[tokio::test]
async fn send_test_signs_a_marked_event_as_the_daemon_and_records_nothing() {
    let sim = sim_with(vec![]).await;
    let receiver = Receiver::start().await;
    let mut env = Env::new(&sim, &[]);
    env.extra = format!(
        "\n[sinks.hooks]\ntype = \"webhook\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n\
         headers = {{ \"x-team\" = \"ops\" }}\n\n[[routes]]\nsinks = [\"hooks\"]\n",
        receiver.url()
    );
    let config = env.write_config();

    let output = send_test(&config, &["hooks"]).await;
    assert!(output.status.success(), "{}", text(&output));
    let [request] = &receiver.requests()[..] else {
        panic!("one request: {:?}", receiver.requests())
    };
    assert!(request.verified_new, "signed as the daemon signs");
    assert_eq!(request.extra_header.as_deref(), Some("ops"));
    let body = request.json();
    assert_eq!(body["test"], true, "{body}");
    assert_eq!(body["type"], "run_finished");
    assert_eq!(body["data"]["payload"]["status"], "completed");
    assert_test_id(&request.id);
    assert_eq!(body["data"]["id"], request.id.as_str());
    let out = text(&output);
    assert!(
        out.contains(&format!("webhook-id: {}", request.id)),
        "{out}"
    );
    assert!(out.contains("<-- 204 ("), "status and latency: {out}");

    receiver.script([crate::receiver::Answer::Status(500)]);
    let output = send_test(&config, &["hooks", "--type", "PHASE_STARTED"]).await;
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let out = text(&output);
    assert!(
        out.contains("<-- 500 (") && out.contains("receiver says 500"),
        "{out}"
    );
    assert_eq!(receiver.requests()[1].json()["type"], "PHASE_STARTED");
    assert!(
        !env.state_path().exists(),
        "a test event is not a delivery: no state database"
    );
}

// SQLite only: "records nothing" is seen as no state file created.
#[tokio::test]
async fn send_test_posts_a_marked_slack_message_by_webhook_and_in_a_thread_of_its_own() {
    let sim = sim_with(vec![]).await;
    let slack = FakeSlack::start().await;
    let mut env = Env::new(&sim, &[]);
    env.extra = format!(
        "\n[sinks.chat]\ntype = \"slack\"\nwebhook_url = \"http://{addr}/webhook\"\n\
         \n[sinks.threads]\ntype = \"slack\"\nbot_token = \"xoxb-test\"\nchannel = \"C0123\"\n\
         api_base = \"http://{addr}/api/\"\n\n[[routes]]\nsinks = [\"chat\", \"threads\"]\n",
        addr = slack.addr
    );
    let config = env.write_config();

    let output = send_test(&config, &["chat", "--type", "ARTIFACT_CREATED"]).await;
    assert!(output.status.success(), "{}", text(&output));
    let [call] = &slack.calls("/webhook")[..] else {
        panic!("one message")
    };
    assert_within_limits(&call.body);
    let message = call.body.to_string();
    assert!(message.contains("Test event"), "{message}");
    assert!(
        message.contains("artifact *proposals* created"),
        "the daemon's wording: {message}"
    );
    assert!(call.body["text"].as_str().unwrap().starts_with("[test] "));

    let output = send_test(&config, &["threads"]).await;
    assert!(output.status.success(), "{}", text(&output));
    let posts = slack.calls("chat.postMessage");
    let [root, reply] = &posts[..] else {
        panic!("a root and a reply: {posts:?}")
    };
    assert!(root.body.get("thread_ts").is_none());
    assert_eq!(
        root.body["metadata"]["event_payload"]["sink"], "threads (send-test)",
        "a root the daemon's look-up for its own roots never adopts"
    );
    assert!(
        reply.body["thread_ts"].is_string(),
        "the reply is in the thread"
    );
    assert_within_limits(&reply.body);
    assert!(reply.body.to_string().contains("Test event"));
    assert!(
        !env.state_path().exists(),
        "the test's thread is not kept in the state database"
    );
}

#[tokio::test]
async fn send_test_appends_one_marked_line_that_the_daemon_then_leaves_alone() {
    let run = "after-test";
    let sim = sim_with(vec![scripted(run, numbered(3))]).await;
    let env = Env::new(&sim, &[run]);
    let config = env.write_config();

    // Not `run_finished`: the wait below must see the daemon's.
    let output = send_test(
        &config,
        &["archive", "--run", run, "--type", "PHASE_STARTED"],
    )
    .await;
    assert!(output.status.success(), "{}", text(&output));
    let lines = env.lines();
    let [line] = &lines[..] else {
        panic!("one line: {lines:?}")
    };
    assert_eq!(line["test"], true);
    assert_eq!(line["type"], "PHASE_STARTED");
    assert_eq!(line["runId"], run);
    assert_eq!(
        line["labels"]["team"], "rome",
        "the run's labels from the config"
    );
    assert_test_id(line["id"].as_str().unwrap());

    let daemon = env.start();
    env.wait_finished(&[run]).await;
    daemon.stop().await;
    let raw = std::fs::read_to_string(env.events_path()).unwrap();
    let lines: Vec<Value> = env.final_lines();
    assert_eq!(lines[0]["test"], true, "the test line stays first");
    assert_run_exactly_once(&sim, &lines[1..], run, &raw);
}

/// `runhook forward RUN --to URL | head -2`: once the reader of its lines
/// is gone, forward stops as on Ctrl-C and exits 0, rather than forwarding
/// on (and never exiting) with nobody reading.
#[tokio::test]
async fn forward_stops_and_exits_0_when_its_stdout_is_closed() {
    let run = "fwd-head";
    // Events for ~10 s: lines are still coming when the reader goes away.
    let mut paced = scripted(run, numbered(100));
    paced.interval = Duration::from_millis(100);
    let sim = sim_with(vec![paced]).await;
    let receiver = Receiver::start().await;
    receiver.trust(SECRET);
    let mut child = Command::new(env!("CARGO_BIN_EXE_runhook"))
        .args(["forward", run, "--to", &receiver.url(), "--api", &sim.url()])
        .args(["--poll-interval", "50ms", "--secret", SECRET])
        .env("TRAVELMODE_TOKEN", sim.token())
        .env_remove("TRAVELMODE_COOKIE")
        .env("RUNHOOK_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runhook forward starts");
    let stderr = capture_stderr(&mut child);
    let pipe = child.stdout.take().expect("piped stdout");
    // Read up to the first delivery line, then close the pipe as `head` does.
    let read = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(pipe).lines();
        lines.find(|l| l.as_ref().map_or(true, |l| l.starts_with("--> ")))
    })
    .await
    .expect("reader");
    assert!(matches!(read, Some(Ok(_))), "a delivery line: {read:?}");

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for forward") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("forward still runs 60 s after its stdout closed");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let stderr = stderr.lock().unwrap().clone();
    assert!(
        status.success(),
        "exit 0 after its stdout closed: {status}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        accepted_ids(&receiver, run).len() < 101,
        "stopped before the run's end"
    );
}
