//! Property tests over the public API: no node is ever over-committed, whatever the
//! interleaving; placements and reconciliation depend only on the state's contents.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use shoal_scheduler::{
    reconcile, Action, Affinity, BindError, ClusterState, FunctionSpec, InstanceEvent,
    InstanceState, InstanceView, NodeView, Policy, Request, ReserveError, Resources, Term,
};
use std::collections::{BTreeMap, BTreeSet};

const FUNCTIONS: [&str; 3] = ["f", "g", "h"];

const EVENTS: [InstanceEvent; 6] = [
    InstanceEvent::Started,
    InstanceEvent::Exited { code: 0 },
    InstanceEvent::Exited { code: 1 },
    InstanceEvent::Crashed,
    InstanceEvent::Stop,
    InstanceEvent::Lost,
];

fn node_id(i: usize) -> String {
    format!("n{i}")
}

/// Allocation recomputed from the public views, independently of the crate's own accounting.
fn allocations(c: &ClusterState) -> BTreeMap<String, Resources> {
    let mut alloc: BTreeMap<String, Resources> = BTreeMap::new();
    for r in c.reservations() {
        let a = alloc.entry(r.node.clone()).or_default();
        *a = a.checked_add(r.resources).unwrap();
    }
    for i in c.instances().filter(|i| i.state.holds_resources()) {
        let a = alloc.entry(i.node.clone()).or_default();
        *a = a.checked_add(i.resources).unwrap();
    }
    alloc
}

/// Every node's allocation fits its capacity; nothing holds room on an unknown node; the
/// crate's own accounting agrees.
fn check_no_overcommit(c: &ClusterState) -> Result<(), TestCaseError> {
    let alloc = allocations(c);
    for (node, used) in &alloc {
        let view = c.node(node);
        prop_assert!(view.is_some(), "room held on unknown node {node}");
        let cap = view.unwrap().capacity;
        prop_assert!(used.fits(cap), "{node} over-committed: {used} of {cap}");
    }
    for n in c.nodes() {
        let used = alloc.get(&n.id).copied().unwrap_or_default();
        prop_assert_eq!(c.allocated(&n.id), Some(used));
        prop_assert_eq!(c.free(&n.id), n.capacity.checked_sub(used));
    }
    for i in c.instances() {
        prop_assert!(!matches!(
            i.state,
            InstanceState::Pending | InstanceState::Scheduling
        ));
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Op {
    Reserve {
        req: u8,
        function: usize,
        cpu: u64,
        mem: u64,
        bin_pack: bool,
        /// 0: none, 1: required anti-affinity with its own function, 2: preferred.
        anti: u8,
        ttl: u64,
    },
    Bind {
        req: u8,
        instance: u8,
    },
    Release {
        req: u8,
    },
    /// Time passes; reservations whose time is up keep holding until collected.
    Tick {
        ms: u64,
    },
    /// Time passes and expired reservations are collected.
    Expire {
        ms: u64,
    },
    RemoveNode {
        node: usize,
    },
    /// Adds the node back (or updates its health), with its original capacity.
    UpsertNode {
        node: usize,
        healthy: bool,
    },
    Event {
        instance: u8,
        event: usize,
    },
    Forget {
        instance: u8,
    },
}

fn op(nodes: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..16, 0..FUNCTIONS.len(), 0u64..1500, 0u64..1500, any::<bool>(), 0u8..3, 0u64..60)
            .prop_map(|(req, function, cpu, mem, bin_pack, anti, ttl)| Op::Reserve {
                req, function, cpu, mem, bin_pack, anti, ttl
            }),
        4 => (0u8..16, 0u8..24).prop_map(|(req, instance)| Op::Bind { req, instance }),
        1 => (0u8..16).prop_map(|req| Op::Release { req }),
        1 => (0u64..40).prop_map(|ms| Op::Tick { ms }),
        1 => (0u64..40).prop_map(|ms| Op::Expire { ms }),
        1 => (0..nodes).prop_map(|node| Op::RemoveNode { node }),
        1 => (0..nodes, any::<bool>()).prop_map(|(node, healthy)| Op::UpsertNode { node, healthy }),
        3 => (0u8..24, 0..EVENTS.len()).prop_map(|(instance, event)| Op::Event { instance, event }),
        1 => (0u8..24).prop_map(|instance| Op::Forget { instance }),
    ]
}

