//! The proxy's routing decision over 1,000 instances of one function: a call picks the
//! least-loaded local instance with a free slot (a scan over every candidate), and its
//! result frees the slot again. Driven through `shoal_proxy::bench_support`, a hidden window
//! on the crate-private sans-IO router.
use criterion::{BenchmarkId, Criterion, Throughput};
use shoal_proxy::bench_support::BenchRouter;
use std::time::Instant;

pub(crate) fn pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("router");
    g.throughput(Throughput::Elements(1));
    let now = Instant::now();
    for instances in [10u64, 1_000] {
        let mut router = BenchRouter::new(1024);
        for conn in 1..=instances {
            assert!(router.register(conn, "f", &format!("inst-{conn}"), 4, now));
        }
        // 2 of 4 slots busy on every instance (calls that never finish): each pick compares
        // the load of every candidate.
        let caller = instances + 1;
        for id in 0..instances * 2 {
            router.call(caller, id, "f", now).unwrap();
        }
        let mut id = instances * 2;
        g.bench_function(BenchmarkId::new("call_result", instances), |b| {
            b.iter(|| {
                id += 1;
                let (instance, invoke) = router.call(caller, id, "f", now).unwrap();
                router.result(instance, invoke, now)
            })
        });
    }
    g.finish();
}
