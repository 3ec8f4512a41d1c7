//! The embedded backend: a sorted in-memory map, optionally persisted to local files (a
//! snapshot plus an append-only log of the mutations since it; see `disk`).
//!
//! Invariants:
//! - Every mutation happens under one lock and, when the store has files, is made durable
//!   (one checksummed log record, fsynced) *before* it becomes visible. It is applied in place
//!   while a journal (`change`) records both its log record and how to undo it; a failed
//!   write undoes it, leaving the store as it was, and returns `Backend`. Mutations do not
//!   await, so a cancelled caller can never leave a half-applied change.
//! - Watch events are published under the same lock, after the change is durable, so a
//!   watcher registered at revision `r` sees every later event exactly once, in order.
//! - The last `history` events are kept; a watch from an older revision gets `Compacted`.
//!   After a restart the history is empty: revisions up to the restored one count as
//!   compacted.
//! - Leases' deadlines use `tokio::time`, so tests may pause the clock. Leases restored from
//!   the file get a fresh full TTL. An expired lease is revoked by the expiry task, or by the
//!   next operation that looks at leases, whichever comes first.
//!
//! Files: the snapshot at the given path and its log beside it (`.log` appended), both
//! `0600`, never opened through a symbolic link. A missing pair is an empty store; a torn log
//! tail (a crash during an append) is cut off; any other damage is an error naming the file
//! (control must not start empty, or from a silently shortened history, by accident).
//! Formats: `snapshot` and `log`; recovery from the bytes alone is [`decode_store`] (`image`).
use crate::keys::{self, Namespace};
use crate::types::{
    Compare, KeyValue, LeaseId, MetaError, MetaStore, Revision, Txn, TxnOp, WatchEvent, WatchStream,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

mod change;
mod disk;
mod files;
mod image;
mod log;
mod snapshot;

use change::Journal;
use disk::Disk;
pub use image::{decode_store, StoreFile, StoreFileError, StoreImage};

/// How long the expiry task waits before retrying after a failed write.
const EXPIRY_RETRY: Duration = Duration::from_secs(1);

/// Tuning of a [`MemStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemStoreOptions {
    /// Events kept so that a watch can start from an older revision (default 10 000).
    pub history: usize,
    /// Events a watcher may fall behind by before its stream is ended (default 1024).
    pub watch_queue: usize,
    /// The log is compacted into a new snapshot once it is larger than both this many bytes
    /// (default 4 MiB) and `log_ratio` times the snapshot.
    pub log_min_bytes: u64,
    /// See `log_min_bytes` (default 2; at least 1): the amortised cost of a mutation is its
    /// log record plus `1 / log_ratio` of the snapshot's bytes.
    pub log_ratio: u32,
}

impl Default for MemStoreOptions {
    fn default() -> Self {
        Self {
            history: 10_000,
            watch_queue: 1024,
            log_min_bytes: 4 << 20,
            log_ratio: 2,
        }
    }
}

/// The embedded metadata store. Cheap to clone; clones and [`MemStore::with_prefix`] views
/// share one store. Lease expiry runs in a task owned by the store: it stops when the last
/// handle is dropped or [`MemStore::close`] is called.
#[derive(Clone)]
pub struct MemStore {
    shared: Arc<Shared>,
    ns: Namespace,
}

impl std::fmt::Debug for MemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemStore")
            .field("prefix", &self.ns.prefix())
            .field("file", &self.shared.file)
            .finish_non_exhaustive()
    }
}

struct Shared {
    state: Mutex<State>,
    /// The snapshot's path, for `Debug`.
    file: Option<PathBuf>,
    options: MemStoreOptions,
    wake: Arc<Notify>,
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
    _stop_on_drop: DropGuard,
}

struct State {
    data: Data,
    /// The files, when the store is persisted.
    disk: Option<Disk>,
    deadlines: HashMap<LeaseId, Instant>,
    history: VecDeque<WatchEvent>,
    /// Events with a revision up to this one may be missing from `history`.
    compacted: Revision,
    watchers: Vec<Watcher>,
}

