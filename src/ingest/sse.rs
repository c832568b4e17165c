//! The live stream (session cookie). Each connection opens with `since` =
//! the stored cursor; runhook reconnects itself, with backoff and jitter,
//! after a drop, an in-band error frame, or a stream silent for
//! `stream_idle_timeout` (heartbeats count).

use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{Following, Ingest, Leg, reconnect_backoff, sleep_or_cancel};
use crate::http::{read_capped, retry_after, snippet};
use crate::store::StoreError;
use crate::upstream::frame::{self, Frame};
use crate::upstream::stream::{StreamError as SseError, StreamEvent as SseEvent};
use crate::upstream::types::error_message;

/// How one connection ended.
enum Connection {
    Finished(String),
    Stopped,
    /// 401/403 on connect.
    Refused(String),
    /// 404 on connect.
    NotFound(String),
    /// The stream carried an event it cannot hold (over its size cap, not
    /// UTF-8): reconnecting would meet it again, so catch up by polling.
    Undecodable(String),
    /// Reconnect from the cursor.
    Dropped {
        reason: String,
        retry_after: Option<Duration>,
        progressed: bool,
    },
}

/// A `run_finished` announcing more than was received is not trusted at
/// once: reconnect from the cursor this many times first.
const FINISH_RECHECKS: u32 = 2;

impl Ingest {
    pub(super) async fn follow_sse(
        &self,
        following: &mut Following,
        cancel: &CancellationToken,
    ) -> Result<Leg, StoreError> {
        let run_id = following.run.run_id.clone();
        following.transport = "sse";
        let mut backoff = reconnect_backoff();
        let mut auth_backoff = self.auth_backoff();
        let mut rechecks = 0;
        loop {
            match self.connection(following, cancel, &mut rechecks).await? {
                Connection::Finished(status) => return Ok(Leg::Finished(status)),
                Connection::Stopped => return Ok(Leg::Stopped),
                Connection::Refused(why) if self.client.has_token() => {
                    return Ok(Leg::StreamRefused(why));
                }
                Connection::Refused(why) => {
                    tracing::warn!(run_id = %run_id, %why, "the stream refused the session cookie; retrying slowly");
                    self.store
                        .set_run_state(
                            run_id.clone(),
                            "auth_failed",
                            Some(format!("stream refused: {why}")),
                            None,
                        )
                        .await?;
                    let wait = auth_backoff.next().unwrap_or(Duration::from_secs(300));
                    if sleep_or_cancel(wait, cancel).await {
                        return Ok(Leg::Stopped);
                    }
                }
                Connection::NotFound(why) => {
                    tracing::error!(run_id = %run_id, %why, "run not found; stopped");
                    self.store
                        .set_run_state(run_id.clone(), "not_found", Some(why), None)
                        .await?;
                    return Ok(Leg::Refused);
                }
                Connection::Undecodable(reason) => {
                    crate::metrics::metrics().stream_reconnects.inc();
                    tracing::warn!(run_id = %run_id, %reason, cursor = following.cursor, "stream dropped; catching up by polling");
                    self.store
                        .set_run_state(run_id.clone(), "reconnecting", Some(reason), Some("sse"))
                        .await?;
                    let before = following.cursor;
                    if self.catch_up(following, cancel).await? {
                        return Ok(Leg::Stopped);
                    }
                    if following.cursor > before {
                        backoff = reconnect_backoff();
                    } else {
                        let wait = backoff.next().unwrap_or(Duration::from_secs(60));
                        if sleep_or_cancel(wait, cancel).await {
                            return Ok(Leg::Stopped);
                        }
                    }
                }
                Connection::Dropped {
                    reason,
                    retry_after,
                    progressed,
                } => {
                    crate::metrics::metrics().stream_reconnects.inc();
                    if progressed {
                        backoff = reconnect_backoff();
                    }
                    let wait = crate::http::upstream_wait(retry_after, backoff.next());
                    tracing::warn!(run_id = %run_id, %reason, cursor = following.cursor, ?wait, "stream dropped; reconnecting from the cursor");
                    self.store
                        .set_run_state(run_id.clone(), "reconnecting", Some(reason), Some("sse"))
                        .await?;
                    if sleep_or_cancel(wait, cancel).await {
                        return Ok(Leg::Stopped);
                    }
                }
            }
        }
    }

