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
//! with a free slot, local instances first: a *remote route* (another node's proxy, standing
//! for that node's instances of the function, with their summed concurrency) is used only
//! when no local instance has a free slot. If there is none it waits in its function's FIFO
//! queue until a slot frees, an instance registers, or its deadline passes. Calls that came
//! from another proxy are `local_only`: they never go to a remote route, so a call crosses
//! the network at most once. Calls in flight on an instance that goes away fail with
//! `InstanceFailed`; queued calls stay queued. A call that a remote route gives back
//! unstarted ([`Router::bounce`]: its proxy had no free instance, or could not be reached)
//! goes to another instance with a free slot that it has not tried, or fails with the
//! route's error; these are the only retries, as no instance has seen the call.
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
        /// The instance the caller named, if any (a remote route passes it on).
        target: Option<String>,
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
    /// Served by local instances only (the call came from another proxy).
    pub(crate) local_only: bool,
}

#[derive(Debug)]
struct Instance {
    function: String,
    instance_id: String,
    concurrency: usize,
    /// Invoke ids running here.
    running: HashSet<u64>,
    /// Set for a remote route (another node's proxy).
    remote: Option<RemoteRoute>,
    /// On its way out (a draining instance, a route that vanished): takes no new calls,
    /// finishes those it has.
    retired: bool,
}

#[derive(Debug)]
struct RemoteRoute {
    /// Instance ids of the function on that node (a call naming one of them goes there).
    instance_ids: BTreeSet<String>,
}

impl Instance {
    /// Whether a call naming instance `want` (or any, with `None`) may run here.
    fn serves(&self, want: Option<&str>) -> bool {
        match want {
            None => true,
            Some(w) => {
                self.instance_id == w
                    || self
                        .remote
                        .as_ref()
                        .is_some_and(|r| r.instance_ids.contains(w))
            }
        }
    }

    fn may_take(&self, call: &Call, conn: ConnId) -> bool {
        self.serves(call.instance.as_deref())
            && !(call.local_only && self.remote.is_some())
            && !call.tried.contains(&conn)
    }
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
    local_only: bool,
    /// Remote routes that gave the call back unstarted.
    tried: Vec<ConnId>,
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
                remote: None,
                retired: false,
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

    /// Adds or updates the remote route `conn`: node `node`'s proxy, serving `function` with
    /// `instance_ids` and `concurrency` calls at once in all. Queued calls it may take are
    /// dispatched to it. A retired route is taken back into service.
    pub(crate) fn set_remote(
        &mut self,
        conn: ConnId,
        function: &str,
        node: &str,
        instance_ids: BTreeSet<String>,
        concurrency: u32,
        now: Instant,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        if self.closed {
            return out;
        }
        match self.instances.get_mut(&conn) {
            Some(inst) => {
                inst.concurrency = concurrency.max(1) as usize;
                inst.remote = Some(RemoteRoute { instance_ids });
                if std::mem::take(&mut inst.retired) {
                    self.functions
                        .entry(function.to_owned())
                        .or_default()
                        .instances
                        .push(conn);
                }
            }
            None => {
                self.instances.insert(
                    conn,
                    Instance {
                        function: function.to_owned(),
                        instance_id: format!("@{node}"),
                        concurrency: concurrency.max(1) as usize,
                        running: HashSet::new(),
                        remote: Some(RemoteRoute { instance_ids }),
                        retired: false,
                    },
                );
                self.functions
                    .entry(function.to_owned())
                    .or_default()
                    .instances
                    .push(conn);
            }
        }
        self.fill(conn, now, &mut out);
        out
    }

    /// Instance or remote route `conn` takes no new calls (an instance that drains, a route
    /// whose instances went away); its calls in flight still complete. A route is forgotten
    /// when its last call ends; an instance when its connection closes. Calls queued for
    /// the function wait for another instance.
    pub(crate) fn retire(&mut self, conn: ConnId) {
        let Some(inst) = self.instances.get_mut(&conn) else {
            return;
        };
        inst.retired = true;
        let function = inst.function.clone();
        if let Some(f) = self.functions.get_mut(&function) {
            f.instances.retain(|c| *c != conn);
        }
        self.reap(conn);
        self.gc_function(&function);
    }

