//! The node's local store: the arena, the shared index, the spill directory and the
//! [`Store`] that decides about them, and the synchronous handling of each request.
//!
//! Ownership: [`Local`] is created first and shared (`Arc<Local>`) by the client-facing side
//! ([`crate::worker::Worker`]) and, in a cluster, by the cluster side
//! ([`crate::cluster::Cluster`]). It holds neither of them: it tells the cluster about changes
//! only through an [`Outbox`] of [`Note`]s, a bounded channel whose receiver the cluster's
//! outbox task owns. Members and remote gets are the worker's and the cluster's business.
//!
//! Everything that changes the store happens under one mutex, in short critical sections with
//! no await inside. Work that must finish before the arena memory is reused (spill writes,
//! restores, writing key bytes) is done inside the same section. Making a client's segment
//! (which may take milliseconds for a large one) happens outside it, between two sections.
//!
//! Memory: the arena is worker-only (clients map it read-only); payloads a client writes go
//! to segments ([`crate::segments`]), kept in [`Inner::segments`] by generation and dropped
//! when the store lists them as freed, which [`Locked`] does each time the lock is released.
use crate::cluster::{Note, Outbox};
use crate::segments::{PinnedData, ReplicaTarget, Seg};
use crate::spill::SpillDir;
use crate::Config;
use shoal_meta::records::Quota;
use shoal_protocol::HeldObject;
use shoal_protocol::{
    ErrorCode, KvEntry, Namespace, ObjectId, Request, Response, StatusInfo, ViewDesc, WireError,
};
use shoal_shm::{key_hash, Arena, Ctl, IndexEntry, IndexWriter, SegmentPool, ShmError};
use shoal_store::{
    Backing, ClientId, Evicted, ExternalPins, Gen, Lookup, Placement, Store, StoreConfig,
    StoreError, TenantLimits, TenantUsage,
};
use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::watch;

/// Most entries one `list` reply carries.
const MAX_LIST: usize = 10_000;
/// The client id under which copies for and from other nodes are pinned and created.
pub(crate) const PEER_CLIENT: ClientId = u64::MAX;

/// Segment budget pooled ahead of use, at most (see [`SegmentPool`]).
const POOL_BYTES: u64 = 256 << 20;
/// Segments smaller than this are made on the spot (cheap), not pooled.
const POOL_MIN: u64 = 1 << 20;

/// The clients' pin pages seen as the store's external pins: only pins by clients of the
/// entry's own tenant count.
struct IndexPins<'a> {
    index: &'a mut IndexWriter,
    tenants: &'a HashMap<String, u32>,
}

impl ExternalPins for IndexPins<'_> {
    fn is_pinned(&self, gen: Gen, tenant: &str) -> bool {
        self.tenants
            .get(tenant)
            .is_some_and(|t| self.index.is_pinned(gen, *t))
    }
    fn reclaim(&mut self, gen: Gen, tenant: &str) -> bool {
        self.index.unpublish(gen);
        !self.is_pinned(gen, tenant)
    }
}

/// The external pins of `g` (a macro so that `g.store` can be borrowed beside it).
macro_rules! ext {
    ($g:expr) => {
        &mut IndexPins {
            index: &mut $g.index,
            tenants: &$g.tenant_ids,
        }
    };
}

pub(crate) struct Inner {
    pub(crate) store: Store,
    pub(crate) index: IndexWriter,
    /// Segments of live entries, by generation.
    segments: HashMap<Gen, Arc<Seg>>,
    /// Tenants numbered for the pin pages (interned once, never reused).
    tenant_ids: HashMap<String, u32>,
    tenant_names: Vec<String>,
    /// Gets waiting for a name to be sealed; dropping the sender wakes them.
    waiters: HashMap<(Namespace, ObjectId), watch::Sender<()>>,
    free_regions: Vec<u32>,
    pub(crate) clients: usize,
    /// When the gauges were last exported (ms on the worker clock).
    gauges_at: u64,
    /// Tenants' quota records (`quotas/<tenant>`), as the worker last read them.
    quotas: HashMap<String, Quota>,
    /// Tenants whose usage gauges were exported (so a tenant that left is set to zero).
    gauge_tenants: HashSet<String>,
}

/// One tenant's line of `/v1/usage`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct UsageLine {
    /// Arena bytes held (payloads and names, sealed or not).
    pub(crate) arena_bytes: u64,
    /// Bytes spilled to disk.
    pub(crate) spill_bytes: u64,
    /// The tenant's quota record, if it has one.
    pub(crate) quota: Option<Quota>,
}

fn limits_of(q: &Quota) -> TenantLimits {
    TenantLimits {
        arena_bytes: q.arena_bytes,
        spill_bytes: q.spill_bytes,
    }
}

impl Inner {
    fn tenant_id(&mut self, tenant: &str) -> u32 {
        if let Some(t) = self.tenant_ids.get(tenant) {
            return *t;
        }
        let t = self.tenant_names.len() as u32;
        self.tenant_names.push(tenant.to_owned());
        self.tenant_ids.insert(tenant.to_owned(), t);
        t
    }
}

/// The store lock. Releasing it drops the memfds of the segments the store freed meanwhile
/// (after the lock: freeing a large segment's pages takes a while).
pub(crate) struct Locked<'a>(Option<MutexGuard<'a, Inner>>);

impl std::ops::Deref for Locked<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        self.0.as_deref().unwrap_or_else(|| unreachable!())
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        self.0.as_deref_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        if let Some(mut g) = self.0.take() {
            let freed = g.store.take_freed_segments();
            let dead: Vec<Arc<Seg>> = freed
                .iter()
                .filter_map(|gen| g.segments.remove(gen))
                .collect();
            drop(g);
            drop(dead);
        }
    }
}

