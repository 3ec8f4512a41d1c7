use crate::*;
use proptest::prelude::*;
use shoal_protocol::{Namespace, ObjectId};
use std::collections::HashSet;

fn id(s: &str) -> ObjectId {
    ObjectId::new(s).unwrap()
}

const KB: u64 = 1024;

/// External pins as a plain set, standing in for the shared-memory pin tables.
#[derive(Default)]
struct FakePins {
    pinned: HashSet<Gen>,
    withdrawn: HashSet<Gen>,
}

impl ExternalPins for FakePins {
    fn is_pinned(&self, gen: Gen) -> bool {
        self.pinned.contains(&gen)
    }
    fn reclaim(&mut self, gen: Gen) -> bool {
        self.withdrawn.insert(gen);
        !self.pinned.contains(&gen)
    }
    fn last_access(&self, _: Gen) -> Option<u64> {
        None
    }
}

fn put(s: &mut Store, name: &str, size: u64, now: u64) -> Result<Placement, StoreError> {
    s.create(&id(name), size, 1, &mut NoExternalPins)?;
    s.seal(&id(name), 1, now)
}

#[test]
fn lifecycle_and_errors() {
    let mut s = Store::new(StoreConfig::new(64 * KB));
    let mut x = NoExternalPins;
    let (p, ev) = s.create(&id("a"), 100, 1, &mut x).unwrap();
    assert!(ev.is_empty());
    assert_eq!(p.key_off, p.offset + 100);
    assert_eq!(s.get(Namespace::Object, &id("a"), 2, 0), Lookup::Unsealed);
    assert!(matches!(
        s.create(&id("a"), 1, 2, &mut x),
        Err(StoreError::AlreadyExists(_))
    ));
    assert!(
        matches!(s.seal(&id("a"), 2, 0), Err(StoreError::NotUnsealed(_))),
        "only the creator seals"
    );
    s.seal(&id("a"), 1, 0).unwrap();
    assert!(matches!(
        s.seal(&id("a"), 1, 0),
        Err(StoreError::AlreadySealed(_))
    ));
    assert!(matches!(
        s.seal(&id("zz"), 1, 0),
        Err(StoreError::NotFound(_))
    ));
    let Lookup::Ready(v) = s.get(Namespace::Object, &id("a"), 2, 5) else {
        panic!()
    };
    assert_eq!(v, p);
    assert!(s.contains(Namespace::Object, &id("a"), 0));
    assert!(
        !s.contains(Namespace::Kv, &id("a"), 0),
        "namespaces are separate"
    );
    s.check_invariants();
    // Delete while pinned: name gone, memory kept until release.
    let used = s.used();
    s.delete(Namespace::Object, &id("a"), &mut x).unwrap();
    assert_eq!(s.get(Namespace::Object, &id("a"), 2, 0), Lookup::Missing);
    assert_eq!(s.used(), used);
    assert_eq!(s.stats().zombies, 1);
    s.check_invariants();
    assert!(s.release(2, v.gen, &mut x));
    assert_eq!(s.used(), 0);
    s.check_invariants();
}

#[test]
fn zero_size_objects_are_fine() {
    let mut s = Store::new(StoreConfig::new(64 * KB));
    let p = put(&mut s, "empty", 0, 0).unwrap();
    assert_eq!(p.len, 0);
    assert!(s.used() >= UNIT, "the key still takes room");
    assert!(matches!(
        s.get(Namespace::Object, &id("empty"), 1, 0),
        Lookup::Ready(_)
    ));
}

#[test]
fn client_gone_releases_everything() {
    let mut s = Store::new(StoreConfig::new(1024 * KB));
    let mut x = NoExternalPins;
    put(&mut s, "kept", 1000, 0).unwrap();
    let before = s.used();
    s.create(&id("half"), 5000, 7, &mut x).unwrap();
    s.kv_create(&id("kvhalf"), 5000, 7, &mut x).unwrap();
    assert!(matches!(
        s.get(Namespace::Object, &id("kept"), 7, 0),
        Lookup::Ready(_)
    ));
    s.delete(Namespace::Object, &id("kept"), &mut x).unwrap();
    assert!(s.used() > before);
    s.client_gone(7, &mut x);
    assert_eq!(
        s.used(),
        0,
        "pins, unsealed objects and uncommitted KV values all freed"
    );
    assert_eq!(s.get(Namespace::Object, &id("half"), 1, 0), Lookup::Missing);
    s.check_invariants();
}

