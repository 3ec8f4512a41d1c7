//! Leader election over any [`MetaStore`]: whoever creates `key` (attached to its lease)
//! leads; the others watch the key and campaign again when it disappears.
//!
//! Invariants:
//! - At most one candidate holds the key at a time (the create is a transaction that
//!   requires the key to be absent), and the key lives only as long as its holder's lease.
//! - A leader renews its lease every third of the TTL and steps down (reports `Candidate`)
//!   when the lease is gone, when its key is deleted or replaced, or when renewals fail for
//!   long enough that the lease may have expired; it never reports `Leader` past the point
//!   where the store could have expired its lease.
//! - The campaign runs in one task owned by the [`Election`]; [`Election::stop`] (or dropping
//!   the handle) ends it, and it revokes its lease on the way out, so a successor is elected
//!   at once instead of after a TTL.
use crate::keys;
use crate::types::{Compare, LeaseId, MetaError, MetaStore, Txn, TxnOp, WatchEvent, WatchStream};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

/// Where this candidate stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Campaigning, or unable to reach the store.
    Candidate,
    /// This candidate holds the key.
    Leader,
    /// Another candidate holds the key.
    Follower {
        /// The value the leader wrote (for example its API address).
        leader: Vec<u8>,
    },
}

/// One candidate in an election. Dropping it stops the campaign (like [`Election::stop`],
/// without waiting).
#[derive(Debug)]
pub struct Election {
    role: watch::Receiver<Role>,
    stop: CancellationToken,
    task: JoinHandle<()>,
    _stop_on_drop: DropGuard,
}

