//! One task per run: pick the transport, drive it, route what arrives, hand
//! batches to the store. The cursor only moves through
//! `State::record_batch`; a run task keeps a copy of what the store returned.
//! Every write of a run task carries the [`Fence`] it was started with.

mod poll;
mod sse;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

use crate::config::Transport;
use crate::route::{EventFacts, Router};
use crate::store::{
    Batch, Fence, Finish, NewEvent, Recorded, RunState, State, StateError, WatchedRun, now_ms,
};
use crate::upstream::types::{RunStatus, is_final};
use crate::upstream::{Client, Event};

/// Pages (fetched, not yet recorded) held at once over all polling runs:
/// bounds ingest memory whatever the number of runs. The single writer
/// records one page at a time, so more pages in hand than it can take in a
/// group only wait there: at 32, a backlog of pages of 5,000 events held
/// some 80 MB of them (scenario (e)'s peak); 8 keep the writer fed.
pub const PAGES_IN_FLIGHT: usize = 8;

/// How often a run's lag (`lastEventSequence - cursor`) is looked up.
const LAG_REFRESH: Duration = Duration::from_secs(300);

/// What every run task shares.
pub struct Ingest {
    pub client: Client,
    pub store: State,
    /// Swapped on reload: new routes apply to new events.
    pub router: std::sync::RwLock<Arc<Router>>,
    pub transport: Transport,
    pub poll_interval: Duration,
    pub stream_idle_timeout: Duration,
    pub finished_recheck: Duration,
    pub finished_linger: Duration,
    /// How long a 404 must last before the run is stopped as `not_found`.
    pub not_found_confirm: Duration,
    /// `PAGES_IN_FLIGHT` permits.
    pub pages: tokio::sync::Semaphore,
}

/// Why a run task ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RunEnd {
    Finished,
    Stopped,
    /// 403 or 404: the run cannot be followed with this credential.
    Refused,
}

/// How one transport's attempt at a run ended.
#[derive(Debug, PartialEq, Eq)]
enum Leg {
    /// `run_finished` recorded with this status.
    Finished(String),
    Stopped,
    Refused,
    /// The stream refused the cookie (401/403); polling may still work.
    StreamRefused(String),
    /// The stream endpoint answered 404/405 for a run that exists: poll it.
    StreamUnavailable(String),
}

/// A run being followed: its row and what ingest last recorded.
struct Following {
    run: WatchedRun,
    /// Proof that this task owns the run, for each of its writes.
    fence: Fence,
    /// Poll or SSE: the transport in use, for metrics.
    transport: Transport,
    cursor: i64,
    status: Option<String>,
    phase: Option<String>,
    next_lag_at: tokio::time::Instant,
}

impl Ingest {
    /// The routing table in force.
    pub fn router(&self) -> Arc<Router> {
        self.router
            .read()
            .map_or_else(|p| p.into_inner().clone(), |r| r.clone())
    }

    /// Replaces the routing table (SIGHUP).
    pub fn set_router(&self, router: Router) {
        let mut current = self.router.write().unwrap_or_else(|p| p.into_inner());
        *current = Arc::new(router);
    }

    /// Follows one run until it finishes (and, for a failed run, until
    /// `finished_linger` has passed without a retry), is refused, or `cancel`.
    /// `fence` is what the caller owns the run by, from where it started
    /// following it.
    pub async fn follow(
        &self,
        run: WatchedRun,
        fence: Fence,
        cancel: CancellationToken,
    ) -> Result<RunEnd, StateError> {
        let mut following = Following {
            fence,
            transport: Transport::Poll,
            cursor: run.cursor,
            status: run.run_status.clone(),
            phase: None,
            // The first lookup soon after start; then every LAG_REFRESH.
            next_lag_at: tokio::time::Instant::now(),
            run,
        };
        let mut transport = self.transport_for(&following.run);
        if following.run.state == RunState::Finished {
            if !self.lingering(&following) {
                return Ok(RunEnd::Finished);
            }
            if !self.linger(&mut following, &cancel).await? {
                return Ok(RunEnd::Finished);
            }
        }
        loop {
            let leg = match transport {
                Transport::Sse => self.follow_sse(&mut following, &cancel).await?,
                _ => self.follow_poll(&mut following, &cancel).await?,
            };
            match leg {
                Leg::StreamRefused(why) => {
                    tracing::warn!(run_id = %following.run.run_id, %why, "the stream refused the session cookie; falling back to polling with the token");
                    let note = format!("stream refused ({why}); polling instead");
                    transport = self.poll_instead(&following, note).await?;
                }
                Leg::StreamUnavailable(why) => {
                    tracing::warn!(run_id = %following.run.run_id, %why, "the run exists but its stream does not answer; falling back to polling");
                    let note = format!("no stream ({why}); polling instead");
                    transport = self.poll_instead(&following, note).await?;
                }
                Leg::Finished(status) if RunStatus::Failed.is(&status) => {
                    if !self.linger(&mut following, &cancel).await? {
                        return Ok(RunEnd::Finished);
                    }
                }
                Leg::Finished(_) => return Ok(RunEnd::Finished),
                Leg::Stopped => return Ok(RunEnd::Stopped),
                Leg::Refused => return Ok(RunEnd::Refused),
            }
        }
    }

