//! Service promises no other test exercised: a second signal, the shutdown
//! grace running out, logrotate + SIGHUP, Slack thread mode end to end
//! (`reply_broadcast`, the root's live status, `ok:false`, 429), systemd
//! READY and watchdog pings, `/readyz` while the store cannot commit, and
//! the values (not only the names) of the delivery metrics.
//!
//! Metric values are read from a daemon in a child process: the metrics
//! are process-wide, and the other tests of this binary move them too.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use runhook::simulate::{Fault, FaultKind, Scenario};
use serde_json::{Value, json};

use crate::receiver::{Answer, Receiver, SECRET};
use crate::support::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `runhook run` in a child process, its log lines collected; killed if the
/// test ends first.
struct Proc {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(config: &Path, envs: &[(&str, String)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_runhook"))
            .args(["--config", &config.display().to_string(), "run"])
            .env("RUNHOOK_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("runhook starts");
        let log = capture_stderr(&mut child);
        Self { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{name}");
    }

    async fn wait_log(&self, needle: &str) {
        wait_for(&format!("{needle:?} in the log"), || async {
            let log = self.log();
            if log.contains(needle) {
                Ok(())
            } else {
                Err(log)
            }
        })
        .await
    }

    /// Waits at most `within` for the process to exit.
    async fn exit_within(&mut self, within: Duration) -> Result<ExitStatus, String> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Ok(status);
            }
            if start.elapsed() > within {
                return Err(format!(
                    "still running after {within:?}; log:\n{}",
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A webhook endpoint that accepts connections and never answers: a
/// delivery to it stays in flight as long as the test likes.
struct Blackhole {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
}

impl Blackhole {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                held.push(socket);
            }
        });
        Self { addr, connections }
    }

    async fn wait_in_flight(&self) {
        wait_for("a delivery in flight", || async {
            match self.connections.load(Ordering::SeqCst) {
                0 => Err("no connection yet".into()),
                _ => Ok(()),
            }
        })
        .await
    }
}

/// An env whose `ops` webhook sink (patient: 300 s timeout) points at `url`.
fn webhook_env(backend: Backend, sim: &runhook::simulate::Simulator, run: &str, url: &str) -> Env {
    let mut env = Env::on(backend, sim, &[run]);
    env.extra = format!(
        "\n[sinks.ops]\ntype = \"webhook\"\nurl = \"{url}\"\nsecret = \"{SECRET}\"\ntimeout = \"300s\"\n\n\
         [[routes]]\nsinks = [\"ops\"]\n"
    );
    env
}

/// Writes `env`'s config with `shutdown_grace = grace`.
fn write_config_with_grace(env: &Env, grace: &str) -> PathBuf {
    let path = env.dir.path().join("runhook.toml");
    let text = env.config_text().replace(
        "shutdown_grace = \"5s\"",
        &format!("shutdown_grace = \"{grace}\""),
    );
    assert!(text.contains(&format!("shutdown_grace = \"{grace}\"")));
    std::fs::write(&path, text).unwrap();
    path
}

on_both! {
    async fn a_second_signal_exits_at_once_while_the_first_is_still_draining(backend: Backend) {
        let sim = sim_with(vec![scripted("run-2sig", numbered(3))]).await;
        let hole = Blackhole::start().await;
        let env = webhook_env(backend, &sim, "run-2sig", &format!("http://{}/hooks", hole.addr));
        let config = write_config_with_grace(&env, "120s");
        let mut daemon = Proc::spawn(&config, &[]);
        hole.wait_in_flight().await;
        daemon.signal("TERM");
        daemon.wait_log("signal received: draining").await;
        assert!(
            daemon
                .exit_within(Duration::from_millis(500))
                .await
                .is_err(),
            "the first signal drains (a delivery is in flight, the grace is 120 s)"
        );
        let asked = Instant::now();
        daemon.signal("TERM");
        let status = daemon
            .exit_within(Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("a second signal exits at once: {e}"));
        assert!(
            asked.elapsed() < Duration::from_secs(20),
            "{:?}",
            asked.elapsed()
        );
        assert!(
            !status.success(),
            "an interrupted drain does not claim a clean exit: {status}"
        );
        assert!(daemon.log().contains("second signal: exiting now"));
    }
}

on_both! {
    async fn shutdown_grace_running_out_exits_cleanly_and_the_restart_delivers_the_rest_once(backend: Backend) {
        let sim = sim_with(vec![scripted("run-grace", numbered(3))]).await;
        let hole = Blackhole::start().await;
        let mut env = webhook_env(backend, &sim, "run-grace", &format!("http://{}/hooks", hole.addr));
        let config = write_config_with_grace(&env, "2s");
        let mut daemon = Proc::spawn(&config, &[]);
        hole.wait_in_flight().await;
        let asked = Instant::now();
        daemon.signal("TERM");
        let status = daemon
            .exit_within(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("the daemon gives up on the delivery after the grace: {e}"));
        let took = asked.elapsed();
        assert!(status.success(), "exit 0: {status}\n{}", daemon.log());
        assert!(
            took >= Duration::from_millis(1900),
            "the in-flight delivery got its grace: {took:?}"
        );
        assert!(
            daemon
                .log()
                .contains("deliveries still in flight at the end of the grace period"),
            "{}",
            daemon.log()
        );
        drop(daemon);
        // The receiver is back: the event cut off by the grace goes out again
        // (same id), then the rest, in order.
        let receiver = Receiver::start().await;
        env.extra = env
            .extra
            .replace(&format!("http://{}/hooks", hole.addr), &receiver.url());
        let config = write_config_with_grace(&env, "2s");
        let daemon = Proc::spawn(&config, &[]);
        let accepted = wait_for("everything after the restart", || async {
            let accepted = receiver.accepted();
            if accepted.iter().any(|r| r.id == "run-grace:finished:3") {
                Ok(accepted)
            } else {
                Err(format!("{} accepted", accepted.len()))
            }
        })
        .await;
        drop(daemon);
        let ids: Vec<&str> = accepted.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "run-grace:1",
                "run-grace:2",
                "run-grace:3",
                "run-grace:finished:3"
            ]
        );
    }
}

