//! Retry timing: how long until the next attempt, and when to give up.
//! Pure functions; the state they act on lives in SQLite.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use rand::RngExt;

use crate::config::DeliveryPolicy;
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
/// `queued_at` (unix ms), should go to the dead-letter list now.
pub fn exhausted(policy: &DeliveryPolicy, attempts: u32, queued_at: i64, now: i64) -> bool {
    attempts >= policy.max_attempts
        || now.saturating_sub(queued_at) >= policy.max_age.as_millis() as i64
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
