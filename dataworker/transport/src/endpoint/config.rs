//! The settings of an [`Endpoint`] that callers choose: plain data with defaults tuned for a
//! data-centre network and for loopback. Validation and translation into quinn's configuration
//! happen in `setup`, at bind time.

use std::net::SocketAddr;
use std::time::Duration;

use shoal_pki::NodeTls;

#[cfg(doc)]
use super::Endpoint;

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
