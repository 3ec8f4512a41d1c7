//! Tests of the sans-IO router: unit tests of each decision, and property tests that drive
//! random event sequences through it and check the invariants listed in the parent module
//! (slots never exceeded, exactly one reply per accepted call, queues bounded, one charge
//! per call held, each object result released at most once).
#![allow(clippy::unwrap_used)]
use super::*;
use proptest::prelude::*;
use std::sync::Arc;

fn req(id: u64, function: &str, instance: Option<&str>, timeout_ms: u64) -> CallRequest {
    CallRequest {
        id,
        function: function.into(),
        instance: instance.map(Into::into),
        args: Payload::Inline(vec![id as u8]),
        timeout: Duration::from_millis(timeout_ms),
        trace_id: 0,
        local_only: false,
        charge: None,
    }
}

fn code(a: &Action) -> Option<ErrorCode> {
    match a {
        Action::Reply { result: Err(e), .. } => Some(e.code),
        _ => None,
    }
}

#[test]
fn unknown_function_is_not_found() {
    let mut r = Router::new(4);
    let out = r.call(1, req(1, "f", None, 100), Instant::now());
    assert_eq!(out.len(), 1);
    assert_eq!(code(&out[0]), Some(ErrorCode::NotFound));
}

#[test]
fn least_loaded_then_queue_then_overloaded() {
    let now = Instant::now();
    let mut r = Router::new(1);
    r.register(10, "f", "a", 1, "t", now).unwrap();
    r.register(11, "f", "b", 1, "t", now).unwrap();
    let a = r.call(1, req(1, "f", None, 100), now);
    let b = r.call(1, req(2, "f", None, 100), now);
    assert!(matches!(a[0], Action::Invoke { instance: 10, .. }));
    assert!(matches!(b[0], Action::Invoke { instance: 11, .. }));
    assert!(r.call(1, req(3, "f", None, 100), now).is_empty());
    assert_eq!(r.queued("f"), 1);
    let over = r.call(1, req(4, "f", None, 100), now);
    assert_eq!(code(&over[0]), Some(ErrorCode::Overloaded));
    // A result frees a slot and the queued call runs there.
    let Action::Invoke { id, .. } = a[0] else {
        unreachable!()
    };
    let out = r.result(10, id, Ok(Payload::Inline(vec![])), now);
    assert!(matches!(
        out[0],
        Action::Reply {
            caller: 1,
            id: 1,
            ..
        }
    ));
    assert!(matches!(out[1], Action::Invoke { instance: 10, .. }));
}

#[test]
fn timeout_frees_slot_and_drops_late_result() {
    let now = Instant::now();
    let mut r = Router::new(4);
    r.register(10, "f", "a", 1, "t", now).unwrap();
    let out = r.call(1, req(1, "f", None, 50), now);
    let Action::Invoke { id, .. } = out[0] else {
        unreachable!()
    };
    assert!(r.call(1, req(2, "f", None, 500), now).is_empty());
    assert!(r.tick(now + Duration::from_millis(49)).is_empty());
    let out = r.tick(now + Duration::from_millis(50));
    assert_eq!(code(&out[0]), Some(ErrorCode::Timeout));
    assert!(matches!(out[1], Action::Invoke { instance: 10, .. }));
    assert!(r
        .result(10, id, Ok(Payload::Inline(vec![])), now)
        .is_empty());
    assert_eq!(r.running(10), 1);
}

#[test]
fn disconnect_fails_running_and_keeps_queued() {
    let now = Instant::now();
    let mut r = Router::new(4);
    r.register(10, "f", "a", 1, "t", now).unwrap();
    r.call(1, req(1, "f", None, 500), now);
    r.call(1, req(2, "f", None, 500), now);
    let out = r.disconnect(10);
    assert_eq!(out.len(), 1);
    assert_eq!(code(&out[0]), Some(ErrorCode::InstanceFailed));
    assert_eq!(r.queued("f"), 1);
    // A new call finds no instance, but the queued one waits for the next instance.
    let nf = r.call(1, req(3, "f", None, 500), now);
    assert_eq!(code(&nf[0]), Some(ErrorCode::NotFound));
    let out = r.register(11, "f", "b", 1, "t", now).unwrap();
    assert!(matches!(out[0], Action::Invoke { instance: 11, .. }));
}

