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
use crate::tenancy::{Auth, Caller};
use shoal_protocol::{CtlLayout, Hello, Request, Response, StatusInfo, PROTOCOL_VERSION};
use shoal_shm::{Mailbox, ShmError};
use shoal_store::ClientId;
use std::os::fd::OwnedFd;
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

    /// The hello for a new connection and the fds that go with it, in the order
    /// [`Hello`] documents: the arena and the index (read-only), the bell page, the pin page
    /// (made now, when the client got a `region`) and the mailbox.
    pub(crate) fn hello(
        &self,
        client: ClientId,
        region: Option<u32>,
        mailbox: Option<&Mailbox>,
        caller: &Caller,
    ) -> Result<(Hello, Vec<OwnedFd>), ShmError> {
        let l = &self.local;
        let dup = |fd: std::os::fd::BorrowedFd<'_>| {
            fd.try_clone_to_owned()
                .map_err(|source| ShmError::Map { size: 0, source })
        };
        let mut fds = vec![l.arena_fd()?, l.ctl.index_fd()?, dup(l.ctl.bell_fd())?];
        let page = region.and_then(|r| l.attach_pin_page(r, &caller.tenant));
        let fast_path = page.is_some();
        fds.extend(page);
        if let Some(m) = mailbox {
            fds.push(dup(m.fd())?);
        }
        let hello = Hello {
            version: PROTOCOL_VERSION,
            client_id: client,
            node_id: l.cfg.node_id.clone(),
            arena_bytes: l.arena.size(),
            ctl: CtlLayout {
                buckets: l.ctl.buckets(),
                pins: l.ctl.pins_per_client(),
                ring: l.ctl.read_ring(),
            },
            fast_path,
            mailbox: mailbox.map(|m| m.capacity()),
            inline_limit: l.cfg.inline_limit,
            max_frame: l.cfg.max_frame() as u32,
            tenant: caller.tenant.clone(),
        };
        Ok((hello, fds))
    }

    /// Releases everything a client held, at once.
    pub(crate) fn client_left(&self, client: ClientId, region: Option<u32>) {
        // Close the mailbox first: a request being handled there finishes before cleanup.
        self.ring.remove(client);
        self.local.client_left(client, region);
    }
}
