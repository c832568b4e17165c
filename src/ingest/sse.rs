//! The live stream (session cookie). Each connection opens with `since` =
//! the stored cursor; runhook reconnects itself, with backoff and jitter,
//! after a drop, an in-band error frame, or a stream silent for
//! `stream_idle_timeout` (heartbeats count). A frame that cannot be parsed,
//! or a `run_finished` past the cursor, drops the stream: runhook catches up
//! from the cursor (by polling when a token is configured) and records
//! `run_finished` only once the cursor reached the run's last sequence.

use std::ops::ControlFlow;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::poll::Polled;
use super::{Following, Ingest, Leg, NotFoundConfirm, Trouble, reconnect_backoff, sleep_or_cancel};
use crate::config::Transport;
use crate::http::{read_capped, retry_after, snippet};
use crate::store::{RunState, StoreError};
use crate::upstream::ErrorClass;
use crate::upstream::frame::{self, Finished, Frame};
use crate::upstream::stream::{EventSource, StreamError as SseError, StreamEvent as SseEvent};
use crate::upstream::types::{error_message, is_final};

/// How one connection ended.
enum Connection {
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

/// How a catch-up by polling (after a bad frame or a short finish) ended.
enum CaughtUp {
    /// Polled until idle; `progressed` when the cursor moved.
    Done {
        progressed: bool,
    },
    Finished(String),
    Stopped,
    /// Polling cannot get past the cursor either: this state, this reason.
    Stuck(RunState, String),
}

/// What the reconnect loop does after a catch-up.
enum AfterCatchUp {
    /// The run finished, or following was stopped, while catching up.
    Leg(Leg),
    /// The cursor moved: reconnect at once, with the backoffs reset.
    Reconnect,
    /// The cursor did not move, or polling is stuck too: wait this long.
    Wait(Duration),
}

impl Ingest {
    /// Follows the run by stream, reconnecting from the cursor, until it
    /// finishes, is stopped, or the stream cannot serve it (`Leg`).
    pub(super) async fn follow_sse(
        &self,
        following: &mut Following,
        cancel: &CancellationToken,
    ) -> Result<Leg, StoreError> {
        let run_id = following.run.run_id.clone();
        following.transport = Transport::Sse;
        let mut backoff = reconnect_backoff();
        let mut auth_backoff = self.auth_backoff();
        let mut slow = self.auth_backoff();
        let mut trouble = Trouble::default();
        let mut not_found = NotFoundConfirm::new(self.not_found_confirm);
        loop {
            let wait = match self.connection(following, cancel, &mut not_found).await? {
                Connection::Finished(status) => return Ok(Leg::Finished(status)),
                Connection::Stopped => return Ok(Leg::Stopped),
                Connection::Refused(why) if self.client.has_token() => {
                    return Ok(Leg::StreamRefused(why));
                }
                Connection::Refused(why) => {
                    self.note_cookie_refused(&run_id, why).await?;
                    auth_backoff.next().unwrap_or(Duration::from_secs(300))
                }
                Connection::NotFound(why) => {
                    let next = self
                        .stream_not_found(&run_id, why, &mut not_found, &mut trouble, &mut backoff)
                        .await?;
                    match next {
                        ControlFlow::Break(leg) => return Ok(leg),
                        ControlFlow::Continue(wait) => wait,
                    }
                }
                Connection::Behind {
                    reason: why,
                    progressed,
                } => {
                    if progressed {
                        backoff = reconnect_backoff();
                    }
                    let next = self
                        .stream_behind(
                            following,
                            cancel,
                            why,
                            &mut trouble,
                            &mut backoff,
                            &mut slow,
                        )
                        .await?;
                    match next {
                        AfterCatchUp::Leg(leg) => return Ok(leg),
                        AfterCatchUp::Reconnect => {
                            (backoff, slow) = (reconnect_backoff(), self.auth_backoff());
                            trouble.clear(&run_id);
                            continue;
                        }
                        AfterCatchUp::Wait(wait) => wait,
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
                    self.note_dropped(following, reason, wait).await?;
                    wait
                }
            };
            if sleep_or_cancel(wait, cancel).await {
                return Ok(Leg::Stopped);
            }
        }
    }

    /// Without a token to fall back on, a refused cookie is retried slowly;
    /// the run shows `auth_failed` meanwhile.
    async fn note_cookie_refused(&self, run_id: &str, why: String) -> Result<(), StoreError> {
        tracing::warn!(run_id = %run_id, %why, "the stream refused the session cookie; retrying slowly");
        self.store
            .set_run_state(
                run_id.to_owned(),
                RunState::AuthFailed,
                Some(format!("stream refused: {why}")),
                None,
            )
            .await
    }

    /// The run shows `reconnecting` until the stream is back.
    async fn note_dropped(
        &self,
        following: &Following,
        reason: String,
        wait: Duration,
    ) -> Result<(), StoreError> {
        let run_id = &following.run.run_id;
        tracing::warn!(run_id = %run_id, %reason, cursor = following.cursor, ?wait, "stream dropped; reconnecting from the cursor");
        self.store
            .set_run_state(
                run_id.clone(),
                RunState::Reconnecting,
                Some(reason),
                Some(Transport::Sse),
            )
            .await
    }

    /// The stream fell behind the cursor (`Connection::Behind`): catch up by
    /// polling, then tell the reconnect loop what next. The stream is dropped
    /// and opened again, whatever the catch-up brings.
    async fn stream_behind(
        &self,
        following: &mut Following,
        cancel: &CancellationToken,
        why: String,
        trouble: &mut Trouble,
        backoff: &mut impl Iterator<Item = Duration>,
        slow: &mut impl Iterator<Item = Duration>,
    ) -> Result<AfterCatchUp, StoreError> {
        crate::metrics::metrics().stream_reconnects.inc();
        // Polling takes the session cookie as well as the token.
        following.transport = Transport::Poll;
        let caught_up = self.catch_up(following, cancel).await?;
        following.transport = Transport::Sse;
        let (state, why, wait) = match caught_up {
            CaughtUp::Finished(status) => return Ok(AfterCatchUp::Leg(Leg::Finished(status))),
            CaughtUp::Stopped => return Ok(AfterCatchUp::Leg(Leg::Stopped)),
            CaughtUp::Done { progressed: true } => return Ok(AfterCatchUp::Reconnect),
            CaughtUp::Done { progressed: false } => (RunState::CatchingUp, why, backoff.next()),
            CaughtUp::Stuck(state, stuck) => {
                (state, format!("{why}; polling: {stuck}"), slow.next())
            }
        };
        let run_id = &following.run.run_id;
        trouble.enter(&self.store, run_id, state, why).await?;
        Ok(AfterCatchUp::Wait(wait.unwrap_or(Duration::from_secs(60))))
    }

    /// The stream answered 404 or 405: a run lookup tells whether the run
    /// is gone (confirmed over `not_found_confirm`, as when polling), is
    /// refused, or is there without a stream. `Continue` is the wait before
    /// the next connection.
    async fn stream_not_found(
        &self,
        run_id: &str,
        why: String,
        not_found: &mut NotFoundConfirm,
        trouble: &mut Trouble,
        backoff: &mut impl Iterator<Item = Duration>,
    ) -> Result<ControlFlow<Leg, Duration>, StoreError> {
        Ok(ControlFlow::Continue(match self.client.run(run_id).await {
            // The run is there; its stream is not.
            Ok(_) => return Ok(ControlFlow::Break(Leg::StreamUnavailable(why))),
            Err(error) if error.class() == ErrorClass::Forbidden => {
                let leg = self.refused(run_id, RunState::Forbidden, error).await?;
                return Ok(ControlFlow::Break(leg));
            }
            Err(error) if error.class() == ErrorClass::NotFound => {
                let Some(wait) = not_found.next() else {
                    let leg = self.refused(run_id, RunState::NotFound, error).await?;
                    return Ok(ControlFlow::Break(leg));
                };
                let why = format!("{error} ({}); confirming", not_found.progress());
                trouble
                    .enter(&self.store, run_id, RunState::Retrying, why)
                    .await?;
                wait
            }
            Err(error) => {
                let why = format!("stream {why}; run lookup: {error}");
                trouble
                    .enter(&self.store, run_id, RunState::Reconnecting, why)
                    .await?;
                backoff.next().unwrap_or(Duration::from_secs(60))
            }
        }))
    }

    /// Polls from the cursor until a page brings nothing new (or the run
    /// finishes, or polling is stuck too).
    async fn catch_up(
        &self,
        following: &mut Following,
        cancel: &CancellationToken,
    ) -> Result<CaughtUp, StoreError> {
        let from = following.cursor;
        loop {
            return Ok(match self.poll_once(following, cancel).await? {
                Polled::Progressed => continue,
                Polled::Idle => CaughtUp::Done {
                    progressed: following.cursor > from,
                },
                Polled::Finished(status) => CaughtUp::Finished(status),
                Polled::Stopped => CaughtUp::Stopped,
                Polled::Short(why) => CaughtUp::Stuck(RunState::CatchingUp, why),
                Polled::Stalled(why) => CaughtUp::Stuck(RunState::Stalled, why),
                Polled::Refused(error) => CaughtUp::Stuck(RunState::CatchingUp, error.to_string()),
            });
        }
    }

    /// One connection from the cursor, until it ends or `cancel`.
    async fn connection(
        &self,
        following: &mut Following,
        cancel: &CancellationToken,
        not_found: &mut NotFoundConfirm,
    ) -> Result<Connection, StoreError> {
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
    ) -> Result<Option<Connection>, StoreError> {
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
    ) -> Result<Connection, StoreError> {
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
