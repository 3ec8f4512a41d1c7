//! One behaviour, every backend: the same cases run against `MemStore`, `RemoteStore` (served
//! from a `MemStore` on 127.0.0.1, over mutual TLS under a cluster CA made for the case) and, with the `etcd` feature, `EtcdStore` on a real etcd
//! started by the test (the `etcd` binary must be on PATH, else those tests fail).
//!
//! Each case gets its own key prefix, so cases may share one backend (the etcd process is
//! shared by the cases that run at the same time and killed when the last one ends).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_meta::{
    serve, Compare, Election, KeyValue, LeaseId, LeasedRecord, MemStore, MetaError, MetaStore,
    RemoteStore, Revision, Role, Txn, TxnOp, WatchEvent, WatchStream, MAX_KEY_LEN, MAX_VALUE_LEN,
};
use shoal_pki::{ControlTls, DevCa, NodeTls};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------
// Harness

enum Backend {
    Mem(MemStore),
    Remote {
        addr: SocketAddr,
        /// The node identity every client presents.
        node: NodeTls,
        stop: CancellationToken,
        server: Option<tokio::task::JoinHandle<()>>,
    },
    #[cfg(feature = "etcd")]
    Etcd(Arc<etcd::Etcd>),
}

/// A fresh cluster CA's control identity and one node's.
fn identities() -> (ControlTls, NodeTls) {
    let ca = DevCa::generate().unwrap();
    let control = ControlTls::from_cert(&ca.issue_control().unwrap()).unwrap();
    let node = NodeTls::from_node_cert(&ca.issue("node-1").unwrap()).unwrap();
    (control, node)
}

/// One backend, and the case's own prefix on it.
struct Harness {
    backend: Backend,
    base: String,
}

impl Harness {
    async fn mem(case: &str) -> Harness {
        Harness {
            backend: Backend::Mem(MemStore::open(None, "").unwrap()),
            base: format!("{case}/"),
        }
    }

    async fn remote(case: &str) -> Harness {
        let mem = MemStore::open(None, "served/").unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let (control, node) = identities();
        let server = tokio::spawn(serve(Arc::new(mem), listener, control, stop.clone()));
        Harness {
            backend: Backend::Remote {
                addr,
                node,
                stop,
                server: Some(server),
            },
            base: format!("{case}/"),
        }
    }

    #[cfg(feature = "etcd")]
    async fn etcd(case: &str) -> Harness {
        Harness {
            backend: Backend::Etcd(etcd::shared().await),
            base: format!("{case}/"),
        }
    }

    /// A store on this backend whose keys live under `prefix` (within the case's prefix).
    /// Every call gives a separate client where the backend has clients.
    async fn store(&self, prefix: &str) -> Arc<dyn MetaStore> {
        let prefix = format!("{}{prefix}", self.base);
        match &self.backend {
            Backend::Mem(m) => Arc::new(m.with_prefix(&prefix)),
            Backend::Remote { addr, node, .. } => Arc::new(
                RemoteStore::connect(*addr, node)
                    .unwrap()
                    .with_prefix(&prefix),
            ),
            #[cfg(feature = "etcd")]
            Backend::Etcd(e) => Arc::new(
                shoal_meta::EtcdStore::connect(std::slice::from_ref(&e.endpoint), &prefix)
                    .await
                    .unwrap(),
            ),
        }
    }

    async fn finish(mut self) {
        if let Backend::Remote { stop, server, .. } = &mut self.backend {
            stop.cancel();
            if let Some(server) = server.take() {
                server.await.unwrap();
            }
        }
    }
}

#[cfg(feature = "etcd")]
mod etcd {
    //! A real etcd process per test run, shared by the cases running at the same time.
    use std::net::TcpListener;
    use std::process::{Child, Command, Stdio};
    use std::sync::{Arc, Weak};
    use std::time::{Duration, Instant};

    pub(crate) struct Etcd {
        child: Child,
        pub(crate) endpoint: String,
        dir: tempfile::TempDir,
    }

    impl Drop for Etcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    static SHARED: tokio::sync::Mutex<Weak<Etcd>> = tokio::sync::Mutex::const_new(Weak::new());

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// The etcd shared by the cases running now; started if there is none.
    pub(crate) async fn shared() -> Arc<Etcd> {
        let mut slot = SHARED.lock().await;
        if let Some(e) = slot.upgrade() {
            return e;
        }
        let e = Arc::new(start().await);
        *slot = Arc::downgrade(&e);
        e
    }

