//! The client against the server over real sockets: who may connect (mutual TLS under the
//! cluster CA, nothing else), garbage, reconnects, many calls on one connection, watch
//! cancellation.
#![allow(clippy::unwrap_used)]
use super::server::{serve_with, Limits};
use super::wire::{ClientMsg, Req};
use super::*;
use crate::types::{MetaError, MetaStore};
use crate::MemStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use shoal_pki::{ControlTls, DevCa, NodeCert, NodeTls, CONTROL_SERVER_NAME};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

/// A cluster CA, control's identity and one node's.
struct Pki {
    ca: DevCa,
    control: ControlTls,
    node: NodeTls,
}

fn pki() -> Pki {
    let ca = DevCa::generate().unwrap();
    let control = ControlTls::from_cert(&ca.issue_control().unwrap()).unwrap();
    let node = NodeTls::from_node_cert(&ca.issue("node-a").unwrap()).unwrap();
    Pki { ca, control, node }
}

async fn server(
    store: Arc<dyn MetaStore>,
    tls: &ControlTls,
) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
    server_limited(store, tls, Limits::default()).await
}

async fn server_limited(
    store: Arc<dyn MetaStore>,
    tls: &ControlTls,
    limits: Limits,
) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve_with(
        store,
        listener,
        tls.clone(),
        stop.clone(),
        limits,
    ));
    (addr, stop, task)
}

fn client(addr: SocketAddr, tls: &NodeTls) -> RemoteStore {
    RemoteStore::connect(addr, tls).unwrap()
}

/// Reads until the server closes the connection (EOF or an error, such as a TLS alert);
/// returns the bytes read before that. Panics if it stays open.
async fn read_until_closed(raw: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut got = Vec::new();
    let mut sink = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match raw.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&sink[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server kept the connection open");
    got
}

/// A `get` of `key` as one frame of the metadata wire.
fn get_frame(key: &str) -> Vec<u8> {
    let mut frame = Vec::new();
    let msg = ClientMsg {
        id: 1,
        req: Req::Get { key: key.into() },
    };
    shoal_protocol::encode_frame(&msg, &mut frame).unwrap();
    frame
}

/// A `put` of `key` as one frame of the metadata wire.
fn put_frame(key: &str) -> Vec<u8> {
    let mut frame = Vec::new();
    let msg = ClientMsg {
        id: 2,
        req: Req::Put {
            key: key.into(),
            value: b"planted".to_vec(),
            lease: None,
        },
    };
    shoal_protocol::encode_frame(&msg, &mut frame).unwrap();
    frame
}

/// A TLS client that trusts the cluster CA and presents `cert` (none: no client certificate).
fn raw_tls_client(ca_pem: &str, cert: Option<&NodeCert>) -> TlsConnector {
    match cert {
        Some(cert) => TlsConnector::from(
            NodeTls::from_node_cert(cert)
                .unwrap()
                .client_config()
                .unwrap(),
        ),
        None => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
            let config = rustls::ClientConfig::builder_with_provider(shoal_pki::crypto_provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            TlsConnector::from(Arc::new(config))
        }
    }
}

/// A certificate and key no CA signed, for the node name.
fn self_signed(ca_pem: &str) -> NodeCert {
    let c = rcgen::generate_simple_self_signed(vec![shoal_pki::SERVER_NAME.to_string()]).unwrap();
    NodeCert {
        cert_pem: c.cert.pem(),
        key_pem: c.signing_key.serialize_pem(),
        ca_pem: ca_pem.to_owned(),
    }
}

fn control_name() -> ServerName<'static> {
    ServerName::try_from(CONTROL_SERVER_NAME).unwrap()
}

#[tokio::test]
async fn garbage_closes_only_that_connection() {
    let p = pki();
    let mem = MemStore::open(None, "").unwrap();
    let (addr, stop, task) = server(Arc::new(mem), &p.control).await;
    let good = client(addr, &p.node);
    good.put("k", b"v".to_vec(), None).await.unwrap();
    let mut watch = good.watch("", 0).await.unwrap();
    let connector = TlsConnector::from(p.node.client_config().unwrap());
    let tls = || async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        connector.connect(control_name(), tcp).await.unwrap()
    };

    // Garbage instead of a TLS handshake.
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(&[0xff; 64]).await.unwrap();
    read_until_closed(&mut raw).await;
    // Inside TLS, an oversized length.
    let mut raw = tls().await;
    raw.write_all(&[0xff; 64]).await.unwrap();
    raw.flush().await.unwrap();
    read_until_closed(&mut raw).await;
    // Inside TLS, the right length and version, a garbage body.
    let mut raw = tls().await;
    let mut frame = 8u32.to_le_bytes().to_vec();
    frame.push(shoal_protocol::PROTOCOL_VERSION);
    frame.extend_from_slice(&[0xfe; 8]);
    raw.write_all(&frame).await.unwrap();
    raw.flush().await.unwrap();
    read_until_closed(&mut raw).await;
    // A truncated frame, then the client goes away.
    let mut raw = tls().await;
    raw.write_all(&frame[..7]).await.unwrap();
    raw.flush().await.unwrap();
    drop(raw);

    // The well-behaved client and its watch are unaffected; a new client works too.
    assert_eq!(good.get("k").await.unwrap().unwrap().value, b"v");
    let other = client(addr, &p.node);
    let rev = other.put("k2", b"w".to_vec(), None).await.unwrap();
    assert_eq!(watch.recv().await.unwrap().key(), "k");
    let e = watch.recv().await.unwrap();
    assert_eq!((e.key(), e.revision()), ("k2", rev));
    stop.cancel();
    task.await.unwrap();
}

