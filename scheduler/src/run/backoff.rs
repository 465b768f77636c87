//! Exponential backoff with jitter for failed deliveries.

use std::time::Duration;

use rand::Rng;

use crate::playbook::RetryPolicy;

/// How long to wait before attempt `failed_attempt + 1`: `initial * 2^(failed_attempt-1)`
/// capped at `max`, then jittered into its upper half so retries of many runs spread
/// out. A receiver's `Retry-After` is honoured when it asks for longer.
pub fn retry_delay(
    policy: &RetryPolicy,
    failed_attempt: u32,
    retry_after: Option<Duration>,
) -> Duration {
    let exponent = failed_attempt.saturating_sub(1).min(30);
    let base = policy.initial.saturating_mul(1 << exponent).min(policy.max);
    let half = base / 2;
    let jittered = half + rand::rng().random_range(Duration::ZERO..=half);
    retry_after.map_or(jittered, |asked| asked.max(jittered))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(10),
        }
    }

    #[test]
    fn grows_exponentially_within_jitter_bounds_and_caps() {
        for (attempt, base) in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 10), (40, 10)] {
            for _ in 0..50 {
                let delay = retry_delay(&policy(), attempt, None);
                let base = Duration::from_secs(base);
                assert!(
                    delay >= base / 2 && delay <= base,
                    "attempt {attempt}: {delay:?}"
                );
            }
        }
    }

    #[test]
    fn honours_a_longer_retry_after() {
        let delay = retry_delay(&policy(), 1, Some(Duration::from_secs(30)));
        assert_eq!(delay, Duration::from_secs(30));
        let delay = retry_delay(&policy(), 1, Some(Duration::from_millis(1)));
        assert!(delay >= Duration::from_millis(500));
    }
}
