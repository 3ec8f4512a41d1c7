//! [`TransportError`], named after the step that failed, and the mapping of quinn's connection,
//! read and write errors onto it. A TLS alert always maps to [`TransportError::Refused`]; a local
//! close always to [`TransportError::Closed`].

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use quinn::{ConnectionError, ReadError, WriteError};

use crate::wire;
use shoal_pki::PkiError;

#[cfg(doc)]
use super::Endpoint;

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
pub(super) fn is_tls_refusal(e: &ConnectionError) -> bool {
    let crypto = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
    match e {
        ConnectionError::ConnectionClosed(c) => crypto(c.error_code),
        ConnectionError::TransportError(t) => crypto(t.code),
        _ => false,
    }
}

pub(super) fn lost(peer: SocketAddr, e: ConnectionError) -> TransportError {
    if is_tls_refusal(&e) {
        TransportError::Refused { peer, source: e }
    } else if e == ConnectionError::LocallyClosed {
        TransportError::Closed { peer }
    } else {
        TransportError::ConnectionLost { peer, source: e }
    }
}

pub(super) fn read_err(peer: SocketAddr, e: ReadError) -> TransportError {
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

pub(super) fn write_err(peer: SocketAddr, e: WriteError) -> TransportError {
    match e {
        WriteError::Stopped(code) => TransportError::Stopped {
            peer,
            code: wire::code(code),
        },
        WriteError::ConnectionLost(e) => lost(peer, e),
        WriteError::ClosedStream | WriteError::ZeroRttRejected => TransportError::Closed { peer },
    }
}
