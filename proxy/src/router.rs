//! Routing decisions, with no IO and no clock: events and `now` go in, [`Action`]s come out.
//!
//! Invariants (checked by the property tests below):
//! - an instance never has more calls in flight than its declared concurrency;
//! - every accepted call gets exactly one [`Action::Reply`] (result, error, timeout, failure
//!   or shutdown); results that arrive after that are dropped;
//! - each function's queue holds at most `max_queue` calls; a call that finds it full is
//!   answered with `Overloaded` at once.
//!
//! A call goes to the instance it names, or else to the least-loaded instance of its function
//! with a free slot; if there is none it waits in its function's FIFO queue until a slot frees,
//! an instance registers, or its deadline passes. Calls in flight on an instance that goes
//! away fail with `InstanceFailed`; queued calls stay queued (the only retry).
use shoal_protocol::{ErrorCode, Payload, WireError};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// Identifies one connection (caller or instance) to the router.
pub(crate) type ConnId = u64;

/// What the IO layer must do after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Send `ProxyFrame::Reply` to a caller.
    Reply {
        caller: ConnId,
        id: u64,
        result: Result<Payload, WireError>,
    },
    /// Send `ProxyFrame::Invoke` to an instance.
    Invoke {
        instance: ConnId,
        id: u64,
        function: String,
        args: Payload,
        timeout_ms: u64,
        trace_id: u64,
    },
}

/// A call as the caller sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CallRequest {
    pub(crate) id: u64,
    pub(crate) function: String,
    pub(crate) instance: Option<String>,
    pub(crate) args: Payload,
    pub(crate) timeout: Duration,
    pub(crate) trace_id: u64,
}

#[derive(Debug)]
struct Instance {
    function: String,
    instance_id: String,
    concurrency: usize,
    /// Invoke ids running here.
    running: HashSet<u64>,
}

#[derive(Debug, Default)]
struct Function {
    /// Instance connections, in registration order.
    instances: Vec<ConnId>,
    /// Invoke ids waiting for a slot, oldest first.
    queue: VecDeque<u64>,
}

#[derive(Debug)]
struct Call {
    caller: ConnId,
    caller_id: u64,
    function: String,
    instance: Option<String>,
    args: Payload,
    trace_id: u64,
    deadline: Instant,
    /// The instance connection running it, if dispatched.
    running_on: Option<ConnId>,
}

/// The router's state. See the module docs for its invariants.
#[derive(Debug)]
pub(crate) struct Router {
    max_queue: usize,
    functions: HashMap<String, Function>,
    instances: HashMap<ConnId, Instance>,
    calls: HashMap<u64, Call>,
    deadlines: BTreeSet<(Instant, u64)>,
    next_invoke: u64,
    closed: bool,
}

fn err(code: ErrorCode, msg: impl Into<String>) -> WireError {
    WireError::new(code, msg)
}

impl Router {
    /// A router whose function queues hold at most `max_queue` calls each.
    pub(crate) fn new(max_queue: usize) -> Self {
        Self {
            max_queue,
            functions: HashMap::new(),
            instances: HashMap::new(),
            calls: HashMap::new(),
            deadlines: BTreeSet::new(),
            next_invoke: 1,
            closed: false,
        }
    }

    /// Registers connection `conn` as an instance of `function`; queued calls it can take are
    /// dispatched to it. Refused for a duplicate instance id, zero concurrency or after
    /// shutdown.
    pub(crate) fn register(
        &mut self,
        conn: ConnId,
        function: &str,
        instance_id: &str,
        concurrency: u32,
        now: Instant,
    ) -> Result<Vec<Action>, WireError> {
        if self.closed {
            return Err(err(ErrorCode::Unavailable, "proxy is shutting down"));
        }
        if concurrency == 0 {
            return Err(err(
                ErrorCode::InvalidArgument,
                "concurrency must be at least 1",
            ));
        }
        if self.instances.contains_key(&conn) {
            return Err(err(
                ErrorCode::ProtocolError,
                "connection already registered",
            ));
        }
        if self
            .instances
            .values()
            .any(|i| i.instance_id == instance_id)
        {
            return Err(err(
                ErrorCode::AlreadyExists,
                format!("instance {instance_id} is already registered"),
            ));
        }
        self.instances.insert(
            conn,
            Instance {
                function: function.to_owned(),
                instance_id: instance_id.to_owned(),
                concurrency: concurrency as usize,
                running: HashSet::new(),
            },
        );
        self.functions
            .entry(function.to_owned())
            .or_default()
            .instances
            .push(conn);
        let mut out = Vec::new();
        self.fill(conn, now, &mut out);
        Ok(out)
    }

