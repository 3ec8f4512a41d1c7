//! Helpers shared by the SDK's integration tests: waiting on a condition with a deadline.
#![allow(dead_code)] // each test binary uses a different part

use std::future::Future;
use std::time::Duration;

/// Polls `cond` until it returns `Some`, failing the test (naming `what`) after `within`.
pub(crate) async fn wait_for<T, F, Fut>(what: &str, within: Duration, cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    shoal_devcluster::wait::wait_for_async(what, within, cond)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
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
