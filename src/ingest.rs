//! One task per run: drive the transport, route what arrives, hand batches
//! to the store. The cursor only moves through `Store::record_batch`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio_util::sync::CancellationToken;

use crate::route::{EventFacts, Router};
use crate::store::{Batch, Finish, NewEvent, Store, StoreError, WatchedRun};
use crate::upstream::types::is_final;
use crate::upstream::{Client, ErrorClass, Event, EventsPage, UpstreamError};

/// What every run task shares.
pub struct Ingest {
    pub client: Client,
    pub store: Store,
    pub router: Arc<Router>,
    pub poll_interval: Duration,
}

/// Why a run task ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RunEnd {
    Finished,
    Stopped,
    /// 403 or 404: the run cannot be followed with this credential.
    Refused,
}

impl Ingest {
    /// Follows one run by polling until it finishes, is refused, or `cancel`.
    pub async fn follow(
        &self,
        run: WatchedRun,
        cancel: CancellationToken,
    ) -> Result<RunEnd, StoreError> {
        let run_id = run.run_id.clone();
        let mut cursor = run.cursor;
        self.store
            .set_run_state(run_id.clone(), "following", None, Some("poll"))
            .await?;
        let mut auth_backoff = self.auth_backoff();
        loop {
            let page = tokio::select! {
                page = self.fetch(&run_id, cursor) => page,
                _ = cancel.cancelled() => return Ok(RunEnd::Stopped),
            };
            let page = match page {
                Ok(page) => page,
                Err(error) => match error.class() {
                    ErrorClass::AuthFailed => {
                        tracing::warn!(run_id = %run_id, %error, "upstream refused the credential; retrying slowly");
                        self.store
                            .set_run_state(
                                run_id.clone(),
                                "auth_failed",
                                Some(error.to_string()),
                                None,
                            )
                            .await?;
                        let wait =
                            Iterator::next(&mut auth_backoff).unwrap_or(Duration::from_secs(300));
                        if sleep_or_cancel(wait, &cancel).await {
                            return Ok(RunEnd::Stopped);
                        }
                        continue;
                    }
                    ErrorClass::Forbidden | ErrorClass::NotFound => {
                        let state = if error.class() == ErrorClass::Forbidden {
                            "forbidden"
                        } else {
                            "not_found"
                        };
                        tracing::error!(run_id = %run_id, %error, "run cannot be followed; stopped");
                        self.store
                            .set_run_state(run_id.clone(), state, Some(error.to_string()), None)
                            .await?;
                        return Ok(RunEnd::Refused);
                    }
                    ErrorClass::Transient => unreachable!("transient errors are retried by fetch"),
                },
            };
            auth_backoff = self.auth_backoff();
            let status = page.run_status.clone();
            let phase = page.current_phase.clone();
            let events = new_events(page.events, cursor);
            let finish = match &status {
                Some(s) if events.is_empty() && is_final(s) => Some(self.finish(&run, s).await),
                _ => None,
            };
            let idle = events.is_empty();
            let batch = self.batch(&run, events, status, phase, finish);
            let finished = batch.finish.is_some();
            let recorded = self.store.record_batch(batch).await?;
            if recorded.dropped > 0 {
                tracing::debug!(run_id = %run_id, dropped = recorded.dropped, "dropped events at or below the cursor");
            }
            cursor = recorded.cursor;
            if finished {
                tracing::info!(run_id = %run_id, cursor, "run finished");
                return Ok(RunEnd::Finished);
            }
            if idle && sleep_or_cancel(self.poll_interval, &cancel).await {
                return Ok(RunEnd::Stopped);
            }
        }
    }

    /// One poll, retried with backoff and jitter through transient errors,
    /// honouring `Retry-After`.
    async fn fetch(&self, run_id: &str, since: i64) -> Result<EventsPage, UpstreamError> {
        (|| self.client.events(run_id, since))
            .retry(transient_backoff())
            .when(|e: &UpstreamError| e.class() == ErrorClass::Transient)
            .adjust(honour_retry_after)
            .notify(|error: &UpstreamError, wait: Duration| {
                tracing::warn!(run_id = %run_id, %error, ?wait, "poll failed; backing off");
                let store = self.store.clone();
                let (run_id, error) = (run_id.to_owned(), error.to_string());
                tokio::spawn(async move {
                    let _ = store
                        .set_run_state(run_id, "retrying", Some(error), None)
                        .await;
                });
            })
            .await
    }

    /// The `run_finished` details: a lookup adds `errorMessage` and
    /// `cancelReason`; if it fails the event goes out without them.
    async fn finish(&self, run: &WatchedRun, status: &str) -> Finish {
        let info = match self.client.run(&run.run_id).await {
            Ok(info) => Some(info),
            Err(error) => {
                tracing::warn!(run_id = %run.run_id, %error, "run lookup failed; run_finished without error details");
                None
            }
        };
        let facts = EventFacts {
            event_type: "run_finished",
            run_id: &run.run_id,
            labels: &run.labels,
            status: Some(status),
            phase: None,
        };
        Finish {
            status: status.to_owned(),
            error_message: info.as_ref().and_then(|i| i.error_message.clone()),
            cancel_reason: info.and_then(|i| i.cancel_reason),
            sinks: self.router.sinks_for(&facts),
        }
    }

    fn batch(
        &self,
        run: &WatchedRun,
        events: Vec<Event>,
        status: Option<String>,
        phase: Option<String>,
        finish: Option<Finish>,
    ) -> Batch {
        let events = events
            .into_iter()
            .map(|event| {
                let sinks = self.router.sinks_for(&EventFacts {
                    event_type: &event.event_type,
                    run_id: &run.run_id,
                    labels: &run.labels,
                    status: status.as_deref(),
                    phase: phase.as_deref(),
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
        Batch {
            run_id: run.run_id.clone(),
            events,
            run_status: status,
            phase,
            finish,
        }
    }

    fn auth_backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        use backon::BackoffBuilder;
        ExponentialBuilder::default()
            .with_min_delay(self.poll_interval.max(Duration::from_millis(100)))
            .with_max_delay(Duration::from_secs(300))
            .with_jitter()
            .without_max_times()
            .build()
    }
}

/// Events above the cursor, ascending, each sequence once.
pub fn new_events(mut events: Vec<Event>, cursor: i64) -> Vec<Event> {
    events.retain(|e| e.sequence > cursor);
    events.sort_by_key(|e| e.sequence);
    events.dedup_by_key(|e| e.sequence);
    events
}

fn transient_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(60))
        .with_jitter()
        .without_max_times()
}

/// Backon's `adjust`: a server's `Retry-After` replaces the computed delay
/// (only when backon would retry at all).
fn honour_retry_after(error: &UpstreamError, delay: Option<Duration>) -> Option<Duration> {
    match (error.retry_after(), delay) {
        (Some(wait), Some(_)) => Some(wait),
        (_, delay) => delay,
    }
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
mod tests {
    use super::*;

    fn event(sequence: i64) -> Event {
        serde_json::from_str(&format!(
            r#"{{"sequence":{sequence},"eventType":"X","payload":{{}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn only_new_events_ascending_once() {
        let events = vec![event(5), event(3), event(9), event(5), event(2)];
        let kept: Vec<i64> = new_events(events, 3).iter().map(|e| e.sequence).collect();
        assert_eq!(kept, [5, 9]);
    }

    #[test]
    fn labels_parse() {
        assert_eq!(parse_labels(&["team=rome".into()]).unwrap()["team"], "rome");
        assert!(parse_labels(&["oops".into()]).is_err());
    }
}
