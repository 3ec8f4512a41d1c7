//! Not an API: a narrow window on the sans-IO router for shoal's own criterion benchmarks
//! (`perf/benches`), which cannot reach the crate-private `Router`. Hidden from the docs; it
//! may change with any commit and nothing else should use it.
//!
//! It drives the router exactly as the engines do (`register`, `call`, `result` with `now`
//! passed in) and reduces the returned actions to what a benchmark needs to go on.
use crate::router::{Action, CallRequest, Router};
use shoal_protocol::Payload;
use std::time::{Duration, Instant};

/// A router, as the proxy's engines hold one.
#[derive(Debug)]
pub struct BenchRouter {
    inner: Router,
}

impl BenchRouter {
    /// A router whose function queues hold at most `max_queue` calls each.
    pub fn new(max_queue: usize) -> Self {
        Self {
            inner: Router::new(max_queue),
        }
    }

    /// Registers connection `conn` as a local instance of `function`. False if refused.
    pub fn register(
        &mut self,
        conn: u64,
        function: &str,
        instance_id: &str,
        concurrency: u32,
        now: Instant,
    ) -> bool {
        self.inner
            .register(conn, function, instance_id, concurrency, "default", now)
            .is_ok()
    }

    /// Caller `caller` calls `function` (any instance, empty inline argument, 1 s deadline).
    /// Returns the instance connection and invoke id it was dispatched to, or `None` when it
    /// was queued or answered at once.
    pub fn call(
        &mut self,
        caller: u64,
        id: u64,
        function: &str,
        now: Instant,
    ) -> Option<(u64, u64)> {
        let req = CallRequest {
            id,
            function: function.to_owned(),
            instance: None,
            args: Payload::Inline(Vec::new()),
            timeout: Duration::from_secs(1),
            trace_id: 0,
            local_only: false,
            charge: None,
        };
        self.inner
            .call(caller, req, now)
            .into_iter()
            .find_map(|a| match a {
                Action::Invoke { instance, id, .. } => Some((instance, id)),
                Action::Reply { .. } | Action::Release { .. } => None,
            })
    }

    /// Instance `instance` answers invoke `id` with an empty result. Returns how many actions
    /// followed (the caller's reply and any queued call it now takes).
    pub fn result(&mut self, instance: u64, id: u64, now: Instant) -> usize {
        self.inner
            .result(instance, id, Ok(Payload::Inline(Vec::new())), now)
            .len()
    }
}
