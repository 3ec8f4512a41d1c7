//! Membership: this node's record in `nodes/` and its view of the others.
//!
//! The membership task registers the record under a lease in the background (start-up does
//! not wait for the store), keeps the lease alive, registers again after a lost lease or a
//! store restart, and revokes the lease when the worker shuts down. It follows `nodes/` with a
//! [`Follower`]; each new membership is installed by [`Cluster::set_members`]:
//! the ring is rebuilt from it, and what departed nodes take with them is [`super::node_loss`]'s.
//!
//! Invariant: the view only changes on what the store says. When the store is unreachable the
//! node keeps its last view (the data path never waits on the store); the node itself is
//! always on its own ring, registered or not.
use super::{Cluster, Note};
use shoal_meta::records::{node_key, NODES_PREFIX};
use shoal_meta::{Followed, Follower, MetaError, WatchEvent};
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

    /// Registers `record` in `nodes/` under a lease, keeps it alive (registering again when
    /// the lease is lost) and follows the membership until shutdown, then revokes the lease.
    /// Its tick also ages out the directory's tombstones; it asks for the periodic resync.
    pub(super) async fn membership(self: Arc<Self>, record: NodeRecord) {
        let shutdown = self.shutdown.clone();
        let key = node_key(&self.node_id);
        let value = match serde_json::to_vec(&record) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode the node record");
                return;
            }
        };
        let ttl = self.cfg.lease_ttl;
        let mut lease = None;
        let mut members = Follower::new(self.meta.clone(), NODES_PREFIX, MEMBERSHIP_RETRY);
        let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut resync = tokio::time::interval(self.cfg.resync_interval);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        loop {
            if lease.is_none() {
                match self.register(&key, &value, ttl).await {
                    Ok(l) => {
                        lease = Some(l);
                        warned = false;
                        tracing::info!(node = %self.node_id, "registered in the cluster");
                    }
                    Err(e) if !warned => {
                        warned = true;
                        tracing::warn!(error = %e, "cannot register with the metadata store; retrying");
                    }
                    Err(_) => {}
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    if let Some(l) = lease {
                        match self.meta.keep_alive(l).await {
                            Ok(_) => {}
                            Err(MetaError::LeaseNotFound(_)) => {
                                tracing::warn!(node = %self.node_id, "lease expired; registering again");
                                lease = None;
                            }
                            Err(e) => tracing::debug!(error = %e, "keepalive failed; keeping the last view"),
                        }
                    }
                    self.dir().dir.expire(self.now_ms());
                }
                _ = resync.tick() => self.note(Note::Resync),
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
        if let Some(l) = lease {
            // Leave at once instead of after the TTL; best effort.
            let _ = tokio::time::timeout(Duration::from_secs(1), self.meta.revoke(l)).await;
        }
    }

    async fn register(&self, key: &str, value: &[u8], ttl: Duration) -> Result<i64, MetaError> {
        let lease = self.meta.grant(ttl).await?;
        self.meta.put(key, value.to_vec(), Some(lease)).await?;
        Ok(lease)
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