/// The node's local store, shared by the worker and the cluster side; see the module docs.
pub(crate) struct Local {
    pub(crate) cfg: Config,
    /// Worker-only: clients map it read-only (sealed `F_SEAL_FUTURE_WRITE`).
    pub(crate) arena: Arena,
    /// A read-only fd of the arena, for clients.
    arena_ro: OwnedFd,
    pub(crate) ctl: Arc<Ctl>,
    pool: SegmentPool,
    spill: Option<SpillDir>,
    inner: Mutex<Inner>,
    start: Instant,
    /// Where changes of the sealed objects go when the node is in a cluster.
    outbox: Option<Outbox>,
}

impl std::fmt::Debug for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Local")
            .field("node", &self.cfg.node_id)
            .finish_non_exhaustive()
    }
}

/// How a get treats objects that are not sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GetMode {
    /// Wait for them (returns receivers).
    Wait,
    /// The caller asked not to wait: `NotFound`.
    NoWait,
    /// The deadline passed: `Timeout`.
    Expired,
}

/// What a get that cannot complete now waits on: the ids not sealed here yet, each with a
/// receiver that fires when it is.
pub(crate) enum GetOutcome {
    Done(Response),
    Wait(Vec<(ObjectId, watch::Receiver<()>)>),
}

fn store_err(e: StoreError) -> WireError {
    e.to_wire()
}

fn view(p: &Placement) -> ViewDesc {
    ViewDesc {
        gen: p.gen,
        offset: p.offset,
        len: p.len,
        segment: p.segment,
    }
}

fn internal(e: impl std::fmt::Display) -> WireError {
    WireError::new(ErrorCode::Internal, e.to_string())
}

/// The segment views of a reply, in order.
fn segment_views(resp: &mut Response) -> Vec<&mut Result<ViewDesc, WireError>> {
    match resp {
        Response::Views(v) => v
            .iter_mut()
            .filter(|r| r.as_ref().is_ok_and(|d| d.segment))
            .collect(),
        _ => Vec::new(),
    }
}

impl Local {
    /// Creates the arena, the shared index and the spill directory. `outbox` is the cluster's
    /// (None for a standalone node).
    pub(crate) fn new(cfg: Config, outbox: Option<Outbox>) -> Result<Local, crate::StartError> {
        // Refuse to run on a kernel that would let a client write what it may only read.
        shoal_shm::probe::check_kernel_seals()?;
        // The arena is reserved now; segments take their pages as clients write them, so the
        // whole budget must fit the machine (or the memory cgroup) from the start.
        if let Some(available) = shoal_shm::available_memory() {
            if cfg.shm_size > available {
                return Err(ShmError::TooBig {
                    size: cfg.shm_size,
                    available,
                }
                .into());
            }
        }
        let arena = Arena::create_worker_only(
            &format!("shoal-arena-{}", cfg.node_id),
            cfg.arena_bytes(),
            cfg.shm_populate,
        )?;
        let arena_ro = arena.read_only_fd()?;
        let ctl = Arc::new(Ctl::create(
            cfg.index_buckets,
            cfg.fast_clients,
            cfg.pins_per_client,
        )?);
        let spill = match &cfg.spill_dir {
            Some(d) => Some(
                SpillDir::open(d).map_err(|source| crate::StartError::SpillDir {
                    path: d.clone(),
                    source,
                })?,
            ),
            None => None,
        };
        let mut scfg = StoreConfig::new(cfg.arena_bytes());
        scfg.segment_capacity = cfg.shm_size - cfg.arena_bytes();
        scfg.segment_above = cfg.inline_limit;
        scfg.high_watermark = cfg.high_watermark;
        scfg.low_watermark = cfg.low_watermark;
        scfg.spill = spill.is_some();
        scfg.keep_primaries = cfg.cluster.is_some();
        let pool = SegmentPool::new(POOL_BYTES.min(scfg.segment_capacity / 8), POOL_MIN)?;
        let inner = Inner {
            store: Store::new(scfg),
            index: IndexWriter::new(ctl.clone())?,
            segments: HashMap::new(),
            tenant_ids: HashMap::new(),
            tenant_names: Vec::new(),
            waiters: HashMap::new(),
            free_regions: (0..ctl.fast_clients()).rev().collect(),
            clients: 0,
            gauges_at: 0,
            quotas: HashMap::new(),
            gauge_tenants: HashSet::new(),
        };
        Ok(Local {
            cfg,
            arena,
            arena_ro,
            ctl,
            pool,
            spill,
            inner: Mutex::new(inner),
            start: Instant::now(),
            outbox,
        })
    }