fn capacities() -> impl Strategy<Value = Vec<Resources>> {
    proptest::collection::vec(
        (0u64..4000, 0u64..4000).prop_map(|(c, m)| Resources::new(c, m)),
        1..6,
    )
}

fn scenario() -> impl Strategy<Value = (Vec<Resources>, Vec<Op>)> {
    capacities().prop_flat_map(|caps| {
        let n = caps.len();
        (Just(caps), proptest::collection::vec(op(n), 0..80))
    })
}

fn request(function: usize, cpu: u64, mem: u64, bin_pack: bool, anti: u8) -> Request {
    let f = FUNCTIONS[function];
    let mut req = Request::new(f, Resources::new(cpu, mem));
    if bin_pack {
        req.policy = Policy::BinPack;
    }
    req.anti_affinity = match anti {
        1 => Affinity::default().require(Term::function(f)),
        2 => Affinity::default().prefer(5, Term::function(f)),
        _ => Affinity::default(),
    };
    req
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary interleavings of reserve, bind, release, expiry, node removal and return,
    /// and instance events never over-commit any node. Binding moves room from a reservation
    /// to an instance without changing any allocation. An unschedulable request (without
    /// anti-affinity) really fits no healthy node.
    #[test]
    fn no_node_is_ever_over_committed((caps, ops) in scenario()) {
        let mut c = ClusterState::new();
        for (i, cap) in caps.iter().enumerate() {
            c.upsert_node(NodeView::new(node_id(i), *cap));
        }
        let mut now = 0u64;
        for op in ops {
            match op {
                Op::Reserve { req, function, cpu, mem, bin_pack, anti, ttl } => {
                    let request = request(function, cpu, mem, bin_pack, anti);
                    let free_before: Vec<(bool, Resources)> = c
                        .nodes()
                        .map(|n| (n.healthy, c.free(&n.id).unwrap()))
                        .collect();
                    match c.reserve(&format!("r{req}"), &request, now, ttl) {
                        Ok(r) => {
                            let node = c.node(&r.node).unwrap();
                            prop_assert!(node.healthy);
                            prop_assert_eq!(r.expires_at_ms, now + ttl);
                        }
                        Err(ReserveError::Unschedulable(e)) => {
                            prop_assert_eq!(e.reasons.len(), free_before.len());
                            if anti == 0 {
                                for (healthy, free) in free_before {
                                    prop_assert!(!healthy || !request.resources.fits(free));
                                }
                            }
                        }
                        Err(ReserveError::DuplicateRequest(id)) => {
                            prop_assert!(c.reservation(&id).is_some());
                        }
                    }
                }
                Op::Bind { req, instance } => {
                    let before = allocations(&c);
                    let snapshot = c.clone();
                    let result = c.bind(&format!("r{req}"), &format!("i{instance}"), now);
                    prop_assert_eq!(allocations(&c), before);
                    match result {
                        Ok(()) => {
                            let inst = c.instance(&format!("i{instance}")).unwrap();
                            prop_assert_eq!(inst.state, InstanceState::Starting);
                        }
                        Err(
                            BindError::UnknownReservation(_)
                            | BindError::Expired { .. }
                            | BindError::DuplicateInstance(_)
                            | BindError::NodeUnhealthy { .. },
                        ) => prop_assert_eq!(&c, &snapshot, "a failed bind changes nothing"),
                    }
                }
                Op::Release { req } => {
                    c.release(&format!("r{req}"));
                }
                Op::Tick { ms } => now += ms,
                Op::Expire { ms } => {
                    now += ms;
                    let expired = c.expire(now);
                    prop_assert!(expired.iter().all(|id| c.reservation(id).is_none()));
                    prop_assert!(c.reservations().all(|r| r.expires_at_ms > now));
                }
                Op::RemoveNode { node } => {
                    let id = node_id(node);
                    if let Ok(removal) = c.remove_node(&id) {
                        for i in removal.lost_instances {
                            prop_assert!(c.instance(&i).unwrap().state.is_terminal());
                        }
                        prop_assert_eq!(c.allocated(&id), None);
                    }
                }
                Op::UpsertNode { node, healthy } => {
                    let mut view = NodeView::new(node_id(node), caps[node]);
                    view.healthy = healthy;
                    c.upsert_node(view);
                }
                Op::Event { instance, event } => {
                    let id = format!("i{instance}");
                    let before = c.instance(&id).map(|i| i.state);
                    match c.apply(&id, EVENTS[event]) {
                        Ok(to) => prop_assert_eq!(Ok(to), before.unwrap().next(EVENTS[event])),
                        Err(_) => prop_assert_eq!(c.instance(&id).map(|i| i.state), before),
                    }
                }
                Op::Forget { instance } => {
                    let id = format!("i{instance}");
                    let was_terminal = c.instance(&id).map(|i| i.state.is_terminal());
                    prop_assert_eq!(c.forget(&id).is_ok(), was_terminal == Some(true));
                }
            }
            check_no_overcommit(&c)?;
        }
    }
}

