//! State shared by both engines: the router behind a short-held lock, each connection's
//! outbound queue, and the per-connection protocol (hello, calls, results).
//!
//! Lock order: `router` before `conns`. Actions are pushed onto connections' bounded queues
//! with `try_send` while the router lock is held, so frames reach each connection in the
//! order the router decided them (a `Welcome` always precedes the first `Invoke`). A
//! connection whose queue is full is closed rather than waited for. A remote route's
//! "connection" is the forwarder of the node it leads to ([`Outbox::Route`]); an invoke its
//! queue cannot take is given back to the router unstarted.
//!
//! Who a connection is and what it may do is decided at its hello ([`ConnState`], from
//! `crate::access`) and checked on every frame that names a function.
use crate::access::{Access, PeerCred, TenantCalls};
use crate::router::{Action, CallRequest, ConnId, Router};
use crate::ProxyConfig;
use bytes::BytesMut;
use shoal_meta::records::Principal;
use shoal_protocol::{
    CallerFrame, ErrorCode, FrameDecoder, FrameError, LaneInfo, LaneKey, Payload, ProxyFrame, Role,
    WireError, PROTOCOL_VERSION,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// Frames queued towards one connection at most; a peer that falls this far behind is closed.
pub(crate) const OUTBOUND_FRAMES: usize = 4096;

/// Why a connection is being closed by the proxy.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed frame: {0}")]
    Frame(#[from] FrameError),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("refused: {0}")]
    Refused(WireError),
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// A Unix socket connection, before its `Hello`.
    Hello,
    /// A network connection from another proxy, before its `Hello` (only `Peer` is taken).
    PeerHello,
    Caller,
    /// Another proxy: a caller whose calls only local instances serve.
    Peer,
    Instance,
}

/// One connection's state, owned by its reader: where it is in its life and who it is.
#[derive(Debug)]
pub(crate) struct ConnState {
    pub(crate) phase: Phase,
    /// The local peer's credentials (`None` on the network listener, whose peers are other
    /// proxies authenticated by mutual TLS).
    peer: Option<PeerCred>,
    /// A caller's principal, once its hello is accepted.
    principal: Option<Principal>,
    /// The calls-in-flight counter of a caller's tenant.
    calls: Option<Arc<TenantCalls>>,
    /// A caller's token and when it was last checked: a revoked token stops working within
    /// [`RECHECK`] on a connection opened with it.
    token: Option<(String, Instant)>,
}

/// How often a caller's token is checked again while its connection lasts.
const RECHECK: Duration = Duration::from_secs(1);

impl ConnState {
    /// A Unix socket connection from `peer`, before its hello.
    pub(crate) fn local(peer: PeerCred) -> Self {
        Self {
            phase: Phase::Hello,
            peer: Some(peer),
            principal: None,
            calls: None,
            token: None,
        }
    }

    /// A connection from another proxy, before its hello.
    pub(crate) fn network() -> Self {
        Self {
            phase: Phase::PeerHello,
            peer: None,
            principal: None,
            calls: None,
            token: None,
        }
    }
}

/// Where the frames for one router connection go.
#[derive(Debug, Clone)]
pub(crate) enum Outbox {
    /// A socket connection's outbound queue.
    Socket(mpsc::Sender<ProxyFrame>),
    /// A remote route: the forwarder of the node it leads to.
    Route(mpsc::Sender<ToPeer>),
}

/// What a forwarder carries to another node's proxy.
#[derive(Debug)]
pub(crate) enum ToPeer {
    /// A call.
    Call(Forward),
    /// The caller of the forwarded call `id` holds its object result.
    Release(u64),
}

/// An invoke a forwarder carries to another node's proxy.
#[derive(Debug)]
pub(crate) struct Forward {
    /// The remote route it was dispatched to.
    pub(crate) route: ConnId,
    /// Invoke id (unique in this proxy); the call id on the peer connection.
    pub(crate) id: u64,
    pub(crate) function: String,
    pub(crate) target: Option<String>,
    pub(crate) args: Payload,
    pub(crate) timeout_ms: u64,
    pub(crate) trace_id: u64,
}

/// One accepted connection's handle on the shared state.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) id: ConnId,
    pub(crate) rx: mpsc::Receiver<ProxyFrame>,
    /// False when the connection limit was hit; a `Refused` is queued and the proxy must not
    /// read from it.
    pub(crate) admitted: bool,
}

