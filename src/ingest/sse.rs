//! The live stream (session cookie). Each connection opens with `since` =
//! the stored cursor; runhook reconnects itself, with backoff and jitter,
//! after a drop, an in-band error frame, or a stream silent for
//! `stream_idle_timeout` (heartbeats count). A frame that cannot be parsed,
//! or a `run_finished` past the cursor, drops the stream: runhook catches up
//! from the cursor (by polling when a token is configured) and records
//! `run_finished` only once the cursor reached the run's last sequence.
//!
//! Here: the reconnect loop and what it does between connections;
//! `sse/connection.rs`: one connection and its frames.

mod connection;

use std::ops::ControlFlow;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::poll::Polled;
use super::{Following, Ingest, Leg, NotFoundConfirm, Trouble, reconnect_backoff, sleep_or_cancel};
use crate::config::Transport;
use crate::store::{Fence, RunState, StateError};
use crate::upstream::ErrorClass;
use connection::Connection;

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
    ) -> Result<Leg, StateError> {
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
                    self.note_cookie_refused(&following.fence, &run_id, why)
                        .await?;
                    auth_backoff.next().unwrap_or(Duration::from_secs(300))
                }
                Connection::NotFound(why) => {
                    let next = self
                        .stream_not_found(
                            &following.fence,
                            &run_id,
                            why,
                            &mut not_found,
                            &mut trouble,
                            &mut backoff,
                        )
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
    async fn note_cookie_refused(
        &self,
        fence: &Fence,
        run_id: &str,
        why: String,
    ) -> Result<(), StateError> {
        tracing::warn!(run_id = %run_id, %why, "the stream refused the session cookie; retrying slowly");
        self.store
            .set_run_state(
                fence,
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
    ) -> Result<(), StateError> {
        let run_id = &following.run.run_id;
        tracing::warn!(run_id = %run_id, %reason, cursor = following.cursor, ?wait, "stream dropped; reconnecting from the cursor");
        self.store
            .set_run_state(
                &following.fence,
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
    ) -> Result<AfterCatchUp, StateError> {
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
        trouble
            .enter(&self.store, &following.fence, run_id, state, why)
            .await?;
        Ok(AfterCatchUp::Wait(wait.unwrap_or(Duration::from_secs(60))))
    }

    /// The stream answered 404 or 405: a run lookup tells whether the run
    /// is gone (confirmed over `not_found_confirm`, as when polling), is
    /// refused, or is there without a stream. `Continue` is the wait before
    /// the next connection.
    async fn stream_not_found(
        &self,
        fence: &Fence,
        run_id: &str,
        why: String,
        not_found: &mut NotFoundConfirm,
        trouble: &mut Trouble,
        backoff: &mut impl Iterator<Item = Duration>,
    ) -> Result<ControlFlow<Leg, Duration>, StateError> {
        Ok(ControlFlow::Continue(match self.client.run(run_id).await {
            // The run is there; its stream is not.
            Ok(_) => return Ok(ControlFlow::Break(Leg::StreamUnavailable(why))),
            Err(error) if error.class() == ErrorClass::Forbidden => {
                let leg = self
                    .refused(fence, run_id, RunState::Forbidden, error)
                    .await?;
                return Ok(ControlFlow::Break(leg));
            }
            Err(error) if error.class() == ErrorClass::NotFound => {
                let Some(wait) = not_found.next() else {
                    let leg = self
                        .refused(fence, run_id, RunState::NotFound, error)
                        .await?;
                    return Ok(ControlFlow::Break(leg));
                };
                let why = format!("{error} ({}); confirming", not_found.progress());
                trouble
                    .enter(&self.store, fence, run_id, RunState::Retrying, why)
                    .await?;
                wait
            }
            Err(error) => {
                let why = format!("stream {why}; run lookup: {error}");
                trouble
                    .enter(&self.store, fence, run_id, RunState::Reconnecting, why)
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
    ) -> Result<CaughtUp, StateError> {
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
}
