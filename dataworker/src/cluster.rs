//! The dataworker in a cluster: membership, the directory shard this node owns, and remote
//! gets over QUIC.
//!
//! - **Membership.** The node registers `nodes/<id>` in the metadata store under a lease and
//!   keeps it alive; it watches `nodes/` and rebuilds the ring when a node comes or goes. When
//!   the store is unreachable the node keeps its last view: the data path never waits on it.
//! - **Directory.** Each object id has `directory_copies` owners on the ring (primary first).
//!   A node that seals an object, or pulls a replica, tells the owners (batched, in the
//!   outbox task); owners answer `Locate`. A full re-registration runs after every ring change
//!   and periodically (anti-entropy), so new owners learn what they own and a node that
//!   re-joins is found again.
//! - **Remote get.** A get of an id that is not local asks the primary owner where it is
//!   (waiting there until it is sealed, up to the get's deadline), creates an unsealed
//!   replica buffer in the local arena, pulls the bytes from a holder in parallel ranges over
//!   several QUIC streams straight into that buffer, seals it and registers the replica. A
//!   failed pull aborts the buffer: nothing half-written becomes visible or leaks.
//!
//! Only sans-IO pieces decide ([`shoal_store::Ring`], [`shoal_store::Directory`]); this module
//! does the IO and owns its tasks, which stop with the worker's shutdown token.
use crate::state::Shared;
use crate::ClusterConfig;
use shoal_meta::records::{node_key, NODES_PREFIX};
use shoal_meta::{Followed, Follower, MetaError, MetaStore, WatchEvent};
use shoal_protocol::{
    ErrorCode, HeldObject, NodeRecord, ObjectId, PeerRequest, PeerResponse, WireError,
};
use shoal_store::{DirRecord, Directory, DirectoryConfig, Locate, Ring, DEFAULT_VNODES};
use shoal_transport::{Body, Endpoint, Reply, Service};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Pause before reading the membership again after the store failed.
const MEMBERSHIP_RETRY: Duration = Duration::from_millis(300);
/// Most ids in one Register/Unregister message (ids are up to 1 KiB: a message stays well
/// under the transport's 1 MiB frame limit).
const BATCH: usize = 512;
/// Most gets waiting at this node (as a directory owner) for objects to be sealed.
const MAX_LOCATE_WAITERS: usize = 65_536;
/// How long one directory call to another node may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A change the data path reports to the outbox.
#[derive(Debug)]
pub(crate) enum Note {
    /// This node now holds a sealed copy.
    Held(HeldObject),
    /// This node dropped its copy (evicted).
    Gone(ObjectId),
    /// Re-register everything held.
    Resync,
}

/// The membership as this node last saw it.
#[derive(Debug)]
struct View {
    members: BTreeMap<String, NodeRecord>,
    ring: Ring,
}

/// The directory shard and the locates waiting on it, under one lock so that a waiter cannot
/// miss the registration that completes it.
#[derive(Debug)]
struct DirState {
    dir: Directory,
    waiters: HashMap<ObjectId, watch::Sender<()>>,
}

type PullResult = Option<Result<(), WireError>>;

/// This node's part of the cluster.
pub(crate) struct Cluster {
    pub(crate) node_id: String,
    pub(crate) incarnation: u64,
    cfg: ClusterConfig,
    meta: Arc<dyn MetaStore>,
    endpoint: Endpoint,
    view: RwLock<View>,
    dir: Mutex<DirState>,
    pulls: Mutex<HashMap<ObjectId, watch::Receiver<PullResult>>>,
    notes: mpsc::Sender<Note>,
    start: Instant,
    /// The worker's tasks and shutdown: pulls run there, detached from the gets that wait.
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.node_id)
            .field("incarnation", &self.incarnation)
            .finish_non_exhaustive()
    }
}

fn wire(code: ErrorCode, msg: impl Into<String>) -> WireError {
    WireError::new(code, msg)
}

fn transport_err(e: &shoal_transport::TransportError) -> WireError {
    use shoal_transport::TransportError as T;
    let code = match e {
        T::Refused { .. } => ErrorCode::PermissionDenied,
        T::FrameTooLarge { .. }
        | T::Malformed { .. }
        | T::Decode { .. }
        | T::UnexpectedBody { .. } => ErrorCode::ProtocolError,
        e if e.is_unreachable() => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    };
    wire(code, e.to_string())
}