/// A registered local instance, for [`CallerFrame::Lanes`] questions.
#[derive(Debug)]
struct LocalInstance {
    function: String,
    instance_id: String,
    /// Where it hands out call lanes, and the key that opens them; `None` before it says,
    /// and once it drains.
    lane: Option<(String, LaneKey)>,
}

/// Longest lane socket path taken (Unix socket paths are far shorter).
const MAX_LANE_PATH: usize = 4096;

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) cfg: ProxyConfig,
    pub(crate) access: Arc<Access>,
    router: Mutex<Router>,
    /// Local instances by connection (taken alone, never with the other locks).
    instances: Mutex<HashMap<ConnId, LocalInstance>>,
    conns: Mutex<HashMap<ConnId, Outbox>>,
    next_conn: AtomicU64,
    active: AtomicUsize,
    timer: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

type Conns = HashMap<ConnId, Outbox>;

fn push(conns: &mut Conns, conn: ConnId, frame: ProxyFrame) {
    let Some(Outbox::Socket(tx)) = conns.get(&conn) else {
        return; // gone (replies to it are dropped), or a route (never a caller)
    };
    if let Err(e) = tx.try_send(frame) {
        if matches!(e, mpsc::error::TrySendError::Full(_)) {
            tracing::warn!(conn, "outbound queue full; closing the connection");
        }
        conns.remove(&conn);
    }
}

/// Sends the router's actions, and gives back to it (as unstarted) every invoke a route's
/// forwarder could not take, until nothing is left to send.
fn apply(router: &mut Router, conns: &mut Conns, mut actions: Vec<Action>) {
    while !actions.is_empty() {
        let mut bounced = Vec::new();
        for a in actions {
            match a {
                Action::Reply { caller, id, result } => {
                    let outcome = match &result {
                        Ok(_) => "ok",
                        Err(e) => e.code.name(),
                    };
                    metrics::counter!("shoal_proxy_calls_total", "outcome" => outcome).increment(1);
                    push(conns, caller, ProxyFrame::Reply { id, result });
                }
                Action::Invoke {
                    instance,
                    id,
                    function,
                    args,
                    timeout_ms,
                    trace_id,
                    target,
                } => match conns.get(&instance) {
                    Some(Outbox::Route(tx)) => {
                        let fwd = Forward {
                            route: instance,
                            id,
                            function,
                            target,
                            args,
                            timeout_ms,
                            trace_id,
                        };
                        if tx.try_send(ToPeer::Call(fwd)).is_err() {
                            bounced.push((instance, id));
                        } else {
                            metrics::counter!("shoal_proxy_forwarded_total").increment(1);
                        }
                    }
                    _ => push(
                        conns,
                        instance,
                        ProxyFrame::Invoke {
                            id,
                            function,
                            args,
                            timeout_ms,
                            trace_id,
                        },
                    ),
                },
                Action::Release { instance, id } => match conns.get(&instance) {
                    // A full forwarder drops it: the peer releases when the connection ends.
                    Some(Outbox::Route(tx)) => drop(tx.try_send(ToPeer::Release(id))),
                    _ => push(conns, instance, ProxyFrame::Release { id }),
                },
            }
        }
        let now = Instant::now();
        actions = Vec::new();
        for (route, id) in bounced {
            let e = WireError::new(ErrorCode::Overloaded, "the forwarder's queue is full");
            actions.extend(router.bounce(route, id, e, now));
        }
    }
}

impl Shared {
    pub(crate) fn new(cfg: ProxyConfig) -> Self {
        let max_queue = cfg.max_queue;
        let access = Arc::new(Access::new(
            &cfg.allowed_uids,
            &cfg.tenant_uids,
            cfg.meta.is_some(),
        ));
        Self {
            cfg,
            access,
            router: Mutex::new(Router::new(max_queue)),
            instances: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            active: AtomicUsize::new(0),
            timer: Notify::new(),
        }
    }

    pub(crate) fn decoder(&self) -> FrameDecoder {
        FrameDecoder::new(self.cfg.max_frame)
    }