/// A random cluster: nodes (labels, pool, health) and instances to put on them.
#[derive(Debug, Clone)]
struct World {
    nodes: Vec<NodeView>,
    instances: Vec<InstanceView>,
}

fn world() -> impl Strategy<Value = World> {
    let node = (
        0u64..4000,
        0u64..4000,
        any::<bool>(),
        0u8..3,
        0u8..3,
        prop::bool::weighted(0.85),
    );
    proptest::collection::vec(node, 1..8).prop_flat_map(|nodes| {
        let nodes: Vec<NodeView> = nodes
            .into_iter()
            .enumerate()
            .map(|(i, (cpu, mem, ssd, zone, pool, healthy))| {
                let mut n = NodeView::new(node_id(i), Resources::new(cpu, mem))
                    .with_label("zone", format!("z{zone}"));
                if ssd {
                    n = n.with_label("disk", "ssd");
                }
                if pool == 2 {
                    n = n.with_pool("gpu");
                }
                n.healthy = healthy;
                n
            })
            .collect();
        let count = nodes.len();
        let states = prop_oneof![
            Just(InstanceState::Starting),
            Just(InstanceState::Running),
            Just(InstanceState::Exiting),
            Just(InstanceState::Failed),
            Just(InstanceState::Exited),
        ];
        let instance = (
            0..FUNCTIONS.len() + 1,
            0..count,
            0u64..1500,
            0u64..1500,
            states,
        );
        (
            Just(nodes),
            proptest::collection::vec(instance, 0..20).prop_map(|is| {
                is.into_iter()
                    .enumerate()
                    .map(|(k, (f, n, cpu, mem, state))| InstanceView {
                        id: format!("i{k:02}"),
                        function: ["f", "g", "h", "legacy"][f].to_owned(),
                        node: node_id(n),
                        resources: Resources::new(cpu, mem),
                        state,
                    })
                    .collect::<Vec<_>>()
            }),
        )
            .prop_map(|(nodes, instances)| World { nodes, instances })
    })
}

