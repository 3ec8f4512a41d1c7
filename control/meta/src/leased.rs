//! A record held under a lease for as long as its owner lives: the one way a node's components
//! say "I am here" (`nodes/`, `agents/`, `proxies/`).
//!
//! [`LeasedRecord`] owns a task that grants a lease, puts the record under it, keeps the lease
//! alive every third of its TTL, writes every new value the owner [`set`](LeasedRecord::set)s,
//! and registers again (a new lease, the latest value) whenever the store says the lease is
//! gone: it expired while the store was unreachable, it was revoked, or the store restarted
//! without it. While the store is unreachable the task retries every [`RETRY_PAUSE`](crate::LEASE_RETRY_PAUSE) and
//! logs once. [`stop`](LeasedRecord::stop) ends the task at once, even mid-retry, and removes
//! the record (revokes the lease, or deletes the key if the revoke fails), each step bounded
//! by [`STOP_TIMEOUT`](crate::LEASE_STOP_TIMEOUT); dropping the handle stops the task the same way in the background.
//!
//! Invariants:
//! - At most one lease of this handle holds the key at a time: a new lease is granted only
//!   after the store said the old one is gone (or before the first registration).
//! - The value in the store is the latest one set, as of the last successful write; a value
//!   set while the store is unreachable is written when it comes back.
//! - A registration cut short by `stop` (lease granted, put unanswered) leaves a record that
//!   goes with its lease's TTL.
use crate::types::{LeaseId, MetaError, MetaStore};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Pause between registration attempts while the store fails.
pub const RETRY_PAUSE: Duration = Duration::from_millis(300);
/// Longest time `stop` spends on each of revoking the lease and deleting the key.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(1);
/// Shortest keep-alive interval, whatever the TTL.
const MIN_TICK: Duration = Duration::from_millis(100);

/// A record held in the store under a lease by a task of its own; see the module docs.
#[derive(Debug)]
pub struct LeasedRecord {
    key: String,
    value: watch::Sender<Vec<u8>>,
    registered: watch::Receiver<bool>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl LeasedRecord {
    /// Holds `key` = `value` under a lease of `ttl`, registering in the background (retried
    /// until the store answers). Must be called within a tokio runtime.
    pub fn spawn(meta: Arc<dyn MetaStore>, key: String, value: Vec<u8>, ttl: Duration) -> Self {
        Self::start(meta, key, value, ttl, None)
    }

    /// Registers `key` = `value` under a lease of `ttl` now, failing with the store's error if
    /// it cannot, then holds it in the background as [`spawn`](Self::spawn) does.
    pub async fn register(
        meta: Arc<dyn MetaStore>,
        key: String,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<Self, MetaError> {
        let lease = put_under_new_lease(meta.as_ref(), &key, value.clone(), ttl).await?;
        Ok(Self::start(meta, key, value, ttl, Some(lease)))
    }

    fn start(
        meta: Arc<dyn MetaStore>,
        key: String,
        value: Vec<u8>,
        ttl: Duration,
        lease: Option<LeaseId>,
    ) -> Self {
        let (value_tx, value_rx) = watch::channel(value);
        let (registered_tx, registered) = watch::channel(lease.is_some());
        let stop = CancellationToken::new();
        let keeper = Keeper {
            meta,
            key: key.clone(),
            ttl,
            value: value_rx,
            registered: registered_tx,
            lease,
        };
        let task = tokio::spawn(keeper.run(stop.clone()));
        LeasedRecord {
            key,
            value: value_tx,
            registered,
            stop,
            task: Some(task),
        }
    }

    /// The key held.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Replaces the record's value; the task writes it under the lease at once (or when the
    /// store comes back).
    pub fn set(&self, value: Vec<u8>) {
        self.value.send_replace(value);
    }

    /// Whether the record is in the store as far as the task knows: true after each
    /// successful registration, false once the store said the lease is gone, or after stop.
    pub fn registered(&self) -> watch::Receiver<bool> {
        self.registered.clone()
    }

    /// Stops holding the record and removes it from the store (best effort, bounded by
    /// [`STOP_TIMEOUT`](crate::LEASE_STOP_TIMEOUT) per step); returns once the task has ended.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            if let Err(e) = task.await {
                tracing::warn!(key = %self.key, error = %e, "leased record task failed");
            }
        }
    }
}