/// A client without a certificate, with a self-signed one, or with one from another CA is
/// refused: whatever it sends is never read as a request (a put does not land) and it gets
/// no byte of a reply.
#[tokio::test]
async fn a_client_without_a_cluster_certificate_reads_nothing() {
    let p = pki();
    let mem = MemStore::open(None, "").unwrap();
    mem.put("secret", b"s3cr3t".to_vec(), None).await.unwrap();
    let (addr, stop, task) = server(Arc::new(mem.clone()), &p.control).await;
    let ca_pem = p.ca.cert_pem().to_owned();
    let other = DevCa::generate().unwrap();
    let mut foreign = other.issue("node-a").unwrap();
    foreign.ca_pem = ca_pem.clone();
    let cases = [
        ("no certificate", None),
        ("a self-signed certificate", Some(self_signed(&ca_pem))),
        ("a certificate from another CA", Some(foreign.clone())),
    ];
    for (what, cert) in &cases {
        let connector = raw_tls_client(&ca_pem, cert.as_ref());
        let tcp = TcpStream::connect(addr).await.unwrap();
        // With TLS 1.3 the client may finish its side of the handshake before the server has
        // judged its certificate; the refusal then arrives as an alert on the first read.
        if let Ok(mut tls) = connector.connect(control_name(), tcp).await {
            let mut frames = get_frame("secret");
            frames.extend(put_frame("planted"));
            // The server may already have closed: a failed write is a refusal too.
            let _ = tls.write_all(&frames).await;
            let _ = tls.flush().await;
            let got = read_until_closed(&mut tls).await;
            assert!(got.is_empty(), "{what}: read {} bytes", got.len());
        }
        assert_eq!(mem.get("planted").await.unwrap(), None, "{what}");
    }
    // Through the real client: every call fails as unavailable.
    for cert in [self_signed(&ca_pem), foreign] {
        let c = client(addr, &NodeTls::from_node_cert(&cert).unwrap());
        assert!(matches!(
            c.get("secret").await,
            Err(MetaError::Unavailable(_))
        ));
        assert!(matches!(
            c.put("planted", vec![], None).await,
            Err(MetaError::Unavailable(_))
        ));
    }
    assert_eq!(mem.get("planted").await.unwrap(), None);
    // A node of the cluster reads it.
    let good = client(addr, &p.node);
    assert_eq!(good.get("secret").await.unwrap().unwrap().value, b"s3cr3t");
    stop.cancel();
    task.await.unwrap();
}

/// Plain TCP speaking the metadata wire directly gets no reply: at most a TLS alert record,
/// then the connection closes.
#[tokio::test]
async fn a_plain_tcp_client_is_refused() {
    let p = pki();
    let mem = MemStore::open(None, "").unwrap();
    mem.put("secret", b"s3cr3t".to_vec(), None).await.unwrap();
    let (addr, stop, task) = server(Arc::new(mem.clone()), &p.control).await;
    let mut raw = TcpStream::connect(addr).await.unwrap();
    let mut frames = get_frame("secret");
    frames.extend(put_frame("planted"));
    raw.write_all(&frames).await.unwrap();
    let got = read_until_closed(&mut raw).await;
    const TLS_ALERT: u8 = 0x15;
    assert!(
        got.is_empty() || got[0] == TLS_ALERT,
        "plain TCP got {got:?}"
    );
    assert!(!got.windows(6).any(|w| w == b"s3cr3t"));
    assert_eq!(mem.get("planted").await.unwrap(), None);
    stop.cancel();
    task.await.unwrap();
}

/// A client that connects and never starts its handshake is dropped after the handshake
/// timeout.
#[tokio::test]
async fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    let p = pki();
    let mem = MemStore::open(None, "").unwrap();
    let limits = Limits {
        handshake_timeout: Duration::from_millis(200),
        ..Limits::default()
    };
    let (addr, stop, task) = server_limited(Arc::new(mem), &p.control, limits).await;
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let got = read_until_closed(&mut silent).await;
    assert!(got.is_empty(), "{got:?}");
    let good = client(addr, &p.node);
    good.put("k", vec![], None).await.unwrap();
    stop.cancel();
    task.await.unwrap();
}