impl Cluster {
    /// Builds the cluster side of a worker; [`Cluster::spawn`] starts its tasks.
    pub(crate) fn new(
        node_id: String,
        cfg: ClusterConfig,
        meta: Arc<dyn MetaStore>,
        endpoint: Endpoint,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> (Arc<Cluster>, mpsc::Receiver<Note>) {
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let (tx, rx) = mpsc::channel(cfg.outbox_capacity);
        let ring = Ring::new([node_id.clone()], DEFAULT_VNODES);
        let c = Cluster {
            node_id,
            incarnation,
            cfg,
            meta,
            endpoint,
            view: RwLock::new(View {
                members: BTreeMap::new(),
                ring,
            }),
            dir: Mutex::new(DirState {
                dir: Directory::new(DirectoryConfig::default()),
                waiters: HashMap::new(),
            }),
            pulls: Mutex::new(HashMap::new()),
            notes: tx,
            start: Instant::now(),
            tasks,
            shutdown,
        };
        (Arc::new(c), rx)
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// The QUIC address this node serves peers on.
    pub(crate) fn peer_addr(&self) -> SocketAddr {
        self.endpoint.local_addr()
    }

    fn dir(&self) -> std::sync::MutexGuard<'_, DirState> {
        self.dir.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn view(&self) -> std::sync::RwLockReadGuard<'_, View> {
        self.view.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Node records of the members this node sees (itself included once registered).
    pub(crate) fn members(&self) -> Vec<NodeRecord> {
        self.view().members.values().cloned().collect()
    }

    /// Reports a change of the local store to the owners, without waiting.
    pub(crate) fn note(&self, n: Note) {
        if let Err(e) = self.notes.try_send(n) {
            // The periodic resync repairs what a full outbox dropped.
            metrics::counter!("shoal_cluster_notes_dropped_total").increment(1);
            tracing::debug!(error = %e, "cluster outbox full; the next resync repairs it");
        }
    }

    fn owners(&self, id: &ObjectId) -> Vec<String> {
        self.view()
            .ring
            .owners(id.as_str().as_bytes(), self.cfg.directory_copies)
            .into_iter()
            .map(str::to_string)
            .collect()
    }

    fn addr_of(&self, node: &str) -> Option<SocketAddr> {
        self.view()
            .members
            .get(node)
            .and_then(|r| r.peer_addr.parse().ok())
    }

    /// Starts membership, the outbox and the QUIC server on `tasks`.
    pub(crate) fn spawn(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        notes: mpsc::Receiver<Note>,
        record: NodeRecord,
    ) {
        let svc = Arc::new(PeerService {
            shared: shared.clone(),
            cluster: self.clone(),
        });
        let server = self.endpoint.serve(svc, self.shutdown.clone());
        self.tasks.spawn(async move {
            let _ = server.await;
        });
        self.tasks
            .spawn(self.clone().membership(record, self.shutdown.clone()));
        self.tasks.spawn(
            self.clone()
                .outbox(shared.clone(), notes, self.shutdown.clone()),
        );
    }

    // ----- membership -----

    async fn membership(self: Arc<Self>, record: NodeRecord, shutdown: CancellationToken) {
        let key = node_key(&self.node_id);
        let value = match serde_json::to_vec(&record) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode the node record");
                return;
            }
        };
        let ttl = self.cfg.lease_ttl;
        let mut lease = None;
        let mut members = Follower::new(self.meta.clone(), NODES_PREFIX, MEMBERSHIP_RETRY);
        let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut resync = tokio::time::interval(self.cfg.resync_interval);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        loop {
            if lease.is_none() {
                match self.register(&key, &value, ttl).await {
                    Ok(l) => {
                        lease = Some(l);
                        warned = false;
                        tracing::info!(node = %self.node_id, "registered in the cluster");
                    }
                    Err(e) if !warned => {
                        warned = true;
                        tracing::warn!(error = %e, "cannot register with the metadata store; retrying");
                    }
                    Err(_) => {}
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    if let Some(l) = lease {
                        match self.meta.keep_alive(l).await {
                            Ok(_) => {}
                            Err(MetaError::LeaseNotFound(_)) => {
                                tracing::warn!(node = %self.node_id, "lease expired; registering again");
                                lease = None;
                            }
                            Err(e) => tracing::debug!(error = %e, "keepalive failed; keeping the last view"),
                        }
                    }
                    self.dir().dir.expire(self.now_ms());
                }
                _ = resync.tick() => self.note(Note::Resync),
                // `next` is cancel-safe: a read or watch it gave up on is simply made again.
                f = members.next(&shutdown) => match f {
                    Some(Followed::Snapshot(kvs)) => self.set_members(
                        kvs.into_iter()
                            .filter_map(|kv| serde_json::from_slice::<NodeRecord>(&kv.value).ok())
                            .map(|r| (r.node_id.clone(), r))
                            .collect(),
                    ),
                    Some(Followed::Event(ev)) => self.apply_event(ev),
                    None => break,
                },
            }
        }
        if let Some(l) = lease {
            // Leave at once instead of after the TTL; best effort.
            let _ = tokio::time::timeout(Duration::from_secs(1), self.meta.revoke(l)).await;
        }
    }

