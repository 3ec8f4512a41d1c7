//! The QUIC endpoint: one UDP socket that is both client (cached connections to peers) and server
//! (an accept loop dispatching streams to a [`Service`]).
//!
//! Invariants:
//! - One bidirectional stream carries exactly one request and its reply (see `wire`).
//! - At most one cached outbound connection per peer address; concurrent first calls share one
//!   handshake, and a failed handshake is reported to every caller that waited for it.
//! - Every server-side connection and stream runs in a task tracked by the serve loop; shutdown
//!   stops accepting, waits up to `shutdown_grace` for in-flight streams, then resets the rest.
//! - A server stream that ends without completing its reply (handler panic, shutdown, task
//!   dropped) is reset, never finished, so a client can't mistake a partial reply for a whole one.
//! - Reply bodies are handed to QUIC without copying; the [`Body`] is dropped once every byte is
//!   acknowledged or the stream is abandoned.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, IdleTimeout, ReadError, RecvStream, SendStream, VarInt, WriteError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::pki::{NodeTls, PkiError, SERVER_NAME};
use crate::wire::{self, close, reset, FrameError};

/// Congestion controller used on every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Congestion {
    /// CUBIC (RFC 8312), quinn's default.
    Cubic,
    /// NewReno (RFC 6582).
    NewReno,
    /// BBR (quinn's experimental implementation).
    Bbr,
}

/// Configuration of an [`Endpoint`]. Build it with [`TransportConfig::new`] and adjust fields.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// UDP address to bind (both for serving and for outbound connections).
    pub listen: SocketAddr,
    /// The node's TLS material.
    pub tls: NodeTls,
    /// A connection with no traffic for this long is dead (keep-alives count as traffic).
    pub idle_timeout: Duration,
    /// Interval of keep-alive packets on idle connections; zero disables them.
    pub keep_alive: Duration,
    /// Upper bound on establishing a connection (UDP path + TLS handshake).
    pub connect_timeout: Duration,
    /// Server side: upper bound on receiving a request frame once its stream is open.
    pub request_timeout: Duration,
    /// Server side: how long shutdown waits for in-flight streams before resetting them.
    pub shutdown_grace: Duration,
    /// Concurrent requests (bidirectional streams) a peer may have open on one connection.
    pub max_concurrent_streams: u32,
    /// Server side: accepted connections above this number are refused.
    pub max_connections: usize,
    /// Largest request or response frame (postcard body), in bytes; bodies are not limited.
    pub max_frame: usize,
    /// Bytes a peer may send on one stream ahead of what the application has read (at most
    /// `receive_window`).
    pub stream_receive_window: u64,
    /// Bytes a peer may send on one connection, all streams together, ahead of the application.
    /// On loopback paths it is capped to fit the UDP socket's receive buffer.
    pub receive_window: u64,
    /// Bytes of unacknowledged application data buffered per connection for sending.
    pub send_window: u64,
    /// Requested `SO_RCVBUF` / `SO_SNDBUF` of the UDP socket (the kernel may cap it).
    pub socket_buffer: usize,
    /// UDP payload size used before path MTU discovery has run, on non-loopback paths.
    pub initial_mtu: u16,
    /// UDP payload size used from the start on loopback paths (loopback carries 64 KiB datagrams;
    /// at most 65488 for IPv6). Datagrams above 6553 bytes are sent one per syscall.
    pub loopback_mtu: u16,
    /// Upper bound of path MTU discovery on non-loopback paths (largest UDP payload probed). Up to
    /// 6553, quinn batches 10 datagrams per send (GSO); above, it sends one datagram per syscall.
    pub mtu_upper_bound: u16,
    /// Congestion controller.
    pub congestion: Congestion,
    /// Initial congestion window in bytes (`None`: ten datagrams of the path's initial MTU, at
    /// least 14720 bytes).
    pub initial_window: Option<u64>,
    /// Round-robin between streams of a connection (`false`: send streams in order).
    pub send_fairness: bool,
}

impl TransportConfig {
    /// A configuration with defaults tuned for a data-centre network and for loopback.
    pub fn new(listen: SocketAddr, tls: NodeTls) -> TransportConfig {
        TransportConfig {
            listen,
            tls,
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            max_concurrent_streams: 256,
            max_connections: 1024,
            max_frame: 1 << 20,
            stream_receive_window: 8 << 20,
            receive_window: 16 << 20,
            send_window: 16 << 20,
            socket_buffer: 8 << 20,
            initial_mtu: 1200,
            loopback_mtu: 65_000,
            mtu_upper_bound: 6_500,
            congestion: Congestion::Cubic,
            initial_window: None,
            send_fairness: true,
        }
    }
}

