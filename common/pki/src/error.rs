//! [`PkiError`]: every way generating, storing or loading certificates can fail.
use std::io;
use std::path::PathBuf;

/// Errors of certificate generation, storage and loading, each named after the failed step.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// Generating a key pair or signing a certificate failed.
    #[error("generating {what}: {source}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// The underlying rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// A node id breaks the protocol's rule (`shoal_protocol::IdKind::Node`; it becomes a
    /// file name).
    #[error("invalid node id {id:?}: {source}")]
    InvalidNodeId {
        /// The id as given.
        id: String,
        /// The rule it breaks.
        #[source]
        source: shoal_protocol::IdError,
    },
    /// The directory or a file of the development CA is not private (see
    /// [`crate::check_private_dir`]).
    #[error(transparent)]
    Private(#[from] crate::PrivateError),
    /// A node id is the name only control's certificate may carry
    /// ([`crate::CONTROL_SERVER_NAME`]): a node certificate with it could pose as control.
    #[error("node id {0:?} is reserved: it is the name of control's certificate")]
    ReservedName(String),
    /// Reading a file failed.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: io::Error,
    },
    /// Writing a file (or creating its directory) failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: io::Error,
    },
    /// A file exists with different content and is not overwritten.
    #[error("{path} exists with different content; refusing to overwrite it")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// A PEM file could not be parsed.
    #[error("parsing {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A certificate file holds no certificate.
    #[error("{path} holds no certificate")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The CA key in a PKI directory does not belong to its CA certificate.
    #[error("{key} does not match {cert} (or the CA was not made by DevCa::generate)")]
    CaMismatch {
        /// The CA certificate file.
        cert: PathBuf,
        /// The CA key file.
        key: PathBuf,
    },
    /// A node's or control's certificate is unusable: key mismatch, not signed by the CA, wrong
    /// name or usage.
    #[error("certificate {cert} (key {key}) rejected: {source}")]
    BadNodeCert {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why rustls rejected it.
        #[source]
        source: rustls::Error,
    },
    /// The CA file holds a certificate that cannot be a trust anchor.
    #[error("CA certificate {path} rejected: {source}")]
    BadCa {
        /// The CA certificate file.
        path: PathBuf,
        /// Why rustls rejected it.
        #[source]
        source: rustls::Error,
    },
    /// Building a rustls configuration failed.
    #[error("building the TLS {side} configuration: {reason}")]
    Config {
        /// `"server"` or `"client"`.
        side: &'static str,
        /// What went wrong.
        reason: String,
    },
}
