//! shoal's control plane (`shoal control`): it keeps the cluster's metadata and watches its
//! membership, and answers operators over HTTP.
//!
//! - **Metadata.** Control serves a [`MetaStore`] to the nodes over mutual TLS under the cluster
//!   CA ([`shoal_meta::serve`], with control's own certificate; never plain TCP):
//!   its embedded, file-persisted [`shoal_meta::MemStore`] on one machine, or etcd (nodes may
//!   also talk to etcd directly). Control is never on the data path: nodes keep serving
//!   local and already-known remote objects while it is down.
//! - **Leadership.** Several control processes may share one etcd; they elect a leader with
//!   [`shoal_meta::Election`] (a lease plus a create-if-absent transaction). Standbys answer
//!   every read and say who leads.
//! - **Registry.** Functions and pools, validated and stored in the metadata store
//!   ([`Registry`]); instance records written by the agents are listed from it.
//! - **Placement.** While leading, control keeps each function's instance records between its
//!   minimum and maximum on the nodes that have a live agent (`agents/<node>`), replacing lost
//!   and failed ones and deleting those of removed functions; the agents run what the records
//!   say (`shoal_meta::records` holds every record and key).
//! - **HTTP.** A JSON REST API ([`api_routes`] lists it; `openapi.json` documents it and is
//!   served at `/v1/openapi.json`): functions, pools, instances, invoke, tokens, tenant
//!   quotas, plus `/health`, `/v1/nodes`, `/v1/leader`, `/metrics`. Writes go to the leader;
//!   a standby answers them with 503 `Unavailable` naming the leader, and serves every read
//!   itself.
//! - **Authentication and tenants.** Every route but `/health` and `/healthz` needs a bearer
//!   token, checked against a [`shoal_meta::TokenBook`] that follows `tokens/` (a revoked
//!   token stops working within a second); its role decides the actions (403 otherwise) and
//!   its tenant what it sees: another tenant's function answers 404, as a missing one does,
//!   and listings hold the caller's tenant only. `/metrics` is open on a loopback listener
//!   only. Tenant quotas bound what a tenant's functions may take (429 `QuotaExceeded`).
//! - **Admin token.** With [`ControlConfig::admin_token_file`], the leader makes sure that
//!   file holds an operator token (0600, written atomically): how the local user of
//!   `shoal up` gets a credential without asking anyone.
//!
//! Holds no `unsafe` and never reads the environment: everything comes in through
//! [`ControlConfig`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod admin_token;
mod auth;
mod frontend;
mod http;
mod logs;
mod placement;
mod registry;
mod router;
mod tokens_api;

pub use admin_token::AdminTokenState;
pub use frontend::FrontendConfig;
pub use placement::{FAILED_RETRY, MAX_WRITES_PER_PASS, NODE_LOST_GRACE, PLACEMENT_INTERVAL};
pub use registry::{home_tenant, sees, QuotaStatus, Registry, RegistryError, TenantUsage};

/// Not an API: the REST bodies no public type describes, for shoal's fuzz targets
/// (`common/fuzz`), which decode them from what a client could send. Hidden from the docs; it
/// may change with any commit.
#[doc(hidden)]
pub mod fuzz_support {
    pub use crate::tokens_api::TokenRequest;
}

use shoal_meta::records::{LeaderInfo, NodeRecord, LEADER_KEY, NODES_PREFIX};
use shoal_meta::{Election, MetaStore, Role, TokenBook, TokenFollower};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Default limit of an invoke request body: 6 MiB.
pub const DEFAULT_MAX_INVOKE_BODY: usize = 6 << 20;
/// Largest JSON request body the HTTP API reads: 1 MiB.
pub const MAX_JSON_BODY: usize = router::MAX_JSON_BODY;

/// Every (method, path template) the HTTP API serves, e.g. `("GET", "/v1/functions/{name}")`.
/// This is the router's own table; `openapi.json` is tested against it.
pub fn api_routes() -> Vec<(&'static str, &'static str)> {
    router::ROUTES
        .iter()
        .map(|r| (r.verb.as_str(), r.path))
        .collect()
}

/// The OpenAPI 3.0 document of the HTTP API (served at `/v1/openapi.json`).
pub const OPENAPI_JSON: &str = router::OPENAPI;

