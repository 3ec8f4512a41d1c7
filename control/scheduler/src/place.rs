//! Choosing a node: filters, then scorers, then the node id as the tie-break. The rules are
//! documented on [`ClusterState::place`].
use crate::cluster::NodeLoad;
use crate::{ClusterState, NodeView, Policy, Request, Resources, Term};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Why a node cannot take a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum FilterReason {
    /// The node is not healthy.
    #[error("node unhealthy")]
    Unhealthy,
    /// The node is in another pool.
    #[error("pool {node_pool:?} is not the requested {wanted:?}")]
    PoolMismatch {
        /// The request's pool.
        wanted: Option<String>,
        /// The node's pool.
        node_pool: Option<String>,
    },
    /// The node lacks a label of the node selector.
    #[error("label {key}={wanted} required, node has {found:?}")]
    LabelMismatch {
        /// Label key.
        key: String,
        /// Required value.
        wanted: String,
        /// The node's value, if any.
        found: Option<String>,
    },
    /// The node does not match a required affinity term.
    #[error("affinity requires {term}")]
    AffinityUnmet {
        /// The unmet term.
        term: Term,
    },
    /// The node matches a required anti-affinity term.
    #[error("anti-affinity forbids {term}")]
    AntiAffinity {
        /// The matched term.
        term: Term,
    },
    /// The node has not enough free.
    #[error("needs {requested}, {free} free")]
    InsufficientResources {
        /// What the request needs.
        requested: Resources,
        /// What the node has free (reservations count as used).
        free: Resources,
    },
}

/// No node can take a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("no node can take an instance of {function:?}: {}", summarize(.reasons))]
pub struct Unschedulable {
    /// The request's function.
    pub function: String,
    /// Why each node was filtered out; empty when the cluster has no nodes.
    pub reasons: BTreeMap<String, FilterReason>,
}

/// At most this many nodes are named in an [`Unschedulable`] message.
const SHOWN_REASONS: usize = 5;

fn summarize(reasons: &BTreeMap<String, FilterReason>) -> String {
    if reasons.is_empty() {
        return "the cluster has no nodes".to_owned();
    }
    let mut out = String::new();
    for (i, (node, reason)) in reasons.iter().take(SHOWN_REASONS).enumerate() {
        if i > 0 {
            out.push_str("; ");
        }
        let _ = write!(out, "{node}: {reason}");
    }
    if reasons.len() > SHOWN_REASONS {
        let _ = write!(out, "; and {} more", reasons.len() - SHOWN_REASONS);
    }
    out
}

/// Resource scores are fractions in parts per million.
const SCALE: u64 = 1_000_000;

/// How good a feasible node is; compared field by field, higher wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Score {
    /// Matched affinity preference weights minus matched anti-affinity ones.
    preference: i64,
    /// The policy's score, 0..=SCALE.
    resources: u64,
}

/// `used / cap` in parts per million, capped at the whole; a zero capacity is full.
fn fraction(used: u64, cap: u64) -> u64 {
    if cap == 0 {
        return SCALE;
    }
    let f = u128::from(used) * u128::from(SCALE) / u128::from(cap);
    u64::try_from(f).unwrap_or(SCALE).min(SCALE)
}

/// Runs the filters; `Ok` when the node can take the request.
fn filter(node: &NodeView, load: &NodeLoad<'_>, req: &Request) -> Result<(), FilterReason> {
    if !node.healthy {
        return Err(FilterReason::Unhealthy);
    }
    if node.pool != req.pool {
        return Err(FilterReason::PoolMismatch {
            wanted: req.pool.clone(),
            node_pool: node.pool.clone(),
        });
    }
    for (key, wanted) in &req.node_selector {
        let found = node.labels.get(key);
        if found != Some(wanted) {
            return Err(FilterReason::LabelMismatch {
                key: key.clone(),
                wanted: wanted.clone(),
                found: found.cloned(),
            });
        }
    }
    if let Some(term) = req
        .affinity
        .required
        .iter()
        .find(|t| !t.matches(&node.labels, &load.functions))
    {
        return Err(FilterReason::AffinityUnmet { term: term.clone() });
    }
    if let Some(term) = req
        .anti_affinity
        .required
        .iter()
        .find(|t| t.matches(&node.labels, &load.functions))
    {
        return Err(FilterReason::AntiAffinity { term: term.clone() });
    }
    let free = node.capacity.saturating_sub(load.used);
    if !req.resources.fits(free) {
        return Err(FilterReason::InsufficientResources {
            requested: req.resources,
            free,
        });
    }
    Ok(())
}

