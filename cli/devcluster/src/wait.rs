//! Waiting for a condition with a deadline: the one way this workspace's tests and benchmarks
//! wait for something to happen in another process.
//!
//! The condition is checked, then checked again after a pause that grows from 1 ms to
//! [`MAX_POLL`]; the pause is a poll interval, never a guess at how long the event takes.
//! Nothing returns before the condition holds except at the deadline.
use std::time::{Duration, Instant};

/// The longest pause between two checks.
pub const MAX_POLL: Duration = Duration::from_millis(50);

/// The condition did not hold by the deadline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("timed out after {timeout:?} waiting for {what}")]
pub struct TimedOut {
    /// What was waited for.
    pub what: String,
    /// How long.
    pub timeout: Duration,
}

/// Checks `check` until it gives a value, or `None` once `deadline` has passed.
pub fn poll_until<T>(deadline: Instant, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        // A poll interval (see the module doc): the event is what `check` observes.
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(MAX_POLL);
    }
}

/// [`poll_until`] for at most `timeout`; the error names `what` was waited for.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    check: impl FnMut() -> Option<T>,
) -> Result<T, TimedOut> {
    poll_until(Instant::now() + timeout, check).ok_or_else(|| TimedOut {
        what: what.to_string(),
        timeout,
    })
}

/// [`wait_for`] for async conditions (a request to a server, a store read): awaits `check`
/// until it gives a value, pausing on tokio's clock (so paused-time tests work) between
/// checks, for at most `timeout`.
pub async fn wait_for_async<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut check: F,
) -> Result<T, TimedOut>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(TimedOut {
                what: what.to_string(),
                timeout,
            });
        }
        // A poll interval (see the module doc): the event is what `check` observes.
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(MAX_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_once_the_condition_holds() {
        let mut n = 0;
        let v = wait_for("three checks", Duration::from_secs(10), || {
            n += 1;
            (n == 3).then_some(n)
        });
        assert_eq!(v, Ok(3));
    }

    #[tokio::test]
    async fn the_async_wait_returns_the_value_or_times_out() {
        let mut n = 0;
        let v = wait_for_async("three checks", Duration::from_secs(10), || {
            n += 1;
            let k = n;
            async move { (k == 3).then_some(k) }
        })
        .await;
        assert_eq!(v, Ok(3));
        let e = wait_for_async::<(), _, _>("nothing", Duration::ZERO, || async { None })
            .await
            .unwrap_err();
        assert_eq!(e.what, "nothing");
    }

    #[test]
    fn a_condition_that_never_holds_times_out_naming_it() {
        let e = wait_for::<()>("nothing", Duration::ZERO, || None).unwrap_err();
        assert_eq!(e.what, "nothing");
        assert!(e.to_string().contains("waiting for nothing"), "{e}");
    }
}
