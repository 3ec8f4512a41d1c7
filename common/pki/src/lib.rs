//! shoal's cluster PKI: a development CA, node and control certificates, and the rustls
//! configurations built from them. Every component that speaks TLS inside the cluster (the
//! dataworkers' QUIC transport, the proxies' peer links, the metadata API between the nodes
//! and control) takes its identity from here.
//!
//! - [`DevCa`] makes and stores a CA and issues certificates: [`DevCa::issue`] for a node,
//!   [`DevCa::issue_control`] for control. [`NodeCert`] holds one in memory, [`TlsFiles`] names
//!   its files (`ca.pem`, `<name>.pem`, `<name>.key` in a PKI directory).
//! - [`NodeTls`]: a node's identity, as server and client, for QUIC and for TLS over TCP.
//! - [`ControlTls`]: control's identity, as the server of the metadata API.
//! - [`ensure_private_dir`], [`write_private_file`], [`read_private_file`]: the private
//!   directory shoal keeps its files in (`shoal up`'s runtime directory and everything under
//!   it) and the secrets in it, checked and written the same way by every component (see the
//!   `private` module: 0700, owner and mode checked, `O_NOFOLLOW`, temporary file then
//!   rename).
//!
//! Invariants:
//! - Every node certificate carries the DNS name [`SERVER_NAME`] and both the `serverAuth` and
//!   `clientAuth` extended key usages, so one certificate serves a node as server and client.
//! - Control's certificate carries the name [`CONTROL_SERVER_NAME`] and only `serverAuth`; no
//!   node certificate carries that name ([`DevCa::issue`] refuses it), so a node that verifies
//!   control by name cannot be fooled by another node, and control's key is no client identity.
//! - [`NodeTls::load`] and [`ControlTls::load`] refuse a certificate that does not chain to the
//!   cluster CA, has the wrong name or usage, or whose key does not match it, so a
//!   misconfigured process fails at start, not at its first handshake.
//! - Configurations use the `ring` provider only ([`crypto_provider`]), TLS 1.3 only, and every
//!   server configuration requires a client certificate signed by the cluster CA.
//! - Private keys are written with mode 0600, atomically (temporary file created with
//!   `O_EXCL | O_NOFOLLOW`, then rename), into a directory that passed
//!   [`check_private_dir`]; the development CA's key is read back only from such a
//!   directory, without following a symlink, and only if no one else may read it.
//!
//! This crate touches no socket and reads no environment variable; it holds no `unsafe`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod ca;
mod error;
mod files;
mod identity;
mod private;

pub use ca::{DevCa, NodeCert, TlsFiles};
pub use error::PkiError;
pub use identity::{crypto_provider, ControlTls, NodeTls};
pub use private::{
    check_private_dir, ensure_private_dir, read_private_file, write_private_file, PrivateError,
    Secrecy,
};

/// The DNS name every node certificate carries and every node verifies its peers by.
pub const SERVER_NAME: &str = "shoal-node";

/// The DNS name control's certificate carries and nodes verify control's metadata API by; also
/// the base name of control's files in a PKI directory (`shoal-control.pem`, `shoal-control.key`).
pub const CONTROL_SERVER_NAME: &str = "shoal-control";

/// The ALPN protocol id negotiated on node-to-node QUIC connections.
pub const ALPN: &[u8] = b"shoal/1";

/// File name of the CA certificate inside a PKI directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside a PKI directory.
pub const CA_KEY_FILE: &str = "ca.key";

#[cfg(test)]
mod tests;
