//! Polling (any credential): `events?since=<cursor>` again at once while
//! answers carry new events, `poll_interval` when idle. The run ends when an
//! answer has no new events, a final `runStatus`, and a run lookup shows the
//! cursor at the run's `lastEventSequence` (README.md, guarantee 8). A page
//! with an undecodable event records the good events before it and leaves
//! the run `stalled`, retried slowly, until upstream serves a good page.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::SemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::{Following, Ingest, Leg, NotFoundConfirm, Trouble, new_events, sleep_or_cancel};
use crate::config::Transport;
use crate::store::{Fence, Finish, RunState, StateError};
use crate::upstream::types::is_final;
use crate::upstream::{ErrorClass, EventsPage, UpstreamError};

/// What one poll did.
pub(super) enum Polled {
    /// New events recorded: ask again at once.
    Progressed,
    /// Nothing new; the run goes on.
    Idle,
    /// `run_finished` recorded with this status.
    Finished(String),
    /// A final status, but the cursor is short of `lastEventSequence` (or
    /// that could not be checked): keep polling from the cursor.
    Short(String),
    /// An event that cannot be decoded; the good ones before it are recorded.
    Stalled(String),
    /// 401, 403 or 404 (transient errors are retried inside the poll).
    Refused(UpstreamError),
    Stopped,
}

impl Ingest {
    pub(super) async fn follow_poll(
        &self,
        following: &mut Following,
        cancel: &CancellationToken,
    ) -> Result<Leg, StateError> {
        let run_id = following.run.run_id.clone();
        following.transport = Transport::Poll;
        self.store
            .set_run_state(
                &following.fence,
                run_id.clone(),
                RunState::Following,
                None,
                Some(Transport::Poll),
            )
            .await?;
        let mut slow = self.auth_backoff();
        let mut trouble = Trouble::default();
        let mut not_found = NotFoundConfirm::new(self.not_found_confirm);
        loop {
            let polled = self.poll_once(following, cancel).await?;
            let (state, why, wait) = match polled {
                Polled::Stopped => return Ok(Leg::Stopped),
                Polled::Finished(status) => return Ok(Leg::Finished(status)),
                Polled::Progressed | Polled::Idle => {
                    slow = self.auth_backoff();
                    not_found.reset();
                    trouble.clear(&run_id);
                    self.refresh_lag(following).await?;
                    let idle = matches!(polled, Polled::Idle);
                    if idle && sleep_or_cancel(self.poll_interval, cancel).await {
                        return Ok(Leg::Stopped);
                    }
                    continue;
                }
                Polled::Short(why) => (RunState::CatchingUp, why, slow.next()),
                Polled::Stalled(why) => (RunState::Stalled, why, slow.next()),
                Polled::Refused(error) => match error.class() {
                    ErrorClass::AuthFailed => {
                        (RunState::AuthFailed, error.to_string(), slow.next())
                    }
                    ErrorClass::NotFound => match not_found.next() {
                        Some(wait) => {
                            let why = format!("{error} ({}); confirming", not_found.progress());
                            (RunState::Retrying, why, Some(wait))
                        }
                        None => {
                            return self
                                .refused(&following.fence, &run_id, RunState::NotFound, error)
                                .await;
                        }
                    },
                    _ => {
                        return self
                            .refused(&following.fence, &run_id, RunState::Forbidden, error)
                            .await;
                    }
                },
            };
            if state != RunState::Retrying {
                not_found.reset();
            }
            trouble
                .enter(&self.store, &following.fence, &run_id, state, why)
                .await?;
            let wait = wait.unwrap_or(Duration::from_secs(300));
            if sleep_or_cancel(wait, cancel).await {
                return Ok(Leg::Stopped);
            }
        }
    }

    /// Stops a run the upstream will not serve (403, or a confirmed 404).
    pub(super) async fn refused(
        &self,
        fence: &Fence,
        run_id: &str,
        state: RunState,
        error: UpstreamError,
    ) -> Result<Leg, StateError> {
        tracing::error!(run_id = %run_id, %error, %state, "run cannot be followed; stopped");
        self.store
            .set_run_state(
                fence,
                run_id.to_owned(),
                state,
                Some(error.to_string()),
                None,
            )
            .await?;
        Ok(Leg::Refused)
    }

