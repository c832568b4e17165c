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
//!
//! Here: the sink and its posting (webhook, replies in the thread);
//! `thread.rs`: the root protocol above; `api.rs`: the Web API calls and
//! how Slack's answers become outcomes; `message.rs`: what a message says.

mod api;
pub mod message;
mod thread;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::json;

use super::{ANSWER_CAP, Event, Outcome, http_client};
use crate::config::{Secret, SlackConfig, SlackMode, Templates};
use crate::http::{read_capped, request_error, retry_after, snippet};
use api::{classify_webhook, retry};
use message::Message;
pub use thread::{ThreadBook, ThreadBookError, ThreadRoot};

/// Every Slack call, connecting included. Public: a lease shed while a
/// call is in flight is kept until it must have ended.
pub const TIMEOUT: Duration = Duration::from_secs(10);

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
            SlackMode::IncomingWebhook { url } => self.post_webhook(url, event, message).await,
            SlackMode::Bot { token, channel } => {
                self.post_in_thread(token, channel, event, message).await
            }
        }
    }

    async fn post_webhook(&self, url: &Secret, event: &Event<'_>, message: &Message) -> Outcome {
        if let Err(outcome) = self.until_ready_for(event.run_id).await {
            return outcome;
        }
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

    /// Waits for the token bucket, then asks whether the run is still this
    /// process's to send for: the delivery engine checked before the send,
    /// but the wait (a second per message queued on this sink) may outlast
    /// the run's lease. A refusal is a retry the engine cannot record
    /// (its fence is lost too), so the run's new owner sends instead.
    async fn until_ready_for(&self, run_id: &str) -> Result<(), Outcome> {
        self.bucket.until_ready().await;
        if self.threads.may_send(run_id) {
            return Ok(());
        }
        tracing::info!(sink = %self.name, %run_id, "slack: the run is no longer this process's; not sending");
        Err(retry(
            None,
            "slack: the run's lease was lost before sending; its new owner sends".into(),
        ))
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
        if let Err(outcome) = self
            .call(token, event.run_id, "chat.postMessage", &reply)
            .await
        {
            return outcome;
        }
        if matches!(event.event_type, "PHASE_STARTED" | "run_finished") {
            let live = message::thread_root(event);
            let update =
                json!({"channel": channel, "ts": root, "text": live.text, "blocks": live.blocks});
            // Best effort: the reply is out; a stale root is not worth a duplicate reply.
            if let Err(outcome) = self.call(token, event.run_id, "chat.update", &update).await {
                tracing::warn!(sink = %self.name, run_id = %event.run_id, ?outcome, "slack: root message not updated");
            }
        }
        Outcome::Delivered
    }
}

#[cfg(test)]
mod tests;
