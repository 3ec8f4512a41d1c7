//! End-to-end tests of the QUIC transport on loopback: request/response, bodies, mutual TLS,
//! hostile input, disconnects, stalls and server failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use shoal_transport::{
    DevCa, Endpoint, NodeTls, Reply, Service, TransportConfig, TransportError, ALPN, SERVER_NAME,
};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Serialize, Deserialize)]
enum Req {
    Echo(String),
    Range {
        offset: u64,
        len: u64,
    },
    /// Never answers; the server sends a message on `stalled` when it starts waiting and bumps
    /// `stalls_dropped` when the handler is dropped.
    Stall,
    /// Answers once the test notifies `release` (sends on `stalled` when it starts).
    Held,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
enum Resp {
    Echo(String),
    Range(u64),
    Done,
}

struct TestService {
    data: Bytes,
    stalled: mpsc::Sender<()>,
    stalls_dropped: Arc<watch::Sender<usize>>,
    release: Arc<Notify>,
}

impl TestService {
    fn new(data: Bytes, stalled: mpsc::Sender<()>) -> TestService {
        TestService {
            data,
            stalled,
            stalls_dropped: Arc::new(watch::channel(0).0),
            release: Arc::new(Notify::new()),
        }
    }
}

struct DropCounter(Arc<watch::Sender<usize>>);

impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n += 1);
    }
}

#[async_trait::async_trait]
impl Service for TestService {
    type Req = Req;
    type Resp = Resp;

    async fn handle(&self, _peer: SocketAddr, req: Req) -> Reply<Resp> {
        match req {
            Req::Echo(s) => Reply::new(Resp::Echo(s)),
            Req::Range { offset, len } => {
                let start = (offset as usize).min(self.data.len());
                let end = (offset.saturating_add(len) as usize).min(self.data.len());
                Reply::with_body(
                    Resp::Range((end - start) as u64),
                    self.data.slice(start..end),
                )
            }
            Req::Stall => {
                let _guard = DropCounter(self.stalls_dropped.clone());
                let _ = self.stalled.send(()).await;
                std::future::pending::<()>().await;
                unreachable!()
            }
            Req::Held => {
                let _ = self.stalled.send(()).await;
                self.release.notified().await;
                Reply::new(Resp::Done)
            }
        }
    }
}

