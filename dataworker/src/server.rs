//! Starting and stopping a dataworker.
//!
//! [`Dataworker::start_with`] binds the sockets, then builds the parts in the order they
//! depend on each other: the cluster outbox channel, the [`Local`] store (which reports to the
//! outbox), the [`Cluster`] over the store (which drains it), and the [`Worker`] over both. It
//! then starts the owned tasks (accept loop, timer, HTTP endpoint, the cluster's tasks, the
//! quota follower) on one task tracker under one shutdown token, the token book's follower,
//! and the mailbox thread. Shutdown cancels the token, waits for every task, stops the token
//! follower and the mailbox thread and removes the socket file.
//!
//! With a metadata store (the cluster's, or [`StartParts::meta`] for a standalone node) the
//! worker follows `tokens/` (clients may connect with a token) and `quotas/` (each tenant's
//! arena and spill limits); without one it knows clients by their uid only and enforces no
//! quota.
use crate::cluster::{Cluster, Outbox};
use crate::conn;
use crate::local::Local;
use crate::tenancy::Auth;
use crate::worker::Worker;
use crate::{http, Config, ConfigError};
use metrics_exporter_prometheus::PrometheusHandle;
use shoal_meta::records::{validate_tenant, Quota, QUOTAS_PREFIX};
use shoal_meta::{Followed, Follower, MetaStore, TokenBook, TokenFollower, WatchEvent};
use shoal_protocol::{NodeRecord, StatusInfo};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why a dataworker did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The arena could not be created.
    #[error("shared memory (--shm-size): {0}")]
    Shm(#[from] shoal_shm::ShmError),
    /// The control region could not be created.
    #[error("shared index: {0}")]
    Ctl(#[from] shoal_shm::CtlError),
    /// The spill directory is not usable.
    #[error("spill directory {path} (--spill-dir): {source}")]
    SpillDir {
        /// Directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Another worker serves this socket.
    #[error("a dataworker is already listening on {0}")]
    AlreadyRunning(PathBuf),
    /// The socket could not be bound.
    #[error("socket {path} (--socket-dir): {source}")]
    Socket {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("starting the mailbox thread: {0}")]
    Thread(#[source] std::io::Error),
    /// `--peer-addr` is set but no cluster parts were given (or the reverse).
    #[error("cluster settings: {0}")]
    Cluster(String),
    /// The QUIC endpoint could not be bound.
    #[error("QUIC endpoint {addr} (--peer-addr): {source}")]
    Transport {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: Box<shoal_transport::TransportError>,
    },
    /// The HTTP endpoint could not be bound.
    #[error("http endpoint {addr} (--http-addr): {source}")]
    Http {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// What a dataworker needs to join a cluster besides its [`crate::ClusterConfig`]: the
/// metadata store (control's embedded store through [`shoal_meta::RemoteStore`], or etcd)
/// and its TLS identity under the cluster CA.
#[derive(Debug)]
pub struct ClusterParts {
    /// Where membership lives.
    pub meta: Arc<dyn shoal_meta::MetaStore>,
    /// This node's certificate, key and the cluster CA.
    pub tls: shoal_transport::NodeTls,
}

/// Everything [`Dataworker::start_parts`] takes besides the config.
#[derive(Debug, Default)]
pub struct StartParts {
    /// Join a cluster (its metadata store also serves tokens and quotas).
    pub cluster: Option<ClusterParts>,
    /// For a node outside a cluster: a metadata store to follow for tokens and quotas only.
    pub meta: Option<Arc<dyn MetaStore>>,
}

/// A running dataworker. Dropping it does not stop it; call [`Dataworker::shutdown`].
#[derive(Debug)]
pub struct Dataworker {
    worker: Arc<Worker>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    socket_path: PathBuf,
    http_addr: Option<SocketAddr>,
    poller: Option<std::thread::JoinHandle<()>>,
    tokens: Option<TokenFollower>,
}

fn bind(path: &Path) -> Result<UnixListener, StartError> {
    let sock_err = |source| StartError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(sock_err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(StartError::AlreadyRunning(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(sock_err)?;
    }
    let l = UnixListener::bind(path).map_err(sock_err)?;
    // Who may talk to us is decided by peer credentials, not by file modes.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(sock_err)?;
    Ok(l)
}

impl Dataworker {
    /// Validates `cfg`, creates the arena, binds the socket (and the HTTP endpoint when
    /// configured) and starts serving a standalone node. Must run inside a tokio runtime.
    pub async fn start(
        cfg: Config,
        metrics: Option<PrometheusHandle>,
    ) -> Result<Dataworker, StartError> {
        Self::start_with(cfg, metrics, None).await
    }

    /// Like [`Dataworker::start`]; with `cluster`, the node also joins the cluster: it binds
    /// its QUIC endpoint, registers in the metadata store and serves its directory shard.
    pub async fn start_with(
        cfg: Config,
        metrics: Option<PrometheusHandle>,
        cluster: Option<ClusterParts>,
    ) -> Result<Dataworker, StartError> {
        Self::start_parts(
            cfg,
            metrics,
            StartParts {
                cluster,
                meta: None,
            },
        )
        .await
    }

    /// Like [`Dataworker::start_with`], with every optional part: see [`StartParts`].
    pub async fn start_parts(
        cfg: Config,
        metrics: Option<PrometheusHandle>,
        parts: StartParts,
    ) -> Result<Dataworker, StartError> {
        let StartParts { cluster, meta } = parts;
        cfg.validate()?;
        if cluster.is_some() && meta.is_some() {
            return Err(StartError::Cluster(
                "a cluster node follows its cluster's metadata store; pass no other".into(),
            ));
        }
        let meta = meta.or_else(|| cluster.as_ref().map(|c| c.meta.clone()));
        if cfg.cluster.is_some() != cluster.is_some() {
            return Err(StartError::Cluster(
                "a cluster config needs a metadata store and TLS identity, and the reverse".into(),
            ));
        }
        let socket_path = cfg.socket_path();
        let listener = bind(&socket_path)?;
        let http_listener = match cfg.http_addr {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Http { addr, source })?,
            ),
            None => None,
        };
        // The outbox exists before the local store, which reports to it; the cluster side,
        // built over the store, drains it.
        let outbox = cfg
            .cluster
            .as_ref()
            .map(|c| Outbox::channel(c.outbox_capacity));
        let local = match Local::new(cfg, outbox.as_ref().map(|(tx, _)| tx.clone())) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                let _ = std::fs::remove_file(&socket_path);
                return Err(e);
            }
        };
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let http_addr = http_listener.as_ref().and_then(|l| l.local_addr().ok());
        let mut in_cluster = None;
        if let (Some(ccfg), Some(parts), Some((outbox, notes))) =
            (local.cfg.cluster.clone(), cluster, outbox)
        {
            let mut tcfg = shoal_transport::TransportConfig::new(ccfg.peer_addr, parts.tls);
            tcfg.idle_timeout = ccfg.idle_timeout;
            // A get waiting at a directory owner holds a stream for as long as it waits.
            tcfg.max_concurrent_streams = 1024;
            let endpoint = match shoal_transport::Endpoint::bind(tcfg) {
                Ok(e) => e,
                Err(source) => {
                    let _ = std::fs::remove_file(&socket_path);
                    return Err(StartError::Transport {
                        addr: ccfg.peer_addr,
                        source: Box::new(source),
                    });
                }
            };
            let c = Cluster::new(
                local.clone(),
                ccfg,
                parts.meta,
                endpoint,
                outbox,
                tasks.clone(),
                shutdown.clone(),
            );
            let record = NodeRecord {
                node_id: local.cfg.node_id.clone(),
                incarnation: c.incarnation,
                peer_addr: c.peer_addr().to_string(),
                http_addr: http_addr.map(|a| a.to_string()),
                socket: socket_path.display().to_string(),
                arena_bytes: local.cfg.shm_size,
                pid: std::process::id(),
            };
            c.spawn(notes, record);
            in_cluster = Some(c);
        }
        let (book, tokens) = match &meta {
            Some(m) => {
                let (book, follower) = TokenBook::follow(m.clone());
                (Some(book), Some(follower))
            }
            None => (None, None),
        };
        let own_uid = nix::unistd::getuid().as_raw();
        let auth = Auth::new(local.cfg.uid_map(own_uid), book);
        if let Some(m) = &meta {
            tasks.spawn(follow_quotas(local.clone(), m.clone(), shutdown.clone()));
        }
        let worker = Arc::new(Worker::new(local, in_cluster, auth));
        tasks.spawn(accept_loop(
            worker.clone(),
            listener,
            shutdown.clone(),
            tasks.clone(),
        ));
        tasks.spawn(timer_loop(worker.local.clone(), shutdown.clone()));
        if let Some(l) = http_listener {
            tasks.spawn(http::serve(l, worker.clone(), metrics, shutdown.clone()));
        }
        let poller = if worker.local.cfg.mailbox {
            let w = worker.clone();
            let spin = worker.local.cfg.mailbox_spin;
            let spawned = std::thread::Builder::new()
                .name("shoal-mailbox".into())
                .spawn(move || w.ring.run(&w, spin));
            match spawned {
                Ok(h) => Some(h),
                Err(e) => {
                    shutdown.cancel();
                    return Err(StartError::Thread(e));
                }
            }
        } else {
            None
        };
        tracing::info!(
            node = %worker.local.cfg.node_id,
            socket = %socket_path.display(),
            shm_bytes = worker.local.cfg.shm_size,
            arena_bytes = worker.local.arena.size(),
            http = ?http_addr,
            "dataworker ready"
        );
        Ok(Dataworker {
            worker,
            shutdown,
            tasks,
            socket_path,
            http_addr,
            poller,
            tokens,
        })
    }

    /// The socket clients connect to.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Where `/metrics` and `/health` are served, if anywhere.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The QUIC address other dataworkers reach this node on, when it is in a cluster.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.worker.cluster.as_ref().map(|c| c.peer_addr())
    }

    /// Current figures.
    pub fn status(&self) -> StatusInfo {
        self.worker.status()
    }

    /// A token that stops the worker when cancelled (e.g. from a signal handler).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, closes every connection (releasing their pins), stops the timer and
    /// the HTTP endpoint, waits for all of it, and removes the socket file.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.wait().await;
    }

    /// Waits until the worker has stopped (after the shutdown token was cancelled).
    pub async fn wait(mut self) {
        self.shutdown.cancelled().await;
        self.tasks.close();
        self.tasks.wait().await;
        if let Some(t) = self.tokens.take() {
            t.stop().await;
        }
        if let Some(h) = self.poller.take() {
            self.worker.ring.request_stop();
            self.worker.local.ctl.wake_worker();
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        let _ = std::fs::remove_file(&self.socket_path);
        tracing::info!(node = %self.worker.local.cfg.node_id, "dataworker stopped");
    }
}

async fn accept_loop(
    worker: Arc<Worker>,
    listener: UnixListener,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let mut next_client = 1u64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let client = next_client;
                    next_client += 1;
                    tasks.spawn(conn::serve(worker.clone(), stream, client, shutdown.clone()));
                }
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Keeps the store's tenant limits equal to `quotas/` (a fresh read after every broken
/// watch; while the store is down the last limits stay in force).
async fn follow_quotas(local: Arc<Local>, meta: Arc<dyn MetaStore>, shutdown: CancellationToken) {
    let mut f = Follower::new(meta, QUOTAS_PREFIX, Duration::from_millis(250));
    let parse = |key: &str, value: &[u8]| -> Option<(String, Quota)> {
        let tenant = key.strip_prefix(QUOTAS_PREFIX)?;
        validate_tenant(tenant).ok()?;
        match serde_json::from_slice::<Quota>(value) {
            Ok(q) if q.validate().is_ok() => Some((tenant.to_owned(), q)),
            _ => {
                tracing::warn!(key, "malformed quota record; ignored");
                None
            }
        }
    };
    while let Some(next) = f.next(&shutdown).await {
        match next {
            Followed::Snapshot(kvs) => local.set_quotas(
                kvs.iter()
                    .filter_map(|kv| parse(&kv.key, &kv.value))
                    .collect(),
            ),
            Followed::Event(WatchEvent::Put(kv)) => {
                if let Some((t, q)) = parse(&kv.key, &kv.value) {
                    local.set_quota(&t, Some(q));
                }
            }
            Followed::Event(WatchEvent::Delete { key, .. }) => {
                if let Some(t) = key.strip_prefix(QUOTAS_PREFIX) {
                    local.set_quota(t, None);
                }
            }
        }
    }
}

/// Advances the shared clock every 10 ms and wakes exactly at the next KV deadline.
async fn timer_loop(local: Arc<Local>, shutdown: CancellationToken) {
    let tick = Duration::from_millis(10);
    loop {
        let next = local.tick();
        let now = local.now_ms();
        let wait = next.map_or(tick, |t| {
            Duration::from_millis(t.saturating_sub(now)).min(tick)
        });
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
