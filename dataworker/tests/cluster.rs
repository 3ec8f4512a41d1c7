//! Several dataworkers in one process sharing an embedded metadata store: remote gets over
//! QUIC, waiting gets across nodes, deletes, node departure, and peers that break the rules.
#![allow(clippy::unwrap_used)] // test setup panics on failure by design
use shoal_dataworker::{ClusterConfig, ClusterParts, Config, Dataworker};
use shoal_meta::records::NODES_PREFIX;
use shoal_meta::{MemStore, MetaStore};
use shoal_protocol::{ObjectId, PeerRequest, PeerResponse};
use shoal_sdk::{Client, ErrorCode};
use shoal_transport::{DevCa, Endpoint, NodeTls, TransportConfig};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Registration with the directory owners is asynchronous (it lands within milliseconds of
/// a seal): a get right after a put on another node gives it this long.
const SETTLE: Duration = Duration::from_secs(5);

struct Node {
    worker: Option<Dataworker>,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(id: &str, meta: Arc<dyn MetaStore>, tls: NodeTls) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::new(dir.path());
        cfg.node_id = id.into();
        cfg.shm_size = 64 << 20;
        let mut c = ClusterConfig::new("127.0.0.1:0".parse().unwrap());
        c.lease_ttl = Duration::from_secs(1);
        cfg.cluster = Some(c);
        let worker = Dataworker::start_with(cfg, None, Some(ClusterParts { meta, tls }))
            .await
            .unwrap();
        Node {
            worker: Some(worker),
            _dir: dir,
        }
    }

    fn w(&self) -> &Dataworker {
        self.worker.as_ref().unwrap()
    }

    async fn client(&self) -> Client {
        Client::connect(self.w().socket_path()).await.unwrap()
    }

    async fn stop(&mut self) {
        if let Some(w) = self.worker.take() {
            w.shutdown().await;
        }
    }
}

/// Waits until `cond` holds, failing the test after `limit`. The states waited on here (a
/// node's view, a record in the store, a copy on a node) announce themselves to nobody, so
/// they are polled; the pause between polls only spares the CPU.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_members(n: &Node, want: usize) {
    eventually(
        Duration::from_secs(10),
        &format!("{want} members"),
        || async { n.w().status().members.len() == want },
    )
    .await;
}

/// Asks each of `nodes` as a directory owner where `id` is, as a peer would (without pulling
/// it); true when one of them knows a copy on `holder`.
async fn owner_knows(probe: &Endpoint, nodes: &[&Node], id: &str, holder: &str) -> bool {
    let req = PeerRequest::Locate {
        id: ObjectId::new(id).unwrap(),
        wait_ms: 0,
    };
    for n in nodes {
        let addr = n.w().peer_addr().unwrap();
        if let Ok(PeerResponse::Located { holders, .. }) = probe.call(addr, &req).await {
            if holders.iter().any(|h| h == holder) {
                return true;
            }
        }
    }
    false
}

