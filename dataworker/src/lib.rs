//! The shoal dataworker: one per node. It owns the node's shared-memory arena and serves local
//! clients on a Unix socket: objects (create/seal/get/release/delete), KV with TTL, status,
//! Prometheus metrics and a health endpoint.
//!
//! In a cluster (see [`ClusterParts`]) it also registers in the metadata store, owns a shard
//! of the object directory, and pulls objects sealed on other nodes over QUIC.
//!
//! Decisions (what to evict, what a name resolves to, when a key expires) are made by the
//! sans-IO `shoal-store`; this crate does the IO around it: sockets, fd passing, spill files,
//! timers. It holds no `unsafe` (shared memory is `shoal-shm`'s) and never reads the
//! environment: everything comes in through [`Config`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod cluster;
mod config;
mod conn;
mod http;
mod ops;
mod ring;
mod server;
mod spill;
mod state;

pub use config::{ClusterConfig, Config, ConfigError};
pub use server::{ClusterParts, Dataworker, StartError};

/// The runtime a dataworker runs on: `threads` worker threads (1 serves the socket path best
/// on small machines: no cross-thread wakeups; local hits do not use the worker at all).
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("dataworker")
        .enable_all()
        .build()
}
