//! shoal's per-node function proxy: routes calls from callers to function instances over a
//! Unix socket (protocol: `shoal_protocol::{CallerFrame, ProxyFrame}`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), shoal_proxy::StartError> {
//! use shoal_proxy::{EngineKind, Proxy, ProxyConfig};
//! let proxy = Proxy::start(ProxyConfig::new("node-1", "/run/shoal/proxy.sock"))?;
//! assert_ne!(proxy.engine(), EngineKind::Auto); // what actually runs
//! proxy.shutdown().await; // in-flight calls fail with Unavailable
//! # Ok(()) }
//! ```
//!
//! The routing decisions live in the sans-IO `router` module (instances, slots, queues,
//! deadlines; `now` passed in); the engines (tokio or io_uring, each on its own thread)
//! only move frames. With a [`PeerConfig`], the proxy also listens for other proxies
//! (TLS over TCP with the cluster's mutual TLS), publishes `proxies/<node>` in the metadata
//! store, and keeps a table of remote routes from a watch on it: a call goes to a local
//! instance first, then to the least-loaded remote node running the function, and crosses
//! the network at most once. Payloads are forwarded as they are; the proxy never reads
//! dataworker objects. This crate reads no environment variables.
//!
//! Access (the `access` module): the socket takes only allowed uids (`SO_PEERCRED`); a
//! caller acts in the tenant of its token, else of its uid, and is served only that
//! tenant's functions (another tenant's are `NotFound`); an instance registers only with
//! its own credential (a token bound to exactly that function and instance id), checked
//! against `tokens/` in the metadata store ([`ProxyConfig::meta`]); a tenant's calls in
//! flight are counted against `quotas/<tenant>` (`QuotaExceeded` past it).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod access;
#[doc(hidden)]
pub mod bench_support;
mod engine;
mod peer;
mod router;
mod routes;
mod shared;

use shared::Shared;
use shoal_meta::MetaStore;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Which IO engine serves the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// io_uring when the kernel allows it, else tokio (the reason is logged).
    #[default]
    Auto,
    /// `tokio-uring` on a dedicated thread.
    Uring,
    /// A plain tokio runtime on a dedicated thread.
    Tokio,
}

/// How to run a proxy. Build with [`ProxyConfig::new`] and adjust the fields.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Node id announced in `Welcome`.
    pub node_id: String,
    /// Unix socket to serve; a stale socket file there is replaced.
    pub socket_path: PathBuf,
    /// Largest inline payload, in bytes (default 64 KiB); larger inline arguments are
    /// answered with `TooLarge`.
    pub inline_limit: u64,
    /// Calls waiting per function at most (default 1024); beyond, `Overloaded`.
    pub max_queue: usize,
    /// Open connections at most (default 4096); beyond, refused with `Overloaded`.
    pub max_connections: usize,
    /// Largest frame body accepted, in bytes (default 1 MiB); larger closes the connection.
    pub max_frame: usize,
    /// IO engine (default [`EngineKind::Auto`]).
    pub engine: EngineKind,
    /// Forwarding to and from other nodes' proxies (default none: local calls only; needs
    /// [`ProxyConfig::meta`]).
    pub peer: Option<PeerConfig>,
    /// The metadata store: tokens (`tokens/`) and quotas (`quotas/`) are followed on it, and
    /// with [`ProxyConfig::peer`] routes too. Without one (the default) no token can be
    /// checked: callers are known by uid only, and no instance can register.
    pub meta: Option<Arc<dyn MetaStore>>,
    /// Uids whose processes may connect to the socket, besides those of
    /// [`ProxyConfig::tenant_uids`] (default: none more).
    pub allowed_uids: Vec<u32>,
    /// The tenant of a local caller that presents no token, by its uid (default: the
    /// proxy's own uid is tenant `default`). A uid here may connect.
    pub tenant_uids: BTreeMap<u32, String>,
}

/// How a proxy reaches the rest of the cluster.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// Address of the listener for other proxies (port 0: any free port).
    pub listen: SocketAddr,
    /// Address published in `proxies/<node>` (default: the bound listener address).
    pub advertise: Option<SocketAddr>,
    /// This node's certificate and the cluster CA.
    pub tls: shoal_transport::NodeTls,
    /// TTL of the lease `proxies/<node>` lives under.
    pub lease_ttl: Duration,
}

impl ProxyConfig {
    /// Defaults for a node and socket path.
    pub fn new(node_id: impl Into<String>, socket_path: impl Into<PathBuf>) -> Self {
        Self {
            node_id: node_id.into(),
            socket_path: socket_path.into(),
            inline_limit: 64 * 1024,
            max_queue: 1024,
            max_connections: 4096,
            max_frame: 1 << 20,
            engine: EngineKind::Auto,
            peer: None,
            meta: None,
            allowed_uids: Vec::new(),
            tenant_uids: access::default_tenant_uids(nix::unistd::getuid().as_raw()),
        }
    }
}

