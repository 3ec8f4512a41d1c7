//! The dataworker's object index as a deterministic state machine: names, allocations in the
//! arena (through `offset-allocator`), seal state, pins, LRU eviction with optional spill, and
//! KV expiry.
//!
//! The store never touches a socket, a file or the clock: the caller passes `now` (milliseconds
//! on any monotonic scale) and a [`ExternalPins`] view of the pins clients hold in shared
//! memory, and gets back what to do (bytes to spill, files to delete, segments to drop). That
//! makes every decision testable without servers; see the property tests in `tests`.
//!
//! Payloads live in the arena (what the worker writes itself) or in a segment of their own
//! ([`Backing::Segment`]: what a client writes; the id is the generation), each budget with
//! its own capacity and watermarks; the store only counts segment bytes (whole pages) and
//! lists the segments it frees ([`Store::take_freed_segments`]) for the caller to drop.
//!
//! Invariants (checked by `Store::check_invariants` in tests):
//! - the allocator's used space equals the sum of the allocations of in-memory entries;
//! - an allocation is freed only when no socket pin and no external pin holds it;
//! - a name maps to at most one live entry; a deleted entry that is still pinned is a zombie,
//!   no longer reachable by name, freed when its last pin ends;
//! - only sealed, in-memory, unpinned entries are evicted, least recently used first, by the
//!   store's own LRU: clients' claims of recent reads reach it only through
//!   [`Store::touch`], which ignores anything but the claimant's own tenant's live entries,
//!   and an eviction round looks at each entry at most once;
//! - the segment bytes counted equal the whole pages of the segments of in-memory entries;
//! - each tenant's arena and spill usage equals the charges of its entries in memory and on
//!   disk (names qualified by tenant, see `shoal_protocol::ObjectId`), never goes negative,
//!   and a request that would pass a tenant's limit fails with `QuotaExceeded` before it
//!   changes anything.
//!
//! Beside the index, two more pure pieces for the cluster: the consistent-hash [`Ring`] that
//! says which nodes own an id's directory entry, and the [`Directory`] shard an owner keeps.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod directory;
mod ring;
mod store;

pub use directory::{DirRecord, Directory, DirectoryConfig, Locate, Refused};
pub use ring::{key_point, Ring, DEFAULT_VNODES};
pub use store::{
    Backing, ClientId, Evicted, ExternalPins, Gen, Lookup, NoExternalPins, Placement, Stats, Store,
    StoreConfig, StoreError, TenantLimits, TenantUsage, SEGMENT_PAGE, UNIT,
};

#[cfg(test)]
mod tests;
