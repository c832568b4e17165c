//! Retry timing: how long until the next attempt, and when to give up.
//! Pure functions; the state they act on lives in SQLite.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::config::DeliveryPolicy;
use crate::sink::Outcome;
use crate::store::{Failure, Pending};

/// A sink's `Retry-After` is honoured up to `max_backoff`, or up to this
/// when `max_backoff` is shorter (a 429 without `Retry-After` waits 60 s):
/// one answer of `Retry-After: 604800` must not hold a run for a week.
pub const RETRY_AFTER_CAP_MIN: Duration = Duration::from_secs(60);

/// How long to wait before attempt `attempt + 1`, after `attempt` failures:
/// exponential from `initial_backoff` (backon's schedule), capped at
/// `max_backoff`, with full jitter; never sooner than the sink asked, as
/// long as that is within `max(max_backoff, 60 s)`.
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
        crate::jitter::random_range(Duration::ZERO..=ceiling)
    };
    let asked = retry_after
        .unwrap_or(Duration::ZERO)
        .min(policy.max_backoff.max(RETRY_AFTER_CAP_MIN));
    jittered.max(asked)
}

/// When (unix ms) a delivery queued at `queued_at` that failed at `now` is
/// tried next, `delay` from now, but never later than `queued_at + max_age`:
/// a delivery that would wait past its age limit is tried a last time then,
/// and dead-lettered if that fails, instead of holding the run's later
/// events. Saturating: no delay or age can wrap the clock.
pub fn next_attempt_at(policy: &DeliveryPolicy, delay: Duration, queued_at: i64, now: i64) -> i64 {
    let at = now.saturating_add(millis(delay));
    let deadline = queued_at.saturating_add(millis(policy.max_age));
    at.min(deadline.max(now))
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Whether a delivery that has failed `attempts` times, first seen at
/// `queued_at` (unix ms), should go to the dead-letter list now.
pub fn exhausted(policy: &DeliveryPolicy, attempts: u32, queued_at: i64, now: i64) -> bool {
    attempts >= policy.max_attempts || now.saturating_sub(queued_at) >= millis(policy.max_age)
}

/// The rows a failed attempt writes, for HTTP and file delivery alike.
/// `deliveries` failed together (one HTTP request, or one file write) in
/// their `attempt`-th attempt: one backoff is drawn for them all. Each is
/// dead-lettered when the sink's answer is permanent or the delivery has
/// run out of attempts or age, and retried otherwise, never later than its
/// own `max_age` allows. The dead come first; empty groups are left out, so
/// a delivered outcome writes nothing.
pub(super) fn failure_rows(
    policy: &DeliveryPolicy,
    outcome: Outcome,
    attempt: u32,
    deliveries: &[&Pending],
    now: i64,
) -> Vec<Failure> {
    let (status, error, after, permanent) = match outcome {
        Outcome::Delivered => return Vec::new(),
        Outcome::Retry {
            status,
            error,
            after,
        } => (status, error, after, false),
        Outcome::Permanent { status, error } => (status, error, None, true),
    };
    let delay = retry_delay(policy, attempt, after);
    let (dead, retry): (Vec<&Pending>, Vec<&Pending>) = deliveries
        .iter()
        .partition(|p| permanent || exhausted(policy, p.attempts + 1, p.queued_at, now));
    [(dead, true), (retry, false)]
        .into_iter()
        .filter(|(group, _)| !group.is_empty())
        .map(|(group, dead)| Failure {
            events: group.iter().map(|p| p.event).collect(),
            status,
            error: error.clone(),
            next_attempt_at: group
                .iter()
                .map(|p| next_attempt_at(policy, delay, p.queued_at, now))
                .min()
                .unwrap_or(now),
            dead,
        })
        .collect()
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
    fn a_huge_retry_after_is_capped() {
        let p = policy();
        let week = Some(Duration::from_secs(604_800));
        assert_eq!(retry_delay(&p, 1, week), RETRY_AFTER_CAP_MIN);
        let long = DeliveryPolicy {
            max_backoff: Duration::from_secs(600),
            ..p
        };
        assert_eq!(retry_delay(&long, 1, week), Duration::from_secs(600));
        assert!(retry_delay(&p, 1, Some(Duration::MAX)) <= RETRY_AFTER_CAP_MIN);
    }

    #[test]
    fn the_next_attempt_never_falls_after_max_age() {
        let p = policy(); // max_age 60 s
        let at = next_attempt_at(&p, Duration::from_secs(5), 0, 10_000);
        assert_eq!(at, 15_000, "within the age limit: now + delay");
        let at = next_attempt_at(&p, Duration::from_secs(600), 0, 10_000);
        assert_eq!(at, 60_000, "past it: at max_age");
        assert!(
            exhausted(&p, 1, 0, at),
            "and dead-lettered if that attempt fails"
        );
        let at = next_attempt_at(&p, Duration::from_secs(5), 0, 70_000);
        assert_eq!(at, 70_000, "already past: now");
        let huge = DeliveryPolicy {
            max_age: Duration::MAX,
            ..p
        };
        assert_eq!(
            next_attempt_at(&huge, Duration::MAX, 0, 1),
            i64::MAX,
            "saturates"
        );
        assert!(!exhausted(&huge, 1, 0, i64::MAX - 1));
    }

    fn pending(event: i64, attempts: u32, queued_at: i64) -> Pending {
        Pending {
            attempts,
            queued_at,
            ..Pending::sample(event)
        }
    }

    #[test]
    fn failure_rows_dead_letter_what_ran_out_and_retry_the_rest() {
        let p = policy(); // 5 attempts, 60 s
        let fresh = pending(1, 0, 0);
        let last_try = pending(2, 4, 0);
        let too_old = pending(3, 0, -60_000);
        let retry = Outcome::Retry {
            status: Some(503),
            error: "HTTP 503".into(),
            after: Some(Duration::from_secs(7)),
        };
        let rows = failure_rows(&p, retry, 1, &[&fresh, &last_try, &too_old], 1_000);
        assert_eq!(rows.len(), 2);
        assert!(rows[0].dead, "the dead come first");
        assert_eq!(rows[0].events, [2, 3]);
        assert!(!rows[1].dead);
        assert_eq!(rows[1].events, [1]);
        assert_eq!(
            (rows[1].status, rows[1].error.as_str()),
            (Some(503), "HTTP 503")
        );
        assert!(rows[1].next_attempt_at >= 8_000, "Retry-After is a floor");

        let permanent = Outcome::Permanent {
            status: Some(404),
            error: "gone".into(),
        };
        let rows = failure_rows(&p, permanent, 1, &[&fresh], 1_000);
        assert_eq!(rows.len(), 1);
        assert!(rows[0].dead, "a permanent answer dead-letters at once");
        assert!(failure_rows(&p, Outcome::Delivered, 1, &[&fresh], 1_000).is_empty());
    }

    #[test]
    fn exhausted_by_attempts_or_age() {
        let p = policy();
        assert!(!exhausted(&p, 4, 0, 1_000));
        assert!(exhausted(&p, 5, 0, 1_000));
        assert!(exhausted(&p, 1, 0, 60_000));
    }
}
