//! The [`Store`] state machine over one arena: objects and their names, allocation, pins,
//! eviction. Its invariants are those listed in the crate doc. What it takes and returns lives
//! in `types`; its key-value side in `kv`.
use offset_allocator::{Allocation, Allocator};
use shoal_protocol::{split_qualified, ListEntry, Namespace, ObjectId};
use std::collections::{BTreeSet, HashMap, HashSet};
use tenants::{Side, Tenants};

mod kv;
mod tenants;
mod types;

pub use tenants::{TenantLimits, TenantUsage};
pub use types::{
    Backing, ClientId, Evicted, ExternalPins, Gen, Lookup, NoExternalPins, Placement, Stats,
    StoreConfig, StoreError, SEGMENT_PAGE, UNIT,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Unsealed { owner: ClientId },
    Sealed,
}

/// An entry's memory.
#[derive(Clone, Copy)]
enum Mem {
    /// Payload and name in one arena allocation at this offset.
    Arena(Allocation, u64),
    /// Payload in segment `gen` (`bytes` of it, whole pages); name in an arena allocation.
    Segment {
        key: Allocation,
        key_off: u64,
        bytes: u64,
    },
}

impl std::fmt::Debug for Mem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mem::Arena(_, o) => write!(f, "arena@{o}"),
            Mem::Segment { bytes, .. } => write!(f, "segment({bytes})"),
        }
    }
}

impl Mem {
    fn placement(self, gen: Gen, size: u64) -> Placement {
        match self {
            Mem::Arena(_, offset) => Placement {
                gen,
                offset,
                len: size,
                key_off: offset + size,
                segment: false,
            },
            Mem::Segment { key_off, .. } => Placement {
                gen,
                offset: 0,
                len: size,
                key_off,
                segment: true,
            },
        }
    }

    fn pool(self) -> Pool {
        match self {
            Mem::Arena(..) => Pool::Arena,
            Mem::Segment { .. } => Pool::Segment,
        }
    }
}

/// Which budget an eviction should make room in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pool {
    Arena,
    Segment,
}

struct Entry {
    ns: Namespace,
    id: ObjectId,
    size: u64,
    state: State,
    /// `None` when spilled.
    mem: Option<Mem>,
    pins: u32,
    last_access: u64,
    expires_at: Option<u64>,
    /// Bound to its name (false for zombies and uncommitted KV values).
    named: bool,
    /// A cached copy of an object whose primary lives on another node.
    replica: bool,
    /// What its tenant is charged: payload plus the name as the tenant wrote it.
    charge: u64,
    /// On disk; its charge is on the tenant's spill side (else, with `mem`, the arena side).
    spilled: bool,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("id", &self.id)
            .field("size", &self.size)
            .field("state", &self.state)
            .field("mem", &self.mem)
            .field("pins", &self.pins)
            .finish_non_exhaustive()
    }
}

/// The object index of one dataworker.
pub struct Store {
    cfg: StoreConfig,
    alloc: Allocator<u32>,
    total_units: u32,
    names: HashMap<(Namespace, ObjectId), Gen>,
    entries: HashMap<Gen, Entry>,
    lru: BTreeSet<(u64, Gen)>,
    expiry: BTreeSet<(u64, Gen)>,
    client_pins: HashMap<ClientId, HashMap<Gen, u32>>,
    client_unsealed: HashMap<ClientId, HashSet<Gen>>,
    pending_kv: HashMap<(ClientId, ObjectId), Gen>,
    zombies: HashSet<Gen>,
    next_gen: Gen,
    evictions: u64,
    spills: u64,
    tenants: Tenants,
    /// Segment bytes in use (whole pages).
    seg_used: u64,
    /// Segments freed since the caller last took the list.
    freed_segments: Vec<Gen>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("cfg", &self.cfg)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

fn units_for(bytes: u64) -> Option<u32> {
    u32::try_from(bytes.div_ceil(UNIT)).ok()
}

impl Store {
    /// An empty store.
    pub fn new(cfg: StoreConfig) -> Self {
        let total_units = u32::try_from(cfg.capacity / UNIT).unwrap_or(u32::MAX);
        Self {
            alloc: Allocator::with_max_allocs(total_units, cfg.max_allocations),
            total_units,
            cfg,
            names: HashMap::new(),
            entries: HashMap::new(),
            lru: BTreeSet::new(),
            expiry: BTreeSet::new(),
            client_pins: HashMap::new(),
            client_unsealed: HashMap::new(),
            pending_kv: HashMap::new(),
            zombies: HashSet::new(),
            next_gen: 1,
            evictions: 0,
            spills: 0,
            tenants: Tenants::default(),
            seg_used: 0,
            freed_segments: Vec::new(),
        }
    }