/// Errors of the transport, named after the step that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// [`Endpoint::bind`] was called outside a Tokio runtime.
    #[error("binding the endpoint: no Tokio runtime")]
    NoRuntime,
    /// A configuration value is out of range.
    #[error("invalid transport configuration: {field}: {reason}")]
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The TLS material could not be turned into configurations.
    #[error("building the TLS configuration: {0}")]
    Tls(#[from] PkiError),
    /// The TLS configuration lacks the cipher suite QUIC needs.
    #[error("building the QUIC TLS configuration: {0}")]
    QuicTls(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// Binding or configuring the UDP socket failed.
    #[error("binding UDP {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The IO error.
        #[source]
        source: io::Error,
    },
    /// A connection could not be started (bad address, endpoint closing).
    #[error("connecting to {peer}: {source}")]
    Connect {
        /// The peer.
        peer: SocketAddr,
        /// quinn's reason.
        #[source]
        source: quinn::ConnectError,
    },
    /// The connection was not established within `connect_timeout`.
    #[error("connecting to {peer}: no handshake within {after:?}")]
    ConnectTimeout {
        /// The peer.
        peer: SocketAddr,
        /// The timeout.
        after: Duration,
    },
    /// The handshake failed for a reason other than certificate refusal.
    #[error("handshake with {peer}: {source}")]
    Handshake {
        /// The peer.
        peer: SocketAddr,
        /// quinn's reason.
        #[source]
        source: ConnectionError,
    },
    /// TLS refused the connection: a certificate not signed by the cluster CA, or none.
    #[error("TLS with {peer} refused: {source}")]
    Refused {
        /// The peer.
        peer: SocketAddr,
        /// quinn's reason (carries the TLS alert).
        #[source]
        source: ConnectionError,
    },
    /// The connection failed during the exchange (peer gone, timed out, reset, closed).
    #[error("connection to {peer} lost: {source}")]
    ConnectionLost {
        /// The peer.
        peer: SocketAddr,
        /// quinn's reason.
        #[source]
        source: ConnectionError,
    },
    /// The connection was closed locally: [`Endpoint::disconnect`] or [`Endpoint::close`].
    #[error("connection to {peer} closed locally")]
    Closed {
        /// The peer.
        peer: SocketAddr,
    },
    /// The peer reset the reply stream (e.g. it shut down or its handler failed).
    #[error("{peer} reset the stream (code {code})")]
    Reset {
        /// The peer.
        peer: SocketAddr,
        /// The reset code.
        code: u64,
    },
    /// The peer stopped reading the request.
    #[error("{peer} stopped reading the request (code {code})")]
    Stopped {
        /// The peer.
        peer: SocketAddr,
        /// The stop code.
        code: u64,
    },
    /// A frame exceeds `max_frame` (an outgoing request, or a response; the latter closes the
    /// connection).
    #[error("frame of {len} bytes to/from {peer} exceeds the limit of {max}")]
    FrameTooLarge {
        /// The peer.
        peer: SocketAddr,
        /// The frame length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// The peer's reply violates the framing; the connection has been closed.
    #[error("malformed reply from {peer}: {reason}")]
    Malformed {
        /// The peer.
        peer: SocketAddr,
        /// What was wrong.
        reason: &'static str,
    },
    /// The request could not be encoded.
    #[error("encoding the request: {0}")]
    Encode(#[source] postcard::Error),
    /// The reply frame could not be decoded; the connection has been closed.
    #[error("decoding the reply from {peer}: {source}")]
    Decode {
        /// The peer.
        peer: SocketAddr,
        /// postcard's reason.
        #[source]
        source: postcard::Error,
    },
    /// [`Endpoint::call`] got a reply with a body; use [`Endpoint::fetch`] for such requests.
    #[error("reply from {peer} carries an unexpected body of {len} bytes")]
    UnexpectedBody {
        /// The peer.
        peer: SocketAddr,
        /// The announced body length.
        len: u64,
    },
    /// The reply stream ended before the announced body length.
    #[error("body from {peer} truncated: {received} of {expected} bytes")]
    BodyTruncated {
        /// The peer.
        peer: SocketAddr,
        /// The announced length.
        expected: u64,
        /// What arrived.
        received: u64,
    },
    /// The caller's sink failed; the stream has been stopped.
    #[error("writing the body from {peer} to the sink: {source}")]
    Sink {
        /// The peer.
        peer: SocketAddr,
        /// The sink's error.
        #[source]
        source: io::Error,
    },
}

impl TransportError {
    /// Whether the peer is gone, unreachable or timed out (so the caller may try another node),
    /// as opposed to a refusal, a protocol error or a local failure.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            TransportError::Connect { .. }
                | TransportError::ConnectTimeout { .. }
                | TransportError::Handshake { .. }
                | TransportError::ConnectionLost { .. }
                | TransportError::Closed { .. }
                | TransportError::Reset { .. }
                | TransportError::BodyTruncated { .. }
        )
    }
}

/// Is this a TLS alert (certificate refused, no certificate, ...)?
fn is_tls_refusal(e: &ConnectionError) -> bool {
    let crypto = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
    match e {
        ConnectionError::ConnectionClosed(c) => crypto(c.error_code),
        ConnectionError::TransportError(t) => crypto(t.code),
        _ => false,
    }
}

fn lost(peer: SocketAddr, e: ConnectionError) -> TransportError {
    if is_tls_refusal(&e) {
        TransportError::Refused { peer, source: e }
    } else if e == ConnectionError::LocallyClosed {
        TransportError::Closed { peer }
    } else {
        TransportError::ConnectionLost { peer, source: e }
    }
}

fn read_err(peer: SocketAddr, e: ReadError) -> TransportError {
    match e {
        ReadError::Reset(code) => TransportError::Reset {
            peer,
            code: wire::code(code),
        },
        ReadError::ConnectionLost(e) => lost(peer, e),
        // We never stop, read unordered, or use 0-RTT: only a local close leads here.
        ReadError::ClosedStream | ReadError::IllegalOrderedRead | ReadError::ZeroRttRejected => {
            TransportError::Closed { peer }
        }
    }
}