#[test]
fn evicts_lru_between_watermarks() {
    // 100 KiB arena, 10 KiB objects: the 10th put crosses 90% and evicts down to 80%.
    let mut s = Store::new(StoreConfig::new(100 * KB));
    let mut x = NoExternalPins;
    for i in 0..8 {
        put(&mut s, &format!("o{i}"), 10 * KB - 64, i).unwrap();
    }
    // Touch o0 so o1 is the oldest.
    let Lookup::Ready(v) = s.get(Namespace::Object, &id("o0"), 1, 100) else {
        panic!()
    };
    s.release(1, v.gen, &mut x);
    let (_, ev) = s.create(&id("o8"), 10 * KB - 64, 1, &mut x).unwrap();
    assert!(ev.is_empty(), "90 KiB is not past the high watermark");
    s.seal(&id("o8"), 1, 101).unwrap();
    let (_, ev) = s.create(&id("o9"), 10 * KB - 64, 1, &mut x).unwrap();
    let names: Vec<_> = ev.iter().map(|e| e.id.to_string()).collect();
    assert_eq!(
        names,
        ["o1", "o2"],
        "LRU first, down to 80% including the new object"
    );
    assert!(s.used() as f64 <= 0.8 * s.capacity() as f64);
    assert_eq!(s.stats().evictions, 2);
    s.check_invariants();
}

#[test]
fn pinned_and_externally_pinned_are_never_evicted() {
    let mut s = Store::new(StoreConfig::new(100 * KB));
    let mut ext = FakePins::default();
    let a = put(&mut s, "a", 40 * KB, 0).unwrap();
    put(&mut s, "b", 40 * KB, 1).unwrap();
    assert!(matches!(
        s.get(Namespace::Object, &id("b"), 3, 2),
        Lookup::Ready(_)
    ));
    ext.pinned.insert(a.gen);
    let err = s.create(&id("c"), 40 * KB, 1, &mut ext).unwrap_err();
    let StoreError::StoreFull {
        requested,
        used,
        capacity,
        pinned,
    } = err.clone()
    else {
        panic!("{err:?}")
    };
    assert!(requested >= 40 * KB && used > 80 * KB && capacity == 100 * KB && pinned >= 80 * KB);
    assert_eq!(err.code(), shoal_protocol::ErrorCode::StoreFull);
    // Still serving.
    assert!(matches!(
        s.get(Namespace::Object, &id("a"), 3, 3),
        Lookup::Ready(_)
    ));
    ext.pinned.clear();
    s.client_gone(3, &mut ext);
    let (_, ev) = s.create(&id("c"), 40 * KB, 1, &mut ext).unwrap();
    assert!(!ev.is_empty());
    assert!(
        ev.iter().all(|e| ext.withdrawn.contains(&e.gen)),
        "evicted entries are withdrawn from the index"
    );
    s.check_invariants();
}

#[test]
fn in_a_cluster_only_replicas_are_evicted_without_spill() {
    let mut cfg = StoreConfig::new(64 * KB);
    cfg.keep_primaries = true;
    let mut s = Store::new(cfg);
    put(&mut s, "primary", 20 * KB, 1).unwrap();
    s.create(&id("replica"), 20 * KB, 1, &mut NoExternalPins)
        .unwrap();
    assert!(s.mark_replica(&id("replica")));
    s.seal(&id("replica"), 1, 2).unwrap();
    assert!(s.is_replica(&id("replica")) && !s.is_replica(&id("primary")));
    // Past the high watermark: the replica goes (though the primary is older), not spilled.
    let (_, ev) = s
        .create(&id("new"), 20 * KB, 1, &mut NoExternalPins)
        .unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].id, id("replica"));
    assert!(ev[0].replica && !ev[0].spill);
    s.seal(&id("new"), 1, 3).unwrap();
    // Nothing evictable is left: primaries stay, the put fails with StoreFull.
    assert!(matches!(
        s.create(&id("more"), 30 * KB, 1, &mut NoExternalPins),
        Err(StoreError::StoreFull { .. })
    ));
    assert!(s.contains(Namespace::Object, &id("primary"), 4));
    s.check_invariants();
}