    async fn register(&self, key: &str, value: &[u8], ttl: Duration) -> Result<i64, MetaError> {
        let lease = self.meta.grant(ttl).await?;
        self.meta.put(key, value.to_vec(), Some(lease)).await?;
        Ok(lease)
    }

    fn apply_event(&self, ev: WatchEvent) {
        let mut members = self.view().members.clone();
        match ev {
            WatchEvent::Put(kv) => {
                if let Ok(r) = serde_json::from_slice::<NodeRecord>(&kv.value) {
                    members.insert(r.node_id.clone(), r);
                }
            }
            WatchEvent::Delete { key, .. } => {
                if let Some(id) = key.strip_prefix(NODES_PREFIX) {
                    members.remove(id);
                }
            }
        }
        self.set_members(members);
    }

    /// Installs a new membership: drops the copies of nodes that left or restarted, rebuilds
    /// the ring, keeps only the directory entries this node still owns, and re-registers
    /// everything it holds with the (possibly new) owners.
    fn set_members(&self, members: BTreeMap<String, NodeRecord>) {
        let now = self.now_ms();
        let (gone, up) = {
            let v = self.view();
            if v.members == members {
                return;
            }
            let gone: Vec<NodeRecord> = v
                .members
                .values()
                .filter(|old| {
                    members
                        .get(&old.node_id)
                        .is_none_or(|new| new.incarnation != old.incarnation)
                })
                .cloned()
                .collect();
            let up: Vec<NodeRecord> = members
                .values()
                .filter(|new| {
                    v.members
                        .get(&new.node_id)
                        .is_none_or(|old| old.incarnation != new.incarnation)
                })
                .cloned()
                .collect();
            (gone, up)
        };
        let mut ids: Vec<String> = members.keys().cloned().collect();
        ids.push(self.node_id.clone());
        let ring = Ring::new(ids, DEFAULT_VNODES);
        {
            let mut w = self.view.write().unwrap_or_else(|p| p.into_inner());
            w.members = members.clone();
            w.ring = ring.clone();
        }
        let mut lost = Vec::new();
        {
            let mut d = self.dir();
            for r in &gone {
                if !members.contains_key(&r.node_id) {
                    tracing::info!(node = %r.node_id, "node left the cluster");
                    lost.extend(d.dir.node_down(&r.node_id, now));
                }
            }
            for r in &up {
                tracing::info!(node = %r.node_id, addr = %r.peer_addr, "node joined the cluster");
                lost.extend(d.dir.node_up(&r.node_id, r.incarnation, now));
            }
            let me = self.node_id.as_str();
            let copies = self.cfg.directory_copies;
            d.dir
                .retain_owned(|id| ring.owners(id.as_str().as_bytes(), copies).contains(&me));
            // Gets waiting for an id that just became lost answer ObjectLost now.
            for id in &lost {
                d.waiters.remove(id);
            }
        }
        for r in &gone {
            if let Ok(a) = r.peer_addr.parse() {
                self.endpoint.disconnect(a);
            }
        }
        if !lost.is_empty() {
            tracing::warn!(count = lost.len(), "objects lost with their nodes");
            metrics::counter!("shoal_objects_lost_total").increment(lost.len() as u64);
        }
        metrics::gauge!("shoal_cluster_nodes").set(members.len() as f64);
        self.note(Note::Resync);
    }

    // ----- outbox: registrations to the directory owners -----

