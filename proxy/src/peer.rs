//! Proxy to proxy: the network listener other proxies forward calls to, and the forwarders
//! that carry this proxy's calls to other nodes.
//!
//! Both speak the Unix socket's protocol (`CallerFrame`/`ProxyFrame`) over TLS 1.3 on TCP
//! with the cluster's mutual TLS (`shoal_transport::NodeTls`): a connection starts with
//! `Hello { role: Peer }`, the only role the listener takes, and its calls are served by
//! this node's instances only (never forwarded again). `TCP_NODELAY` is set on both ends.
//!
//! Everything here runs as tasks on the engine's own runtime (so a forwarded call costs no
//! extra thread hop): the accept loop, the route feed and registration ([`crate::routes`]),
//! and one forwarder task per node a route leads to. A forwarder owns one connection to its
//! node's proxy, opened on the first call and again after it fails; while a connect has just
//! failed it gives calls back at once ([`Shared::route_bounce`]) instead of trying again for
//! [`RECONNECT_PAUSE`].
use crate::engine::serve_stream;
use crate::routes::{feed_loop, register_loop, RouteTable};
use crate::shared::{ConnState, Forward, Shared, ToPeer};
use crate::{PeerConfig, StartError};
use bytes::BytesMut;
use shoal_meta::records::ProxyRecord;
use shoal_protocol::{
    encode_frame, CallerFrame, ErrorCode, FrameDecoder, ProxyFrame, Role, WireError,
    PROTOCOL_VERSION,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Longest wait for a TCP connect plus TLS handshake to another proxy.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for an accepted peer's TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed connect, calls to that node are given back at once for this long.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);
/// Invokes queued towards one forwarder at most; beyond, they are given back unstarted.
const FORWARD_QUEUE: usize = 4096;
/// Frames encoded into one write at most.
const WRITE_BATCH: usize = 64;

/// The forwarders, one per node a route leads to.
pub(crate) struct Forwarders {
    me: String,
    connector: TlsConnector,
    max_frame: usize,
    by_node: HashMap<String, (SocketAddr, mpsc::Sender<ToPeer>)>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl std::fmt::Debug for Forwarders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarders")
            .field("me", &self.me)
            .field("nodes", &self.by_node.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Forwarders {
    /// The forwarder of `node` if it leads to `addr`.
    pub(crate) fn get(&self, node: &str, addr: SocketAddr) -> Option<mpsc::Sender<ToPeer>> {
        self.by_node
            .get(node)
            .filter(|(a, _)| *a == addr)
            .map(|(_, tx)| tx.clone())
    }

    /// Lets go of the forwarders of nodes `keep` says no; each ends once its calls in flight
    /// are answered.
    pub(crate) fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.by_node.retain(|node, _| keep(node));
    }

    /// Starts a forwarder to `node`'s proxy at `addr` (replacing any older one of that node).
    pub(crate) fn spawn(
        &mut self,
        shared: &Arc<Shared>,
        node: &str,
        addr: SocketAddr,
    ) -> mpsc::Sender<ToPeer> {
        let (tx, rx) = mpsc::channel(FORWARD_QUEUE);
        let f = Forwarder {
            shared: shared.clone(),
            me: self.me.clone(),
            node: node.to_owned(),
            addr,
            connector: self.connector.clone(),
            max_frame: self.max_frame,
            stop: self.stop.clone(),
        };
        self.tasks.spawn(f.run(rx));
        self.by_node.insert(node.to_owned(), (addr, tx.clone()));
        tx
    }
}

/// The network side of a proxy, bound and ready to run on the engine's runtime.
pub(crate) struct PeerSetup {
    pub(crate) addr: SocketAddr,
    listener: std::net::TcpListener,
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    cfg: PeerConfig,
}

impl std::fmt::Debug for PeerSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSetup")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl PeerSetup {
    /// Builds the TLS configurations and binds the listener (so errors surface at start).
    pub(crate) fn bind(cfg: PeerConfig) -> Result<PeerSetup, StartError> {
        let tls_err = |e: shoal_transport::PkiError| StartError::Tls(e.to_string());
        let acceptor = TlsAcceptor::from(cfg.tls.server_config().map_err(tls_err)?);
        let connector = TlsConnector::from(cfg.tls.client_config().map_err(tls_err)?);
        let peer_err = |source| StartError::Peer {
            addr: cfg.listen,
            source,
        };
        let listener = std::net::TcpListener::bind(cfg.listen).map_err(peer_err)?;
        let addr = listener.local_addr().map_err(peer_err)?;
        listener
            .set_nonblocking(true)
            .map_err(StartError::Runtime)?;
        Ok(PeerSetup {
            addr,
            listener,
            acceptor,
            connector,
            cfg,
        })
    }

    /// A second handle on the same listener (for an engine start that may fail).
    pub(crate) fn try_clone(&self) -> Result<PeerSetup, StartError> {
        Ok(PeerSetup {
            addr: self.addr,
            listener: self.listener.try_clone().map_err(StartError::Runtime)?,
            acceptor: self.acceptor.clone(),
            connector: self.connector.clone(),
            cfg: self.cfg.clone(),
        })
    }
}

/// Runs the network side until `stop`: registration, route feed and the accept loop, each
/// tracked by `tasks` (the engine waits for them at shutdown).
pub(crate) async fn run(
    shared: Arc<Shared>,
    setup: PeerSetup,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let PeerSetup {
        addr,
        listener,
        acceptor,
        connector,
        cfg,
    } = setup;
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the peer listener");
            return;
        }
    };
    let me = shared.cfg.node_id.clone();
    let forwarders = Forwarders {
        me: me.clone(),
        connector,
        max_frame: shared.cfg.max_frame,
        by_node: HashMap::new(),
        tasks: tasks.clone(),
        stop: stop.clone(),
    };
    let record = ProxyRecord {
        node_id: me.clone(),
        peer_addr: cfg.advertise.unwrap_or(addr),
    };
    // `Proxy::start` refuses a peer config without a store.
    let Some(meta) = shared.cfg.meta.clone() else {
        tracing::error!("forwarding needs a metadata store");
        return;
    };
    tasks.spawn(register_loop(
        meta.clone(),
        record,
        cfg.lease_ttl,
        stop.clone(),
    ));
    let table = RouteTable::new(shared.clone(), forwarders);
    tasks.spawn(feed_loop(meta, table, me, stop.clone()));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok((tcp, from)) => {
                    tasks.spawn(accept_peer(shared.clone(), acceptor.clone(), tcp, from));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "peer accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

async fn accept_peer(
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    from: SocketAddr,
) {
    let _ = tcp.set_nodelay(true);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => serve_stream(shared, tls, ConnState::network()).await,
        Ok(Err(e)) => tracing::warn!(peer = %from, error = %e, "peer TLS handshake failed"),
        Err(_) => tracing::warn!(peer = %from, "peer TLS handshake timed out"),
    }
}

type PeerStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Carries invokes to one node's proxy.
struct Forwarder {
    shared: Arc<Shared>,
    me: String,
    node: String,
    addr: SocketAddr,
    connector: TlsConnector,
    max_frame: usize,
    stop: CancellationToken,
}

/// Whether a peer's error means the call never reached an instance there (so another may
/// take it): no local instance of the function, or a full queue.
fn never_started(e: &WireError) -> bool {
    matches!(e.code, ErrorCode::NotFound | ErrorCode::Overloaded)
}

impl Forwarder {
    async fn run(self, mut rx: mpsc::Receiver<ToPeer>) {
        let mut paused_until: Option<tokio::time::Instant> = None;
        loop {
            let first = tokio::select! {
                _ = self.stop.cancelled() => return,
                f = rx.recv() => match f {
                    Some(ToPeer::Call(f)) => f,
                    // No connection, so not the one its call went on: the peer released
                    // it when that one ended.
                    Some(ToPeer::Release(_)) => continue,
                    None => return,
                },
            };
            if paused_until.is_some_and(|t| tokio::time::Instant::now() < t) {
                self.give_back(first, &mut rx, "is unreachable (recent connect failed)");
                continue;
            }
            let stream = match tokio::time::timeout(CONNECT_TIMEOUT, self.connect()).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(node = %self.node, addr = %self.addr, error = %e, "cannot reach the peer proxy");
                    paused_until = Some(tokio::time::Instant::now() + RECONNECT_PAUSE);
                    self.give_back(first, &mut rx, &format!("is unreachable: {e}"));
                    continue;
                }
                Err(_) => {
                    tracing::warn!(node = %self.node, addr = %self.addr, "connecting to the peer proxy timed out");
                    paused_until = Some(tokio::time::Instant::now() + RECONNECT_PAUSE);
                    self.give_back(first, &mut rx, "is unreachable: connect timed out");
                    continue;
                }
            };
            paused_until = None;
            let mut inflight = HashMap::new();
            let r = self.session(stream, first, &mut rx, &mut inflight).await;
            if let Err(e) = &r {
                tracing::warn!(node = %self.node, error = %e, "peer proxy connection lost");
            }
            let why = match r {
                Ok(()) => "proxy stopped forwarding".to_string(),
                Err(e) => e,
            };
            for (id, route) in inflight {
                self.shared.route_result(
                    route,
                    id,
                    Err(WireError::new(
                        ErrorCode::Unavailable,
                        format!(
                            "connection to node {}'s proxy lost mid-call: {why}",
                            self.node
                        ),
                    )),
                );
            }
            if rx.is_closed() && rx.is_empty() {
                return;
            }
        }
    }

    /// Gives `first` and every queued invoke back to the router unstarted.
    fn give_back(&self, first: Forward, rx: &mut mpsc::Receiver<ToPeer>, why: &str) {
        let e = WireError::new(
            ErrorCode::Unavailable,
            format!("node {}'s proxy at {} {why}", self.node, self.addr),
        );
        self.shared.route_bounce(first.route, first.id, e.clone());
        while let Ok(f) = rx.try_recv() {
            if let ToPeer::Call(f) = f {
                self.shared.route_bounce(f.route, f.id, e.clone());
            }
        }
    }

    async fn connect(&self) -> Result<PeerStream, String> {
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(shoal_transport::SERVER_NAME)
            .map_err(|e| e.to_string())?
            .to_owned();
        self.connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))
    }

    /// Runs one connection: hello, then invokes out and replies in, until it fails, `stop`,
    /// or the queue is closed with nothing in flight. `inflight` maps call ids to routes.
    async fn session(
        &self,
        stream: PeerStream,
        first: Forward,
        rx: &mut mpsc::Receiver<ToPeer>,
        inflight: &mut HashMap<u64, u64>,
    ) -> Result<(), String> {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let decoder = FrameDecoder::new(self.max_frame);
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut out = Vec::new();
        let hello = CallerFrame::Hello {
            version: PROTOCOL_VERSION,
            role: Role::Peer {
                node_id: self.me.clone(),
            },
            token: None,
        };
        encode_frame(&hello, &mut out).map_err(|e| e.to_string())?;
        wr.write_all(&out).await.map_err(|e| e.to_string())?;
        loop {
            if let Some(f) = decoder
                .decode::<ProxyFrame>(&mut buf)
                .map_err(|e| e.to_string())?
            {
                match f {
                    ProxyFrame::Welcome { .. } => break,
                    ProxyFrame::Refused(e) => return Err(format!("refused: {e}")),
                    _ => return Err("expected Welcome".into()),
                }
            }
            buf.reserve(64 * 1024);
            if rd.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                return Err("closed during hello".into());
            }
        }
        let mut pending = Some(ToPeer::Call(first));
        let mut closed = false;
        loop {
            if let Some(f) = pending.take() {
                out.clear();
                let mut next = Some(f);
                let mut n = 0;
                while let Some(f) = next {
                    let frame = match f {
                        ToPeer::Call(f) => {
                            inflight.insert(f.id, f.route);
                            CallerFrame::Call {
                                id: f.id,
                                function: f.function,
                                instance: f.target,
                                args: f.args,
                                timeout_ms: f.timeout_ms,
                                trace_id: f.trace_id,
                            }
                        }
                        ToPeer::Release(id) => CallerFrame::Release { id },
                    };
                    encode_frame(&frame, &mut out).map_err(|e| e.to_string())?;
                    n += 1;
                    next = if n < WRITE_BATCH {
                        rx.try_recv().ok()
                    } else {
                        None
                    };
                }
                wr.write_all(&out).await.map_err(|e| e.to_string())?;
            }
            if closed && inflight.is_empty() {
                return Ok(());
            }
            buf.reserve(64 * 1024);
            tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                f = rx.recv(), if !closed => match f {
                    Some(f) => pending = Some(f),
                    None => closed = true,
                },
                n = rd.read_buf(&mut buf) => {
                    if n.map_err(|e| e.to_string())? == 0 {
                        return Err("closed by the peer".into());
                    }
                    while let Some(frame) = decoder
                        .decode::<ProxyFrame>(&mut buf)
                        .map_err(|e| e.to_string())?
                    {
                        let ProxyFrame::Reply { id, result } = frame else {
                            return Err("unexpected frame from the peer".into());
                        };
                        let Some(route) = inflight.remove(&id) else {
                            continue;
                        };
                        match result {
                            Err(e) if never_started(&e) => {
                                self.shared.route_bounce(route, id, e);
                            }
                            r => self.shared.route_result(route, id, r),
                        }
                    }
                }
            }
        }
    }
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("node", &self.node)
            .field("addr", &self.addr)
            .finish()
    }
}