on_both! {
    async fn a_logrotate_move_then_sighup_continues_in_a_new_file_losing_nothing(backend: Backend) {
        let mut run = scripted("run-rot", numbered(60));
        run.interval = Duration::from_millis(80);
        let sim = sim_with(vec![run]).await;
        let env = Env::on(backend, &sim, &["run-rot"]);
        let config = env.write_config();
        let daemon = Proc::spawn(&config, &[]);
        wait_for("some lines before the rotation", || async {
            match env.lines().len() {
                n if n >= 5 => Ok(()),
                n => Err(format!("{n} lines")),
            }
        })
        .await;
        let rotated = env.dir.path().join("events.jsonl.1");
        std::fs::rename(env.events_path(), &rotated).unwrap();
        daemon.signal("HUP");
        daemon.wait_log("config reloaded").await;
        // The old file is closed once the reload is done.
        let before = read_lines(&rotated);
        let fresh = env.wait_finished(&["run-rot"]).await;
        daemon.signal("TERM");
        drop(daemon);
        assert!(
            !fresh.is_empty() && fresh[0]["sequence"].as_i64() > Some(5),
            "after the reload, lines go to the new file at the path: {fresh:?}"
        );
        assert_eq!(
            read_lines(&rotated).len(),
            before.len(),
            "nothing written to the rotated file after the reload"
        );
        let mut all = before;
        all.extend(fresh);
        let mut raw = std::fs::read_to_string(&rotated).unwrap();
        raw.push_str(&std::fs::read_to_string(env.events_path()).unwrap());
        assert_run_exactly_once(&sim, &all, "run-rot", &raw);
    }
}

/// One Web API call the fake Slack received.
#[derive(Debug, Clone)]
struct Call {
    method: String,
    body: Value,
    at: Instant,
    answered: u16,
}

#[derive(Default)]
struct SlackState {
    calls: Vec<Call>,
    /// Answers for the next `chat.postMessage` calls: status, body, Retry-After.
    post_script: VecDeque<(u16, Value, Option<u64>)>,
    next_ts: u64,
}

/// A fake of Slack's Web API: `chat.postMessage` (scriptable),
/// `chat.update`, and an empty `conversations.history`.
#[derive(Clone)]
struct FakeSlackApi {
    addr: std::net::SocketAddr,
    state: Arc<Mutex<SlackState>>,
}