fn write_err(peer: SocketAddr, e: WriteError) -> TransportError {
    match e {
        WriteError::Stopped(code) => TransportError::Stopped {
            peer,
            code: wire::code(code),
        },
        WriteError::ConnectionLost(e) => lost(peer, e),
        WriteError::ClosedStream | WriteError::ZeroRttRejected => TransportError::Closed { peer },
    }
}

/// A request handler run by [`Endpoint::serve`], once per incoming stream.
#[async_trait::async_trait]
pub trait Service: Send + Sync + 'static {
    /// The request type.
    type Req: DeserializeOwned + Send;
    /// The response type.
    type Resp: Serialize + Send;
    /// Handles one request from `peer`. The future is dropped if the client abandons the request
    /// or the server's shutdown grace expires.
    async fn handle(&self, peer: SocketAddr, req: Self::Req) -> Reply<Self::Resp>;
}

/// Bytes streamed after a response frame. The server drops the body once every byte has been
/// acknowledged by the client or the stream has been abandoned.
///
/// `bytes` must return the same slice every time it is called (it is read once, then the slice is
/// referenced until the body is dropped).
pub trait Body: Send + Sync {
    /// The body's bytes.
    fn bytes(&self) -> &[u8];
}

impl Body for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl Body for Box<[u8]> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl Body for Bytes {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl Body for &'static [u8] {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// Adapts a [`Body`] to `Bytes::from_owner`.
struct BodyOwner(Box<dyn Body>);

impl AsRef<[u8]> for BodyOwner {
    fn as_ref(&self) -> &[u8] {
        self.0.bytes()
    }
}

/// A handler's reply: the response, and optionally a raw body streamed after it.
pub struct Reply<R> {
    /// The response frame.
    pub resp: R,
    /// The raw body, if any.
    pub body: Option<Box<dyn Body>>,
}

impl<R> Reply<R> {
    /// A reply without body.
    pub fn new(resp: R) -> Reply<R> {
        Reply { resp, body: None }
    }

    /// A reply with a body.
    pub fn with_body(resp: R, body: impl Body + 'static) -> Reply<R> {
        Reply {
            resp,
            body: Some(Box::new(body)),
        }
    }
}

impl<R: fmt::Debug> fmt::Debug for Reply<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reply")
            .field("resp", &self.resp)
            .field("body_len", &self.body.as_ref().map(|b| b.bytes().len()))
            .finish()
    }
}

/// Why a shared connection attempt failed (cloneable, so every waiter gets it).
#[derive(Debug, Clone)]
enum ConnectFailure {
    Start(quinn::ConnectError),
    Timeout(Duration),
    Handshake(ConnectionError),
    Disconnected,
}

impl ConnectFailure {
    fn into_error(self, peer: SocketAddr) -> TransportError {
        match self {
            ConnectFailure::Start(quinn::ConnectError::EndpointStopping) => {
                TransportError::Closed { peer }
            }
            ConnectFailure::Start(source) => TransportError::Connect { peer, source },
            ConnectFailure::Timeout(after) => TransportError::ConnectTimeout { peer, after },
            ConnectFailure::Handshake(e) if is_tls_refusal(&e) => {
                TransportError::Refused { peer, source: e }
            }
            ConnectFailure::Handshake(e) => TransportError::Handshake { peer, source: e },
            ConnectFailure::Disconnected => TransportError::Closed { peer },
        }
    }
}

/// One cached outbound connection (or the attempt to make it).
struct Slot {
    conn: OnceCell<Result<quinn::Connection, ConnectFailure>>,
    /// Cancelled by `disconnect`: aborts the handshake, if still running.
    cancel: CancellationToken,
}

impl Slot {
    fn is_dead(&self) -> bool {
        match self.conn.get() {
            None => false,
            Some(Ok(c)) => c.close_reason().is_some(),
            Some(Err(_)) => true,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    max_frame: usize,
    connect_timeout: Duration,
    request_timeout: Duration,
    shutdown_grace: Duration,
    max_connections: usize,
}

struct Inner {
    quinn: quinn::Endpoint,
    local_addr: SocketAddr,
    client: quinn::ClientConfig,
    client_loopback: quinn::ClientConfig,
    server_loopback: Arc<quinn::ServerConfig>,
    conns: Mutex<HashMap<SocketAddr, Arc<Slot>>>,
    limits: Limits,
}

/// A QUIC endpoint: one UDP socket, both client and server. Cheap to clone.
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("local_addr", &self.inner.local_addr)
            .finish_non_exhaustive()
    }
}

fn varint(field: &'static str, v: u64) -> Result<VarInt, TransportError> {
    VarInt::from_u64(v).map_err(|_| TransportError::InvalidConfig {
        field,
        reason: "exceeds 2^62",
    })
}

/// quinn sends at most this many datagrams in one GSO batch.
const GSO_BATCH: u32 = 10;
/// A GSO batch must fit one 64 KiB UDP send; the kernel refuses larger ones (EMSGSIZE), and quinn
/// drops what it can't send.
const MAX_GSO_SEND: u32 = 65_535;