/// Why the proxy did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A setting is out of range.
    #[error("invalid config: {0}")]
    InvalidConfig(&'static str),
    /// Binding the socket failed.
    #[error("socket {path}: {source}")]
    Socket {
        /// Socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another process serves the socket.
    #[error("a proxy already serves {0}")]
    AlreadyRunning(PathBuf),
    /// io_uring was requested but its runtime could not start.
    #[error("io_uring runtime: {0}")]
    Uring(std::io::Error),
    /// The tokio runtime could not be built.
    #[error("tokio runtime: {0}")]
    Runtime(std::io::Error),
    /// The engine thread could not be spawned.
    #[error("spawning the engine thread: {0}")]
    Thread(std::io::Error),
    /// The node's TLS material is unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The peer listener could not be bound.
    #[error("peer listener {addr}: {source}")]
    Peer {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A running proxy. Stop it with [`Proxy::shutdown`]; dropping it without that leaves the
/// engine thread running until the process exits.
#[derive(Debug)]
pub struct Proxy {
    engine: EngineKind,
    socket_path: PathBuf,
    thread: engine::EngineThread,
    peer_addr: Option<SocketAddr>,
}

fn prepare_socket(path: &Path) -> Result<(), StartError> {
    let sock_err = |source| StartError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(sock_err)?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(StartError::AlreadyRunning(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(sock_err)?;
    }
    Ok(())
}

impl Proxy {
    /// Binds the socket and starts the engine thread. With [`EngineKind::Auto`], io_uring
    /// is tried first: if its runtime cannot be created, the tokio engine runs instead.
    pub fn start(cfg: ProxyConfig) -> Result<Proxy, StartError> {
        if cfg.max_frame < 64 {
            return Err(StartError::InvalidConfig(
                "max_frame must be at least 64 bytes",
            ));
        }
        if cfg.max_connections == 0 {
            return Err(StartError::InvalidConfig(
                "max_connections must be at least 1",
            ));
        }
        if cfg.peer.is_some() && cfg.meta.is_none() {
            return Err(StartError::InvalidConfig(
                "forwarding to other proxies needs a metadata store",
            ));
        }
        if cfg
            .tenant_uids
            .values()
            .any(|t| shoal_meta::records::validate_tenant(t).is_err())
        {
            return Err(StartError::InvalidConfig(
                "a tenant of tenant_uids is not a valid tenant name",
            ));
        }
        prepare_socket(&cfg.socket_path)?;
        let path = cfg.socket_path.clone();
        let wanted = cfg.engine;
        let peer = cfg.peer.clone().map(peer::PeerSetup::bind).transpose()?;
        let peer_addr = peer.as_ref().map(|p| p.addr);
        let shared = Arc::new(Shared::new(cfg));
        let bind = || {
            std::os::unix::net::UnixListener::bind(&path).map_err(|source| StartError::Socket {
                path: path.clone(),
                source,
            })
        };
        let (engine, thread) = match wanted {
            EngineKind::Uring => (
                EngineKind::Uring,
                engine::start_uring(shared.clone(), bind()?, peer)?,
            ),
            EngineKind::Tokio => (
                EngineKind::Tokio,
                engine::start_tokio(shared.clone(), bind()?, peer)?,
            ),
            EngineKind::Auto => match engine::start_uring(
                shared.clone(),
                bind()?,
                peer.as_ref().map(peer::PeerSetup::try_clone).transpose()?,
            ) {
                Ok(t) => (EngineKind::Uring, t),
                Err(StartError::Uring(e)) => {
                    tracing::warn!(error = %e, "io_uring unavailable; using the tokio engine");
                    // The failed attempt dropped its listener; bind afresh.
                    let _ = std::fs::remove_file(&path);
                    (
                        EngineKind::Tokio,
                        engine::start_tokio(shared.clone(), bind()?, peer)?,
                    )
                }
                Err(e) => return Err(e),
            },
        };
        tracing::info!(socket = %path.display(), ?engine, ?peer_addr, "proxy started");
        Ok(Proxy {
            engine,
            socket_path: path,
            thread,
            peer_addr,
        })
    }

    /// The bound address of the listener for other proxies, if any.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_addr
    }

    /// The engine that actually runs (never `Auto`).
    pub fn engine(&self) -> EngineKind {
        self.engine
    }

    /// The socket being served.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Stops accepting, withdraws `proxies/<node>`, fails calls in flight or queued with
    /// `Unavailable`, closes every connection, waits for the engine thread (peer tasks included), and
    /// removes the socket file.
    pub async fn shutdown(self) {
        let engine::EngineThread { stop, done, thread } = self.thread;
        stop.cancel();
        let _ = done.await;
        if thread.join().is_err() {
            tracing::error!("the proxy engine thread panicked");
        }
        let _ = std::fs::remove_file(&self.socket_path);
    }
}
