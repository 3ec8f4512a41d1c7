//! The scheduler's picture of the cluster (nodes, bound instances, reservations) and the
//! operations that change it. The invariants are documented on [`ClusterState`].
use crate::{InstanceEvent, InstanceState, InvalidTransition, Resources, Unschedulable};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A node, as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// Node id; unique in the cluster.
    pub id: String,
    /// Labels, matched by node selectors and affinity terms.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// What the node can give to instances.
    pub capacity: Resources,
    /// Whether the node takes new instances. Instances on an unhealthy node are replaced by
    /// [`reconcile`](crate::reconcile).
    pub healthy: bool,
    /// The pool the node belongs to; `None` is the shared pool.
    #[serde(default)]
    pub pool: Option<String>,
}

impl NodeView {
    /// A healthy node in the shared pool, without labels.
    pub fn new(id: impl Into<String>, capacity: Resources) -> Self {
        NodeView {
            id: id.into(),
            labels: BTreeMap::new(),
            capacity,
            healthy: true,
            pool: None,
        }
    }

    /// Adds a label.
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Puts the node in a pool.
    pub fn with_pool(mut self, pool: impl Into<String>) -> Self {
        self.pool = Some(pool.into());
        self
    }
}

/// A bound instance, as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceView {
    /// Instance id; unique in the cluster.
    pub id: String,
    /// Function it runs.
    pub function: String,
    /// Node it is bound to.
    pub node: String,
    /// What it holds on the node while its state
    /// [holds resources](InstanceState::holds_resources).
    pub resources: Resources,
    /// Where it is in its life.
    pub state: InstanceState,
}

/// Resources held on a node for a request until it is bound, released or expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The caller's request id.
    pub id: String,
    /// Function of the request.
    pub function: String,
    /// Node chosen for it.
    pub node: String,
    /// What is held.
    pub resources: Resources,
    /// The reservation is expired when `now_ms >= expires_at_ms`.
    pub expires_at_ms: u64,
}

/// What [`ClusterState::remove_node`] did to the node's instances and reservations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRemoval {
    /// Instances that held resources on the node and were marked [`InstanceEvent::Lost`]
    /// (now `Failed`, or `Exited` if they were `Exiting`); ascending id.
    pub lost_instances: Vec<String>,
    /// Reservations on the node, released; ascending id.
    pub released_reservations: Vec<String>,
}

/// A change to nodes or instances that was refused; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// No node has this id.
    #[error("unknown node {0:?}")]
    UnknownNode(String),
    /// No instance has this id.
    #[error("unknown instance {0:?}")]
    UnknownInstance(String),
    /// An instance with this id already exists.
    #[error("instance {0:?} already exists")]
    DuplicateInstance(String),
    /// Only bound instances are held here.
    #[error(
        "instance {instance:?} is {state}: only bound instances are inserted; \
         pending and scheduling ones are requests and reservations"
    )]
    NotBound {
        /// Instance id.
        instance: String,
        /// Its state.
        state: InstanceState,
    },
    /// Inserting the instance would over-commit its node.
    #[error("instance {instance:?} needs {requested} on node {node:?}, which has {free} free")]
    WouldOvercommit {
        /// Instance id.
        instance: String,
        /// Node id.
        node: String,
        /// What the instance holds.
        requested: Resources,
        /// What the node has free.
        free: Resources,
    },
    /// Only terminal instances can be forgotten.
    #[error(
        "instance {instance:?} is {state}, not failed or exited; stop it before forgetting it"
    )]
    NotTerminal {
        /// Instance id.
        instance: String,
        /// Its state.
        state: InstanceState,
    },
    /// The event cannot happen in the instance's state.
    #[error("instance {instance:?}: {transition}")]
    Transition {
        /// Instance id.
        instance: String,
        /// The rejected transition.
        transition: InvalidTransition,
    },
}

/// [`ClusterState::reserve`] failed; nothing was reserved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReserveError {
    /// A reservation with this request id is already held.
    #[error("request {0:?} already holds a reservation")]
    DuplicateRequest(String),
    /// No node can take the request.
    #[error(transparent)]
    Unschedulable(#[from] Unschedulable),
}

