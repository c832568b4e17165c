//! The delivery engine: due deliveries -> sinks, outcome -> done, retry or
//! dead letter, all recorded in the store so backoff survives restarts.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use rand::RngExt;
use tokio_util::sync::CancellationToken;

use crate::config::DeliveryPolicy;
use crate::sink::file::FileSink;
use crate::sink::write_envelope_line;
use crate::store::{Failure, Pending, Reader, Store, StoreError, now_ms};

/// Deliveries fetched and written per file write.
const FILE_BATCH: usize = 2048;

/// How long to wait before attempt `attempt + 1`, after `attempt` failures:
/// exponential from `initial_backoff` (backon's schedule), capped at
/// `max_backoff`, with full jitter; never sooner than the sink asked.
pub fn retry_delay(
    policy: &DeliveryPolicy,
    attempt: u32,
    retry_after: Option<Duration>,
) -> Duration {
    let ceiling = ExponentialBuilder::default()
        .with_min_delay(policy.initial_backoff)
        .with_max_delay(policy.max_backoff)
        .without_max_times()
        .build()
        .nth(attempt.saturating_sub(1) as usize)
        .unwrap_or(policy.max_backoff);
    let jittered = if ceiling.is_zero() {
        ceiling
    } else {
        rand::rng().random_range(Duration::ZERO..=ceiling)
    };
    jittered.max(retry_after.unwrap_or(Duration::ZERO))
}

/// Whether a delivery that has failed `attempts` times, first seen at
/// `seen_at` (unix ms), should go to the dead-letter list now.
pub fn exhausted(policy: &DeliveryPolicy, attempts: u32, seen_at: i64, now: i64) -> bool {
    attempts >= policy.max_attempts
        || now.saturating_sub(seen_at) >= policy.max_age.as_millis() as i64
}

/// Delivers a file sink's backlog in ingest order (which is per-run order),
/// a batch per write and fsync. A file fails as a whole, so its head waits out
/// the backoff and everything behind it waits too.
pub async fn run_file_sink(
    name: Arc<str>,
    file: Arc<FileSink>,
    policy: DeliveryPolicy,
    store: Store,
    reader: Reader,
    shutdown: CancellationToken,
) -> Result<(), StoreError> {
    recover_file(&name, &file, &store, &reader).await?;
    let mut commits = store.commits();
    loop {
        commits.borrow_and_update();
        let batch = reader.pending_in_order(&name, FILE_BATCH).await?;
        let Some(head) = batch.first() else {
            tokio::select! {
                _ = commits.changed() => continue,
                // A replay from the command line commits in another process.
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                _ = shutdown.cancelled() => return Ok(()),
            }
        };
        let wait = head.next_attempt_at - now_ms();
        if wait > 0 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => continue,
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
        write_file_batch(&name, &file, &policy, &store, batch).await?;
    }
}

async fn recover_file(
    name: &Arc<str>,
    file: &Arc<FileSink>,
    store: &Store,
    reader: &Reader,
) -> Result<(), StoreError> {
    let offset = reader.file_offset(name).await?;
    let sink = file.clone();
    let recovery = match tokio::task::spawn_blocking(move || sink.recover(offset)).await {
        Ok(Ok(recovery)) => recovery,
        Ok(Err(error)) => {
            tracing::error!(sink = %name, %error, "file sink: cannot read the file tail");
            return Ok(());
        }
        Err(_) => return Ok(()),
    };
    if recovery.torn_bytes > 0 {
        tracing::warn!(sink = %name, bytes = recovery.torn_bytes, "file sink: cut a torn last line");
    }
    let marked = store
        .reconcile_file(name.clone(), recovery.ids, recovery.offset)
        .await?;
    if marked > 0 {
        tracing::info!(sink = %name, marked, "file sink: lines written before a crash marked done");
    }
    Ok(())
}

async fn write_file_batch(
    name: &Arc<str>,
    file: &Arc<FileSink>,
    policy: &DeliveryPolicy,
    store: &Store,
    batch: Vec<Pending>,
) -> Result<(), StoreError> {
    let mut lines = Vec::with_capacity(batch.len() * 256);
    let mut events = Vec::with_capacity(batch.len());
    for pending in &batch {
        let start = lines.len();
        if let Err(error) = write_envelope_line(pending, &mut lines) {
            // Stored payloads were JSON when recorded; this is corruption.
            lines.truncate(start);
            tracing::error!(sink = %name, id = %pending.id, %error, "cannot encode event; dead-lettering it");
            let failure = Failure {
                events: vec![pending.event],
                status: None,
                error: format!("cannot encode event: {error}"),
                next_attempt_at: now_ms(),
                dead: true,
            };
            store.record_failure(name.clone(), failure).await?;
            continue;
        }
        events.push(pending.event);
    }
    let sink = file.clone();
    let written = tokio::task::spawn_blocking(move || sink.append(&lines))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    match written {
        Ok(offset) => {
            store
                .mark_delivered(name.clone(), events, Some(offset))
                .await
        }
        Err(error) => {
            let head = &batch[0];
            let attempts = head.attempts + 1;
            let now = now_ms();
            let dead = exhausted(policy, attempts, head.seen_at, now);
            let delay = retry_delay(policy, attempts, None);
            tracing::warn!(sink = %name, %error, attempts, dead, "file sink: write failed");
            let failure = Failure {
                events,
                status: None,
                error: error.to_string(),
                next_attempt_at: now + delay.as_millis() as i64,
                dead,
            };
            store.record_failure(name.clone(), failure).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> DeliveryPolicy {
        DeliveryPolicy {
            max_attempts: 5,
            max_age: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
        }
    }

    #[test]
    fn delay_grows_stays_capped_and_is_jittered() {
        let p = policy();
        for _ in 0..200 {
            assert!(retry_delay(&p, 1, None) <= Duration::from_millis(100));
            assert!(retry_delay(&p, 3, None) <= Duration::from_millis(400));
            assert!(retry_delay(&p, 30, None) <= Duration::from_secs(2));
        }
        let spread: std::collections::BTreeSet<_> =
            (0..50).map(|_| retry_delay(&p, 4, None)).collect();
        assert!(spread.len() > 10, "full jitter spreads the delays");
    }

    #[test]
    fn retry_after_is_a_floor() {
        let p = policy();
        assert!(retry_delay(&p, 1, Some(Duration::from_secs(7))) >= Duration::from_secs(7));
    }

    #[test]
    fn exhausted_by_attempts_or_age() {
        let p = policy();
        assert!(!exhausted(&p, 4, 0, 1_000));
        assert!(exhausted(&p, 5, 0, 1_000));
        assert!(exhausted(&p, 1, 0, 60_000));
    }
}
