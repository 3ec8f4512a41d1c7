//! The etcd backend (feature `etcd`), through `etcd-client`, limited to the etcd 3.4 API.
//!
//! Mapping: keys are `prefix + key`; `range` is a prefix get whose revision is the response
//! header's; `Compare::Absent` is `create_revision == 0`; a transaction is one etcd txn (one
//! revision); `keep_alive` sends one keepalive on a fresh keepalive stream (etcd answers a
//! TTL of 0 for a lease it does not know); a watch is a prefixed etcd watch from `after + 1`
//! whose events a task forwards into a bounded queue.
//!
//! Invariants: keys outside the prefix (or not UTF-8) are never returned; every watch task
//! ends when its receiver is dropped, when the etcd stream ends or fails (including a
//! compacted start revision), or when the store is dropped or closed.
use crate::keys::{self, Namespace};
use crate::types::{
    Compare, KeyValue, LeaseId, MetaError, MetaStore, Revision, Txn, TxnOp, WatchEvent, WatchStream,
};
use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, Error as EtcdError, GetOptions,
    PutOptions, Txn as EtcdTxn, TxnOp as EtcdTxnOp, WatchOptions, WatchRequestSender,
    WatchResponseStream,
};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings, so that a dead etcd ends watches. etcd refuses pings more often than every
/// 5 s by default.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Events a watcher may fall behind by; beyond that the forwarding task waits (etcd then
/// holds the rest).
const WATCH_QUEUE: usize = 1024;

// gRPC status codes (tonic's `Code` is not re-exported by etcd-client).
const GRPC_CANCELLED: i32 = 1;
const GRPC_UNKNOWN: i32 = 2;
const GRPC_INVALID_ARGUMENT: i32 = 3;
const GRPC_DEADLINE_EXCEEDED: i32 = 4;
const GRPC_NOT_FOUND: i32 = 5;
const GRPC_RESOURCE_EXHAUSTED: i32 = 8;
const GRPC_FAILED_PRECONDITION: i32 = 9;
const GRPC_OUT_OF_RANGE: i32 = 11;
const GRPC_UNAVAILABLE: i32 = 14;

/// A [`MetaStore`] in etcd (3.4 or later), all keys under one prefix.
pub struct EtcdStore {
    client: Client,
    ns: Namespace,
    endpoints: Vec<String>,
    stop: CancellationToken,
    tasks: TaskTracker,
    _stop_on_drop: DropGuard,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.ns.prefix())
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (`http://host:port`) and checks that it answers;
    /// `Unavailable` if it does not. Keys live under `prefix`.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<EtcdStore, MetaError> {
        if endpoints.is_empty() {
            return Err(MetaError::InvalidArgument("no etcd endpoints".into()));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT);
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| map_err(e, None))?;
        let stop = CancellationToken::new();
        let store = EtcdStore {
            client,
            ns: Namespace::new(prefix),
            endpoints: endpoints.to_vec(),
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
            tasks: TaskTracker::new(),
        };
        // The client connects lazily: make one cheap request so a wrong address fails here.
        store
            .client
            .kv_client()
            .get(
                prefix,
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .map_err(|e| {
                MetaError::Unavailable(format!(
                    "etcd at {} does not answer: {}",
                    endpoints.join(","),
                    map_err(e, None)
                ))
            })?;
        Ok(store)
    }

    /// This store's key prefix.
    pub fn prefix(&self) -> &str {
        self.ns.prefix()
    }

    /// Ends every watch and waits for their tasks. Other calls keep working.
    pub async fn close(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    fn kv(&self, kv: &etcd_client::KeyValue) -> Option<KeyValue> {
        let key = to_relative(&self.ns, kv.key())?;
        Some(KeyValue {
            key,
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            lease: lease_of(kv.lease()),
        })
    }
}

fn lease_of(id: i64) -> Option<LeaseId> {
    (id != 0).then_some(id)
}

/// The caller's key for an etcd key; `None` (logged) for keys outside the prefix or not UTF-8.
fn to_relative(ns: &Namespace, key: &[u8]) -> Option<String> {
    let Ok(key) = std::str::from_utf8(key) else {
        tracing::warn!(key = ?String::from_utf8_lossy(key), "ignoring a non-UTF-8 key in etcd");
        return None;
    };
    match ns.strip(key) {
        Some(k) => Some(k.to_owned()),
        None => {
            tracing::warn!(
                key,
                prefix = ns.prefix(),
                "etcd returned a key outside the prefix"
            );
            None
        }
    }
}

fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> Result<Revision, MetaError> {
    h.map(|h| h.revision())
        .ok_or_else(|| MetaError::Backend("etcd reply without a header".into()))
}