fn quinn_transport(
    cfg: &TransportConfig,
    peer_streams: u32,
    loopback: bool,
    socket_rcvbuf: usize,
) -> Result<quinn::TransportConfig, TransportError> {
    let (mtu, upper) = if loopback {
        (cfg.loopback_mtu, cfg.loopback_mtu)
    } else {
        (cfg.initial_mtu, cfg.mtu_upper_bound.max(cfg.initial_mtu))
    };
    let mut receive_window = cfg.receive_window;
    if loopback {
        // On loopback the sender is as fast as the receiver's socket can be filled: a window larger
        // than the socket buffer only overflows it (self-inflicted loss). The kernel reports twice
        // the usable size and charges per-datagram overhead, hence 5/8.
        let cap = (socket_rcvbuf as u64 / 8 * 5).max(256 << 10);
        receive_window = receive_window.min(cap);
    }
    let stream_receive_window = cfg.stream_receive_window.min(receive_window);
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(peer_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .max_idle_timeout(Some(IdleTimeout::try_from(cfg.idle_timeout).map_err(
            |_| TransportError::InvalidConfig {
                field: "idle_timeout",
                reason: "too large",
            },
        )?))
        .keep_alive_interval((!cfg.keep_alive.is_zero()).then_some(cfg.keep_alive))
        .stream_receive_window(varint("stream_receive_window", stream_receive_window)?)
        .receive_window(varint("receive_window", receive_window)?)
        .send_window(cfg.send_window)
        .send_fairness(cfg.send_fairness)
        .datagram_receive_buffer_size(None)
        .initial_mtu(mtu)
        .min_mtu(1200)
        // Large datagrams are sent one per syscall instead.
        .enable_segmentation_offload(u32::from(upper) * GSO_BATCH <= MAX_GSO_SEND);
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.upper_bound(upper);
    t.mtu_discovery_config(Some(mtud));
    // The controllers' default initial window (14720 bytes) is smaller than one large datagram,
    // which would stall a connection that starts with a large MTU: scale it with the MTU (IW10).
    let window = cfg
        .initial_window
        .unwrap_or_else(|| (10 * u64::from(mtu)).max(14_720));
    use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
    match cfg.congestion {
        Congestion::Cubic => {
            let mut c = CubicConfig::default();
            c.initial_window(window);
            t.congestion_controller_factory(Arc::new(c))
        }
        Congestion::NewReno => {
            let mut c = NewRenoConfig::default();
            c.initial_window(window);
            t.congestion_controller_factory(Arc::new(c))
        }
        Congestion::Bbr => {
            let mut c = BbrConfig::default();
            c.initial_window(window);
            t.congestion_controller_factory(Arc::new(c))
        }
    };
    Ok(t)
}

/// Stateless-reset key derived from the node's private key, so that a restarted node resets
/// connections of its previous incarnation at once instead of leaving peers to time out.
struct ResetKey {
    hkdf: &'static dyn rustls::crypto::tls13::Hkdf,
    key: rustls::crypto::tls13::OkmBlock,
}

impl ResetKey {
    fn derive(secret: &[u8]) -> Option<ResetKey> {
        let rustls::SupportedCipherSuite::Tls13(suite) =
            rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        else {
            return None;
        };
        let hkdf = suite.hkdf_provider;
        let key = hkdf
            .extract_from_secret(Some(b"shoal transport stateless reset v1"), secret)
            .expand_block(&[b"quic reset key"]);
        Some(ResetKey { hkdf, key })
    }
}

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let tag = self.hkdf.hmac_sign(&self.key, data);
        let tag = tag.as_ref();
        let n = tag.len().min(signature_out.len());
        signature_out[..n].copy_from_slice(&tag[..n]);
    }

    fn signature_len(&self) -> usize {
        self.hkdf.hmac_sign(&self.key, b"").as_ref().len()
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        let tag = self.hkdf.hmac_sign(&self.key, data);
        let tag = tag.as_ref();
        let diff = tag.len() ^ signature.len();
        let acc = tag
            .iter()
            .zip(signature)
            .fold(u8::from(diff != 0), |acc, (a, b)| acc | (a ^ b));
        if acc == 0 {
            Ok(())
        } else {
            Err(quinn::crypto::CryptoError)
        }
    }
}

/// Binds the UDP socket; returns it with its effective receive buffer size (as the kernel reports
/// it: twice the usable size).
/// Random 8-byte connection ids. Unlike quinn's default generator it accepts every id as
/// plausible, so that a restarted node answers packets of its previous incarnation with a
/// stateless reset (quinn's default validates ids with a per-process key, and stays silent).
struct CidGenerator {
    rng: &'static dyn rustls::crypto::SecureRandom,
    fallback_counter: u64,
}

