//! The Slack sink against a local fake of Slack: message shape and limits,
//! the rate limit, 429, permanent errors, and thread mode across a restart.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use crate::support::*;

#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub(crate) path: String,
    pub(crate) body: Value,
    pub(crate) auth: Option<String>,
    pub(crate) at: Instant,
}

#[derive(Default)]
struct FakeState {
    calls: Vec<Call>,
    /// Scripted answers for the incoming webhook: (status, body, retry-after).
    webhook_script: VecDeque<(u16, &'static str, Option<u64>)>,
    next_ts: u64,
    /// How many coming thread roots Slack posts but answers with a 500, so
    /// runhook cannot know they were posted.
    unconfirmed_roots: usize,
    /// The error `conversations.history` answers, e.g. `missing_scope`.
    history_error: Option<&'static str>,
}

#[derive(Clone)]
pub(crate) struct FakeSlack {
    pub(crate) addr: std::net::SocketAddr,
    state: Arc<Mutex<FakeState>>,
}

impl FakeSlack {
    pub(crate) async fn start() -> Self {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let app = Router::new()
            .route("/webhook", post(webhook))
            .route("/api/{method}", post(api))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, state }
    }

    /// The incoming webhook's next answer: status, body, `Retry-After`.
    fn answer_webhook(&self, status: u16, body: &'static str, retry_after: Option<u64>) {
        let mut state = self.state.lock().unwrap();
        state.webhook_script.push_back((status, body, retry_after));
    }

    fn post_roots_without_confirming(&self, n: usize) {
        self.state.lock().unwrap().unconfirmed_roots = n;
    }

    /// The calls to `path`, once there are at least `n`.
    async fn wait_calls(&self, path: &str, n: usize, what: &str) -> Vec<Call> {
        wait_for(what, || async {
            let calls = self.calls(path);
            if calls.len() >= n {
                Ok(calls)
            } else {
                Err(format!("{} calls", calls.len()))
            }
        })
        .await
    }

    /// Every call, in arrival order (the k-th answered with ts `1700000000.{k}`).
    pub(crate) fn all_calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    pub(crate) fn calls(&self, path: &str) -> Vec<Call> {
        self.state
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|c| c.path == path)
            .cloned()
            .collect()
    }
}

async fn webhook(State(state): State<Arc<Mutex<FakeState>>>, body: String) -> Response {
    let mut state = state.lock().unwrap();
    state.calls.push(Call {
        path: "/webhook".into(),
        body: serde_json::from_str(&body).unwrap_or(Value::Null),
        auth: None,
        at: Instant::now(),
    });
    match state.webhook_script.pop_front() {
        None => (StatusCode::OK, "ok").into_response(),
        Some((status, text, retry_after)) => {
            let mut response = (StatusCode::from_u16(status).unwrap(), text).into_response();
            if let Some(secs) = retry_after {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, secs.to_string().parse().unwrap());
            }
            response
        }
    }
}

async fn api(
    State(state): State<Arc<Mutex<FakeState>>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let mut state = state.lock().unwrap();
    state.next_ts += 1;
    let ts = format!("1700000000.{:06}", state.next_ts);
    let json_body = serde_json::from_str(&body).unwrap_or(Value::Null);
    let is_root = method == "chat.postMessage" && json_body.get("thread_ts").is_none();
    state.calls.push(Call {
        path: method.clone(),
        body: if json_body.is_null() {
            form(&body)
        } else {
            json_body
        },
        auth: headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        at: Instant::now(),
    });
    if method == "conversations.history" {
        if let Some(error) = state.history_error {
            return axum::Json(json!({"ok": false, "error": error})).into_response();
        }
        return axum::Json(history(&state.calls, &form(&body))).into_response();
    }
    if is_root && state.unconfirmed_roots > 0 {
        state.unconfirmed_roots -= 1;
        return (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response();
    }
    axum::Json(json!({"ok": true, "channel": "C0123", "ts": ts})).into_response()
}

/// A form body (`a=1&b=2`) as a JSON object; the values runhook sends need
/// no decoding beyond `+` and `%3A`.
fn form(body: &str) -> Value {
    body.split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), json!(v.replace('+', " ").replace("%3A", ":"))))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// `conversations.history`: the channel's messages (roots, not replies),
