//! The Slack sink, in two modes:
//! - incoming webhook: one message per event;
//! - bot token + channel: one thread per run. The first event posts a root
//!   message (`chat.postMessage`), every event goes into its thread, and the
//!   root is edited (`chat.update`) to show the run's live status. The
//!   thread's `ts` is kept in a [`ThreadBook`] (the delivery engine keeps it
//!   in the state database) so a restart continues the same thread.
//!   At most one root per run: a thread that cannot be read is a retry (not
//!   "no thread yet"); a root whose `ts` cannot be saved is kept in memory
//!   and saved on the next attempt instead of being posted again; and a note
//!   saved before posting (plus the root's message metadata) lets a later
//!   attempt, or a restart after a crash, find a root Slack posted without
//!   runhook learning its `ts` (`conversations.history`).
//!
//! About one message per second per sink (a token bucket), `Retry-After`
//! honoured, and Slack's permanent errors dead-lettered at once.

pub mod message;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::StatusCode;
use serde_json::{Value, json};

use super::{ANSWER_CAP, DEFAULT_429_WAIT, Event, Outcome, http_client};
use crate::config::{Secret, SlackConfig, SlackMode, Templates};
use crate::http::{read_capped, request_error, retry_after, snippet};
use message::Message;

/// Errors after which retrying cannot help.
const PERMANENT: [&str; 10] = [
    "invalid_payload",
    "action_prohibited",
    "channel_not_found",
    "channel_is_archived",
    "invalid_auth",
    "not_in_channel",
    "not_authed",
    "account_inactive",
    "token_revoked",
    "no_text",
];
/// A Web API answer is parsed (a `conversations.history` page carries
/// messages), so more of it is read than of an answer only kept as text.
const API_ANSWER_CAP: usize = 16 * 1024;
/// A saved thread whose `ts` starts with this is the note written before a
/// root was posted (`pending:<unix seconds>`): a root may be out there.
const ROOT_PENDING: &str = "pending:";
/// The metadata event type on root messages, to find them again.
const ROOT_METADATA: &str = "runhook_thread_root";
/// How far `conversations.history` is searched for a root: pages of 200.
const HISTORY_PAGES: usize = 10;
/// Every Slack call, connecting included.
const TIMEOUT: Duration = Duration::from_secs(10);

pub struct SlackSink {
    name: Arc<str>,
    client: reqwest::Client,
    mode: SlackMode,
    api_base: reqwest::Url,
    templates: Templates,
    bucket: DefaultDirectRateLimiter,
    threads: Arc<dyn ThreadBook>,
    /// One root per run even if two deliveries of a run race (`ordered =
    /// false`). Inside: roots posted whose `ts` could not be saved yet, by
    /// run id; only runs whose save failed, so it stays small.
    roots: tokio::sync::Mutex<HashMap<String, ThreadRoot>>,
}

/// A posted root message: where later events of the run reply. Before a
/// root is posted, a note (`ts` = `pending:<unix seconds>`) stands in for
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadRoot {
    pub channel: String,
    pub ts: String,
}

/// Where a Slack sink keeps each run's thread root, one per run, so later
/// events and a restart reply in the same thread. Sinks hold no store: the
/// delivery engine provides this (over the state database), and a failure
/// here makes the attempt a retry.
pub trait ThreadBook: Send + Sync {
    /// The root (or the note) kept for the run, if any.
    fn thread<'a>(
        &'a self,
        run_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ThreadRoot>, ThreadBookError>>;

    /// Keeps `root` for the run, in place of what was kept; done only once
    /// it is durable.
    fn keep<'a>(
        &'a self,
        run_id: &'a str,
        root: ThreadRoot,
    ) -> BoxFuture<'a, Result<(), ThreadBookError>>;
}

/// Why a [`ThreadBook`] could not answer; shown as its cause says it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ThreadBookError(Box<dyn std::error::Error + Send + Sync>);

impl ThreadBookError {
    pub fn new(cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Box::new(cause))
    }
}

