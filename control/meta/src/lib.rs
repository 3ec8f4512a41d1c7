//! shoal's metadata store: the [`MetaStore`] trait (get/put/delete/range by prefix,
//! compare-and-swap transactions, leases with keepalive, watches) and its backends:
//!
//! - [`MemStore`]: embedded, in the control process, persisted to local files (a snapshot
//!   and an append-only log; [`decode_store`] recovers it from their bytes);
//! - [`RemoteStore`]: a client of a store served by control ([`serve`]) over mutual TLS under
//!   the cluster CA (`shoal-pki`: a certificate per node, one for control);
//! - `EtcdStore` (feature `etcd`): a real etcd through `etcd-client`.
//!
//! Every backend keeps its keys under one configurable prefix, so clusters can share an etcd;
//! callers always see keys relative to it. Every backend enforces the same limits
//! ([`MAX_KEY_LEN`], [`MAX_VALUE_LEN`], [`MAX_TXN_OPS`], [`MAX_TXN_BYTES`],
//! [`MAX_LEASE_TTL`]). [`Election`] runs leader election over any backend.
//!
//! [`LeasedRecord`] holds a record under a lease for as long as its owner lives (every node
//! component's membership record). [`records`] is the cluster's key layout and the record types stored under it: the one
//! definition every component reads. [`TokenBook`] follows the tokens stored there and
//! authenticates requests with them.
//!
//! This crate never reads the environment and holds no `unsafe`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod election;
#[cfg(feature = "etcd")]
mod etcd;
mod follow;
mod keys;
mod leased;
mod mem;
pub mod records;
mod remote;
mod tokens;
mod types;

pub use election::{Election, Role};
#[cfg(feature = "etcd")]
pub use etcd::EtcdStore;
pub use follow::{Followed, Follower};
pub use keys::{MAX_KEY_LEN, MAX_LEASE_TTL, MAX_TXN_BYTES, MAX_TXN_OPS, MAX_VALUE_LEN};
pub use leased::{
    LeasedRecord, RETRY_PAUSE as LEASE_RETRY_PAUSE, STOP_TIMEOUT as LEASE_STOP_TIMEOUT,
};
pub use mem::{decode_store, MemStore, MemStoreOptions, StoreFile, StoreFileError, StoreImage};
#[doc(hidden)]
pub use remote::fuzz_support as remote_fuzz_support;
pub use remote::{serve, RemoteStore};
pub use tokens::{
    issue_instance_token, issue_token, now_ms, revoke_token, IssueError, TokenBook, TokenFollower,
};
pub use types::{
    Compare, KeyValue, LeaseId, MetaError, MetaStore, Revision, Txn, TxnOp, WatchEvent, WatchStream,
};
