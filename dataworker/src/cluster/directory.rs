//! The directory shard this node owns on the ring, and the operations on it.
//!
//! Owners apply `Register`/`Unregister` from holders, answer `Locate` (parking a get until the
//! id is registered, up to its deadline and at most [`MAX_LOCATE_WAITERS`] at once) and carry a
//! delete to every holder they know. [`Cluster::delete`] is the reader's side of a delete: it
//! asks every owner of the id. The shard's tombstones age out in [`Cluster::expire_directory`],
//! a task of its own that stops with the worker's shutdown token.
//!
//! Invariant: the shard and the locates waiting on it share one lock, so a waiter cannot miss
//! the registration that completes it.
use super::{transport_err, wire, Cluster, CALL_TIMEOUT};
use shoal_protocol::{ErrorCode, ObjectId, PeerRequest, PeerResponse, WireError};
use shoal_store::{DirRecord, Directory, DirectoryConfig, Locate};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Most gets waiting at this node (as a directory owner) for objects to be sealed.
const MAX_LOCATE_WAITERS: usize = 65_536;
/// Shortest pause between two expiry passes over the shard.
const MIN_EXPIRY_TICK: Duration = Duration::from_millis(100);

/// The directory shard and the locates waiting on it, under one lock (see the module docs).
#[derive(Debug)]
pub(super) struct DirState {
    pub(super) dir: Directory,
    /// Locates waiting for an id to be registered; dropping the sender wakes them.
    pub(super) waiters: HashMap<ObjectId, watch::Sender<()>>,
}

impl DirState {
    pub(super) fn new() -> DirState {
        DirState {
            dir: Directory::new(DirectoryConfig::default()),
            waiters: HashMap::new(),
        }
    }
}

impl Cluster {
    pub(super) fn dir(&self) -> std::sync::MutexGuard<'_, DirState> {
        self.dir.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ages out the shard's tombstones every third of the lease TTL until shutdown.
    pub(super) async fn expire_directory(self: Arc<Self>) {
        let mut tick = tokio::time::interval((self.cfg.lease_ttl / 3).max(MIN_EXPIRY_TICK));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = tick.tick() => self.dir().dir.expire(self.now_ms()),
            }
        }
    }

    /// Register / Unregister from a holder, applied to this shard.
    pub(super) fn handle_directory(&self, req: PeerRequest) -> PeerResponse {
        let now = self.now_ms();
        let mut d = self.dir();
        match req {
            PeerRequest::Register {
                node,
                incarnation,
                objects,
            } => {
                for o in objects {
                    let id = o.id.clone();
                    let rec = DirRecord {
                        id: o.id,
                        size: o.size,
                        primary: o.primary,
                    };
                    if d.dir.register(&node, incarnation, rec, now).is_ok() {
                        d.waiters.remove(&id);
                    }
                }
                PeerResponse::Ok
            }
            PeerRequest::Unregister { node, ids } => {
                for id in &ids {
                    d.dir.unregister(&node, id);
                }
                PeerResponse::Ok
            }
            _ => PeerResponse::Error(wire(ErrorCode::InvalidArgument, "not a directory update")),
        }
    }

    /// Where is `id`, waiting up to `wait` for it to be sealed somewhere.
    pub(super) async fn locate_here(&self, id: &ObjectId, wait: Duration) -> PeerResponse {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut rx = {
                let mut d = self.dir();
                match d.dir.locate(id, self.now_ms()) {
                    Locate::Found { size, holders } => {
                        return PeerResponse::Located { size, holders }
                    }
                    Locate::Lost => {
                        return PeerResponse::Error(wire(
                            ErrorCode::ObjectLost,
                            format!("{id}: every copy was on nodes that left the cluster"),
                        ))
                    }
                    Locate::Unknown if wait.is_zero() => {
                        return PeerResponse::Error(wire(
                            ErrorCode::NotFound,
                            format!("{id} not found in the cluster"),
                        ))
                    }
                    Locate::Unknown => {
                        if d.waiters.len() >= MAX_LOCATE_WAITERS && !d.waiters.contains_key(id) {
                            return PeerResponse::Error(wire(
                                ErrorCode::Overloaded,
                                "too many gets waiting at this directory owner",
                            ));
                        }
                        d.waiters
                            .entry(id.clone())
                            .or_insert_with(|| watch::channel(()).0)
                            .subscribe()
                    }
                }
            };
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                self.dir().waiters.retain(|_, tx| tx.receiver_count() > 0);
                return PeerResponse::Error(wire(
                    ErrorCode::Timeout,
                    format!("{id} was not sealed in time"),
                ));
            }
        }
    }

    /// The object was deleted: drop the entry here and tell its holders. `NotFound` when this
    /// shard knew no copy.
    pub(super) async fn delete_here(&self, id: &ObjectId) -> PeerResponse {
        let holders = self.dir().dir.delete(id, self.now_ms());
        if holders.is_empty() {
            return PeerResponse::Error(wire(ErrorCode::NotFound, format!("{id} not found")));
        }
        for h in holders {
            if h == self.node_id {
                self.local.drop_copy(id);
            } else if let Some(addr) = self.addr_of(&h) {
                let req = PeerRequest::DropCopies {
                    ids: vec![id.clone()],
                };
                let _ = tokio::time::timeout(
                    CALL_TIMEOUT,
                    self.endpoint.call::<_, PeerResponse>(addr, &req),
                )
                .await;
            }
        }
        PeerResponse::Ok
    }

    /// Deletes `id` everywhere: at its directory owners and every holder they know. Returns
    /// whether some owner knew a copy.
    pub(crate) async fn delete(&self, id: &ObjectId) -> bool {
        let mut found = false;
        for owner in self.owners(id) {
            let r = if owner == self.node_id {
                Ok(self.delete_here(id).await)
            } else {
                self.call_member(&owner, PeerRequest::Delete { id: id.clone() })
                    .await
            };
            found |= matches!(r, Ok(PeerResponse::Ok));
        }
        found
    }

    async fn call_member(&self, node: &str, req: PeerRequest) -> Result<PeerResponse, WireError> {
        let addr = self.addr_of(node).ok_or_else(|| {
            wire(
                ErrorCode::Unavailable,
                format!("node {node} is not a member"),
            )
        })?;
        match tokio::time::timeout(CALL_TIMEOUT, self.endpoint.call(addr, &req)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(transport_err(&e)),
            Err(_) => Err(wire(
                ErrorCode::Timeout,
                format!("node {node} did not answer"),
            )),
        }
    }
}