    /// The stream cannot serve this run: say why in `status`, and poll.
    async fn poll_instead(
        &self,
        following: &Following,
        note: String,
    ) -> Result<Transport, StateError> {
        self.store
            .set_run_state(
                &following.fence,
                following.run.run_id.clone(),
                RunState::Following,
                Some(note),
                Some(Transport::Poll),
            )
            .await?;
        Ok(Transport::Poll)
    }

    /// `auto`: the stream when a session cookie is configured.
    fn transport_for(&self, run: &WatchedRun) -> Transport {
        let asked = match run.transport {
            Some(Transport::Auto) | None => self.transport,
            Some(asked) => asked,
        };
        match asked {
            Transport::Auto if self.client.has_cookie() => Transport::Sse,
            Transport::Auto => Transport::Poll,
            Transport::Sse if !self.client.has_cookie() => Transport::Poll,
            other => other,
        }
    }

    /// A failed run is watched for `finished_linger` after it finished: it
    /// may be retried upstream.
    fn lingering(&self, following: &Following) -> bool {
        following
            .run
            .run_status
            .as_deref()
            .is_some_and(|s| RunStatus::Failed.is(s))
            && following
                .run
                .finished_at
                .is_some_and(|at| now_ms() - at < self.finished_linger.as_millis() as i64)
    }

    /// Looks at a failed run every `finished_recheck`; true when it runs
    /// again (or has events past the cursor), false once the linger is over.
    async fn linger(
        &self,
        following: &mut Following,
        cancel: &CancellationToken,
    ) -> Result<bool, StateError> {
        let run_id = following.run.run_id.clone();
        let finished_at = following.run.finished_at.unwrap_or_else(now_ms);
        let until = finished_at + self.finished_linger.as_millis() as i64;
        self.store
            .set_run_state(
                &following.fence,
                run_id.clone(),
                RunState::Finished,
                None,
                None,
            )
            .await?;
        while now_ms() < until {
            let wait = self
                .finished_recheck
                .min(Duration::from_millis((until - now_ms()).max(0) as u64));
            if sleep_or_cancel(wait, cancel).await {
                return Ok(false);
            }
            match self.client.run(&run_id).await {
                Ok(info)
                    if !is_final(&info.status) || info.last_event_sequence > following.cursor =>
                {
                    tracing::info!(run_id = %run_id, status = %info.status, "a finished run runs again; resuming");
                    following.status = Some(info.status);
                    following.run.finished_at = None;
                    return Ok(true);
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(run_id = %run_id, %error, "recheck of a failed run failed")
                }
            }
        }
        Ok(false)
    }

    /// Routes and records events (above the cursor, ascending) with the
    /// run's state, and perhaps its end.
    async fn record(
        &self,
        following: &mut Following,
        events: Vec<Event>,
        finish: Option<Finish>,
    ) -> Result<Recorded, StateError> {
        self.record_then(following, events, finish, None).await
    }

    /// [`Self::record`], leaving the run `stalled` for `why` when given.
    async fn record_then(
        &self,
        following: &mut Following,
        events: Vec<Event>,
        finish: Option<Finish>,
        stalled: Option<String>,
    ) -> Result<Recorded, StateError> {
        let run = &following.run;
        let router = self.router();
        let events = events
            .into_iter()
            .map(|event| {
                let sinks = router.sinks_for(&EventFacts {
                    event_type: &event.event_type,
                    run_id: &run.run_id,
                    labels: &run.labels,
                    status: following.status.as_deref(),
                    phase: following.phase.as_deref(),
                });
                NewEvent {
                    sequence: event.sequence,
                    event_type: event.event_type,
                    payload: event.payload,
                    created_at: event.created_at,
                    sinks,
                }
            })
            .collect();
        let finishes = finish.is_some();
        let recorded = self
            .store
            .record_batch(
                &following.fence,
                Batch {
                    run_id: run.run_id.clone(),
                    events,
                    run_status: following.status.clone(),
                    phase: following.phase.clone(),
                    finish,
                    stalled,
                },
            )
            .await?;
        if recorded.dropped > 0 {
            tracing::debug!(run_id = %run.run_id, dropped = recorded.dropped, "dropped events at or below the cursor");
        }
        if finishes {
            // The linger of a failed run counts from its latest finish, not
            // from one before a retry (the stored row may still hold that).
            following.run.finished_at = Some(now_ms());
        }
        following.cursor = recorded.cursor;
        crate::metrics::metrics()
            .events_ingested
            .with_label_values(&[following.transport.name()])
            .inc_by(recorded.recorded as u64);
        Ok(recorded)
    }

