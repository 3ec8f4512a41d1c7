//! shoal's metadata store: the [`MetaStore`] trait (get/put/delete/range by prefix,
//! compare-and-swap transactions, leases with keepalive, watches) and its backends:
//!
//! - [`MemStore`]: embedded, in the control process, persisted to a local file;
//! - [`RemoteStore`]: a client of a `MemStore` served by control over TCP ([`serve`]);
//! - `EtcdStore` (feature `etcd`): a real etcd through `etcd-client`.
//!
//! Every backend keeps its keys under one configurable prefix, so clusters can share an etcd;
//! callers always see keys relative to it. [`elect`] runs leader election over any backend.
//!
//! This crate never reads the environment and holds no `unsafe`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod types;

pub use types::{
    Compare, KeyValue, LeaseId, MetaError, MetaStore, Revision, Txn, TxnOp, WatchEvent,
    WatchStream,
};