impl quinn::ConnectionIdGenerator for CidGenerator {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut id = [0u8; 8];
        if self.rng.fill(&mut id).is_err() {
            // The OS random source failed: fall back to a counter mixed with the clock (ids need
            // to be unique and unguessable by off-path attackers, not secret).
            self.fallback_counter += 1;
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            id = (nanos.rotate_left(17)
                ^ self.fallback_counter.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .to_le_bytes();
        }
        quinn::ConnectionId::new(&id)
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

fn bind_socket(cfg: &TransportConfig) -> Result<(UdpSocket, usize), TransportError> {
    let addr = cfg.listen;
    let err = |source| TransportError::Bind { addr, source };
    let socket = UdpSocket::bind(addr).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into()).map_err(err)?;
    // Best effort: the kernel caps the sizes at net.core.{r,w}mem_max.
    if let Err(e) = state.set_recv_buffer_size((&socket).into(), cfg.socket_buffer) {
        tracing::debug!(%addr, error = %e, "setting SO_RCVBUF failed");
    }
    if let Err(e) = state.set_send_buffer_size((&socket).into(), cfg.socket_buffer) {
        tracing::debug!(%addr, error = %e, "setting SO_SNDBUF failed");
    }
    let rcvbuf = state.recv_buffer_size((&socket).into()).unwrap_or(0);
    if rcvbuf < cfg.socket_buffer {
        tracing::info!(
            %addr,
            requested = cfg.socket_buffer,
            got = rcvbuf,
            "UDP receive buffer capped by the kernel (net.core.rmem_max); loopback windows shrink"
        );
    }
    tracing::debug!(
        %addr,
        recv_buffer = rcvbuf,
        send_buffer = ?state.send_buffer_size((&socket).into()).ok(),
        gso_segments = state.max_gso_segments(),
        "UDP socket bound"
    );
    Ok((socket, rcvbuf))
}

impl Endpoint {
    /// Binds the UDP socket and starts the QUIC endpoint. Must be called inside a Tokio runtime.
    /// The endpoint accepts connections only once [`Endpoint::serve`] runs.
    pub fn bind(cfg: TransportConfig) -> Result<Endpoint, TransportError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(TransportError::NoRuntime);
        }
        if cfg.max_frame > u32::MAX as usize {
            return Err(TransportError::InvalidConfig {
                field: "max_frame",
                reason: "exceeds u32::MAX",
            });
        }
        let (socket, rcvbuf) = bind_socket(&cfg)?;
        let server_crypto = Arc::new(QuicServerConfig::try_from(cfg.tls.quic_server_config()?)?);
        let client_crypto = Arc::new(QuicClientConfig::try_from(cfg.tls.quic_client_config()?)?);
        let server_config = |loopback| -> Result<quinn::ServerConfig, TransportError> {
            let mut s = quinn::ServerConfig::with_crypto(server_crypto.clone());
            s.transport_config(Arc::new(quinn_transport(
                &cfg,
                cfg.max_concurrent_streams,
                loopback,
                rcvbuf,
            )?))
            .migration(false);
            Ok(s)
        };
        let client_config = |loopback| -> Result<quinn::ClientConfig, TransportError> {
            let mut c = quinn::ClientConfig::new(client_crypto.clone());
            c.transport_config(Arc::new(quinn_transport(&cfg, 0, loopback, rcvbuf)?));
            Ok(c)
        };
        let server = server_config(false)?;
        let server_loopback = Arc::new(server_config(true)?);
        let client = client_config(false)?;
        let client_loopback = client_config(true)?;

        let mut endpoint_config = match ResetKey::derive(cfg.tls.key_der()) {
            Some(key) => quinn::EndpointConfig::new(Arc::new(key)),
            None => quinn::EndpointConfig::default(),
        };
        let rng = crate::pki::crypto_provider().secure_random;
        endpoint_config.cid_generator(move || {
            Box::new(CidGenerator {
                rng,
                fallback_counter: 0,
            })
        });
        endpoint_config
            .max_udp_payload_size(cfg.mtu_upper_bound.max(cfg.loopback_mtu).max(1200))
            .map_err(|_| TransportError::InvalidConfig {
                field: "mtu_upper_bound",
                reason: "not a valid UDP payload size",
            })?;

        let local_addr = socket.local_addr().map_err(|source| TransportError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let quinn = quinn::Endpoint::new(
            endpoint_config,
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| TransportError::Bind {
            addr: cfg.listen,
            source,
        })?;
        Ok(Endpoint {
            inner: Arc::new(Inner {
                quinn,
                local_addr,
                client,
                client_loopback,
                server_loopback,
                conns: Mutex::new(HashMap::new()),
                limits: Limits {
                    max_frame: cfg.max_frame,
                    connect_timeout: cfg.connect_timeout,
                    request_timeout: cfg.request_timeout,
                    shutdown_grace: cfg.shutdown_grace,
                    max_connections: cfg.max_connections,
                },
            }),
        })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Runs the accept loop until `shutdown` is cancelled (or the endpoint is closed). Each
    /// connection and each stream is a task tracked by the loop; on shutdown the loop stops
    /// accepting, waits up to `shutdown_grace` for in-flight streams, resets what is left, closes
    /// its connections and returns.
    pub fn serve<S: Service>(
        &self,
        svc: Arc<S>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(serve_loop(self.inner.clone(), svc, shutdown))
    }

    /// Sends `req` to `peer` on a new stream and returns the decoded response. A reply with a body
    /// is an error ([`TransportError::UnexpectedBody`]).
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        peer: SocketAddr,
        req: &Req,
    ) -> Result<Resp, TransportError> {
        let (resp, body_len, mut recv, conn) = self.exchange(peer, req).await?;
        if body_len != 0 {
            let _ = recv.stop(reset::CANCELLED);
            return Err(TransportError::UnexpectedBody {
                peer,
                len: body_len,
            });
        }
        expect_end(peer, &conn, &mut recv).await?;
        Ok(resp)
    }

