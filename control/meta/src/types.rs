//! The trait every backend implements, and the values it speaks in.
use serde::{Deserialize, Serialize};
use shoal_protocol::{ErrorCode, WireError};
use std::time::Duration;

/// A lease: keys attached to it are deleted when it is revoked or expires.
pub type LeaseId = i64;
/// The store's logical clock: every change bumps it by one.
pub type Revision = i64;

/// One key and its value, as stored. `key` is relative to the backend's prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    /// Key (without the prefix).
    pub key: String,
    /// Value bytes.
    pub value: Vec<u8>,
    /// Revision of the change that created the key.
    pub create_revision: Revision,
    /// Revision of the last change to the key.
    pub mod_revision: Revision,
    /// The lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// A condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists and holds exactly this value.
    Value(String, Vec<u8>),
    /// The key's last change has this revision (0: the key does not exist).
    ModRevision(String, Revision),
}

/// A write inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOp {
    /// Put a value, optionally attached to a lease.
    Put {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
        /// Lease.
        lease: Option<LeaseId>,
    },
    /// Delete a key (no error when absent).
    Delete {
        /// Key.
        key: String,
    },
}

/// If every compare holds, apply `success`, else `failure`; atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    /// Conditions (all must hold).
    pub compare: Vec<Compare>,
    /// Applied when they hold.
    pub success: Vec<TxnOp>,
    /// Applied otherwise.
    pub failure: Vec<TxnOp>,
}

impl Txn {
    /// Create-if-absent: put `value` at `key` only if no such key exists (the transaction
    /// reports whether it did).
    pub fn create(key: impl Into<String>, value: Vec<u8>) -> Txn {
        let key = key.into();
        Txn {
            compare: vec![Compare::Absent(key.clone())],
            success: vec![TxnOp::Put {
                key,
                value,
                lease: None,
            }],
            failure: vec![],
        }
    }
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchEvent {
    /// A key was created or changed.
    Put(KeyValue),
    /// A key was deleted (explicitly, or because its lease ended).
    Delete {
        /// Key (without the prefix).
        key: String,
        /// Revision of the deletion.
        mod_revision: Revision,
    },
}

impl WatchEvent {
    /// The key this event is about.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }

    /// The revision of the change.
    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// Events of one watch, in revision order. The stream ends (`recv` returns `None`) when the
/// watch breaks: the backend became unreachable, or the watcher fell too far behind (its
/// bounded queue filled). The watcher then reads the current state with `range` and watches
/// again from that revision.
pub type WatchStream = tokio::sync::mpsc::Receiver<WatchEvent>;

/// Why a metadata operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    /// The backend cannot be reached (control or etcd down, connection lost).
    #[error("metadata store unavailable: {0}")]
    Unavailable(String),
    /// The lease does not exist (expired or revoked).
    #[error("lease {0:x} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// A key or argument is not acceptable (empty key, TTL out of range, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The requested watch revision was compacted away; range and watch again.
    #[error("revision {0} was compacted")]
    Compacted(Revision),
    /// The backend failed in a way the caller cannot fix (disk full, corrupt reply).
    #[error("metadata store failed: {0}")]
    Backend(String),
}

impl MetaError {
    /// The stable wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            MetaError::Unavailable(_) => ErrorCode::Unavailable,
            MetaError::LeaseNotFound(_) => ErrorCode::NotFound,
            MetaError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            MetaError::Compacted(_) => ErrorCode::NotFound,
            MetaError::Backend(_) => ErrorCode::Internal,
        }
    }

    /// As a wire error.
    pub fn to_wire(&self) -> WireError {
        WireError::new(self.code(), self.to_string())
    }
}

/// A metadata store. Keys are UTF-8 and relative to the backend's prefix; all methods are
/// safe to call concurrently.
#[async_trait::async_trait]
pub trait MetaStore: Send + Sync + std::fmt::Debug + 'static {
    /// One key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, MetaError>;

    /// Every key starting with `prefix`, in key order, and the store's revision at the time of
    /// the read (watch from it to see every later change exactly once).
    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), MetaError>;

    /// Sets a key; returns the revision of the change.
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, MetaError>;

    /// Deletes a key; returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool, MetaError>;

    /// Runs a transaction; returns whether the compares held (and `success` was applied).
    async fn txn(&self, txn: Txn) -> Result<bool, MetaError>;

    /// Grants a lease of `ttl` (rounded up to whole seconds, at least one).
    async fn grant(&self, ttl: Duration) -> Result<LeaseId, MetaError>;

    /// Renews a lease for its full TTL; returns the TTL. `LeaseNotFound` once it has expired.
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, MetaError>;

    /// Ends a lease now, deleting its keys. Revoking an unknown lease is not an error.
    async fn revoke(&self, lease: LeaseId) -> Result<(), MetaError>;

    /// Watches every key starting with `prefix` for changes with a revision above `after`.
    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, MetaError>;
}