fn pattern(len: usize) -> Bytes {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

fn config(tls: NodeTls) -> TransportConfig {
    let mut c = TransportConfig::new("127.0.0.1:0".parse().unwrap(), tls);
    c.idle_timeout = Duration::from_secs(2);
    c.keep_alive = Duration::from_millis(300);
    c.connect_timeout = Duration::from_secs(2);
    c.shutdown_grace = Duration::from_millis(500);
    c.max_frame = 64 << 10;
    c
}

struct Server {
    endpoint: Endpoint,
    shutdown: CancellationToken,
    serving: tokio::task::JoinHandle<()>,
    stalled: mpsc::Receiver<()>,
    /// How many `Stall` handlers were dropped.
    stalls_dropped: watch::Receiver<usize>,
    /// Lets one `Held` handler answer (`notify_one` keeps the permit if none waits yet).
    release: Arc<Notify>,
}

impl Server {
    fn addr(&self) -> SocketAddr {
        self.endpoint.local_addr()
    }
}

fn serve(tls: NodeTls, data: Bytes) -> Server {
    serve_with(config(tls), data)
}

fn serve_with(cfg: TransportConfig, data: Bytes) -> Server {
    let endpoint = Endpoint::bind(cfg).unwrap();
    let (tx, stalled) = mpsc::channel(16);
    let svc = Arc::new(TestService::new(data, tx));
    let stalls_dropped = svc.stalls_dropped.subscribe();
    let release = svc.release.clone();
    let shutdown = CancellationToken::new();
    let serving = endpoint.serve(svc, shutdown.clone());
    Server {
        endpoint,
        shutdown,
        serving,
        stalled,
        stalls_dropped,
        release,
    }
}

struct Cluster {
    ca: DevCa,
}

impl Cluster {
    fn new() -> Cluster {
        Cluster {
            ca: DevCa::generate().unwrap(),
        }
    }

    fn tls(&self, node: &str) -> NodeTls {
        NodeTls::from_node_cert(&self.ca.issue(node).unwrap()).unwrap()
    }

    fn client(&self) -> Endpoint {
        Endpoint::bind(config(self.tls("client"))).unwrap()
    }
}

async fn echo(client: &Endpoint, peer: SocketAddr, s: &str) -> Result<Resp, TransportError> {
    client.call(peer, &Req::Echo(s.to_owned())).await
}

/// Waits at most `limit` for `fut`, failing the test otherwise.
async fn within<F: std::future::Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {limit:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_round_trip_and_shared_connection() {
    let cluster = Cluster::new();
    let server = serve(cluster.tls("server"), Bytes::new());
    let client = cluster.client();
    // Concurrent first calls share one connection.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..16 {
        let client = client.clone();
        let peer = server.addr();
        calls.spawn(async move { (i, echo(&client, peer, &format!("hello {i}")).await) });
    }
    while let Some(r) = calls.join_next().await {
        let (i, resp) = r.unwrap();
        assert_eq!(resp.unwrap(), Resp::Echo(format!("hello {i}")));
    }
    assert_eq!(client.open_connections(), 1, "one handshake for all calls");
    assert_eq!(server.endpoint.open_connections(), 1);

    // A request above max_frame is refused before it is sent.
    let err = echo(&client, server.addr(), &"x".repeat(100 << 10))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::FrameTooLarge { .. }), "{err}");
    // call() refuses a reply with a body.
    let err = client
        .call::<_, Resp>(server.addr(), &Req::Range { offset: 0, len: 0 })
        .await;
    assert!(err.is_ok(), "an empty body is no body: {err:?}");

    server.shutdown.cancel();
    within(Duration::from_secs(5), "serve shutdown", server.serving)
        .await
        .unwrap();
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_range_fetches_are_byte_exact() {
    let cluster = Cluster::new();
    let size = 6 << 20;
    let data = pattern(size);
    let server = serve(cluster.tls("server"), data.clone());
    let client = cluster.client();
    let parts = 5;
    let per = size.div_ceil(parts);
    let mut fetches = tokio::task::JoinSet::new();
    for i in 0..parts {
        let client = client.clone();
        let peer = server.addr();
        let offset = i * per;
        let len = per.min(size - offset);
        fetches.spawn(async move {
            let mut buf = vec![0u8; len];
            let mut calls = 0usize;
            let mut sink = |off: u64, bytes: &[u8]| {
                calls += 1;
                let off = off as usize;
                buf[off..off + bytes.len()].copy_from_slice(bytes);
                Ok(())
            };
            let resp: Resp = client
                .fetch(
                    peer,
                    &Req::Range {
                        offset: offset as u64,
                        len: len as u64,
                    },
                    &mut sink,
                )
                .await
                .unwrap();
            assert_eq!(resp, Resp::Range(len as u64));
            (offset, buf)
        });
    }
    let mut got = 0;
    while let Some(r) = fetches.join_next().await {
        let (offset, buf) = r.unwrap();
        assert!(
            buf[..] == data[offset..offset + buf.len()],
            "range at {offset}"
        );
        got += buf.len();
    }
    assert_eq!(got, size);

    // A failing sink stops the fetch with a Sink error, and the connection stays usable.
    let mut failing = |_: u64, _: &[u8]| Err(std::io::Error::other("disk full"));
    let err = client
        .fetch::<_, Resp>(
            server.addr(),
            &Req::Range {
                offset: 0,
                len: size as u64,
            },
            &mut failing,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Sink { .. }), "{err}");
    assert_eq!(
        echo(&client, server.addr(), "after").await.unwrap(),
        Resp::Echo("after".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_from_another_ca_are_refused_both_ways() {
    let cluster = Cluster::new();
    let other = Cluster::new();
    let server = serve(cluster.tls("server"), Bytes::new());

    // A client whose certificate is signed by another CA (and trusts only that CA).
    let intruder = Endpoint::bind(config(other.tls("intruder"))).unwrap();
    let err = within(
        Duration::from_secs(5),
        "intruder call",
        echo(&intruder, server.addr(), "hi"),
    )
    .await
    .unwrap_err();
    assert!(!err.is_unreachable(), "{err}");
    assert!(matches!(err, TransportError::Refused { .. }), "{err}");

    // A client that trusts both CAs but presents the foreign certificate: the server refuses.
    let mixed = other.ca.issue("mixed").unwrap();
    let mut both = mixed.clone();
    both.ca_pem = format!("{}{}", cluster.ca.cert_pem(), other.ca.cert_pem());
    let mixed_client = Endpoint::bind(config(NodeTls::from_node_cert(&both).unwrap())).unwrap();
    let err = within(
        Duration::from_secs(5),
        "mixed call",
        echo(&mixed_client, server.addr(), "hi"),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, TransportError::Refused { .. }), "{err}");

    // Our client refuses a server whose certificate is signed by another CA.
    let rogue = serve(other.tls("rogue"), Bytes::new());
    let client = cluster.client();
    let err = within(
        Duration::from_secs(5),
        "call to rogue",
        echo(&client, rogue.addr(), "hi"),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, TransportError::Refused { .. }), "{err}");

    // The legitimate pair still works.
    assert_eq!(
        echo(&client, server.addr(), "ok").await.unwrap(),
        Resp::Echo("ok".into())
    );
}