    async fn outbox(
        self: Arc<Self>,
        shared: Arc<Shared>,
        mut rx: mpsc::Receiver<Note>,
        shutdown: CancellationToken,
    ) {
        let mut retry: Option<tokio::time::Instant> = None;
        // After a failed round, re-register everything after 1 s, then 2 s, ... up to the
        // resync interval: an owner that stays unreachable costs a bounded amount of work.
        let mut backoff = Duration::from_secs(1);
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                n = rx.recv() => match n { Some(n) => n, None => break },
                _ = sleep_until_opt(retry) => Note::Resync,
            };
            retry = None;
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(n) => batch.push(n),
                    Err(_) => break,
                }
            }
            let resync = batch.iter().any(|n| matches!(n, Note::Resync));
            let mut held: Vec<HeldObject> = Vec::new();
            let mut gone: Vec<ObjectId> = Vec::new();
            if resync {
                held = shared.held_objects();
            }
            for n in batch {
                match n {
                    Note::Held(h) if !resync => held.push(h),
                    Note::Gone(id) => gone.push(id),
                    _ => {}
                }
            }
            if self.send_registrations(held, gone).await {
                backoff = Duration::from_secs(1);
            } else {
                retry = Some(tokio::time::Instant::now() + backoff);
                backoff = (backoff * 2).min(self.cfg.resync_interval);
            }
        }
    }

    /// Sends registrations grouped by owner; returns false if some owner was unreachable.
    async fn send_registrations(&self, held: Vec<HeldObject>, gone: Vec<ObjectId>) -> bool {
        let mut reg: BTreeMap<String, Vec<HeldObject>> = BTreeMap::new();
        let mut unreg: BTreeMap<String, Vec<ObjectId>> = BTreeMap::new();
        for h in held {
            for o in self.owners(&h.id) {
                reg.entry(o).or_default().push(h.clone());
            }
        }
        for id in gone {
            for o in self.owners(&id) {
                unreg.entry(o).or_default().push(id.clone());
            }
        }
        let mut ok = true;
        for (owner, objs) in reg {
            for chunk in objs.chunks(BATCH) {
                let req = PeerRequest::Register {
                    node: self.node_id.clone(),
                    incarnation: self.incarnation,
                    objects: chunk.to_vec(),
                };
                ok &= self.tell(&owner, req).await;
            }
        }
        for (owner, ids) in unreg {
            for chunk in ids.chunks(BATCH) {
                let req = PeerRequest::Unregister {
                    node: self.node_id.clone(),
                    ids: chunk.to_vec(),
                };
                ok &= self.tell(&owner, req).await;
            }
        }
        ok
    }

    /// Sends a directory message to `owner` (or applies it here); true when it was applied.
    async fn tell(&self, owner: &str, req: PeerRequest) -> bool {
        if owner == self.node_id {
            return matches!(self.handle_directory(req), PeerResponse::Ok);
        }
        let Some(addr) = self.addr_of(owner) else {
            return false;
        };
        match tokio::time::timeout(CALL_TIMEOUT, self.endpoint.call(addr, &req)).await {
            Ok(Ok(PeerResponse::Ok)) => true,
            Ok(Ok(other)) => {
                tracing::debug!(owner, reply = ?other, "directory update refused");
                true
            }
            Ok(Err(e)) => {
                tracing::debug!(owner, error = %e, "directory update failed");
                false
            }
            Err(_) => false,
        }
    }

    // ----- the owner side -----

    /// Register / Unregister / DropCopies-free directory updates, applied to this shard.
    fn handle_directory(&self, req: PeerRequest) -> PeerResponse {
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
    async fn locate_here(&self, id: &ObjectId, wait: Duration) -> PeerResponse {
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
    async fn delete_here(&self, shared: &Arc<Shared>, id: &ObjectId) -> PeerResponse {
        let holders = self.dir().dir.delete(id, self.now_ms());
        if holders.is_empty() {
            return PeerResponse::Error(wire(ErrorCode::NotFound, format!("{id} not found")));
        }
        for h in holders {
            if h == self.node_id {
                shared.drop_copy(id);
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

    // ----- the reader side -----

    /// Deletes `id` everywhere: at its directory owners and every holder they know. Returns
    /// whether some owner knew a copy.
    pub(crate) async fn delete(&self, shared: &Arc<Shared>, id: &ObjectId) -> bool {
        let mut found = false;
        for owner in self.owners(id) {
            let r = if owner == self.node_id {
                Ok(self.delete_here(shared, id).await)
            } else {
                self.tell_call(&owner, PeerRequest::Delete { id: id.clone() })
                    .await
            };
            found |= matches!(r, Ok(PeerResponse::Ok));
        }
        found
    }

    async fn tell_call(&self, node: &str, req: PeerRequest) -> Result<PeerResponse, WireError> {
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

    /// Makes `id` local: finds it (waiting until `deadline` for it to be sealed when `wait`),
    /// pulls it from a holder and seals it here as a replica. Concurrent pulls of one id share
    /// the work. `Ok` means it is local now (or was meanwhile sealed here).
    ///
    /// The work runs in its own task, not in the caller's future: a get that gives up (its
    /// connection closed, its deadline passed) never cancels a transfer half-way, so the
    /// transfer always ends by sealing or freeing its buffer. It stops at its own deadline or
    /// at shutdown.
    pub(crate) async fn pull(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        id: &ObjectId,
        deadline: tokio::time::Instant,
        wait: bool,
    ) -> Result<(), WireError> {
        let mut rx =
            {
                let mut p = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
                match p.get(id) {
                    Some(rx) => rx.clone(),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        p.insert(id.clone(), rx.clone());
                        let (c, s, id) = (self.clone(), shared.clone(), id.clone());
                        self.tasks.spawn(async move {
                        let r = tokio::select! {
                            r = c.pull_once(&s, &id, deadline, wait) => r,
                            _ = c.shutdown.cancelled() => {
                                Err(wire(ErrorCode::Unavailable, "the dataworker is shutting down"))
                            }
                        };
                        c.pulls.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                        let _ = tx.send(Some(r));
                    });
                        rx
                    }
                }
            };
        loop {
            if let Some(r) = rx.borrow().clone() {
                return r;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    return rx
                        .borrow()
                        .clone()
                        .unwrap_or_else(|| Err(wire(ErrorCode::Internal, "pull abandoned")))
                }
                Err(_) => return Err(wire(ErrorCode::Timeout, format!("{id}: pull timed out"))),
            }
        }
    }

    async fn pull_once(
        &self,
        shared: &Arc<Shared>,
        id: &ObjectId,
        deadline: tokio::time::Instant,
        wait: bool,
    ) -> Result<(), WireError> {
        let mut failed_holders: HashSet<String> = HashSet::new();
        loop {
            let (size, mut holders) = self.locate(id, deadline, wait).await?;
            if holders.contains(&self.node_id) {
                if wait || shared.has_sealed(id) {
                    // Registered here: it is local, or being sealed here and a waiting get
                    // sees it through the local waiters.
                    return Ok(());
                }
                // A registration older than a local delete: not a copy to read.
                holders.retain(|h| *h != self.node_id);
                if holders.is_empty() {
                    return Err(wire(ErrorCode::NotFound, format!("{id} not found")));
                }
            }
            let mut last_err = None;
            let untried: Vec<&String> = holders
                .iter()
                .filter(|h| !failed_holders.contains(*h))
                .collect();
            for h in untried {
                let Some(addr) = self.addr_of(h) else {
                    continue;
                };
                match self.transfer(shared, id, size, addr, deadline).await {
                    Ok(()) => return Ok(()),
                    Err(e) if e.code == ErrorCode::AlreadyExists => return Ok(()),
                    Err(e) if e.code == ErrorCode::PermissionDenied => return Err(e),
                    Err(e) => {
                        tracing::debug!(%id, holder = %h, error = %e, "pull from holder failed");
                        failed_holders.insert(h.clone());
                        last_err = Some(e);
                    }
                }
            }
            // Every known holder failed: wait for membership to catch up (the owner then
            // answers ObjectLost, or names a new holder).
            if tokio::time::Instant::now() + Duration::from_millis(200) >= deadline {
                return Err(last_err.unwrap_or_else(|| {
                    wire(
                        ErrorCode::Timeout,
                        format!("{id}: no holder answered in time"),
                    )
                }));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            if failed_holders.len() >= holders.len() {
                failed_holders.clear();
            }
        }
    }

    /// Asks the owners where `id` is: the primary owner first (waiting there when `wait`), the
    /// next ones when it cannot be reached.
    async fn locate(
        &self,
        id: &ObjectId,
        deadline: tokio::time::Instant,
        wait: bool,
    ) -> Result<(u64, Vec<String>), WireError> {
        loop {
            let owners = self.owners(id);
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let mut unreachable = None;
            // Whether some owner failed in a way that may pass (down, slow): worth retrying.
            let mut transient = false;
            for (i, owner) in owners.iter().enumerate() {
                // Only the primary owner parks a waiting get; the others answer at once.
                let wait_for = if wait && i == 0 {
                    remaining
                } else {
                    Duration::ZERO
                };
                let resp = if *owner == self.node_id {
                    self.locate_here(id, wait_for).await
                } else {
                    let Some(addr) = self.addr_of(owner) else {
                        continue;
                    };
                    let req = PeerRequest::Locate {
                        id: id.clone(),
                        wait_ms: wait_for.as_millis() as u64,
                    };
                    let call = self.endpoint.call::<_, PeerResponse>(addr, &req);
                    match tokio::time::timeout(wait_for + CALL_TIMEOUT, call).await {
                        Ok(Ok(r)) => r,
                        Ok(Err(e)) => {
                            let e = transport_err(&e);
                            transient |= e.code == ErrorCode::Unavailable;
                            unreachable.get_or_insert(e);
                            continue;
                        }
                        Err(_) => {
                            transient = true;
                            unreachable = Some(wire(ErrorCode::Timeout, "owner did not answer"));
                            continue;
                        }
                    }
                };
                match resp {
                    PeerResponse::Located { size, holders } => return Ok((size, holders)),
                    PeerResponse::Error(e)
                        if e.code == ErrorCode::NotFound && i + 1 < owners.len() && !wait =>
                    {
                        // A secondary owner may know it when the primary just changed.
                        unreachable.get_or_insert(e);
                    }
                    PeerResponse::Error(e) if i == 0 || e.code == ErrorCode::ObjectLost => {
                        return Err(e)
                    }
                    PeerResponse::Error(e) => {
                        unreachable.get_or_insert(e);
                    }
                    other => {
                        return Err(wire(
                            ErrorCode::ProtocolError,
                            format!("unexpected locate reply {other:?}"),
                        ))
                    }
                }
            }
            let err = unreachable.unwrap_or_else(|| {
                wire(
                    ErrorCode::NotFound,
                    format!("{id} not found in the cluster"),
                )
            });
            if !transient || (err.code == ErrorCode::NotFound && !wait) {
                return Err(err);
            }
            // Owners unreachable: retry until the deadline (membership may change meanwhile).
            if tokio::time::Instant::now() + Duration::from_millis(200) >= deadline {
                return Err(err);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Pulls `size` bytes of `id` from the node at `addr` into a new replica buffer, in
    /// parallel ranges, and seals it. On failure the buffer is dropped.
    async fn transfer(
        &self,
        shared: &Arc<Shared>,
        id: &ObjectId,
        size: u64,
        addr: SocketAddr,
        deadline: tokio::time::Instant,
    ) -> Result<(), WireError> {
        let started = Instant::now();
        let p = shared.create_replica(id, size)?;
        let streams = self
            .cfg
            .fetch_streams
            .clamp(1, 64)
            .min(size.div_ceil(self.cfg.fetch_chunk).max(1) as usize);
        let per = size.div_ceil(streams as u64).max(1);
        let mut set = tokio::task::JoinSet::new();
        let mut start = 0;
        while start < size || (size == 0 && set.is_empty()) {
            let len = per.min(size - start);
            let endpoint = self.endpoint.clone();
            let shared = shared.clone();
            let req = PeerRequest::Fetch {
                id: id.clone(),
                offset: start,
                len,
            };
            let base = p.offset + start;
            set.spawn(async move {
                let mut got = 0u64;
                let mut sink = |off: u64, bytes: &[u8]| {
                    if off + bytes.len() as u64 > len {
                        return Err(std::io::Error::other("body longer than asked"));
                    }
                    got = got.max(off + bytes.len() as u64);
                    shared
                        .arena
                        .write(base + off, bytes)
                        .map_err(std::io::Error::other)
                };
                let r = endpoint
                    .fetch::<_, PeerResponse>(addr, &req, &mut sink)
                    .await;
                match r {
                    Ok(PeerResponse::Fetched { size: s, len: n }) if n == len && got == len => {
                        Ok(s)
                    }
                    Ok(PeerResponse::Fetched { .. }) => Err(wire(
                        ErrorCode::ObjectLost,
                        "holder sent a different range than asked",
                    )),
                    Ok(PeerResponse::Error(e)) => Err(e),
                    Ok(other) => Err(wire(
                        ErrorCode::ProtocolError,
                        format!("unexpected fetch reply {other:?}"),
                    )),
                    Err(e) => Err(transport_err(&e)),
                }
            });
            start += len;
            if size == 0 {
                break;
            }
        }
        let mut result = Ok(());
        loop {
            let next = tokio::select! {
                n = tokio::time::timeout_at(deadline, set.join_next()) => n,
                _ = self.shutdown.cancelled() => {
                    result = Err(wire(ErrorCode::Unavailable, "the dataworker is shutting down"));
                    break;
                }
            };
            match next {
                Err(_) => {
                    result = Err(wire(
                        ErrorCode::Timeout,
                        format!("{id}: transfer timed out"),
                    ));
                    break;
                }
                Ok(None) => break,
                Ok(Some(Ok(Ok(s)))) if s == size => {}
                Ok(Some(Ok(Ok(_)))) => {
                    result = Err(wire(ErrorCode::ObjectLost, "holder has a different size"));
                    break;
                }
                Ok(Some(Ok(Err(e)))) => {
                    result = Err(e);
                    break;
                }
                Ok(Some(Err(e))) => {
                    result = Err(wire(ErrorCode::Internal, format!("fetch task: {e}")));
                    break;
                }
            }
        }
        if let Err(e) = result {
            // Stop the other ranges before the buffer goes: nothing writes into freed memory.
            set.shutdown().await;
            shared.abort_replica(id);
            return Err(e);
        }
        shared.seal_replica(id)?;
        let secs = started.elapsed().as_secs_f64();
        metrics::counter!("shoal_pull_bytes_total").increment(size);
        metrics::histogram!("shoal_pull_seconds").record(secs);
        tracing::debug!(%id, size, secs, "pulled");
        Ok(())
    }
}

async fn sleep_until_opt(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Answers other dataworkers.
struct PeerService {
    shared: Arc<Shared>,
    cluster: Arc<Cluster>,
}

/// Bytes of a pinned object, streamed to a peer; the pin ends when the body is dropped.
struct PinnedBytes {
    shared: Arc<Shared>,
    gen: u64,
    offset: u64,
    len: u64,
}

impl Body for PinnedBytes {
    fn bytes(&self) -> &[u8] {
        // The pin keeps the range allocated; an out-of-range read is a bug and sends nothing,
        // which the reader sees as a short body.
        self.shared
            .arena
            .bytes(self.offset, self.len)
            .unwrap_or(&[])
    }
}

impl Drop for PinnedBytes {
    fn drop(&mut self) {
        self.shared.release_peer(self.gen);
    }
}

#[async_trait::async_trait]
impl Service for PeerService {
    type Req = PeerRequest;
    type Resp = PeerResponse;

    async fn handle(&self, _peer: SocketAddr, req: PeerRequest) -> Reply<PeerResponse> {
        let resp = match req {
            r @ (PeerRequest::Register { .. } | PeerRequest::Unregister { .. }) => {
                self.cluster.handle_directory(r)
            }
            PeerRequest::Locate { id, wait_ms } => {
                let wait = Duration::from_millis(wait_ms).min(self.shared.cfg.max_get_timeout);
                self.cluster.locate_here(&id, wait).await
            }
            PeerRequest::Delete { id } => self.cluster.delete_here(&self.shared, &id).await,
            PeerRequest::DropCopies { ids } => {
                for id in &ids {
                    self.shared.drop_copy(id);
                }
                PeerResponse::Ok
            }
            PeerRequest::Fetch { id, offset, len } => {
                return match self.shared.pin_for_peer(&id) {
                    Ok(v) => {
                        let off = offset.min(v.len);
                        let n = len.min(v.len - off);
                        metrics::counter!("shoal_serve_bytes_total").increment(n);
                        Reply {
                            resp: PeerResponse::Fetched {
                                size: v.len,
                                len: n,
                            },
                            body: Some(Box::new(PinnedBytes {
                                shared: self.shared.clone(),
                                gen: v.gen,
                                offset: v.offset + off,
                                len: n,
                            })),
                        }
                    }
                    Err(e) => Reply {
                        resp: PeerResponse::Error(e),
                        body: None,
                    },
                };
            }
        };
        Reply { resp, body: None }
    }
}