impl Drop for LeasedRecord {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The task's state.
#[derive(Debug)]
struct Keeper {
    meta: Arc<dyn MetaStore>,
    key: String,
    ttl: Duration,
    value: watch::Receiver<Vec<u8>>,
    registered: watch::Sender<bool>,
    lease: Option<LeaseId>,
}

impl Keeper {
    async fn run(mut self, stop: CancellationToken) {
        let tick = (self.ttl / 3).max(MIN_TICK);
        let mut warned = false;
        let mut owner_gone = false;
        while !owner_gone {
            if self.lease.is_none() {
                let value = self.value.borrow_and_update().clone();
                let attempt = put_under_new_lease(self.meta.as_ref(), &self.key, value, self.ttl);
                let result = tokio::select! {
                    _ = stop.cancelled() => break,
                    r = attempt => r,
                };
                match result {
                    Ok(lease) => {
                        if warned {
                            tracing::info!(key = %self.key, "registered again");
                        }
                        warned = false;
                        self.lease = Some(lease);
                        self.registered.send_replace(true);
                    }
                    Err(e) if !warned => {
                        warned = true;
                        tracing::warn!(key = %self.key, error = %e, "cannot register; retrying");
                    }
                    Err(_) => {}
                }
            }
            let pause = if self.lease.is_some() {
                tick
            } else {
                RETRY_PAUSE
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(pause) => {
                    if let Some(lease) = self.lease {
                        let r = self.meta.keep_alive(lease).await.map(|_| ());
                        self.check(r);
                    }
                }
                changed = self.value.changed() => match changed {
                    Err(_) => owner_gone = true,
                    Ok(()) => {
                        if let Some(lease) = self.lease {
                            let value = self.value.borrow_and_update().clone();
                            let r = self.meta.put(&self.key, value, Some(lease)).await.map(|_| ());
                            self.check(r);
                        }
                    }
                },
            }
        }
        self.registered.send_replace(false);
        if let Some(lease) = self.lease {
            self.remove(lease).await;
        }
    }

    /// Acts on the store's answer to a keep-alive or a write under the lease.
    fn check(&mut self, r: Result<(), MetaError>) {
        match r {
            Ok(()) => {}
            Err(MetaError::LeaseNotFound(_)) => {
                tracing::warn!(key = %self.key, "lease lost; registering again");
                self.lease = None;
                self.registered.send_replace(false);
            }
            // The lease may still be alive; if it is not, the store says so once it answers.
            Err(e) => tracing::debug!(key = %self.key, error = %e, "keep-alive failed"),
        }
    }

    /// Revokes the lease, which removes the record; deletes the key if that fails.
    async fn remove(&self, lease: LeaseId) {
        let revoked = tokio::time::timeout(STOP_TIMEOUT, self.meta.revoke(lease)).await;
        if matches!(revoked, Ok(Ok(()))) {
            return;
        }
        match tokio::time::timeout(STOP_TIMEOUT, self.meta.delete(&self.key)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(key = %self.key, error = %e, "record left to its lease's TTL")
            }
            Err(_) => tracing::warn!(key = %self.key, "record left to its lease's TTL (timeout)"),
        }
    }
}

/// Grants a lease of `ttl` and puts `key` = `value` under it.
async fn put_under_new_lease(
    meta: &dyn MetaStore,
    key: &str,
    value: Vec<u8>,
    ttl: Duration,
) -> Result<LeaseId, MetaError> {
    let lease = meta.grant(ttl).await?;
    meta.put(key, value, Some(lease)).await?;
    Ok(lease)
}