    /// Milliseconds since start: the clock of the store and of the shared index.
    pub(crate) fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    pub(crate) fn lock(&self) -> Locked<'_> {
        // A panic while holding the lock is a bug; keep serving rather than poisoning everyone.
        Locked(Some(self.inner.lock().unwrap_or_else(|p| p.into_inner())))
    }

    /// A read-only fd of the arena, for a client.
    pub(crate) fn arena_fd(&self) -> Result<OwnedFd, ShmError> {
        self.arena_ro
            .try_clone()
            .map_err(|source| ShmError::Map { size: 0, source })
    }

    /// Registers a client. Returns its pin region if one is free.
    pub(crate) fn client_joined(&self) -> Result<Option<u32>, WireError> {
        let mut g = self.lock();
        if g.clients >= self.cfg.max_clients {
            return Err(WireError::new(ErrorCode::Overloaded, "too many clients"));
        }
        g.clients += 1;
        let region = g.free_regions.pop();
        metrics::gauge!("shoal_clients").set(g.clients as f64);
        Ok(region)
    }

    /// Makes the pin page of a client of `tenant` that got `region`, and returns the fd to
    /// pass it. `None` (no fast path for that client) if it cannot be made.
    pub(crate) fn attach_pin_page(&self, region: u32, tenant: &str) -> Option<OwnedFd> {
        let page = match self.ctl.new_pin_page() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "no pin page for a client; socket reads only");
                return None;
            }
        };
        let fd = page.fd().try_clone_to_owned().ok()?;
        let mut g = self.lock();
        let t = g.tenant_id(tenant);
        g.index.attach(region, page, t).then_some(fd)
    }

    /// Releases everything a client held, at once: its pin page goes and every pin in it.
    /// Its mailbox must be closed already (see [`crate::worker::Worker::client_left`]).
    pub(crate) fn client_left(&self, client: ClientId, region: Option<u32>) {
        let mut g = self.lock();
        let g = &mut *g;
        if let Some(r) = region {
            g.index.detach(r);
            g.free_regions.push(r);
        }
        g.store.client_gone(client, ext!(g));
        g.store.sweep(ext!(g));
        g.clients -= 1;
        metrics::gauge!("shoal_clients").set(g.clients as f64);
    }

    // ----- helpers run under the lock -----

    fn cluster_note(&self, n: Note) {
        if let Some(o) = &self.outbox {
            o.note(n);
        }
    }

    fn apply_evictions(&self, g: &mut Inner, evicted: Vec<Evicted>) {
        for ev in evicted {
            metrics::counter!("shoal_evictions_total").increment(1);
            if !ev.spill {
                if ev.ns == Namespace::Object {
                    self.cluster_note(Note::Gone(ev.id.clone()));
                }
                continue;
            }
            let Some(spill) = &self.spill else { continue };
            match self.spill_one(g, spill, &ev) {
                Ok(()) => metrics::counter!("shoal_spills_total").increment(1),
                Err(e) => {
                    tracing::warn!(id = %ev.id, error = %e, "spill failed; dropping the object");
                    g.store.forget(ev.gen);
                }
            }
        }
    }

    /// Writes an evicted entry's bytes to its spill file (its memory is still there).
    fn spill_one(&self, g: &Inner, spill: &SpillDir, ev: &Evicted) -> std::io::Result<()> {
        if ev.segment {
            let seg = g
                .segments
                .get(&ev.gen)
                .ok_or_else(|| std::io::Error::other("segment missing"))?;
            let map = seg.map().map_err(std::io::Error::other)?;
            spill.write(ev.gen, map.bytes(0, ev.len).map_err(std::io::Error::other)?)
        } else {
            let len = usize::try_from(ev.len).map_err(std::io::Error::other)?;
            let mut buf = vec![0u8; len];
            self.arena
                .read_into(ev.offset, &mut buf)
                .map_err(std::io::Error::other)?;
            spill.write(ev.gen, &buf)
        }
    }

    fn publish(&self, g: &mut Inner, ns: Namespace, id: &ObjectId, p: &Placement) {
        let name = id.as_str().as_bytes();
        g.index.publish(IndexEntry {
            tag: ns.tag(),
            hash: key_hash(ns.tag(), name),
            gen: p.gen,
            offset: p.offset,
            len: p.len,
            key_off: p.key_off,
            key_len: name.len() as u32,
            segment: p.segment,
        });
    }

    fn wake(g: &mut Inner, ns: Namespace, id: &ObjectId) {
        // Dropping the sender completes every receiver's `changed()`.
        g.waiters.remove(&(ns, id.clone()));
    }

    fn write_key(&self, p: &Placement, id: &ObjectId) -> Result<(), WireError> {
        self.arena
            .write(p.key_off, id.as_str().as_bytes())
            .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))
    }

    fn forget_spilled(&self, gen: Gen, spilled: bool) {
        if spilled {
            if let Some(s) = &self.spill {
                s.remove(gen);
            }
        }
    }

    /// An arena buffer the worker fills itself (inline puts, small replicas).
    fn create(
        &self,
        g: &mut Inner,
        client: ClientId,
        id: &ObjectId,
        size: u64,
    ) -> Result<Placement, WireError> {
        let (p, ev) = g
            .store
            .create(id, size, client, ext!(g))
            .map_err(store_err)?;
        self.apply_evictions(g, ev);
        self.write_key(&p, id)?;
        Ok(p)
    }

    /// A client's create of an object or KV value: a segment of its own, made outside the
    /// lock. Replies the view; the segment's fd goes with it ([`Local::attach_fds`]).
    fn create_segment(
        &self,
        client: ClientId,
        ns: Namespace,
        id: &ObjectId,
        size: u64,
    ) -> Result<Response, WireError> {
        if size == 0 {
            // Nothing to write: an arena entry with no payload.
            let mut g = self.lock();
            let g = &mut *g;
            let p = match ns {
                Namespace::Object => self.create(g, client, id, 0)?,
                Namespace::Kv => {
                    let (p, ev) = g
                        .store
                        .kv_create(id, 0, client, ext!(g))
                        .map_err(store_err)?;
                    self.apply_evictions(g, ev);
                    self.write_key(&p, id)?;
                    p
                }
            };
            return Ok(Response::View(view(&p)));
        }
        let p = {
            let mut g = self.lock();
            let g = &mut *g;
            let (p, ev) = match ns {
                Namespace::Object => g
                    .store
                    .create_in(id, size, client, Backing::Segment, ext!(g)),
                Namespace::Kv => g
                    .store
                    .kv_create_in(id, size, client, Backing::Segment, ext!(g)),
            }
            .map_err(store_err)?;
            self.apply_evictions(g, ev);
            if let Err(e) = self.write_key(&p, id) {
                Self::drop_unsealed(g, ns, id, client);
                return Err(e);
            }
            p
        };
        let made = self.pool.take(size);
        let mut g = self.lock();
        let seg = match made {
            Ok(s) => s,
            Err(e) => {
                Self::drop_unsealed(&mut g, ns, id, client);
                return Err(WireError::new(
                    ErrorCode::StoreFull,
                    format!("cannot make a {size}-byte segment: {e}"),
                ));
            }
        };
        if !g.store.is_unsealed_of(p.gen, client) {
            // Aborted (or the client left) while the segment was being made.
            return Err(WireError::new(
                ErrorCode::NotFound,
                format!("{id} was dropped while it was being created"),
            ));
        }
        g.segments.insert(p.gen, Arc::new(Seg::new(seg, size)));
        Ok(Response::View(view(&p)))
    }

    fn drop_unsealed(g: &mut Inner, ns: Namespace, id: &ObjectId, client: ClientId) {
        match ns {
            Namespace::Object => {
                let _ = g.store.abort(id, client);
            }
            Namespace::Kv => g.store.kv_abort(id, client),
        }
    }

    /// Makes the bytes of `client`'s unsealed `id` immutable, if they are a segment: the
    /// kernel refuses while any writable mapping of it exists, and then nothing changes.
    fn seal_segment(
        &self,
        g: &Inner,
        ns: Namespace,
        id: &ObjectId,
        client: ClientId,
    ) -> Result<(), WireError> {
        let Some(gen) = g.store.unsealed_gen(ns, id, client) else {
            // Not an unsealed buffer of this client: the store says which error.
            return Ok(());
        };
        let is_segment = g.store.placement(gen).is_some_and(|p| p.segment);
        match g.segments.get(&gen) {
            Some(s) => s.seg.seal().map_err(|e| match e {
                ShmError::StillMapped => WireError::new(
                    ErrorCode::InvalidArgument,
                    format!("{id}: the buffer is still mapped writable; unmap it, then seal"),
                ),
                e => internal(format!("{id}: sealing its segment: {e}")),
            }),
            None if is_segment => Err(WireError::new(
                ErrorCode::Unavailable,
                format!("{id} is still being created"),
            )),
            None => Ok(()),
        }
    }

    fn seal(&self, g: &mut Inner, client: ClientId, id: &ObjectId) -> Result<(), WireError> {
        self.seal_segment(g, Namespace::Object, id, client)?;
        let p = g.store.seal(id, client, self.now_ms()).map_err(store_err)?;
        self.publish(g, Namespace::Object, id, &p);
        Self::wake(g, Namespace::Object, id);
        self.cluster_note(Note::Held(HeldObject {
            id: id.clone(),
            size: p.len,
            primary: !g.store.is_replica(id),
        }));
        Ok(())
    }

    /// Resolves one name and pins it; restores it from disk if spilled.
    fn lookup(
        &self,
        g: &mut Inner,
        ns: Namespace,
        id: &ObjectId,
        client: ClientId,
    ) -> Result<Option<ViewDesc>, WireError> {
        let now = self.now_ms();
        match g.store.get(ns, id, client, now) {
            Lookup::Ready(p) => Ok(Some(view(&p))),
            Lookup::Missing | Lookup::Unsealed => Ok(None),
            Lookup::Spilled(gen) => {
                let (p, ev) = g.store.restore(gen, now, ext!(g)).map_err(store_err)?;
                self.apply_evictions(g, ev);
                let spill = self.spill.as_ref().ok_or_else(|| {
                    WireError::new(ErrorCode::Internal, "spilled without a spill dir")
                })?;
                if let Err(e) = self
                    .restore_bytes(g, spill, &p)
                    .and_then(|()| self.write_key(&p, id).map_err(std::io::Error::other))
                {
                    g.store.forget(gen);
                    spill.remove(gen);
                    return Err(WireError::new(
                        ErrorCode::ObjectLost,
                        format!("{id}: spill file unreadable: {e}"),
                    ));
                }
                spill.remove(gen);
                self.publish(g, ns, id, &p);
                match g.store.get(ns, id, client, now) {
                    Lookup::Ready(p) => Ok(Some(view(&p))),
                    _ => Ok(None),
                }
            }
        }
    }

    /// Reads a spilled entry back into its new placement (a new segment, sealed at once, or
    /// the arena).
    fn restore_bytes(&self, g: &mut Inner, spill: &SpillDir, p: &Placement) -> std::io::Result<()> {
        if !p.segment {
            return spill.read(p.gen, p.len, |off, b| {
                self.arena
                    .write(p.offset + off, b)
                    .map_err(std::io::Error::other)
            });
        }
        let seg = shoal_shm::Segment::create(p.len).map_err(std::io::Error::other)?;
        spill.read(p.gen, p.len, |off, b| {
            seg.write_at(off, b).map_err(std::io::Error::other)
        })?;
        seg.seal().map_err(std::io::Error::other)?;
        g.segments.insert(p.gen, Arc::new(Seg::new(seg, p.len)));
        Ok(())
    }

    /// Tries to complete a get now. When some object is not sealed yet and the caller will
    /// wait, returns receivers that fire when one of them is; pins nothing in that case.
    pub(crate) fn try_get(&self, client: ClientId, ids: &[ObjectId], mode: GetMode) -> GetOutcome {
        self.try_get_settled(client, ids, mode, &HashMap::new())
    }

    /// [`Local::try_get`] where the ids in `settled` are answered with their error (a remote
    /// pull of them failed) instead of being looked up or waited for.
    pub(crate) fn try_get_settled(
        &self,
        client: ClientId,
        ids: &[ObjectId],
        mode: GetMode,
        settled: &HashMap<ObjectId, WireError>,
    ) -> GetOutcome {
        let mut g = self.lock();
        let g = &mut *g;
        let now = self.now_ms();
        if mode == GetMode::Wait {
            let pending: Vec<&ObjectId> = ids
                .iter()
                .filter(|id| !settled.contains_key(*id))
                .filter(|id| !g.store.contains(Namespace::Object, id, now))
                .collect();
            if !pending.is_empty() {
                let rx = pending
                    .into_iter()
                    .map(|id| {
                        let rx = g
                            .waiters
                            .entry((Namespace::Object, id.clone()))
                            .or_insert_with(|| watch::channel(()).0)
                            .subscribe();
                        (id.clone(), rx)
                    })
                    .collect();
                return GetOutcome::Wait(rx);
            }
        }
        let out = ids
            .iter()
            .map(|id| {
                if let Some(e) = settled.get(id) {
                    return Err(e.clone());
                }
                match self.lookup(g, Namespace::Object, id, client) {
                    Ok(Some(v)) => Ok(v),
                    Ok(None) if mode == GetMode::Expired => Err(WireError::new(
                        ErrorCode::Timeout,
                        format!("{id} was not sealed in time"),
                    )),
                    Ok(None) => Err(WireError::new(
                        ErrorCode::NotFound,
                        format!("{id} not found"),
                    )),
                    Err(e) => Err(e),
                }
            })
            .collect();
        GetOutcome::Done(Response::Views(out))
    }

    /// Forgets waiter entries nobody listens to any more (after a get timed out).
    pub(crate) fn drop_idle_waiters(&self) {
        self.lock().waiters.retain(|_, tx| tx.receiver_count() > 0);
    }

    /// Handles every request that completes without waiting.
    pub(crate) fn handle(&self, client: ClientId, req: Request) -> Response {
        let r = match req {
            Request::Create { id, size } => self
                .check_size(size)
                .and_then(|()| self.create_segment(client, Namespace::Object, &id, size)),
            Request::KvCreate { key, size } => self
                .check_size(size)
                .and_then(|()| self.create_segment(client, Namespace::Kv, &key, size)),
            req => self.handle_inner(client, req),
        };
        r.unwrap_or_else(Response::Error)
    }

    fn check_size(&self, size: u64) -> Result<(), WireError> {
        let budget = self.cfg.shm_size - self.cfg.arena_bytes();
        if size > budget {
            return Err(WireError::new(
                ErrorCode::StoreFull,
                format!("{size} bytes is larger than all the shared memory for objects ({budget})"),
            ));
        }
        Ok(())
    }

    /// The fds a socket reply carries: one per segment view, in order (read-write for the
    /// client's own unsealed buffer, read-only otherwise). A view whose segment is gone (it
    /// raced with a delete) becomes an error, so the count always matches.
    pub(crate) fn attach_fds(&self, client: ClientId, resp: &mut Response) -> Vec<OwnedFd> {
        let has = match resp {
            Response::View(d) => d.segment,
            Response::Views(v) => v.iter().any(|r| r.as_ref().is_ok_and(|d| d.segment)),
            _ => false,
        };
        if !has {
            return Vec::new();
        }
        let g = self.lock();
        let fd_of = |d: &ViewDesc| -> Result<OwnedFd, WireError> {
            let seg = g
                .segments
                .get(&d.gen)
                .ok_or_else(|| WireError::new(ErrorCode::NotFound, "the object went meanwhile"))?;
            if g.store.is_unsealed_of(d.gen, client) {
                seg.writer_fd().map_err(internal)
            } else if seg.seg.is_sealed() {
                seg.reader_fd().map_err(internal)
            } else {
                Err(WireError::new(ErrorCode::NotSealed, "not sealed yet"))
            }
        };
        let mut fds = Vec::new();
        if let Response::View(d) = resp {
            match fd_of(d) {
                Ok(fd) => fds.push(fd),
                Err(e) => *resp = Response::Error(e),
            }
            return fds;
        }
        for r in segment_views(resp) {
            if let Ok(d) = r {
                match fd_of(d) {
                    Ok(fd) => fds.push(fd),
                    Err(e) => *r = Err(e),
                }
            }
        }
        fds
    }

    fn check_inline(&self, len: usize) -> Result<(), WireError> {
        if len as u64 > self.cfg.inline_limit {
            return Err(WireError::new(
                ErrorCode::TooLarge,
                format!(
                    "{len} bytes inline; the limit is {} (use create/seal)",
                    self.cfg.inline_limit
                ),
            ));
        }
        Ok(())
    }

    fn kv_set(
        &self,
        g: &mut Inner,
        client: ClientId,
        key: &ObjectId,
        value: &[u8],
        ttl_secs: u64,
    ) -> Result<(), WireError> {
        let (p, ev) = g
            .store
            .kv_create(key, value.len() as u64, client, ext!(g))
            .map_err(store_err)?;
        self.apply_evictions(g, ev);
        let written = self
            .write_key(&p, key)
            .and_then(|()| self.arena.write(p.offset, value).map_err(internal));
        if let Err(e) = written {
            g.store.kv_abort(key, client);
            return Err(e);
        }
        self.kv_commit(g, client, key, ttl_secs)
    }

    fn kv_commit(
        &self,
        g: &mut Inner,
        client: ClientId,
        key: &ObjectId,
        ttl_secs: u64,
    ) -> Result<(), WireError> {
        self.seal_segment(g, Namespace::Kv, key, client)?;
        let now = self.now_ms();
        let (p, replaced) = g
            .store
            .kv_commit(key, client, ttl_secs.saturating_mul(1000), now, ext!(g))
            .map_err(store_err)?;
        if let Some((gen, spilled)) = replaced {
            self.forget_spilled(gen, spilled);
        }
        // A key with a TTL stays out of the shared index: readers there cannot tell it has
        // expired before the reaper removes it, the worker can.
        if ttl_secs == 0 {
            self.publish(g, Namespace::Kv, key, &p);
        }
        Ok(())
    }

    fn handle_inner(&self, client: ClientId, req: Request) -> Result<Response, WireError> {
        let mut guard = self.lock();
        let g = &mut *guard;
        let now = self.now_ms();
        Ok(match req {
            Request::Create { .. } | Request::KvCreate { .. } => {
                return Err(internal("create is handled before the lock"));
            }
            Request::Seal { id } => {
                self.seal(g, client, &id)?;
                Response::Ok
            }
            Request::Abort { id } => {
                g.store.abort(&id, client).map_err(store_err)?;
                Response::Ok
            }
            Request::Put { id, data } => {
                self.check_inline(data.len())?;
                let p = self.create(g, client, &id, data.len() as u64)?;
                if let Err(e) = self.arena.write(p.offset, &data) {
                    let _ = g.store.abort(&id, client);
                    return Err(internal(e));
                }
                self.seal(g, client, &id)?;
                Response::Ok
            }
            Request::Get { .. } => {
                return Err(WireError::new(
                    ErrorCode::Internal,
                    "get is handled by the connection",
                ));
            }
            Request::Release { gens } => {
                for gen in gens {
                    g.store.release(client, gen, ext!(g));
                }
                Response::Ok
            }
            Request::Delete { id } => {
                let (gen, spilled) = g
                    .store
                    .delete(Namespace::Object, &id, ext!(g))
                    .map_err(store_err)?;
                self.forget_spilled(gen, spilled);
                Self::wake(g, Namespace::Object, &id);
                // Queued behind this copy's registration, so the owners end up without it
                // whichever of the two they hear first.
                self.cluster_note(Note::Gone(id));
                Response::Ok
            }
            Request::Contains { ids } => Response::Bools(
                ids.iter()
                    .map(|id| g.store.contains(Namespace::Object, id, now))
                    .collect(),
            ),
            Request::List { ns, prefix, limit } => {
                // Bounded so a reply always fits in one frame.
                let limit = (limit as usize).min(MAX_LIST);
                Response::List(g.store.list(ns, &prefix, limit, now))
            }
            Request::KvSet {
                key,
                value,
                ttl_secs,
                if_absent,
            } => {
                self.check_inline(value.len())?;
                if if_absent && g.store.contains(Namespace::Kv, &key, now) {
                    Response::Bools(vec![false])
                } else {
                    self.kv_set(g, client, &key, &value, ttl_secs)?;
                    Response::Bools(vec![true])
                }
            }
            Request::KvCommit { key, ttl_secs } => {
                self.kv_commit(g, client, &key, ttl_secs)?;
                Response::Ok
            }
            Request::KvMSet { entries, ttl_secs } => {
                let total: usize = entries.iter().map(|e| e.value.len()).sum();
                self.check_inline(total)?;
                // All or nothing for the quota: the keys (all of the caller's tenant) are
                // checked together before the first is written.
                if let Some(first) = entries.first() {
                    let charge: u64 = entries
                        .iter()
                        .map(|e| (e.value.len() + e.key.local().len()) as u64)
                        .sum();
                    g.store
                        .admit(first.key.tenant(), charge)
                        .map_err(store_err)?;
                }
                for KvEntry { key, value } in &entries {
                    self.kv_set(g, client, key, value, ttl_secs)?;
                }
                Response::Ok
            }
            Request::KvGet { keys } => Response::Views(
                keys.iter()
                    .map(|k| match self.lookup(g, Namespace::Kv, k, client) {
                        Ok(Some(v)) => Ok(v),
                        Ok(None) => Err(WireError::new(
                            ErrorCode::NotFound,
                            format!("{k} not found"),
                        )),
                        Err(e) => Err(e),
                    })
                    .collect(),
            ),
            Request::KvRead { key, offset, len } => {
                let v = self
                    .lookup(g, Namespace::Kv, &key, client)?
                    .ok_or_else(|| {
                        WireError::new(ErrorCode::NotFound, format!("{key} not found"))
                    })?;
                if offset > v.len {
                    g.store.release(client, v.gen, ext!(g));
                    return Err(WireError::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "offset {offset} is past the end of the {}-byte value",
                            v.len
                        ),
                    ));
                }
                Response::Views(vec![Ok(ViewDesc {
                    gen: v.gen,
                    offset: v.offset + offset,
                    len: len.min(v.len - offset),
                    segment: v.segment,
                })])
            }
            Request::KvDel { keys } => {
                let mut n = 0;
                for k in &keys {
                    if let Ok((gen, spilled)) = g.store.delete(Namespace::Kv, k, ext!(g)) {
                        self.forget_spilled(gen, spilled);
                        n += 1;
                    }
                }
                Response::Count(n)
            }
            Request::KvExists { keys } => Response::Bools(
                keys.iter()
                    .map(|k| g.store.contains(Namespace::Kv, k, now))
                    .collect(),
            ),
            Request::KvExpire { key, ttl_secs } => {
                let gen = g
                    .store
                    .kv_expire_gen(&key, ttl_secs.saturating_mul(1000), now);
                // Keys with a TTL are read through the worker only (see `kv_commit`).
                if let Some(gen) = gen.filter(|_| ttl_secs > 0) {
                    g.index.unpublish(gen);
                }
                Response::Bools(vec![gen.is_some()])
            }
            Request::KvTtl { key } => Response::Ttl(
                g.store
                    .kv_ttl(&key, now)
                    .map(|t| t.map(|ms| ms.div_ceil(1000))),
            ),
            Request::Status => Response::Status(self.status_locked(g)),
        })
    }

    /// Current figures of the local store; `members` is left empty (the cluster's).
    pub(crate) fn status(&self) -> StatusInfo {
        self.status_locked(&self.lock())
    }

    fn status_locked(&self, g: &Inner) -> StatusInfo {
        let s = g.store.stats();
        // Only pins that name a live entry of the pinning client's tenant count.
        let fast_pins: u64 = g
            .index
            .pin_counts()
            .into_iter()
            .filter(|((t, gen), _)| {
                let tenant = g.tenant_names.get(*t as usize);
                tenant.is_some_and(|t| g.store.tenant_of(*gen) == Some(t.as_str()))
            })
            .map(|(_, n)| u64::from(n))
            .sum();
        StatusInfo {
            node_id: self.cfg.node_id.clone(),
            arena_bytes: g.store.capacity(),
            used_bytes: s.used,
            objects: s.objects,
            unsealed: s.unsealed,
            kv_keys: s.kv_keys,
            pins: s.pins + fast_pins,
            clients: g.clients as u64,
            evictions: s.evictions,
            spills: s.spills,
            spilled_now: s.spilled_now,
            zombies: s.zombies,
            members: Vec::new(),
        }
    }

    /// One timer turn: feed the clients' fast reads to the LRU, expire due keys, free zombies
    /// whose fast pins ended, refresh gauges. Returns the next KV deadline.
    pub(crate) fn tick(&self) -> Option<u64> {
        let now = self.now_ms();
        let mut guard = self.lock();
        let g = &mut *guard;
        // Untrusted claims, bounded per client by its ring; `touch` keeps only a client's own
        // tenant's live entries.
        let mut reads = Vec::new();
        g.index.drain_reads(|t, gen| reads.push((t, gen)));
        for (t, gen) in reads {
            if let Some(tenant) = g.tenant_names.get(t as usize) {
                g.store.touch(gen, tenant, now);
            }
        }
        for (gen, spilled) in g.store.expire_due(now, ext!(g)) {
            self.forget_spilled(gen, spilled);
        }
        if g.store.has_zombies() {
            g.store.sweep(ext!(g));
        }
        // Gauges cost a pass over every entry: refresh them once a second, not every tick.
        if now.saturating_sub(g.gauges_at) >= 1000 || g.gauges_at == 0 {
            g.gauges_at = now.max(1);
            self.export_gauges(g);
        }
        g.store.next_expiry()
    }

    fn export_gauges(&self, g: &mut Inner) {
        let mut seen = HashSet::new();
        for (tenant, u) in g.store.tenant_usages() {
            metrics::gauge!("shoal_tenant_arena_bytes", "tenant" => tenant.clone())
                .set(u.arena_bytes as f64);
            metrics::gauge!("shoal_tenant_spill_bytes", "tenant" => tenant.clone())
                .set(u.spill_bytes as f64);
            seen.insert(tenant);
        }
        for gone in g.gauge_tenants.difference(&seen) {
            metrics::gauge!("shoal_tenant_arena_bytes", "tenant" => gone.clone()).set(0.0);
            metrics::gauge!("shoal_tenant_spill_bytes", "tenant" => gone.clone()).set(0.0);
        }
        g.gauge_tenants = seen;
        let s = self.status_locked(g);
        metrics::gauge!("shoal_arena_bytes").set(s.arena_bytes as f64);
        metrics::gauge!("shoal_arena_used_bytes").set(s.used_bytes as f64);
        metrics::gauge!("shoal_segment_bytes").set(g.store.stats().segment_bytes as f64);
        metrics::gauge!("shoal_segment_pool_bytes").set(self.pool.ready_bytes() as f64);
        metrics::gauge!("shoal_arena_free_bytes").set((s.arena_bytes - s.used_bytes) as f64);
        metrics::gauge!("shoal_objects").set(s.objects as f64);
        metrics::gauge!("shoal_kv_keys").set(s.kv_keys as f64);
        metrics::gauge!("shoal_pins").set(s.pins as f64);
        metrics::gauge!("shoal_spilled_objects").set(s.spilled_now as f64);
        metrics::gauge!("shoal_zombies").set(s.zombies as f64);
    }
}