/// Everything a control process needs, validated once at start.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Where the metadata API is served to nodes (None: not served).
    pub meta_addr: Option<SocketAddr>,
    /// Control's certificate for the metadata API (mutual TLS: nodes present theirs). Required
    /// when `meta_addr` is set; start refuses to serve the API without it.
    pub meta_tls: Option<shoal_pki::ControlTls>,
    /// Where the HTTP API is served.
    pub http_addr: SocketAddr,
    /// Lease TTL of the leader record: a dead leader is replaced within it.
    pub election_ttl: Duration,
    /// Name of this control process in the leader record.
    pub name: String,
    /// Largest invoke request body, in bytes ([`DEFAULT_MAX_INVOKE_BODY`] unless configured).
    pub max_invoke_body: usize,
    /// Where invoke requests go.
    pub frontend: FrontendConfig,
    /// Keep an operator token in this file (`--admin-token-file`): see
    /// [`Control::admin_token`]. `None`: control writes no token anywhere.
    pub admin_token_file: Option<PathBuf>,
}

/// Why control did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The metadata API address could not be bound.
    #[error("metadata API {addr} (--listen): {source}")]
    MetaListen {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The metadata API was asked for without control's certificate.
    #[error("metadata API {addr} (--listen): no TLS identity for control (pass --tls-dir or --control-cert/--control-key/--ca-cert; the API is mutual TLS only)")]
    MetaTlsMissing {
        /// Address.
        addr: SocketAddr,
    },
    /// The HTTP address could not be bound.
    #[error("HTTP API {addr} (--http-addr): {source}")]
    HttpListen {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// State the HTTP API reads.
#[derive(Debug)]
pub(crate) struct View {
    pub(crate) name: String,
    pub(crate) nodes: RwLock<BTreeMap<String, NodeRecord>>,
    pub(crate) role: tokio::sync::watch::Receiver<Role>,
    pub(crate) meta: Arc<dyn MetaStore>,
    pub(crate) registry: Registry,
    pub(crate) max_invoke_body: usize,
    pub(crate) frontend: frontend::Frontend,
    pub(crate) auth: auth::Auth,
}

impl View {
    pub(crate) fn role(&self) -> (&'static str, Option<LeaderInfo>) {
        match &*self.role.borrow() {
            Role::Leader => ("leader", None),
            Role::Follower { leader } => ("standby", serde_json::from_slice(leader).ok()),
            Role::Candidate => ("candidate", None),
        }
    }
}

/// A running control process.
#[derive(Debug)]
pub struct Control {
    view: Arc<View>,
    election: Option<Election>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    meta_addr: Option<SocketAddr>,
    http_addr: SocketAddr,
    tokens: Option<TokenFollower>,
    admin_token: tokio::sync::watch::Receiver<AdminTokenState>,
}

impl Control {
    /// Binds the APIs, starts the election and the membership watch. Must run in a runtime.
    pub async fn start(
        cfg: ControlConfig,
        meta: Arc<dyn MetaStore>,
        metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    ) -> Result<Control, StartError> {
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let meta_listener = match (cfg.meta_addr, &cfg.meta_tls) {
            (Some(addr), Some(tls)) => Some((
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::MetaListen { addr, source })?,
                tls.clone(),
            )),
            (Some(addr), None) => return Err(StartError::MetaTlsMissing { addr }),
            (None, _) => None,
        };
        let http = tokio::net::TcpListener::bind(cfg.http_addr)
            .await
            .map_err(|source| StartError::HttpListen {
                addr: cfg.http_addr,
                source,
            })?;
        let http_addr = http.local_addr().unwrap_or(cfg.http_addr);
        let meta_addr = meta_listener
            .as_ref()
            .and_then(|(l, _)| l.local_addr().ok());
        if let Some((l, tls)) = meta_listener {
            tasks.spawn(shoal_meta::serve(meta.clone(), l, tls, shutdown.clone()));
        }
        let leader = LeaderInfo {
            name: cfg.name.clone(),
            http_addr: http_addr.to_string(),
        };
        let election = Election::start(
            meta.clone(),
            LEADER_KEY.to_string(),
            serde_json::to_vec(&leader).unwrap_or_default(),
            cfg.election_ttl,
        );
        let (book, tokens) = TokenBook::follow(meta.clone());
        let view = Arc::new(View {
            name: cfg.name.clone(),
            nodes: RwLock::new(BTreeMap::new()),
            role: election.subscribe(),
            meta: meta.clone(),
            registry: Registry::new(meta.clone()),
            max_invoke_body: cfg.max_invoke_body,
            frontend: frontend::Frontend::new(cfg.frontend.clone(), meta.clone()),
            auth: auth::Auth::new(book, http_addr.ip().is_loopback()),
        });
        let (admin_tx, admin_token) = tokio::sync::watch::channel(AdminTokenState::Pending);
        if let Some(path) = cfg.admin_token_file.clone() {
            tasks.spawn(admin_token::run(
                meta.clone(),
                path,
                election.subscribe(),
                admin_tx,
                shutdown.clone(),
            ));
        } else {
            admin_tx.send_replace(AdminTokenState::Ready);
        }
        tasks.spawn(watch_nodes(view.clone(), shutdown.clone()));
        tasks.spawn(log_role(view.clone(), shutdown.clone()));
        tasks.spawn(placement::run(
            meta.clone(),
            election.subscribe(),
            shutdown.clone(),
        ));
        tasks.spawn(http::serve(http, view.clone(), metrics, shutdown.clone()));
        tracing::info!(name = %cfg.name, http = %http_addr, meta = ?meta_addr, "control ready");
        Ok(Control {
            view,
            election: Some(election),
            shutdown,
            tasks,
            meta_addr,
            http_addr,
            tokens: Some(tokens),
            admin_token,
        })
    }

    /// Waits until the admin token file ([`ControlConfig::admin_token_file`]) is settled:
    /// it holds an operator token ([`AdminTokenState::Ready`], also when none is configured),
    /// this control is a standby and the leader writes it ([`AdminTokenState::Standby`]), or
    /// it cannot be written ([`AdminTokenState::Failed`]). Pending while the store does not
    /// answer or no control leads yet.
    pub async fn admin_token(&self) -> AdminTokenState {
        let mut rx = self.admin_token.clone();
        let settled = rx
            .wait_for(|s| *s != AdminTokenState::Pending)
            .await
            .map(|s| s.clone());
        // The sender only goes away at shutdown.
        settled.unwrap_or(AdminTokenState::Pending)
    }

    /// Where nodes reach the metadata API.
    pub fn meta_addr(&self) -> Option<SocketAddr> {
        self.meta_addr
    }

    /// Where the HTTP API is served.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Whether this process leads now.
    pub fn is_leader(&self) -> bool {
        matches!(*self.view.role.borrow(), Role::Leader)
    }

    /// The nodes registered now.
    pub fn nodes(&self) -> Vec<NodeRecord> {
        read(&self.view.nodes).values().cloned().collect()
    }

    /// Resigns leadership, stops the APIs and waits for every task.
    pub async fn shutdown(mut self) {
        if let Some(e) = self.election.take() {
            e.stop().await;
        }
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.view.frontend.close().await;
        if let Some(t) = self.tokens.take() {
            t.stop().await;
        }
        tracing::info!("control stopped");
    }
}

pub(crate) fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

async fn log_role(view: Arc<View>, shutdown: CancellationToken) {
    let mut rx = view.role.clone();
    loop {
        let (role, leader) = view.role();
        tracing::info!(name = %view.name, role, leader = ?leader.map(|l| l.name), "control role");
        metrics::gauge!("shoal_control_leader").set(if role == "leader" { 1.0 } else { 0.0 });
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = rx.changed() => if r.is_err() { break },
        }
    }
}