#[test]
fn spill_keeps_entries_and_restores() {
    let mut cfg = StoreConfig::new(100 * KB);
    cfg.spill = true;
    let mut s = Store::new(cfg);
    let mut x = NoExternalPins;
    let a = put(&mut s, "a", 50 * KB, 0).unwrap();
    put(&mut s, "b", 30 * KB, 1).unwrap();
    let (_, ev) = s.create(&id("c"), 30 * KB, 1, &mut x).unwrap();
    assert_eq!(ev.len(), 1);
    assert!(ev[0].spill && ev[0].id == id("a") && ev[0].offset == a.offset);
    s.seal(&id("c"), 1, 2).unwrap();
    assert_eq!(
        s.get(Namespace::Object, &id("a"), 1, 3),
        Lookup::Spilled(a.gen)
    );
    assert_eq!(s.stats().spilled_now, 1);
    s.check_invariants();
    let (p, ev) = s.restore(a.gen, 4, &mut x).unwrap();
    assert_eq!(p.len, 50 * KB);
    assert!(!ev.is_empty(), "restoring made room by spilling others");
    assert!(matches!(
        s.get(Namespace::Object, &id("a"), 1, 5),
        Lookup::Ready(_)
    ));
    s.check_invariants();
}

#[test]
fn kv_overwrite_ttl_and_expiry() {
    let mut s = Store::new(StoreConfig::new(1024 * KB));
    let mut x = NoExternalPins;
    let k = id("k");
    s.kv_create(&k, 10, 1, &mut x).unwrap();
    let (p1, replaced) = s.kv_commit(&k, 1, 0, 0, &mut x).unwrap();
    assert!(replaced.is_none());
    let Lookup::Ready(v) = s.get(Namespace::Kv, &k, 2, 0) else {
        panic!()
    };
    s.kv_create(&k, 20, 1, &mut x).unwrap();
    let (p2, replaced) = s.kv_commit(&k, 1, 5_000, 10, &mut x).unwrap();
    assert_eq!(replaced, Some((p1.gen, false)));
    assert_ne!(p1.gen, p2.gen);
    assert_eq!(v.gen, p1.gen, "old view still valid: its value is a zombie");
    assert_eq!(s.kv_ttl(&k, 1010), Some(Some(4_000)));
    assert!(s.release(2, v.gen, &mut x));
    assert_eq!(s.next_expiry(), Some(5_010));
    assert!(s.expire_due(5_009, &mut x).is_empty());
    assert_eq!(
        s.get(Namespace::Kv, &k, 2, 5_010),
        Lookup::Missing,
        "a due key is gone even before the sweep"
    );
    assert_eq!(s.expire_due(5_010, &mut x).len(), 1);
    assert_eq!(s.kv_ttl(&k, 5_010), None);
    assert_eq!(s.used(), 0);
    // expire on a live key, then persist.
    s.kv_create(&k, 1, 1, &mut x).unwrap();
    s.kv_commit(&k, 1, 0, 0, &mut x).unwrap();
    assert_eq!(s.kv_ttl(&k, 0), Some(None));
    assert!(s.kv_expire(&k, 1000, 0));
    assert!(s.kv_expire(&k, 0, 0));
    assert_eq!(s.next_expiry(), None);
    assert!(!s.kv_expire(&id("nope"), 1, 0));
    s.check_invariants();
}

#[test]
fn oversize_request_is_store_full_not_panic() {
    let mut s = Store::new(StoreConfig::new(64 * KB));
    let e = s
        .create(&id("big"), u64::MAX - 10, 1, &mut NoExternalPins)
        .unwrap_err();
    assert!(matches!(
        e,
        StoreError::InvalidArgument(_) | StoreError::StoreFull { .. }
    ));
    let e = s
        .create(&id("big"), 1 << 40, 1, &mut NoExternalPins)
        .unwrap_err();
    assert!(matches!(e, StoreError::StoreFull { .. }));
}