fn raw_client_config(
    ca_pem: &str,
    client_cert: Option<&shoal_transport::NodeCert>,
) -> quinn::ClientConfig {
    let crypto = match client_cert {
        Some(cert) => NodeTls::from_node_cert(cert)
            .unwrap()
            .quic_client_config()
            .unwrap(),
        None => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
                roots.add(cert.unwrap()).unwrap();
            }
            let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            c.alpn_protocols = vec![ALPN.to_vec()];
            Arc::new(c)
        }
    };
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap(),
    ))
}

/// Connects with a raw quinn endpoint; returns the connection or the handshake error.
async fn raw_connect(
    config: quinn::ClientConfig,
    peer: SocketAddr,
) -> (
    quinn::Endpoint,
    Result<quinn::Connection, quinn::ConnectionError>,
) {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint
        .connect_with(config, peer, SERVER_NAME)
        .unwrap()
        .await;
    (endpoint, conn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_certificate_is_refused() {
    let cluster = Cluster::new();
    let server = serve(cluster.tls("server"), Bytes::new());
    let (_ep, conn) = raw_connect(
        raw_client_config(cluster.ca.cert_pem(), None),
        server.addr(),
    )
    .await;
    // TLS 1.3: the client may finish its handshake before the server checks the certificate; the
    // refusal then arrives as the connection's close reason.
    let err = match conn {
        Err(e) => e,
        Ok(conn) => within(Duration::from_secs(5), "refusal", conn.closed()).await,
    };
    match &err {
        quinn::ConnectionError::ConnectionClosed(close) => {
            let code = u64::from(close.error_code);
            assert!((0x100..0x200).contains(&code), "not a TLS alert: {err}");
        }
        other => panic!("expected a TLS alert, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_do_not_disturb_connections() {
    let cluster = Cluster::new();
    let server = serve(cluster.tls("server"), Bytes::new());
    let client = cluster.client();
    assert_eq!(
        echo(&client, server.addr(), "before").await.unwrap(),
        Resp::Echo("before".into())
    );

    let junk = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let noise = pattern(1 << 16);
    for i in 0..200usize {
        let len = [1, 7, 40, 1200, 1350, 9000][i % 6];
        let start = (i * 131) % (noise.len() - len);
        let mut datagram = noise[start..start + len].to_vec();
        match i % 3 {
            // Looks like a QUIC v1 Initial (long header) with a random connection id.
            0 if len > 8 => {
                datagram[0] = 0xc0 | (datagram[0] & 0x0f);
                datagram[1..5].copy_from_slice(&1u32.to_be_bytes());
                datagram[5] = 8;
            }
            // Looks like a short-header packet.
            1 => datagram[0] = 0x40 | (datagram[0] & 0x3f),
            _ => {}
        }
        junk.send_to(&datagram, server.addr()).unwrap();
        // And at the client, whose socket also serves.
        junk.send_to(&datagram, client.local_addr()).unwrap();
    }

    // The established connection still works, and so does a new one.
    assert_eq!(
        echo(&client, server.addr(), "after").await.unwrap(),
        Resp::Echo("after".into())
    );
    let fresh = cluster.client();
    assert_eq!(
        echo(&fresh, server.addr(), "fresh").await.unwrap(),
        Resp::Echo("fresh".into())
    );
    assert_eq!(client.open_connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_only_their_connection() {
    let cluster = Cluster::new();
    let server = serve(cluster.tls("server"), Bytes::new());
    let client = cluster.client();
    assert_eq!(
        echo(&client, server.addr(), "x").await.unwrap(),
        Resp::Echo("x".into())
    );

    let cert = cluster.ca.issue("raw").unwrap();
    let cases: [(&str, Vec<u8>); 3] = [
        ("oversized", u32::MAX.to_le_bytes().to_vec()),
        ("undecodable", {
            let mut f = 3u32.to_le_bytes().to_vec();
            f.extend_from_slice(&[0xee, 0xee, 0xee]);
            f
        }),
        ("truncated", {
            let mut f = 100u32.to_le_bytes().to_vec();
            f.extend_from_slice(b"short");
            f
        }),
    ];
    for (what, frame) in cases {
        let (_ep, conn) = raw_connect(
            raw_client_config(cluster.ca.cert_pem(), Some(&cert)),
            server.addr(),
        )
        .await;
        let conn = conn.unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&frame).await.unwrap();
        send.finish().unwrap();
        let reason = within(Duration::from_secs(5), what, conn.closed()).await;
        match reason {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code.into_inner(), 1, "{what}: {close}");
            }
            other => panic!("{what}: expected a protocol-violation close, got {other}"),
        }
    }

    // Other connections are unaffected, new ones work.
    assert_eq!(
        echo(&client, server.addr(), "y").await.unwrap(),
        Resp::Echo("y".into())
    );
    let fresh = cluster.client();
    assert_eq!(
        echo(&fresh, server.addr(), "z").await.unwrap(),
        Resp::Echo("z".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_fails_in_flight_calls_promptly() {
    let cluster = Cluster::new();
    let mut server = serve(cluster.tls("server"), Bytes::new());
    let client = cluster.client();
    let peer = server.addr();
    let stalled_call = tokio::spawn({
        let client = client.clone();
        async move { client.call::<_, Resp>(peer, &Req::Stall).await }
    });
    within(Duration::from_secs(5), "stall start", server.stalled.recv())
        .await
        .unwrap();
    client.disconnect(peer);
    // The deadline is half the 2 s idle timeout: the disconnect itself fails the call.
    let err = within(Duration::from_secs(1), "disconnected call", stalled_call)
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, TransportError::Closed { .. }), "{err}");
    assert!(err.is_unreachable());
    // The server notices the closed connection and drops the handler.
    within(
        Duration::from_secs(5),
        "handler drop",
        server.stalls_dropped.wait_for(|n| *n > 0),
    )
    .await
    .unwrap();
    // The next call connects afresh.
    assert_eq!(
        echo(&client, peer, "again").await.unwrap(),
        Resp::Echo("again".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_timeout_on_stalled_handler_keeps_connection() {
    let cluster = Cluster::new();
    let mut server = serve(cluster.tls("server"), Bytes::new());
    let client = cluster.client();
    let peer = server.addr();
    for i in 0..10 {
        echo(&client, peer, &i.to_string()).await.unwrap();
    }
    let before = client.connection_stats(peer).unwrap();

    let timed_out = tokio::time::timeout(
        Duration::from_millis(300),
        client.call::<_, Resp>(peer, &Req::Stall),
    )
    .await;
    assert!(timed_out.is_err(), "the stalled call must not complete");
    server.stalled.recv().await.unwrap();
    // The abandoned stream is stopped; the server drops the handler.
    within(
        Duration::from_secs(5),
        "handler drop",
        server.stalls_dropped.wait_for(|n| *n > 0),
    )
    .await
    .unwrap();

    assert_eq!(
        echo(&client, peer, "still here").await.unwrap(),
        Resp::Echo("still here".into())
    );
    let after = client.connection_stats(peer).unwrap();
    assert_eq!(client.open_connections(), 1, "no new connection");
    assert!(
        after.udp_tx.datagrams > before.udp_tx.datagrams,
        "the same connection carried the later call"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_in_flight_then_resets_stragglers() {
    let cluster = Cluster::new();
    let mut server = serve(cluster.tls("server"), Bytes::new());
    let client = cluster.client();
    let peer = server.addr();
    echo(&client, peer, "warm").await.unwrap();

    let held = tokio::spawn({
        let client = client.clone();
        async move { client.call::<_, Resp>(peer, &Req::Held).await }
    });
    let stuck = tokio::spawn({
        let client = client.clone();
        async move { client.call::<_, Resp>(peer, &Req::Stall).await }
    });
    // Both requests are being handled.
    server.stalled.recv().await.unwrap();
    server.stalled.recv().await.unwrap();
    server.shutdown.cancel();
    // The held call, answered only after shutdown began, completes within the grace period;
    // the stalled one fails after it (its stream is reset, and the connection closed right
    // after, whichever reaches the client first).
    server.release.notify_one();
    assert_eq!(held.await.unwrap().unwrap(), Resp::Done);
    let err = within(Duration::from_secs(3), "stuck call", stuck)
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Reset { .. } | TransportError::ConnectionLost { .. }
        ),
        "{err}"
    );
    assert!(err.is_unreachable());
    within(Duration::from_secs(3), "serve loop", server.serving)
        .await
        .unwrap();
}

/// Fetches a large body with a sink that pauses after the first chunk, while `kill` runs.
async fn fetch_while<K: std::future::Future<Output = ()>>(
    client: &Endpoint,
    peer: SocketAddr,
    len: u64,
    kill: impl FnOnce() -> K,
) -> Result<Resp, TransportError> {
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let resume = Arc::new(Notify::new());
    let fetch = tokio::spawn({
        let client = client.clone();
        let resume = resume.clone();
        async move {
            let mut started = Some(started_tx);
            let mut received = 0u64;
            let handle = tokio::runtime::Handle::current();
            let mut sink = |_: u64, bytes: &[u8]| {
                received += bytes.len() as u64;
                if let Some(tx) = started.take() {
                    let _ = tx.send(());
                    // Hold the stream mid-body until the server is gone.
                    tokio::task::block_in_place(|| handle.block_on(resume.notified()));
                }
                Ok(())
            };
            let r = client
                .fetch::<_, Resp>(peer, &Req::Range { offset: 0, len }, &mut sink)
                .await;
            (r, received)
        }
    });
    started_rx.await.unwrap();
    kill().await;
    resume.notify_one();
    let (result, received) = within(Duration::from_secs(8), "fetch after server exit", fetch)
        .await
        .unwrap();
    assert!(
        received < len,
        "the whole body arrived; the test did not cut it"
    );
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_closing_mid_body_fails_the_fetch() {
    let cluster = Cluster::new();
    let len = 48u64 << 20;
    let server = serve(cluster.tls("server"), pattern(len as usize));
    let client = cluster.client();
    let peer = server.addr();
    let endpoint = server.endpoint.clone();
    let result = fetch_while(&client, peer, len, || async move { endpoint.close().await }).await;
    let err = result.unwrap_err();
    assert!(err.is_unreachable(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_crashing_mid_body_fails_the_fetch() {
    let cluster = Cluster::new();
    let len = 48u64 << 20;
    // The server runs on its own runtime, which is torn down without any goodbye.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut cfg = config(cluster.tls("server"));
    cfg.idle_timeout = Duration::from_secs(1);
    let server = {
        let _guard = server_rt.enter();
        serve_with(cfg, pattern(len as usize))
    };
    let mut client_cfg = config(cluster.tls("client"));
    client_cfg.idle_timeout = Duration::from_secs(1);
    let client = Endpoint::bind(client_cfg).unwrap();
    let peer = server.addr();
    let result = fetch_while(&client, peer, len, || async move {
        drop(server);
        server_rt.shutdown_background();
    })
    .await;
    let err = result.unwrap_err();
    assert!(err.is_unreachable(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_peer_is_reconnected_transparently() {
    let cluster = Cluster::new();
    let server_tls = cluster.tls("server");
    let first_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let first = {
        let _guard = first_rt.enter();
        serve(server_tls.clone(), Bytes::new())
    };
    let addr = first.addr();
    let mut client_cfg = config(cluster.tls("client"));
    client_cfg.idle_timeout = Duration::from_secs(30);
    let client = Endpoint::bind(client_cfg).unwrap();
    echo(&client, addr, "one").await.unwrap();

    // The server dies without a word and comes back on the same address with the same key.
    // Its runtime drops every task unpolled (nothing says goodbye); once that is done, nothing
    // holds its socket and the address can be bound again.
    drop(first);
    within(
        Duration::from_secs(5),
        "server runtime gone",
        tokio::task::spawn_blocking(move || first_rt.shutdown_timeout(Duration::from_secs(5))),
    )
    .await
    .unwrap();
    let mut cfg = config(server_tls);
    cfg.listen = addr;
    let second = Endpoint::bind(cfg).unwrap();
    let (tx, _stalled) = mpsc::channel(1);
    let _serving = second.serve(
        Arc::new(TestService::new(Bytes::new(), tx)),
        CancellationToken::new(),
    );
    // The cached connection is answered with a stateless reset; the call retries on a new one,
    // long before the 30 s idle timeout.
    let resp = within(
        Duration::from_secs(3),
        "call after restart",
        echo(&client, addr, "two"),
    )
    .await
    .unwrap();
    assert_eq!(resp, Resp::Echo("two".into()));
    second.close().await;
}
