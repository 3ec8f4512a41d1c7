//! Criterion micro-benchmarks of shoal's pure cores: the decisions that run on every request
//! and take `now` and their inputs as arguments (sans-IO, so they time alone). One binary, one
//! module per core:
//!
//! - `store`: the dataworker's object index (lookup, insert), its arena allocator (allocate
//!   and free), LRU eviction, and the consistent-hash ring;
//! - `shm`: the shared-memory index a local client reads without a syscall;
//! - `scheduler`: placing one instance among 1,000 nodes;
//! - `router`: the proxy picking an instance among 1,000;
//! - `protocol`: frame encode and decode.
//!
//! Run with `cargo bench -p shoal-perf` (add `-- --warm-up-time 1 --measurement-time 3` for a
//! shorter run, or a filter such as `-- router`). Benchmarks are not tests: nothing here
//! asserts a time; perf/RESULTS.md records what one run printed.
#![allow(clippy::unwrap_used)]

mod protocol;
mod router;
mod scheduler;
mod shm;
mod store;

criterion::criterion_group!(
    cores,
    store::index,
    store::arena,
    store::eviction,
    store::ring,
    shm::index,
    scheduler::place,
    router::pick,
    protocol::frames,
);
criterion::criterion_main!(cores);