/// A connection in its handshake holds a slot: with one slot taken by a silent client, a
/// node cannot get in; once that client goes away, it can.
#[tokio::test]
async fn a_handshake_holds_a_connection_slot() {
    let p = pki();
    let mem = MemStore::open(None, "").unwrap();
    let limits = Limits {
        max_connections: 1,
        handshake_timeout: Duration::from_secs(3600),
    };
    let (addr, stop, task) = server_limited(Arc::new(mem), &p.control, limits).await;
    let silent = TcpStream::connect(addr).await.unwrap();
    let good = client(addr, &p.node);
    assert!(matches!(
        good.get("k").await,
        Err(MetaError::Unavailable(_))
    ));
    drop(silent);
    // The slot frees once the server sees the silent client go; the next call gets in.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match good.get("k").await {
            Ok(v) => {
                assert_eq!(v, None);
                break;
            }
            Err(MetaError::Unavailable(e)) => {
                assert!(tokio::time::Instant::now() < deadline, "never got in: {e}")
            }
            Err(e) => panic!("{e}"),
        }
    }
    stop.cancel();
    task.await.unwrap();
}

/// The client talks only to control: a server with a certificate from another CA, or with a
/// node's certificate from the cluster CA (not issued for control's name), is refused before
/// a request is sent.
#[tokio::test]
async fn a_server_that_is_not_control_is_refused() {
    let p = pki();
    let other = DevCa::generate().unwrap();
    let impostors = [
        (
            "another CA's control",
            ControlTls::from_cert(&other.issue_control().unwrap())
                .unwrap()
                .server_config(),
        ),
        (
            "a node of the cluster",
            NodeTls::from_node_cert(&p.ca.issue("node-b").unwrap())
                .unwrap()
                .server_config()
                .unwrap(),
        ),
    ];
    for (what, config) in impostors {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let impostor = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            match TlsAcceptor::from(config).accept(tcp).await {
                // The handshake failed on this side too: the client aborted it.
                Err(_) => Vec::new(),
                Ok(mut tls) => read_until_closed(&mut tls).await,
            }
        });
        let c = client(addr, &p.node);
        assert!(
            matches!(c.get("k").await, Err(MetaError::Unavailable(_))),
            "{what}"
        );
        drop(c);
        let heard = impostor.await.unwrap();
        assert!(heard.is_empty(), "{what} read {} bytes", heard.len());
    }
}

#[tokio::test]
async fn reconnects_after_the_server_comes_back() {
    let p = pki();
    let mem = MemStore::open(None, "").unwrap();
    let (addr, stop, task) = server(Arc::new(mem.clone()), &p.control).await;
    let client = client(addr, &p.node);
    client.put("k", b"1".to_vec(), None).await.unwrap();
    let mut watch = client.watch("", 0).await.unwrap();
    assert!(watch.recv().await.is_some());

    stop.cancel();
    task.await.unwrap();
    // The watch ends with the connection; calls fail as unavailable.
    let ended = tokio::time::timeout(Duration::from_secs(10), watch.recv())
        .await
        .unwrap();
    assert!(ended.is_none());
    assert!(matches!(
        client.get("k").await,
        Err(MetaError::Unavailable(_))
    ));

    let listener = TcpListener::bind(addr).await.unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve(
        Arc::new(mem),
        listener,
        p.control.clone(),
        stop.clone(),
    ));
    assert_eq!(client.get("k").await.unwrap().unwrap().value, b"1");
    client.close().await;
    // Usable again after close: it reconnects.
    assert!(client.get("k").await.unwrap().is_some());
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn unreachable_server_is_unavailable() {
    let p = pki();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = client(addr, &p.node);
    assert!(matches!(
        client.get("k").await,
        Err(MetaError::Unavailable(_))
    ));
    assert!(matches!(
        client.watch("", 0).await,
        Err(MetaError::Unavailable(_))
    ));
}

#[tokio::test]
async fn many_calls_in_flight_on_one_connection() {
    let p = pki();
    let mem = MemStore::open(None, "").unwrap();
    let (addr, stop, task) = server(Arc::new(mem), &p.control).await;
    let client = Arc::new(client(addr, &p.node));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..200u32 {
        let c = client.clone();
        calls.spawn(async move {
            c.put(&format!("k{i}"), i.to_le_bytes().to_vec(), None)
                .await
        });
    }
    while let Some(r) = calls.join_next().await {
        r.unwrap().unwrap();
    }
    let (kvs, rev) = client.range("k").await.unwrap();
    assert_eq!((kvs.len(), rev), (200, 200));
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn dropped_watch_is_cancelled_on_the_server() {
    let p = pki();
    let mem = MemStore::open(None, "").unwrap();
    let (addr, stop, task) = server(Arc::new(mem), &p.control).await;
    let client = client(addr, &p.node);
    let w = client.watch("", 0).await.unwrap();
    drop(w);
    // The next event finds the receiver gone; the client cancels the server's watch.
    client.put("k", vec![], None).await.unwrap();
    client.put("k", vec![], None).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let slots = client.open_slots().await;
            if slots == Some(0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    stop.cancel();
    task.await.unwrap();
}