#[test]
fn named_instance_and_duplicates() {
    let now = Instant::now();
    let mut r = Router::new(4);
    r.register(10, "f", "a", 2, "t", now).unwrap();
    r.register(11, "f", "b", 2, "t", now).unwrap();
    assert_eq!(
        r.register(12, "f", "b", 2, "t", now).unwrap_err().code,
        ErrorCode::AlreadyExists
    );
    let out = r.call(1, req(1, "f", Some("b"), 500), now);
    assert!(matches!(out[0], Action::Invoke { instance: 11, .. }));
    let out = r.call(1, req(2, "f", Some("zz"), 500), now);
    assert_eq!(code(&out[0]), Some(ErrorCode::NotFound));
}

fn ids(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn local_first_then_remote_and_peers_stay_local() {
    let now = Instant::now();
    let mut r = Router::new(4);
    r.register(10, "f", "a", 1, "t", now).unwrap();
    r.set_remote(20, "f", "n2", ids(&["b"]), 2, "t", now);
    let first = r.call(1, req(1, "f", None, 500), now);
    assert!(matches!(first[0], Action::Invoke { instance: 10, .. }));
    let second = r.call(1, req(2, "f", None, 500), now);
    assert!(matches!(second[0], Action::Invoke { instance: 20, .. }));
    // A call from another proxy waits for the local instance instead of going remote.
    let mut peer = req(3, "f", None, 500);
    peer.local_only = true;
    assert!(r.call(2, peer, now).is_empty());
    assert_eq!(r.queued("f"), 1);
    // The remote route's free slot does not take it either.
    let Action::Invoke { id, .. } = second[0] else {
        unreachable!()
    };
    let out = r.result(20, id, Ok(Payload::Inline(vec![])), now);
    assert_eq!(out.len(), 1, "only the reply: {out:?}");
    // Only remote routes: a peer's call is NotFound, a caller's goes remote by name.
    let mut r = Router::new(4);
    r.set_remote(20, "f", "n2", ids(&["b"]), 2, "t", now);
    let mut peer = req(4, "f", None, 500);
    peer.local_only = true;
    assert_eq!(code(&r.call(2, peer, now)[0]), Some(ErrorCode::NotFound));
    let named = r.call(1, req(5, "f", Some("b"), 500), now);
    assert!(matches!(
        &named[0],
        Action::Invoke { instance: 20, target: Some(t), .. } if t == "b"
    ));
}

#[test]
fn bounce_tries_another_route_once_then_fails() {
    let now = Instant::now();
    let mut r = Router::new(4);
    r.set_remote(20, "f", "n2", ids(&["b"]), 1, "t", now);
    r.set_remote(21, "f", "n3", ids(&["c"]), 1, "t", now);
    let out = r.call(1, req(1, "f", None, 500), now);
    let Action::Invoke { instance, id, .. } = out[0] else {
        unreachable!()
    };
    let other = if instance == 20 { 21 } else { 20 };
    let e = err(ErrorCode::NotFound, "gone");
    let out = r.bounce(instance, id, e.clone(), now);
    assert!(matches!(out[0], Action::Invoke { instance: i, .. } if i == other));
    let out = r.bounce(other, id, e, now);
    assert_eq!(code(&out[0]), Some(ErrorCode::NotFound));
    assert!(r.calls.is_empty());
}

#[test]
fn retired_route_finishes_its_calls_and_takes_no_more() {
    let now = Instant::now();
    let mut r = Router::new(4);
    r.set_remote(20, "f", "n2", ids(&["b"]), 2, "t", now);
    let out = r.call(1, req(1, "f", None, 500), now);
    let Action::Invoke { id, .. } = out[0] else {
        unreachable!()
    };
    r.retire(20);
    assert_eq!(
        code(&r.call(1, req(2, "f", None, 500), now)[0]),
        Some(ErrorCode::NotFound)
    );
    let out = r.result(20, id, Ok(Payload::Inline(vec![7])), now);
    assert!(matches!(&out[0], Action::Reply { result: Ok(_), .. }));
    assert!(r.instances.is_empty(), "reaped once idle");
}

#[test]
fn a_draining_instance_finishes_its_calls_and_takes_no_more() {
    let now = Instant::now();
    let mut r = Router::new(4);
    r.register(10, "f", "a", 2, "t", now).unwrap();
    let out = r.call(1, req(1, "f", None, 500), now);
    let Action::Invoke { id, .. } = out[0] else {
        unreachable!()
    };
    r.retire(10);
    // No instance takes new calls: NotFound (no other instance), not queued behind it.
    assert_eq!(
        code(&r.call(1, req(2, "f", None, 500), now)[0]),
        Some(ErrorCode::NotFound)
    );
    // Its call in flight still completes.
    let out = r.result(10, id, Ok(Payload::Inline(vec![1])), now);
    assert!(matches!(&out[0], Action::Reply { result: Ok(_), .. }));
    // A successor registers and takes new calls.
    r.register(11, "f", "b", 1, "t", now).unwrap();
    let out = r.call(1, req(3, "f", None, 500), now);
    assert!(matches!(out[0], Action::Invoke { instance: 11, .. }));
}

#[test]
fn a_function_belongs_to_the_tenant_of_its_first_instance() {
    let now = Instant::now();
    let mut r = Router::new(4);
    assert_eq!(r.function_tenant("f"), None);
    r.register(10, "f", "a", 1, "team-a", now).unwrap();
    assert_eq!(r.function_tenant("f"), Some("team-a"));
    let e = r.register(11, "f", "b", 1, "team-b", now).unwrap_err();
    assert_eq!(e.code, ErrorCode::PermissionDenied);
    // A route of another tenant's function of that name is left out.
    let out = r.set_remote(20, "f", "n2", ids(&["c"]), 1, "team-b", now);
    assert!(out.is_empty());
    let out = r.call(1, req(1, "f", Some("c"), 100), now);
    assert_eq!(code(&out[0]), Some(ErrorCode::NotFound));
    // Once the function is gone, the name is free again.
    r.disconnect(10);
    assert_eq!(r.function_tenant("f"), None);
    r.register(11, "f", "b", 1, "team-b", now).unwrap();
    assert_eq!(r.function_tenant("f"), Some("team-b"));
}

fn object(name: &str) -> Result<Payload, WireError> {
    Ok(Payload::Object(
        shoal_protocol::ObjectId::new(name).unwrap(),
    ))
}

#[test]
fn object_results_are_released_to_the_instance_that_stored_them() {
    let now = Instant::now();
    let mut r = Router::new(4);
    r.register(10, "f", "a", 4, "t", now).unwrap();
    let invoke = |out: &[Action]| match out[0] {
        Action::Invoke { id, .. } => id,
        _ => panic!("{out:?}"),
    };
    let i1 = invoke(&r.call(1, req(1, "f", None, 1000), now));
    let i2 = invoke(&r.call(1, req(2, "f", None, 1000), now));
    let i3 = invoke(&r.call(2, req(1, "f", None, 1000), now));
    r.result(10, i1, object("r1"), now);
    r.result(10, i2, Ok(Payload::Inline(vec![])), now);
    r.result(10, i3, object("r3"), now);
    assert!(r.release(1, 2).is_empty(), "an inline result holds nothing");
    assert!(r.release(2, 9).is_empty(), "unknown ids are ignored");
    assert_eq!(
        r.release(1, 1),
        vec![Action::Release {
            instance: 10,
            id: i1
        }]
    );
    assert!(r.release(1, 1).is_empty(), "once");
    // A caller that goes away releases what it held.
    assert_eq!(
        r.disconnect(2),
        vec![Action::Release {
            instance: 10,
            id: i3
        }]
    );
    // A result whose call ended first is released at once.
    let i4 = invoke(&r.call(1, req(3, "f", None, 10), now));
    r.tick(now + Duration::from_millis(20));
    assert_eq!(
        r.result(10, i4, object("late"), now),
        vec![Action::Release {
            instance: 10,
            id: i4
        }]
    );
    // An instance that goes away takes its results with it: nobody is left to tell.
    let i5 = invoke(&r.call(1, req(4, "f", None, 1000), now));
    r.result(10, i5, object("r5"), now);
    r.disconnect(10);
    assert!(r.release(1, 4).is_empty());
}

#[test]
fn a_caller_holds_at_most_max_held_results() {
    let now = Instant::now();
    let mut r = Router::new(4);
    r.register(10, "f", "a", 1, "t", now).unwrap();
    let mut first = None;
    for id in 0..=MAX_HELD as u64 {
        let Action::Invoke { id: inv, .. } = r.call(1, req(id, "f", None, 1000), now)[0] else {
            panic!("not dispatched");
        };
        first.get_or_insert(inv);
        let out = r.result(10, inv, object("r"), now);
        if id == MAX_HELD as u64 {
            assert!(out.contains(&Action::Release {
                instance: 10,
                id: first.unwrap()
            }));
        }
    }
    assert_eq!(r.held[&1].len(), MAX_HELD);
}

#[derive(Debug, Clone)]
enum Op {
    Register {
        conn: u8,
        function: u8,
        conc: u8,
    },
    Call {
        caller: u8,
        function: u8,
        instance: Option<u8>,
        timeout: u8,
    },
    Answer {
        pick: u8,
        object: bool,
    },
    Release {
        caller: u8,
        pick: u8,
    },
    Tick {
        ms: u8,
    },
    Disconnect {
        conn: u8,
    },
    Remote {
        conn: u8,
        function: u8,
        conc: u8,
    },
    Retire {
        conn: u8,
    },
    Bounce {
        pick: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4, 0u8..2, 1u8..4).prop_map(|(conn, function, conc)| Op::Register {
            conn,
            function,
            conc
        }),
        (0u8..2, 0u8..3, proptest::option::of(0u8..4), 1u8..100).prop_map(
            |(caller, function, instance, timeout)| Op::Call {
                caller,
                function,
                instance,
                timeout
            }
        ),
        (any::<u8>(), any::<bool>()).prop_map(|(pick, object)| Op::Answer { pick, object }),
        (0u8..2, any::<u8>()).prop_map(|(caller, pick)| Op::Release { caller, pick }),
        (0u8..60).prop_map(|ms| Op::Tick { ms }),
        (0u8..6).prop_map(|conn| Op::Disconnect { conn }),
        (0u8..2, 0u8..2, 1u8..4).prop_map(|(conn, function, conc)| Op::Remote {
            conn,
            function,
            conc
        }),
        (0u8..2).prop_map(|conn| Op::Retire { conn }),
        any::<u8>().prop_map(|pick| Op::Bounce { pick }),
    ]
}