/// Keeps `view.nodes` equal to the `nodes/` keys: range, then watch from that revision;
/// again after the watch breaks (store unreachable), keeping the last view meanwhile.
async fn watch_nodes(view: Arc<View>, shutdown: CancellationToken) {
    let mut follower =
        shoal_meta::Follower::new(view.meta.clone(), NODES_PREFIX, Duration::from_millis(500));
    while let Some(f) = follower.next(&shutdown).await {
        let mut nodes = view.nodes.write().unwrap_or_else(|p| p.into_inner());
        match f {
            shoal_meta::Followed::Snapshot(kvs) => {
                *nodes = kvs
                    .iter()
                    .filter_map(|kv| serde_json::from_slice::<NodeRecord>(&kv.value).ok())
                    .map(|r| (r.node_id.clone(), r))
                    .collect();
            }
            shoal_meta::Followed::Event(shoal_meta::WatchEvent::Put(kv)) => {
                if let Ok(r) = serde_json::from_slice::<NodeRecord>(&kv.value) {
                    tracing::info!(node = %r.node_id, addr = %r.peer_addr, "node registered");
                    nodes.insert(r.node_id.clone(), r);
                }
            }
            shoal_meta::Followed::Event(shoal_meta::WatchEvent::Delete { key, .. }) => {
                if let Some(id) = key.strip_prefix(NODES_PREFIX) {
                    tracing::warn!(node = %id, "node left (lease revoked or expired)");
                    nodes.remove(id);
                }
            }
        }
        metrics::gauge!("shoal_cluster_nodes").set(nodes.len() as f64);
    }
}