/// Scores a node that passed the filters.
fn score(node: &NodeView, load: &NodeLoad<'_>, req: &Request) -> Score {
    let preference = req
        .affinity
        .preferred_weight(&node.labels, &load.functions)
        .saturating_sub(
            req.anti_affinity
                .preferred_weight(&node.labels, &load.functions),
        );
    let after = load.used.saturating_add(req.resources);
    let allocated = (fraction(after.cpu_milli, node.capacity.cpu_milli)
        + fraction(after.mem_mib, node.capacity.mem_mib))
        / 2;
    let resources = match req.policy {
        Policy::Spread => SCALE - allocated,
        Policy::BinPack => allocated,
    };
    Score {
        preference,
        resources,
    }
}

impl ClusterState {
    /// The node that should take `req`, given current instances and reservations; or why
    /// each node cannot. Pure: holds nothing (see [`reserve`](Self::reserve) for that), and
    /// the same contents give the same answer whatever order they were added in.
    ///
    /// Filters, in this order (a node's reported reason is the first that rejects it):
    /// health; pool; node selector; required affinity; required anti-affinity; free resources
    /// (capacity minus reservations and resource-holding instances).
    ///
    /// Among the nodes that pass, the highest score wins: first the preferred-affinity weight
    /// (matching affinity preferences add, matching anti-affinity preferences subtract), then the
    /// policy's resource score, computed on the node as it would be *after* placement, in parts per
    /// million, averaged over CPU and memory: [`Policy::Spread`] prefers the least allocated
    /// fraction, [`Policy::BinPack`] the most. A dimension with zero capacity counts as full.
    /// Equal scores go to the smallest node id. Only integers are involved, and nodes are visited
    /// in id order, so the same contents always give the same node.
    pub fn place(&self, req: &Request) -> Result<String, Unschedulable> {
        let loads = self.loads();
        let idle = NodeLoad::default();
        let mut best: Option<(Score, &str)> = None;
        let mut reasons = BTreeMap::new();
        for node in self.nodes.values() {
            let load = loads.get(node.id.as_str()).unwrap_or(&idle);
            if let Err(reason) = filter(node, load, req) {
                reasons.insert(node.id.clone(), reason);
                continue;
            }
            let s = score(node, load, req);
            let better = match best {
                None => true,
                Some((b, id)) => s > b || (s == b && node.id.as_str() < id),
            };
            if better {
                best = Some((s, node.id.as_str()));
            }
        }
        match best {
            Some((_, id)) => Ok(id.to_owned()),
            None => Err(Unschedulable {
                function: req.function.clone(),
                reasons,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{Affinity, InstanceState, InstanceView};

    const BIG: Resources = Resources::new(4000, 4096);

    fn node(id: &str) -> NodeView {
        NodeView::new(id, BIG)
    }

    fn running(c: &mut ClusterState, id: &str, function: &str, node: &str, cpu: u64) {
        c.insert_instance(InstanceView {
            id: id.into(),
            function: function.into(),
            node: node.into(),
            resources: Resources::new(cpu, cpu),
            state: InstanceState::Running,
        })
        .unwrap();
    }

    fn small(function: &str) -> Request {
        Request::new(function, Resources::new(100, 100))
    }

    fn cluster(nodes: impl IntoIterator<Item = NodeView>) -> ClusterState {
        let mut c = ClusterState::new();
        for n in nodes {
            c.upsert_node(n);
        }
        c
    }

    fn reason(c: &ClusterState, req: &Request, node: &str) -> FilterReason {
        c.place(req).unwrap_err().reasons[node].clone()
    }

    #[test]
    fn health_filter() {
        let mut sick = node("a");
        sick.healthy = false;
        let c = cluster([sick, node("b")]);
        assert_eq!(c.place(&small("f")).unwrap(), "b");
        let c = cluster([c.node("a").unwrap().clone()]);
        assert_eq!(reason(&c, &small("f"), "a"), FilterReason::Unhealthy);
    }

    #[test]
    fn pool_filter() {
        let c = cluster([node("a").with_pool("gpu"), node("b")]);
        assert_eq!(c.place(&small("f")).unwrap(), "b", "shared pool by default");
        let mut req = small("f");
        req.pool = Some("gpu".into());
        assert_eq!(c.place(&req).unwrap(), "a");
        req.pool = Some("tpu".into());
        assert_eq!(
            reason(&c, &req, "a"),
            FilterReason::PoolMismatch {
                wanted: Some("tpu".into()),
                node_pool: Some("gpu".into())
            }
        );
    }

    #[test]
    fn resource_filter_counts_instances_and_reservations() {
        let mut c = cluster([NodeView::new("a", Resources::new(1000, 1000))]);
        running(&mut c, "i1", "g", "a", 500);
        c.reserve("r1", &Request::new("g", Resources::new(300, 0)), 0, 10)
            .unwrap();
        let req = Request::new("f", Resources::new(300, 100));
        assert_eq!(
            reason(&c, &req, "a"),
            FilterReason::InsufficientResources {
                requested: req.resources,
                free: Resources::new(200, 500)
            }
        );
        c.release("r1");
        assert_eq!(c.place(&req).unwrap(), "a");
        c.apply("i1", crate::InstanceEvent::Stop).unwrap();
        assert!(
            c.place(&Request::new("f", Resources::new(600, 0))).is_err(),
            "exiting holds"
        );
        c.apply("i1", crate::InstanceEvent::Exited { code: 0 })
            .unwrap();
        assert_eq!(
            c.place(&Request::new("f", Resources::new(1000, 1000)))
                .unwrap(),
            "a"
        );
    }

    #[test]
    fn node_selector_filter() {
        let c = cluster([
            node("a").with_label("zone", "x"),
            node("b").with_label("zone", "y"),
        ]);
        let mut req = small("f");
        req.node_selector.insert("zone".into(), "y".into());
        assert_eq!(c.place(&req).unwrap(), "b");
        req.node_selector.insert("disk".into(), "ssd".into());
        assert_eq!(
            reason(&c, &req, "b"),
            FilterReason::LabelMismatch {
                key: "disk".into(),
                wanted: "ssd".into(),
                found: None
            }
        );
    }

    #[test]
    fn required_affinity_filter() {
        let mut c = cluster([node("a"), node("b").with_label("gpu", "1")]);
        running(&mut c, "i1", "cache", "a", 100);
        let mut req = small("f");
        req.affinity = Affinity::default().require(Term::function("cache"));
        assert_eq!(c.place(&req).unwrap(), "a");
        req.affinity = req.affinity.require(Term::label("gpu", "1"));
        let err = c.place(&req).unwrap_err();
        assert_eq!(
            err.reasons["a"],
            FilterReason::AffinityUnmet {
                term: Term::label("gpu", "1")
            }
        );
        assert_eq!(
            err.reasons["b"],
            FilterReason::AffinityUnmet {
                term: Term::function("cache")
            }
        );
        assert!(err
            .to_string()
            .starts_with("no node can take an instance of \"f\": a: affinity"));
    }

    #[test]
    fn required_anti_affinity_filter() {
        let mut c = cluster([node("a"), node("b")]);
        running(&mut c, "i1", "noisy", "a", 100);
        let mut req = small("f");
        req.anti_affinity = Affinity::default().require(Term::function("noisy"));
        assert_eq!(c.place(&req).unwrap(), "b");
        req.anti_affinity = req.anti_affinity.require(Term::label("x", "1"));
        let c = cluster([node("b").with_label("x", "1")]);
        assert_eq!(
            reason(&c, &req, "b"),
            FilterReason::AntiAffinity {
                term: Term::label("x", "1")
            }
        );
    }

    #[test]
    fn spread_and_bin_pack_choose_differently() {
        let mut c = cluster([node("a"), node("b"), node("c")]);
        running(&mut c, "i1", "g", "a", 1000);
        running(&mut c, "i2", "g", "b", 2000);
        let mut req = small("f");
        assert_eq!(c.place(&req).unwrap(), "c", "spread: least allocated");
        req.policy = Policy::BinPack;
        assert_eq!(c.place(&req).unwrap(), "b", "bin-pack: most allocated");
        // Bin-pack skips a node that would be fuller but cannot take it.
        req.resources = Resources::new(2500, 100);
        assert_eq!(c.place(&req).unwrap(), "a");
    }

    #[test]
    fn spread_scores_the_fraction_after_placement() {
        // A small empty node would be 50% full; a big one with some load only 30%.
        let mut c = cluster([
            NodeView::new("small", Resources::new(1000, 1000)),
            NodeView::new("big", Resources::new(10000, 10000)),
        ]);
        running(&mut c, "i1", "g", "big", 2500);
        let req = Request::new("f", Resources::new(500, 500));
        assert_eq!(c.place(&req).unwrap(), "big");
    }

    #[test]
    fn preferred_weights_come_before_resources() {
        let mut c = cluster([node("a").with_label("ssd", "1"), node("b"), node("c")]);
        running(&mut c, "i1", "g", "a", 3000);
        running(&mut c, "i2", "f", "b", 100);
        let mut req = small("f");
        assert_eq!(c.place(&req).unwrap(), "c");
        req.affinity = Affinity::default().prefer(10, Term::label("ssd", "1"));
        assert_eq!(c.place(&req).unwrap(), "a", "preference beats spread");
        req.affinity = req.affinity.prefer(20, Term::function("f"));
        assert_eq!(c.place(&req).unwrap(), "b", "weights add up: 20 > 10");
        req.anti_affinity = Affinity::default().prefer(15, Term::function("f"));
        assert_eq!(
            c.place(&req).unwrap(),
            "a",
            "anti weights subtract: 20 - 15 < 10"
        );
    }

    #[test]
    fn ties_go_to_the_smallest_node_id() {
        let c = cluster([node("n3"), node("n1"), node("n2")]);
        assert_eq!(c.place(&small("f")).unwrap(), "n1");
        let mut req = small("f");
        req.policy = Policy::BinPack;
        assert_eq!(c.place(&req).unwrap(), "n1");
    }

    #[test]
    fn anti_affinity_spreads_one_function() {
        let mut c = cluster([node("a"), node("b"), node("c")]);
        let mut req = small("f");
        // Bin-pack alone would stack every instance on one node.
        req.policy = Policy::BinPack;
        req.anti_affinity = Affinity::default().require(Term::function("f"));
        let mut placed = Vec::new();
        for i in 0..3 {
            let r = c.reserve(&format!("r{i}"), &req, 0, 100).unwrap();
            c.bind(&r.id, &format!("i{i}"), 0).unwrap();
            placed.push(r.node);
        }
        placed.sort();
        assert_eq!(placed, vec!["a", "b", "c"]);
        let err = c.place(&req).unwrap_err();
        assert!(err
            .reasons
            .values()
            .all(|r| matches!(r, FilterReason::AntiAffinity { .. })));

        // Preferred anti-affinity spreads while it can, then doubles up.
        let mut c = cluster([node("a"), node("b")]);
        req.anti_affinity = Affinity::default().prefer(1, Term::function("f"));
        let mut placed = Vec::new();
        for i in 0..3 {
            placed.push(c.reserve(&format!("r{i}"), &req, 0, 100).unwrap().node);
        }
        assert_eq!(placed, vec!["a", "b", "a"]);
    }

    #[test]
    fn empty_cluster_is_unschedulable() {
        let err = ClusterState::new().place(&small("f")).unwrap_err();
        assert!(err.reasons.is_empty());
        assert_eq!(
            err.to_string(),
            "no node can take an instance of \"f\": the cluster has no nodes"
        );
    }

    #[test]
    fn long_reason_lists_are_cut_short() {
        let mut c = ClusterState::new();
        for i in 0..8 {
            let mut n = node(&format!("n{i}"));
            n.healthy = false;
            c.upsert_node(n);
        }
        let msg = c.place(&small("f")).unwrap_err().to_string();
        assert!(msg.ends_with("n4: node unhealthy; and 3 more"), "{msg}");
    }

    #[test]
    fn fraction_edges() {
        assert_eq!(fraction(0, 0), SCALE);
        assert_eq!(fraction(5, 10), SCALE / 2);
        assert_eq!(fraction(u64::MAX, 1), SCALE);
        assert_eq!(fraction(u64::MAX, u64::MAX), SCALE);
    }
}
