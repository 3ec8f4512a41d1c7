//! Helpers shared by the SDK's integration tests: waiting on a condition with a deadline.
#![allow(dead_code)] // each test binary uses a different part

use std::future::Future;
use std::time::Duration;

/// How often a condition is checked again.
const POLL: Duration = Duration::from_millis(10);

/// Polls `cond` until it returns `Some`, failing the test (naming `what`) after `within`.
pub(crate) async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?}: {what}"
        );
        // The poll interval: what is waited for has no notification of its own.
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `cond` until it holds, failing the test (naming `what`) after `within`.
pub(crate) async fn wait_until<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, within, || {
        let c = cond();
        async move { c.await.then_some(()) }
    })
    .await
}