    /// One page: fetch it, record what it holds, perhaps finish the run.
    pub(super) async fn poll_once(
        &self,
        following: &mut Following,
        cancel: &CancellationToken,
    ) -> Result<Polled, StateError> {
        // The page permit is held until the page is recorded.
        let (page, _page_permit) = tokio::select! {
            fetched = self.fetch(&following.fence, &following.run.run_id, following.cursor) => fetched,
            _ = cancel.cancelled() => return Ok(Polled::Stopped),
        };
        let page = match page {
            Ok(page) => page,
            Err(error) => return Ok(Polled::Refused(error)),
        };
        following.status = page.run_status.clone().or(following.status.take());
        following.phase = page.current_phase.clone().or(following.phase.take());
        let events = new_events(page.events, following.cursor);
        let progressed = !events.is_empty();
        if let Some(why) = page.undecodable {
            self.record_then(following, events, None, Some(why.clone()))
                .await?;
            return Ok(Polled::Stalled(why));
        }
        let finish = match page.run_status.as_deref() {
            Some(status) if !progressed && is_final(status) => {
                match self.confirmed_finish(following, status).await {
                    Ok(finish) => Some(finish),
                    Err(why) => return Ok(Polled::Short(why)),
                }
            }
            _ => None,
        };
        let finished = finish.as_ref().map(|f| f.status.clone());
        self.record(following, events, finish).await?;
        Ok(match finished {
            Some(status) => {
                tracing::info!(run_id = %following.run.run_id, cursor = following.cursor, %status, "run finished");
                Polled::Finished(status)
            }
            None if progressed => Polled::Progressed,
            None => Polled::Idle,
        })
    }

    /// The `run_finished` for a final poll status, once a run lookup shows
    /// the cursor at (or past) `lastEventSequence`; otherwise why not.
    /// Sequences may have gaps, so the cursor is compared, not a count.
    async fn confirmed_finish(
        &self,
        following: &Following,
        status: &str,
    ) -> Result<Finish, String> {
        let run_id = &following.run.run_id;
        let info = self.client.run(run_id).await.map_err(|error| {
            format!("{status}, but the run lookup that checks for missing events failed: {error}")
        })?;
        if info.last_event_sequence > following.cursor {
            return Err(format!(
                "{status} with lastEventSequence {} but the cursor is {}: catching up from the cursor",
                info.last_event_sequence, following.cursor
            ));
        }
        Ok(self.finish_as(following, status, info.error_message, info.cancel_reason))
    }

    /// One poll, retried with backoff and jitter through transient errors,
    /// honouring `Retry-After`. Each attempt holds one of `PAGES_IN_FLIGHT`
    /// permits, returned with the page so that it is kept until the page is
    /// recorded: however many runs poll, only so many pages sit in memory.
    /// Waiting out a backoff holds none.
    async fn fetch(
        &self,
        fence: &Fence,
        run_id: &str,
        since: i64,
    ) -> (
        Result<EventsPage, UpstreamError>,
        Option<SemaphorePermit<'_>>,
    ) {
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(60))
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            let permit = self.pages.acquire().await.ok();
            let error = match self.client.events(run_id, since).await {
                Err(error)
                    if matches!(error.class(), ErrorClass::Transient | ErrorClass::TooLarge) =>
                {
                    error
                }
                answer => return (answer, permit),
            };
            drop(permit);
            // A server's Retry-After, bounded, if longer than the backoff.
            let wait = crate::http::upstream_wait(error.retry_after(), backoff.next());
            tracing::warn!(run_id = %run_id, %error, ?wait, "poll failed; backing off");
            self.store
                .set_run_state(
                    fence,
                    run_id.to_owned(),
                    RunState::Retrying,
                    Some(error.to_string()),
                    None,
                )
                .await
                .ok();
            tokio::time::sleep(wait).await;
        }
    }

    pub(super) fn auth_backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        ExponentialBuilder::default()
            .with_min_delay(self.poll_interval.max(Duration::from_millis(100)))
            .with_max_delay(Duration::from_secs(300))
            .with_jitter()
            .without_max_times()
            .build()
    }
}