/// Tenants: quotas in, usage out.
impl Local {
    /// Replaces every tenant's quota (a fresh read of `quotas/`).
    pub(crate) fn set_quotas(&self, quotas: HashMap<String, Quota>) {
        let mut g = self.lock();
        let old: Vec<String> = g.quotas.keys().cloned().collect();
        for t in old {
            g.store.set_tenant_limits(&t, TenantLimits::default());
        }
        for (t, q) in &quotas {
            g.store.set_tenant_limits(t, limits_of(q));
        }
        g.quotas = quotas;
    }

    /// Sets (or with `None` removes) one tenant's quota.
    pub(crate) fn set_quota(&self, tenant: &str, quota: Option<Quota>) {
        let mut g = self.lock();
        g.store
            .set_tenant_limits(tenant, quota.as_ref().map(limits_of).unwrap_or_default());
        match quota {
            Some(q) => g.quotas.insert(tenant.to_owned(), q),
            None => g.quotas.remove(tenant),
        };
    }

    /// Usage against quota of every tenant that holds bytes or has a quota, or of `only`.
    pub(crate) fn usage(
        &self,
        only: Option<&str>,
    ) -> std::collections::BTreeMap<String, UsageLine> {
        let g = self.lock();
        let line = |t: &str, u: TenantUsage| UsageLine {
            arena_bytes: u.arena_bytes,
            spill_bytes: u.spill_bytes,
            quota: g.quotas.get(t).cloned(),
        };
        match only {
            Some(t) => [(t.to_owned(), line(t, g.store.tenant_usage(t)))].into(),
            None => {
                let mut m: std::collections::BTreeMap<String, UsageLine> = g
                    .store
                    .tenant_usages()
                    .into_iter()
                    .map(|(t, u)| {
                        let l = line(&t, u);
                        (t, l)
                    })
                    .collect();
                for t in g.quotas.keys() {
                    if !m.contains_key(t) {
                        m.insert(t.clone(), line(t, TenantUsage::default()));
                    }
                }
                m
            }
        }
    }
}

