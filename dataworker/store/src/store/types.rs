//! What the [`Store`] takes and returns: its configuration, the allocation unit,
//! generations and client ids, the [`ExternalPins`] the worker plugs in for the shared-memory
//! fast path, errors with their wire codes, and the outcomes of placements, lookups and
//! evictions. Plain data: no state and no IO here.
use shoal_protocol::{ErrorCode, Namespace, ObjectId, WireError};

#[cfg(doc)]
use super::Store;

/// Allocation granule in bytes: every allocation starts on a 64-byte (cache line) boundary.
pub const UNIT: u64 = 64;
/// A segment is backed in whole pages of this size; that is what it is counted for.
pub const SEGMENT_PAGE: u64 = 4096;

/// Where a new entry's payload goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// The arena, with its name (payloads the worker writes itself).
    Arena,
    /// A segment of its own, whose id is the entry's generation (payloads a client writes);
    /// its name still goes in the arena.
    Segment,
}

/// Allocation generation: unique for the store's lifetime, never 0. Pins name generations, so
/// a name that is deleted and re-created never confuses an old view with the new object.
pub type Gen = u64;
/// A connected client, as numbered by the worker.
pub type ClientId = u64;

/// Pins that clients hold without asking the worker (the shared-memory fast path). Only
/// pins by clients of the entry's own tenant count: that is the only tenant whose clients
/// can find the entry.
pub trait ExternalPins {
    /// Whether some client of `tenant` holds `gen` now.
    fn is_pinned(&self, gen: Gen, tenant: &str) -> bool;
    /// Withdraws `gen` so no new external pin can be taken, then reports whether it is free
    /// of external pins of `tenant`'s clients. On `false` the store keeps the memory.
    fn reclaim(&mut self, gen: Gen, tenant: &str) -> bool;
}

/// No fast path: nothing is pinned externally.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoExternalPins;

impl ExternalPins for NoExternalPins {
    fn is_pinned(&self, _: Gen, _: &str) -> bool {
        false
    }
    fn reclaim(&mut self, _: Gen, _: &str) -> bool {
        true
    }
}

/// Sizes and policies.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Arena bytes the store may hand out.
    pub capacity: u64,
    /// Segment bytes (whole pages) the store may hand out besides the arena; 0: no segments.
    pub segment_capacity: u64,
    /// Payloads larger than this that the store places itself (restores from disk) go to a
    /// segment; smaller ones to the arena.
    pub segment_above: u64,
    /// Start evicting when usage would pass this fraction.
    pub high_watermark: f64,
    /// Evict down to this fraction.
    pub low_watermark: f64,
    /// Evicted objects are spilled (kept on disk) instead of dropped.
    pub spill: bool,
    /// Most allocations alive at once (allocator node budget).
    pub max_allocations: u32,
    /// Never drop a primary copy (an object sealed here, not pulled from another node) to
    /// make room; without `spill` only replicas are evicted. Set in a cluster, where the
    /// primary may be the only copy.
    pub keep_primaries: bool,
}

impl StoreConfig {
    /// Defaults for an arena of `capacity` bytes: 90% / 80% watermarks, no spill.
    pub fn new(capacity: u64) -> Self {
        Self {
            capacity,
            segment_capacity: 0,
            segment_above: u64::MAX,
            high_watermark: 0.9,
            low_watermark: 0.8,
            spill: false,
            max_allocations: 1 << 20,
            keep_primaries: false,
        }
    }
}

/// Failures the store reports to callers (each maps to a stable wire code).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    /// No such name.
    #[error("{0} not found")]
    NotFound(ObjectId),
    /// The name exists.
    #[error("{0} already exists")]
    AlreadyExists(ObjectId),
    /// Sealed already.
    #[error("{0} is already sealed")]
    AlreadySealed(ObjectId),
    /// Not created by this client, or not unsealed.
    #[error("{0} is not an unsealed buffer of this client")]
    NotUnsealed(ObjectId),
    /// No room even after eviction.
    #[error("store full: {requested} bytes requested, {used} of {capacity} used, {pinned} pinned or unsealed, none evictable")]
    StoreFull {
        /// Bytes asked for (payload + key, rounded).
        requested: u64,
        /// Bytes in use.
        used: u64,
        /// Arena capacity.
        capacity: u64,
        /// Bytes that cannot be evicted now.
        pinned: u64,
    },
    /// A size or range is out of bounds.
    #[error("{0}")]
    InvalidArgument(String),
    /// The tenant of the name would pass one of its limits; nothing was changed.
    #[error("quota exceeded: {resource} would be {wanted}, the limit is {limit}")]
    QuotaExceeded {
        /// Which limit (`arena_bytes`, `spill_bytes`).
        resource: &'static str,
        /// The limit.
        limit: u64,
        /// Usage after the request.
        wanted: u64,
    },
}

impl StoreError {
    /// The stable wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::NotFound(_) => ErrorCode::NotFound,
            StoreError::AlreadyExists(_) => ErrorCode::AlreadyExists,
            StoreError::AlreadySealed(_) => ErrorCode::AlreadySealed,
            StoreError::NotUnsealed(_) => ErrorCode::NotSealed,
            StoreError::StoreFull { .. } => ErrorCode::StoreFull,
            StoreError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            StoreError::QuotaExceeded { .. } => ErrorCode::QuotaExceeded,
        }
    }

    /// As a wire error.
    pub fn to_wire(&self) -> WireError {
        WireError::new(self.code(), self.to_string())
    }
}

/// Where a new or restored allocation lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Generation.
    pub gen: Gen,
    /// Payload offset in the arena (0 for a segment).
    pub offset: u64,
    /// Payload length.
    pub len: u64,
    /// Offset of the name bytes in the arena (right after an arena payload).
    pub key_off: u64,
    /// The payload is in segment `gen`, not in the arena.
    pub segment: bool,
}

/// An object the store pushed out of memory; the caller acts on it before the memory is
/// reused (writes it to disk when `spill`, and withdraws it from any index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evicted {
    /// Generation.
    pub gen: Gen,
    /// Namespace.
    pub ns: Namespace,
    /// Name.
    pub id: ObjectId,
    /// Payload offset (still readable until the caller's next write into the arena).
    pub offset: u64,
    /// Payload length.
    pub len: u64,
    /// The payload is segment `gen` (the caller drops it after spilling; it is also listed
    /// by [`Store::take_freed_segments`]).
    pub segment: bool,
    /// Kept on disk (true) or dropped.
    pub spill: bool,
    /// A copy pulled from another node (dropped, never spilled).
    pub replica: bool,
}

/// What a name resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Sealed and in memory; pinned for the client.
    Ready(Placement),
    /// Sealed but on disk; call [`Store::restore`].
    Spilled(Gen),
    /// Created but not sealed yet.
    Unsealed,
    /// No such name.
    Missing,
}

/// Counters and gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes allocated: arena and segments.
    pub used: u64,
    /// Of which in segments.
    pub segment_bytes: u64,
    /// Sealed objects (memory or disk).
    pub objects: u64,
    /// Unsealed buffers.
    pub unsealed: u64,
    /// Live KV keys.
    pub kv_keys: u64,
    /// Socket pins.
    pub pins: u64,
    /// Deleted entries still pinned.
    pub zombies: u64,
    /// Entries on disk now.
    pub spilled_now: u64,
    /// Evictions so far (dropped or spilled).
    pub evictions: u64,
    /// Spills so far.
    pub spills: u64,
}