    /// The `run_finished` to record: `errorMessage` and `cancelReason` from
    /// the frame, or a run lookup; without them if the lookup fails.
    async fn finish(
        &self,
        following: &Following,
        status: &str,
        error_message: Option<String>,
        cancel_reason: Option<String>,
    ) -> Finish {
        let run = &following.run;
        let (mut error_message, mut cancel_reason) = (error_message, cancel_reason);
        if !RunStatus::Completed.is(status) && error_message.is_none() && cancel_reason.is_none() {
            match self.client.run(&run.run_id).await {
                Ok(info) => {
                    (error_message, cancel_reason) = (info.error_message, info.cancel_reason)
                }
                Err(error) => {
                    tracing::warn!(run_id = %run.run_id, %error, "run lookup failed; run_finished without error details");
                }
            }
        }
        self.finish_as(following, status, error_message, cancel_reason)
    }

    /// The `run_finished` to record, with the details already known.
    fn finish_as(
        &self,
        following: &Following,
        status: &str,
        error_message: Option<String>,
        cancel_reason: Option<String>,
    ) -> Finish {
        let run = &following.run;
        let facts = EventFacts {
            event_type: "run_finished",
            run_id: &run.run_id,
            labels: &run.labels,
            status: Some(status),
            phase: following.phase.as_deref(),
        };
        Finish {
            status: status.to_owned(),
            error_message,
            cancel_reason,
            sinks: self.router().sinks_for(&facts),
        }
    }

    /// Every `LAG_REFRESH`, one run lookup for `lastEventSequence`.
    async fn refresh_lag(&self, following: &mut Following) -> Result<(), StateError> {
        if tokio::time::Instant::now() < following.next_lag_at {
            return Ok(());
        }
        following.next_lag_at = tokio::time::Instant::now() + jitter(LAG_REFRESH);
        if let Ok(info) = self.client.run(&following.run.run_id).await {
            self.store
                .set_upstream_seq(
                    &following.fence,
                    following.run.run_id.clone(),
                    info.last_event_sequence,
                )
                .await?;
        }
        Ok(())
    }
}

/// The run's state while something keeps it from following normally
/// (`stalled`, `catching_up`, `auth_failed`, ...), so that the warning is
/// logged once when it starts, not on every retry.
#[derive(Default)]
struct Trouble {
    state: Option<RunState>,
}

impl Trouble {
    /// Records the state and its reason; warns when the state is new.
    async fn enter(
        &mut self,
        store: &State,
        fence: &Fence,
        run_id: &str,
        state: RunState,
        why: String,
    ) -> Result<(), StateError> {
        if self.state != Some(state) {
            tracing::warn!(run_id = %run_id, %state, %why, "run cannot follow normally; retrying slowly");
            self.state = Some(state);
        } else {
            tracing::debug!(run_id = %run_id, %state, %why, "still not following normally");
        }
        store
            .set_run_state(fence, run_id.to_owned(), state, Some(why), None)
            .await
    }

    /// The run follows again (its state was reset by the batch recorded).
    fn clear(&mut self, run_id: &str) {
        if let Some(state) = self.state.take() {
            tracing::info!(run_id = %run_id, %state, "run follows again");
        }
    }
}

/// A 404 is believed only when it lasts: a proxy or load balancer answers
/// 404 for a moment during a deploy. The tries after the first are spread
/// over `window` (1/15, 2/15, 4/15 and 8/15 of it), so a run is stopped
/// only after five 404s in a row over the whole window.
struct NotFoundConfirm {
    window: Duration,
    tries: u32,
}

impl NotFoundConfirm {
    const RETRIES: u32 = 4;

    fn new(window: Duration) -> Self {
        Self { window, tries: 0 }
    }

    /// The wait before the next try, or `None` once the 404 is confirmed.
    fn next(&mut self) -> Option<Duration> {
        if self.tries >= Self::RETRIES {
            return None;
        }
        let wait = self.window * (1 << self.tries) / ((1 << Self::RETRIES) - 1);
        self.tries += 1;
        Some(wait)
    }

    /// "2 of 5 tries answered 404", for `status`.
    fn progress(&self) -> String {
        format!("{} of {} tries answered 404", self.tries, Self::RETRIES + 1)
    }

    fn reset(&mut self) {
        self.tries = 0;
    }
}

/// Events above the cursor, ascending, each sequence once.
pub fn new_events(mut events: Vec<Event>, cursor: i64) -> Vec<Event> {
    events.retain(|e| e.sequence > cursor);
    events.sort_by_key(|e| e.sequence);
    events.dedup_by_key(|e| e.sequence);
    events
}

/// Backoff for reconnects and transient errors: 200 ms doubling to 60 s,
/// jittered.
fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(60))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Between 50% and 100% of `base`, so that runs started together spread out.
fn jitter(base: Duration) -> Duration {
    base.mul_f64(crate::jitter::random_range(0.5..=1.0))
}

/// Sleeps; true when cancelled first.
pub async fn sleep_or_cancel(wait: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => false,
        _ = cancel.cancelled() => true,
    }
}

/// Labels for a new subscription from `k=v` pairs.
pub fn parse_labels(pairs: &[String]) -> Result<BTreeMap<String, String>, String> {
    pairs
        .iter()
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(format!("label `{pair}`: write key=value")),
        })
        .collect()
}

#[cfg(test)]
mod tests;
