//! The dataworker's object index (`shoal_store::Store`) and the consistent-hash `Ring`.
//!
//! The store only does bookkeeping (the arena's bytes live elsewhere), so these measure the
//! index, the allocator and the eviction choice, not memory traffic.
use criterion::{BenchmarkId, Criterion, Throughput};
use shoal_protocol::{Namespace, ObjectId};
use shoal_store::{Lookup, NoExternalPins, Ring, Store, StoreConfig, DEFAULT_VNODES, UNIT};
use std::hint::black_box;

const CLIENT: u64 = 1;

fn id(prefix: &str, i: usize) -> ObjectId {
    ObjectId::new(format!("{prefix}{i:08}")).unwrap()
}

/// A store holding `n` sealed objects of `size` bytes, named `o00000000`...
fn filled(n: usize, size: u64, cfg: StoreConfig) -> (Store, Vec<ObjectId>) {
    let mut store = Store::new(cfg);
    let ids: Vec<ObjectId> = (0..n).map(|i| id("o", i)).collect();
    for (t, id) in ids.iter().enumerate() {
        store.create(id, size, CLIENT, &mut NoExternalPins).unwrap();
        store.seal(id, CLIENT, t as u64).unwrap();
    }
    (store, ids)
}

/// Lookup (`get`, which pins, then `release`) and insert (`create` + `seal`, then `delete`
/// so the index keeps its size) in stores of 1,000 and 100,000 objects.
pub(crate) fn index(c: &mut Criterion) {
    let mut g = c.benchmark_group("store_index");
    g.throughput(Throughput::Elements(1));
    for n in [1_000usize, 100_000] {
        let (mut store, ids) = filled(n, 64, StoreConfig::new(1 << 30));
        let mut i = 0usize;
        let mut now = n as u64;
        g.bench_function(BenchmarkId::new("get_release", n), |b| {
            b.iter(|| {
                i = (i + 7919) % n; // a stride, so successive lookups hit different buckets
                now += 1;
                match store.get(Namespace::Object, &ids[i], CLIENT, now) {
                    Lookup::Ready(p) => store.release(CLIENT, p.gen, &mut NoExternalPins),
                    other => panic!("lookup of a sealed object: {other:?}"),
                }
            })
        });
        let fresh: Vec<ObjectId> = (0..1024).map(|i| id("n", i)).collect();
        let mut j = 0usize;
        g.bench_function(BenchmarkId::new("create_seal_delete", n), |b| {
            b.iter(|| {
                j = (j + 1) % fresh.len();
                now += 1;
                let id = &fresh[j];
                store.create(id, 64, CLIENT, &mut NoExternalPins).unwrap();
                store.seal(id, CLIENT, now).unwrap();
                store
                    .delete(Namespace::Object, id, &mut NoExternalPins)
                    .unwrap()
            })
        });
    }
    g.finish();
}

/// Allocation and free in the arena (the store's `offset-allocator` over the shared-memory
/// arena): `create` then `abort` of one buffer, in an arena of 4 GiB about a quarter full
/// with 7,500 objects of mixed sizes (32 B to 512 KiB) and the holes of 2,500 deleted ones.
pub(crate) fn arena(c: &mut Criterion) {
    let mut g = c.benchmark_group("arena");
    g.throughput(Throughput::Elements(1));
    let sizes = [64u64, 4 << 10, 64 << 10, 1 << 20];
    let mut store = Store::new(StoreConfig::new(4 << 30));
    for i in 0..10_000usize {
        let id = id("m", i);
        // Sizes in a fixed shuffle, every fourth object deleted: holes of every size.
        let size = sizes[(i * 7) % sizes.len()] / 2 + UNIT * (i as u64 % 5);
        store
            .create(&id, size, CLIENT, &mut NoExternalPins)
            .unwrap();
        store.seal(&id, CLIENT, i as u64).unwrap();
        if i % 4 == 0 {
            store
                .delete(Namespace::Object, &id, &mut NoExternalPins)
                .unwrap();
        }
    }
    let tmp = id("t", 0);
    for size in sizes {
        g.bench_function(BenchmarkId::new("alloc_free", size), |b| {
            b.iter(|| {
                store
                    .create(&tmp, black_box(size), CLIENT, &mut NoExternalPins)
                    .unwrap();
                store.abort(&tmp, CLIENT).unwrap();
            })
        });
    }
    g.finish();
}

/// The eviction choice: a full store (watermarks at 100%) where every new object evicts the
/// least recently used one. One iteration = `create` (which picks and evicts the victim, then
/// allocates in its place) + `seal`.
pub(crate) fn eviction(c: &mut Criterion) {
    let mut g = c.benchmark_group("eviction");
    g.throughput(Throughput::Elements(1));
    for n in [1_000usize, 100_000] {
        // 64 B payload + a 9-byte name = 2 allocation units: `n` objects fill the arena.
        let mut cfg = StoreConfig::new(n as u64 * 2 * UNIT);
        cfg.high_watermark = 1.0;
        cfg.low_watermark = 1.0;
        let (mut store, _) = filled(n, 64, cfg);
        // n + 1 names in rotation: the name created next is the one evicted last time.
        let names: Vec<ObjectId> = (0..=n).map(|i| id("o", i)).collect();
        let mut k = n;
        let mut now = n as u64;
        g.bench_function(BenchmarkId::new("create_evict_lru", n), |b| {
            b.iter(|| {
                let name = &names[k % names.len()];
                k += 1;
                now += 1;
                let (_, evicted) = store.create(name, 64, CLIENT, &mut NoExternalPins).unwrap();
                store.seal(name, CLIENT, now).unwrap();
                evicted
            })
        });
    }
    g.finish();
}

/// Which nodes own an id's directory entry: `owners(key, 3)` on rings of 10 and 100 nodes
/// with the default 128 virtual nodes each.
pub(crate) fn ring(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(1));
    let keys: Vec<String> = (0..1024).map(|i| format!("object-{i}")).collect();
    for nodes in [10usize, 100] {
        let ring = Ring::new((0..nodes).map(|i| format!("node-{i}")), DEFAULT_VNODES);
        let mut i = 0usize;
        g.bench_function(BenchmarkId::new("owners_3", nodes), |b| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                ring.owners(keys[i].as_bytes(), 3).len()
            })
        });
    }
    g.finish();
}