    /// A new etcd process of one's own.
    pub(crate) async fn start() -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--name", "default"])
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            // Fast start and a 1 s minimum lease TTL (etcd's is 1.5 election timeouts).
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "the etcd conformance tests need an `etcd` binary on PATH (Debian: etcd-server); \
                 none found"
            ),
            Err(e) => panic!("starting etcd failed: {e}"),
        };
        let mut etcd = Etcd {
            child,
            endpoint,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = etcd.child.try_wait() {
                panic!("etcd exited with {status}:\n{}", etcd.log());
            }
            let probe = shoal_meta::EtcdStore::connect(&[etcd.endpoint.clone()], "probe/").await;
            if let Ok(store) = probe {
                use shoal_meta::MetaStore;
                if store.put("up", vec![], None).await.is_ok() {
                    return etcd;
                }
            }
            if Instant::now() > deadline {
                panic!("etcd did not answer within 20 s:\n{}", etcd.log());
            }
            // The poll interval: etcd says nothing when it is ready but by answering.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    impl Etcd {
        fn log(&self) -> String {
            std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
        }
    }
}

/// Runs every case against every backend, as separate tests.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod mem {
            $(
                #[tokio::test]
                async fn $case() {
                    let h = super::Harness::mem(stringify!($case)).await;
                    super::$case(&h).await;
                    h.finish().await;
                }
            )*
        }
        mod remote {
            $(
                #[tokio::test]
                async fn $case() {
                    let h = super::Harness::remote(stringify!($case)).await;
                    super::$case(&h).await;
                    h.finish().await;
                }
            )*
        }
        #[cfg(feature = "etcd")]
        mod etcd_backend {
            $(
                #[tokio::test]
                async fn $case() {
                    let h = super::Harness::etcd(stringify!($case)).await;
                    super::$case(&h).await;
                    h.finish().await;
                }
            )*
        }
    };
}

conformance!(
    put_get_range,
    invalid_arguments,
    delete,
    txn_absent,
    txn_value,
    txn_mod_revision,
    txn_is_atomic_and_checked,
    cas_race_has_one_winner,
    leases,
    lease_expiry_deletes_and_notifies,
    watch_from_revision,
    prefix_isolation,
    election_failover,
    leased_record_lives_and_goes,
    leased_record_comes_back_after_its_lease_is_lost,
    leased_record_rides_out_an_unreachable_store,
);

// ---------------------------------------------------------------------------------------
// Helpers

const WAIT: Duration = Duration::from_secs(15);

async fn next_event(w: &mut WatchStream) -> WatchEvent {
    tokio::time::timeout(WAIT, w.recv())
        .await
        .expect("no watch event in time")
        .expect("the watch ended")
}

fn keys(kvs: &[KeyValue]) -> Vec<&str> {
    kvs.iter().map(|kv| kv.key.as_str()).collect()
}

fn put(key: &str, value: &[u8]) -> TxnOp {
    TxnOp::Put {
        key: key.into(),
        value: value.to_vec(),
        lease: None,
    }
}

fn txn(compare: Vec<Compare>, success: Vec<TxnOp>, failure: Vec<TxnOp>) -> Txn {
    Txn {
        compare,
        success,
        failure,
    }
}

async fn value(s: &Arc<dyn MetaStore>, key: &str) -> Option<Vec<u8>> {
    s.get(key).await.unwrap().map(|kv| kv.value)
}

/// Polls `cond` until it holds, failing the test after [`WAIT`].
async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        // The poll interval: the store is read, not watched.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A real backend behind a switch: while `down`, every call fails with `Unavailable`, as a
/// store the network cannot reach would.
#[derive(Debug)]
struct Switched {
    inner: Arc<dyn MetaStore>,
    down: AtomicBool,
}

