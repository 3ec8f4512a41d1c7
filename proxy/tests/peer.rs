//! The proxy's network listener for other proxies: mutual TLS under the cluster CA, only the
//! `Peer` role, a malformed peer connection closed without disturbing the others, and the
//! proxy's `proxies/<node>` record held under a lease; a peer's release of an object result
//! reaches the instance that stored it.
#![allow(clippy::unwrap_used)] // test setup panics on failure by design
use bytes::BytesMut;
use shoal_meta::records::{proxy_key, ProxyRecord};
use shoal_meta::{LeaseId, MemStore, MetaStore};
use shoal_protocol::{
    encode_frame, CallerFrame, ErrorCode, FrameDecoder, Payload, ProxyFrame, Role, PROTOCOL_VERSION,
};
use shoal_proxy::{PeerConfig, Proxy, ProxyConfig};
use shoal_transport::{DevCa, NodeTls, SERVER_NAME};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Longest wait for something the proxy does in the background.
const WAIT: Duration = Duration::from_secs(5);

/// Polls `cond` until it returns `Some`, failing the test (naming `what`) after [`WAIT`].
async fn wait_for<T, F, Fut>(what: &str, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        // The poll interval: the store is read, not watched.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `proxies/a` is in `meta` under a lease other than `not`; returns that lease
/// and the record.
async fn proxy_record(meta: &Arc<dyn MetaStore>, not: Option<LeaseId>) -> (LeaseId, ProxyRecord) {
    wait_for("proxies/a under a new lease", || async {
        let kv = meta.get(&proxy_key("a")).await.unwrap()?;
        let lease = kv.lease.filter(|l| Some(*l) != not)?;
        Some((lease, serde_json::from_slice(&kv.value).unwrap()))
    })
    .await
}

fn start(dir: &std::path::Path, ca: &DevCa, meta: Arc<dyn MetaStore>) -> Proxy {
    let mut cfg = ProxyConfig::new("a", dir.join("a.sock"));
    cfg.meta = Some(meta);
    cfg.peer = Some(PeerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        advertise: None,
        tls: NodeTls::from_node_cert(&ca.issue("a").unwrap()).unwrap(),
        lease_ttl: Duration::from_secs(5),
    });
    Proxy::start(cfg).unwrap()
}

/// The credential of instance `instance` of `function`, as its agent would issue it.
async fn instance_token(meta: &Arc<dyn MetaStore>, function: &str, instance: &str) -> String {
    let binding = shoal_meta::records::InstanceBinding {
        function: function.into(),
        instance: instance.into(),
    };
    shoal_meta::issue_instance_token(meta.as_ref(), "default", binding)
        .await
        .unwrap()
        .token
}

async fn connect(addr: SocketAddr, ca: &DevCa, node: &str) -> std::io::Result<Tls> {
    let tls = NodeTls::from_node_cert(&ca.issue(node).unwrap()).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from(SERVER_NAME).unwrap().to_owned();
    TlsConnector::from(tls.client_config().unwrap())
        .connect(name, tcp)
        .await
}

async fn send(s: &mut Tls, f: &CallerFrame) {
    let mut out = Vec::new();
    encode_frame(f, &mut out).unwrap();
    s.write_all(&out).await.unwrap();
}

/// The next frame, or `None` when the proxy closed the connection.
async fn recv(s: &mut Tls, buf: &mut BytesMut) -> Option<ProxyFrame> {
    let dec = FrameDecoder::new(1 << 20);
    loop {
        if let Some(f) = dec.decode::<ProxyFrame>(buf).unwrap() {
            return Some(f);
        }
        match tokio::time::timeout(Duration::from_secs(5), s.read_buf(buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(_)) => {}
            Err(_) => panic!("no answer from the proxy"),
        }
    }
}

fn hello(role: Role) -> CallerFrame {
    CallerFrame::Hello {
        version: PROTOCOL_VERSION,
        role,
        token: None,
    }
}