fn any_request() -> impl Strategy<Value = Request> {
    (
        0..FUNCTIONS.len(),
        0u64..2000,
        0u64..2000,
        any::<bool>(),
        0u8..3,
        proptest::option::of(0u8..3),
        0u8..4,
        0u8..3,
    )
        .prop_map(|(f, cpu, mem, bin_pack, anti, zone, prefer, pool)| {
            let mut req = request(f, cpu, mem, bin_pack, anti);
            if let Some(z) = zone {
                req.node_selector.insert("zone".into(), format!("z{z}"));
            }
            req.affinity = match prefer {
                1 => Affinity::default().prefer(3, Term::label("disk", "ssd")),
                2 => Affinity::default().require(Term::function("g")),
                3 => Affinity::default().prefer(2, Term::function("h")),
                _ => Affinity::default(),
            };
            if pool == 2 {
                req.pool = Some("gpu".into());
            }
            req
        })
}

/// Builds the world, inserting nodes and instances in the given orders. Instances that do not
/// fit (in the canonical order) are dropped first, so every order accepts the same set.
fn build(nodes: &[NodeView], instances: &[InstanceView]) -> ClusterState {
    let mut c = ClusterState::new();
    for n in nodes {
        c.upsert_node(n.clone());
    }
    for i in instances {
        c.insert_instance(i.clone()).unwrap();
    }
    c
}

fn fitting(w: &World) -> Vec<InstanceView> {
    let mut c = ClusterState::new();
    for n in &w.nodes {
        c.upsert_node(n.clone());
    }
    w.instances
        .iter()
        .filter(|i| c.insert_instance((*i).clone()).is_ok())
        .cloned()
        .collect()
}