/// newest first, with metadata only when asked for.
fn history(calls: &[Call], query: &Value) -> Value {
    let with_metadata = query["include_all_metadata"] == "true";
    let mut messages: Vec<Value> = calls
        .iter()
        .enumerate()
        .filter(|(_, c)| c.path == "chat.postMessage" && c.body.get("thread_ts").is_none())
        .map(|(i, c)| {
            let mut message = json!({"type": "message", "text": c.body["text"],
                "ts": format!("1700000000.{:06}", i + 1)});
            if with_metadata && let Some(metadata) = c.body.get("metadata") {
                message["metadata"] = metadata.clone();
            }
            message
        })
        .collect();
    messages.reverse();
    json!({"ok": true, "messages": messages, "has_more": false})
}

fn slack_env(
    backend: Backend,
    sim: &runhook::simulate::Simulator,
    runs: &[&str],
    keys: &str,
) -> Env {
    let mut env = Env::on(backend, sim, runs);
    env.extra =
        format!("\n[sinks.chat]\ntype = \"slack\"\n{keys}\n\n[[routes]]\nsinks = [\"chat\"]\n");
    env
}

pub(crate) fn assert_within_limits(message: &Value) {
    let blocks = message["blocks"].as_array().expect("blocks");
    assert!(!blocks.is_empty() && blocks.len() <= 50);
    assert!(
        message["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty() && t.chars().count() <= 3000),
        "fallback text"
    );
    for block in blocks {
        if block["type"] == "section" {
            assert!(block["text"]["text"].as_str().unwrap().chars().count() <= 3000);
        }
    }
}

on_both! {
    async fn incoming_webhook_messages_are_readable_limited_and_rate_limited(backend: Backend) {
        let events = vec![
            event("PHASE_STARTED", r#"{"phase":"plan"}"#),
            event(
                "ARTIFACT_CREATED",
                &format!(
                    r#"{{"artifactType":"proposals","note":"{}"}}"#,
                    "x".repeat(5000)
                ),
            ),
        ];
        let mut run = scripted("run-s", events);
        run.final_status = "failed".into();
        run.error_message = Some("Flight search timed out".into());
        let sim = sim_with(vec![run]).await;
        let slack = FakeSlack::start().await;
        // The first answer is a 429: honoured, then the same message again.
        slack.answer_webhook(429, "rate_limited", Some(1));
        let template = r#"templates = { ARTIFACT_CREATED = "{{ payload.note }}" }"#;
        let env = slack_env(
            backend,
            &sim,
            &["run-s"],
            &format!(
                "webhook_url = \"http://{}/webhook\"\n{template}",
                slack.addr
            ),
        );
        let daemon = env.start();
        let calls = slack
            .wait_calls("/webhook", 4, "four messages accepted")
            .await;
        daemon.stop().await;
        for call in &calls {
            assert_within_limits(&call.body);
        }
        assert_eq!(
            calls[0].body, calls[1].body,
            "the 429'd message is sent again"
        );
        assert!(
            calls[1].at - calls[0].at >= Duration::from_secs(1),
            "Retry-After honoured"
        );
        assert!(
            calls[1].body["text"]
                .as_str()
                .unwrap()
                .contains("phase *plan* started")
        );
        assert_eq!(
            calls[2].body["text"].as_str().unwrap().chars().count(),
            3000,
            "templated and cut to the limit"
        );
        let finished = calls[3].body["text"].as_str().unwrap();
        assert!(
            finished.contains("*failed*: Flight search timed out"),
            "{finished}"
        );
        for pair in calls[1..].windows(2) {
            assert!(
                pair[1].at - pair[0].at >= Duration::from_millis(900),
                "about one message per second"
            );
        }
    }
}

on_both! {
    async fn slack_permanent_errors_dead_letter_at_once_with_slacks_message(backend: Backend) {
        let sim = sim_with(vec![scripted("run-p", numbered(1))]).await;
        let slack = FakeSlack::start().await;
        slack.answer_webhook(404, "channel_not_found", None);
        let env = slack_env(
            backend,
            &sim,
            &["run-p"],
            &format!("webhook_url = \"http://{}/webhook\"", slack.addr),
        );
        let daemon = env.start();
        let reader = wait_for("the state database", || async {
            env.reads()
                .await
                .map_err(|e| e.to_string())
        })
        .await;
        let dead = wait_for("a dead letter", || async {
            let dead = reader
                .dead_letters(None, None)
                .await
                .map_err(|e| e.to_string())?;
            if dead.is_empty() {
                Err("none".into())
            } else {
                Ok(dead)
            }
        })
        .await;
        wait_for("the run_finished delivered", || async {
            let n = slack.calls("/webhook").len();
            if n >= 2 { Ok(()) } else { Err(format!("{n}")) }
        })
        .await;
        daemon.stop().await;
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (dead[0].id.as_str(), dead[0].attempts, dead[0].last_status),
            ("run-p:1", 1, Some(404))
        );
        assert!(
            dead[0]
                .last_error
                .as_deref()
                .unwrap()
                .contains("channel_not_found")
        );
    }
}

on_both! {
    async fn thread_mode_keeps_one_thread_per_run_across_a_restart(backend: Backend) {
        let mut run = scripted("run-t", numbered(3));
        run.interval = Duration::from_millis(10);
        let sim = sim_with(vec![run]).await;
        let slack = FakeSlack::start().await;
        let keys = format!(
            "bot_token = \"xoxb-test\"\nchannel = \"C0123\"\napi_base = \"http://{}/api/\"",
            slack.addr
        );
        let env = slack_env(backend, &sim, &["run-t"], &keys);
        let daemon = env.start_process();
        wait_for("the root and a first reply", || async {
            let n = slack.calls("chat.postMessage").len();
            if n >= 2 { Ok(()) } else { Err(format!("{n}")) }
        })
        .await;
        daemon.crash().await;
        let daemon = env.start_process();
        wait_for("the run_finished reply, then the root updated", || async {
            let posts = slack.calls("chat.postMessage");
            let finished = posts.iter().position(|p| {
                p.body["text"]
                    .as_str()
                    .unwrap_or("")
                    .contains("Run `run-t` *completed*")
            });
            let updates = slack.calls("chat.update");
            match finished {
                Some(i) if updates.iter().any(|u| u.at > posts[i].at) => Ok(()),
                _ => Err(format!("{} posts, {} updates", posts.len(), updates.len())),
            }
        })
        .await;
        daemon.stop().await;
        let posts = slack.calls("chat.postMessage");
        let roots: Vec<&Call> = posts
            .iter()
            .filter(|c| c.body.get("thread_ts").is_none())
            .collect();
        assert_eq!(roots.len(), 1, "one root per run, also after the restart");
        let root_ts = "1700000000.000001";
        let replies: Vec<&Call> = posts
            .iter()
            .filter(|c| c.body.get("thread_ts").is_some())
            .collect();
        // Each event in the thread, in order; the reply in flight at the crash
        // may be posted twice (the documented at-least-once window).
        let mut seen: Vec<String> = replies
            .iter()
            .map(|r| {
                r.body["blocks"][1]["elements"][0]["text"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned()
            })
            .collect();
        let posted = seen.len();
        seen.dedup();
        assert!(
            posted - seen.len() <= 1,
            "at most the in-flight reply repeats: {seen:?}"
        );
        let expected = ["#1 ·", "#2 ·", "#3 ·", "run_finished ·"];
        assert_eq!(seen.len(), 4, "{seen:?}");
        for (line, prefix) in seen.iter().zip(expected) {
            assert!(
                line.starts_with(prefix),
                "{line} should start with {prefix}"
            );
        }
        assert!(
            replies
                .iter()
                .all(|r| r.body["thread_ts"] == root_ts && r.body["channel"] == "C0123")
        );
        assert!(
            posts
                .iter()
                .all(|c| c.auth.as_deref() == Some("Bearer xoxb-test"))
        );
        let updates = slack.calls("chat.update");
        assert!(updates.iter().all(|u| u.body["ts"] == root_ts));
        for call in posts.iter().chain(&updates) {
            assert_within_limits(&call.body);
        }
    }
}

/// Every string in a message body: `text` and each block's texts.
fn texts(message: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![message.clone()];
    while let Some(value) = stack.pop() {
        match value {
            Value::String(s) => out.push(s),
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => stack.extend(map.into_iter().map(|(_, v)| v)),
            _ => {}
        }
    }
    out
}

on_both! {
    async fn upstream_text_cannot_ping_the_channel_or_hide_a_link(backend: Backend) {
        const EVIL: &str = "<!channel> <https://evil.example|click here> & co";
        let events = vec![
            event("PHASE_STARTED", r#"{"phase":"<!here>"}"#),
            event("ARTIFACT_CREATED", r#"{"artifactType":"<@U0123|boss>"}"#),
            event("<!everyone>", "{}"),
        ];
        let mut run = scripted("run-x", events);
        run.final_status = "failed".into();
        run.error_message = Some(EVIL.into());
        let sim = sim_with(vec![run]).await;
        let slack = FakeSlack::start().await;
        // A template's variables are escaped too; its own text is the user's.
        let template = r#"templates = { ARTIFACT_CREATED = "<!here> got {{ artifact_type }} ({{ payload.artifactType }})" }"#;
        let env = slack_env(
            backend,
            &sim,
            &["run-x"],
            &format!(
                "webhook_url = \"http://{}/webhook\"\n{template}",
                slack.addr
            ),
        );
        let daemon = env.start();
        let calls = slack.wait_calls("/webhook", 4, "four messages").await;
        daemon.stop().await;
        let finished = calls[3].body["text"].as_str().unwrap();
        assert!(
            finished.contains("&lt;!channel&gt; &lt;https://evil.example|click here&gt; &amp; co"),
            "{finished}"
        );
        let artifact = calls[1].body["text"].as_str().unwrap();
        assert_eq!(
            artifact,
            "<!here> got &lt;@U0123|boss&gt; (&lt;@U0123|boss&gt;)"
        );
        for call in [&calls[0], &calls[2], &calls[3]] {
            for text in texts(&call.body) {
                assert!(
                    !text.contains('<') && !text.contains('>'),
                    "unescaped upstream text: {text}"
                );
            }
        }
        // Besides the template's own `<!here>`, nothing unescaped.
        for text in texts(&calls[1].body["blocks"]) {
            let rest = text.replacen("<!here> got", "", 1);
            assert!(!rest.contains('<') && !rest.contains('>'), "{text}");
        }
    }
}

/// Thread mode against the fake, retrying fast so a fault is retried often.
fn thread_env(
    backend: Backend,
    sim: &runhook::simulate::Simulator,
    run: &str,
    slack: &FakeSlack,
) -> Env {
    let keys = format!(
        "bot_token = \"xoxb-test\"\nchannel = \"C0123\"\napi_base = \"http://{}/api/\"\n\
         initial_backoff = \"20ms\"\nmax_backoff = \"100ms\"",
        slack.addr
    );
    slack_env(backend, sim, &[run], &keys)
}

/// The state database, created before the daemon so a test can break it
/// first (through `env.sql`).
async fn state_db(env: &Env) {
    if !env.backend.is_postgres() {
        let path = env.state_path();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    }
    drop(env.open_state().await.expect("state database"));
}

/// Makes saving a root's `ts` fail (a real database error, from a trigger):
/// whatever runhook notes before posting may be saved, a Slack `ts` not.
async fn fail_root_saves(env: &Env) {
    let triggers = if env.backend.is_postgres() {
        "CREATE FUNCTION root_save_fails() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'injected: cannot save the root'; END $$;
         CREATE TRIGGER root_update_fails BEFORE UPDATE OF ts ON slack_threads
         FOR EACH ROW EXECUTE FUNCTION root_save_fails();
         CREATE TRIGGER root_insert_fails BEFORE INSERT ON slack_threads
         FOR EACH ROW WHEN (NEW.ts ~ '^[0-9].*[.][0-9]')
         EXECUTE FUNCTION root_save_fails();"
    } else {
        "CREATE TRIGGER root_update_fails BEFORE UPDATE OF ts ON slack_threads
         BEGIN SELECT RAISE(ABORT, 'injected: cannot save the root'); END;
         CREATE TRIGGER root_insert_fails BEFORE INSERT ON slack_threads
         WHEN NEW.ts GLOB '[0-9]*.[0-9]*'
         BEGIN SELECT RAISE(ABORT, 'injected: cannot save the root'); END;"
    };
    env.sql(triggers).await;
}

async fn allow_root_saves(env: &Env) {
    let drop_triggers = if env.backend.is_postgres() {
        "DROP TRIGGER root_update_fails ON slack_threads;
         DROP TRIGGER root_insert_fails ON slack_threads"
    } else {
        "DROP TRIGGER root_update_fails; DROP TRIGGER root_insert_fails"
    };
    env.sql(drop_triggers).await;
}

/// Waits until the run's first pending delivery to `chat` failed `n` times.
async fn wait_attempts(env: &Env, run: &str, n: u32) {
    let reader = env.reads().await.unwrap();
    wait_for("repeated failed attempts", || async {
        let pending = reader
            .pending_for_run("chat", run, 1)
            .await
            .map_err(|e| e.to_string())?;
        match pending.first() {
            Some(p) if p.attempts >= n => Ok(()),
            other => Err(format!("{:?}", other.map(|p| p.attempts))),
        }
    })
    .await;
}

/// Waits for the run's `run_finished` reply; returns the roots and replies.
async fn finished_thread(slack: &FakeSlack, run: &str) -> (Vec<Call>, Vec<Call>) {
    let needle = format!("Run `{run}` *completed*");
    wait_for("the run_finished reply", || async {
        let posts = slack.calls("chat.postMessage");
        let done = posts.iter().any(|p| {
            p.body.get("thread_ts").is_some()
                && p.body["text"].as_str().unwrap_or("").contains(&needle)
        });
        if done {
            Ok(())
        } else {
            Err(format!("{} posts", posts.len()))
        }
    })
    .await;
    slack
        .calls("chat.postMessage")
        .into_iter()
        .partition(|c| c.body.get("thread_ts").is_none())
}

on_both! {
    async fn thread_mode_posts_no_root_while_the_saved_thread_cannot_be_read(backend: Backend) {
        let sim = sim_with(vec![scripted("run-r", numbered(2))]).await;
        let slack = FakeSlack::start().await;
        let env = thread_env(backend, &sim, "run-r", &slack);
        state_db(&env).await;
        env.sql("ALTER TABLE slack_threads RENAME TO slack_threads_away")
            .await;
        let daemon = env.start();
        wait_attempts(&env, "run-r", 3).await;
        env.sql("ALTER TABLE slack_threads_away RENAME TO slack_threads")
            .await;
        let (roots, replies) = finished_thread(&slack, "run-r").await;
        daemon.stop().await;
        assert_eq!(roots.len(), 1, "one root: {roots:?}");
        let root_ts = "1700000000.000001";
        assert_eq!(replies.len(), 3, "{replies:?}");
        assert!(replies.iter().all(|r| r.body["thread_ts"] == root_ts));
    }
}

on_both! {
    async fn thread_mode_posts_one_root_when_saving_it_fails(backend: Backend) {
        let sim = sim_with(vec![scripted("run-w", numbered(2))]).await;
        let slack = FakeSlack::start().await;
        let env = thread_env(backend, &sim, "run-w", &slack);
        state_db(&env).await;
        fail_root_saves(&env).await;
        let daemon = env.start();
        wait_attempts(&env, "run-w", 3).await;
        let roots = slack.calls("chat.postMessage");
        assert_eq!(roots.len(), 1, "one root while its ts cannot be saved");
        allow_root_saves(&env).await;
        let (roots, replies) = finished_thread(&slack, "run-w").await;
        daemon.stop().await;
        assert_eq!(roots.len(), 1, "one root: {roots:?}");
        let root_ts = "1700000000.000001";
        assert_eq!(replies.len(), 3, "{replies:?}");
        assert!(replies.iter().all(|r| r.body["thread_ts"] == root_ts));
        let saved = env
            .sql_text("SELECT ts FROM slack_threads WHERE run_id = 'run-w'")
            .await;
        assert_eq!(saved, root_ts, "the root is kept for a restart");
    }
}

on_both! {
    async fn thread_mode_finds_a_root_slack_posted_but_did_not_confirm(backend: Backend) {
        let sim = sim_with(vec![scripted("run-u", numbered(2))]).await;
        let slack = FakeSlack::start().await;
        slack.post_roots_without_confirming(2);
        let env = thread_env(backend, &sim, "run-u", &slack);
        let daemon = env.start();
        let (roots, replies) = finished_thread(&slack, "run-u").await;
        daemon.stop().await;
        assert_eq!(roots.len(), 1, "one root: {roots:?}");
        let root_ts = "1700000000.000001";
        assert_eq!(replies.len(), 3, "{replies:?}");
        assert!(replies.iter().all(|r| r.body["thread_ts"] == root_ts));
    }
}

on_both! {
    async fn thread_mode_finds_its_root_after_a_crash_before_saving_it(backend: Backend) {
        let sim = sim_with(vec![scripted("run-c", numbered(2))]).await;
        let slack = FakeSlack::start().await;
        let env = thread_env(backend, &sim, "run-c", &slack);
        state_db(&env).await;
        fail_root_saves(&env).await;
        let daemon = env.start_process();
        wait_attempts(&env, "run-c", 2).await;
        daemon.crash().await;
        allow_root_saves(&env).await;
        let daemon = env.start_process();
        let (roots, replies) = finished_thread(&slack, "run-c").await;
        daemon.stop().await;
        assert_eq!(roots.len(), 1, "one root, also after the crash: {roots:?}");
        let root_ts = "1700000000.000001";
        assert_eq!(replies.len(), 3, "{replies:?}");
        assert!(replies.iter().all(|r| r.body["thread_ts"] == root_ts));
    }
}

on_both! {
    async fn thread_mode_without_history_scope_posts_again_rather_than_stall(backend: Backend) {
        let sim = sim_with(vec![scripted("run-h", numbered(1))]).await;
        let slack = FakeSlack::start().await;
        slack.post_roots_without_confirming(1);
        slack.state.lock().unwrap().history_error = Some("missing_scope");
        let env = thread_env(backend, &sim, "run-h", &slack);
        let daemon = env.start();
        let (roots, replies) = finished_thread(&slack, "run-h").await;
        daemon.stop().await;
        // The documented limit: without channels:history the unconfirmed root
        // cannot be found, so the run gets a second root and goes on.
        assert_eq!(roots.len(), 2, "{roots:?}");
        let root_ts = "1700000000.000003";
        assert!(
            replies.iter().all(|r| r.body["thread_ts"] == root_ts),
            "{replies:?}"
        );
        assert_eq!(slack.calls("conversations.history").len(), 1);
    }
}
