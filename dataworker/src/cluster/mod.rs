//! The dataworker in a cluster: membership, the directory shard this node owns, and remote
//! gets over QUIC.
//!
//! - **Membership** ([`membership`]). The node's record `nodes/<id>` is held in the metadata
//!   store under a lease ([`shoal_meta::LeasedRecord`]); the node follows `nodes/` and rebuilds
//!   the ring when a node comes or goes. When the store is unreachable the node keeps its last
//!   view: the data path never waits on it.
//! - **Node loss** ([`node_loss`]). A node that left or restarted takes its copies with it:
//!   the directory drops them, ids without a copy left answer `ObjectLost`, and the
//!   connection to the departed node is closed.
//! - **Directory** ([`directory`]). Each object id has `directory_copies` owners on the ring
//!   (primary first). Owners keep a shard of the directory, answer `Locate` (waiting for a
//!   seal when asked to) and carry deletes to every holder.
//! - **Outbox** ([`outbox`]). A node that seals an object, or pulls a replica, tells the owners
//!   (batched). A full re-registration runs after every ring change and periodically
//!   (anti-entropy), so new owners learn what they own and a node that re-joins is found again.
//! - **Remote get** ([`pull`]). A get of an id that is not local asks the primary owner where
//!   it is (waiting there until it is sealed, up to the get's deadline), creates an unsealed
//!   replica buffer in the local arena, pulls the bytes from a holder in parallel ranges over
//!   several QUIC streams straight into that buffer, seals it and registers the replica. A
//!   failed pull aborts the buffer: nothing half-written becomes visible or leaks.
//! - **Peer service** ([`peer`]). What this node answers other dataworkers on QUIC.
//!
//! Ownership: [`Cluster`] owns the QUIC endpoint, the membership view, the directory shard and
//! the pulls in flight, and holds an `Arc` of the node's [`Local`] store (to serve and store
//! copies). It holds nothing of the client-facing [`crate::worker::Worker`], which holds an
//! `Arc<Cluster>`; the local store reaches the cluster only through the [`Outbox`] channel.
//! The tasks [`Cluster::spawn`] starts (peer server, membership, outbox, directory expiry)
//! and the pulls run on the worker's task tracker and stop with its shutdown token.
//!
//! Only sans-IO pieces decide ([`shoal_store::Ring`], [`shoal_store::Directory`]); this module
//! does the IO.
mod directory;
mod membership;
mod node_loss;
mod outbox;
mod peer;
mod pull;

pub(crate) use outbox::{Note, Outbox};

use crate::local::Local;
use crate::ClusterConfig;
use directory::DirState;
use membership::View;
use pull::Pulls;
use shoal_meta::MetaStore;
use shoal_protocol::{ErrorCode, NodeRecord, WireError};
use shoal_transport::Endpoint;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long one directory call to another node may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// This node's part of the cluster; see the module docs for what it owns.
pub(crate) struct Cluster {
    pub(crate) node_id: String,
    pub(crate) incarnation: u64,
    cfg: ClusterConfig,
    /// The node's local store, shared with the worker.
    local: Arc<Local>,
    meta: Arc<dyn MetaStore>,
    endpoint: Endpoint,
    view: std::sync::RwLock<View>,
    dir: std::sync::Mutex<DirState>,
    pulls: Pulls,
    outbox: Outbox,
    /// The clock of the directory shard.
    start: Instant,
    /// The worker's tasks and shutdown: pulls run there, detached from the gets that wait.
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.node_id)
            .field("incarnation", &self.incarnation)
            .finish_non_exhaustive()
    }
}

fn wire(code: ErrorCode, msg: impl Into<String>) -> WireError {
    WireError::new(code, msg)
}

fn transport_err(e: &shoal_transport::TransportError) -> WireError {
    use shoal_transport::TransportError as T;
    let code = match e {
        T::Refused { .. } => ErrorCode::PermissionDenied,
        T::FrameTooLarge { .. }
        | T::Malformed { .. }
        | T::Decode { .. }
        | T::UnexpectedBody { .. } => ErrorCode::ProtocolError,
        e if e.is_unreachable() => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    };
    wire(code, e.to_string())
}

impl Cluster {
    /// Builds the cluster side of a worker over its `local` store; `outbox` is the sending
    /// half of the channel whose receiver [`Cluster::spawn`] drains (the local store holds a
    /// clone). [`Cluster::spawn`] starts its tasks.
    pub(crate) fn new(
        local: Arc<Local>,
        cfg: ClusterConfig,
        meta: Arc<dyn MetaStore>,
        endpoint: Endpoint,
        outbox: Outbox,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Cluster> {
        let node_id = local.cfg.node_id.clone();
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Arc::new(Cluster {
            view: std::sync::RwLock::new(View::alone(&node_id)),
            dir: std::sync::Mutex::new(DirState::new()),
            node_id,
            incarnation,
            cfg,
            local,
            meta,
            endpoint,
            pulls: Pulls::default(),
            outbox,
            start: Instant::now(),
            tasks,
            shutdown,
        })
    }

    /// Starts the peer server, membership (holding `record` in `nodes/`), the outbox (draining
    /// `notes`) and directory expiry on the worker's tasks.
    pub(crate) fn spawn(self: &Arc<Self>, notes: mpsc::Receiver<Note>, record: NodeRecord) {
        let server = self
            .endpoint
            .serve(peer::service(self.clone()), self.shutdown.clone());
        self.tasks.spawn(async move {
            let _ = server.await;
        });
        self.tasks.spawn(self.clone().membership(record));
        self.tasks.spawn(self.clone().outbox(notes));
        self.tasks.spawn(self.clone().expire_directory());
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// The QUIC address this node serves peers on.
    pub(crate) fn peer_addr(&self) -> SocketAddr {
        self.endpoint.local_addr()
    }

    /// Reports a change to the owners, without waiting.
    fn note(&self, n: Note) {
        self.outbox.note(n);
    }
}