/// What the model saw of object results: those answered (by instance and invoke), and
/// those released.
#[derive(Default)]
struct Objects {
    answered: HashSet<(ConnId, u64)>,
    released: HashSet<(ConnId, u64)>,
}

/// Records `out` in the model; a new invoke must fit in the instance's free slots (slots
/// freed by timeouts are those the router no longer runs); an object result is released
/// at most once, and only one that was answered.
fn apply(
    r: &Router,
    out: Vec<Action>,
    in_flight: &mut HashMap<ConnId, HashSet<u64>>,
    conc: &HashMap<ConnId, usize>,
    replies: &mut HashMap<(ConnId, u64), usize>,
    objects: &mut Objects,
) {
    for a in out {
        match a {
            Action::Reply { caller, id, .. } => {
                *replies.entry((caller, id)).or_default() += 1;
            }
            Action::Release { instance, id } => {
                assert!(
                    objects.answered.contains(&(instance, id)),
                    "released {id} on {instance}, never answered with an object"
                );
                assert!(
                    objects.released.insert((instance, id)),
                    "released {id} on {instance} twice"
                );
            }
            Action::Invoke { instance, id, .. } => {
                let set = in_flight.entry(instance).or_default();
                set.retain(|i| {
                    r.calls
                        .get(i)
                        .is_some_and(|c| c.running_on == Some(instance))
                });
                assert!(set.insert(id), "invoke {id} sent twice");
                assert!(set.len() <= conc[&instance], "concurrency exceeded");
            }
        }
    }
}