/// What is persisted (leases' key sets are derived on load).
#[derive(Debug, Clone)]
struct Data {
    revision: Revision,
    next_lease: LeaseId,
    keys: BTreeMap<String, Entry>,
    leases: BTreeMap<LeaseId, Lease>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    value: Vec<u8>,
    create_revision: Revision,
    mod_revision: Revision,
    lease: Option<LeaseId>,
}

#[derive(Debug, Clone)]
struct Lease {
    ttl_secs: u64,
    keys: BTreeSet<String>,
}

struct Watcher {
    /// Stored-key prefix watched.
    prefix: String,
    /// Bytes to strip from stored keys (the watcher's namespace prefix).
    strip: usize,
    /// Only events above this revision.
    after: Revision,
    tx: mpsc::Sender<WatchEvent>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MemStore {
    /// Opens the store: in memory only when `path` is `None`, else persisted to `path` (a
    /// missing file starts an empty store and is created at once, so an unwritable directory
    /// fails here). Keys live under `prefix`. Must be called inside a Tokio runtime (the
    /// lease expiry task is spawned on it).
    pub fn open(path: Option<&Path>, prefix: &str) -> Result<MemStore, MetaError> {
        Self::open_with(path, prefix, MemStoreOptions::default())
    }

    /// [`MemStore::open`] with explicit options.
    pub fn open_with(
        path: Option<&Path>,
        prefix: &str,
        options: MemStoreOptions,
    ) -> Result<MemStore, MetaError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            MetaError::Backend("MemStore::open must be called inside a Tokio runtime".into())
        })?;
        let (disk, data) = match path {
            None => (None, Data::empty()),
            Some(p) => {
                let (disk, data) = Disk::open(p, &options)?;
                (Some(disk), data)
            }
        };
        let now = Instant::now();
        let deadlines = data
            .leases
            .iter()
            .map(|(id, l)| (*id, now + Duration::from_secs(l.ttl_secs)))
            .collect();
        let stop = CancellationToken::new();
        let wake = Arc::new(Notify::new());
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                compacted: data.revision,
                data,
                disk,
                deadlines,
                history: VecDeque::new(),
                watchers: Vec::new(),
            }),
            file: path.map(Path::to_path_buf),
            options,
            wake: wake.clone(),
            stop: stop.clone(),
            task: Mutex::new(None),
            _stop_on_drop: stop.clone().drop_guard(),
        });
        let task = runtime.spawn(expiry_loop(Arc::downgrade(&shared), wake, stop));
        *shared.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(MemStore {
            shared,
            ns: Namespace::new(prefix),
        })
    }

    /// A handle on the same store whose keys live under `prefix` instead.
    pub fn with_prefix(&self, prefix: &str) -> MemStore {
        MemStore {
            shared: self.shared.clone(),
            ns: Namespace::new(prefix),
        }
    }

    /// This handle's key prefix.
    pub fn prefix(&self) -> &str {
        self.ns.prefix()
    }

    /// The store's current revision.
    pub fn revision(&self) -> Revision {
        lock(&self.shared.state).data.revision
    }

    /// Writes the whole data as a new snapshot and starts an empty log (a persisted store;
    /// nothing to do in memory). Happens by itself when the log outgrows its bound
    /// ([`MemStoreOptions::log_min_bytes`]) and on [`MemStore::close`].
    pub fn compact(&self) -> Result<(), MetaError> {
        let mut st = lock(&self.shared.state);
        let State { data, disk, .. } = &mut *st;
        match disk {
            Some(disk) => disk.compact(data),
            None => Ok(()),
        }
    }

    /// Bytes of the snapshot and of the log (zero for a store in memory).
    pub fn file_sizes(&self) -> (u64, u64) {
        lock(&self.shared.state)
            .disk
            .as_ref()
            .map_or((0, 0), Disk::sizes)
    }

    /// Stops lease expiry and ends every watch, for every handle on this store, compacts its
    /// files (so the next open reads one snapshot), and waits for the expiry task. Reads and
    /// writes keep working (for a final flush or inspection).
    pub async fn close(&self) {
        self.shared.stop.cancel();
        lock(&self.shared.state).watchers.clear();
        if let Err(e) = self.compact() {
            tracing::warn!(error = %e, "compacting the metadata store at close failed; its log is intact");
        }
        let task = self
            .shared
            .task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    fn out(&self, key: &str, e: &Entry) -> KeyValue {
        kv(self.ns.strip(key).unwrap_or(key), e)
    }
}