    /// A caller's call arrives.
    pub(crate) fn call(&mut self, caller: ConnId, req: CallRequest, now: Instant) -> Vec<Action> {
        let reply = |e: WireError| {
            vec![Action::Reply {
                caller,
                id: req.id,
                result: Err(e),
            }]
        };
        if self.closed {
            return reply(err(ErrorCode::Unavailable, "proxy is shutting down"));
        }
        let Some(f) = self.functions.get(&req.function) else {
            return reply(err(
                ErrorCode::NotFound,
                format!("no instance of function {}", req.function),
            ));
        };
        if f.instances.is_empty() {
            return reply(err(
                ErrorCode::NotFound,
                format!("no instance of function {}", req.function),
            ));
        }
        let candidates: Vec<ConnId> = match &req.instance {
            Some(want) => {
                let found: Vec<ConnId> = f
                    .instances
                    .iter()
                    .copied()
                    .filter(|c| {
                        self.instances
                            .get(c)
                            .is_some_and(|i| &i.instance_id == want)
                    })
                    .collect();
                if found.is_empty() {
                    return reply(err(
                        ErrorCode::NotFound,
                        format!("no instance {want} of function {}", req.function),
                    ));
                }
                found
            }
            None => f.instances.clone(),
        };
        // Least-loaded instance with a free slot (ties: first registered).
        let target = candidates
            .iter()
            .filter_map(|c| self.instances.get(c).map(|i| (c, i)))
            .filter(|(_, i)| i.running.len() < i.concurrency)
            .min_by_key(|(_, i)| i.running.len())
            .map(|(c, _)| *c);
        // Only queue behind others when no slot is free; a queued call that could run now
        // would break FIFO only if the queue were non-empty while slots are free, which
        // `fill` never leaves behind.
        if target.is_none() && f.queue.len() >= self.max_queue {
            return reply(err(
                ErrorCode::Overloaded,
                format!("queue of function {} is full", req.function),
            ));
        }
        let invoke = self.next_invoke;
        self.next_invoke += 1;
        let deadline = now + req.timeout;
        self.calls.insert(
            invoke,
            Call {
                caller,
                caller_id: req.id,
                function: req.function.clone(),
                instance: req.instance,
                args: req.args,
                trace_id: req.trace_id,
                deadline,
                running_on: None,
            },
        );
        self.deadlines.insert((deadline, invoke));
        let mut out = Vec::new();
        match target {
            Some(conn) => self.dispatch(invoke, conn, now, &mut out),
            None => {
                if let Some(f) = self.functions.get_mut(&req.function) {
                    f.queue.push_back(invoke);
                }
            }
        }
        out
    }

    /// An instance answers invoke `id`. Unknown or late results are dropped.
    pub(crate) fn result(
        &mut self,
        instance: ConnId,
        id: u64,
        result: Result<Payload, WireError>,
        now: Instant,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let running_here = self
            .calls
            .get(&id)
            .is_some_and(|c| c.running_on == Some(instance));
        if !running_here {
            return out;
        }
        if let Some(call) = self.remove_call(id) {
            out.push(Action::Reply {
                caller: call.caller,
                id: call.caller_id,
                result,
            });
        }
        self.fill(instance, now, &mut out);
        out
    }

