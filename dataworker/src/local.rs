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
//! restores, writing key bytes) is done inside the same section.
use crate::cluster::{Note, Outbox};
use crate::spill::SpillDir;
use crate::Config;
use shoal_meta::records::Quota;
use shoal_protocol::HeldObject;
use shoal_protocol::{
    ErrorCode, KvEntry, Namespace, ObjectId, Request, Response, StatusInfo, ViewDesc, WireError,
};
use shoal_shm::{key_hash, Arena, Ctl, IndexEntry, IndexWriter};
use shoal_store::{
    ClientId, Evicted, ExternalPins, Gen, Lookup, Placement, Store, StoreConfig, StoreError,
    TenantLimits, TenantUsage,
};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::watch;

/// Most entries one `list` reply carries.
const MAX_LIST: usize = 10_000;
/// The client id under which copies for and from other nodes are pinned and created.
pub(crate) const PEER_CLIENT: ClientId = u64::MAX;

/// The index pin tables seen as the store's external pins.
struct IndexPins<'a>(&'a mut IndexWriter);

impl ExternalPins for IndexPins<'_> {
    fn is_pinned(&self, gen: Gen) -> bool {
        self.0.is_pinned(gen)
    }
    fn reclaim(&mut self, gen: Gen) -> bool {
        self.0.unpublish(gen);
        !self.0.is_pinned(gen)
    }
    fn last_access(&self, gen: Gen) -> Option<u64> {
        self.0.atime(gen)
    }
}

pub(crate) struct Inner {
    pub(crate) store: Store,
    pub(crate) index: IndexWriter,
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

/// The node's local store, shared by the worker and the cluster side; see the module docs.
pub(crate) struct Local {
    pub(crate) cfg: Config,
    pub(crate) arena: Arena,
    pub(crate) ctl: Arc<Ctl>,
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
    }
}

