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
    fn is_pinned(&self, gen: Gen, _tenant: &str) -> bool {
        self.pinned.contains(&gen)
    }
    fn reclaim(&mut self, gen: Gen, _tenant: &str) -> bool {
        self.withdrawn.insert(gen);
        !self.pinned.contains(&gen)
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
        seg: bool,
    },
    Touch {
        name: u8,
        tenant: u8,
        ms: u16,
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
        seg: bool,
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
        (0..12u8, 0..20_000u16, 0..3u8, any::<bool>()).prop_map(|(name, size, client, seg)| {
            Op::Create {
                name,
                size,
                client,
                seg,
            }
        }),
        (0..12u8, 0..3u8, 0..3000u16).prop_map(|(name, tenant, ms)| Op::Touch { name, tenant, ms }),
        (0..12u8, 0..3u8).prop_map(|(name, client)| Op::Seal { name, client }),
        (0..12u8, 0..3u8, any::<bool>()).prop_map(|(name, client, kv)| Op::Get {
            name,
            client,
            kv
        }),
        (0..3u8, any::<u8>()).prop_map(|(client, nth)| Op::Release { client, nth }),
        (0..12u8, any::<bool>()).prop_map(|(name, kv)| Op::Delete { name, kv }),
        (0..12u8, 0..20_000u16, 0..3u8, 0..4u8, any::<bool>()).prop_map(
            |(name, size, client, ttl, seg)| Op::KvSet {
                name,
                size,
                client,
                ttl,
                seg,
            }
        ),
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

#[test]
fn segments_have_their_own_budget_and_are_listed_once_when_freed() {
    let mut cfg = StoreConfig::new(16 * KB);
    cfg.segment_capacity = 100 * KB;
    let mut s = Store::new(cfg);
    let mut x = NoExternalPins;
    let (p, _) = s
        .create_in(&id("big"), 10_000, 1, Backing::Segment, &mut x)
        .unwrap();
    assert!(p.segment && p.offset == 0 && p.len == 10_000);
    assert_eq!(
        s.stats().segment_bytes,
        3 * SEGMENT_PAGE,
        "counted in whole pages"
    );
    assert!(s.is_unsealed_of(p.gen, 1) && !s.is_unsealed_of(p.gen, 2));
    assert_eq!(
        s.unsealed_gen(Namespace::Object, &id("big"), 1),
        Some(p.gen)
    );
    s.seal(&id("big"), 1, 1).unwrap();
    // Segment pressure evicts segments (LRU), never arena entries, and lists what it frees.
    put(&mut s, "small", 1000, 2).unwrap();
    // 12 + 24 + 24 + 32 KiB passes the high watermark (90 KiB); dropping the oldest (12)
    // is enough to get under the low one (80 KiB).
    for (i, (n, size)) in [("s1", 24 * KB), ("s2", 24 * KB), ("s3", 32 * KB)]
        .into_iter()
        .enumerate()
    {
        s.create_in(&id(n), size, 1, Backing::Segment, &mut x)
            .unwrap();
        s.seal(&id(n), 1, 3 + i as u64).unwrap();
    }
    assert!(s.contains(Namespace::Object, &id("small"), 9));
    assert!(
        !s.contains(Namespace::Object, &id("big"), 9),
        "the oldest segment went"
    );
    assert_eq!(s.take_freed_segments(), vec![p.gen]);
    assert!(s.take_freed_segments().is_empty(), "listed once");
    // Larger than the whole budget: StoreFull, nothing changes.
    assert!(matches!(
        s.create_in(&id("huge"), 200 * KB, 1, Backing::Segment, &mut x),
        Err(StoreError::StoreFull { .. })
    ));
    let d = s.gen_of(Namespace::Object, &id("s1")).unwrap();
    s.delete(Namespace::Object, &id("s1"), &mut x).unwrap();
    assert_eq!(s.take_freed_segments(), vec![d]);
    s.check_invariants();
}

#[test]
fn large_restores_go_to_segments() {
    let mut cfg = StoreConfig::new(64 * KB);
    cfg.segment_capacity = 256 * KB;
    cfg.segment_above = 4 * KB;
    cfg.spill = true;
    let mut s = Store::new(cfg);
    let mut x = NoExternalPins;
    let (a, _) = s
        .create_in(&id("a"), 100 * KB, 1, Backing::Segment, &mut x)
        .unwrap();
    s.seal(&id("a"), 1, 0).unwrap();
    let (_, ev) = s
        .create_in(&id("b"), 200 * KB, 1, Backing::Segment, &mut x)
        .unwrap();
    assert_eq!(ev.len(), 1);
    assert!(ev[0].segment && ev[0].spill && ev[0].gen == a.gen);
    assert_eq!(s.take_freed_segments(), vec![a.gen]);
    s.abort(&id("b"), 1).unwrap();
    let (p, _) = s.restore(a.gen, 1, &mut x).unwrap();
    assert!(p.segment, "a 100 KiB restore goes to a segment");
    s.check_invariants();
}

#[test]
fn touch_moves_only_the_claimants_own_live_entries() {
    // A client's claims of recent reads (drained from its pin page) reach the LRU through
    // `touch`: another tenant's entries, unknown generations and unsealed ones are ignored,
    // so a hostile client cannot steer which of another tenant's objects are evicted.
    let mut s = Store::new(StoreConfig::new(100 * KB));
    let mut x = NoExternalPins;
    let ta = |n: &str| id(n).qualified("ta");
    let tb = |n: &str| id(n).qualified("tb");
    s.create(&ta("a1"), 20 * KB, 1, &mut x).unwrap();
    s.seal(&ta("a1"), 1, 1).unwrap();
    s.create(&tb("b1"), 20 * KB, 1, &mut x).unwrap();
    s.seal(&tb("b1"), 1, 2).unwrap();
    s.create(&ta("a2"), 20 * KB, 1, &mut x).unwrap();
    s.seal(&ta("a2"), 1, 3).unwrap();
    let a1 = s.gen_of(Namespace::Object, &ta("a1")).unwrap();
    let b1 = s.gen_of(Namespace::Object, &tb("b1")).unwrap();
    // "ta" claims to have read tb's object, and unknown generations, at the end of time.
    s.touch(b1, "ta", u64::MAX);
    s.touch(9999, "ta", u64::MAX);
    // It may make its own object recent.
    s.touch(a1, "ta", 10);
    s.create(&ta("unsealed"), 1, 1, &mut x).unwrap();
    let u = s.gen_of(Namespace::Object, &ta("unsealed")).unwrap();
    s.touch(u, "ta", 11);
    // Past the high watermark: one eviction is enough. By seal time a1 (1) is the oldest;
    // ta's own claim made it the newest, and ta's claim on b1 counted for nothing (else b1
    // would be the newest and a2 would go).
    let (_, ev) = s.create(&tb("new"), 30 * KB, 2, &mut x).unwrap();
    let gone: Vec<_> = ev.iter().map(|e| e.id.local().to_owned()).collect();
    assert_eq!(gone, ["b1"], "LRU by the store's own clock: {gone:?}");
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
        cfg.segment_capacity = 96 * KB;
        cfg.segment_above = 8 * KB;
        let mut s = Store::new(cfg);
        let mut live_segs: HashSet<Gen> = HashSet::new();
        let backing = |seg: bool| if seg { Backing::Segment } else { Backing::Arena };
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
                Op::Create { name: n, size, client, seg } => {
                    match s.create_in(&name(n), u64::from(size), u64::from(client), backing(seg), &mut ext) {
                        Ok((p, ev)) => {
                            if p.segment { live_segs.insert(p.gen); }
                            evicted = ev;
                        }
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
                        Lookup::Spilled(g) => {
                            if let Ok((p, ev)) = s.restore(g, now, &mut ext) {
                                if p.segment { live_segs.insert(p.gen); }
                                evicted = ev;
                            }
                        }
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
                Op::KvSet { name: n, size, client, ttl, seg } => {
                    match s.kv_create_in(&name(n), u64::from(size), u64::from(client), backing(seg), &mut ext) {
                        Ok((p, ev)) => {
                            if p.segment { live_segs.insert(p.gen); }
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
                Op::Touch { name: n, tenant, ms } => {
                    // Any tenant may claim any generation at any time: only its own count.
                    for ns in [Namespace::Object, Namespace::Kv] {
                        if let Some(g) = s.gen_of(ns, &name(n)) {
                            s.touch(g, TENANTS[usize::from(tenant)], now + u64::from(ms));
                        }
                    }
                }
                Op::Sweep => { s.sweep(&mut ext); }
            }
            for e in &evicted {
                prop_assert!(!pinned_before.contains(&e.gen), "evicted pinned gen {}", e.gen);
            }
            for g in s.take_freed_segments() {
                prop_assert!(live_segs.remove(&g), "segment {} freed twice or never made", g);
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
        for g in s.take_freed_segments() {
            prop_assert!(live_segs.remove(&g), "segment {} freed twice or never made", g);
        }
        prop_assert!(live_segs.is_empty(), "segments never freed: {:?}", live_segs);
        prop_assert_eq!(s.used(), 0);
        prop_assert!(s.tenant_usages().is_empty(), "tenant usage left: {:?}", s.tenant_usages());
    }
}