/// What the cluster side asks of the local store.
impl Local {
    /// Every sealed object held here, for re-registration with the directory owners.
    pub(crate) fn held_objects(&self) -> Vec<HeldObject> {
        self.lock()
            .store
            .sealed_objects()
            .into_iter()
            .map(|(id, size, replica)| HeldObject {
                id,
                size,
                primary: !replica,
            })
            .collect()
    }

    /// Pins a sealed object for a peer that fetches it (restoring it from disk if spilled).
    pub(crate) fn pin_for_peer(&self, id: &ObjectId) -> Result<ViewDesc, WireError> {
        let mut g = self.lock();
        self.lookup(&mut g, Namespace::Object, id, PEER_CLIENT)?
            .ok_or_else(|| WireError::new(ErrorCode::NotFound, format!("{id} is not here")))
    }

    /// The `len` bytes at `off` of an object pinned by [`Local::pin_for_peer`].
    pub(crate) fn pinned_bytes(
        &self,
        v: &ViewDesc,
        off: u64,
        len: u64,
    ) -> Result<PinnedData, WireError> {
        if v.segment {
            let seg = self
                .lock()
                .segments
                .get(&v.gen)
                .cloned()
                .ok_or_else(|| internal("pinned segment missing"))?;
            let map = seg.map().map_err(internal)?;
            return Ok(PinnedData::Mapped {
                map,
                offset: v.offset + off,
                len,
            });
        }
        let mut buf = vec![0u8; usize::try_from(len).map_err(internal)?];
        self.arena
            .read_into(v.offset + off, &mut buf)
            .map_err(internal)?;
        Ok(PinnedData::Copied(buf))
    }