    async fn connection(
        &self,
        following: &mut Following,
        cancel: &CancellationToken,
        rechecks: &mut u32,
    ) -> Result<Connection, StoreError> {
        let run_id = following.run.run_id.clone();
        let Some(mut source) = self.client.open_stream(&run_id, following.cursor) else {
            return Ok(Connection::Refused("no session cookie configured".into()));
        };
        // `max_concurrency` bounds connects, not open streams.
        let mut permit = self.client.permit().await;
        let mut progressed = false;
        let dropped = |reason: String, progressed: bool| Connection::Dropped {
            reason,
            retry_after: None,
            progressed,
        };
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout(self.stream_idle_timeout, source.next()) => next,
                _ = cancel.cancelled() => {
                    source.close();
                    return Ok(Connection::Stopped);
                }
                // Not while holding the connect permit: the lookup needs
                // one too, and 64 tasks waiting on each other is a deadlock.
                _ = tokio::time::sleep_until(following.next_lag_at), if permit.is_none() => {
                    self.refresh_lag(following).await?;
                    continue;
                }
            };
            let message = match next {
                Err(_) => {
                    source.close();
                    let reason = format!("no frame for {:?}", self.stream_idle_timeout);
                    return Ok(dropped(reason, progressed));
                }
                Ok(None) => return Ok(dropped("stream closed".into(), progressed)),
                Ok(Some(Ok(SseEvent::Open))) => {
                    permit.take();
                    crate::metrics::metrics().upstream_answer(Some(200));
                    self.store
                        .set_run_state(run_id.clone(), "following", None, Some("sse"))
                        .await?;
                    continue;
                }
                Ok(Some(Ok(SseEvent::Message(message)))) => message,
                Ok(Some(Err(error))) => {
                    source.close();
                    return Ok(refused_or_dropped(error, progressed).await);
                }
            };
            let frame = match frame::parse(&message.data) {
                Ok(frame) => frame,
                Err(error) => {
                    // The cursor stays where it is: nothing was recorded.
                    tracing::warn!(run_id = %run_id, %error, "skipping an unparseable stream frame");
                    continue;
                }
            };
            match frame {
                Frame::RunEvent(event) if event.sequence <= following.cursor => {
                    tracing::debug!(run_id = %run_id, sequence = event.sequence, "dropped an event at or below the cursor");
                }
                Frame::RunEvent(event) => {
                    self.record(following, vec![event], None).await?;
                    progressed = true;
                }
                Frame::Status { status, phase } => {
                    let status = status.or(following.status.clone());
                    let phase = phase.or(following.phase.clone());
                    if status != following.status || phase != following.phase {
                        (following.status, following.phase) = (status, phase);
                        self.record(following, Vec::new(), None).await?;
                    }
                }
                Frame::Finished(finished) => {
                    if finished
                        .last_sequence
                        .is_some_and(|last| last > following.cursor)
                        && *rechecks < FINISH_RECHECKS
                    {
                        *rechecks += 1;
                        source.close();
                        let reason = format!(
                            "run_finished says lastSequence {:?} but the cursor is {}",
                            finished.last_sequence, following.cursor
                        );
                        return Ok(dropped(reason, progressed));
                    }
                    let status = finished
                        .status
                        .or(following.status.clone())
                        .unwrap_or_else(|| "completed".to_owned());
                    following.status = Some(status.clone());
                    let finish = self
                        .finish(
                            following,
                            &status,
                            finished.error_message,
                            finished.cancel_reason,
                        )
                        .await;
                    self.record(following, Vec::new(), Some(finish)).await?;
                    source.close();
                    tracing::info!(run_id = %run_id, cursor = following.cursor, %status, "run finished");
                    return Ok(Connection::Finished(status));
                }
                Frame::Error(error) => {
                    source.close();
                    return Ok(dropped(format!("error frame: {error}"), progressed));
                }
                Frame::Connected => {}
                Frame::Unknown(kind) => {
                    tracing::debug!(run_id = %run_id, %kind, "ignoring an unknown stream frame type");
                }
            }
        }
    }
}

/// A failed connect or a broken stream, sorted by what ingest does next.
async fn refused_or_dropped(error: SseError, progressed: bool) -> Connection {
    match error {
        SseError::InvalidStatusCode(status, response) => {
            crate::metrics::metrics().upstream_answer(Some(status.as_u16()));
            let wait = retry_after(response.headers());
            let body = read_capped(*response, 4096)
                .await
                .map(|(b, _)| b)
                .unwrap_or_default();
            let message = error_message(&body).unwrap_or_else(|| snippet(&body, 200));
            let why = format!("{}: {message}", status.as_u16());
            match status.as_u16() {
                401 | 403 => Connection::Refused(why),
                404 => Connection::NotFound(format!("upstream answered {why}")),
                _ => Connection::Dropped {
                    reason: format!("upstream answered {why}"),
                    retry_after: wait,
                    progressed,
                },
            }
        }
        SseError::InvalidContentType(value, response) => Connection::Dropped {
            reason: format!("not an event stream (content-type {value:?})"),
            retry_after: retry_after(response.headers()),
            progressed,
        },
        SseError::Transport(error) => Connection::Dropped {
            reason: error.without_url().to_string(),
            retry_after: None,
            progressed,
        },
        other if other.is_undecodable() => Connection::Undecodable(other.to_string()),
        other => Connection::Dropped {
            reason: other.to_string(),
            retry_after: None,
            progressed,
        },
    }
}