#[derive(Debug, Clone)]
enum Op {
    Create {
        name: u8,
        size: u16,
        client: u8,
    },
    Seal {
        name: u8,
        client: u8,
    },
    Get {
        name: u8,
        client: u8,
        kv: bool,
    },
    Release {
        client: u8,
        nth: u8,
    },
    Delete {
        name: u8,
        kv: bool,
    },
    KvSet {
        name: u8,
        size: u16,
        client: u8,
        ttl: u8,
    },
    ExtPin {
        name: u8,
    },
    ExtUnpin,
    Gone {
        client: u8,
    },
    Tick {
        ms: u16,
    },
    Sweep,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..12u8, 0..20_000u16, 0..3u8).prop_map(|(name, size, client)| Op::Create {
            name,
            size,
            client
        }),
        (0..12u8, 0..3u8).prop_map(|(name, client)| Op::Seal { name, client }),
        (0..12u8, 0..3u8, any::<bool>()).prop_map(|(name, client, kv)| Op::Get {
            name,
            client,
            kv
        }),
        (0..3u8, any::<u8>()).prop_map(|(client, nth)| Op::Release { client, nth }),
        (0..12u8, any::<bool>()).prop_map(|(name, kv)| Op::Delete { name, kv }),
        (0..12u8, 0..20_000u16, 0..3u8, 0..4u8).prop_map(|(name, size, client, ttl)| Op::KvSet {
            name,
            size,
            client,
            ttl
        }),
        (0..12u8).prop_map(|name| Op::ExtPin { name }),
        Just(Op::ExtUnpin),
        (0..3u8).prop_map(|client| Op::Gone { client }),
        (0..3000u16).prop_map(|ms| Op::Tick { ms }),
        Just(Op::Sweep),
    ]
}

/// The tenants of the property test: names are spread over them by number.
const TENANTS: [&str; 3] = [shoal_protocol::DEFAULT_TENANT, "ta", "tb"];

fn tenant_name(n: u8) -> ObjectId {
    id(&format!("n{n}")).qualified(TENANTS[usize::from(n) % 3])
}

#[test]
fn tenants_are_charged_payload_and_name_and_limits_refuse_without_change() {
    let mut s = Store::new(StoreConfig::new(1024 * KB));
    let mut x = NoExternalPins;
    let a = |n: &str| id(n).qualified("team-a");
    s.set_tenant_limits(
        "team-a",
        TenantLimits {
            arena_bytes: Some(1000),
            spill_bytes: None,
        },
    );
    // "obj" costs 3 name bytes: 997 payload bytes fill the limit exactly.
    s.create(&a("obj"), 997, 1, &mut x).unwrap();
    s.seal(&a("obj"), 1, 0).unwrap();
    assert_eq!(s.tenant_usage("team-a").arena_bytes, 1000);
    let used = s.used();
    let err = s.create(&a("one"), 1, 1, &mut x).unwrap_err();
    assert!(matches!(
        err,
        StoreError::QuotaExceeded {
            limit: 1000,
            wanted: 1004,
            ..
        }
    ));
    assert_eq!(err.code(), shoal_protocol::ErrorCode::QuotaExceeded);
    assert!(matches!(
        s.kv_create(&a("k"), 0, 1, &mut x),
        Err(StoreError::QuotaExceeded { .. })
    ));
    assert_eq!(s.used(), used, "nothing allocated");
    assert_eq!(s.get(Namespace::Object, &a("one"), 1, 0), Lookup::Missing);
    assert_eq!(s.tenant_usage("team-a").arena_bytes, 1000);
    // Other tenants are not limited by it, nor counted in it.
    put(&mut s, "free", 5000, 0).unwrap();
    assert_eq!(
        s.tenant_usage(shoal_protocol::DEFAULT_TENANT).arena_bytes,
        5004
    );
    assert_eq!(s.tenant_usage("team-a").arena_bytes, 1000);
    // Deleting frees the tenant's room.
    s.delete(Namespace::Object, &a("obj"), &mut x).unwrap();
    assert_eq!(s.tenant_usage("team-a"), TenantUsage::default());
    s.create(&a("one"), 1, 1, &mut x).unwrap();
    s.check_invariants();
}