    /// Capacity in bytes: the arena (whole units) and the segment budget.
    pub fn capacity(&self) -> u64 {
        self.arena_capacity() + self.cfg.segment_capacity
    }

    fn arena_capacity(&self) -> u64 {
        u64::from(self.total_units) * UNIT
    }

    /// Bytes allocated now: arena and segments.
    pub fn used(&self) -> u64 {
        self.arena_used() + self.seg_used
    }

    fn arena_used(&self) -> u64 {
        u64::from(self.total_units - self.alloc.storage_report().total_free_space) * UNIT
    }

    /// Segments (by generation) whose entries were freed since the last call: the caller
    /// drops their memfds. Every freed segment appears here exactly once.
    pub fn take_freed_segments(&mut self) -> Vec<Gen> {
        std::mem::take(&mut self.freed_segments)
    }

    // ----- allocation and eviction -----

    fn free_mem(&mut self, gen: Gen) {
        if let Some(e) = self.entries.get_mut(&gen) {
            match e.mem.take() {
                Some(Mem::Arena(a, _)) => {
                    self.alloc.free(a);
                    self.tenants.sub(e.id.tenant(), Side::Arena, e.charge);
                }
                Some(Mem::Segment { key, bytes, .. }) => {
                    self.alloc.free(key);
                    self.seg_used = self.seg_used.saturating_sub(bytes);
                    self.freed_segments.push(gen);
                    self.tenants.sub(e.id.tenant(), Side::Arena, e.charge);
                }
                None => {}
            }
            self.lru.remove(&(e.last_access, gen));
        }
    }

    /// Whether evicting `e` would spill it: spilling is on, it is not a replica, and its
    /// tenant's spill limit has room for it.
    fn spill_ok(&self, e: &Entry) -> bool {
        self.cfg.spill && !e.replica && self.tenants.spill_fits(e.id.tenant(), e.charge)
    }

    fn evictable(&self, gen: Gen, ext: &dyn ExternalPins) -> bool {
        self.entries.get(&gen).is_some_and(|e| {
            e.state == State::Sealed
                && e.named
                && e.pins == 0
                && e.mem.is_some()
                && (e.replica || !self.cfg.keep_primaries || self.spill_ok(e))
                && !ext.is_pinned(gen, e.id.tenant())
        })
    }

    /// Evicts the least recently used candidate that frees room in `pool`. Returns `None`
    /// when nothing can go. Each call looks at every entry at most once per eviction round
    /// (`skipped` remembers what could not go), so a round is bounded by the number of
    /// entries whatever clients do: the order comes from the store's own LRU, which only
    /// socket gets, seals and the worker's validated drain of fast reads move.
    fn evict_one(
        &mut self,
        ext: &mut dyn ExternalPins,
        skipped: &mut HashSet<Gen>,
        pool: Pool,
    ) -> Option<Evicted> {
        loop {
            let &(_, gen) = self.lru.iter().find(|(_, g)| !skipped.contains(g))?;
            let in_pool = self
                .entries
                .get(&gen)
                .and_then(|e| e.mem)
                .is_some_and(|m| m.pool() == pool);
            if !in_pool || !self.evictable(gen, ext) {
                skipped.insert(gen);
                continue;
            }
            let tenant = self.entries.get(&gen)?.id.tenant().to_owned();
            if !ext.reclaim(gen, &tenant) {
                skipped.insert(gen);
                continue;
            }
            let e = self.entries.get(&gen)?;
            let (spill, replica) = (self.spill_ok(e), e.replica);
            let p = e.mem?.placement(gen, e.size);
            let ev = Evicted {
                gen,
                ns: e.ns,
                id: e.id.clone(),
                offset: p.offset,
                len: p.len,
                segment: p.segment,
                spill,
                replica,
            };
            self.free_mem(gen);
            self.evictions += 1;
            if spill {
                self.spills += 1;
                if let Some(e) = self.entries.get_mut(&gen) {
                    e.spilled = true;
                    self.tenants.add(e.id.tenant(), Side::Spill, e.charge);
                }
            } else {
                self.remove_entry(gen);
            }
            return Some(ev);
        }
    }