impl Election {
    /// Starts campaigning for `key` with `value` (what followers see as the leader), holding
    /// it under a lease of `ttl` (at least one second). Must be called inside a Tokio runtime.
    pub fn start(
        store: Arc<dyn MetaStore>,
        key: String,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Election {
        let (role_tx, role) = watch::channel(Role::Candidate);
        let stop = CancellationToken::new();
        let lease_ttl =
            Duration::from_secs(keys::lease_secs(ttl).unwrap_or(keys::MAX_LEASE_TTL.as_secs()));
        let campaign = Campaign {
            store,
            key,
            value,
            ttl: lease_ttl,
            role: role_tx,
            stop: stop.clone(),
            lease: None,
        };
        let task = tokio::spawn(campaign.run());
        Election {
            role,
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
            task,
        }
    }

    /// Role changes, starting with the current role.
    pub fn subscribe(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    /// Whether this candidate leads now.
    pub fn is_leader(&self) -> bool {
        matches!(*self.role.borrow(), Role::Leader)
    }

    /// Resigns (revokes the lease, which deletes the key if held) and waits for the task.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// What to do after a phase of the campaign.
enum Step {
    /// Campaign again now.
    Again,
    /// The store failed: wait, then campaign again.
    Retry(MetaError),
    /// Stop was requested.
    Stopped,
}

struct Campaign {
    store: Arc<dyn MetaStore>,
    key: String,
    value: Vec<u8>,
    /// The lease TTL as the store rounds it.
    ttl: Duration,
    role: watch::Sender<Role>,
    stop: CancellationToken,
    /// The lease held now, revoked on the way out.
    lease: Option<LeaseId>,
}

impl Campaign {
    async fn run(mut self) {
        loop {
            match self.campaign().await {
                Step::Again => {}
                Step::Retry(e) => {
                    tracing::warn!(key = %self.key, error = %e, "leader election: store failed; retrying");
                    self.set(Role::Candidate);
                    let pause =
                        (self.ttl / 3).clamp(Duration::from_millis(100), Duration::from_secs(2));
                    tokio::select! {
                        _ = self.stop.cancelled() => break,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
                Step::Stopped => break,
            }
        }
        self.drop_lease().await;
        self.set(Role::Candidate);
    }

    fn set(&self, role: Role) {
        self.role.send_if_modified(|r| {
            if *r == role {
                false
            } else {
                *r = role;
                true
            }
        });
    }

    /// Runs `fut` unless stop is requested first.
    async fn or_stop<T>(&self, fut: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            _ = self.stop.cancelled() => None,
            r = fut => Some(r),
        }
    }

    /// Revokes the held lease, best effort and bounded in time (it expires anyway).
    async fn drop_lease(&mut self) {
        if let Some(lease) = self.lease.take() {
            let limit = self.ttl.min(Duration::from_secs(5));
            if let Ok(Err(e)) = tokio::time::timeout(limit, self.store.revoke(lease)).await {
                tracing::debug!(key = %self.key, lease, error = %e, "revoking the election lease failed");
            }
        }
    }

    async fn campaign(&mut self) -> Step {
        self.set(Role::Candidate);
        let granted_at = Instant::now();
        let lease = match self.or_stop(self.store.grant(self.ttl)).await {
            None => return Step::Stopped,
            Some(Err(e)) => return Step::Retry(e),
            Some(Ok(lease)) => lease,
        };
        self.lease = Some(lease);
        let txn = Txn {
            compare: vec![Compare::Absent(self.key.clone())],
            success: vec![TxnOp::Put {
                key: self.key.clone(),
                value: self.value.clone(),
                lease: Some(lease),
            }],
            failure: vec![],
        };
        match self.or_stop(self.store.txn(txn)).await {
            None => Step::Stopped,
            Some(Err(e)) => {
                // Perhaps it was applied: revoking the lease removes the key then.
                self.drop_lease().await;
                Step::Retry(e)
            }
            Some(Ok(true)) => self.lead(lease, granted_at).await,
            Some(Ok(false)) => {
                self.drop_lease().await;
                self.follow().await
            }
        }
    }

    /// Follows the current leader until its key disappears.
    async fn follow(&mut self) -> Step {
        loop {
            let (kvs, rev) = match self.or_stop(self.store.range(&self.key)).await {
                None => return Step::Stopped,
                Some(Err(e)) => return Step::Retry(e),
                Some(Ok(r)) => r,
            };
            let Some(current) = kvs.into_iter().find(|kv| kv.key == self.key) else {
                return Step::Again;
            };
            self.set(Role::Follower {
                leader: current.value,
            });
            let mut stream = match self.or_stop(self.store.watch(&self.key, rev)).await {
                None => return Step::Stopped,
                Some(Err(e)) => return Step::Retry(e),
                Some(Ok(s)) => s,
            };
            loop {
                let event = tokio::select! {
                    _ = self.stop.cancelled() => return Step::Stopped,
                    e = stream.recv() => e,
                };
                match event {
                    // The watch broke: read the key again and watch from there.
                    None => break,
                    Some(e) if e.key() != self.key => {}
                    Some(WatchEvent::Delete { .. }) => return Step::Again,
                    Some(WatchEvent::Put(kv)) => self.set(Role::Follower { leader: kv.value }),
                }
            }
        }
    }

    /// Watches our own key from its current revision; `Ok(None)` if it is not ours any more.
    async fn watch_own(&self, lease: LeaseId) -> Result<Option<WatchStream>, MetaError> {
        let Some(kv) = self.store.get(&self.key).await? else {
            return Ok(None);
        };
        if kv.lease != Some(lease) {
            return Ok(None);
        }
        self.store.watch(&self.key, kv.mod_revision).await.map(Some)
    }

    /// Leads until the lease or the key is lost, or stop is requested.
    async fn lead(&mut self, lease: LeaseId, granted_at: Instant) -> Step {
        let renew_every = self.ttl / 3;
        // The store cannot expire the lease before this (it started the TTL after we asked).
        let mut safe_until = granted_at + self.ttl;
        let mut next_renewal = granted_at + renew_every;
        let mut stream = match self.or_stop(self.watch_own(lease)).await {
            None => return Step::Stopped,
            Some(Ok(Some(s))) => Some(s),
            Some(Ok(None)) => return self.step_down(None).await,
            Some(Err(e)) => {
                tracing::debug!(key = %self.key, error = %e, "watching the leader key failed; retrying");
                None
            }
        };
        self.set(Role::Leader);
        tracing::info!(key = %self.key, "became leader");
        loop {
            let event = async {
                match stream.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.stop.cancelled() => return Step::Stopped,
                _ = tokio::time::sleep_until(next_renewal) => {
                    let sent = Instant::now();
                    match self.or_stop(self.store.keep_alive(lease)).await {
                        None => return Step::Stopped,
                        Some(Ok(_)) => {
                            safe_until = sent + self.ttl;
                            next_renewal = sent + renew_every;
                        }
                        Some(Err(MetaError::LeaseNotFound(_))) => {
                            tracing::warn!(key = %self.key, "leader lease expired; stepping down");
                            self.lease = None;
                            return self.step_down(None).await;
                        }
                        Some(Err(e)) => {
                            let now = Instant::now();
                            if now + renew_every >= safe_until {
                                tracing::warn!(key = %self.key, error = %e, "cannot renew the leader lease; stepping down");
                                return self.step_down(Some(e)).await;
                            }
                            tracing::debug!(key = %self.key, error = %e, "renewing the leader lease failed; retrying");
                            next_renewal = now + renew_every / 2;
                        }
                    }
                    if stream.is_none() {
                        match self.or_stop(self.watch_own(lease)).await {
                            None => return Step::Stopped,
                            Some(Ok(Some(s))) => stream = Some(s),
                            Some(Ok(None)) => return self.step_down(None).await,
                            Some(Err(_)) => {}
                        }
                    }
                }
                e = event => match e {
                    None => {
                        // The watch broke: re-check the key now, or at the next renewal.
                        stream = None;
                        match self.or_stop(self.watch_own(lease)).await {
                            None => return Step::Stopped,
                            Some(Ok(Some(s))) => stream = Some(s),
                            Some(Ok(None)) => return self.step_down(None).await,
                            Some(Err(_)) => {}
                        }
                    }
                    Some(e) if e.key() != self.key => {}
                    Some(WatchEvent::Put(kv)) if kv.lease == Some(lease) => {}
                    Some(_) => {
                        tracing::warn!(key = %self.key, "leader key deleted or replaced; stepping down");
                        return self.step_down(None).await;
                    }
                }
            }
        }
    }

    async fn step_down(&mut self, error: Option<MetaError>) -> Step {
        self.set(Role::Candidate);
        self.drop_lease().await;
        match error {
            Some(e) => Step::Retry(e),
            None => Step::Again,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::MemStore;

    const TTL: Duration = Duration::from_secs(3);

    async fn until(rx: &mut watch::Receiver<Role>, pred: impl Fn(&Role) -> bool) -> Role {
        tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|r| pred(r)))
            .await
            .expect("role did not change in time")
            .expect("election task ended")
            .clone()
    }

    fn settled(r: &Role) -> bool {
        !matches!(r, Role::Candidate)
    }

    #[tokio::test(start_paused = true)]
    async fn one_leader_and_fast_failover() {
        let store: Arc<dyn MetaStore> = Arc::new(MemStore::open(None, "").unwrap());
        let a = Election::start(store.clone(), "leader".into(), b"a".to_vec(), TTL);
        let b = Election::start(store.clone(), "leader".into(), b"b".to_vec(), TTL);
        let ra = until(&mut a.subscribe(), settled).await;
        let rb = until(&mut b.subscribe(), settled).await;
        let (leader, follower, leader_value) = match (&ra, &rb) {
            (Role::Leader, Role::Follower { leader }) => (a, b, leader.clone()),
            (Role::Follower { leader }, Role::Leader) => (b, a, leader.clone()),
            other => panic!("expected exactly one leader, got {other:?}"),
        };
        assert_eq!(
            store.get("leader").await.unwrap().unwrap().value,
            leader_value
        );

        // Leadership holds over many TTLs: renewals work.
        tokio::time::sleep(TTL * 10).await;
        assert!(leader.is_leader());
        assert!(matches!(follower.role(), Role::Follower { .. }));

        // Resigning hands over at once (the watch sees the delete), not after a TTL.
        let mut rx = follower.subscribe();
        let t0 = Instant::now();
        leader.stop().await;
        until(&mut rx, |r| *r == Role::Leader).await;
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "{:?}",
            t0.elapsed()
        );
        let kv = store.get("leader").await.unwrap().unwrap();
        assert_ne!(kv.value, leader_value);
        follower.stop().await;
        assert_eq!(store.get("leader").await.unwrap(), None, "stop resigns");
    }

    #[tokio::test(start_paused = true)]
    async fn leader_steps_down_when_its_lease_is_revoked() {
        let store: Arc<dyn MetaStore> = Arc::new(MemStore::open(None, "").unwrap());
        let e = Election::start(store.clone(), "l".into(), b"me".to_vec(), TTL);
        let mut rx = e.subscribe();
        until(&mut rx, |r| *r == Role::Leader).await;
        let first = store.get("l").await.unwrap().unwrap().lease.unwrap();
        store.revoke(first).await.unwrap();
        // It notices, steps down, and wins again with a new lease. (The steps may all happen
        // in one poll of its task, so look at the outcome rather than every role.)
        let second = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                if let Some(kv) = store.get("l").await.unwrap() {
                    if kv.lease != Some(first) {
                        return kv.lease.unwrap();
                    }
                }
            }
        })
        .await
        .unwrap();
        assert_ne!(first, second);
        assert_eq!(until(&mut rx, |r| *r == Role::Leader).await, Role::Leader);
        // A keepalive with the revoked lease would now fail; the new lease is renewed.
        tokio::time::sleep(TTL * 5).await;
        assert_eq!(store.get("l").await.unwrap().unwrap().lease, Some(second));
        e.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn follower_tracks_a_changed_leader_value() {
        let store: Arc<dyn MetaStore> = Arc::new(MemStore::open(None, "").unwrap());
        // Someone else holds the key, without any lease.
        store.put("l", b"other".to_vec(), None).await.unwrap();
        let e = Election::start(store.clone(), "l".into(), b"me".to_vec(), TTL);
        let mut rx = e.subscribe();
        until(&mut rx, |r| {
            *r == Role::Follower {
                leader: b"other".to_vec(),
            }
        })
        .await;
        store.put("l", b"other2".to_vec(), None).await.unwrap();
        until(&mut rx, |r| {
            *r == Role::Follower {
                leader: b"other2".to_vec(),
            }
        })
        .await;
        store.delete("l").await.unwrap();
        until(&mut rx, |r| *r == Role::Leader).await;
        e.stop().await;
    }

    #[tokio::test]
    async fn unreachable_store_stays_candidate_and_stops() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let ca = shoal_pki::DevCa::generate().unwrap();
        let node = shoal_pki::NodeTls::from_node_cert(&ca.issue("n").unwrap()).unwrap();
        let store: Arc<dyn MetaStore> = Arc::new(crate::RemoteStore::connect(addr, &node).unwrap());
        let e = Election::start(store, "l".into(), b"me".to_vec(), TTL);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(e.role(), Role::Candidate);
        tokio::time::timeout(Duration::from_secs(5), e.stop())
            .await
            .unwrap();
    }
}