    /// Forgets a retired route with nothing in flight.
    fn reap(&mut self, conn: ConnId) {
        let idle_retired = self
            .instances
            .get(&conn)
            .is_some_and(|i| i.running.is_empty() && i.retired && i.remote.is_some());
        if idle_retired {
            self.instances.remove(&conn);
        }
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
        let usable = |c: &ConnId| {
            self.instances.get(c).is_some_and(|i| {
                i.serves(req.instance.as_deref()) && !(req.local_only && i.remote.is_some())
            })
        };
        let candidates: Vec<ConnId> = f.instances.iter().copied().filter(usable).collect();
        if candidates.is_empty() {
            return reply(err(
                ErrorCode::NotFound,
                match &req.instance {
                    Some(want) => format!("no instance {want} of function {}", req.function),
                    None => format!("no local instance of function {}", req.function),
                },
            ));
        }
        let target = self.pick(&candidates, &[]);
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
                local_only: req.local_only,
                tried: Vec::new(),
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
        if !self.runs_on(id, instance) {
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
        self.reap(instance);
        out
    }

    /// Remote route `route` gives invoke `id` back unstarted (its proxy had no instance free,
    /// or could not be reached): the call goes to another instance with a free slot that it
    /// has not tried, or fails with `error`.
    pub(crate) fn bounce(
        &mut self,
        route: ConnId,
        id: u64,
        error: WireError,
        now: Instant,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        if !self.runs_on(id, route) {
            return out;
        }
        if let Some(i) = self.instances.get_mut(&route) {
            i.running.remove(&id);
        }
        let mut next = None;
        if let Some(call) = self.calls.get_mut(&id) {
            call.running_on = None;
            call.tried.push(route);
            let (want, local_only, tried) =
                (call.instance.clone(), call.local_only, call.tried.clone());
            if let Some(f) = self.functions.get(&call.function) {
                let candidates: Vec<ConnId> = f
                    .instances
                    .iter()
                    .copied()
                    .filter(|c| {
                        self.instances.get(c).is_some_and(|i| {
                            i.serves(want.as_deref()) && !(local_only && i.remote.is_some())
                        })
                    })
                    .collect();
                next = self.pick(&candidates, &tried);
            }
        }
        match next {
            Some(conn) => self.dispatch(id, conn, now, &mut out),
            None => {
                if let Some(call) = self.remove_call(id) {
                    out.push(Action::Reply {
                        caller: call.caller,
                        id: call.caller_id,
                        result: Err(error),
                    });
                }
            }
        }
        self.fill(route, now, &mut out);
        self.reap(route);
        out
    }

    /// Whether invoke `id` is running on connection `conn`.
    fn runs_on(&self, id: u64, conn: ConnId) -> bool {
        self.calls
            .get(&id)
            .is_some_and(|c| c.running_on == Some(conn))
    }

    /// The instance among `candidates` (not in `skip`) with a free slot: local before
    /// remote, then fewest calls running, then first registered.
    fn pick(&self, candidates: &[ConnId], skip: &[ConnId]) -> Option<ConnId> {
        candidates
            .iter()
            .filter(|c| !skip.contains(c))
            .filter_map(|c| self.instances.get(c).map(|i| (*c, i)))
            .filter(|(_, i)| i.running.len() < i.concurrency)
            .min_by_key(|(_, i)| (i.remote.is_some(), i.running.len()))
            .map(|(c, _)| c)
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
            self.reap(conn);
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
            target: call.instance.clone(),
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
            if inst.retired {
                return;
            }
            let pos = f
                .queue
                .iter()
                .position(|id| self.calls.get(id).is_some_and(|c| inst.may_take(c, conn)));
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
            local_only: false,
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

    fn ids(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn local_first_then_remote_and_peers_stay_local() {
        let now = Instant::now();
        let mut r = Router::new(4);
        r.register(10, "f", "a", 1, now).unwrap();
        r.set_remote(20, "f", "n2", ids(&["b"]), 2, now);
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
        r.set_remote(20, "f", "n2", ids(&["b"]), 2, now);
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
        r.set_remote(20, "f", "n2", ids(&["b"]), 1, now);
        r.set_remote(21, "f", "n3", ids(&["c"]), 1, now);
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
        r.set_remote(20, "f", "n2", ids(&["b"]), 2, now);
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
        r.register(10, "f", "a", 2, now).unwrap();
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
        r.register(11, "f", "b", 1, now).unwrap();
        let out = r.call(1, req(3, "f", None, 500), now);
        assert!(matches!(out[0], Action::Invoke { instance: 11, .. }));
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
            any::<u8>().prop_map(|pick| Op::Answer { pick }),
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
                            local_only: false,
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
                    Op::Remote { conn, function, conc: c } => {
                        // Route conns are 200+n; a route keeps its function.
                        let conn = 200 + ConnId::from(conn);
                        let function = r.instances.get(&conn).map_or(format!("f{function}"), |i| i.function.clone());
                        let out = r.set_remote(conn, &function, "n", BTreeSet::new(), u32::from(c), now);
                        // Lowering a route's concurrency below its calls in flight is allowed
                        // (its instances went away); it only stops new dispatches.
                        conc.insert(conn, usize::from(c).max(r.running(conn)));
                        in_flight.entry(conn).or_default();
                        apply(&r, out, &mut in_flight, &conc, &mut replies);
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