proptest! {
    #[test]
    fn invariants_hold(ops in proptest::collection::vec(op(), 1..200), max_queue in 0usize..4) {
        let start = Instant::now();
        let mut now = start;
        let mut r = Router::new(max_queue);
        // Instance conns are 100+n, callers 0..2.
        let mut conc: HashMap<ConnId, usize> = HashMap::new();
        let mut in_flight: HashMap<ConnId, HashSet<u64>> = HashMap::new();
        let mut replies: HashMap<(ConnId, u64), usize> = HashMap::new();
        let mut issued: Vec<(ConnId, u64)> = Vec::new();
        let mut dead_callers: HashSet<ConnId> = HashSet::new();
        let mut next_id = 0u64;
        let mut objects = Objects::default();
        // Every call is charged to one tenant: the count follows the calls the router holds.
        let tenant = Arc::new(crate::access::TenantCalls::new());
        for op in ops {
            match op {
                Op::Register { conn, function, conc: c } => {
                    let conn = 100 + ConnId::from(conn);
                    if let Ok(out) = r.register(conn, &format!("f{function}"), &format!("i{conn}"), u32::from(c), "t", now) {
                        conc.insert(conn, usize::from(c));
                        in_flight.insert(conn, HashSet::new());
                        apply(&r, out, &mut in_flight, &conc, &mut replies, &mut objects);
                    }
                }
                Op::Call { caller, function, instance, timeout } => {
                    let caller = ConnId::from(caller);
                    if dead_callers.contains(&caller) { continue; }
                    next_id += 1;
                    issued.push((caller, next_id));
                    let inst = instance.map(|i| format!("i{}", 100 + u64::from(i)));
                    let out = r.call(caller, CallRequest {
                        id: next_id,
                        function: format!("f{function}"),
                        instance: inst,
                        args: Payload::Inline(vec![]),
                        timeout: Duration::from_millis(u64::from(timeout)),
                        trace_id: 0,
                        local_only: false,
                        charge: Some(tenant.charge().unwrap()),
                    }, now);
                    apply(&r, out, &mut in_flight, &conc, &mut replies, &mut objects);
                }
                Op::Answer { pick, object } => {
                    let all: Vec<(ConnId, u64)> = {
                        let mut v: Vec<_> = in_flight.iter().flat_map(|(c, s)| s.iter().map(move |i| (*c, *i))).collect();
                        v.sort_unstable();
                        v
                    };
                    if all.is_empty() { continue; }
                    let (conn, id) = all[usize::from(pick) % all.len()];
                    in_flight.get_mut(&conn).unwrap().remove(&id);
                    let result = if object {
                        objects.answered.insert((conn, id));
                        Payload::Object(shoal_protocol::ObjectId::new(format!("r{id}")).unwrap())
                    } else {
                        Payload::Inline(vec![])
                    };
                    let out = r.result(conn, id, Ok(result), now);
                    apply(&r, out, &mut in_flight, &conc, &mut replies, &mut objects);
                }
                Op::Remote { conn, function, conc: c } => {
                    // Route conns are 200+n; a route keeps its function.
                    let conn = 200 + ConnId::from(conn);
                    let function = r.instances.get(&conn).map_or(format!("f{function}"), |i| i.function.clone());
                    let out = r.set_remote(conn, &function, "n", BTreeSet::new(), u32::from(c), "t", now);
                    // Lowering a route's concurrency below its calls in flight is allowed
                    // (its instances went away); it only stops new dispatches.
                    conc.insert(conn, usize::from(c).max(r.running(conn)));
                    in_flight.entry(conn).or_default();
                    apply(&r, out, &mut in_flight, &conc, &mut replies, &mut objects);
                }
                Op::Release { caller, pick } => {
                    let caller = ConnId::from(caller);
                    let answered: Vec<u64> = issued.iter().filter(|(c, _)| *c == caller).map(|(_, id)| *id).collect();
                    if answered.is_empty() { continue; }
                    let out = r.release(caller, answered[usize::from(pick) % answered.len()]);
                    apply(&r, out, &mut in_flight, &conc, &mut replies, &mut objects);
                }
                Op::Retire { conn } => {
                    r.retire(200 + ConnId::from(conn));
                }
                Op::Bounce { pick } => {
                    let all: Vec<(ConnId, u64)> = {
                        let mut v: Vec<_> = in_flight.iter().filter(|(c, _)| **c >= 200).flat_map(|(c, s)| s.iter().map(move |i| (*c, *i))).collect();
                        v.sort_unstable();
                        v
                    };
                    if all.is_empty() { continue; }
                    let (conn, id) = all[usize::from(pick) % all.len()];
                    in_flight.get_mut(&conn).unwrap().remove(&id);
                    let out = r.bounce(conn, id, err(ErrorCode::Overloaded, "busy"), now);
                    apply(&r, out, &mut in_flight, &conc, &mut replies, &mut objects);
                }
                Op::Tick { ms } => {
                    now += Duration::from_millis(u64::from(ms));
                    let out = r.tick(now);
                    apply(&r, out, &mut in_flight, &conc, &mut replies, &mut objects);
                }
                Op::Disconnect { conn } => {
                    let conn = if conn < 4 { 100 + ConnId::from(conn) } else { ConnId::from(conn - 4) };
                    let out = r.disconnect(conn);
                    if conn < 100 { dead_callers.insert(conn); }
                    in_flight.remove(&conn);
                    conc.remove(&conn);
                    apply(&r, out, &mut in_flight, &conc, &mut replies, &mut objects);
                }
            }
            // The router's own view never exceeds concurrency; queues stay bounded.
            for (conn, c) in &conc {
                prop_assert!(r.running(*conn) <= *c);
            }
            for f in 0..3 {
                let q = r.queued(&format!("f{}", f));
                prop_assert!(q <= max_queue);
            }
            prop_assert_eq!(tenant.in_flight(), r.calls.len() as u64, "one charge per call held");
            // Our model of in-flight invokes follows the router's (timeouts free slots).
            for (conn, set) in in_flight.iter_mut() {
                set.retain(|id| r.calls.get(id).is_some_and(|c| c.running_on == Some(*conn)));
            }
        }
        let out = r.shutdown();
        apply(&r, out, &mut in_flight, &conc, &mut replies, &mut objects);
        prop_assert_eq!(tenant.in_flight(), 0, "every charge given back");
        // Callers that go away release what they held.
        for caller in 0..2 {
            let out = r.disconnect(caller);
            apply(&r, out, &mut in_flight, &conc, &mut replies, &mut objects);
        }
        prop_assert!(r.held.is_empty());
        for key in &issued {
            let n = replies.get(key).copied().unwrap_or(0);
            if dead_callers.contains(&key.0) {
                prop_assert!(n <= 1, "call {key:?} answered {n} times");
            } else {
                prop_assert_eq!(n, 1, "call {:?} answered {} times", key, n);
            }
        }
        prop_assert!(r.calls.is_empty());
        prop_assert!(r.deadlines.is_empty());
    }
}