impl Switched {
    fn new(inner: Arc<dyn MetaStore>) -> Arc<Switched> {
        Arc::new(Switched {
            inner,
            down: AtomicBool::new(false),
        })
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), MetaError> {
        if self.down.load(Ordering::SeqCst) {
            Err(MetaError::Unavailable("switched off by the test".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait::async_trait]
impl MetaStore for Switched {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, MetaError> {
        self.check()?;
        self.inner.get(key).await
    }
    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), MetaError> {
        self.check()?;
        self.inner.range(prefix).await
    }
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, MetaError> {
        self.check()?;
        self.inner.put(key, value, lease).await
    }
    async fn delete(&self, key: &str) -> Result<bool, MetaError> {
        self.check()?;
        self.inner.delete(key).await
    }
    async fn txn(&self, txn: Txn) -> Result<bool, MetaError> {
        self.check()?;
        self.inner.txn(txn).await
    }
    async fn grant(&self, ttl: Duration) -> Result<LeaseId, MetaError> {
        self.check()?;
        self.inner.grant(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, MetaError> {
        self.check()?;
        self.inner.keep_alive(lease).await
    }
    async fn revoke(&self, lease: LeaseId) -> Result<(), MetaError> {
        self.check()?;
        self.inner.revoke(lease).await
    }
    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, MetaError> {
        self.check()?;
        self.inner.watch(prefix, after).await
    }
}

// ---------------------------------------------------------------------------------------
// Cases

async fn put_get_range(h: &Harness) {
    let s = h.store("kv/").await;
    assert_eq!(s.get("missing").await.unwrap(), None);
    let rc = s.put("c", b"3".to_vec(), None).await.unwrap();
    let ra = s.put("a", b"1".to_vec(), None).await.unwrap();
    let rb = s.put("b/x", b"2".to_vec(), None).await.unwrap();
    assert!(0 < rc && rc < ra && ra < rb, "{rc} {ra} {rb}");
    assert_eq!(
        s.get("a").await.unwrap(),
        Some(KeyValue {
            key: "a".into(),
            value: b"1".to_vec(),
            create_revision: ra,
            mod_revision: ra,
            lease: None,
        })
    );
    // Overwriting keeps the create revision.
    let ra2 = s.put("a", b"1b".to_vec(), None).await.unwrap();
    assert!(ra2 > rb);
    let a = s.get("a").await.unwrap().unwrap();
    assert_eq!(
        (a.value.as_slice(), a.create_revision, a.mod_revision),
        (&b"1b"[..], ra, ra2)
    );

    // Ranges are in key order, relative to the prefix, with the revision of the read.
    let (all, rev) = s.range("").await.unwrap();
    assert_eq!(keys(&all), ["a", "b/x", "c"]);
    assert_eq!(all[2].mod_revision, rc);
    assert!(rev >= ra2);
    let (b, _) = s.range("b").await.unwrap();
    assert_eq!(keys(&b), ["b/x"]);
    assert!(s.range("zz").await.unwrap().0.is_empty());
    // An empty value is a value.
    s.put("empty", vec![], None).await.unwrap();
    assert_eq!(value(&s, "empty").await, Some(vec![]));
}

async fn invalid_arguments(h: &Harness) {
    let s = h.store("inv/").await;
    let invalid = |r: Result<_, MetaError>| matches!(r, Err(MetaError::InvalidArgument(_)));
    assert!(invalid(s.get("").await.map(|_| ())));
    assert!(invalid(s.put("", vec![], None).await.map(|_| ())));
    assert!(invalid(s.delete("").await.map(|_| ())));
    assert!(invalid(s.get(&"k".repeat(MAX_KEY_LEN)).await.map(|_| ())));
    assert!(invalid(
        s.put("big", vec![0; MAX_VALUE_LEN + 1], None)
            .await
            .map(|_| ())
    ));
    assert!(invalid(
        s.grant(Duration::from_secs(3 * 24 * 3600))
            .await
            .map(|_| ())
    ));
    // A key written twice in one branch.
    let dup = txn(
        vec![],
        vec![put("d", b"1"), TxnOp::Delete { key: "d".into() }],
        vec![],
    );
    assert!(invalid(s.txn(dup).await.map(|_| ())));
    // The largest value is fine.
    s.put("big", vec![7; MAX_VALUE_LEN], None).await.unwrap();
    assert_eq!(
        s.get("big").await.unwrap().unwrap().value.len(),
        MAX_VALUE_LEN
    );
}

async fn delete(h: &Harness) {
    let s = h.store("del/").await;
    let r1 = s.put("a", b"1".to_vec(), None).await.unwrap();
    s.put("b", b"2".to_vec(), None).await.unwrap();
    assert!(s.delete("a").await.unwrap());
    assert_eq!(s.get("a").await.unwrap(), None);
    assert!(
        !s.delete("a").await.unwrap(),
        "deleting an absent key reports false"
    );
    assert_eq!(keys(&s.range("").await.unwrap().0), ["b"]);
    // Re-creating starts a new life: a new create revision.
    let r2 = s.put("a", b"3".to_vec(), None).await.unwrap();
    let a = s.get("a").await.unwrap().unwrap();
    assert!(r2 > r1);
    assert_eq!((a.create_revision, a.mod_revision), (r2, r2));
}

async fn txn_absent(h: &Harness) {
    let s = h.store("tabs/").await;
    let t = || {
        txn(
            vec![Compare::Absent("k".into())],
            vec![put("k", b"won")],
            vec![put("lost", b"yes")],
        )
    };
    assert!(s.txn(t()).await.unwrap(), "absent key: compare holds");
    assert_eq!(value(&s, "k").await, Some(b"won".to_vec()));
    assert_eq!(value(&s, "lost").await, None, "failure branch not applied");
    assert!(!s.txn(t()).await.unwrap(), "present key: compare fails");
    assert_eq!(
        value(&s, "lost").await,
        Some(b"yes".to_vec()),
        "failure branch applied"
    );
    assert_eq!(value(&s, "k").await, Some(b"won".to_vec()));
}

async fn txn_value(h: &Harness) {
    let s = h.store("tval/").await;
    let cas = |expect: &[u8], new: &[u8]| {
        txn(
            vec![Compare::Value("k".into(), expect.to_vec())],
            vec![put("k", new)],
            vec![],
        )
    };
    assert!(
        !s.txn(cas(b"", b"x")).await.unwrap(),
        "a value compare on an absent key fails"
    );
    assert_eq!(value(&s, "k").await, None);
    s.put("k", b"v1".to_vec(), None).await.unwrap();
    assert!(s.txn(cas(b"v1", b"v2")).await.unwrap());
    assert_eq!(value(&s, "k").await, Some(b"v2".to_vec()));
    assert!(!s.txn(cas(b"v1", b"v3")).await.unwrap(), "stale value");
    assert_eq!(value(&s, "k").await, Some(b"v2".to_vec()));
}

async fn txn_mod_revision(h: &Harness) {
    let s = h.store("tmod/").await;
    // Revision 0 means "absent".
    let create = txn(
        vec![Compare::ModRevision("k".into(), 0)],
        vec![put("k", b"1")],
        vec![],
    );
    assert!(s.txn(create.clone()).await.unwrap());
    assert!(!s.txn(create).await.unwrap(), "the key exists now");
    let kv = s.get("k").await.unwrap().unwrap();
    let stale = txn(
        vec![Compare::ModRevision("k".into(), kv.mod_revision - 1)],
        vec![TxnOp::Delete { key: "k".into() }],
        vec![],
    );
    assert!(!s.txn(stale).await.unwrap());
    let fresh = txn(
        vec![Compare::ModRevision("k".into(), kv.mod_revision)],
        vec![TxnOp::Delete { key: "k".into() }],
        vec![],
    );
    assert!(s.txn(fresh).await.unwrap());
    assert_eq!(s.get("k").await.unwrap(), None);
}

async fn txn_is_atomic_and_checked(h: &Harness) {
    let s = h.store("tatom/").await;
    s.put("gone", b"x".to_vec(), None).await.unwrap();
    // Several operations, all at one revision.
    let t = txn(
        vec![
            Compare::Absent("a".into()),
            Compare::Value("gone".into(), b"x".to_vec()),
        ],
        vec![
            put("a", b"1"),
            put("b", b"2"),
            TxnOp::Delete { key: "gone".into() },
        ],
        vec![],
    );
    assert!(s.txn(t).await.unwrap());
    let a = s.get("a").await.unwrap().unwrap();
    let b = s.get("b").await.unwrap().unwrap();
    assert_eq!(
        a.mod_revision, b.mod_revision,
        "one revision per transaction"
    );
    assert_eq!(s.get("gone").await.unwrap(), None);
    // One failing compare fails the whole transaction.
    let t = txn(
        vec![
            Compare::Value("a".into(), b"1".to_vec()),
            Compare::Absent("b".into()),
        ],
        vec![put("a", b"changed")],
        vec![],
    );
    assert!(!s.txn(t).await.unwrap());
    assert_eq!(value(&s, "a").await, Some(b"1".to_vec()));
    // No compares: success.
    assert!(s
        .txn(txn(vec![], vec![put("c", b"3")], vec![]))
        .await
        .unwrap());
    // A put with a dead lease in the chosen branch fails the transaction; nothing applied.
    let lease = s.grant(Duration::from_secs(10)).await.unwrap();
    s.revoke(lease).await.unwrap();
    let t = txn(
        vec![],
        vec![
            put("d", b"4"),
            TxnOp::Put {
                key: "e".into(),
                value: b"5".to_vec(),
                lease: Some(lease),
            },
        ],
        vec![],
    );
    assert_eq!(s.txn(t).await, Err(MetaError::LeaseNotFound(lease)));
    assert_eq!(s.get("d").await.unwrap(), None);
}

async fn cas_race_has_one_winner(h: &Harness) {
    let s1 = h.store("race/").await;
    let s2 = h.store("race/").await;
    s1.put("k", b"start".to_vec(), None).await.unwrap();
    for round in 0..10 {
        let kv = s1.get("k").await.unwrap().unwrap();
        let t = |who: &str| {
            txn(
                vec![Compare::ModRevision("k".into(), kv.mod_revision)],
                vec![put("k", format!("{who}{round}").as_bytes())],
                vec![],
            )
        };
        let (r1, r2) = tokio::join!(s1.txn(t("one")), s2.txn(t("two")));
        let (r1, r2) = (r1.unwrap(), r2.unwrap());
        assert!(r1 ^ r2, "round {round}: exactly one must win ({r1}, {r2})");
        let winner = if r1 { "one" } else { "two" };
        assert_eq!(
            value(&s2, "k").await,
            Some(format!("{winner}{round}").into_bytes())
        );
    }
}

async fn leases(h: &Harness) {
    let s = h.store("lease/").await;
    let l = s.grant(Duration::from_millis(4500)).await.unwrap();
    let ttl = s.keep_alive(l).await.unwrap();
    assert!(
        ttl >= Duration::from_secs(5) && ttl <= Duration::from_secs(6),
        "{ttl:?}"
    );
    s.put("k1", b"1".to_vec(), Some(l)).await.unwrap();
    s.put("k2", b"2".to_vec(), Some(l)).await.unwrap();
    s.put("free", b"3".to_vec(), None).await.unwrap();
    assert_eq!(s.get("k1").await.unwrap().unwrap().lease, Some(l));
    // Re-putting without the lease detaches the key from it.
    s.put("k2", b"2b".to_vec(), None).await.unwrap();
    assert_eq!(s.get("k2").await.unwrap().unwrap().lease, None);

    s.revoke(l).await.unwrap();
    assert_eq!(
        s.get("k1").await.unwrap(),
        None,
        "revoking deletes the lease's keys"
    );
    assert_eq!(value(&s, "k2").await, Some(b"2b".to_vec()));
    assert_eq!(value(&s, "free").await, Some(b"3".to_vec()));
    assert_eq!(s.keep_alive(l).await, Err(MetaError::LeaseNotFound(l)));
    assert_eq!(
        s.revoke(l).await,
        Ok(()),
        "revoking an unknown lease is not an error"
    );
    assert_eq!(
        s.put("k3", vec![], Some(l)).await,
        Err(MetaError::LeaseNotFound(l))
    );
    assert_eq!(s.get("k3").await.unwrap(), None);
    // TTLs round up to whole seconds, at least one.
    let short = s.grant(Duration::ZERO).await.unwrap();
    assert!(s.keep_alive(short).await.unwrap() >= Duration::from_secs(1));
    s.revoke(short).await.unwrap();
}

async fn lease_expiry_deletes_and_notifies(h: &Harness) {
    let s = h.store("expiry/").await;
    let l = s.grant(Duration::from_secs(1)).await.unwrap();
    let put_rev = s.put("k", b"v".to_vec(), Some(l)).await.unwrap();
    s.put("stays", b"v".to_vec(), None).await.unwrap();
    let mut w = s.watch("k", put_rev).await.unwrap();
    let started = std::time::Instant::now();
    match next_event(&mut w).await {
        WatchEvent::Delete { key, mod_revision } => {
            assert_eq!(key, "k");
            assert!(mod_revision > put_rev);
        }
        other => panic!("expected the expiry's delete, got {other:?}"),
    }
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(s.get("k").await.unwrap(), None);
    assert!(s.get("stays").await.unwrap().is_some());
    assert_eq!(s.keep_alive(l).await, Err(MetaError::LeaseNotFound(l)));
}

async fn watch_from_revision(h: &Harness) {
    let s = h.store("watch/").await;
    let r1 = s.put("x/1", b"a".to_vec(), None).await.unwrap();
    let r2 = s.put("x/2", b"b".to_vec(), None).await.unwrap();
    assert!(s.delete("x/1").await.unwrap());
    s.put("y", b"not watched".to_vec(), None).await.unwrap();

    // From r1: exactly the later changes under x/, in order.
    let mut w = s.watch("x/", r1).await.unwrap();
    match next_event(&mut w).await {
        WatchEvent::Put(kv) => {
            assert_eq!(
                (kv.key.as_str(), kv.value.as_slice(), kv.mod_revision),
                ("x/2", &b"b"[..], r2)
            );
        }
        other => panic!("expected the put of x/2, got {other:?}"),
    }
    let r3 = match next_event(&mut w).await {
        WatchEvent::Delete { key, mod_revision } => {
            assert_eq!(key, "x/1");
            assert!(mod_revision > r2);
            mod_revision
        }
        other => panic!("expected the delete of x/1, got {other:?}"),
    };
    // Live events follow without a gap or a duplicate; the put of y is not in this watch.
    let t = txn(vec![], vec![put("x/3", b"c"), put("x/4", b"d")], vec![]);
    assert!(s.txn(t).await.unwrap());
    let e3 = next_event(&mut w).await;
    let e4 = next_event(&mut w).await;
    assert_eq!((e3.key(), e4.key()), ("x/3", "x/4"));
    assert!(e3.revision() > r3);
    assert_eq!(
        e3.revision(),
        e4.revision(),
        "one transaction, one revision"
    );

    // From the revision of a read: nothing old, only what follows.
    let (_, rev) = s.range("x/").await.unwrap();
    let mut w2 = s.watch("x/", rev).await.unwrap();
    let r5 = s.put("x/5", b"e".to_vec(), None).await.unwrap();
    let e = next_event(&mut w2).await;
    assert_eq!((e.key(), e.revision()), ("x/5", r5));
    assert_eq!(next_event(&mut w).await.revision(), r5);
}

async fn prefix_isolation(h: &Harness) {
    let a = h.store("iso/a/").await;
    let b = h.store("iso/b/").await;
    let parent = h.store("iso/").await;
    a.put("k", b"A".to_vec(), None).await.unwrap();
    b.put("k", b"B".to_vec(), None).await.unwrap();
    assert_eq!(value(&a, "k").await, Some(b"A".to_vec()));
    assert_eq!(value(&b, "k").await, Some(b"B".to_vec()));
    let (in_a, rev) = a.range("").await.unwrap();
    assert_eq!(keys(&in_a), ["k"]);
    assert_eq!(keys(&parent.range("").await.unwrap().0), ["a/k", "b/k"]);

    // A's watch does not see B's changes: the next event after B's writes is A's own.
    let mut w = a.watch("", rev).await.unwrap();
    b.put("k2", b"B2".to_vec(), None).await.unwrap();
    assert!(b.delete("k").await.unwrap());
    let own = a.put("mine", b"A2".to_vec(), None).await.unwrap();
    let e = next_event(&mut w).await;
    assert_eq!((e.key(), e.revision()), ("mine", own));
    assert_eq!(value(&a, "k").await, Some(b"A".to_vec()));
    // A transaction in B cannot see A's keys either.
    let t = txn(
        vec![Compare::Absent("mine".into())],
        vec![put("mine", b"B3")],
        vec![],
    );
    assert!(b.txn(t).await.unwrap());
    assert_eq!(value(&a, "mine").await, Some(b"A2".to_vec()));
}

async fn election_failover(h: &Harness) {
    // A long TTL: a quick handover proves that stopping resigns, rather than expiring.
    let ttl = Duration::from_secs(10);
    let a = Election::start(h.store("elect/").await, "leader".into(), b"a".to_vec(), ttl);
    let b = Election::start(h.store("elect/").await, "leader".into(), b"b".to_vec(), ttl);
    let settled = |r: &Role| *r != Role::Candidate;
    let ra = tokio::time::timeout(WAIT, a.subscribe().wait_for(settled))
        .await
        .unwrap()
        .unwrap()
        .clone();
    let rb = tokio::time::timeout(WAIT, b.subscribe().wait_for(settled))
        .await
        .unwrap()
        .unwrap()
        .clone();
    let (leader, follower, value) = match (ra, rb) {
        (Role::Leader, Role::Follower { leader }) => (a, b, leader),
        (Role::Follower { leader }, Role::Leader) => (b, a, leader),
        other => panic!("expected exactly one leader, got {other:?}"),
    };
    let s = h.store("elect/").await;
    assert_eq!(s.get("leader").await.unwrap().unwrap().value, value);
    let started = std::time::Instant::now();
    leader.stop().await;
    let mut rx = follower.subscribe();
    tokio::time::timeout(WAIT, rx.wait_for(|r| *r == Role::Leader))
        .await
        .unwrap()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_ne!(s.get("leader").await.unwrap().unwrap().value, value);
    follower.stop().await;
    assert_eq!(s.get("leader").await.unwrap(), None, "stopping resigns");
}

// ---------------------------------------------------------------------------------------
// Failures of the etcd backend

// ----- LeasedRecord: one lease loop for every component -----

const RECORD_TTL: Duration = Duration::from_secs(2);

async fn leased_record_lives_and_goes(h: &Harness) {
    let s = h.store("leased/").await;
    let rec = LeasedRecord::register(s.clone(), "k".into(), b"v1".to_vec(), RECORD_TTL)
        .await
        .unwrap();
    let kv = s
        .get("k")
        .await
        .unwrap()
        .expect("registered before register returns");
    assert_eq!(kv.value, b"v1");
    let lease = kv.lease.expect("the record lives under a lease");
    assert!(*rec.registered().borrow());

    rec.set(b"v2".to_vec());
    wait_until("the new value is written", || async {
        value(&s, "k").await == Some(b"v2".to_vec())
    })
    .await;
    // Outlive the TTL: a lease of the same TTL granted after the record's, which nobody keeps
    // alive, expires; only the keep-alives can have held the record past that.
    let probe = s.grant(RECORD_TTL).await.unwrap();
    s.put("probe", vec![], Some(probe)).await.unwrap();
    wait_until("an unkept lease of the same TTL expires", || async {
        s.get("probe").await.unwrap().is_none()
    })
    .await;
    let kv = s.get("k").await.unwrap().expect("kept alive past its TTL");
    assert_eq!((kv.value, kv.lease), (b"v2".to_vec(), Some(lease)));

    let registered = rec.registered();
    rec.stop().await;
    assert_eq!(
        s.get("k").await.unwrap(),
        None,
        "stop removes the record at once"
    );
    assert!(!*registered.borrow());
}

async fn leased_record_comes_back_after_its_lease_is_lost(h: &Harness) {
    let s = h.store("leased/").await;
    let rec = LeasedRecord::spawn(s.clone(), "k".into(), b"v".to_vec(), RECORD_TTL);
    let mut registered = rec.registered();
    tokio::time::timeout(WAIT, registered.wait_for(|r| *r))
        .await
        .expect("registers in the background")
        .unwrap();
    let old = s.get("k").await.unwrap().unwrap().lease.unwrap();
    // Someone revokes the lease (as a store that lost it would say): the record goes, and
    // comes back under a new lease with the same value.
    s.revoke(old).await.unwrap();
    wait_until("registered again under a new lease", || async {
        s.get("k")
            .await
            .unwrap()
            .is_some_and(|kv| kv.lease.is_some_and(|l| l != old) && kv.value == b"v")
    })
    .await;
    rec.stop().await;
    assert_eq!(s.get("k").await.unwrap(), None);
}

async fn leased_record_rides_out_an_unreachable_store(h: &Harness) {
    let s = h.store("leased/").await;
    let net = Switched::new(s.clone());
    let rec = LeasedRecord::register(net.clone(), "k".into(), b"v1".to_vec(), RECORD_TTL)
        .await
        .unwrap();
    net.set_down(true);
    rec.set(b"v2".to_vec());
    // Unreachable for longer than the TTL: the store lets the lease expire.
    wait_until(
        "the lease expires while the store is unreachable",
        || async { s.get("k").await.unwrap().is_none() },
    )
    .await;
    net.set_down(false);
    wait_until("registered again with the value set meanwhile", || async {
        value(&s, "k").await == Some(b"v2".to_vec())
    })
    .await;
    rec.stop().await;
    assert_eq!(s.get("k").await.unwrap(), None);

    // Shutdown while retrying: a record that never reached the store stops at once.
    net.set_down(true);
    let rec = LeasedRecord::spawn(net.clone(), "k2".into(), b"v".to_vec(), RECORD_TTL);
    let started = std::time::Instant::now();
    rec.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    net.set_down(false);
    assert_eq!(s.get("k2").await.unwrap(), None);
}

/// The served store restarts empty (control restarted without its file): the record is
/// registered again on the new one.
#[tokio::test]
async fn leased_record_survives_a_metadata_restart() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let first = Arc::new(MemStore::open(None, "").unwrap());
    let (control, node) = identities();
    let server = tokio::spawn(serve(first, listener, control.clone(), stop.clone()));
    let client: Arc<dyn MetaStore> = Arc::new(RemoteStore::connect(addr, &node).unwrap());
    let rec = LeasedRecord::register(client, "nodes/n1".into(), b"n1".to_vec(), RECORD_TTL)
        .await
        .unwrap();

    stop.cancel();
    server.await.unwrap();
    let second = Arc::new(MemStore::open(None, "").unwrap());
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(serve(second.clone(), listener, control, stop.clone()));
    wait_until("registered on the restarted store", || async {
        second.get("nodes/n1").await.unwrap().is_some()
    })
    .await;
    rec.stop().await;
    assert_eq!(second.get("nodes/n1").await.unwrap(), None);
    stop.cancel();
    server.await.unwrap();
}

#[cfg(feature = "etcd")]
#[tokio::test]
async fn etcd_unreachable_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = shoal_meta::EtcdStore::connect(&[format!("http://127.0.0.1:{port}")], "x/")
        .await
        .unwrap_err();
    assert!(matches!(err, MetaError::Unavailable(_)), "{err}");
}

#[cfg(feature = "etcd")]
#[tokio::test]
async fn etcd_going_away_ends_watches_and_fails_calls() {
    let e = etcd::start().await;
    let s = shoal_meta::EtcdStore::connect(std::slice::from_ref(&e.endpoint), "gone/")
        .await
        .unwrap();
    let rev = s.put("k", b"v".to_vec(), None).await.unwrap();
    let mut w = s.watch("", rev).await.unwrap();
    drop(e); // kills etcd
    let ended = tokio::time::timeout(WAIT, w.recv())
        .await
        .expect("the watch must end");
    assert_eq!(ended, None);
    let err = s.get("k").await.unwrap_err();
    assert!(matches!(err, MetaError::Unavailable(_)), "{err}");
    s.close().await;
}

// ---------------------------------------------------------------------------------------
// Persistence of the embedded backend

async fn expect_open_error(path: &std::path::Path, what: &str) {
    let err = MemStore::open(Some(path), "p/").expect_err("a damaged file must be refused");
    let msg = err.to_string();
    assert!(matches!(err, MetaError::Backend(_)), "{msg}");
    assert!(
        msg.contains(&path.display().to_string()),
        "names the file: {msg}"
    );
    assert!(msg.contains(what), "says what is wrong ({what}): {msg}");
}

/// Writes a store with some keys and a lease; returns its revision and the lease.
async fn write_store(path: &std::path::Path) -> (Revision, i64) {
    let s = MemStore::open(Some(path), "p/").unwrap();
    let lease = s.grant(Duration::from_secs(30)).await.unwrap();
    s.put("a", b"1".to_vec(), None).await.unwrap();
    s.put("b", b"2".to_vec(), Some(lease)).await.unwrap();
    s.put("c", b"3".to_vec(), None).await.unwrap();
    assert!(s.delete("c").await.unwrap());
    let rev = s.revision();
    s.close().await;
    (rev, lease)
}

#[tokio::test]
async fn mem_reopen_keeps_keys_and_leases() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    let (rev, lease) = write_store(&path).await;

    let s = MemStore::open(Some(&path), "p/").unwrap();
    assert_eq!(s.revision(), rev);
    let (kvs, read_rev) = s.range("").await.unwrap();
    assert_eq!(read_rev, rev);
    assert_eq!(keys(&kvs), ["a", "b"]);
    assert_eq!(kvs[1].lease, Some(lease));
    // The lease came back with a fresh TTL and still owns its key.
    assert_eq!(s.keep_alive(lease).await.unwrap(), Duration::from_secs(30));
    s.revoke(lease).await.unwrap();
    assert_eq!(s.get("b").await.unwrap(), None);
    // History does not survive a restart: old revisions are compacted, new ones watchable.
    assert_eq!(s.watch("", 0).await.err(), Some(MetaError::Compacted(0)));
    let mut w = s.watch("", s.revision()).await.unwrap();
    let r = s.put("d", vec![], None).await.unwrap();
    assert_eq!(next_event(&mut w).await.revision(), r);
    s.close().await;
    drop(s);
    let s = MemStore::open(Some(&path), "p/").unwrap();
    assert_eq!(keys(&s.range("").await.unwrap().0), ["a", "d"]);
}

#[tokio::test]
async fn mem_missing_file_starts_empty_and_creates_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.db");
    let s = MemStore::open(Some(&path), "").unwrap();
    assert!(
        path.exists(),
        "created at open, so an unwritable place fails early"
    );
    assert!(s.range("").await.unwrap().0.is_empty());
    let bad = dir.path().join("no-such-dir").join("x.db");
    let err = MemStore::open(Some(&bad), "").unwrap_err();
    assert!(err.to_string().contains("no-such-dir"), "{err}");
}

#[tokio::test]
async fn mem_truncated_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    write_store(&path).await;
    let full = std::fs::read(&path).unwrap();
    std::fs::write(&path, &full[..full.len() - 3]).unwrap();
    expect_open_error(&path, "truncated").await;
    std::fs::write(&path, &full[..5]).unwrap();
    expect_open_error(&path, "truncated").await;
    std::fs::write(&path, b"").unwrap();
    expect_open_error(&path, "truncated").await;
}

#[tokio::test]
async fn mem_corrupt_byte_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    write_store(&path).await;
    let good = std::fs::read(&path).unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 2;
    bad[last] ^= 0x01;
    std::fs::write(&path, &bad).unwrap();
    expect_open_error(&path, "checksum").await;
    let mut bad = good.clone();
    bad[0] = b'X';
    std::fs::write(&path, &bad).unwrap();
    expect_open_error(&path, "magic").await;
    // Trailing garbage is damage too.
    let mut bad = good.clone();
    bad.extend_from_slice(b"junk");
    std::fs::write(&path, &bad).unwrap();
    expect_open_error(&path, "unexpected bytes").await;
    // The intact file still opens.
    std::fs::write(&path, &good).unwrap();
    MemStore::open(Some(&path), "p/").unwrap();
}