    /// Sends `req` to `peer` and returns the decoded response after streaming the reply's body
    /// into `sink(offset_in_body, bytes)` as it arrives. Fails if the body ends before its
    /// announced length. Several fetches to one peer run in parallel on one connection.
    pub async fn fetch<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        peer: SocketAddr,
        req: &Req,
        sink: &mut (dyn FnMut(u64, &[u8]) -> io::Result<()> + Send),
    ) -> Result<Resp, TransportError> {
        let (resp, body_len, mut recv, conn) = self.exchange(peer, req).await?;
        let mut received = 0u64;
        while received < body_len {
            let remaining = usize::try_from(body_len - received).unwrap_or(usize::MAX);
            match recv.read_chunk(remaining, true).await {
                Ok(Some(chunk)) => {
                    if let Err(source) = sink(received, &chunk.bytes) {
                        let _ = recv.stop(reset::CANCELLED);
                        return Err(TransportError::Sink { peer, source });
                    }
                    received += chunk.bytes.len() as u64;
                }
                Ok(None) => {
                    return Err(TransportError::BodyTruncated {
                        peer,
                        expected: body_len,
                        received,
                    })
                }
                Err(e) => return Err(read_err(peer, e)),
            }
        }
        expect_end(peer, &conn, &mut recv).await?;
        Ok(resp)
    }

    /// Number of QUIC connections on this endpoint, inbound and outbound (including ones still
    /// closing).
    pub fn open_connections(&self) -> usize {
        self.inner.quinn.open_connections()
    }

    /// quinn's statistics of the cached connection to `peer`, if one is established.
    pub fn connection_stats(&self, peer: SocketAddr) -> Option<quinn::ConnectionStats> {
        let slot = self.lock_conns().get(&peer).cloned()?;
        match slot.conn.get() {
            Some(Ok(conn)) => Some(conn.stats()),
            _ => None,
        }
    }

    /// Drops the cached connection to `peer` (it left the cluster): calls in flight on it fail
    /// promptly with [`TransportError::Closed`]; the next call connects afresh.
    pub fn disconnect(&self, peer: SocketAddr) {
        let slot = self.lock_conns().remove(&peer);
        if let Some(slot) = slot {
            slot.cancel.cancel();
            if let Some(Ok(conn)) = slot.conn.get() {
                conn.close(close::DISCONNECTED, b"disconnected");
            }
        }
    }

    /// Closes every connection and the endpoint, then waits (at most `shutdown_grace`) for the
    /// close to reach peers. Serve loops end; later calls fail.
    pub async fn close(&self) {
        let slots: Vec<_> = self.lock_conns().drain().map(|(_, s)| s).collect();
        for slot in slots {
            slot.cancel.cancel();
        }
        self.inner.quinn.close(close::NORMAL, b"closing");
        let _ = tokio::time::timeout(
            self.inner.limits.shutdown_grace,
            self.inner.quinn.wait_idle(),
        )
        .await;
    }

    fn lock_conns(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<Slot>>> {
        self.inner
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The cached connection to `peer`, connecting (once, shared by concurrent callers) if needed.
    async fn connection(&self, peer: SocketAddr) -> Result<quinn::Connection, TransportError> {
        // Bounded: each round either returns or replaces a cached connection that died.
        for _ in 0..3 {
            let slot = {
                let mut conns = self.lock_conns();
                match conns.get(&peer) {
                    Some(slot) if !slot.is_dead() => slot.clone(),
                    _ => {
                        let slot = Arc::new(Slot {
                            conn: OnceCell::new(),
                            cancel: CancellationToken::new(),
                        });
                        conns.insert(peer, slot.clone());
                        slot
                    }
                }
            };
            let established_before = slot.conn.initialized();
            let result = slot
                .conn
                .get_or_init(|| self.connect(peer, slot.cancel.clone()))
                .await;
            match result {
                Ok(conn) => match conn.close_reason() {
                    None => return Ok(conn.clone()),
                    // A cached connection died since the liveness check: connect afresh.
                    Some(_) if established_before => self.evict(peer, &slot),
                    // Closed right after the handshake (e.g. the server refused our certificate
                    // after the client side of the TLS 1.3 handshake had completed).
                    Some(reason) => {
                        self.evict(peer, &slot);
                        return Err(lost(peer, reason));
                    }
                },
                Err(failure) => {
                    self.evict(peer, &slot);
                    return Err(failure.clone().into_error(peer));
                }
            }
        }
        Err(TransportError::Closed { peer })
    }

    fn evict(&self, peer: SocketAddr, slot: &Arc<Slot>) {
        let mut conns = self.lock_conns();
        if conns.get(&peer).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            conns.remove(&peer);
        }
    }

    async fn connect(
        &self,
        peer: SocketAddr,
        cancel: CancellationToken,
    ) -> Result<quinn::Connection, ConnectFailure> {
        let config = if peer.ip().is_loopback() {
            self.inner.client_loopback.clone()
        } else {
            self.inner.client.clone()
        };
        let connecting = self
            .inner
            .quinn
            .connect_with(config, peer, SERVER_NAME)
            .map_err(ConnectFailure::Start)?;
        let after = self.inner.limits.connect_timeout;
        tokio::select! {
            _ = cancel.cancelled() => Err(ConnectFailure::Disconnected),
            r = tokio::time::timeout(after, connecting) => match r {
                Err(_) => Err(ConnectFailure::Timeout(after)),
                Ok(Err(e)) => Err(ConnectFailure::Handshake(e)),
                Ok(Ok(conn)) => {
                    tracing::debug!(%peer, "connected");
                    Ok(conn)
                }
            },
        }
    }

    /// Opens a stream, sends the request frame, and reads the response frame and body length.
    async fn exchange<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        peer: SocketAddr,
        req: &Req,
    ) -> Result<(Resp, u64, RecvStream, quinn::Connection), TransportError> {
        let max = self.inner.limits.max_frame;
        let frame = wire::encode_frame(req, max, 0)
            .map_err(TransportError::Encode)?
            .map_err(|len| TransportError::FrameTooLarge {
                peer,
                len: len as u64,
                max,
            })?;
        let frame = Bytes::from(frame);
        let mut retried = false;
        loop {
            let conn = self.connection(peer).await?;
            match exchange_on(peer, &conn, frame.clone(), max).await {
                // A stateless reset proves the peer (restarted) holds no state for the connection,
                // so it never saw the request: retry once on a fresh connection.
                Err(TransportError::ConnectionLost {
                    source: ConnectionError::Reset,
                    ..
                }) if !retried => {
                    tracing::debug!(%peer, "connection reset by restarted peer; reconnecting");
                    retried = true;
                }
                r => return r.map(|(resp, body_len, recv)| (resp, body_len, recv, conn)),
            }
        }
    }
}