#[test]
fn listings_hold_only_the_callers_tenant_and_strip_the_prefix() {
    let mut s = Store::new(StoreConfig::new(1024 * KB));
    let mut x = NoExternalPins;
    for (t, n) in [("team-a", "x"), ("team-b", "x"), ("team-b", "y")] {
        let q = id(n).qualified(t);
        s.create(&q, 1, 1, &mut x).unwrap();
        s.seal(&q, 1, 0).unwrap();
    }
    put(&mut s, "x", 1, 0).unwrap();
    let names = |prefix: &str| -> Vec<String> {
        s.list(Namespace::Object, prefix, 10, 0)
            .into_iter()
            .map(|e| e.id.to_string())
            .collect()
    };
    assert_eq!(names(""), ["x"], "the default tenant sees only its own");
    assert_eq!(names("team-b\0"), ["x", "y"]);
    assert_eq!(names("team-b\0y"), ["y"]);
    assert_eq!(names("team-a\0"), ["x"]);
    assert!(names("team-c\0").is_empty());
    // A plain prefix never reaches into a tenant.
    assert!(names("team-b").is_empty());
}

#[test]
fn spill_moves_the_charge_and_the_spill_limit_drops_instead() {
    let mut cfg = StoreConfig::new(100 * KB);
    cfg.spill = true;
    let mut s = Store::new(cfg);
    let mut x = NoExternalPins;
    let a = |n: &str| id(n).qualified("ta");
    s.set_tenant_limits(
        "ta",
        TenantLimits {
            arena_bytes: None,
            spill_bytes: Some(40 * KB),
        },
    );
    for (i, n) in ["p", "q", "r"].into_iter().enumerate() {
        s.create(&a(n), 30 * KB - 1, 1, &mut x).unwrap();
        s.seal(&a(n), 1, i as u64).unwrap();
    }
    // Past the high watermark: "p" is spilled (its 30 KiB fit the 40 KiB spill limit).
    let u = s.tenant_usage("ta");
    assert_eq!((u.arena_bytes, u.spill_bytes), (60 * KB, 30 * KB));
    // The next eviction of "q" would pass the spill limit: it is dropped instead.
    s.create(&a("s"), 30 * KB - 1, 1, &mut x).unwrap();
    s.seal(&a("s"), 1, 9).unwrap();
    let u = s.tenant_usage("ta");
    assert_eq!((u.arena_bytes, u.spill_bytes), (60 * KB, 30 * KB));
    assert_eq!(s.get(Namespace::Object, &a("q"), 1, 10), Lookup::Missing);
    let Lookup::Spilled(g) = s.get(Namespace::Object, &a("p"), 1, 10) else {
        panic!("p stays on disk")
    };
    s.check_invariants();
    // A restore moves the charge back (and may spill or drop others to make room).
    s.restore(g, 11, &mut x).unwrap();
    assert_eq!(s.tenant_usage("ta").spill_bytes, 0);
    s.check_invariants();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any sequence of operations keeps the invariants; a pinned generation is never evicted or
    /// freed; a request refused by a quota changes nothing; spill usage never passes its
    /// limit; and when every client is gone and every name deleted, usage (the arena's and
    /// every tenant's) returns to zero.
    #[test]
    fn random_operations_keep_invariants(
        ops in proptest::collection::vec(op(), 1..120),
        spill in any::<bool>(),
        arena_limit in proptest::option::of(0u64..60_000),
        spill_limit in proptest::option::of(0u64..60_000),
    ) {
        let mut cfg = StoreConfig::new(128 * KB);
        cfg.spill = spill;
        let mut s = Store::new(cfg);
        let limits = TenantLimits { arena_bytes: arena_limit, spill_bytes: spill_limit };
        s.set_tenant_limits("ta", limits);
        s.set_tenant_limits("tb", TenantLimits { arena_bytes: None, spill_bytes: spill_limit });
        let mut ext = FakePins::default();
        let mut now = 0u64;
        let mut views: Vec<(u64, Gen)> = Vec::new();
        let name = tenant_name;
        for op in ops {
            let pinned_before: HashSet<Gen> = views.iter().map(|v| v.1).chain(ext.pinned.iter().copied()).collect();
            let mut evicted = Vec::new();
            let before = (s.used(), s.tenant_usages());
            match op {
                Op::Create { name: n, size, client } => {
                    match s.create(&name(n), u64::from(size), u64::from(client), &mut ext) {
                        Ok((_, ev)) => evicted = ev,
                        Err(StoreError::QuotaExceeded { .. }) => {
                            prop_assert_eq!(&(s.used(), s.tenant_usages()), &before, "a refused create changed something");
                        }
                        Err(_) => {}
                    }
                }
                Op::Seal { name: n, client } => { let _ = s.seal(&name(n), u64::from(client), now); }
                Op::Get { name: n, client, kv } => {
                    let ns = if kv { Namespace::Kv } else { Namespace::Object };
                    match s.get(ns, &name(n), u64::from(client), now) {
                        Lookup::Ready(p) => views.push((u64::from(client), p.gen)),
                        Lookup::Spilled(g) => { if let Ok((_, ev)) = s.restore(g, now, &mut ext) { evicted = ev; } }
                        _ => {}
                    }
                }
                Op::Release { client, nth } => {
                    let mine: Vec<usize> = views.iter().enumerate().filter(|(_, v)| v.0 == u64::from(client)).map(|(i, _)| i).collect();
                    if !mine.is_empty() {
                        let i = mine[nth as usize % mine.len()];
                        let (c, g) = views.remove(i);
                        s.release(c, g, &mut ext);
                    }
                }
                Op::Delete { name: n, kv } => {
                    let ns = if kv { Namespace::Kv } else { Namespace::Object };
                    let _ = s.delete(ns, &name(n), &mut ext);
                }
                Op::KvSet { name: n, size, client, ttl } => {
                    match s.kv_create(&name(n), u64::from(size), u64::from(client), &mut ext) {
                        Ok((_, ev)) => {
                            evicted = ev;
                            s.kv_commit(&name(n), u64::from(client), u64::from(ttl) * 1000, now, &mut ext).unwrap();
                        }
                        Err(StoreError::QuotaExceeded { .. }) => {
                            prop_assert_eq!(&(s.used(), s.tenant_usages()), &before, "a refused kv set changed something");
                        }
                        Err(_) => {}
                    }
                }
                Op::ExtPin { name: n } => {
                    for ns in [Namespace::Object, Namespace::Kv] {
                        if let Some(g) = s.gen_of(ns, &name(n)) { ext.pinned.insert(g); }
                    }
                }
                Op::ExtUnpin => { ext.pinned.clear(); s.sweep(&mut ext); }
                Op::Gone { client } => {
                    s.client_gone(u64::from(client), &mut ext);
                    views.retain(|v| v.0 != u64::from(client));
                }
                Op::Tick { ms } => { now += u64::from(ms); s.expire_due(now, &mut ext); }
                Op::Sweep => { s.sweep(&mut ext); }
            }
            for e in &evicted {
                prop_assert!(!pinned_before.contains(&e.gen), "evicted pinned gen {}", e.gen);
            }
            s.check_invariants();
            prop_assert!(s.used() <= s.capacity());
            for t in ["ta", "tb"] {
                let u = s.tenant_usage(t);
                prop_assert!(spill_limit.is_none_or(|l| u.spill_bytes <= l), "{t} spilled past its limit");
                // Without spill nothing is restored, so the arena limit holds too.
                if !spill && t == "ta" {
                    prop_assert!(arena_limit.is_none_or(|l| u.arena_bytes <= l), "ta past its arena limit");
                }
            }
        }
        ext.pinned.clear();
        for c in 0..3 { s.client_gone(c, &mut ext); }
        for n in 0..12u8 {
            let _ = s.delete(Namespace::Object, &name(n), &mut ext);
            let _ = s.delete(Namespace::Kv, &name(n), &mut ext);
        }
        s.sweep(&mut ext);
        s.check_invariants();
        prop_assert_eq!(s.used(), 0);
        prop_assert!(s.tenant_usages().is_empty(), "tenant usage left: {:?}", s.tenant_usages());
    }
}
