//! Scheduler placement (`ClusterState::place`) over 1,000 nodes: every node is filtered and
//! scored, so the cost grows with the node count.
use criterion::{BenchmarkId, Criterion, Throughput};
use shoal_scheduler::{
    Affinity, ClusterState, InstanceState, InstanceView, NodeView, Policy, Request, Resources, Term,
};

const NODES: usize = 1_000;

/// 1,000 nodes of 8 cores / 16 GiB in 10 zones, each running 3 instances of 1 of 50
/// functions (3,000 instances), so loads, labels and function sets differ between nodes.
fn cluster() -> ClusterState {
    let mut c = ClusterState::new();
    for n in 0..NODES {
        c.upsert_node(
            NodeView::new(format!("node-{n:04}"), Resources::new(8_000, 16_384))
                .with_label("zone", format!("z{}", n % 10)),
        );
    }
    for i in 0..NODES * 3 {
        let node = i % NODES;
        c.insert_instance(InstanceView {
            id: format!("inst-{i}"),
            function: format!("fn-{}", i % 50),
            node: format!("node-{node:04}"),
            resources: Resources::new(250 * (1 + (i % 4) as u64), 512),
            state: InstanceState::Running,
        })
        .unwrap();
    }
    c
}

pub(crate) fn place(c: &mut Criterion) {
    let mut g = c.benchmark_group("scheduler_place");
    g.throughput(Throughput::Elements(1));
    let state = cluster();
    let plain = Request::new("fn-new", Resources::new(500, 1_024));
    let mut binpack = plain.clone();
    binpack.policy = Policy::BinPack;
    // Spread replicas of fn-7 across nodes, prefer zone z3, require a zone label.
    let mut constrained = Request::new("fn-7", Resources::new(500, 1_024));
    constrained.affinity = Affinity::default()
        .require(Term::label("zone", "z3"))
        .prefer(10, Term::label("zone", "z3"));
    constrained.anti_affinity = Affinity::default().prefer(5, Term::function("fn-7"));
    for (label, req) in [
        ("spread", &plain),
        ("binpack", &binpack),
        ("affinity", &constrained),
    ] {
        g.bench_function(BenchmarkId::new(label, NODES), |b| {
            b.iter(|| state.place(req).unwrap())
        });
    }
    g.finish();
}
