//! The delivery engine: pending deliveries -> sinks, outcome -> done, retry
//! or dead letter, all recorded in the store so that backoff survives
//! restarts. A file fails as a whole and is fed in batches (`file`); HTTP
//! sinks are fed run by run, in per-run order (`runs`).

pub mod file;
mod retry;
pub mod runs;
pub mod threads;

use crate::sink::Event;
use crate::store::Pending;

/// What a sink sees of a delivery: the event, not its retry state.
impl<'a> From<&'a Pending> for Event<'a> {
    fn from(pending: &'a Pending) -> Self {
        Self {
            id: &pending.id,
            run_id: &pending.run_id,
            sequence: pending.sequence,
            event_type: &pending.event_type,
            payload: &pending.payload,
            labels: &pending.labels,
            created_at: pending.created_at.as_deref(),
            seen_at: pending.seen_at,
            run_status: pending.run_status.as_deref(),
            phase: pending.phase.as_deref(),
        }
    }
}

/// Counts deliveries done and observes their latency (recorded -> delivered).
fn count_delivered(sink: &str, delivered: &[Pending]) {
    let metrics = crate::metrics::metrics();
    metrics
        .deliveries
        .with_label_values(&[sink, "delivered"])
        .inc_by(delivered.len() as u64);
    let latency = metrics.delivery_latency.with_label_values(&[sink]);
    let now = crate::store::now_ms();
    for pending in delivered {
        latency.observe((now - pending.seen_at).max(0) as f64 / 1000.0);
    }
}

/// Pause after the `attempt`-th store error in a row inside delivery (say
/// `SQLITE_BUSY` while `runhook replay` holds the write lock on a big
/// database): 100 ms doubling to 5 s, full jitter so the sinks do not all
/// knock again at once.
pub(crate) fn store_backoff(attempt: u32) -> std::time::Duration {
    let ceiling = STORE_BACKOFF_MIN
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(STORE_BACKOFF_MAX);
    crate::jitter::random_range(ceiling / 2..=ceiling)
}

const STORE_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(100);
const STORE_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs a store write until it succeeds, backing off between store errors,
/// so an outcome already seen by a sink is recorded rather than lost (and
/// sent again). Gives up at shutdown, with the last error, and at once when
/// the fence is refused: a lease another replica took over never comes
/// back, and that replica sends the delivery again under the same id.
async fn retry_store<T, F, Fut>(
    sink: &str,
    shutdown: &tokio_util::sync::CancellationToken,
    mut write: F,
) -> Result<T, crate::store::StateError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::store::StateError>>,
{
    let mut attempt = 0;
    loop {
        match write().await {
            Ok(value) => return Ok(value),
            Err(error) if shutdown.is_cancelled() => return Err(error),
            Err(error) if error.fence_refused() => return Err(error),
            Err(error) => {
                attempt += 1;
                let wait = store_backoff(attempt);
                tracing::warn!(sink, %error, attempt, ?wait, "delivery: state database write failed; retrying");
                if crate::ingest::sleep_or_cancel(wait, shutdown).await {
                    return Err(error);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::store::StateError;

    /// A write refused for its fence fails the same way every time: retried,
    /// a pipelined mark job (which ignores the stop) would spin for ever.
    #[tokio::test]
    async fn a_refused_fence_is_not_retried() {
        let never = tokio_util::sync::CancellationToken::new();
        let mut tries = 0;
        let write = super::retry_store("s", &never, || {
            tries += 1;
            async {
                Err::<(), _>(StateError::LeaseLost {
                    run_id: "r".into(),
                    epoch: 2,
                })
            }
        });
        let written = tokio::time::timeout(Duration::from_secs(5), write).await;
        assert!(
            matches!(written, Ok(Err(StateError::LeaseLost { epoch: 2, .. }))),
            "{written:?}"
        );
        assert_eq!(tries, 1);
    }

    #[test]
    fn store_backoff_grows_jittered_and_capped() {
        for _ in 0..100 {
            let first = super::store_backoff(1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            assert!(super::store_backoff(40) <= Duration::from_secs(5));
            assert!(super::store_backoff(40) >= Duration::from_millis(2500));
        }
    }
}