/// Maps an etcd-client error; `lease` names the lease a "lease not found" is about.
fn map_err(e: EtcdError, lease: Option<LeaseId>) -> MetaError {
    match e {
        EtcdError::GRpcStatus(s) => {
            let msg = s.message();
            match s.code() as i32 {
                GRPC_NOT_FOUND if msg.contains("lease not found") => match lease {
                    Some(id) => MetaError::LeaseNotFound(id),
                    None => MetaError::Backend(format!("etcd: {msg}")),
                },
                GRPC_INVALID_ARGUMENT | GRPC_FAILED_PRECONDITION => {
                    MetaError::InvalidArgument(format!("etcd: {msg}"))
                }
                GRPC_OUT_OF_RANGE if msg.contains("compacted") => MetaError::Compacted(0),
                GRPC_RESOURCE_EXHAUSTED if msg.contains("too many requests") => {
                    MetaError::Unavailable(format!("etcd: {msg}"))
                }
                GRPC_CANCELLED | GRPC_UNKNOWN | GRPC_DEADLINE_EXCEEDED | GRPC_UNAVAILABLE => {
                    MetaError::Unavailable(format!("etcd: {msg}"))
                }
                _ => MetaError::Backend(format!("etcd: {s}")),
            }
        }
        EtcdError::TransportError(e) => MetaError::Unavailable(format!("etcd transport: {e}")),
        EtcdError::IoError(e) => MetaError::Unavailable(format!("etcd io: {e}")),
        EtcdError::EndpointError(e) => MetaError::Unavailable(format!("etcd endpoint: {e}")),
        EtcdError::InvalidArgs(m) => MetaError::InvalidArgument(format!("etcd: {m}")),
        EtcdError::InvalidUri(e) => MetaError::InvalidArgument(format!("etcd endpoint: {e}")),
        EtcdError::WatchError(m) => MetaError::Unavailable(format!("etcd watch: {m}")),
        other => MetaError::Backend(format!("etcd: {other}")),
    }
}

