//! The thread-root protocol of the bot mode: one root message per run,
//! found again rather than posted twice. The root's `ts` lives in a
//! [`ThreadBook`]; a note (`pending:<unix seconds>`) saved before posting
//! and the root's message metadata let a later attempt, or a restart after a
//! crash, find a root Slack posted without runhook learning its `ts`
//! (`conversations.history`), and a root that could not be saved is kept in
//! memory ([`SlackSink`]'s `roots`) until it is.

use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::api::retry;
use super::{Event, Outcome, SlackSink, message};
use crate::config::Secret;

/// A saved thread whose `ts` starts with this is the note written before a
/// root was posted (`pending:<unix seconds>`): a root may be out there.
const ROOT_PENDING: &str = "pending:";
/// The metadata event type on root messages, to find them again.
const ROOT_METADATA: &str = "runhook_thread_root";
/// How far `conversations.history` is searched for a root: pages of 200.
const HISTORY_PAGES: usize = 10;

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

    /// Whether this process may still send for the run, asked right before
    /// each Slack call (after the rate limit's wait, which can be long): a
    /// process that lost the run meanwhile (paused past its lease) must not
    /// post a second root, nor repeat a reply the run's new owner sends.
    fn may_send(&self, run_id: &str) -> bool;

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
    /// The run's thread root, posted on its first event. Posted at most once
    /// per run: when the saved thread cannot be read, or the new root cannot
    /// be saved, this is a retry, and the next attempt uses the root already
    /// posted; a root posted but never confirmed is looked up before posting.
    pub(super) async fn thread_root(
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
                event.run_id,
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
            let answer = match self
                .call_form(token, event.run_id, "conversations.history", &form)
                .await
            {
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
}
