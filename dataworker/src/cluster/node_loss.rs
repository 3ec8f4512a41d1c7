//! What a membership change means for the objects: a node that left, or restarted (a new
//! incarnation), took its copies with it.
//!
//! [`Change::between`] compares two memberships (pure); [`Cluster::apply_change`] applies the
//! result to the directory shard: copies of departed incarnations are dropped, ids left
//! without a copy become lost (gets waiting for them at this owner answer `ObjectLost` at
//! once), entries this node no longer owns on the new ring are forgotten, and connections to
//! departed processes are closed. Registrations from the survivors follow (the membership
//! asks for a resync after every change).
use super::Cluster;
use shoal_protocol::NodeRecord;
use shoal_store::Ring;
use std::collections::BTreeMap;

/// How one membership differs from the next, by node incarnation.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Change {
    /// Old records of the nodes that left or restarted: those processes are gone.
    gone: Vec<NodeRecord>,
    /// Of those, the nodes not in the new membership at all.
    left: Vec<String>,
    /// Nodes that joined, or came back with a new incarnation.
    up: Vec<NodeRecord>,
}

impl Change {
    /// The change from `old` to `new`.
    pub(super) fn between(
        old: &BTreeMap<String, NodeRecord>,
        new: &BTreeMap<String, NodeRecord>,
    ) -> Change {
        let gone: Vec<NodeRecord> = old
            .values()
            .filter(|o| {
                new.get(&o.node_id)
                    .is_none_or(|n| n.incarnation != o.incarnation)
            })
            .cloned()
            .collect();
        let left = gone
            .iter()
            .filter(|r| !new.contains_key(&r.node_id))
            .map(|r| r.node_id.clone())
            .collect();
        let up = new
            .values()
            .filter(|n| {
                old.get(&n.node_id)
                    .is_none_or(|o| o.incarnation != n.incarnation)
            })
            .cloned()
            .collect();
        Change { gone, left, up }
    }
}

impl Cluster {
    /// Applies `change` to the directory shard for the new `ring`; see the module docs.
    pub(super) fn apply_change(&self, change: &Change, ring: &Ring) {
        let now = self.now_ms();
        let mut lost = Vec::new();
        {
            let mut d = self.dir();
            for node in &change.left {
                tracing::info!(%node, "node left the cluster");
                lost.extend(d.dir.node_down(node, now));
            }
            for r in &change.up {
                tracing::info!(node = %r.node_id, addr = %r.peer_addr, "node joined the cluster");
                lost.extend(d.dir.node_up(&r.node_id, r.incarnation, now));
            }
            let me = self.node_id.as_str();
            let copies = self.cfg.directory_copies;
            d.dir
                .retain_owned(|id| ring.owners(id.as_str().as_bytes(), copies).contains(&me));
            // Gets waiting for an id that just became lost answer ObjectLost now.
            for id in &lost {
                d.waiters.remove(id);
            }
        }
        for r in &change.gone {
            if let Ok(a) = r.peer_addr.parse() {
                self.endpoint.disconnect(a);
            }
        }
        if !lost.is_empty() {
            tracing::warn!(count = lost.len(), "objects lost with their nodes");
            metrics::counter!("shoal_objects_lost_total").increment(lost.len() as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(node: &str, incarnation: u64) -> NodeRecord {
        NodeRecord {
            node_id: node.into(),
            incarnation,
            peer_addr: "127.0.0.1:1".into(),
            http_addr: None,
            socket: String::new(),
            arena_bytes: 0,
            pid: 0,
        }
    }

    fn members(recs: &[NodeRecord]) -> BTreeMap<String, NodeRecord> {
        recs.iter()
            .map(|r| (r.node_id.clone(), r.clone()))
            .collect()
    }

    #[test]
    fn left_restarted_and_joined_nodes_are_told_apart() {
        let old = members(&[rec("a", 1), rec("b", 1), rec("c", 1)]);
        let new = members(&[rec("a", 1), rec("b", 2), rec("d", 1)]);
        let c = Change::between(&old, &new);
        assert_eq!(c.gone, vec![rec("b", 1), rec("c", 1)]);
        assert_eq!(c.left, vec!["c".to_string()]);
        assert_eq!(c.up, vec![rec("b", 2), rec("d", 1)]);
        assert_eq!(Change::between(&new, &new), Change::default());
    }
}