    /// Fails every call whose deadline is at or before `now` with `Timeout`.
    pub(crate) fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        let mut freed = Vec::new();
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            let running_on = self.calls.get(&id).and_then(|c| c.running_on);
            if let Some(call) = self.remove_call(id) {
                out.push(Action::Reply {
                    caller: call.caller,
                    id: call.caller_id,
                    result: Err(err(
                        ErrorCode::Timeout,
                        format!("call to {} passed its deadline", call.function),
                    )),
                });
            } else {
                self.deadlines.remove(&(deadline, id));
            }
            if let Some(conn) = running_on {
                freed.push(conn);
            }
        }
        for conn in freed {
            self.fill(conn, now, &mut out);
        }
        out
    }

    /// The earliest deadline of any call, for the IO layer's timer.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(d, _)| *d)
    }

    /// Connection `conn` is gone: its calls in flight as an instance fail with
    /// `InstanceFailed`; its queued calls as a caller are dropped (nobody to answer).
    pub(crate) fn disconnect(&mut self, conn: ConnId) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(inst) = self.instances.remove(&conn) {
            if let Some(f) = self.functions.get_mut(&inst.function) {
                f.instances.retain(|c| *c != conn);
            }
            let mut ids: Vec<u64> = inst.running.into_iter().collect();
            ids.sort_unstable();
            for id in ids {
                if let Some(call) = self.remove_call(id) {
                    out.push(Action::Reply {
                        caller: call.caller,
                        id: call.caller_id,
                        result: Err(err(
                            ErrorCode::InstanceFailed,
                            format!(
                                "instance {} of {} went away mid-call",
                                inst.instance_id, inst.function
                            ),
                        )),
                    });
                }
            }
            self.gc_function(&inst.function);
        }
        let queued: Vec<u64> = self
            .calls
            .iter()
            .filter(|(_, c)| c.caller == conn && c.running_on.is_none())
            .map(|(id, _)| *id)
            .collect();
        for id in queued {
            self.remove_call(id);
        }
        out
    }

    /// Fails every call with `Unavailable`; later calls and registrations are refused.
    pub(crate) fn shutdown(&mut self) -> Vec<Action> {
        self.closed = true;
        let mut ids: Vec<u64> = self.calls.keys().copied().collect();
        ids.sort_unstable();
        let mut out = Vec::new();
        for id in ids {
            if let Some(call) = self.remove_call(id) {
                out.push(Action::Reply {
                    caller: call.caller,
                    id: call.caller_id,
                    result: Err(err(ErrorCode::Unavailable, "proxy is shutting down")),
                });
            }
        }
        out
    }

    /// Calls waiting in `function`'s queue.
    #[cfg(test)]
    pub(crate) fn queued(&self, function: &str) -> usize {
        self.functions.get(function).map_or(0, |f| f.queue.len())
    }

    /// Calls running on instance connection `conn`.
    #[cfg(test)]
    pub(crate) fn running(&self, conn: ConnId) -> usize {
        self.instances.get(&conn).map_or(0, |i| i.running.len())
    }

    /// Removes a call from every index (queue, instance, deadlines).
    fn remove_call(&mut self, id: u64) -> Option<Call> {
        let call = self.calls.remove(&id)?;
        self.deadlines.remove(&(call.deadline, id));
        match call.running_on {
            Some(conn) => {
                if let Some(i) = self.instances.get_mut(&conn) {
                    i.running.remove(&id);
                }
            }
            None => {
                if let Some(f) = self.functions.get_mut(&call.function) {
                    f.queue.retain(|q| *q != id);
                }
            }
        }
        self.gc_function(&call.function);
        Some(call)
    }

    fn gc_function(&mut self, function: &str) {
        if self
            .functions
            .get(function)
            .is_some_and(|f| f.instances.is_empty() && f.queue.is_empty())
        {
            self.functions.remove(function);
        }
    }

    fn dispatch(&mut self, id: u64, conn: ConnId, now: Instant, out: &mut Vec<Action>) {
        let (Some(call), Some(inst)) = (self.calls.get_mut(&id), self.instances.get_mut(&conn))
        else {
            return;
        };
        call.running_on = Some(conn);
        inst.running.insert(id);
        let left = call.deadline.saturating_duration_since(now);
        out.push(Action::Invoke {
            instance: conn,
            id,
            function: call.function.clone(),
            args: call.args.clone(),
            timeout_ms: u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
            trace_id: call.trace_id,
        });
    }

    /// Gives instance `conn` queued calls (oldest first) it may take until its slots are full.
    fn fill(&mut self, conn: ConnId, now: Instant, out: &mut Vec<Action>) {
        loop {
            let Some(inst) = self.instances.get(&conn) else {
                return;
            };
            if inst.running.len() >= inst.concurrency {
                return;
            }
            let Some(f) = self.functions.get(&inst.function) else {
                return;
            };
            let pos = f.queue.iter().position(|id| {
                self.calls.get(id).is_some_and(|c| {
                    c.instance
                        .as_ref()
                        .is_none_or(|want| *want == inst.instance_id)
                })
            });
            let Some(pos) = pos else {
                return;
            };
            let function = inst.function.clone();
            let Some(id) = self
                .functions
                .get_mut(&function)
                .and_then(|f| f.queue.remove(pos))
            else {
                return;
            };
            self.dispatch(id, conn, now, out);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn req(id: u64, function: &str, instance: Option<&str>, timeout_ms: u64) -> CallRequest {
        CallRequest {
            id,
            function: function.into(),
            instance: instance.map(Into::into),
            args: Payload::Inline(vec![id as u8]),
            timeout: Duration::from_millis(timeout_ms),
            trace_id: 0,
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
        r.register(10, "f", "a", 1, now).unwrap();
        r.register(11, "f", "b", 1, now).unwrap();
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
        r.register(10, "f", "a", 1, now).unwrap();
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
        r.register(10, "f", "a", 1, now).unwrap();
        r.call(1, req(1, "f", None, 500), now);
        r.call(1, req(2, "f", None, 500), now);
        let out = r.disconnect(10);
        assert_eq!(out.len(), 1);
        assert_eq!(code(&out[0]), Some(ErrorCode::InstanceFailed));
        assert_eq!(r.queued("f"), 1);
        // A new call finds no instance, but the queued one waits for the next instance.
        let nf = r.call(1, req(3, "f", None, 500), now);
        assert_eq!(code(&nf[0]), Some(ErrorCode::NotFound));
        let out = r.register(11, "f", "b", 1, now).unwrap();
        assert!(matches!(out[0], Action::Invoke { instance: 11, .. }));
    }

    #[test]
    fn named_instance_and_duplicates() {
        let now = Instant::now();
        let mut r = Router::new(4);
        r.register(10, "f", "a", 2, now).unwrap();
        r.register(11, "f", "b", 2, now).unwrap();
        assert_eq!(
            r.register(12, "f", "b", 2, now).unwrap_err().code,
            ErrorCode::AlreadyExists
        );
        let out = r.call(1, req(1, "f", Some("b"), 500), now);
        assert!(matches!(out[0], Action::Invoke { instance: 11, .. }));
        let out = r.call(1, req(2, "f", Some("zz"), 500), now);
        assert_eq!(code(&out[0]), Some(ErrorCode::NotFound));
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
        },
        Tick {
            ms: u8,
        },
        Disconnect {
            conn: u8,
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
            any::<u8>().prop_map(|pick| Op::Answer { pick }),
            (0u8..60).prop_map(|ms| Op::Tick { ms }),
            (0u8..6).prop_map(|conn| Op::Disconnect { conn }),
        ]
    }

    /// Records `out` in the model; a new invoke must fit in the instance's free slots (slots
    /// freed by timeouts are those the router no longer runs).
    fn apply(
        r: &Router,
        out: Vec<Action>,
        in_flight: &mut HashMap<ConnId, HashSet<u64>>,
        conc: &HashMap<ConnId, usize>,
        replies: &mut HashMap<(ConnId, u64), usize>,
    ) {
        for a in out {
            match a {
                Action::Reply { caller, id, .. } => {
                    *replies.entry((caller, id)).or_default() += 1;
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
            for op in ops {
                match op {
                    Op::Register { conn, function, conc: c } => {
                        let conn = 100 + ConnId::from(conn);
                        if let Ok(out) = r.register(conn, &format!("f{function}"), &format!("i{conn}"), u32::from(c), now) {
                            conc.insert(conn, usize::from(c));
                            in_flight.insert(conn, HashSet::new());
                            apply(&r, out, &mut in_flight, &conc, &mut replies);
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
                        }, now);
                        apply(&r, out, &mut in_flight, &conc, &mut replies);
                    }
                    Op::Answer { pick } => {
                        let all: Vec<(ConnId, u64)> = {
                            let mut v: Vec<_> = in_flight.iter().flat_map(|(c, s)| s.iter().map(move |i| (*c, *i))).collect();
                            v.sort_unstable();
                            v
                        };
                        if all.is_empty() { continue; }
                        let (conn, id) = all[usize::from(pick) % all.len()];
                        in_flight.get_mut(&conn).unwrap().remove(&id);
                        let out = r.result(conn, id, Ok(Payload::Inline(vec![])), now);
                        apply(&r, out, &mut in_flight, &conc, &mut replies);
                    }
                    Op::Tick { ms } => {
                        now += Duration::from_millis(u64::from(ms));
                        let out = r.tick(now);
                        apply(&r, out, &mut in_flight, &conc, &mut replies);
                    }
                    Op::Disconnect { conn } => {
                        let conn = if conn < 4 { 100 + ConnId::from(conn) } else { ConnId::from(conn - 4) };
                        let out = r.disconnect(conn);
                        if conn < 100 { dead_callers.insert(conn); }
                        in_flight.remove(&conn);
                        conc.remove(&conn);
                        apply(&r, out, &mut in_flight, &conc, &mut replies);
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
                // Our model of in-flight invokes follows the router's (timeouts free slots).
                for (conn, set) in in_flight.iter_mut() {
                    set.retain(|id| r.calls.get(id).is_some_and(|c| c.running_on == Some(*conn)));
                }
            }
            let out = r.shutdown();
            apply(&r, out, &mut in_flight, &conc, &mut replies);
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
}
