//! Errors of starting a local shoal, each named after the step that failed.
use std::path::PathBuf;
use std::time::Duration;

/// Why a process or the cluster did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The process could not be started at all.
    #[error("starting {name}: {source}")]
    Spawn {
        /// Which process.
        name: String,
        /// The OS's reason.
        #[source]
        source: std::io::Error,
    },
    /// Reading its standard output failed.
    #[error("reading the ready line of {name}: {source}")]
    Read {
        /// Which process.
        name: String,
        /// The OS's reason.
        #[source]
        source: std::io::Error,
    },
    /// It exited (or closed its standard output) before printing its ready line.
    #[error("{name} did not start ({status}); see its error output above")]
    Exited {
        /// Which process.
        name: String,
        /// How it ended, as far as known.
        status: String,
    },
    /// It printed no ready line within the deadline (it was killed).
    #[error("{name} was not ready within {timeout:?}")]
    NotReady {
        /// Which process.
        name: String,
        /// The deadline it had.
        timeout: Duration,
    },
    /// Its first line is not the description it should print.
    #[error("{name} printed {line:?} instead of its ready line: {source}")]
    BadReadyLine {
        /// Which process.
        name: String,
        /// What it printed.
        line: String,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// A cluster needs at least one node.
    #[error("a cluster needs at least one node")]
    NoNodes,
    /// Control runs on the embedded store but reported no metadata API for the nodes.
    #[error("control did not report its metadata API (it runs with `--listen off`?)")]
    NoMetaApi,
    /// The development CA, control's or a node's certificate could not be made or loaded.
    #[error("the development CA in {dir}: {source}")]
    Tls {
        /// The CA's directory.
        dir: PathBuf,
        /// What failed (boxed: the largest variant by far).
        #[source]
        source: Box<shoal_pki::PkiError>,
    },
    /// The runtime directory (or one inside it) is not private: another user's, writable by
    /// others, or a symlink. The message says how to fix it.
    #[error("refusing the runtime directory: {0}")]
    UnsafeDir(#[source] shoal_pki::PrivateError),
    /// A node id breaks the protocol's rule (it names a directory and certificate files).
    #[error("node id {id:?}: {source}")]
    NodeId {
        /// The id as given.
        id: String,
        /// The rule it breaks.
        #[source]
        source: shoal_protocol::IdError,
    },
    /// A directory the cluster needs could not be created.
    #[error("creating {dir}: {source}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// The OS's reason.
        #[source]
        source: std::io::Error,
    },
}