fn peer() -> Role {
    Role::Peer {
        node_id: "b".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_cluster_peers_get_in() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::generate().unwrap();
    let meta: Arc<dyn MetaStore> = Arc::new(MemStore::open(None, "").unwrap());
    let proxy = start(dir.path(), &ca, meta.clone());
    let addr = proxy.peer_addr().unwrap();

    // The proxy publishes its listener.
    let (_, record) = proxy_record(&meta, None).await;
    assert_eq!(record.peer_addr, addr);

    // A certificate from another CA: no session.
    let other = DevCa::generate().unwrap();
    let refused = match connect(addr, &other, "b").await {
        Err(_) => true,
        Ok(mut s) => {
            send(&mut s, &hello(peer())).await;
            recv(&mut s, &mut BytesMut::new()).await.is_none()
        }
    };
    assert!(refused, "a foreign-CA peer was served");

    // The cluster's CA, but not a proxy: refused with PermissionDenied.
    let mut s = connect(addr, &ca, "b").await.unwrap();
    send(&mut s, &hello(Role::Caller)).await;
    match recv(&mut s, &mut BytesMut::new()).await {
        Some(ProxyFrame::Refused(e)) => assert_eq!(e.code, ErrorCode::PermissionDenied),
        other => panic!("expected a refusal, got {other:?}"),
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_peer_is_closed_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::generate().unwrap();
    let meta: Arc<dyn MetaStore> = Arc::new(MemStore::open(None, "").unwrap());
    let proxy = start(dir.path(), &ca, meta.clone());
    let addr = proxy.peer_addr().unwrap();
    // A local instance that echoes.
    let token = instance_token(&meta, "echo", "e-1").await;
    let inst =
        shoal_sdk::FunctionInstance::register(proxy.socket_path(), "echo", "e-1", 4, Some(&token))
            .await
            .unwrap();
    tokio::spawn(inst.run(|a: Vec<u8>| async move { Ok(a) }));

    let mut good = connect(addr, &ca, "b").await.unwrap();
    send(&mut good, &hello(peer())).await;
    let mut gbuf = BytesMut::new();
    assert!(matches!(
        recv(&mut good, &mut gbuf).await,
        Some(ProxyFrame::Welcome { .. })
    ));

    let mut bad = connect(addr, &ca, "c").await.unwrap();
    send(&mut bad, &hello(peer())).await;
    let mut bbuf = BytesMut::new();
    recv(&mut bad, &mut bbuf).await.unwrap();
    // A frame header announcing a 1 GiB body: the proxy closes that connection.
    bad.write_all(&(1u32 << 30).to_le_bytes()).await.unwrap();
    bad.write_all(&[PROTOCOL_VERSION, 0, 0, 0]).await.unwrap();
    assert!(recv(&mut bad, &mut bbuf).await.is_none(), "bad peer kept");

    // The good peer's call is served by the local instance.
    let call = CallerFrame::Call {
        id: 9,
        function: "echo".into(),
        instance: None,
        args: Payload::Inline(b"over the network".to_vec()),
        timeout_ms: 5000,
        trace_id: 1,
    };
    send(&mut good, &call).await;
    match recv(&mut good, &mut gbuf).await {
        Some(ProxyFrame::Reply { id: 9, result }) => {
            assert_eq!(
                result.unwrap(),
                Payload::Inline(b"over the network".to_vec())
            )
        }
        other => panic!("expected the reply, got {other:?}"),
    }
    // A peer's call for a function with no local instance: NotFound, never forwarded on.
    let call = CallerFrame::Call {
        id: 10,
        function: "elsewhere".into(),
        instance: None,
        args: Payload::Inline(vec![]),
        timeout_ms: 5000,
        trace_id: 2,
    };
    send(&mut good, &call).await;
    match recv(&mut good, &mut gbuf).await {
        Some(ProxyFrame::Reply { id: 10, result }) => {
            assert_eq!(result.unwrap_err().code, ErrorCode::NotFound)
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    proxy.shutdown().await;
}

/// `proxies/a` is held under a lease: registered again under a new lease when the old one
/// is lost, and removed at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_record_lives_under_a_lease() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::generate().unwrap();
    let meta: Arc<dyn MetaStore> = Arc::new(MemStore::open(None, "").unwrap());
    let proxy = start(dir.path(), &ca, meta.clone());
    let (first, _) = proxy_record(&meta, None).await;
    // The lease is lost (revoked, as a store that forgot it would say).
    meta.revoke(first).await.unwrap();
    let (_, record) = proxy_record(&meta, Some(first)).await;
    assert_eq!(record.node_id, "a");
    assert_eq!(Some(record.peer_addr), proxy.peer_addr());
    proxy.shutdown().await;
    assert_eq!(
        meta.get(&proxy_key("a")).await.unwrap(),
        None,
        "shutdown removes the record"
    );
}

/// The next frame the proxy sends on a Unix socket connection.
async fn next(s: &mut tokio::net::UnixStream, buf: &mut BytesMut) -> ProxyFrame {
    let dec = FrameDecoder::new(1 << 20);
    loop {
        if let Some(f) = dec.decode::<ProxyFrame>(buf).unwrap() {
            return f;
        }
        let n = tokio::time::timeout(WAIT, s.read_buf(buf))
            .await
            .expect("the proxy said nothing")
            .unwrap();
        assert!(n > 0, "the proxy closed the connection");
    }
}

/// A call from another proxy answered with an object: the peer's `Release` reaches the
/// instance (as the invoke's id), and a second one, or one for another call, does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_release_reaches_the_instance() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::generate().unwrap();
    let meta: Arc<dyn MetaStore> = Arc::new(MemStore::open(None, "").unwrap());
    let proxy = start(dir.path(), &ca, meta.clone());
    let addr = proxy.peer_addr().unwrap();
    // A raw local instance, to see what the proxy sends it.
    let token = instance_token(&meta, "obj", "o-1").await;
    let mut inst = tokio::net::UnixStream::connect(proxy.socket_path())
        .await
        .unwrap();
    let mut out = Vec::new();
    let register = CallerFrame::Hello {
        version: PROTOCOL_VERSION,
        role: Role::Instance {
            function: "obj".into(),
            instance_id: "o-1".into(),
            concurrency: 1,
        },
        token: Some(token),
    };
    encode_frame(&register, &mut out).unwrap();
    inst.write_all(&out).await.unwrap();
    let mut ibuf = BytesMut::new();
    assert!(matches!(
        next(&mut inst, &mut ibuf).await,
        ProxyFrame::Welcome { .. }
    ));

    let mut peer_conn = connect(addr, &ca, "b").await.unwrap();
    send(&mut peer_conn, &hello(peer())).await;
    let mut pbuf = BytesMut::new();
    recv(&mut peer_conn, &mut pbuf).await.unwrap();
    let call = CallerFrame::Call {
        id: 5,
        function: "obj".into(),
        instance: None,
        args: Payload::Inline(vec![]),
        timeout_ms: 5000,
        trace_id: 1,
    };
    send(&mut peer_conn, &call).await;
    let ProxyFrame::Invoke { id: invoke, .. } = next(&mut inst, &mut ibuf).await else {
        panic!("expected an invoke");
    };
    let object = Payload::Object(shoal_protocol::ObjectId::new("result-1").unwrap());
    out.clear();
    let answer = CallerFrame::Result {
        id: invoke,
        result: Ok(object.clone()),
    };
    encode_frame(&answer, &mut out).unwrap();
    inst.write_all(&out).await.unwrap();
    match recv(&mut peer_conn, &mut pbuf).await {
        Some(ProxyFrame::Reply { id: 5, result }) => assert_eq!(result.unwrap(), object),
        other => panic!("expected the reply, got {other:?}"),
    }
    send(&mut peer_conn, &CallerFrame::Release { id: 4 }).await; // not a call of ours
    send(&mut peer_conn, &CallerFrame::Release { id: 5 }).await;
    send(&mut peer_conn, &CallerFrame::Release { id: 5 }).await; // once only
    assert_eq!(
        next(&mut inst, &mut ibuf).await,
        ProxyFrame::Release { id: invoke }
    );
    // Nothing more: a drain is answered at once, with nothing queued before it.
    out.clear();
    encode_frame(&CallerFrame::Drain, &mut out).unwrap();
    inst.write_all(&out).await.unwrap();
    assert_eq!(
        next(&mut inst, &mut ibuf).await,
        ProxyFrame::Drained,
        "one release only"
    );
    proxy.shutdown().await;
}
