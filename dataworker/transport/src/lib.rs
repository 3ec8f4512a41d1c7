//! shoal's node-to-node transport: QUIC (quinn) with mutual TLS under a cluster CA.
//!
//! - PKI ([`DevCa`], [`NodeCert`], [`NodeTls`]): re-exported from `shoal-pki`, where the cluster
//!   CA, the node certificates and the TLS 1.3 configurations built from them live.
//! - [`Endpoint`]: one UDP socket per node, both client and server. A request is one
//!   bidirectional stream: `[u32 LE len][postcard request]` one way,
//!   `[u32 LE len][postcard response][u64 LE body_len][body]` back. Bodies go out without a copy
//!   and stream into the caller's sink as they arrive; parallel fetches share one connection.
//!
//! Every peer, client or server, must present a certificate signed by the cluster CA carrying the
//! name [`SERVER_NAME`]. This crate knows nothing of shoal's protocol (`shoal-protocol` is not a
//! dependency): callers map [`TransportError::is_unreachable`] to their own error codes. It reads
//! no environment variables and uses the `ring` crypto provider only.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod endpoint;
mod wire;

/// Not an API: the codec of a stream's frames, for shoal's fuzz targets (`common/fuzz`), which
/// feed it what a peer could send. Hidden from the docs; it may change with any commit.
#[doc(hidden)]
pub mod fuzz_support {
    pub use crate::wire::{decode_frame, encode_frame, FRAME_HEADER};
}

pub use endpoint::{Body, Congestion, Endpoint, Reply, Service, TransportConfig, TransportError};
pub use shoal_pki::{
    DevCa, NodeCert, NodeTls, PkiError, TlsFiles, ALPN, CA_CERT_FILE, CA_KEY_FILE, SERVER_NAME,
};