/// One request/response exchange on `conn`, up to the response frame and body length.
async fn exchange_on<Resp: DeserializeOwned>(
    peer: SocketAddr,
    conn: &quinn::Connection,
    frame: Bytes,
    max: usize,
) -> Result<(Resp, u64, RecvStream), TransportError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(peer, e))?;
    send.write_chunk(frame)
        .await
        .map_err(|e| write_err(peer, e))?;
    // Finishing fails only if the peer already stopped or reset the stream; the read reports it.
    let _ = send.finish();
    let frame = match wire::read_frame(&mut recv, max).await {
        Ok(frame) => frame,
        Err(e) => return Err(frame_err(peer, conn, e)),
    };
    let resp = match wire::decode_frame(&frame) {
        Ok(resp) => resp,
        Err(source) => {
            tracing::warn!(%peer, error = %source, "undecodable reply; closing the connection");
            conn.close(close::PROTOCOL_VIOLATION, b"undecodable reply");
            return Err(TransportError::Decode { peer, source });
        }
    };
    let body_len = match wire::read_body_len(&mut recv).await {
        Ok(n) => n,
        Err(e) => return Err(frame_err(peer, conn, e)),
    };
    Ok((resp, body_len, recv))
}

/// Maps a reply framing error, closing the connection on a protocol violation.
fn frame_err(peer: SocketAddr, conn: &quinn::Connection, e: FrameError) -> TransportError {
    match e {
        FrameError::Read(e) => read_err(peer, e),
        FrameError::TooLarge { len, max } => {
            tracing::warn!(%peer, len, max, "oversized reply frame; closing the connection");
            conn.close(close::PROTOCOL_VIOLATION, e.reason().as_bytes());
            TransportError::FrameTooLarge { peer, len, max }
        }
        FrameError::Truncated => {
            // The server ends a stream without a complete reply only by resetting it, so a FIN
            // inside the frame is a protocol violation.
            tracing::warn!(%peer, "truncated reply frame; closing the connection");
            conn.close(close::PROTOCOL_VIOLATION, e.reason().as_bytes());
            TransportError::Malformed {
                peer,
                reason: "truncated reply frame",
            }
        }
    }
}

/// Checks that the reply stream ends right after the body.
async fn expect_end(
    peer: SocketAddr,
    conn: &quinn::Connection,
    recv: &mut RecvStream,
) -> Result<(), TransportError> {
    match recv.read_chunk(1, true).await {
        Ok(None) => Ok(()),
        Ok(Some(_)) => {
            tracing::warn!(%peer, "reply longer than announced; closing the connection");
            conn.close(close::PROTOCOL_VIOLATION, b"reply longer than announced");
            Err(TransportError::Malformed {
                peer,
                reason: "reply longer than announced",
            })
        }
        Err(e) => Err(read_err(peer, e)),
    }
}

async fn serve_loop<S: Service>(inner: Arc<Inner>, svc: Arc<S>, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    // Cancelled when the shutdown grace has expired: remaining streams are reset.
    let abort = CancellationToken::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            incoming = inner.quinn.accept() => {
                let Some(incoming) = incoming else { break };
                if tracker.len() >= inner.limits.max_connections {
                    tracing::warn!(
                        peer = %incoming.remote_address(),
                        limit = inner.limits.max_connections,
                        "connection limit reached; refusing"
                    );
                    incoming.refuse();
                    continue;
                }
                tracker.spawn(serve_conn(
                    inner.clone(),
                    incoming,
                    svc.clone(),
                    shutdown.clone(),
                    abort.clone(),
                ));
            }
        }
    }
    tracker.close();
    let grace = tokio::time::sleep(inner.limits.shutdown_grace);
    tokio::pin!(grace);
    let mut grace_over = false;
    loop {
        tokio::select! {
            biased;
            _ = tracker.wait() => break,
            _ = &mut grace, if !grace_over => {
                tracing::warn!(streams = tracker.len(), "shutdown grace expired; resetting streams");
                abort.cancel();
                grace_over = true;
            }
            incoming = inner.quinn.accept() => match incoming {
                Some(incoming) => incoming.refuse(),
                // The endpoint closed: every connection is gone, so are the stream tasks soon.
                None => {
                    abort.cancel();
                    tracker.wait().await;
                    break;
                }
            },
        }
    }
}