impl FakeSlackApi {
    async fn start() -> Self {
        let state = Arc::new(Mutex::new(SlackState::default()));
        let app = Router::new()
            .route("/api/{method}", post(slack_api))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, state }
    }

    fn script_posts(&self, answers: impl IntoIterator<Item = (u16, Value, Option<u64>)>) {
        self.state.lock().unwrap().post_script.extend(answers);
    }

    fn calls(&self, method: &str) -> Vec<Call> {
        let state = self.state.lock().unwrap();
        state
            .calls
            .iter()
            .filter(|c| c.method == method)
            .cloned()
            .collect()
    }

    fn keys(&self) -> String {
        format!(
            "bot_token = \"xoxb-test\"\nchannel = \"C0123\"\napi_base = \"http://{}/api/\"\n\
             initial_backoff = \"20ms\"\nmax_backoff = \"100ms\"",
            self.addr
        )
    }
}

async fn slack_api(
    State(state): State<Arc<Mutex<SlackState>>>,
    UrlPath(method): UrlPath<String>,
    body: String,
) -> Response {
    let mut state = state.lock().unwrap();
    let scripted = match method.as_str() {
        "chat.postMessage" => state.post_script.pop_front(),
        _ => None,
    };
    let (status, answer, retry_after) = scripted.unwrap_or_else(|| {
        state.next_ts += 1;
        let answer = match method.as_str() {
            "conversations.history" => json!({"ok": true, "messages": [], "has_more": false}),
            _ => json!({"ok": true, "channel": "C0123",
                "ts": format!("1700000000.{:06}", state.next_ts)}),
        };
        (200, answer, None)
    });
    state.calls.push(Call {
        method,
        body: serde_json::from_str(&body).unwrap_or(Value::String(body)),
        at: Instant::now(),
        answered: status,
    });
    let mut response = (StatusCode::from_u16(status).unwrap(), axum::Json(answer)).into_response();
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, secs.to_string().parse().unwrap());
    }
    response
}

fn slack_thread_env(
    backend: Backend,
    sim: &runhook::simulate::Simulator,
    run: &str,
    slack: &FakeSlackApi,
) -> Env {
    let mut env = Env::on(backend, sim, &[run]);
    env.extra = format!(
        "\n[sinks.chat]\ntype = \"slack\"\n{}\n\n[[routes]]\nsinks = [\"chat\"]\n",
        slack.keys()
    );
    env
}

fn is_root(call: &Call) -> bool {
    call.body.get("thread_ts").is_none()
}

fn text(call: &Call) -> &str {
    call.body["text"].as_str().unwrap_or("")
}

