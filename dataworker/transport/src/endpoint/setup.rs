//! [`Endpoint::bind`]: the UDP socket and the quinn configurations built from a
//! [`TransportConfig`] (windows capped to the socket buffer on loopback, MTU and GSO batches that
//! fit one UDP send, congestion controller, a stateless-reset key derived from the node's key, and
//! connection ids that let a restarted node reset its previous incarnation's connections).

use std::collections::HashMap;
use std::net::UdpSocket;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, VarInt};

use super::{Congestion, Endpoint, Inner, Limits, TransportConfig, TransportError};

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
    fn derive(tls: &shoal_pki::NodeTls) -> Option<ResetKey> {
        // The same suite `NodeTls::derive_secret` extracts and expands with.
        let rustls::SupportedCipherSuite::Tls13(suite) =
            rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        else {
            return None;
        };
        let key = tls.derive_secret(b"shoal transport stateless reset v1", b"quic reset key")?;
        Some(ResetKey {
            hkdf: suite.hkdf_provider,
            key,
        })
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

/// Binds the UDP socket; returns it with its effective receive buffer size (as the kernel reports
/// it: twice the usable size).
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

        let mut endpoint_config = match ResetKey::derive(&cfg.tls) {
            Some(key) => quinn::EndpointConfig::new(Arc::new(key)),
            None => quinn::EndpointConfig::default(),
        };
        let rng = shoal_pki::crypto_provider().secure_random;
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
}