async fn serve_conn<S: Service>(
    inner: Arc<Inner>,
    incoming: quinn::Incoming,
    svc: Arc<S>,
    shutdown: CancellationToken,
    abort: CancellationToken,
) {
    let peer = incoming.remote_address();
    let connecting = if peer.ip().is_loopback() {
        incoming.accept_with(inner.server_loopback.clone())
    } else {
        incoming.accept()
    };
    let connecting = match connecting {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "accepting connection failed");
            return;
        }
    };
    let handshake = tokio::select! {
        _ = abort.cancelled() => return,
        r = tokio::time::timeout(inner.limits.connect_timeout, connecting) => r,
    };
    let conn = match handshake {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) if is_tls_refusal(&e) => {
            tracing::warn!(%peer, error = %e, "TLS handshake refused");
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "handshake timed out");
            return;
        }
    };
    tracing::debug!(%peer, "accepted connection");
    let streams = TaskTracker::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = conn.accept_bi() => match r {
                Ok((send, recv)) => {
                    streams.spawn(serve_stream(
                        conn.clone(),
                        send,
                        recv,
                        svc.clone(),
                        inner.limits,
                        abort.clone(),
                    ));
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "connection ended");
                    break;
                }
            },
        }
    }
    streams.close();
    streams.wait().await;
    if shutdown.is_cancelled() {
        conn.close(close::SHUTDOWN, b"shutting down");
    }
}

/// Owns a reply stream; resets it on drop unless the reply was completed.
struct ReplyStream {
    send: SendStream,
    completed: bool,
    reset_code: VarInt,
    abort: CancellationToken,
}

impl Drop for ReplyStream {
    fn drop(&mut self) {
        if !self.completed {
            let code = if self.abort.is_cancelled() {
                reset::SHUTDOWN
            } else {
                self.reset_code
            };
            let _ = self.send.reset(code);
        }
    }
}

async fn serve_stream<S: Service>(
    conn: quinn::Connection,
    send: SendStream,
    recv: RecvStream,
    svc: Arc<S>,
    limits: Limits,
    abort: CancellationToken,
) {
    let out = ReplyStream {
        send,
        // A panic in the handler unwinds through here: the client sees INTERNAL.
        reset_code: reset::INTERNAL,
        completed: false,
        abort: abort.clone(),
    };
    tokio::select! {
        // Dropping the handler future drops `out`, which resets the stream with SHUTDOWN.
        _ = abort.cancelled() => {}
        _ = handle_stream(&conn, out, recv, &*svc, limits) => {}
    }
}

async fn handle_stream<S: Service>(
    conn: &quinn::Connection,
    mut out: ReplyStream,
    mut recv: RecvStream,
    svc: &S,
    limits: Limits,
) {
    let peer = conn.remote_address();
    let frame = match tokio::time::timeout(
        limits.request_timeout,
        wire::read_frame(&mut recv, limits.max_frame),
    )
    .await
    {
        Err(_) => {
            tracing::debug!(%peer, "request frame timed out");
            out.reset_code = reset::REQUEST_TIMEOUT;
            return;
        }
        Ok(Ok(frame)) => frame,
        Ok(Err(FrameError::Read(e))) => {
            tracing::debug!(%peer, error = %e, "reading request failed");
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!(%peer, reason = e.reason(), "malformed request; closing the connection");
            conn.close(close::PROTOCOL_VIOLATION, e.reason().as_bytes());
            return;
        }
    };
    drop(recv);
    let req: S::Req = match wire::decode_frame(&frame) {
        Ok(req) => req,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "undecodable request; closing the connection");
            conn.close(close::PROTOCOL_VIOLATION, b"undecodable request");
            return;
        }
    };
    drop(frame);
    let stopped = out.send.stopped();
    let reply = tokio::select! {
        reply = svc.handle(peer, req) => reply,
        _ = stopped => {
            tracing::debug!(%peer, "client abandoned the request");
            out.completed = true;
            return;
        }
    };
    let head = match wire::encode_frame(&reply.resp, limits.max_frame, wire::BODY_LEN) {
        Ok(Ok(head)) => head,
        Ok(Err(len)) => {
            tracing::error!(%peer, len, max = limits.max_frame, "response exceeds max_frame");
            return;
        }
        Err(e) => {
            tracing::error!(%peer, error = %e, "encoding the response failed");
            return;
        }
    };
    let mut head = head;
    let body = reply.body.map(|b| Bytes::from_owner(BodyOwner(b)));
    let body_len = body.as_ref().map_or(0, |b| b.len() as u64);
    head.extend_from_slice(&body_len.to_le_bytes());
    let mut chunks = [Bytes::from(head), body.unwrap_or_default()];
    if let Err(e) = out.send.write_all_chunks(&mut chunks).await {
        tracing::debug!(%peer, error = %e, "writing reply failed");
        out.completed = true;
        return;
    }
    if out.send.finish().is_err() {
        out.completed = true;
        return;
    }
    out.completed = true;
    // Stay in flight until the client has acknowledged everything, so shutdown waits for it.
    let _ = out.send.stopped().await;
}