fn kv(key: &str, e: &Entry) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: e.value.clone(),
        create_revision: e.create_revision,
        mod_revision: e.mod_revision,
        lease: e.lease,
    }
}

async fn expiry_loop(shared: Weak<Shared>, wake: Arc<Notify>, stop: CancellationToken) {
    loop {
        let next = {
            let Some(s) = shared.upgrade() else { return };
            s.expiry_tick()
        };
        let sleep = async move {
            match next {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = wake.notified() => {}
            _ = sleep => {}
        }
    }
}

impl Shared {
    /// Revokes due leases; returns when to look again.
    fn expiry_tick(&self) -> Option<Instant> {
        let mut st = lock(&self.state);
        let now = Instant::now();
        if let Err(e) = self.expire_due(&mut st, now) {
            tracing::warn!(error = %e, "lease expiry failed; retrying");
            return Some(now + EXPIRY_RETRY);
        }
        st.deadlines.values().min().copied()
    }

    /// Runs `f` as one mutation, in place, journaled: when the store has files and `f`
    /// changed anything, its record is made durable before anyone sees the change; if `f`
    /// fails or the write does, the journal undoes what `f` did.
    fn mutate<R>(
        &self,
        st: &mut State,
        f: impl FnOnce(&mut Data, &mut Journal) -> Result<R, MetaError>,
    ) -> Result<R, MetaError> {
        let State { data, disk, .. } = &mut *st;
        let mut j = Journal::begin(data, disk.is_some());
        let r = match f(data, &mut j) {
            Ok(r) => r,
            Err(e) => {
                j.rollback(data);
                return Err(e);
            }
        };
        if let Some(disk) = disk {
            if j.changed(data) {
                if let Err(e) = disk.commit(data, j.redo()) {
                    j.rollback(data);
                    return Err(e);
                }
            }
        }
        let events = std::mem::take(&mut j.events);
        st.publish(events, self.options.history);
        Ok(r)
    }

    fn expire_due(&self, st: &mut State, now: Instant) -> Result<(), MetaError> {
        let due: Vec<LeaseId> = st
            .deadlines
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(id, _)| *id)
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        self.mutate(st, |data, j| {
            for id in &due {
                data.revoke(*id, j);
            }
            Ok(())
        })?;
        for id in due {
            tracing::debug!(lease = id, "lease expired");
            st.deadlines.remove(&id);
        }
        Ok(())
    }

    fn put(
        &self,
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, MetaError> {
        keys::check_value(&value)?;
        let mut st = lock(&self.state);
        self.expire_due(&mut st, Instant::now())?;
        self.mutate(&mut st, |data, j| {
            data.check_lease(lease)?;
            let rev = data.revision + 1;
            data.put(key, value, lease, rev, j);
            data.revision = rev;
            Ok(rev)
        })
    }

    fn delete(&self, key: &str) -> Result<bool, MetaError> {
        let mut st = lock(&self.state);
        self.mutate(&mut st, |data, j| {
            let rev = data.revision + 1;
            let existed = data.delete(key, rev, j);
            if existed {
                data.revision = rev;
            }
            Ok(existed)
        })
    }

    fn txn(&self, txn: Txn) -> Result<bool, MetaError> {
        let mut st = lock(&self.state);
        self.expire_due(&mut st, Instant::now())?;
        self.mutate(&mut st, |data, j| {
            let ok = txn.compare.iter().all(|c| data.holds(c));
            let ops = if ok { txn.success } else { txn.failure };
            for op in &ops {
                if let TxnOp::Put { lease, .. } = op {
                    data.check_lease(*lease)?;
                }
            }
            let rev = data.revision + 1;
            let mut changed = false;
            for op in ops {
                match op {
                    TxnOp::Put { key, value, lease } => {
                        data.put(key, value, lease, rev, j);
                        changed = true;
                    }
                    TxnOp::Delete { key } => changed |= data.delete(&key, rev, j),
                }
            }
            if changed {
                data.revision = rev;
            }
            Ok(ok)
        })
    }

    fn grant(&self, ttl: Duration) -> Result<LeaseId, MetaError> {
        let ttl_secs = keys::lease_secs(ttl)?;
        let mut st = lock(&self.state);
        let id = self.mutate(&mut st, |data, j| {
            let id = data.alloc_lease();
            data.set_lease(id, Some(ttl_secs), j);
            Ok(id)
        })?;
        st.deadlines
            .insert(id, Instant::now() + Duration::from_secs(ttl_secs));
        self.wake.notify_one();
        Ok(id)
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<Duration, MetaError> {
        let mut st = lock(&self.state);
        let now = Instant::now();
        self.expire_due(&mut st, now)?;
        let ttl = match st.data.leases.get(&lease) {
            Some(l) => Duration::from_secs(l.ttl_secs),
            None => return Err(MetaError::LeaseNotFound(lease)),
        };
        st.deadlines.insert(lease, now + ttl);
        Ok(ttl)
    }

    fn revoke(&self, lease: LeaseId) -> Result<(), MetaError> {
        let mut st = lock(&self.state);
        self.mutate(&mut st, |data, j| Ok(data.revoke(lease, j)))?;
        st.deadlines.remove(&lease);
        Ok(())
    }

    fn watch(
        &self,
        prefix: String,
        strip: usize,
        after: Revision,
    ) -> Result<WatchStream, MetaError> {
        let mut st = lock(&self.state);
        if self.stop.is_cancelled() {
            return Err(MetaError::Unavailable("the store is closed".into()));
        }
        let after = after.max(0);
        if after < st.compacted {
            return Err(MetaError::Compacted(after));
        }
        st.watchers.retain(|w| !w.tx.is_closed());
        let replay: Vec<WatchEvent> = st
            .history
            .iter()
            .filter(|e| e.revision() > after && e.key().starts_with(&prefix))
            .map(|e| strip_event(e, strip))
            .collect();
        let (tx, rx) = mpsc::channel(self.options.watch_queue.max(1) + replay.len());
        for e in replay {
            // Cannot fail: the channel has room for the whole replay and `rx` is alive.
            let _ = tx.try_send(e);
        }
        st.watchers.push(Watcher {
            prefix,
            strip,
            after,
            tx,
        });
        Ok(rx)
    }
}

fn strip_event(e: &WatchEvent, strip: usize) -> WatchEvent {
    let short = |k: &str| k.get(strip..).unwrap_or_default().to_owned();
    match e {
        WatchEvent::Put(kv) => WatchEvent::Put(KeyValue {
            key: short(&kv.key),
            ..kv.clone()
        }),
        WatchEvent::Delete { key, mod_revision } => WatchEvent::Delete {
            key: short(key),
            mod_revision: *mod_revision,
        },
    }
}

impl Watcher {
    /// Offers an event; `false` when the watcher is gone or fell behind (then dropped).
    fn offer(&self, e: &WatchEvent) -> bool {
        if self.tx.is_closed() {
            return false;
        }
        if e.revision() <= self.after || !e.key().starts_with(&self.prefix) {
            return true;
        }
        match self.tx.try_send(strip_event(e, self.strip)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::debug!(prefix = %self.prefix, "watcher fell behind; ending its stream");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

impl State {
    fn publish(&mut self, events: Vec<WatchEvent>, history: usize) {
        if events.is_empty() {
            return;
        }
        for e in &events {
            self.watchers.retain(|w| w.offer(e));
        }
        self.history.extend(events);
        while self.history.len() > history {
            if let Some(old) = self.history.pop_front() {
                self.compacted = self.compacted.max(old.revision());
            }
        }
    }
}

impl Data {
    fn empty() -> Data {
        // Lease ids start at a random point so a restarted in-memory store does not hand
        // out the ids its clients may still hold.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        Data {
            revision: 0,
            next_lease: (h.finish() & 0x0000_ffff_ffff_ffff) as LeaseId + 1,
            keys: BTreeMap::new(),
            leases: BTreeMap::new(),
        }
    }

    fn alloc_lease(&mut self) -> LeaseId {
        loop {
            let id = self.next_lease;
            self.next_lease = id.checked_add(1).unwrap_or(1);
            if id > 0 && !self.leases.contains_key(&id) {
                return id;
            }
        }
    }

    fn check_lease(&self, lease: Option<LeaseId>) -> Result<(), MetaError> {
        match lease {
            Some(id) if !self.leases.contains_key(&id) => Err(MetaError::LeaseNotFound(id)),
            _ => Ok(()),
        }
    }

    fn holds(&self, c: &Compare) -> bool {
        match c {
            Compare::Absent(k) => !self.keys.contains_key(k),
            Compare::Value(k, v) => self.keys.get(k).is_some_and(|e| &e.value == v),
            Compare::ModRevision(k, r) => self.keys.get(k).map_or(0, |e| e.mod_revision) == *r,
        }
    }

    /// Sets a key at `rev` (the lease was checked).
    fn put(
        &mut self,
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        rev: Revision,
        j: &mut Journal,
    ) {
        let create_revision = self.keys.get(&key).map_or(rev, |e| e.create_revision);
        let entry = Entry {
            value,
            create_revision,
            mod_revision: rev,
            lease,
        };
        j.events.push(WatchEvent::Put(kv(&key, &entry)));
        self.set_key(key, Some(entry), j);
    }

    /// Deletes a key at `rev`; whether it existed.
    fn delete(&mut self, key: &str, rev: Revision, j: &mut Journal) -> bool {
        if !self.keys.contains_key(key) {
            return false;
        }
        j.events.push(WatchEvent::Delete {
            key: key.to_owned(),
            mod_revision: rev,
        });
        self.set_key(key.to_owned(), None, j);
        true
    }

    /// Ends a lease, deleting its keys in one revision; whether it existed.
    fn revoke(&mut self, id: LeaseId, j: &mut Journal) -> bool {
        let Some(lease) = self.leases.get(&id) else {
            return false;
        };
        let keys: Vec<String> = lease.keys.iter().cloned().collect();
        if !keys.is_empty() {
            let rev = self.revision + 1;
            for key in &keys {
                self.delete(key, rev, j);
            }
            self.revision = rev;
        }
        self.set_lease(id, None, j);
        true
    }
}

#[async_trait::async_trait]
impl MetaStore for MemStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, MetaError> {
        let key = self.ns.key(key)?;
        let st = lock(&self.shared.state);
        Ok(st.data.keys.get(&key).map(|e| self.out(&key, e)))
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), MetaError> {
        let prefix = self.ns.range(prefix)?;
        let st = lock(&self.shared.state);
        let kvs = st
            .data
            .keys
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, e)| self.out(k, e))
            .collect();
        Ok((kvs, st.data.revision))
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, MetaError> {
        self.shared.put(self.ns.key(key)?, value, lease)
    }

    async fn delete(&self, key: &str) -> Result<bool, MetaError> {
        self.shared.delete(&self.ns.key(key)?)
    }

    async fn txn(&self, txn: Txn) -> Result<bool, MetaError> {
        self.shared.txn(self.ns.txn(txn)?)
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, MetaError> {
        self.shared.grant(ttl)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, MetaError> {
        self.shared.keep_alive(lease)
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), MetaError> {
        self.shared.revoke(lease)
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, MetaError> {
        let full = self.ns.range(prefix)?;
        self.shared.watch(full, self.ns.prefix().len(), after)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::snapshot::{decode_snapshot, encode_snapshot};
    use super::*;

    async fn expect_event(rx: &mut WatchStream) -> WatchEvent {
        tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("timed out waiting for a watch event")
            .expect("watch ended")
    }

    #[tokio::test(start_paused = true)]
    async fn lease_expires_with_paused_time() {
        let s = MemStore::open(None, "p/").unwrap();
        let lease = s.grant(Duration::from_millis(1500)).await.unwrap();
        assert_eq!(s.keep_alive(lease).await.unwrap(), Duration::from_secs(2));
        s.put("k", b"v".to_vec(), Some(lease)).await.unwrap();
        let (_, rev) = s.range("").await.unwrap();
        let mut w = s.watch("", rev).await.unwrap();
        let start = Instant::now();
        match expect_event(&mut w).await {
            WatchEvent::Delete { key, mod_revision } => {
                assert_eq!(key, "k");
                assert_eq!(mod_revision, rev + 1);
            }
            other => panic!("unexpected {other:?}"),
        }
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(2) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
        assert_eq!(s.get("k").await.unwrap(), None);
        assert_eq!(
            s.keep_alive(lease).await,
            Err(MetaError::LeaseNotFound(lease))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_postpones_expiry() {
        let s = MemStore::open(None, "").unwrap();
        let lease = s.grant(Duration::from_secs(2)).await.unwrap();
        s.put("k", vec![], Some(lease)).await.unwrap();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            s.keep_alive(lease).await.unwrap();
        }
        assert!(s.get("k").await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(s.get("k").await.unwrap(), None);
    }

    #[tokio::test]
    async fn history_bound_gives_compacted() {
        let opts = MemStoreOptions {
            history: 3,
            watch_queue: 4,
            ..MemStoreOptions::default()
        };
        let s = MemStore::open_with(None, "", opts).unwrap();
        for i in 0..5u8 {
            s.put("k", vec![i], None).await.unwrap();
        }
        // Revisions 1..=5; only 3..=5 are kept.
        assert_eq!(s.watch("", 1).await.err(), Some(MetaError::Compacted(1)));
        let mut w = s.watch("", 2).await.unwrap();
        for rev in 3..=5 {
            assert_eq!(expect_event(&mut w).await.revision(), rev);
        }
    }

    #[tokio::test]
    async fn slow_watcher_is_dropped() {
        let opts = MemStoreOptions {
            history: 100,
            watch_queue: 2,
            ..MemStoreOptions::default()
        };
        let s = MemStore::open_with(None, "", opts).unwrap();
        let mut slow = s.watch("", 0).await.unwrap();
        let mut fast = s.watch("", 0).await.unwrap();
        for i in 0..3u8 {
            s.put("k", vec![i], None).await.unwrap();
            expect_event(&mut fast).await;
        }
        assert!(slow.recv().await.is_some());
        assert!(slow.recv().await.is_some());
        assert!(
            slow.recv().await.is_none(),
            "the overflowing watcher's stream ends"
        );
        s.put("k", vec![9], None).await.unwrap();
        assert_eq!(expect_event(&mut fast).await.revision(), 4);
    }

    #[tokio::test]
    async fn close_ends_watches() {
        let s = MemStore::open(None, "").unwrap();
        let mut w = s.watch("", 0).await.unwrap();
        s.close().await;
        assert!(w.recv().await.is_none());
        assert!(s.watch("", 0).await.is_err());
        // Plain reads and writes still work.
        s.put("k", vec![], None).await.unwrap();
    }

    #[tokio::test]
    async fn snapshot_round_trip_and_damage() {
        let s = MemStore::open(None, "").unwrap();
        let lease = s.grant(Duration::from_secs(30)).await.unwrap();
        s.put("a", b"1".to_vec(), None).await.unwrap();
        s.put("b", b"2".to_vec(), Some(lease)).await.unwrap();
        let bytes = encode_snapshot(&lock(&s.shared.state).data, 7).unwrap();
        let (data, seq) = decode_snapshot(&bytes).unwrap();
        assert_eq!(seq, 7);
        assert_eq!(data.revision, 2, "a grant is no revision");
        assert_eq!(data.keys.len(), 2);
        assert!(data.leases[&lease].keys.contains("b"));
        for cut in 0..bytes.len() {
            assert!(
                decode_snapshot(&bytes[..cut]).is_err(),
                "truncated at {cut}"
            );
        }
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(decode_snapshot(&bad).is_err(), "flipped byte {i}");
        }
    }

    /// Makes every later log append fail (the disk is full).
    fn fill_disk(s: &MemStore) {
        let full = std::fs::OpenOptions::new()
            .append(true)
            .open("/dev/full")
            .unwrap();
        lock(&s.shared.state)
            .disk
            .as_mut()
            .unwrap()
            .set_log_for_test(full);
    }

    #[tokio::test]
    async fn failed_write_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let s = MemStore::open(Some(&path), "").unwrap();
        s.put("a", b"1".to_vec(), None).await.unwrap();
        let lease = s.grant(Duration::from_secs(60)).await.unwrap();
        s.put("b", b"2".to_vec(), Some(lease)).await.unwrap();
        let mut w = s.watch("", 0).await.unwrap();
        assert_eq!(expect_event(&mut w).await.revision(), 1);
        assert_eq!(expect_event(&mut w).await.revision(), 2);

        // The append fails, and so does cutting the log back: the store stays as it was and
        // stops appending to that log.
        fill_disk(&s);
        let err = s.put("a", b"2".to_vec(), None).await.unwrap_err();
        assert!(
            matches!(err, MetaError::Backend(ref m) if m.contains("metadata log")),
            "{err}"
        );
        assert_eq!(s.get("a").await.unwrap().unwrap().value, b"1");
        assert_eq!(s.revision(), 2);

        // Without a log the next mutation goes into a snapshot; make that fail too (a
        // directory where the temporary file goes), for a revoke and a transaction.
        std::fs::create_dir(dir.path().join("meta.tmp")).unwrap();
        let err = s.revoke(lease).await.unwrap_err();
        assert!(matches!(err, MetaError::Backend(_)), "{err}");
        assert_eq!(s.keep_alive(lease).await.unwrap(), Duration::from_secs(60));
        let b = s.get("b").await.unwrap().unwrap();
        assert_eq!((b.value.as_slice(), b.lease), (&b"2"[..], Some(lease)));
        let txn = Txn {
            compare: vec![],
            success: vec![
                TxnOp::Delete { key: "a".into() },
                TxnOp::Put {
                    key: "c".into(),
                    value: vec![3],
                    lease: Some(lease),
                },
            ],
            failure: vec![],
        };
        assert!(s.txn(txn).await.is_err());
        assert_eq!(keys_of(&s).await, ["a", "b"]);
        assert_eq!(s.revision(), 2);
        assert!(s.grant(Duration::from_secs(5)).await.is_err());

        // Once the snapshot can be written again, mutations are durable again.
        std::fs::remove_dir(dir.path().join("meta.tmp")).unwrap();
        assert_eq!(s.put("a", b"3".to_vec(), None).await.unwrap(), 3);
        assert_eq!(expect_event(&mut w).await.revision(), 3);
        s.put("d", b"4".to_vec(), None).await.unwrap();
        drop(w);
        drop(s);
        let s = MemStore::open(Some(&path), "").unwrap();
        assert_eq!(keys_of(&s).await, ["a", "b", "d"]);
        assert_eq!(s.get("a").await.unwrap().unwrap().value, b"3");
        assert_eq!(s.revision(), 4);
        s.revoke(lease).await.unwrap();
        assert_eq!(keys_of(&s).await, ["a", "d"]);
    }

    async fn keys_of(s: &MemStore) -> Vec<String> {
        let (kvs, _) = s.range("").await.unwrap();
        kvs.into_iter().map(|kv| kv.key).collect()
    }
}