    fn full(&self, requested: u64, ext: &dyn ExternalPins) -> StoreError {
        StoreError::StoreFull {
            requested,
            used: self.used(),
            capacity: self.capacity(),
            pinned: self.unevictable_bytes(ext),
        }
    }

    /// Allocates `bytes` in the arena, evicting as the watermarks say.
    fn allocate(
        &mut self,
        bytes: u64,
        ext: &mut dyn ExternalPins,
        evicted: &mut Vec<Evicted>,
    ) -> Result<(Allocation, u64), StoreError> {
        let requested = bytes.div_ceil(UNIT).saturating_mul(UNIT);
        let units = units_for(bytes)
            .filter(|u| *u <= self.total_units)
            .ok_or_else(|| self.full(requested, ext))?;
        let want = u64::from(units) * UNIT;
        let cap = self.arena_capacity() as f64;
        let mut skipped = HashSet::new();
        if (self.arena_used() + want) as f64 > cap * self.cfg.high_watermark {
            let target = cap * self.cfg.low_watermark;
            while (self.arena_used() + want) as f64 > target {
                match self.evict_one(ext, &mut skipped, Pool::Arena) {
                    Some(ev) => evicted.push(ev),
                    None => break,
                }
            }
        }
        loop {
            if let Some(a) = self.alloc.allocate(units) {
                return Ok((a, u64::from(a.offset) * UNIT));
            }
            // Fragmented or full: keep evicting until it fits or nothing is left.
            match self.evict_one(ext, &mut skipped, Pool::Arena) {
                Some(ev) => evicted.push(ev),
                None => return Err(self.full(requested, ext)),
            }
        }
    }

    /// Takes `size` bytes of segment budget (whole pages) and an arena allocation for the
    /// name, evicting segments as the watermarks say.
    fn allocate_segment(
        &mut self,
        size: u64,
        key_len: u64,
        ext: &mut dyn ExternalPins,
        evicted: &mut Vec<Evicted>,
    ) -> Result<Mem, StoreError> {
        let bytes = size.div_ceil(SEGMENT_PAGE).saturating_mul(SEGMENT_PAGE);
        let cap = self.cfg.segment_capacity;
        if bytes > cap {
            return Err(self.full(bytes, ext));
        }
        let mut skipped = HashSet::new();
        let capf = cap as f64;
        if (self.seg_used + bytes) as f64 > capf * self.cfg.high_watermark {
            let target = capf * self.cfg.low_watermark;
            while (self.seg_used + bytes) as f64 > target {
                match self.evict_one(ext, &mut skipped, Pool::Segment) {
                    Some(ev) => evicted.push(ev),
                    None => break,
                }
            }
        }
        while self.seg_used + bytes > cap {
            match self.evict_one(ext, &mut skipped, Pool::Segment) {
                Some(ev) => evicted.push(ev),
                None => return Err(self.full(bytes, ext)),
            }
        }
        let (key, key_off) = self.allocate(key_len.max(1), ext, evicted)?;
        self.seg_used += bytes;
        Ok(Mem::Segment {
            key,
            key_off,
            bytes,
        })
    }

    fn unevictable_bytes(&self, ext: &dyn ExternalPins) -> u64 {
        self.entries
            .iter()
            .filter(|(g, e)| {
                e.state != State::Sealed
                    || e.pins > 0
                    || !e.named
                    || ext.is_pinned(**g, e.id.tenant())
            })
            .map(|(_, e)| e)
            .filter_map(|e| e.mem.map(|_| e.size))
            .sum()
    }

