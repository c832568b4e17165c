//! One connection of the live stream, from the cursor until it ends: the
//! frames it brings (events recorded as they come, heartbeats, the finish
//! checked against the cursor) and how it ended, as a [`Connection`] the
//! reconnect loop in `sse.rs` acts on.

use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::super::{Following, Ingest, NotFoundConfirm};
use crate::config::Transport;
use crate::http::{read_capped, retry_after, snippet};
use crate::store::{RunState, StateError};
use crate::upstream::frame::{self, Finished, Frame};
use crate::upstream::stream::{EventSource, StreamError as SseError, StreamEvent as SseEvent};
use crate::upstream::types::{error_message, is_final};

/// How one connection ended.
pub(super) enum Connection {
    Finished(String),
    Stopped,
    /// 401/403 on connect.
    Refused(String),
    /// 404 or 405 on connect.
    NotFound(String),
    /// A frame that cannot be parsed or held (over the size cap, not
    /// UTF-8), or a finish past the cursor: catch up from the cursor before
    /// anything else.
    Behind {
        reason: String,
        progressed: bool,
    },
    /// Reconnect from the cursor.
    Dropped {
        reason: String,
        retry_after: Option<Duration>,
        progressed: bool,
    },
}

impl Ingest {
    /// One connection from the cursor, until it ends or `cancel`.
    pub(super) async fn connection(
        &self,
        following: &mut Following,
        cancel: &CancellationToken,
        not_found: &mut NotFoundConfirm,
    ) -> Result<Connection, StateError> {
        let run_id = following.run.run_id.clone();
        let Some(mut source) = self.client.open_stream(&run_id, following.cursor) else {
            return Ok(Connection::Refused("no session cookie configured".into()));
        };
        // `max_concurrency` bounds connects, not open streams.
        let mut permit = self.client.permit().await;
        let mut progressed = false;
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
                    not_found.reset();
                    crate::metrics::metrics().upstream_answer(Some(200));
                    self.store
                        .set_run_state(
                            &following.fence,
                            run_id.clone(),
                            RunState::Following,
                            None,
                            Some(Transport::Sse),
                        )
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
                    // Skipping it would let the next event move the cursor
                    // past whatever it carried.
                    source.close();
                    return Ok(Connection::Behind {
                        reason: error.to_string(),
                        progressed,
                    });
                }
            };
            if let Some(end) = self
                .on_frame(following, &mut source, frame, &mut progressed)
                .await?
            {
                return Ok(end);
            }
        }
    }

    /// Records what a frame brings; `Some` when it ends the connection.
    async fn on_frame(
        &self,
        following: &mut Following,
        source: &mut EventSource,
        frame: Frame,
        progressed: &mut bool,
    ) -> Result<Option<Connection>, StateError> {
        let run_id = &following.run.run_id;
        match frame {
            Frame::RunEvent(event) if event.sequence <= following.cursor => {
                tracing::debug!(run_id = %run_id, sequence = event.sequence, "dropped an event at or below the cursor");
            }
            Frame::RunEvent(event) => {
                self.record(following, vec![event], None).await?;
                *progressed = true;
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
                let end = self
                    .on_finished(following, source, finished, *progressed)
                    .await?;
                return Ok(Some(end));
            }
            Frame::Error(error) => {
                source.close();
                return Ok(Some(dropped(format!("error frame: {error}"), *progressed)));
            }
            Frame::Connected => {}
            Frame::Unknown(kind) => {
                tracing::debug!(run_id = %run_id, %kind, "ignoring an unknown stream frame type");
            }
        }
        Ok(None)
    }

    /// A `run_finished` frame: recorded only once the cursor reached the
    /// run's last sequence; otherwise the connection ends `Behind`.
    async fn on_finished(
        &self,
        following: &mut Following,
        source: &mut EventSource,
        finished: Finished,
        progressed: bool,
    ) -> Result<Connection, StateError> {
        let run_id = following.run.run_id.clone();
        // The guides do not name the frame's fields: what it leaves out (or a
        // status that is not final), the run lookup tells.
        let status = finished.status.filter(|s| is_final(s));
        let looked_up = match (&status, finished.last_sequence) {
            (Some(_), Some(_)) => None,
            _ => match self.client.run(&run_id).await {
                Ok(info) => Some(info),
                Err(error) => {
                    source.close();
                    let reason = format!(
                        "run_finished without status or lastSequence, and the run lookup failed: {error}"
                    );
                    return Ok(dropped(reason, progressed));
                }
            },
        };
        let last = finished
            .last_sequence
            .or(looked_up.as_ref().map(|info| info.last_event_sequence))
            .unwrap_or_default();
        if last > following.cursor {
            source.close();
            return Ok(Connection::Behind {
                reason: format!(
                    "run_finished says lastSequence {last} but the cursor is {}",
                    following.cursor
                ),
                progressed,
            });
        }
        let (mut error_message, mut cancel_reason) =
            (finished.error_message, finished.cancel_reason);
        let status = match (status, looked_up) {
            (Some(status), _) => status,
            (None, Some(info)) if is_final(&info.status) => {
                error_message = error_message.or(info.error_message);
                cancel_reason = cancel_reason.or(info.cancel_reason);
                info.status
            }
            (None, info) => {
                source.close();
                let status = info.map_or_else(String::new, |info| info.status);
                let reason =
                    format!("run_finished, but the run's status is {status:?}: reconnecting");
                return Ok(dropped(reason, progressed));
            }
        };
        following.status = Some(status.clone());
        let finish = self
            .finish(following, &status, error_message, cancel_reason)
            .await;
        self.record(following, Vec::new(), Some(finish)).await?;
        source.close();
        tracing::info!(run_id = %run_id, cursor = following.cursor, %status, "run finished");
        Ok(Connection::Finished(status))
    }
}

/// Reconnect from the cursor.
fn dropped(reason: String, progressed: bool) -> Connection {
    Connection::Dropped {
        reason,
        retry_after: None,
        progressed,
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
                404 | 405 => Connection::NotFound(format!("upstream answered {why}")),
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
        // Over the size cap, or not UTF-8: reconnecting would meet it again.
        other if other.is_undecodable() => Connection::Behind {
            reason: other.to_string(),
            progressed,
        },
        other => Connection::Dropped {
            reason: other.to_string(),
            retry_after: None,
            progressed,
        },
    }
}
