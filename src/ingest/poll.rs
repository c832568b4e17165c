//! Polling (any credential): `events?since=<cursor>` again at once while
//! answers carry new events, `poll_interval` when idle; the run ends when an
//! answer has no new events and a final `runStatus`.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::SemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::{Following, Ingest, Leg, new_events, sleep_or_cancel};
use crate::store::StoreError;
use crate::upstream::types::is_final;
use crate::upstream::{ErrorClass, EventsPage, UpstreamError};

impl Ingest {
    pub(super) async fn follow_poll(
        &self,
        following: &mut Following,
        cancel: &CancellationToken,
    ) -> Result<Leg, StoreError> {
        let run_id = following.run.run_id.clone();
        following.transport = "poll";
        self.store
            .set_run_state(run_id.clone(), "following", None, Some("poll"))
            .await?;
        let mut auth_backoff = self.auth_backoff();
        loop {
            // The page permit is held until the page is recorded.
            let (page, _page_permit) = tokio::select! {
                fetched = self.fetch(&run_id, following.cursor) => fetched,
                _ = cancel.cancelled() => return Ok(Leg::Stopped),
            };
            let page = match page {
                Ok(page) => page,
                Err(error) if error.class() == ErrorClass::AuthFailed => {
                    tracing::warn!(run_id = %run_id, %error, "upstream refused the credential; retrying slowly");
                    self.store
                        .set_run_state(run_id.clone(), "auth_failed", Some(error.to_string()), None)
                        .await?;
                    let wait = auth_backoff.next().unwrap_or(Duration::from_secs(300));
                    if sleep_or_cancel(wait, cancel).await {
                        return Ok(Leg::Stopped);
                    }
                    continue;
                }
                Err(error) => {
                    let state = match error.class() {
                        ErrorClass::Forbidden => "forbidden",
                        _ => "not_found",
                    };
                    tracing::error!(run_id = %run_id, %error, "run cannot be followed; stopped");
                    self.store
                        .set_run_state(run_id.clone(), state, Some(error.to_string()), None)
                        .await?;
                    return Ok(Leg::Refused);
                }
            };
            auth_backoff = self.auth_backoff();
            following.status = page.run_status.clone().or(following.status.take());
            following.phase = page.current_phase.clone().or(following.phase.take());
            let events = new_events(page.events, following.cursor);
            let idle = events.is_empty();
            let finish = match page.run_status.as_deref() {
                Some(status) if idle && is_final(status) => {
                    Some(self.finish(following, status, None, None).await)
                }
                _ => None,
            };
            let finished = finish.as_ref().map(|f| f.status.clone());
            self.record(following, events, finish).await?;
            if let Some(status) = finished {
                tracing::info!(run_id = %run_id, cursor = following.cursor, %status, "run finished");
                return Ok(Leg::Finished(status));
            }
            self.refresh_lag(following).await?;
            if idle && sleep_or_cancel(self.poll_interval, cancel).await {
                return Ok(Leg::Stopped);
            }
        }
    }

    /// One poll, retried with backoff and jitter through transient errors,
    /// honouring `Retry-After`. Each attempt holds one of `PAGES_IN_FLIGHT`
    /// permits, returned with the page so that it is kept until the page is
    /// recorded: however many runs poll, only so many pages sit in memory.
    /// Waiting out a backoff holds none.
    async fn fetch(
        &self,
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
                .set_run_state(run_id.to_owned(), "retrying", Some(error.to_string()), None)
                .await
                .ok();
            tokio::time::sleep(wait).await;
        }
    }

    /// Polls from the cursor until an answer brings nothing new, recording
    /// what it brings: how a stream gets past an event it cannot carry (over
    /// its size cap, or not UTF-8). The run's end is left to the stream.
    /// True when cancelled.
    pub(super) async fn catch_up(
        &self,
        following: &mut Following,
        cancel: &CancellationToken,
    ) -> Result<bool, StoreError> {
        let run_id = following.run.run_id.clone();
        loop {
            let (page, _page_permit) = tokio::select! {
                fetched = self.fetch(&run_id, following.cursor) => fetched,
                _ = cancel.cancelled() => return Ok(true),
            };
            let page = match page {
                Ok(page) => page,
                Err(error) => {
                    tracing::warn!(run_id = %run_id, %error, "catching up by polling failed; back to the stream");
                    return Ok(false);
                }
            };
            let events = new_events(page.events, following.cursor);
            if events.is_empty() {
                return Ok(false);
            }
            following.status = page.run_status.or(following.status.take());
            following.phase = page.current_phase.or(following.phase.take());
            self.record(following, events, None).await?;
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
