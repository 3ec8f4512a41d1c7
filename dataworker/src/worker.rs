//! What the client-facing side holds: the accept loop, connections, the mailbox poller, the
//! timer and the HTTP endpoint all share one [`Worker`].
//!
//! Ownership (no cycle): the worker holds an `Arc` of the [`Local`] store and, in a cluster, an
//! `Arc` of the [`Cluster`]; the cluster holds the same `Arc<Local>` and nothing of the worker;
//! the local store holds neither (it reaches the cluster only through its outbox channel).
//! Tasks started on their behalf (connections, deferred requests, the cluster's tasks) hold
//! clones of these `Arc`s and end with the worker's shutdown token.
use crate::cluster::Cluster;
use crate::local::Local;
use crate::ring::Poller;
use crate::tenancy::Auth;
use shoal_protocol::{Request, Response, StatusInfo};
use shoal_store::ClientId;
use std::sync::Arc;

/// The client-facing side's view of the node; see the module docs.
#[derive(Debug)]
pub(crate) struct Worker {
    /// The local store.
    pub(crate) local: Arc<Local>,
    /// This node's part of the cluster, when it is in one.
    pub(crate) cluster: Option<Arc<Cluster>>,
    /// Client mailboxes served by the poller thread.
    pub(crate) ring: Poller,
    /// The runtime, for work the mailbox thread hands off (remote gets, cluster deletes).
    pub(crate) rt: tokio::runtime::Handle,
    /// Who clients are (uid map, token book).
    pub(crate) auth: Auth,
}

impl Worker {
    /// Must be called within the runtime the worker runs on.
    pub(crate) fn new(local: Arc<Local>, cluster: Option<Arc<Cluster>>, auth: Auth) -> Worker {
        Worker {
            local,
            cluster,
            ring: Poller::default(),
            rt: tokio::runtime::Handle::current(),
            auth,
        }
    }

    /// Whether the node is in a cluster (a miss may then be sealed on another node).
    pub(crate) fn in_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// Handles every request that completes without waiting; status includes the members.
    pub(crate) fn handle(&self, client: ClientId, req: Request) -> Response {
        match req {
            Request::Status => Response::Status(self.status()),
            req => self.local.handle(client, req),
        }
    }

    /// Current figures: the local store's, and the members this node sees.
    pub(crate) fn status(&self) -> StatusInfo {
        let mut s = self.local.status();
        if let Some(c) = &self.cluster {
            s.members = c.members();
        }
        s
    }

    /// Releases everything a client held, at once.
    pub(crate) fn client_left(&self, client: ClientId, region: Option<u32>) {
        // Close the mailbox first: a request being handled there finishes before cleanup.
        self.ring.remove(client);
        self.local.client_left(client, region);
    }
}