on_both! {
    async fn thread_mode_broadcasts_the_end_and_keeps_the_root_on_the_live_status(backend: Backend) {
        let events = vec![
            event("PHASE_STARTED", r#"{"phase":"plan"}"#),
            event("ARTIFACT_CREATED", r#"{"artifactType":"proposals"}"#),
            event("PHASE_STARTED", r#"{"phase":"compose"}"#),
            event("ARTIFACT_CREATED", r#"{"artifactType":"itinerary"}"#),
        ];
        let mut run = scripted("run-live", events);
        // One event per poll, so each is seen with the run's status of its time.
        run.interval = Duration::from_millis(400);
        run.final_status = "failed".into();
        run.error_message = Some("Flight search timed out".into());
        let sim = sim_with(vec![run]).await;
        let slack = FakeSlackApi::start().await;
        let env = slack_thread_env(backend, &sim, "run-live", &slack);
        let daemon = env.start();
        wait_for(
            "the run_finished reply and the root's last update",
            || async {
                let posts = slack.calls("chat.postMessage");
                let updates = slack.calls("chat.update");
                let finished = posts
                    .iter()
                    .find(|p| !is_root(p) && text(p).contains("*failed*"));
                match finished {
                    Some(reply) if updates.iter().any(|u| u.at >= reply.at) => Ok(()),
                    _ => Err(format!("{} posts, {} updates", posts.len(), updates.len())),
                }
            },
        )
        .await;
        daemon.stop().await;
        let posts = slack.calls("chat.postMessage");
        let (roots, replies): (Vec<Call>, Vec<Call>) = posts.into_iter().partition(is_root);
        assert_eq!(roots.len(), 1, "{roots:?}");
        let root_ts = "1700000000.000001";
        assert_eq!(replies.len(), 5, "four events and the end: {replies:?}");
        for reply in &replies {
            assert_eq!(reply.body["thread_ts"], root_ts);
            let last = text(reply).contains("*failed*");
            assert_eq!(
                reply.body.get("reply_broadcast") == Some(&json!(true)),
                last,
                "only the run's end is broadcast to the channel: {}",
                reply.body
            );
        }
        assert!(text(&replies[4]).contains("*failed*"));
        // The root follows the run: each phase, then the end.
        let updates = slack.calls("chat.update");
        assert!(updates.iter().all(|u| u.body["ts"] == root_ts));
        let shown: Vec<&str> = updates.iter().map(text).collect();
        assert_eq!(shown.len(), 3, "two phases and the end: {shown:?}");
        assert!(
            shown[0].contains("is *running* (phase *plan*)"),
            "{shown:?}"
        );
        assert!(
            shown[2].contains("is *failed*: Flight search timed out"),
            "{shown:?}"
        );
    }
}

on_both! {
    async fn thread_mode_dead_letters_a_permanent_ok_false_and_retries_a_transient_one_and_a_429(backend: Backend) {
        let sim = sim_with(vec![scripted("run-ok", numbered(2))]).await;
        let slack = FakeSlackApi::start().await;
        slack.script_posts([
            // The first event's root: a permanent error, dead at once.
            (200, json!({"ok": false, "error": "not_in_channel"}), None),
            // The second event's root: a transient error, then rate limited.
            (200, json!({"ok": false, "error": "internal_error"}), None),
            (429, json!({"ok": false, "error": "ratelimited"}), Some(4)),
        ]);
        let env = slack_thread_env(backend, &sim, "run-ok", &slack);
        let daemon = env.start();
        wait_for("the run_finished reply", || async {
            let posts = slack.calls("chat.postMessage");
            if posts
                .iter()
                .any(|p| !is_root(p) && text(p).contains("*completed*"))
            {
                Ok(())
            } else {
                Err(format!("{} posts", posts.len()))
            }
        })
        .await;
        let reader = env.reads().await.unwrap();
        let dead = reader.dead_letters(None, None).await.unwrap();
        daemon.stop().await;
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!((dead[0].id.as_str(), dead[0].attempts), ("run-ok:1", 1));
        assert!(
            dead[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("not_in_channel")),
            "{dead:?}"
        );
        let posts = slack.calls("chat.postMessage");
        let answered: Vec<u16> = posts.iter().map(|p| p.answered).collect();
        assert_eq!(&answered[..4], [200, 200, 429, 200], "{posts:?}");
        // Each attempt waits its turn in the 1/s bucket (a history look-up,
        // then the post): Retry-After asks for longer than that.
        let calls = slack.state.lock().unwrap().calls.clone();
        let limited = calls.iter().position(|c| c.answered == 429).unwrap();
        let next = calls[limited + 1].at - calls[limited].at;
        assert!(
            next >= Duration::from_secs(4),
            "Retry-After honoured: the next call came {next:?} after the 429"
        );
        assert_eq!(
            posts[2].body, posts[3].body,
            "the 429'd root is posted again"
        );
        assert!(posts[..4].iter().all(is_root), "{posts:?}");
        let replies = &posts[4..];
        assert_eq!(replies.len(), 2, "event 2 and the end: {replies:?}");
        assert!(
            replies[0].body["blocks"].to_string().contains("#2 ·"),
            "{replies:?}"
        );
        assert!(text(&replies[1]).contains("*completed*"));
        assert!(
            replies.iter().all(|r| r.body["thread_ts"].is_string()
                && r.body["thread_ts"] == replies[0].body["thread_ts"]),
            "one thread: {replies:?}"
        );
    }
}

/// A unix datagram socket standing in for systemd's notify socket; what
/// arrives is collected with the time it arrived.
struct NotifySocket {
    path: PathBuf,
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let collected = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                collected.lock().unwrap().push((Instant::now(), text));
            }
        });
        Self { path, seen }
    }

    /// When each message holding `line` arrived.
    fn times(&self, line: &str) -> Vec<Instant> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, text)| text.lines().any(|l| l == line))
            .map(|(at, _)| *at)
            .collect()
    }

    async fn wait_count(&self, line: &str, n: usize, after: Instant) {
        wait_for(&format!("{n} x {line}"), || async {
            let count = self.times(line).iter().filter(|at| **at > after).count();
            if count >= n {
                Ok(())
            } else {
                Err(format!("{:?}", self.seen.lock().unwrap()))
            }
        })
        .await
    }
}