/// [`ClusterState::bind`] failed; the reservation (if any) is still held.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    /// No reservation has this request id (never made, released, expired and collected, or
    /// its node was removed).
    #[error("no reservation for request {0:?}")]
    UnknownReservation(String),
    /// The reservation's time is up; [`ClusterState::expire`] will collect it.
    #[error("reservation for request {req_id:?} expired at {expires_at_ms} ms (now {now_ms} ms)")]
    Expired {
        /// Request id.
        req_id: String,
        /// When it expired.
        expires_at_ms: u64,
        /// The time given to `bind`.
        now_ms: u64,
    },
    /// An instance with this id already exists.
    #[error("instance {0:?} already exists")]
    DuplicateInstance(String),
    /// The reserved node has become unhealthy since the reservation; release and retry.
    #[error("reservation for request {req_id:?} is on node {node:?}, which is unhealthy")]
    NodeUnhealthy {
        /// Request id.
        req_id: String,
        /// Node id.
        node: String,
    },
}

/// What one node holds right now: the sum of its reservations and resource-holding instances,
/// and the functions among them.
#[derive(Debug, Default)]
pub(crate) struct NodeLoad<'a> {
    pub(crate) used: Resources,
    pub(crate) functions: BTreeSet<&'a str>,
}

impl<'a> NodeLoad<'a> {
    fn add(&mut self, function: &'a str, resources: Resources) {
        self.used = self.used.saturating_add(resources);
        self.functions.insert(function);
    }
}

/// Nodes, bound instances and reservations; the input of every decision.
///
/// Pure: no IO, no clock (time is an argument), no randomness. Everything is kept in ordered
/// maps, so results depend on contents only, never on the order things were added in.
///
/// Invariants (kept by every method here, checked by the property tests):
///
/// - every reservation, and every instance whose state
///   [holds resources](InstanceState::holds_resources), is on a node that is known;
/// - instances held here are bound: never `Pending` or `Scheduling` (those are the caller's
///   requests and this state's reservations);
/// - [`reserve`](Self::reserve) and [`bind`](Self::bind) never make a node's allocation (the
///   sum of its reservations and resource-holding instances) exceed its capacity, however many
///   reservations are outstanding. Allocation can exceed capacity only when
///   [`upsert_node`](Self::upsert_node) reports a smaller capacity than what already runs there;
///   such a node takes nothing new until enough of it is released.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterState {
    pub(crate) nodes: BTreeMap<String, NodeView>,
    instances: BTreeMap<String, InstanceView>,
    reservations: BTreeMap<String, Reservation>,
}

impl ClusterState {
    /// An empty cluster.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a node, or replaces what is known about it (labels, capacity, health, pool).
    /// Its instances and reservations stay. See [`ClusterState`] on shrinking capacity.
    pub fn upsert_node(&mut self, node: NodeView) {
        self.nodes.insert(node.id.clone(), node);
    }

    /// Removes a node: its resource-holding instances get [`InstanceEvent::Lost`], its
    /// reservations are released.
    pub fn remove_node(&mut self, id: &str) -> Result<NodeRemoval, StateError> {
        if self.nodes.remove(id).is_none() {
            return Err(StateError::UnknownNode(id.to_owned()));
        }
        let mut removal = NodeRemoval::default();
        for inst in self.instances.values_mut() {
            if inst.node == id && inst.state.holds_resources() {
                // Bound resource-holding states (starting, running, exiting) all accept `Lost`.
                if let Ok(next) = inst.state.next(InstanceEvent::Lost) {
                    inst.state = next;
                    removal.lost_instances.push(inst.id.clone());
                }
            }
        }
        self.reservations.retain(|rid, r| {
            let keep = r.node != id;
            if !keep {
                removal.released_reservations.push(rid.clone());
            }
            keep
        });
        Ok(removal)
    }

    /// The node with this id.
    pub fn node(&self, id: &str) -> Option<&NodeView> {
        self.nodes.get(id)
    }