    /// Ends a pin taken by [`Local::pin_for_peer`].
    pub(crate) fn release_peer(&self, gen: Gen) {
        let mut g = self.lock();
        let g = &mut *g;
        g.store.release(PEER_CLIENT, gen, ext!(g));
    }

    /// An unsealed buffer for a copy pulled from another node, and where to write it: the
    /// arena for small objects, else a segment the worker fills with `pwrite`.
    pub(crate) fn create_replica(
        &self,
        id: &ObjectId,
        size: u64,
    ) -> Result<ReplicaTarget, WireError> {
        if size <= self.cfg.inline_limit {
            let mut g = self.lock();
            let g = &mut *g;
            let p = self.create(g, PEER_CLIENT, id, size)?;
            g.store.mark_replica(id);
            return Ok(ReplicaTarget::Arena(p.offset));
        }
        match self.create_segment(PEER_CLIENT, Namespace::Object, id, size)? {
            Response::View(d) => {
                let mut g = self.lock();
                g.store.mark_replica(id);
                g.segments
                    .get(&d.gen)
                    .cloned()
                    .map(ReplicaTarget::Segment)
                    .ok_or_else(|| internal("replica segment missing"))
            }
            other => Err(internal(format!("unexpected {other:?}"))),
        }
    }

    /// Drops a replica buffer whose pull failed.
    pub(crate) fn abort_replica(&self, id: &ObjectId) {
        let _ = self.lock().store.abort(id, PEER_CLIENT);
    }

    /// Seals a pulled replica: visible to local readers, registered with the owners.
    pub(crate) fn seal_replica(&self, id: &ObjectId) -> Result<(), WireError> {
        let mut g = self.lock();
        self.seal(&mut g, PEER_CLIENT, id)
    }

    /// Drops the local copy of a deleted object (views still alive keep their bytes).
    pub(crate) fn drop_copy(&self, id: &ObjectId) {
        let _ = self.handle(PEER_CLIENT, Request::Delete { id: id.clone() });
    }

    /// Whether `id` is sealed here (in memory or spilled).
    pub(crate) fn has_sealed(&self, id: &ObjectId) -> bool {
        self.lock()
            .store
            .contains(Namespace::Object, id, self.now_ms())
    }
}