    /// Memory for a payload of `size` and a name of `key_len` bytes in `backing`.
    fn place(
        &mut self,
        size: u64,
        key_len: u64,
        backing: Backing,
        ext: &mut dyn ExternalPins,
        evicted: &mut Vec<Evicted>,
    ) -> Result<Mem, StoreError> {
        match backing {
            Backing::Arena => {
                let bytes = size.checked_add(key_len).ok_or_else(|| {
                    StoreError::InvalidArgument(format!("size {size} is too large"))
                })?;
                let (a, offset) = self.allocate(bytes, ext, evicted)?;
                Ok(Mem::Arena(a, offset))
            }
            Backing::Segment => self.allocate_segment(size, key_len, ext, evicted),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn new_entry(
        &mut self,
        ns: Namespace,
        id: &ObjectId,
        size: u64,
        owner: ClientId,
        backing: Backing,
        ext: &mut dyn ExternalPins,
        evicted: &mut Vec<Evicted>,
    ) -> Result<Placement, StoreError> {
        let key_len = id.as_str().len() as u64;
        let charge = size.saturating_add(id.local().len() as u64);
        self.tenants.admit_arena(id.tenant(), charge)?;
        let mem = self.place(size, key_len, backing, ext, evicted)?;
        self.tenants.add(id.tenant(), Side::Arena, charge);
        let gen = self.next_gen;
        self.next_gen += 1;
        self.entries.insert(
            gen,
            Entry {
                ns,
                id: id.clone(),
                size,
                state: State::Unsealed { owner },
                mem: Some(mem),
                pins: 0,
                last_access: 0,
                expires_at: None,
                named: false,
                replica: false,
                charge,
                spilled: false,
            },
        );
        self.client_unsealed.entry(owner).or_default().insert(gen);
        Ok(mem.placement(gen, size))
    }

    // ----- objects -----

    /// Allocates a writable buffer for `id` in the arena, owned by `client` until sealed.
    /// Objects are immutable: an existing name is `AlreadyExists`. Returns the placement and
    /// what was evicted to make room.
    pub fn create(
        &mut self,
        id: &ObjectId,
        size: u64,
        client: ClientId,
        ext: &mut dyn ExternalPins,
    ) -> Result<(Placement, Vec<Evicted>), StoreError> {
        self.create_in(id, size, client, Backing::Arena, ext)
    }

    /// [`Store::create`] with the payload in `backing`.
    pub fn create_in(
        &mut self,
        id: &ObjectId,
        size: u64,
        client: ClientId,
        backing: Backing,
        ext: &mut dyn ExternalPins,
    ) -> Result<(Placement, Vec<Evicted>), StoreError> {
        let key = (Namespace::Object, id.clone());
        if self.names.contains_key(&key) {
            return Err(StoreError::AlreadyExists(id.clone()));
        }
        let mut evicted = Vec::new();
        let p = self.new_entry(
            Namespace::Object,
            id,
            size,
            client,
            backing,
            ext,
            &mut evicted,
        )?;
        if let Some(e) = self.entries.get_mut(&p.gen) {
            e.named = true;
        }
        self.names.insert(key, p.gen);
        Ok((p, evicted))
    }

    fn seal_gen(&mut self, gen: Gen, client: ClientId, now: u64) -> Option<Placement> {
        let e = self.entries.get_mut(&gen)?;
        if e.state != (State::Unsealed { owner: client }) {
            return None;
        }
        e.state = State::Sealed;
        e.last_access = now;
        let p = e.mem?.placement(gen, e.size);
        if e.named {
            self.lru.insert((now, gen));
        }
        if let Some(s) = self.client_unsealed.get_mut(&client) {
            s.remove(&gen);
        }
        Some(p)
    }

    /// Whether `gen` is an unsealed buffer of `client` (the worker checks before it makes the
    /// buffer's bytes immutable).
    pub fn is_unsealed_of(&self, gen: Gen, client: ClientId) -> bool {
        self.entries
            .get(&gen)
            .is_some_and(|e| e.state == (State::Unsealed { owner: client }))
    }

    /// The generation of `client`'s unsealed object `id`, if it has one.
    pub fn unsealed_gen(&self, ns: Namespace, id: &ObjectId, client: ClientId) -> Option<Gen> {
        let gen = match ns {
            Namespace::Object => *self.names.get(&(ns, id.clone()))?,
            Namespace::Kv => *self.pending_kv.get(&(client, id.clone()))?,
        };
        self.is_unsealed_of(gen, client).then_some(gen)
    }

    /// Seals `id`, created by `client`.
    pub fn seal(
        &mut self,
        id: &ObjectId,
        client: ClientId,
        now: u64,
    ) -> Result<Placement, StoreError> {
        let gen = *self
            .names
            .get(&(Namespace::Object, id.clone()))
            .ok_or_else(|| StoreError::NotFound(id.clone()))?;
        match self.entries.get(&gen).map(|e| e.state) {
            Some(State::Sealed) => Err(StoreError::AlreadySealed(id.clone())),
            _ => self
                .seal_gen(gen, client, now)
                .ok_or_else(|| StoreError::NotUnsealed(id.clone())),
        }
    }

    /// Marks `id` (created, sealed or not) as a replica: a cached copy of an object whose
    /// primary is on another node. Replicas are evicted freely and never spilled. Returns
    /// whether the name exists.
    pub fn mark_replica(&mut self, id: &ObjectId) -> bool {
        let Some(gen) = self.names.get(&(Namespace::Object, id.clone())) else {
            return false;
        };
        match self.entries.get_mut(gen) {
            Some(e) => {
                e.replica = true;
                true
            }
            None => false,
        }
    }

    /// Whether `id` is a replica (see [`Store::mark_replica`]).
    pub fn is_replica(&self, id: &ObjectId) -> bool {
        self.names
            .get(&(Namespace::Object, id.clone()))
            .and_then(|g| self.entries.get(g))
            .is_some_and(|e| e.replica)
    }

    /// Drops an unsealed buffer of `client`.
    pub fn abort(&mut self, id: &ObjectId, client: ClientId) -> Result<(), StoreError> {
        let key = (Namespace::Object, id.clone());
        let gen = *self
            .names
            .get(&key)
            .ok_or_else(|| StoreError::NotFound(id.clone()))?;
        if self.entries.get(&gen).map(|e| e.state) != Some(State::Unsealed { owner: client }) {
            return Err(StoreError::NotUnsealed(id.clone()));
        }
        self.drop_unsealed(client, gen);
        Ok(())
    }

    fn drop_unsealed(&mut self, client: ClientId, gen: Gen) {
        if let Some(s) = self.client_unsealed.get_mut(&client) {
            s.remove(&gen);
        }
        self.free_mem(gen);
        self.remove_entry(gen);
    }

    /// Removes an entry completely (its memory must be freed already).
    fn remove_entry(&mut self, gen: Gen) {
        if let Some(e) = self.entries.remove(&gen) {
            if e.spilled {
                self.tenants.sub(e.id.tenant(), Side::Spill, e.charge);
            }
            self.lru.remove(&(e.last_access, gen));
            if let Some(t) = e.expires_at {
                self.expiry.remove(&(t, gen));
            }
            if e.named && self.names.get(&(e.ns, e.id.clone())) == Some(&gen) {
                self.names.remove(&(e.ns, e.id));
            }
            self.zombies.remove(&gen);
        }
    }

    /// Resolves a name for `client`; on `Ready` the entry is pinned for it (end with
    /// [`Store::release`]). KV entries past their deadline are `Missing`.
    pub fn get(&mut self, ns: Namespace, id: &ObjectId, client: ClientId, now: u64) -> Lookup {
        let Some(&gen) = self.names.get(&(ns, id.clone())) else {
            return Lookup::Missing;
        };
        let Some(e) = self.entries.get_mut(&gen) else {
            return Lookup::Missing;
        };
        if e.expires_at.is_some_and(|t| t <= now) {
            return Lookup::Missing;
        }
        match (e.state, e.mem) {
            (State::Unsealed { .. }, _) => Lookup::Unsealed,
            (State::Sealed, None) => Lookup::Spilled(gen),
            (State::Sealed, Some(mem)) => {
                let p = mem.placement(gen, e.size);
                self.lru.remove(&(e.last_access, gen));
                e.last_access = e.last_access.max(now);
                self.lru.insert((e.last_access, gen));
                e.pins += 1;
                *self
                    .client_pins
                    .entry(client)
                    .or_default()
                    .entry(gen)
                    .or_insert(0) += 1;
                Lookup::Ready(p)
            }
        }
    }

    /// Records a read the caller saw without a lookup (a client's fast read, drained from its
    /// pin page by the worker): moves `gen` up in the LRU, if it is a sealed, named entry in
    /// memory of `tenant`. Anything else is ignored, so a client's claims can only make its
    /// own tenant's entries look recent.
    pub fn touch(&mut self, gen: Gen, tenant: &str, now: u64) {
        let Some(e) = self.entries.get_mut(&gen) else {
            return;
        };
        if e.state != State::Sealed || !e.named || e.mem.is_none() || e.id.tenant() != tenant {
            return;
        }
        if now > e.last_access {
            self.lru.remove(&(e.last_access, gen));
            e.last_access = now;
            self.lru.insert((now, gen));
        }
    }

    /// Brings a spilled entry back into memory (into a segment when it is larger than
    /// `segment_above`). The caller fills the placement from disk before anything else
    /// writes to that memory, then calls [`Store::get`] again. If the read fails, the caller
    /// removes the entry with [`Store::forget`].
    pub fn restore(
        &mut self,
        gen: Gen,
        now: u64,
        ext: &mut dyn ExternalPins,
    ) -> Result<(Placement, Vec<Evicted>), StoreError> {
        let (size, key_len, ok) = match self.entries.get(&gen) {
            Some(e) => (
                e.size,
                e.id.as_str().len() as u64,
                e.mem.is_none() && e.named,
            ),
            None => return Err(StoreError::InvalidArgument(format!("no entry {gen}"))),
        };
        if !ok {
            return Err(StoreError::InvalidArgument(format!(
                "entry {gen} is not spilled"
            )));
        }
        let mut evicted = Vec::new();
        let backing = if size > self.cfg.segment_above && self.cfg.segment_capacity > 0 {
            Backing::Segment
        } else {
            Backing::Arena
        };
        let mem = self.place(size, key_len, backing, ext, &mut evicted)?;
        if let Some(e) = self.entries.get_mut(&gen) {
            e.mem = Some(mem);
            e.last_access = now;
            self.lru.insert((now, gen));
            // Back from disk: its charge moves to the arena side (never refused; see
            // `tenants`).
            if std::mem::take(&mut e.spilled) {
                self.tenants.sub(e.id.tenant(), Side::Spill, e.charge);
            }
            self.tenants.add(e.id.tenant(), Side::Arena, e.charge);
        }
        Ok((mem.placement(gen, size), evicted))
    }

    /// Drops an entry whose spill file could not be written or read.
    pub fn forget(&mut self, gen: Gen) {
        self.free_mem(gen);
        self.remove_entry(gen);
    }

    /// Ends one socket pin of `client` on `gen`. Returns true if the allocation was freed
    /// (a zombie's last pin).
    pub fn release(&mut self, client: ClientId, gen: Gen, ext: &mut dyn ExternalPins) -> bool {
        let Some(cp) = self.client_pins.get_mut(&client) else {
            return false;
        };
        let Some(n) = cp.get_mut(&gen) else {
            return false;
        };
        *n -= 1;
        if *n == 0 {
            cp.remove(&gen);
        }
        if let Some(e) = self.entries.get_mut(&gen) {
            e.pins = e.pins.saturating_sub(1);
        }
        self.try_free_zombie(gen, ext)
    }

    fn try_free_zombie(&mut self, gen: Gen, ext: &mut dyn ExternalPins) -> bool {
        if !self.zombies.contains(&gen) {
            return false;
        }
        let Some(tenant) = self.entries.get(&gen).map(|e| e.id.tenant().to_owned()) else {
            self.zombies.remove(&gen);
            return false;
        };
        // Always withdraw from the external index first, even while socket pins hold it.
        let externally_free = ext.reclaim(gen, &tenant);
        if externally_free && self.entries.get(&gen).is_some_and(|e| e.pins == 0) {
            self.free_mem(gen);
            self.remove_entry(gen);
            return true;
        }
        false
    }

    /// Unbinds an entry from its name; frees it unless pinned (then it becomes a zombie).
    /// Returns `(gen, was_spilled)`.
    fn unbind(&mut self, gen: Gen, ext: &mut dyn ExternalPins) -> (Gen, bool) {
        let spilled = self.entries.get(&gen).is_some_and(|e| e.mem.is_none());
        if let Some(e) = self.entries.get_mut(&gen) {
            if e.named {
                self.names.remove(&(e.ns, e.id.clone()));
                e.named = false;
            }
            self.lru.remove(&(e.last_access, gen));
            if let Some(t) = e.expires_at.take() {
                self.expiry.remove(&(t, gen));
            }
            if let State::Unsealed { owner } = e.state {
                if let Some(s) = self.client_unsealed.get_mut(&owner) {
                    s.remove(&gen);
                }
            }
        }
        self.zombies.insert(gen);
        self.try_free_zombie(gen, ext);
        (gen, spilled)
    }

    /// Deletes a name. A pinned entry stays in memory (a zombie) until its last view ends; an
    /// unsealed one is dropped at once (its writer gets an error on seal). Returns the
    /// generation and whether it was spilled (so the caller deletes its file).
    pub fn delete(
        &mut self,
        ns: Namespace,
        id: &ObjectId,
        ext: &mut dyn ExternalPins,
    ) -> Result<(Gen, bool), StoreError> {
        let gen = *self
            .names
            .get(&(ns, id.clone()))
            .ok_or_else(|| StoreError::NotFound(id.clone()))?;
        Ok(self.unbind(gen, ext))
    }

    /// Frees zombies that no external pin holds any more. Returns freed generations.
    pub fn sweep(&mut self, ext: &mut dyn ExternalPins) -> Vec<Gen> {
        let z: Vec<Gen> = self.zombies.iter().copied().collect();
        z.into_iter()
            .filter(|g| self.try_free_zombie(*g, ext))
            .collect()
    }

    /// Whether any zombie waits for external pins to end.
    pub fn has_zombies(&self) -> bool {
        !self.zombies.is_empty()
    }

    /// Releases everything a client held: its socket pins and its unsealed buffers (objects
    /// and KV values). Returns how many allocations were freed.
    pub fn client_gone(&mut self, client: ClientId, ext: &mut dyn ExternalPins) -> usize {
        let mut freed = 0;
        for (gen, n) in self.client_pins.remove(&client).unwrap_or_default() {
            if let Some(e) = self.entries.get_mut(&gen) {
                e.pins = e.pins.saturating_sub(n);
            }
            freed += usize::from(self.try_free_zombie(gen, ext));
        }
        for gen in self.client_unsealed.remove(&client).unwrap_or_default() {
            self.free_mem(gen);
            self.remove_entry(gen);
            freed += 1;
        }
        self.pending_kv.retain(|(c, _), _| *c != client);
        freed
    }

    /// Whether a sealed object (or live KV key) exists.
    pub fn contains(&self, ns: Namespace, id: &ObjectId, now: u64) -> bool {
        self.names
            .get(&(ns, id.clone()))
            .and_then(|g| self.entries.get(g))
            .is_some_and(|e| e.state == State::Sealed && e.expires_at.is_none_or(|t| t > now))
    }

    /// Names in `ns` of one tenant starting with a prefix, sorted, at most `limit`.
    /// `prefix` is qualified like a name (`tenant\0prefix`, or plain for the default
    /// tenant): only that tenant's names are listed, and they come back as the tenant wrote
    /// them (without the tenant prefix).
    pub fn list(&self, ns: Namespace, prefix: &str, limit: usize, now: u64) -> Vec<ListEntry> {
        let (tenant, prefix) = split_qualified(prefix);
        let mut v: Vec<ListEntry> = self
            .names
            .iter()
            .filter(|((n, id), _)| {
                *n == ns && id.tenant() == tenant && id.local().starts_with(prefix)
            })
            .filter_map(|(_, g)| self.entries.get(g))
            .filter(|e| e.expires_at.is_none_or(|t| t > now))
            .map(|e| ListEntry {
                id: e.id.clone().into_local(),
                size: e.size,
                sealed: e.state == State::Sealed,
                pins: e.pins,
                spilled: e.mem.is_none(),
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v.truncate(limit);
        v
    }

    /// Every sealed object (in memory or spilled): id, size and whether it is a replica.
    pub fn sealed_objects(&self) -> Vec<(ObjectId, u64, bool)> {
        self.names
            .iter()
            .filter(|((ns, _), _)| *ns == Namespace::Object)
            .filter_map(|(_, g)| self.entries.get(g))
            .filter(|e| e.state == State::Sealed)
            .map(|e| (e.id.clone(), e.size, e.replica))
            .collect()
    }

    /// Where `gen`'s payload is now (`None`: no such entry, or spilled).
    pub fn placement(&self, gen: Gen) -> Option<Placement> {
        let e = self.entries.get(&gen)?;
        Some(e.mem?.placement(gen, e.size))
    }

    /// The tenant of entry `gen`, if it exists.
    pub fn tenant_of(&self, gen: Gen) -> Option<&str> {
        self.entries.get(&gen).map(|e| e.id.tenant())
    }

    /// Generation and state of a name (for the caller's bookkeeping, e.g. spill files).
    pub fn gen_of(&self, ns: Namespace, id: &ObjectId) -> Option<Gen> {
        self.names.get(&(ns, id.clone())).copied()
    }

    // ----- tenants -----

    /// Bytes `tenant` holds now (see the `tenants` module for what is charged).
    pub fn tenant_usage(&self, tenant: &str) -> TenantUsage {
        self.tenants.usage(tenant)
    }

    /// Every tenant holding bytes now, with its usage.
    pub fn tenant_usages(&self) -> Vec<(String, TenantUsage)> {
        let mut v: Vec<_> = self.tenants.all().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Sets `tenant`'s limits (all `None`: unlimited). Lowering a limit below the usage
    /// removes nothing; new bytes are refused until the usage is back under it.
    pub fn set_tenant_limits(&mut self, tenant: &str, limits: TenantLimits) {
        self.tenants.set_limits(tenant, limits);
    }

    /// `tenant`'s limits.
    pub fn tenant_limits(&self, tenant: &str) -> TenantLimits {
        self.tenants.limits(tenant)
    }

    /// Whether `tenant` may take `bytes` more arena bytes (for a caller that creates several
    /// entries and must check them together before it creates the first).
    pub fn admit(&self, tenant: &str, bytes: u64) -> Result<(), StoreError> {
        self.tenants.admit_arena(tenant, bytes)
    }

    /// Counters and gauges.
    pub fn stats(&self) -> Stats {
        let mut s = Stats {
            used: self.used(),
            segment_bytes: self.seg_used,
            zombies: self.zombies.len() as u64,
            evictions: self.evictions,
            spills: self.spills,
            ..Stats::default()
        };
        for e in self.entries.values() {
            s.pins += u64::from(e.pins);
            match (e.state, e.ns, e.named) {
                (State::Unsealed { .. }, _, _) => s.unsealed += 1,
                (State::Sealed, Namespace::Object, true) => s.objects += 1,
                (State::Sealed, Namespace::Kv, true) => s.kv_keys += 1,
                _ => {}
            }
            if e.named && e.mem.is_none() {
                s.spilled_now += 1;
            }
        }
        s
    }

    /// Checks the invariants listed in the crate docs; panics with a description if broken.
    /// Meant for tests; cost is linear in the number of entries.
    pub fn check_invariants(&self) {
        let mem_units: u64 = self
            .entries
            .values()
            .filter_map(|e| match e.mem? {
                Mem::Arena(a, _) | Mem::Segment { key: a, .. } => {
                    Some(u64::from(self.alloc.allocation_size(a)))
                }
            })
            .sum();
        assert_eq!(
            mem_units * UNIT,
            self.arena_used(),
            "allocator usage vs entries"
        );
        let seg: u64 = self
            .entries
            .values()
            .filter_map(|e| match e.mem? {
                Mem::Segment { bytes, .. } => Some(bytes),
                Mem::Arena(..) => None,
            })
            .sum();
        assert_eq!(seg, self.seg_used, "segment usage vs entries");
        for ((ns, id), g) in &self.names {
            let e = &self.entries[g];
            assert!(e.named && e.ns == *ns && &e.id == id, "name map vs entry");
        }
        for (g, e) in &self.entries {
            let in_lru = self.lru.contains(&(e.last_access, *g));
            let should = e.named && e.state == State::Sealed && e.mem.is_some();
            assert_eq!(in_lru, should, "lru membership of {g}");
            if !e.named && e.state == State::Sealed {
                assert!(
                    self.zombies.contains(g),
                    "unnamed sealed entry {g} must be a zombie"
                );
            }
        }
        let pins: u64 = self
            .client_pins
            .values()
            .flat_map(|m| m.values())
            .map(|n| u64::from(*n))
            .sum();
        let entry_pins: u64 = self.entries.values().map(|e| u64::from(e.pins)).sum();
        assert_eq!(pins, entry_pins, "pin accounting");
        let mut by_tenant: HashMap<String, TenantUsage> = HashMap::new();
        for (g, e) in &self.entries {
            assert_ne!(
                e.mem.is_some(),
                e.spilled,
                "entry {g} is in memory xor spilled"
            );
            let u = by_tenant.entry(e.id.tenant().to_owned()).or_default();
            if e.spilled {
                u.spill_bytes += e.charge;
            } else {
                u.arena_bytes += e.charge;
            }
        }
        by_tenant.retain(|_, u| *u != TenantUsage::default());
        assert_eq!(by_tenant, self.tenants.all(), "tenant usage vs entries");
    }
}