/// Takes the state database's write lock from a connection of the test's
/// own, as another process would.
fn hold_write_lock(path: &Path) -> rusqlite::Connection {
    let db = rusqlite::Connection::open(path).unwrap();
    db.busy_timeout(Duration::from_secs(30)).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    db
}

// SQLite only: it blocks commits with SQLite's write lock.
#[tokio::test]
async fn ready_then_watchdog_pings_which_stop_while_the_store_cannot_commit() {
    let sim = sim_with(vec![scripted("run-sd", numbered(2))]).await;
    let env = Env::new(&sim, &["run-sd"]);
    let config = env.write_config();
    let socket = NotifySocket::bind(env.dir.path());
    let started = Instant::now();
    let daemon = Proc::spawn(
        &config,
        &[
            ("NOTIFY_SOCKET", socket.path.display().to_string()),
            ("WATCHDOG_USEC", "1000000".into()),
        ],
    );
    socket.wait_count("READY=1", 1, started).await;
    let ready_at = socket.times("READY=1")[0];
    assert!(env.state_path().exists(), "READY after the store is open");
    socket.wait_count("WATCHDOG=1", 3, ready_at).await;
    env.wait_finished(&["run-sd"]).await;
    // A wedged store: the pings stop (after at most the one in flight).
    let lock = hold_write_lock(&env.state_path());
    let locked = Instant::now();
    let quiet_from = locked + Duration::from_millis(2500);
    wait_for("an observation window past the lock", || async {
        if Instant::now() > quiet_from + Duration::from_secs(3) {
            Ok(())
        } else {
            Err("observing".into())
        }
    })
    .await;
    let late: Vec<Instant> = socket
        .times("WATCHDOG=1")
        .into_iter()
        .filter(|at| *at > quiet_from)
        .collect();
    assert!(
        late.is_empty(),
        "no watchdog ping while the store cannot commit: {} pings, the first {:?} after the lock",
        late.len(),
        late.first().map(|at| *at - locked)
    );
    drop(lock);
    let released = Instant::now();
    socket.wait_count("WATCHDOG=1", 2, released).await;
    daemon.signal("TERM");
    let mut daemon = daemon;
    let status = daemon.exit_within(Duration::from_secs(60)).await.unwrap();
    assert!(status.success());
    socket.wait_count("STOPPING=1", 1, released).await;
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

// SQLite only: it blocks commits with SQLite's write lock.
#[tokio::test]
async fn readyz_is_unready_while_the_store_cannot_commit_and_ready_again_after() {
    let sim = sim_with(vec![scripted("run-rz", numbered(2))]).await;
    let port = free_port();
    let mut env = Env::new(&sim, &["run-rz"]);
    env.extra = format!("\n[server]\nlisten = \"127.0.0.1:{port}\"\n");
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    let daemon = env.start();
    env.wait_finished(&["run-rz"]).await;
    wait_for("/readyz ready", || async {
        match get(&readyz).await {
            (200, _) => Ok(()),
            seen => Err(format!("{seen:?}")),
        }
    })
    .await;
    let lock = hold_write_lock(&env.state_path());
    let locked = Instant::now();
    wait_for("/readyz unready", || async {
        match get(&readyz).await {
            (503, body) if body.contains("state database") => Ok(()),
            seen => Err(format!("{seen:?}")),
        }
    })
    .await;
    // Past the store's 10 s busy timeout too: still unready, every time.
    let mut probes = 0;
    while locked.elapsed() < Duration::from_secs(13) {
        let (status, body) = get(&readyz).await;
        assert_eq!(status, 503, "{:?} after the lock: {body}", locked.elapsed());
        probes += 1;
    }
    assert!(probes >= 2, "{probes}");
    drop(lock);
    wait_for("/readyz ready again", || async {
        match get(&readyz).await {
            (200, _) => Ok(()),
            seen => Err(format!("{seen:?}")),
        }
    })
    .await;
    daemon.stop().await;
}

/// The value of one sample (`name{labels}` exactly as exposed), if present.
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

on_both! {
    async fn metric_values_count_retries_dead_letters_reconnects_and_sinks_up(backend: Backend) {
        let sim = start_sim(Scenario {
            runs: vec![scripted("run-mv", numbered(8))],
            faults: vec![Fault {
                run: None,
                endpoint: Some("stream".into()),
                count: Some(3),
                kind: FaultKind::DropStream { after: 2 },
            }],
            ..Scenario::default()
        })
        .await;
        let flaky = Receiver::start().await;
        flaky.script([Answer::Status(500), Answer::Status(500)]);
        let down = Receiver::start().await;
        down.set_default(Some(Answer::Status(500)));
        let port = free_port();
        let mut env = Env::on(backend, &sim, &["run-mv"]);
        env.token = String::new();
        env.api = format!(
            "session_cookie = \"{}\"\nstream_idle_timeout = \"5s\"\n",
            sim.session()
        );
        let hook = |name: &str, url: String, attempts: u32| {
            format!(
                "\n[sinks.{name}]\ntype = \"webhook\"\nurl = \"{url}\"\nsecret = \"{SECRET}\"\n\
                 max_attempts = {attempts}\ninitial_backoff = \"20ms\"\nmax_backoff = \"100ms\"\n"
            )
        };
        env.extra = format!(
            "\n[server]\nlisten = \"127.0.0.1:{port}\"\n{}{}\n\
             [[routes]]\nevent_types = [\"run_finished\"]\nsinks = [\"flaky\", \"dlq\"]\n",
            hook("flaky", flaky.url(), 20),
            hook("dlq", down.url(), 6),
        );
        let config = env.write_config();
        let daemon = Proc::spawn(&config, &[]);
        env.wait_finished(&["run-mv"]).await;
        // What the metrics must count, seen from outside: six attempts at dlq
        // (the last one dead-lettered), three at flaky (the last one accepted).
        let reader = env.reads().await.unwrap();
        wait_for("dlq's dead letter and flaky's delivery", || async {
            let dead = reader
                .dead_letters(None, None)
                .await
                .map_err(|e| e.to_string())?;
            let (at_dlq, at_flaky) = (down.requests().len(), flaky.accepted().len());
            if dead.len() == 1 && at_dlq == 6 && at_flaky == 1 {
                Ok(())
            } else {
                Err(format!(
                    "{} dead, {at_dlq} at dlq, {at_flaky} at flaky",
                    dead.len()
                ))
            }
        })
        .await;
        let expect = [
            (
                "runhook_deliveries_total{outcome=\"retry\",sink=\"flaky\"}",
                2.0,
            ),
            (
                "runhook_deliveries_total{outcome=\"delivered\",sink=\"flaky\"}",
                1.0,
            ),
            (
                "runhook_deliveries_total{outcome=\"retry\",sink=\"dlq\"}",
                5.0,
            ),
            (
                "runhook_deliveries_total{outcome=\"dead\",sink=\"dlq\"}",
                1.0,
            ),
            (
                "runhook_deliveries_total{outcome=\"delivered\",sink=\"archive\"}",
                9.0,
            ),
            ("runhook_dead_letters{sink=\"dlq\"}", 1.0),
            ("runhook_dead_letters{sink=\"flaky\"}", 0.0),
            ("runhook_dead_letters{sink=\"archive\"}", 0.0),
            ("runhook_sink_up{sink=\"dlq\"}", 0.0),
            ("runhook_sink_up{sink=\"flaky\"}", 1.0),
            ("runhook_sink_up{sink=\"archive\"}", 1.0),
            ("runhook_stream_reconnects_total", 3.0),
        ];
        // Counters move just after the store records an outcome: allow a moment.
        let metrics = format!("http://127.0.0.1:{port}/metrics");
        let text = wait_for_within(Duration::from_secs(30), "the metric values", || async {
            let (_, text) = get(&metrics).await;
            let wrong: Vec<String> = expect
                .iter()
                .filter(|(name, value)| sample(&text, name) != Some(*value))
                .map(|(name, value)| format!("{name} = {:?}, not {value}", sample(&text, name)))
                .collect();
            if wrong.is_empty() {
                Ok(text)
            } else {
                Err(format!("{wrong:#?}\n{text}"))
            }
        })
        .await;
        drop(daemon);
        // Exported at 0 from the start (so increase() sees a first dead letter),
        // and still 0: flaky never dead-lettered.
        assert_eq!(
            sample(
                &text,
                "runhook_deliveries_total{outcome=\"dead\",sink=\"flaky\"}"
            ),
            Some(0.0),
            "{text}"
        );
        assert_eq!(down.requests().len(), 6, "max_attempts = 6");
        assert_eq!(flaky.requests().len(), 3);
    }
}
