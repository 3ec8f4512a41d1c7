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
//!
//! Modules, and who owns what:
//! - `server`: [`Dataworker`], start-up and shutdown; owns the task tracker, the shutdown
//!   token and the mailbox thread.
//! - `local`: the local store (arena, shared index, spill directory, the `shoal-store` under
//!   one mutex) and the synchronous handling of requests. Shared as `Arc<Local>` by the worker
//!   and the cluster; it holds neither, and reports changes to the cluster through its outbox
//!   channel only.
//! - `worker`: what the client-facing side holds: `Arc<Local>`, `Option<Arc<Cluster>>` and the
//!   mailbox poller. `conn` (one socket connection), `ring` (the mailbox poller thread), `ops`
//!   (requests that wait: gets, cluster deletes) and `http` (`/metrics`, `/health`) run on it.
//! - `cluster`: this node's part of the cluster (membership, node loss, directory shard,
//!   outbox, remote pulls, the peer service); holds `Arc<Local>`, never the worker.
//! - `tenancy`: who a client is (uid map, token book) and the qualification of its requests
//!   with its tenant; `conn` and `ring` pass every request through it.
//! - `spill`: spill files; `config`: the typed configuration.
//!
//! The references form no cycle: worker → cluster → local, worker → local.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod cluster;
mod config;
mod conn;
mod http;
mod local;
mod ops;
mod ring;
mod segments;
mod server;
mod spill;
mod tenancy;
mod worker;

pub use config::{ClusterConfig, Config, ConfigError, UidTenant};
pub use server::{ClusterParts, Dataworker, StartError, StartParts};

/// The runtime a dataworker runs on: `threads` worker threads (1 serves the socket path best
/// on small machines: no cross-thread wakeups; local hits do not use the worker at all).
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("dataworker")
        .enable_all()
        .build()
}
