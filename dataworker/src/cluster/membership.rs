//! Membership: this node's record in `nodes/` and its view of the others.
//!
//! The record is held by a [`LeasedRecord`]: registered in the background (start-up does not
//! wait for the store), kept alive, registered again after a lost lease or a store restart,
//! and removed when the worker shuts down. The membership task owns that handle and a
//! [`Follower`] of `nodes/`; each new membership is installed by [`Cluster::set_members`]:
//! the ring is rebuilt from it, and what departed nodes take with them is [`super::node_loss`]'s.
//!
//! Invariant: the view only changes on what the store says. When the store is unreachable the
//! node keeps its last view (the data path never waits on the store); the node itself is
//! always on its own ring, registered or not.
use super::{Cluster, Note};
use shoal_meta::records::{node_key, NODES_PREFIX};
use shoal_meta::{Followed, Follower, LeasedRecord, WatchEvent};
use shoal_protocol::{NodeRecord, ObjectId};
use shoal_store::{Ring, DEFAULT_VNODES};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Pause before reading the membership again after the store failed.
const MEMBERSHIP_RETRY: Duration = Duration::from_millis(300);

/// The membership as this node last saw it.
#[derive(Debug)]
pub(super) struct View {
    members: BTreeMap<String, NodeRecord>,
    ring: Ring,
}

impl View {
    /// No members seen yet: a ring of this node alone.
    pub(super) fn alone(node_id: &str) -> View {
        View {
            members: BTreeMap::new(),
            ring: Ring::new([node_id.to_string()], DEFAULT_VNODES),
        }
    }
}

impl Cluster {
    fn view(&self) -> std::sync::RwLockReadGuard<'_, View> {
        self.view.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Node records of the members this node sees (itself included once registered).
    pub(crate) fn members(&self) -> Vec<NodeRecord> {
        self.view().members.values().cloned().collect()
    }

    /// The directory owners of `id` on the current ring, primary first.
    pub(super) fn owners(&self, id: &ObjectId) -> Vec<String> {
        self.view()
            .ring
            .owners(id.as_str().as_bytes(), self.cfg.directory_copies)
            .into_iter()
            .map(str::to_string)
            .collect()
    }

    /// Where a member serves peers, if it is one.
    pub(super) fn addr_of(&self, node: &str) -> Option<SocketAddr> {
        self.view()
            .members
            .get(node)
            .and_then(|r| r.peer_addr.parse().ok())
    }

    /// Holds `record` in `nodes/` and follows the membership until shutdown, then removes it.
    pub(super) async fn membership(self: Arc<Self>, record: NodeRecord) {
        let value = match serde_json::to_vec(&record) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode the node record");
                return;
            }
        };
        let lease = LeasedRecord::spawn(
            self.meta.clone(),
            node_key(&self.node_id),
            value,
            self.cfg.lease_ttl,
        );
        let mut registered = lease.registered();
        let mut watch_registration = true;
        let mut members = Follower::new(self.meta.clone(), NODES_PREFIX, MEMBERSHIP_RETRY);
        let shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = registered.changed(), if watch_registration => match r {
                    Ok(()) => {
                        if *registered.borrow_and_update() {
                            tracing::info!(node = %self.node_id, "registered in the cluster");
                        }
                    }
                    // The record's task ended (it only does when stopped): nothing more to hear.
                    Err(_) => watch_registration = false,
                },
                // `next` is cancel-safe: a read or watch it gave up on is simply made again.
                f = members.next(&shutdown) => match f {
                    Some(Followed::Snapshot(kvs)) => self.set_members(
                        kvs.into_iter()
                            .filter_map(|kv| serde_json::from_slice::<NodeRecord>(&kv.value).ok())
                            .map(|r| (r.node_id.clone(), r))
                            .collect(),
                    ),
                    Some(Followed::Event(ev)) => self.apply_event(ev),
                    None => break,
                },
            }
        }
        // Leave at once instead of after the TTL; best effort, bounded.
        lease.stop().await;
    }

    fn apply_event(&self, ev: WatchEvent) {
        let mut members = self.view().members.clone();
        match ev {
            WatchEvent::Put(kv) => {
                if let Ok(r) = serde_json::from_slice::<NodeRecord>(&kv.value) {
                    members.insert(r.node_id.clone(), r);
                }
            }
            WatchEvent::Delete { key, .. } => {
                if let Some(id) = key.strip_prefix(NODES_PREFIX) {
                    members.remove(id);
                }
            }
        }
        self.set_members(members);
    }

    /// Installs a new membership: rebuilds the ring, applies what the departures and
    /// restarts mean for the directory, and re-registers everything held with the (possibly
    /// new) owners.
    fn set_members(&self, members: BTreeMap<String, NodeRecord>) {
        let change = {
            let v = self.view();
            if v.members == members {
                return;
            }
            super::node_loss::Change::between(&v.members, &members)
        };
        let mut ids: Vec<String> = members.keys().cloned().collect();
        ids.push(self.node_id.clone());
        let ring = Ring::new(ids, DEFAULT_VNODES);
        let nodes = members.len();
        {
            let mut w = self.view.write().unwrap_or_else(|p| p.into_inner());
            w.members = members;
            w.ring = ring.clone();
        }
        self.apply_change(&change, &ring);
        metrics::gauge!("shoal_cluster_nodes").set(nodes as f64);
        self.note(Note::Resync);
    }
}