impl Local {
    /// Creates the arena, the shared index and the spill directory. `outbox` is the cluster's
    /// (None for a standalone node).
    pub(crate) fn new(cfg: Config, outbox: Option<Outbox>) -> Result<Local, crate::StartError> {
        let arena = Arena::create(
            &format!("shoal-arena-{}", cfg.node_id),
            cfg.shm_size,
            cfg.shm_populate,
        )?;
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
        let mut scfg = StoreConfig::new(cfg.shm_size);
        scfg.high_watermark = cfg.high_watermark;
        scfg.low_watermark = cfg.low_watermark;
        scfg.spill = spill.is_some();
        scfg.keep_primaries = cfg.cluster.is_some();
        let inner = Inner {
            store: Store::new(scfg),
            index: IndexWriter::new(ctl.clone()),
            waiters: HashMap::new(),
            free_regions: (0..ctl.pin_regions()).rev().collect(),
            clients: 0,
            gauges_at: 0,
            quotas: HashMap::new(),
            gauge_tenants: HashSet::new(),
        };
        Ok(Local {
            cfg,
            arena,
            ctl,
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

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug; keep serving rather than poisoning everyone.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a client. Returns its pin region if one is free.
    pub(crate) fn client_joined(&self) -> Result<Option<u32>, WireError> {
        let mut g = self.lock();
        if g.clients >= self.cfg.max_clients {
            return Err(WireError::new(ErrorCode::Overloaded, "too many clients"));
        }
        g.clients += 1;
        let region = g.free_regions.pop();
        if let Some(r) = region {
            g.index.activate_region(r);
        }
        metrics::gauge!("shoal_clients").set(g.clients as f64);
        Ok(region)
    }

    /// Releases everything a client held, at once. Its mailbox must be closed already (see
    /// [`crate::worker::Worker::client_left`]).
    pub(crate) fn client_left(&self, client: ClientId, region: Option<u32>) {
        let mut g = self.lock();
        let g = &mut *g;
        if let Some(r) = region {
            g.index.clear_region(r);
            g.free_regions.push(r);
        }
        g.store.client_gone(client, &mut IndexPins(&mut g.index));
        g.store.sweep(&mut IndexPins(&mut g.index));
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
            match spill.write(ev.gen, &self.arena, ev.offset, ev.len) {
                Ok(()) => metrics::counter!("shoal_spills_total").increment(1),
                Err(e) => {
                    tracing::warn!(id = %ev.id, error = %e, "spill failed; dropping the object");
                    g.store.forget(ev.gen);
                }
            }
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

    fn create(
        &self,
        g: &mut Inner,
        client: ClientId,
        id: &ObjectId,
        size: u64,
    ) -> Result<Placement, WireError> {
        let (p, ev) = g
            .store
            .create(id, size, client, &mut IndexPins(&mut g.index))
            .map_err(store_err)?;
        self.apply_evictions(g, ev);
        self.write_key(&p, id)?;
        Ok(p)
    }

    fn seal(&self, g: &mut Inner, client: ClientId, id: &ObjectId) -> Result<(), WireError> {
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
                let (p, ev) = g
                    .store
                    .restore(gen, now, &mut IndexPins(&mut g.index))
                    .map_err(store_err)?;
                self.apply_evictions(g, ev);
                let spill = self.spill.as_ref().ok_or_else(|| {
                    WireError::new(ErrorCode::Internal, "spilled without a spill dir")
                })?;
                if let Err(e) = spill
                    .read(gen, &self.arena, p.offset, p.len)
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
        match self.handle_inner(client, req) {
            Ok(r) => r,
            Err(e) => Response::Error(e),
        }
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
            .kv_create(
                key,
                value.len() as u64,
                client,
                &mut IndexPins(&mut g.index),
            )
            .map_err(store_err)?;
        self.apply_evictions(g, ev);
        let written = self.write_key(&p, key).and_then(|()| {
            self.arena
                .write(p.offset, value)
                .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))
        });
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
        let (p, replaced) = g
            .store
            .kv_commit(
                key,
                client,
                ttl_secs.saturating_mul(1000),
                self.now_ms(),
                &mut IndexPins(&mut g.index),
            )
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
            Request::Create { id, size } => {
                if size > self.arena.size() {
                    return Err(WireError::new(
                        ErrorCode::StoreFull,
                        format!(
                            "{size} bytes is larger than the whole arena ({})",
                            self.arena.size()
                        ),
                    ));
                }
                Response::View(view(&self.create(g, client, &id, size)?))
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
                    return Err(WireError::new(ErrorCode::Internal, e.to_string()));
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
                    g.store.release(client, gen, &mut IndexPins(&mut g.index));
                }
                Response::Ok
            }
            Request::Delete { id } => {
                let (gen, spilled) = g
                    .store
                    .delete(Namespace::Object, &id, &mut IndexPins(&mut g.index))
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
            Request::KvCreate { key, size } => {
                let (p, ev) = g
                    .store
                    .kv_create(&key, size, client, &mut IndexPins(&mut g.index))
                    .map_err(store_err)?;
                self.apply_evictions(g, ev);
                self.write_key(&p, &key)?;
                Response::View(view(&p))
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
                    g.store.release(client, v.gen, &mut IndexPins(&mut g.index));
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
                })])
            }
            Request::KvDel { keys } => {
                let mut n = 0;
                for k in &keys {
                    if let Ok((gen, spilled)) =
                        g.store
                            .delete(Namespace::Kv, k, &mut IndexPins(&mut g.index))
                    {
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
        let fast_pins: u64 = g.index.pin_counts().values().map(|n| u64::from(*n)).sum();
        StatusInfo {
            node_id: self.cfg.node_id.clone(),
            arena_bytes: self.arena.size(),
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

    /// One timer turn: advance the shared clock, expire due keys, free zombies whose fast pins
    /// ended, refresh gauges. Returns the next KV deadline.
    pub(crate) fn tick(&self) -> Option<u64> {
        let now = self.now_ms();
        self.ctl.set_clock(now);
        let mut guard = self.lock();
        let g = &mut *guard;
        for (gen, spilled) in g.store.expire_due(now, &mut IndexPins(&mut g.index)) {
            self.forget_spilled(gen, spilled);
        }
        if g.store.has_zombies() {
            g.store.sweep(&mut IndexPins(&mut g.index));
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

    /// Ends a pin taken by [`Local::pin_for_peer`].
    pub(crate) fn release_peer(&self, gen: Gen) {
        let mut g = self.lock();
        let g = &mut *g;
        g.store
            .release(PEER_CLIENT, gen, &mut IndexPins(&mut g.index));
    }

    /// An unsealed buffer for a copy pulled from another node.
    pub(crate) fn create_replica(&self, id: &ObjectId, size: u64) -> Result<Placement, WireError> {
        let mut g = self.lock();
        let g = &mut *g;
        let p = self.create(g, PEER_CLIENT, id, size)?;
        g.store.mark_replica(id);
        Ok(p)
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