    /// Registers a new connection (its outbound queue); refuses it over the limit.
    pub(crate) fn open_conn(&self) -> Conn {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(OUTBOUND_FRAMES);
        let n = self.active.fetch_add(1, Ordering::AcqRel) + 1;
        metrics::gauge!("shoal_proxy_connections").set(n as f64);
        if n > self.cfg.max_connections {
            self.active.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(
                conn = id,
                limit = self.cfg.max_connections,
                "too many connections"
            );
            let _ = tx.try_send(ProxyFrame::Refused(WireError::new(
                ErrorCode::Overloaded,
                "too many connections to the proxy",
            )));
            return Conn {
                id,
                rx,
                admitted: false,
            };
        }
        lock(&self.conns).insert(id, Outbox::Socket(tx));
        Conn {
            id,
            rx,
            admitted: true,
        }
    }

    /// The connection ended (or is being closed): fail its calls, drop its queue.
    pub(crate) fn close_conn(&self, id: ConnId, admitted: bool) {
        if !admitted {
            return;
        }
        let gone = lock(&self.instances).remove(&id);
        if let Some((path, _)) = gone.and_then(|i| i.lane) {
            self.remove_lane_socket(&path);
        }
        let mut router = lock(&self.router);
        let actions = router.disconnect(id);
        let mut conns = lock(&self.conns);
        conns.remove(&id);
        apply(&mut router, &mut conns, actions);
        let n = self.active.fetch_sub(1, Ordering::AcqRel) - 1;
        metrics::gauge!("shoal_proxy_connections").set(n as f64);
    }

    /// Whether `path` is where the SDK binds lane sockets: `l-*.sock` beside this proxy's
    /// socket, never a path elsewhere.
    fn is_lane_path(&self, path: &str) -> bool {
        let path = std::path::Path::new(path);
        let named = path.file_name().is_some_and(|n| {
            let n = n.to_string_lossy();
            n.starts_with("l-") && n.ends_with(".sock")
        });
        let (Some(dir), Some(ours)) = (path.parent(), self.cfg.socket_path.parent()) else {
            return false;
        };
        // The same directory, however each side spelled it.
        let same = dir == ours
            || matches!(
                (std::fs::canonicalize(dir), std::fs::canonicalize(ours)),
                (Ok(a), Ok(b)) if a == b
            );
        named && same
    }