async fn cluster(ca: &DevCa, n: usize) -> (Arc<dyn MetaStore>, Vec<Node>) {
    let meta: Arc<dyn MetaStore> = Arc::new(MemStore::open(None, "").unwrap());
    let mut nodes = Vec::new();
    for i in 0..n {
        let id = format!("n{i}");
        let tls = NodeTls::from_node_cert(&ca.issue(&id).unwrap()).unwrap();
        nodes.push(Node::start(&id, meta.clone(), tls).await);
    }
    for node in &nodes {
        wait_members(node, n).await;
    }
    (meta, nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_get_wait_delete_and_departure() {
    let ca = DevCa::generate().unwrap();
    let (_meta, mut nodes) = cluster(&ca, 3).await;
    let (a, c) = (nodes[0].client().await, nodes[2].client().await);

    // Sealed on one node, read on another: byte-exact, then served locally.
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 253) as u8).collect();
    let mut b = a.create("big", data.len() as u64).await.unwrap();
    b.as_mut_slice().copy_from_slice(&data);
    b.seal().await.unwrap();
    let v = c.get("big", SETTLE).await.unwrap();
    assert_eq!(&v[..], &data[..]);
    drop(v);
    assert!(c.contains("big").await.unwrap(), "the replica is local now");

    // Zero-size objects travel too.
    a.put("empty", b"").await.unwrap();
    assert_eq!(c.get("empty", SETTLE).await.unwrap().len(), 0);

    // A get that waits for an object not sealed anywhere yet completes when it is.
    let mut waiter = {
        let c = nodes[1].client().await;
        tokio::spawn(async move {
            c.get("later", Duration::from_secs(10))
                .await
                .map(|v| v.to_vec())
        })
    };
    // This window must stay: it proves the get does not answer while nothing is sealed (no
    // event marks a get parked at its owner; a put landing first would not fail the test).
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut waiter)
            .await
            .is_err(),
        "the get answered before the object existed"
    );
    a.put("later", b"here").await.unwrap();
    assert_eq!(waiter.await.unwrap().unwrap(), b"here");

    // Missing everywhere: NotFound at once with no timeout, Timeout with one.
    assert_eq!(
        c.get("nowhere", Duration::ZERO).await.unwrap_err().code(),
        ErrorCode::NotFound
    );
    assert_eq!(
        c.get("nowhere", Duration::from_millis(200))
            .await
            .unwrap_err()
            .code(),
        ErrorCode::Timeout
    );

    // Delete on the reader removes every copy.
    c.delete("big").await.unwrap();
    eventually(Duration::from_secs(5), "primary dropped", || async {
        !a.contains("big").await.unwrap()
    })
    .await;
    assert_eq!(
        a.get("big", Duration::ZERO).await.unwrap_err().code(),
        ErrorCode::NotFound
    );

    // A node leaves: its only copies are lost (fast), the rest of the cluster keeps working.
    let b_client = nodes[1].client().await;
    b_client.put("only-on-1", b"x").await.unwrap();
    drop(b_client);
    // The registration reaches a surviving owner before the node goes (asked as a peer would,
    // so no copy is pulled): only then can the owners tell "lost" from "never existed".
    let probe_tls = NodeTls::from_node_cert(&ca.issue("probe").unwrap()).unwrap();
    let probe = Endpoint::bind(TransportConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        probe_tls,
    ))
    .unwrap();
    let survivors = [&nodes[0], &nodes[2]];
    eventually(Duration::from_secs(5), "registration at an owner", || {
        owner_knows(&probe, &survivors, "only-on-1", "n1")
    })
    .await;
    probe.close().await;
    nodes[1].stop().await;
    eventually(Duration::from_secs(5), "only-on-1 lost", || async {
        match c.get("only-on-1", Duration::ZERO).await {
            Err(e) => e.code() == ErrorCode::ObjectLost,
            Ok(_) => panic!("read an object whose only copy is gone"),
        }
    })
    .await;
    a.put("after", b"fine").await.unwrap();
    assert_eq!(&c.get("after", SETTLE).await.unwrap()[..], b"fine");
    for n in &mut nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_outside_the_ca_and_garbage_are_refused() {
    let ca = DevCa::generate().unwrap();
    let (meta, mut nodes) = cluster(&ca, 2).await;
    let a = nodes[0].client().await;
    a.put("secret", b"for members only").await.unwrap();

    // A node with a certificate from another CA registers, but no member talks to it.
    let rogue_ca = DevCa::generate().unwrap();
    let tls = NodeTls::from_node_cert(&rogue_ca.issue("rogue").unwrap()).unwrap();
    let mut rogue = Node::start("rogue", meta.clone(), tls).await;
    wait_members(&rogue, 3).await;
    let r = rogue.client().await;
    let e = r.get("secret", Duration::ZERO).await.unwrap_err();
    assert!(
        matches!(e.code(), ErrorCode::PermissionDenied | ErrorCode::NotFound),
        "{e}"
    );

    // Garbage datagrams on a member's QUIC port change nothing.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = nodes[0].w().peer_addr().unwrap();
    for i in 0..200u32 {
        let junk: Vec<u8> = (0..1200).map(|j| (i * 7 + j) as u8).collect();
        sock.send_to(&junk, target).unwrap();
    }
    let b = nodes[1].client().await;
    assert_eq!(
        &b.get("secret", SETTLE).await.unwrap()[..],
        b"for members only"
    );
    rogue.stop().await;
    for n in &mut nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_rejoins_without_resurrecting_its_old_objects() {
    let ca = DevCa::generate().unwrap();
    let (meta, mut nodes) = cluster(&ca, 2).await;
    let (a, b) = (nodes[0].client().await, nodes[1].client().await);
    b.put("old-life", b"gone with the process").await.unwrap();
    // Registration is asynchronous: a get that may wait sees it as soon as it lands.
    assert_eq!(
        a.get("old-life", Duration::from_secs(2))
            .await
            .unwrap()
            .len(),
        21
    );
    a.delete("old-life").await.unwrap();
    b.put("lost-with-it", b"only here").await.unwrap();
    drop(b);
    let key = shoal_meta::records::node_key("n1");
    assert!(meta.get(&key).await.unwrap().is_some(), "n1 is registered");
    nodes[1].stop().await;
    // Shutdown removes the record itself: it does not wait for the lease to run out.
    assert!(meta.get(&key).await.unwrap().is_none(), "n1 left nodes/");
    wait_members(&nodes[0], 1).await;
    // Same node id, new process (new incarnation, empty arena).
    let tls = NodeTls::from_node_cert(&ca.issue("n1").unwrap()).unwrap();
    nodes[1] = Node::start("n1", meta.clone(), tls).await;
    wait_members(&nodes[0], 2).await;
    let b = nodes[1].client().await;
    for id in ["old-life", "lost-with-it"] {
        let e = a.get(id, Duration::ZERO).await.unwrap_err();
        assert!(
            matches!(e.code(), ErrorCode::NotFound | ErrorCode::ObjectLost),
            "{id}: {e}"
        );
    }
    b.put("new-life", b"fresh").await.unwrap();
    assert_eq!(
        &a.get("new-life", Duration::from_secs(2)).await.unwrap()[..],
        b"fresh"
    );
    for n in &mut nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_outage_keeps_the_data_path_and_registration_resumes() {
    let ca = DevCa::generate().unwrap();
    // Control's embedded store, served over mutual TLS as `shoal control` does.
    let control = shoal_pki::ControlTls::from_cert(&ca.issue_control().unwrap()).unwrap();
    let store: Arc<dyn MetaStore> = Arc::new(MemStore::open(None, "").unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(shoal_meta::serve(
        store.clone(),
        listener,
        control.clone(),
        stop.clone(),
    ));
    let mut nodes = Vec::new();
    for id in ["r0", "r1"] {
        let tls = NodeTls::from_node_cert(&ca.issue(id).unwrap()).unwrap();
        let meta: Arc<dyn MetaStore> =
            Arc::new(shoal_meta::RemoteStore::connect(addr, &tls).unwrap());
        nodes.push(Node::start(id, meta, tls).await);
    }
    wait_members(&nodes[0], 2).await;
    wait_members(&nodes[1], 2).await;
    let (a, b) = (nodes[0].client().await, nodes[1].client().await);
    a.put("before", b"1").await.unwrap();
    assert_eq!(&b.get("before", SETTLE).await.unwrap()[..], b"1");

    // Control goes away for longer than a lease: the store lets the node records expire.
    stop.cancel();
    server.await.unwrap();
    eventually(Duration::from_secs(10), "leases expired", || async {
        store.range(NODES_PREFIX).await.unwrap().0.is_empty()
    })
    .await;
    a.put("during", b"2").await.unwrap();
    assert_eq!(&a.get("during", Duration::ZERO).await.unwrap()[..], b"2");
    assert_eq!(&b.get("during", SETTLE).await.unwrap()[..], b"2");
    assert_eq!(nodes[0].w().status().members.len(), 2, "last view kept");

    // Back on the same address: the leases had expired there; the nodes register again.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(shoal_meta::serve(
        store.clone(),
        listener,
        control,
        stop.clone(),
    ));
    eventually(
        Duration::from_secs(10),
        "nodes registered again",
        || async { store.range(NODES_PREFIX).await.unwrap().0.len() == 2 },
    )
    .await;
    for n in &mut nodes {
        n.stop().await;
    }
    stop.cancel();
    server.await.unwrap();
}