#[async_trait::async_trait]
impl MetaStore for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, MetaError> {
        let key = self.ns.key(key)?;
        let resp = self
            .client
            .kv_client()
            .get(key, None)
            .await
            .map_err(|e| map_err(e, None))?;
        Ok(resp.kvs().first().and_then(|kv| self.kv(kv)))
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), MetaError> {
        let prefix = self.ns.range(prefix)?;
        let resp = self
            .client
            .kv_client()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| map_err(e, None))?;
        let rev = header_revision(resp.header())?;
        Ok((
            resp.kvs().iter().filter_map(|kv| self.kv(kv)).collect(),
            rev,
        ))
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, MetaError> {
        let key = self.ns.key(key)?;
        keys::check_value(&value)?;
        let options = lease.map(|l| PutOptions::new().with_lease(l));
        let resp = self
            .client
            .kv_client()
            .put(key, value, options)
            .await
            .map_err(|e| map_err(e, lease))?;
        header_revision(resp.header())
    }

    async fn delete(&self, key: &str) -> Result<bool, MetaError> {
        let key = self.ns.key(key)?;
        let resp = self
            .client
            .kv_client()
            .delete(key, None)
            .await
            .map_err(|e| map_err(e, None))?;
        Ok(resp.deleted() > 0)
    }

    async fn txn(&self, txn: Txn) -> Result<bool, MetaError> {
        let txn = self.ns.txn(txn)?;
        let lease_hint = txn
            .success
            .iter()
            .chain(&txn.failure)
            .find_map(|op| match op {
                TxnOp::Put { lease, .. } => *lease,
                TxnOp::Delete { .. } => None,
            });
        let compare: Vec<EtcdCompare> = txn
            .compare
            .into_iter()
            .map(|c| match c {
                Compare::Absent(k) => EtcdCompare::create_revision(k, CompareOp::Equal, 0),
                Compare::Value(k, v) => EtcdCompare::value(k, CompareOp::Equal, v),
                Compare::ModRevision(k, r) => EtcdCompare::mod_revision(k, CompareOp::Equal, r),
            })
            .collect();
        let ops = |ops: Vec<TxnOp>| -> Vec<EtcdTxnOp> {
            ops.into_iter()
                .map(|op| match op {
                    TxnOp::Put { key, value, lease } => {
                        EtcdTxnOp::put(key, value, lease.map(|l| PutOptions::new().with_lease(l)))
                    }
                    TxnOp::Delete { key } => EtcdTxnOp::delete(key, None),
                })
                .collect()
        };
        let etcd_txn = EtcdTxn::new()
            .when(compare)
            .and_then(ops(txn.success))
            .or_else(ops(txn.failure));
        let resp = self
            .client
            .kv_client()
            .txn(etcd_txn)
            .await
            .map_err(|e| map_err(e, lease_hint))?;
        Ok(resp.succeeded())
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, MetaError> {
        let secs = keys::lease_secs(ttl)?;
        let resp = self
            .client
            .lease_client()
            .grant(secs as i64, None)
            .await
            .map_err(|e| map_err(e, None))?;
        if !resp.error().is_empty() {
            return Err(MetaError::Backend(format!(
                "etcd lease grant: {}",
                resp.error()
            )));
        }
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, MetaError> {
        // etcd-client sends one keepalive and reads its answer while opening the stream; it
        // reports a TTL of 0 (unknown lease) as this error.
        let (mut keeper, mut answers) = match self.client.lease_client().keep_alive(lease).await {
            Ok(pair) => pair,
            Err(EtcdError::LeaseKeepAliveError(m)) if m.contains("not found") => {
                return Err(MetaError::LeaseNotFound(lease))
            }
            Err(e) => return Err(map_err(e, Some(lease))),
        };
        // One more round to learn the TTL (the first answer is not handed out).
        keeper
            .keep_alive()
            .await
            .map_err(|e| map_err(e, Some(lease)))?;
        match answers
            .message()
            .await
            .map_err(|e| map_err(e, Some(lease)))?
        {
            Some(resp) if resp.ttl() > 0 => Ok(Duration::from_secs(resp.ttl() as u64)),
            Some(_) => Err(MetaError::LeaseNotFound(lease)),
            None => Err(MetaError::Unavailable(
                "etcd closed the lease keepalive stream".into(),
            )),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), MetaError> {
        match self.client.lease_client().revoke(lease).await {
            Ok(_) => Ok(()),
            Err(e) => match map_err(e, Some(lease)) {
                MetaError::LeaseNotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, MetaError> {
        let prefix = self.ns.range(prefix)?;
        if self.stop.is_cancelled() {
            return Err(MetaError::Unavailable("the store is closed".into()));
        }
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(after.max(0) + 1);
        let stream = self
            .client
            .watch_client()
            .watch(prefix, Some(options))
            .await
            .map_err(|e| map_err(e, None))?;
        let (requests, mut responses) = stream.split();
        // The first answer says whether the watch was created.
        let first = tokio::time::timeout(REQUEST_TIMEOUT, responses.message())
            .await
            .map_err(|_| MetaError::Unavailable("etcd did not confirm the watch".into()))?
            .map_err(|e| map_err(e, None))?;
        let pending = match first {
            None => {
                return Err(MetaError::Unavailable(
                    "etcd closed the watch stream".into(),
                ))
            }
            Some(resp) if resp.canceled() => {
                return Err(if resp.compact_revision() > 0 {
                    MetaError::Compacted(after)
                } else {
                    MetaError::Backend(format!("etcd refused the watch: {}", resp.cancel_reason()))
                });
            }
            Some(resp) => resp,
        };
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let ns = self.ns.clone();
        let stop = self.stop.clone();
        self.tasks
            .spawn(forward_watch(requests, responses, pending, tx, ns, stop));
        Ok(rx)
    }
}

/// Forwards one etcd watch into `tx` until either side ends.
async fn forward_watch(
    // Held, not used: dropping it half-closes the gRPC stream and etcd then ends the watch.
    _requests: WatchRequestSender,
    mut responses: WatchResponseStream,
    first: etcd_client::WatchResponse,
    tx: mpsc::Sender<WatchEvent>,
    ns: Namespace,
    stop: CancellationToken,
) {
    let mut next = Some(first);
    loop {
        let resp = match next.take() {
            Some(r) => r,
            None => {
                let msg = tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tx.closed() => return,
                    m = responses.message() => m,
                };
                match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        tracing::debug!("etcd ended a watch stream");
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "etcd watch stream failed");
                        return;
                    }
                }
            }
        };
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let Some(key) = to_relative(&ns, kv.key()) else {
                continue;
            };
            // A delete event's key-value has version 0; a put's is at least 1. (Reading the
            // event type instead would panic on a type this client does not know.)
            let event = if kv.version() == 0 {
                WatchEvent::Delete {
                    key,
                    mod_revision: kv.mod_revision(),
                }
            } else {
                WatchEvent::Put(KeyValue {
                    key,
                    value: kv.value().to_vec(),
                    create_revision: kv.create_revision(),
                    mod_revision: kv.mod_revision(),
                    lease: lease_of(kv.lease()),
                })
            };
            let sent = tokio::select! {
                _ = stop.cancelled() => return,
                r = tx.send(event) => r.is_ok(),
            };
            if !sent {
                return;
            }
        }
        if resp.canceled() {
            tracing::debug!(
                compact_revision = resp.compact_revision(),
                reason = resp.cancel_reason(),
                "etcd cancelled a watch"
            );
            return;
        }
    }
}