impl SlackSink {
    pub fn new(
        name: Arc<str>,
        config: &SlackConfig,
        threads: Arc<dyn ThreadBook>,
    ) -> Result<Self, reqwest::Error> {
        Ok(Self {
            name,
            client: http_client(TIMEOUT)?,
            mode: config.mode.clone(),
            api_base: config.api_base.clone(),
            templates: config.templates.clone(),
            bucket: RateLimiter::direct(Quota::per_second(NonZeroU32::MIN)),
            threads,
            roots: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    pub async fn send(&self, event: &Event<'_>) -> Outcome {
        let message = self.render(event);
        self.send_message(event, &message).await
    }

    /// The message this sink sends for `event` (the template for its type,
    /// or the default wording).
    pub fn render(&self, event: &Event<'_>) -> Message {
        message::render(event, self.templates.environment())
    }

    /// Sends `message` for `event` as [`Self::send`] would: `runhook
    /// send-test` sends a rendered message it marked as a test this way.
    pub async fn send_message(&self, event: &Event<'_>, message: &Message) -> Outcome {
        match &self.mode {
            SlackMode::IncomingWebhook { url } => self.post_webhook(url, message).await,
            SlackMode::Bot { token, channel } => {
                self.post_in_thread(token, channel, event, message).await
            }
        }
    }

    async fn post_webhook(&self, url: &Secret, message: &Message) -> Outcome {
        self.bucket.until_ready().await;
        let request = self.client.post(url.expose()).json(message);
        match request.send().await {
            // Without the URL: it is the secret.
            Err(error) => retry(
                None,
                format!("slack: {}", request_error(error, TIMEOUT, TIMEOUT)),
            ),
            Ok(response) => {
                let status = response.status();
                let wait = retry_after(response.headers());
                let body = read_capped(response, ANSWER_CAP)
                    .await
                    .map(|(b, _)| b)
                    .unwrap_or_default();
                classify_webhook(status, wait, &snippet(&body, 300))
            }
        }
    }

    async fn post_in_thread(
        &self,
        token: &Secret,
        channel: &str,
        event: &Event<'_>,
        message: &Message,
    ) -> Outcome {
        let root = match self.thread_root(token, channel, event).await {
            Ok(ts) => ts,
            Err(outcome) => return outcome,
        };
        let mut reply = json!({"channel": channel, "thread_ts": root, "text": message.text, "blocks": message.blocks});
        if event.event_type == "run_finished" {
            // The end of a run shows in the channel too.
            reply["reply_broadcast"] = json!(true);
        }
        if let Err(outcome) = self.call(token, "chat.postMessage", &reply).await {
            return outcome;
        }
        if matches!(event.event_type, "PHASE_STARTED" | "run_finished") {
            let live = message::thread_root(event);
            let update =
                json!({"channel": channel, "ts": root, "text": live.text, "blocks": live.blocks});
            // Best effort: the reply is out; a stale root is not worth a duplicate reply.
            if let Err(outcome) = self.call(token, "chat.update", &update).await {
                tracing::warn!(sink = %self.name, run_id = %event.run_id, ?outcome, "slack: root message not updated");
            }
        }
        Outcome::Delivered
    }

    /// The run's thread root, posted on its first event. Posted at most once
    /// per run: when the saved thread cannot be read, or the new root cannot
    /// be saved, this is a retry, and the next attempt uses the root already
    /// posted; a root posted but never confirmed is looked up before posting.
    async fn thread_root(
        &self,
        token: &Secret,
        channel: &str,
        event: &Event<'_>,
    ) -> Result<String, Outcome> {
        let mut unsaved = self.roots.lock().await;
        if let Some(root) = unsaved.get(event.run_id).cloned() {
            self.save_root(event, &root).await?;
            unsaved.remove(event.run_id);
            return Ok(root.ts);
        }
        let saved = self
            .threads
            .thread(event.run_id)
            .await
            .map_err(|error| {
                tracing::warn!(sink = %self.name, run_id = %event.run_id, %error, "slack: cannot read the run's thread; retrying");
                retry(None, format!("slack: cannot read the run's thread: {error}"))
            })?;
        let found = match saved {
            Some(ThreadRoot { ts, .. }) if !ts.starts_with(ROOT_PENDING) => return Ok(ts),
            Some(ThreadRoot {
                channel: noted_channel,
                ts: note,
            }) => {
                let since = note[ROOT_PENDING.len()..].parse().unwrap_or(0);
                self.find_root(token, &noted_channel, event, since).await?
            }
            None => {
                self.note_root_pending(event, channel).await?;
                None
            }
        };
        let root = match found {
            Some(root) => {
                tracing::info!(sink = %self.name, run_id = %event.run_id, ts = %root.ts, "slack: found the root an earlier attempt posted");
                root
            }
            None => self.post_root(token, channel, event).await?,
        };
        unsaved.insert(event.run_id.to_owned(), root.clone());
        self.save_root(event, &root).await?;
        unsaved.remove(event.run_id);
        Ok(root.ts)
    }

    /// Posts the root message, with metadata naming the sink and run so it
    /// can be found again.
    async fn post_root(
        &self,
        token: &Secret,
        channel: &str,
        event: &Event<'_>,
    ) -> Result<ThreadRoot, Outcome> {
        let message = message::thread_root(event);
        let metadata = json!({"event_type": ROOT_METADATA,
            "event_payload": {"sink": &*self.name, "run_id": event.run_id}});
        let answer = self
            .call(
                token,
                "chat.postMessage",
                &json!({"channel": channel, "text": message.text, "blocks": message.blocks, "metadata": metadata}),
            )
            .await?;
        let ts = answer["ts"]
            .as_str()
            .ok_or_else(|| retry(None, "slack: chat.postMessage answered without `ts`".into()))?;
        Ok(ThreadRoot {
            channel: answer["channel"].as_str().unwrap_or(channel).to_owned(),
            ts: ts.to_owned(),
        })
    }

    /// Notes, before posting a root, that one may exist from now on, so that
    /// an attempt that never learns the root's `ts` (a timeout, a crash) is
    /// followed by a look-up rather than a second root.
    async fn note_root_pending(&self, event: &Event<'_>, channel: &str) -> Result<(), Outcome> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let note = ThreadRoot {
            channel: channel.to_owned(),
            ts: format!("{ROOT_PENDING}{now}"),
        };
        self.save_root(event, &note).await
    }

    /// A root this sink posted for the run since `since` (unix seconds), from
    /// the channel's history and the roots' metadata; the oldest if several.
    /// Without the `channels:history` scope nothing can be found: `None`,
    /// with a warning.
    async fn find_root(
        &self,
        token: &Secret,
        channel: &str,
        event: &Event<'_>,
        since: i64,
    ) -> Result<Option<ThreadRoot>, Outcome> {
        let mut cursor: Option<String> = None;
        let mut found = None;
        for _ in 0..HISTORY_PAGES {
            let mut form = vec![
                ("channel", channel.to_owned()),
                ("oldest", (since - 60).max(0).to_string()),
                ("limit", "200".to_owned()),
                ("include_all_metadata", "true".to_owned()),
            ];
            if let Some(cursor) = cursor.take() {
                form.push(("cursor", cursor));
            }
            let answer = match self.call_form(token, "conversations.history", &form).await {
                Ok(answer) => answer,
                Err(Outcome::Retry { error, .. } | Outcome::Permanent { error, .. })
                    if error.contains("missing_scope") =>
                {
                    tracing::warn!(sink = %self.name, run_id = %event.run_id, %error, "slack: cannot look for a root that may have been posted (grant channels:history); posting one");
                    return Ok(None);
                }
                Err(outcome) => return Err(outcome),
            };
            // Newest first: the last match on a page is the oldest so far.
            if let Some(ts) = self.last_root_in(&answer, event.run_id) {
                found = Some(ts);
            }
            cursor = answer["response_metadata"]["next_cursor"]
                .as_str()
                .filter(|c| !c.is_empty() && answer["has_more"] == json!(true))
                .map(str::to_owned);
            if cursor.is_none() {
                break;
            }
        }
        Ok(found.map(|ts| ThreadRoot {
            channel: channel.to_owned(),
            ts,
        }))
    }

    /// The `ts` of the last message in a history page that is this sink's
    /// root for the run.
    fn last_root_in(&self, history: &Value, run_id: &str) -> Option<String> {
        history["messages"]
            .as_array()?
            .iter()
            .filter(|m| {
                let metadata = &m["metadata"];
                metadata["event_type"] == ROOT_METADATA
                    && metadata["event_payload"]["run_id"] == run_id
                    && metadata["event_payload"]["sink"] == *self.name
            })
            .filter_map(|m| m["ts"].as_str())
            .next_back()
            .map(str::to_owned)
    }

    /// Keeps a posted root (or the note before one); a failure is a retry
    /// (the caller keeps the root in memory meanwhile).
    async fn save_root(&self, event: &Event<'_>, root: &ThreadRoot) -> Result<(), Outcome> {
        self.threads
            .keep(event.run_id, root.clone())
            .await
            .map_err(|error| {
                tracing::warn!(sink = %self.name, run_id = %event.run_id, %error, "slack: cannot save the run's thread; keeping it in memory and retrying");
                retry(None, format!("slack: cannot keep the thread: {error}"))
            })
    }

    /// One Web API call with a JSON body; the answer when Slack says `ok`.
    async fn call(&self, token: &Secret, method: &str, body: &Value) -> Result<Value, Outcome> {
        self.api_call(token, method, |request| request.json(body))
            .await
    }

    /// One Web API call with a form body, as Slack's read methods
    /// (`conversations.history`) take their arguments.
    async fn call_form(
        &self,
        token: &Secret,
        method: &str,
        form: &[(&str, String)],
    ) -> Result<Value, Outcome> {
        self.api_call(token, method, |request| request.form(form))
            .await
    }

    async fn api_call(
        &self,
        token: &Secret,
        method: &str,
        body: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<Value, Outcome> {
        self.bucket.until_ready().await;
        let url = self.api_base.join(method).map_err(|e| Outcome::Permanent {
            status: None,
            error: format!("slack: bad api_base: {e}"),
        })?;
        let request = self.client.post(url).bearer_auth(token.expose());
        let response = body(request).send().await.map_err(|error| {
            retry(
                None,
                format!("slack {method}: {}", request_error(error, TIMEOUT, TIMEOUT)),
            )
        })?;
        let status = response.status();
        let wait = retry_after(response.headers());
        let bytes = read_capped(response, API_ANSWER_CAP)
            .await
            .map(|(b, _)| b)
            .unwrap_or_default();
        classify_api(method, status, wait, &bytes)
    }
}

fn retry(status: Option<u16>, error: String) -> Outcome {
    Outcome::Retry {
        status,
        error,
        after: None,
    }
}

/// An incoming webhook's answer (plain text, e.g. `invalid_payload`).
fn classify_webhook(status: StatusCode, wait: Option<Duration>, body: &str) -> Outcome {
    let code = Some(status.as_u16());
    if status.is_success() {
        return Outcome::Delivered;
    }
    let error = format!("slack: HTTP {}: {body}", status.as_u16());
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Outcome::Retry {
            status: code,
            error,
            after: Some(wait.unwrap_or(DEFAULT_429_WAIT)),
        };
    }
    let permanent_status = matches!(status.as_u16(), 400 | 403 | 404 | 410);
    if permanent_status || PERMANENT.iter().any(|p| body.contains(p)) {
        return Outcome::Permanent {
            status: code,
            error,
        };
    }
    Outcome::Retry {
        status: code,
        error,
        after: wait,
    }
}

/// A Web API answer: `{"ok": true, ...}` or `{"ok": false, "error": "..."}`.
fn classify_api(
    method: &str,
    status: StatusCode,
    wait: Option<Duration>,
    body: &[u8],
) -> Result<Value, Outcome> {
    let code = Some(status.as_u16());
    if status == StatusCode::TOO_MANY_REQUESTS {
        let error = format!("slack {method}: rate limited");
        return Err(Outcome::Retry {
            status: code,
            error,
            after: Some(wait.unwrap_or(DEFAULT_429_WAIT)),
        });
    }
    let answer: Value = match serde_json::from_slice(body) {
        Ok(answer) => answer,
        Err(_) => {
            return Err(retry(
                code,
                format!(
                    "slack {method}: HTTP {}: {}",
                    status.as_u16(),
                    snippet(body, 200)
                ),
            ));
        }
    };
    if answer["ok"] == json!(true) {
        return Ok(answer);
    }
    let slack_error = answer["error"].as_str().unwrap_or("unknown_error");
    let error = format!("slack {method}: {slack_error}");
    if PERMANENT.contains(&slack_error) {
        Err(Outcome::Permanent {
            status: code,
            error,
        })
    } else {
        Err(Outcome::Retry {
            status: code,
            error,
            after: wait,
        })
    }
}

#[cfg(test)]
mod tests;
