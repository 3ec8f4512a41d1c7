//! Routing decisions, with no IO and no clock: events and `now` go in, [`Action`]s come out.
//!
//! Invariants (checked by the property tests in `router/tests.rs`):
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
//!
//! Tenants: every function belongs to one tenant, taken from the credential of its first
//! instance (or the function record of a remote route); an instance or route of another
//! tenant is refused for it. [`Router::function_tenant`] is what callers are checked against.
//! A call may carry a [`Charge`] on its caller's tenant's calls in flight, held exactly as
//! long as the call is (dropped with it, whichever way it ends).
//!
//! Result objects: the router remembers, per caller, which instance answered each call with
//! an object ([`MAX_HELD`] at most per caller), so that the caller's
//! [`Router::release`] reaches that instance ([`Action::Release`]); a caller that goes away
//! releases all of its own, and a result nobody will read (its call ended first) is
//! released at once.
use crate::access::Charge;
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
    /// Send `ProxyFrame::Release` to an instance (or a route): the caller of invoke `id` is
    /// done with its object result.
    Release { instance: ConnId, id: u64 },
}

/// Object results one caller holds unreleased at most; past it the oldest is released.
pub(crate) const MAX_HELD: usize = 1024;

/// An object result a caller has not released yet.
#[derive(Debug, Clone, Copy)]
struct Held {
    caller_id: u64,
    instance: ConnId,
    invoke: u64,
}

/// A call as the caller sent it.
#[derive(Debug)]
pub(crate) struct CallRequest {
    pub(crate) id: u64,
    pub(crate) function: String,
    pub(crate) instance: Option<String>,
    pub(crate) args: Payload,
    pub(crate) timeout: Duration,
    pub(crate) trace_id: u64,
    /// Served by local instances only (the call came from another proxy).
    pub(crate) local_only: bool,
    /// What the call counts against, released when the call ends.
    pub(crate) charge: Option<Charge>,
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
    /// The tenant it belongs to.
    tenant: String,
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
    /// Dropped with the call.
    _charge: Option<Charge>,
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
    /// Unreleased object results, by caller, oldest first.
    held: HashMap<ConnId, VecDeque<Held>>,
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
            held: HashMap::new(),
        }
    }

    /// The tenant `function` belongs to, while it has instances, routes or queued calls.
    pub(crate) fn function_tenant(&self, function: &str) -> Option<&str> {
        self.functions.get(function).map(|f| f.tenant.as_str())
    }

    /// The function entry of `function` for `tenant`: created if absent; `None` if it
    /// belongs to another tenant.
    fn function_of(&mut self, function: &str, tenant: &str) -> Option<&mut Function> {
        let f = self
            .functions
            .entry(function.to_owned())
            .or_insert_with(|| Function {
                tenant: tenant.to_owned(),
                ..Function::default()
            });
        (f.tenant == tenant).then_some(f)
    }

    /// Registers connection `conn` as an instance of `function` of `tenant`; queued calls it
    /// can take are dispatched to it. Refused for a duplicate instance id, zero concurrency,
    /// a function of another tenant, or after shutdown.
    pub(crate) fn register(
        &mut self,
        conn: ConnId,
        function: &str,
        instance_id: &str,
        concurrency: u32,
        tenant: &str,
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
        let Some(f) = self.function_of(function, tenant) else {
            return Err(err(
                ErrorCode::PermissionDenied,
                format!("function {function} belongs to another tenant"),
            ));
        };
        f.instances.push(conn);
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
        let mut out = Vec::new();
        self.fill(conn, now, &mut out);
        Ok(out)
    }

    /// Adds or updates the remote route `conn`: node `node`'s proxy, serving `function` (of
    /// `tenant`) with `instance_ids` and `concurrency` calls at once in all. Queued calls it
    /// may take are dispatched to it. A retired route is taken back into service. A route
    /// for a function that here belongs to another tenant is left out (retired, if it was
    /// in service).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn set_remote(
        &mut self,
        conn: ConnId,
        function: &str,
        node: &str,
        instance_ids: BTreeSet<String>,
        concurrency: u32,
        tenant: &str,
        now: Instant,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        if self.closed {
            return out;
        }
        if self.function_of(function, tenant).is_none() {
            self.retire(conn);
            return out;
        }
        match self.instances.get_mut(&conn) {
            Some(inst) => {
                inst.concurrency = concurrency.max(1) as usize;
                inst.remote = Some(RemoteRoute { instance_ids });
                if std::mem::take(&mut inst.retired) {
                    if let Some(f) = self.functions.get_mut(function) {
                        f.instances.push(conn);
                    }
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
                if let Some(f) = self.functions.get_mut(function) {
                    f.instances.push(conn);
                }
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
                _charge: req.charge,
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
        let object = matches!(result, Ok(Payload::Object(_)));
        if !self.runs_on(id, instance) {
            if object {
                // Its call ended first: nobody will read it.
                out.push(Action::Release { instance, id });
            }
            return out;
        }
        if let Some(call) = self.remove_call(id) {
            if object {
                self.hold(call.caller, call.caller_id, instance, id, &mut out);
            }
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

    /// Remembers that `caller` holds the object result of its call `caller_id`, which
    /// `instance` stored for invoke `invoke`; past [`MAX_HELD`], its oldest is released.
    fn hold(
        &mut self,
        caller: ConnId,
        caller_id: u64,
        instance: ConnId,
        invoke: u64,
        out: &mut Vec<Action>,
    ) {
        let held = self.held.entry(caller).or_default();
        if held.len() >= MAX_HELD {
            if let Some(old) = held.pop_front() {
                out.push(Action::Release {
                    instance: old.instance,
                    id: old.invoke,
                });
            }
        }
        held.push_back(Held {
            caller_id,
            instance,
            invoke,
        });
    }

    /// `caller` is done with the object result of its call `caller_id`: the instance that
    /// stored it is told. Unknown ids are ignored.
    pub(crate) fn release(&mut self, caller: ConnId, caller_id: u64) -> Vec<Action> {
        let Some(held) = self.held.get_mut(&caller) else {
            return Vec::new();
        };
        let Some(pos) = held.iter().position(|h| h.caller_id == caller_id) else {
            return Vec::new();
        };
        let h = held.remove(pos);
        if held.is_empty() {
            self.held.remove(&caller);
        }
        h.map(|h| Action::Release {
            instance: h.instance,
            id: h.invoke,
        })
        .into_iter()
        .collect()
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
        // As a caller: what it held is released; as an instance: nobody is left to tell.
        if let Some(held) = self.held.remove(&conn) {
            out.extend(held.into_iter().map(|h| Action::Release {
                instance: h.instance,
                id: h.invoke,
            }));
        }
        self.held.retain(|_, held| {
            held.retain(|h| h.instance != conn);
            !held.is_empty()
        });
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
mod tests;