fn shuffled<T: Clone + std::fmt::Debug>(v: Vec<T>) -> impl Strategy<Value = Vec<T>> {
    Just(v).prop_shuffle()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The same nodes and instances, added in any order, give the same placements for the same
    /// requests, one after another (each reservation counting for the next); a placement
    /// passes the filters, and an unschedulable request names every node.
    #[test]
    fn placements_are_stable_for_the_same_input(
        (w, node_order, inst_order, reqs) in world().prop_flat_map(|w| {
            let n = w.nodes.len();
            let m = fitting(&w).len();
            (
                Just(w),
                shuffled((0..n).collect::<Vec<_>>()),
                shuffled((0..m).collect::<Vec<_>>()),
                proptest::collection::vec(any_request(), 1..8),
            )
        })
    ) {
        let instances = fitting(&w);
        let mut a = build(&w.nodes, &instances);
        let nodes_b: Vec<NodeView> = node_order.iter().map(|&i| w.nodes[i].clone()).collect();
        let inst_b: Vec<InstanceView> = inst_order.iter().map(|&i| instances[i].clone()).collect();
        let mut b = build(&nodes_b, &inst_b);
        for (k, req) in reqs.iter().enumerate() {
            let placed = a.place(req);
            prop_assert_eq!(&placed, &a.place(req), "same state, same answer");
            prop_assert_eq!(&placed, &b.place(req), "insertion order does not matter");
            match &placed {
                Ok(node) => {
                    let view = a.node(node).unwrap();
                    prop_assert!(view.healthy);
                    prop_assert_eq!(&view.pool, &req.pool);
                    prop_assert!(req.resources.fits(a.free(node).unwrap()));
                    for (key, value) in &req.node_selector {
                        prop_assert_eq!(view.labels.get(key), Some(value));
                    }
                }
                Err(e) => {
                    let all: BTreeSet<&str> = a.nodes().map(|n| n.id.as_str()).collect();
                    let named: BTreeSet<&str> = e.reasons.keys().map(String::as_str).collect();
                    prop_assert_eq!(named, all);
                }
            }
            let id = format!("r{k}");
            let ra = a.reserve(&id, req, 0, 100).map(|r| r.node);
            let rb = b.reserve(&id, req, 0, 100).map(|r| r.node);
            prop_assert_eq!(&ra, &rb);
            prop_assert_eq!(ra.ok(), placed.ok());
        }
        prop_assert_eq!(a, b);
    }

    /// Reconciliation is deterministic, keeps every spec'd function at or above its minimum and
    /// (as far as reservations allow) at or below its maximum, deals with every broken
    /// instance exactly once, and removes whatever has no spec.
    #[test]
    fn reconcile_keeps_counts_within_bounds(
        (w, inst_order, specs, reserved, dead) in world().prop_flat_map(|w| {
            let n = w.nodes.len();
            let m = fitting(&w).len();
            let spec = (0u32..6, 0u32..8);
            (
                Just(w),
                shuffled((0..m).collect::<Vec<_>>()),
                proptest::collection::vec(spec, FUNCTIONS.len()),
                proptest::collection::vec(0..FUNCTIONS.len(), 0..5),
                proptest::collection::vec(0..n, 0..3),
            )
        })
    ) {
        let instances = fitting(&w);
        let specs: Vec<FunctionSpec> = FUNCTIONS
            .iter()
            .zip(&specs)
            .map(|(f, (min, max))| FunctionSpec::new(*f, *min, *max, Resources::new(10, 10)))
            .collect();
        let inst_b: Vec<InstanceView> = inst_order.iter().map(|&i| instances[i].clone()).collect();
        let mut states = [build(&w.nodes, &instances), build(&w.nodes, &inst_b)];
        for c in &mut states {
            for (k, f) in reserved.iter().enumerate() {
                let _ = c.reserve(&format!("r{k}"), &specs[*f].request(), 0, 100);
            }
            for n in &dead {
                let _ = c.remove_node(&node_id(*n));
            }
        }
        let [a, b] = states;
        let actions = reconcile(&specs, &a);
        prop_assert_eq!(&actions, &reconcile(&specs, &a));
        prop_assert_eq!(&actions, &reconcile(&specs, &b));

        let mut touched = BTreeSet::new();
        for action in &actions {
            if let Action::Replace { instance, function, .. } | Action::Remove { instance, function, .. } = action {
                prop_assert!(touched.insert(instance.clone()), "{instance} touched twice");
                prop_assert_eq!(&a.instance(instance).unwrap().function, function);
            }
        }
        let is_live = |i: &InstanceView| {
            matches!(i.state, InstanceState::Starting | InstanceState::Running)
                && a.node(&i.node).is_some_and(|n| n.healthy)
        };
        let is_broken = |i: &InstanceView| {
            i.state == InstanceState::Failed
                || (matches!(i.state, InstanceState::Starting | InstanceState::Running) && !is_live(i))
        };
        for i in a.instances() {
            let spec = specs.iter().find(|s| s.name == i.function);
            if is_broken(i) || (spec.is_none() && is_live(i)) {
                prop_assert!(touched.contains(&i.id), "{} left alone", i.id);
            }
            if !is_broken(i) && !is_live(i) {
                prop_assert!(!touched.contains(&i.id), "{} is exiting or exited", i.id);
            }
        }
        for spec in &specs {
            let f = spec.name.as_str();
            let count = |p: &dyn Fn(&Action) -> bool| actions.iter().filter(|a| p(a)).count();
            let live = a.instances().filter(|i| i.function == f && is_live(i)).count();
            let in_flight = a.reservations().filter(|r| r.function == f).count();
            let creates = count(&|a| matches!(a, Action::Create { function } if function == f));
            let replaces = count(&|a| matches!(a, Action::Replace { function, .. } if function == f));
            let removed_live = count(&|x| matches!(x, Action::Remove { instance, function, .. }
                if function == f && is_live(a.instance(instance).unwrap())));
            let after = live + in_flight + creates + replaces - removed_live;
            let min = spec.min_instances as usize;
            let max = spec.max_instances.max(spec.min_instances) as usize;
            prop_assert!(after >= min, "{f}: {after} < min {min}");
            prop_assert!(after <= max.max(in_flight), "{f}: {after} > max {max}");
            prop_assert!(creates == 0 || after == min);
        }
        let creates_legacy = actions
            .iter()
            .any(|x| matches!(x, Action::Create { function } if function == "legacy"));
        prop_assert!(!creates_legacy, "no creation without a spec");
    }
}