    /// All nodes, ascending id.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeView> {
        self.nodes.values()
    }

    /// The instance with this id.
    pub fn instance(&self, id: &str) -> Option<&InstanceView> {
        self.instances.get(id)
    }

    /// All instances, ascending id.
    pub fn instances(&self) -> impl Iterator<Item = &InstanceView> {
        self.instances.values()
    }

    /// The reservation for this request id.
    pub fn reservation(&self, req_id: &str) -> Option<&Reservation> {
        self.reservations.get(req_id)
    }

    /// All reservations, ascending request id.
    pub fn reservations(&self) -> impl Iterator<Item = &Reservation> {
        self.reservations.values()
    }

    /// What the node has allocated: its reservations plus its resource-holding instances.
    /// `None` for an unknown node.
    pub fn allocated(&self, node: &str) -> Option<Resources> {
        self.nodes.get(node)?;
        let mut used = Resources::ZERO;
        for r in self.reservations.values().filter(|r| r.node == node) {
            used = used.saturating_add(r.resources);
        }
        for i in self.instances.values() {
            if i.node == node && i.state.holds_resources() {
                used = used.saturating_add(i.resources);
            }
        }
        Some(used)
    }

    /// What the node has free: capacity minus [allocated](Self::allocated), at least zero.
    pub fn free(&self, node: &str) -> Option<Resources> {
        let allocated = self.allocated(node)?;
        Some(self.nodes.get(node)?.capacity.saturating_sub(allocated))
    }

    /// The load of every node that has any, in one pass.
    pub(crate) fn loads(&self) -> BTreeMap<&str, NodeLoad<'_>> {
        let mut loads: BTreeMap<&str, NodeLoad<'_>> = BTreeMap::new();
        for r in self.reservations.values() {
            loads
                .entry(r.node.as_str())
                .or_default()
                .add(&r.function, r.resources);
        }
        for i in self.instances.values() {
            if i.state.holds_resources() {
                loads
                    .entry(i.node.as_str())
                    .or_default()
                    .add(&i.function, i.resources);
            }
        }
        loads
    }

    /// Records an instance that is already bound, e.g. when rebuilding the state after a
    /// restart. If its state holds resources, its node must be known and have room for it.
    pub fn insert_instance(&mut self, instance: InstanceView) -> Result<(), StateError> {
        if self.instances.contains_key(&instance.id) {
            return Err(StateError::DuplicateInstance(instance.id));
        }
        if matches!(
            instance.state,
            InstanceState::Pending | InstanceState::Scheduling
        ) {
            return Err(StateError::NotBound {
                instance: instance.id,
                state: instance.state,
            });
        }
        if instance.state.holds_resources() {
            let Some(free) = self.free(&instance.node) else {
                return Err(StateError::UnknownNode(instance.node));
            };
            if !instance.resources.fits(free) {
                return Err(StateError::WouldOvercommit {
                    instance: instance.id,
                    node: instance.node,
                    requested: instance.resources,
                    free,
                });
            }
        }
        self.instances.insert(instance.id.clone(), instance);
        Ok(())
    }

    /// Applies an event to a bound instance and returns its new state.
    ///
    /// From a bound state no transition acquires resources, so this never over-commits.
    pub fn apply(
        &mut self,
        instance: &str,
        event: InstanceEvent,
    ) -> Result<InstanceState, StateError> {
        let inst = self
            .instances
            .get_mut(instance)
            .ok_or_else(|| StateError::UnknownInstance(instance.to_owned()))?;
        let next = inst
            .state
            .next(event)
            .map_err(|transition| StateError::Transition {
                instance: instance.to_owned(),
                transition,
            })?;
        inst.state = next;
        Ok(next)
    }

    /// Forgets a `Failed` or `Exited` instance and returns it.
    pub fn forget(&mut self, instance: &str) -> Result<InstanceView, StateError> {
        let inst = self
            .instances
            .get(instance)
            .ok_or_else(|| StateError::UnknownInstance(instance.to_owned()))?;
        if !inst.state.is_terminal() {
            return Err(StateError::NotTerminal {
                instance: instance.to_owned(),
                state: inst.state,
            });
        }
        self.instances
            .remove(instance)
            .ok_or_else(|| StateError::UnknownInstance(instance.to_owned()))
    }

    /// Phase one: [places](Self::place) the request and holds its resources on the chosen
    /// node until `now_ms + ttl_ms`. Held resources count for every later placement, so
    /// concurrent requests cannot be promised the same room.
    ///
    /// Reservations whose time is up keep holding until [`expire`](Self::expire) collects them:
    /// call it first with the same `now_ms` to reclaim their room.
    pub fn reserve(
        &mut self,
        req_id: &str,
        req: &crate::Request,
        now_ms: u64,
        ttl_ms: u64,
    ) -> Result<Reservation, ReserveError> {
        if self.reservations.contains_key(req_id) {
            return Err(ReserveError::DuplicateRequest(req_id.to_owned()));
        }
        let node = self.place(req)?;
        let reservation = Reservation {
            id: req_id.to_owned(),
            function: req.function.clone(),
            node,
            resources: req.resources,
            expires_at_ms: now_ms.saturating_add(ttl_ms),
        };
        self.reservations
            .insert(req_id.to_owned(), reservation.clone());
        Ok(reservation)
    }

    /// Phase two: turns the reservation into instance `instance_id`, `Starting` on the reserved
    /// node, holding exactly what the reservation held.
    pub fn bind(&mut self, req_id: &str, instance_id: &str, now_ms: u64) -> Result<(), BindError> {
        let r = self
            .reservations
            .get(req_id)
            .ok_or_else(|| BindError::UnknownReservation(req_id.to_owned()))?;
        if now_ms >= r.expires_at_ms {
            return Err(BindError::Expired {
                req_id: req_id.to_owned(),
                expires_at_ms: r.expires_at_ms,
                now_ms,
            });
        }
        if self.instances.contains_key(instance_id) {
            return Err(BindError::DuplicateInstance(instance_id.to_owned()));
        }
        if !self.nodes.get(&r.node).is_some_and(|n| n.healthy) {
            return Err(BindError::NodeUnhealthy {
                req_id: req_id.to_owned(),
                node: r.node.clone(),
            });
        }
        let Some(r) = self.reservations.remove(req_id) else {
            return Err(BindError::UnknownReservation(req_id.to_owned()));
        };
        self.instances.insert(
            instance_id.to_owned(),
            InstanceView {
                id: instance_id.to_owned(),
                function: r.function,
                node: r.node,
                resources: r.resources,
                // `Scheduling` on `Bound`.
                state: InstanceState::Starting,
            },
        );
        Ok(())
    }

    /// Drops a reservation (the caller gave up on the request) and returns it.
    pub fn release(&mut self, req_id: &str) -> Option<Reservation> {
        self.reservations.remove(req_id)
    }

    /// Drops every reservation with `expires_at_ms <= now_ms`; returns their request ids,
    /// ascending.
    pub fn expire(&mut self, now_ms: u64) -> Vec<String> {
        let expired: Vec<String> = self
            .reservations
            .values()
            .filter(|r| r.expires_at_ms <= now_ms)
            .map(|r| r.id.clone())
            .collect();
        for id in &expired {
            self.reservations.remove(id);
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::Request;

    fn cluster() -> ClusterState {
        let mut c = ClusterState::new();
        c.upsert_node(NodeView::new("a", Resources::new(1000, 1000)));
        c.upsert_node(NodeView::new("b", Resources::new(1000, 1000)));
        c
    }

    fn req(cpu: u64) -> Request {
        Request::new("f", Resources::new(cpu, 100))
    }

    #[test]
    fn reserve_holds_room_until_bound_released_or_expired() {
        let mut c = cluster();
        let r1 = c.reserve("r1", &req(600), 0, 100).unwrap();
        let r2 = c.reserve("r2", &req(600), 0, 100).unwrap();
        assert_ne!(r1.node, r2.node, "the first reservation holds its room");
        assert!(matches!(
            c.reserve("r3", &req(600), 0, 100),
            Err(ReserveError::Unschedulable(_))
        ));
        assert_eq!(
            c.reserve("r1", &req(1), 0, 100),
            Err(ReserveError::DuplicateRequest("r1".into()))
        );

        c.bind("r1", "i1", 50).unwrap();
        let i1 = c.instance("i1").unwrap();
        assert_eq!(i1.state, InstanceState::Starting);
        assert_eq!(i1.node, r1.node);
        assert_eq!(c.allocated(&r1.node), Some(Resources::new(600, 100)));
        assert_eq!(
            c.bind("r1", "i9", 50),
            Err(BindError::UnknownReservation("r1".into()))
        );

        assert_eq!(c.release("r2"), Some(r2.clone()));
        assert_eq!(c.allocated(&r2.node), Some(Resources::ZERO));

        c.reserve("r4", &req(100), 200, 10).unwrap();
        assert_eq!(
            c.bind("r4", "i4", 210),
            Err(BindError::Expired {
                req_id: "r4".into(),
                expires_at_ms: 210,
                now_ms: 210
            })
        );
        assert_eq!(c.expire(209), Vec::<String>::new());
        assert_eq!(c.expire(210), vec!["r4".to_string()]);
        assert!(c.reservation("r4").is_none());
    }

    #[test]
    fn bind_refuses_duplicate_instances_and_unhealthy_nodes() {
        let mut c = cluster();
        c.reserve("r1", &req(100), 0, 100).unwrap();
        c.bind("r1", "i1", 0).unwrap();
        c.reserve("r2", &req(100), 0, 100).unwrap();
        assert_eq!(
            c.bind("r2", "i1", 0),
            Err(BindError::DuplicateInstance("i1".into()))
        );
        let node = c.reservation("r2").unwrap().node.clone();
        let mut view = c.node(&node).unwrap().clone();
        view.healthy = false;
        c.upsert_node(view);
        assert!(matches!(
            c.bind("r2", "i2", 0),
            Err(BindError::NodeUnhealthy { .. })
        ));
        assert!(
            c.reservation("r2").is_some(),
            "a failed bind keeps the reservation"
        );
    }

    #[test]
    fn removing_a_node_loses_its_instances_and_releases_its_reservations() {
        let mut c = cluster();
        let mut one_node = req(100);
        one_node.node_selector.insert("x".into(), "1".into());
        c.upsert_node(NodeView::new("a", Resources::new(1000, 1000)).with_label("x", "1"));
        for (r, i) in [("r1", "i1"), ("r2", "i2"), ("r3", "i3")] {
            c.reserve(r, &one_node, 0, 100).unwrap();
            c.bind(r, i, 0).unwrap();
        }
        c.apply("i2", InstanceEvent::Stop).unwrap();
        c.apply("i3", InstanceEvent::Crashed).unwrap();
        c.reserve("r4", &one_node, 0, 100).unwrap();
        let removal = c.remove_node("a").unwrap();
        assert_eq!(removal.lost_instances, vec!["i1", "i2"]);
        assert_eq!(removal.released_reservations, vec!["r4"]);
        assert_eq!(c.instance("i1").unwrap().state, InstanceState::Failed);
        assert_eq!(c.instance("i2").unwrap().state, InstanceState::Exited);
        assert_eq!(c.remove_node("a"), Err(StateError::UnknownNode("a".into())));
        // Back with the same id: nothing of the old life holds room on it.
        c.upsert_node(NodeView::new("a", Resources::new(1000, 1000)));
        assert_eq!(c.allocated("a"), Some(Resources::ZERO));
    }

    #[test]
    fn instance_events_follow_the_state_machine() {
        let mut c = cluster();
        c.reserve("r1", &req(100), 0, 100).unwrap();
        c.bind("r1", "i1", 0).unwrap();
        assert_eq!(
            c.apply("i1", InstanceEvent::Started),
            Ok(InstanceState::Running)
        );
        assert!(matches!(
            c.apply("i1", InstanceEvent::Bound),
            Err(StateError::Transition { .. })
        ));
        assert!(matches!(
            c.forget("i1"),
            Err(StateError::NotTerminal { .. })
        ));
        assert_eq!(
            c.apply("i1", InstanceEvent::Exited { code: 1 }),
            Ok(InstanceState::Failed)
        );
        assert_eq!(c.allocated("a"), Some(Resources::ZERO));
        assert_eq!(c.forget("i1").unwrap().id, "i1");
        assert_eq!(
            c.apply("i1", InstanceEvent::Stop),
            Err(StateError::UnknownInstance("i1".into()))
        );
    }

    #[test]
    fn insert_instance_checks_binding_node_and_room() {
        let mut c = cluster();
        let inst = |id: &str, node: &str, cpu: u64, state| InstanceView {
            id: id.into(),
            function: "f".into(),
            node: node.into(),
            resources: Resources::new(cpu, 0),
            state,
        };
        c.insert_instance(inst("i1", "a", 800, InstanceState::Running))
            .unwrap();
        assert_eq!(
            c.insert_instance(inst("i1", "a", 1, InstanceState::Running)),
            Err(StateError::DuplicateInstance("i1".into()))
        );
        assert!(matches!(
            c.insert_instance(inst("i2", "a", 300, InstanceState::Starting)),
            Err(StateError::WouldOvercommit { .. })
        ));
        assert_eq!(
            c.insert_instance(inst("i3", "zz", 1, InstanceState::Running)),
            Err(StateError::UnknownNode("zz".into()))
        );
        assert!(matches!(
            c.insert_instance(inst("i4", "a", 1, InstanceState::Scheduling)),
            Err(StateError::NotBound { .. })
        ));
        // Terminal instances hold nothing; their node may be long gone.
        c.insert_instance(inst("i5", "zz", 5000, InstanceState::Failed))
            .unwrap();
        assert_eq!(c.free("a"), Some(Resources::new(200, 1000)));
    }
}