    /// Removes the lane socket of an instance that left without draining (killed).
    fn remove_lane_socket(&self, path: &str) {
        if self.is_lane_path(path) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Decodes and handles every whole frame in `buf`.
    pub(crate) fn on_bytes(
        &self,
        conn: ConnId,
        state: &mut ConnState,
        decoder: &FrameDecoder,
        buf: &mut BytesMut,
    ) -> Result<(), ConnError> {
        while let Some(frame) = decoder.decode::<CallerFrame>(buf)? {
            self.on_frame(conn, state, frame)?;
        }
        Ok(())
    }

    /// Checks a caller's token again once [`RECHECK`] has passed since the last time; a
    /// revoked or expired one closes the connection.
    fn recheck(&self, conn: ConnId, state: &mut ConnState) -> Result<(), ConnError> {
        let Some((token, checked)) = &mut state.token else {
            return Ok(());
        };
        if checked.elapsed() < RECHECK {
            return Ok(());
        }
        match self.access.authenticate(token) {
            Ok(p) if Some(&p) == state.principal.as_ref() => {
                *checked = Instant::now();
                Ok(())
            }
            _ => {
                tracing::info!(conn, "the caller's token no longer holds; closing");
                Err(self.refuse(
                    conn,
                    WireError::new(
                        ErrorCode::Unauthenticated,
                        "the token was revoked or has expired",
                    ),
                ))
            }
        }
    }

    /// Before a hello is handled: waits until tokens are loaded, and, when the hello presents
    /// a token the book does not know yet, a moment for it to arrive. Decides nothing: the
    /// hello is handled by [`Shared::on_bytes`] after this.
    pub(crate) async fn before_hello(&self, decoder: &FrameDecoder, buf: &BytesMut) {
        self.access.ready().await;
        let mut peek = buf.clone();
        if let Ok(Some(CallerFrame::Hello {
            token: Some(token), ..
        })) = decoder.decode::<CallerFrame>(&mut peek)
        {
            self.access.wait_for_token(&token).await;
        }
    }

    fn reply(&self, conn: ConnId, id: u64, e: WireError) {
        push(
            &mut lock(&self.conns),
            conn,
            ProxyFrame::Reply { id, result: Err(e) },
        );
    }

    /// Handles a hello: who the connection is, checked before anything else it says.
    fn on_hello(
        &self,
        conn: ConnId,
        state: &mut ConnState,
        role: Role,
        token: Option<String>,
    ) -> Result<(), ConnError> {
        let welcome = ProxyFrame::Welcome {
            node_id: self.cfg.node_id.clone(),
            inline_limit: self.cfg.inline_limit,
        };
        let peer = match (state.phase, state.peer) {
            (Phase::PeerHello, _) => {
                let Role::Peer { node_id } = role else {
                    return Err(self.refuse(
                        conn,
                        WireError::new(
                            ErrorCode::PermissionDenied,
                            "only proxies may connect to the peer listener",
                        ),
                    ));
                };
                push(&mut lock(&self.conns), conn, welcome);
                tracing::debug!(conn, peer = %node_id, "peer proxy connected");
                state.phase = Phase::Peer;
                return Ok(());
            }
            (_, Some(peer)) => peer,
            (_, None) => {
                return Err(self.refuse(
                    conn,
                    WireError::new(ErrorCode::PermissionDenied, "unknown peer"),
                ))
            }
        };
        if let Err(e) = self.access.check_peer(peer) {
            tracing::warn!(conn, uid = peer.uid, "uid not allowed; closing");
            metrics::counter!("shoal_proxy_refused_total", "why" => "uid").increment(1);
            return Err(self.refuse(conn, e));
        }
        match role {
            Role::Peer { .. } => Err(self.refuse(
                conn,
                WireError::new(
                    ErrorCode::PermissionDenied,
                    "proxies connect to the peer listener",
                ),
            )),
            Role::Caller => {
                let principal = match self.access.caller(peer, token.as_deref()) {
                    Ok(p) => p,
                    Err(e) => {
                        metrics::counter!("shoal_proxy_refused_total", "why" => "credential")
                            .increment(1);
                        return Err(self.refuse(conn, e));
                    }
                };
                state.calls = Some(self.access.tenant(&principal.tenant));
                state.principal = Some(principal);
                state.token = token.map(|t| (t, Instant::now()));
                push(&mut lock(&self.conns), conn, welcome);
                state.phase = Phase::Caller;
                Ok(())
            }
            Role::Instance {
                function,
                instance_id,
                concurrency,
            } => {
                let principal = match self.access.instance(
                    token.as_deref(),
                    &function,
                    &instance_id,
                ) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(conn, %function, %instance_id, code = e.code.name(), "instance registration refused");
                        metrics::counter!("shoal_proxy_refused_total", "why" => "credential")
                            .increment(1);
                        return Err(self.refuse(conn, e));
                    }
                };
                let mut router = lock(&self.router);
                match router.register(
                    conn,
                    &function,
                    &instance_id,
                    concurrency,
                    &principal.tenant,
                    Instant::now(),
                ) {
                    Ok(actions) => {
                        let mut conns = lock(&self.conns);
                        push(&mut conns, conn, welcome);
                        apply(&mut router, &mut conns, actions);
                        tracing::debug!(conn, %function, %instance_id, concurrency, tenant = %principal.tenant, "instance registered");
                        state.phase = Phase::Instance;
                        drop((router, conns));
                        lock(&self.instances).insert(
                            conn,
                            LocalInstance {
                                function,
                                instance_id,
                                lane: None,
                            },
                        );
                        Ok(())
                    }
                    Err(e) => {
                        drop(router);
                        Err(self.refuse(conn, e))
                    }
                }
            }
        }
    }

    fn refuse(&self, conn: ConnId, e: WireError) -> ConnError {
        let mut conns = lock(&self.conns);
        if let Some(Outbox::Socket(tx)) = conns.get(&conn) {
            let _ = tx.try_send(ProxyFrame::Refused(e.clone()));
        }
        // Dropping the queue lets the writer flush the refusal and close.
        conns.remove(&conn);
        ConnError::Refused(e)
    }

    fn on_frame(
        &self,
        conn: ConnId,
        state: &mut ConnState,
        frame: CallerFrame,
    ) -> Result<(), ConnError> {
        match (state.phase, frame) {
            (
                Phase::Hello | Phase::PeerHello,
                CallerFrame::Hello {
                    version,
                    role,
                    token,
                },
            ) => {
                if version != PROTOCOL_VERSION {
                    return Err(self.refuse(
                        conn,
                        WireError::new(
                            ErrorCode::ProtocolError,
                            format!("unsupported protocol version {version}"),
                        ),
                    ));
                }
                self.on_hello(conn, state, role, token)
            }
            (Phase::Hello | Phase::PeerHello, _) => Err(self.refuse(
                conn,
                WireError::new(ErrorCode::ProtocolError, "the first frame must be Hello"),
            )),
            (
                phase @ (Phase::Caller | Phase::Peer),
                CallerFrame::Call {
                    id,
                    function,
                    instance,
                    args,
                    timeout_ms,
                    trace_id,
                },
            ) => {
                if let Payload::Inline(a) = &args {
                    if a.len() as u64 > self.cfg.inline_limit {
                        let e = WireError::new(
                            ErrorCode::TooLarge,
                            format!(
                                "inline argument of {} bytes exceeds the limit of {}",
                                a.len(),
                                self.cfg.inline_limit
                            ),
                        );
                        self.reply(conn, id, e);
                        return Ok(());
                    }
                }
                self.recheck(conn, state)?;
                // A peer's calls were checked and counted by the proxy they came from.
                let charge = match &state.calls {
                    Some(t) => match t.charge() {
                        Ok(c) => Some(c),
                        Err(e) => {
                            metrics::counter!("shoal_proxy_calls_total", "outcome" => e.code.name()).increment(1);
                            self.reply(conn, id, e);
                            return Ok(());
                        }
                    },
                    None => None,
                };
                let mut router = lock(&self.router);
                if let (Some(who), Some(tenant)) =
                    (&state.principal, router.function_tenant(&function))
                {
                    if let Err(e) = Access::may_invoke(who, tenant, &function) {
                        drop(router);
                        drop(charge);
                        self.reply(conn, id, e);
                        return Ok(());
                    }
                }
                let req = CallRequest {
                    id,
                    function,
                    instance,
                    args,
                    timeout: Duration::from_millis(timeout_ms),
                    trace_id,
                    local_only: phase == Phase::Peer,
                    charge,
                };
                let actions = router.call(conn, req, Instant::now());
                apply(&mut router, &mut lock(&self.conns), actions);
                drop(router);
                self.timer.notify_one();
                Ok(())
            }
            (Phase::Caller | Phase::Peer, CallerFrame::Release { id }) => {
                let mut router = lock(&self.router);
                let actions = router.release(conn, id);
                apply(&mut router, &mut lock(&self.conns), actions);
                Ok(())
            }
            (Phase::Instance, CallerFrame::Result { id, result }) => {
                let mut router = lock(&self.router);
                let actions = router.result(conn, id, result, Instant::now());
                apply(&mut router, &mut lock(&self.conns), actions);
                Ok(())
            }
            (Phase::Instance, CallerFrame::Drain) => {
                if let Some(i) = lock(&self.instances).get_mut(&conn) {
                    i.lane = None;
                }
                let mut router = lock(&self.router);
                router.retire(conn);
                // Every invoke routed to it so far is queued ahead of this frame.
                push(&mut lock(&self.conns), conn, ProxyFrame::Drained);
                Ok(())
            }
            (Phase::Instance, CallerFrame::Lane { path, key }) => {
                if path.is_empty() || path.len() > MAX_LANE_PATH {
                    return Err(ConnError::Protocol(format!(
                        "lane path of {} bytes",
                        path.len()
                    )));
                }
                if !self.is_lane_path(&path) {
                    // Not offered: its callers go through the proxy.
                    tracing::warn!(conn, %path, "lane socket not beside the proxy's; not offered");
                    return Ok(());
                }
                if let Some(i) = lock(&self.instances).get_mut(&conn) {
                    i.lane = Some((path, key));
                }
                Ok(())
            }
            (Phase::Caller, CallerFrame::Lanes { id, function }) => {
                self.recheck(conn, state)?;
                let allowed = {
                    let router = lock(&self.router);
                    let tenant = router.function_tenant(&function);
                    match (&state.principal, tenant) {
                        (Some(who), Some(t)) => Access::may_invoke(who, t, &function).is_ok(),
                        _ => false,
                    }
                };
                // Lane calls bypass the proxy: a tenant whose calls in flight are limited
                // takes none, so all its calls are counted here.
                let counted = state.calls.as_ref().is_some_and(|t| t.limited());
                let lanes = if allowed && !counted {
                    lock(&self.instances)
                        .values()
                        .filter(|i| i.function == function)
                        .filter_map(|i| {
                            let (path, key) = i.lane.clone()?;
                            Some(LaneInfo {
                                instance_id: i.instance_id.clone(),
                                path,
                                key,
                            })
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                push(
                    &mut lock(&self.conns),
                    conn,
                    ProxyFrame::Lanes { id, lanes },
                );
                Ok(())
            }
            (p, f) => Err(ConnError::Protocol(format!(
                "unexpected {} frame from a {p:?} connection",
                match f {
                    CallerFrame::Hello { .. } => "Hello",
                    CallerFrame::Call { .. } => "Call",
                    CallerFrame::Result { .. } => "Result",
                    CallerFrame::Drain => "Drain",
                    CallerFrame::Lane { .. } => "Lane",
                    CallerFrame::Lanes { .. } => "Lanes",
                    CallerFrame::Release { .. } => "Release",
                }
            ))),
        }
    }

    /// Fails calls at their deadlines until `stop`.
    pub(crate) async fn timer_loop(&self, stop: CancellationToken) {
        loop {
            let next = lock(&self.router).next_deadline();
            let wait = match next {
                Some(d) => tokio::time::Instant::from_std(d),
                None => tokio::time::Instant::now() + Duration::from_secs(3600),
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.timer.notified() => {}
                _ = tokio::time::sleep_until(wait) => {
                    let mut router = lock(&self.router);
                    let actions = router.tick(Instant::now());
                    apply(&mut router, &mut lock(&self.conns), actions);
                }
            }
        }
    }

    /// Fails every call with `Unavailable` and drops every outbound queue, so writers flush
    /// what is queued and close their connections.
    pub(crate) fn shutdown_calls(&self) {
        let mut router = lock(&self.router);
        let actions = router.shutdown();
        let mut conns = lock(&self.conns);
        apply(&mut router, &mut conns, actions);
        conns.clear();
    }

    /// A fresh id for a remote route.
    pub(crate) fn route_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds or updates remote route `route` (node `node`'s instances of `function`, of
    /// `tenant`), whose invokes go to `forwarder`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn set_route(
        &self,
        route: ConnId,
        function: &str,
        node: &str,
        instance_ids: std::collections::BTreeSet<String>,
        concurrency: u32,
        tenant: &str,
        forwarder: mpsc::Sender<ToPeer>,
    ) {
        let mut router = lock(&self.router);
        let mut conns = lock(&self.conns);
        conns.insert(route, Outbox::Route(forwarder));
        let actions = router.set_remote(
            route,
            function,
            node,
            instance_ids,
            concurrency,
            tenant,
            Instant::now(),
        );
        apply(&mut router, &mut conns, actions);
    }

    /// Remote route `route` takes no new calls; those in flight still complete.
    pub(crate) fn retire_route(&self, route: ConnId) {
        let mut router = lock(&self.router);
        router.retire(route);
        lock(&self.conns).remove(&route);
    }

    /// The answer to a forwarded invoke.
    pub(crate) fn route_result(&self, route: ConnId, id: u64, result: Result<Payload, WireError>) {
        let mut router = lock(&self.router);
        let actions = router.result(route, id, result, Instant::now());
        apply(&mut router, &mut lock(&self.conns), actions);
    }

    /// A forwarded invoke that never reached an instance: try another, or fail with `error`.
    pub(crate) fn route_bounce(&self, route: ConnId, id: u64, error: WireError) {
        metrics::counter!("shoal_proxy_given_back_total").increment(1);
        let mut router = lock(&self.router);
        let actions = router.bounce(route, id, error, Instant::now());
        apply(&mut router, &mut lock(&self.conns), actions);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn lanes_are_offered_only_beside_the_proxys_socket() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared::new(ProxyConfig::new("n", dir.path().join("proxy.sock")));
        let beside = |name: &str| dir.path().join(name).display().to_string();
        assert!(shared.is_lane_path(&beside("l-1-0.sock")));
        // The same directory spelled another way.
        let dotted = dir.path().join(".").join("l-1-0.sock");
        assert!(shared.is_lane_path(&dotted.display().to_string()));
        assert!(!shared.is_lane_path(&beside("proxy.sock")));
        assert!(!shared.is_lane_path(&beside("l-1-0.txt")));
        assert!(!shared.is_lane_path("/run/l-1-0.sock"));
        assert!(!shared.is_lane_path("l-1-0.sock"));
    }
}
