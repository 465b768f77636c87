//! Waiting for a condition by polling, never by sleeping a guessed amount.

use std::{
    future::Future,
    time::{Duration, Instant},
};

/// How often conditions are polled.
const POLL_EVERY: Duration = Duration::from_millis(50);

/// Polls `check` every 50 ms until it returns `true` (then `true`) or `timeout` has passed
/// (then `false`). `check` runs at least once, and once more right at the deadline.
#[must_use = "assert on the result: a timeout is a failure"]
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_some(timeout, || {
        let fut = check();
        async move { fut.await.then_some(()) }
    })
    .await
    .is_some()
}

/// Polls `check` every 50 ms until it returns `Some` (then that value) or `timeout` has
/// passed (then `None`).
pub async fn eventually_some<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        tokio::time::sleep(POLL_EVERY.min(deadline - now)).await;
    }
}

/// Checks that `check` stays `true` for all of `period` (polled every 50 ms): the way to
/// assert that something does *not* happen, such as a delivery after a run failed.
/// Returns `false` as soon as `check` returns `false`.
#[must_use = "assert on the result"]
pub async fn stays<F, Fut>(period: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + period;
    loop {
        if !check().await {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        tokio::time::sleep(POLL_EVERY.min(deadline - now)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn eventually_returns_once_the_condition_holds() {
        let calls = AtomicU32::new(0);
        let ok = eventually(Duration::from_secs(5), || async {
            calls.fetch_add(1, Ordering::SeqCst) >= 2
        })
        .await;
        assert!(ok);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn eventually_gives_up_after_the_timeout() {
        let started = Instant::now();
        let ok = eventually(Duration::from_millis(200), || async { false }).await;
        assert!(!ok);
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn stays_fails_as_soon_as_the_condition_breaks() {
        let calls = AtomicU32::new(0);
        let ok = stays(Duration::from_secs(5), || async {
            calls.fetch_add(1, Ordering::SeqCst) < 3
        })
        .await;
        assert!(!ok);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert!(stays(Duration::from_millis(100), || async { true }).await);
    }
}
