//! State shared by both engines: the router behind a short-held lock, each connection's
//! outbound queue, and the per-connection protocol (hello, calls, results).
//!
//! Lock order: `router` before `conns`. Actions are pushed onto connections' bounded queues
//! with `try_send` while the router lock is held, so frames reach each connection in the
//! order the router decided them (a `Welcome` always precedes the first `Invoke`). A
//! connection whose queue is full is closed rather than waited for.
use crate::router::{Action, CallRequest, ConnId, Router};
use crate::ProxyConfig;
use bytes::BytesMut;
use shoal_protocol::{
    CallerFrame, ErrorCode, FrameDecoder, FrameError, Payload, ProxyFrame, Role, WireError,
    PROTOCOL_VERSION,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
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
    Hello,
    Caller,
    Instance,
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

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) cfg: ProxyConfig,
    router: Mutex<Router>,
    conns: Mutex<HashMap<ConnId, mpsc::Sender<ProxyFrame>>>,
    next_conn: AtomicU64,
    active: AtomicUsize,
    timer: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn push(conns: &mut HashMap<ConnId, mpsc::Sender<ProxyFrame>>, conn: ConnId, frame: ProxyFrame) {
    let Some(tx) = conns.get(&conn) else {
        return; // gone; replies to it are dropped
    };
    if let Err(e) = tx.try_send(frame) {
        if matches!(e, mpsc::error::TrySendError::Full(_)) {
            tracing::warn!(conn, "outbound queue full; closing the connection");
        }
        conns.remove(&conn);
    }
}

fn apply(conns: &mut HashMap<ConnId, mpsc::Sender<ProxyFrame>>, actions: Vec<Action>) {
    for a in actions {
        match a {
            Action::Reply { caller, id, result } => {
                push(conns, caller, ProxyFrame::Reply { id, result });
            }
            Action::Invoke {
                instance,
                id,
                function,
                args,
                timeout_ms,
                trace_id,
            } => push(
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
        }
    }
}

impl Shared {
    pub(crate) fn new(cfg: ProxyConfig) -> Self {
        let max_queue = cfg.max_queue;
        Self {
            cfg,
            router: Mutex::new(Router::new(max_queue)),
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
        lock(&self.conns).insert(id, tx);
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
        let mut router = lock(&self.router);
        let actions = router.disconnect(id);
        let mut conns = lock(&self.conns);
        conns.remove(&id);
        apply(&mut conns, actions);
        self.active.fetch_sub(1, Ordering::AcqRel);
    }

    /// Decodes and handles every whole frame in `buf`.
    pub(crate) fn on_bytes(
        &self,
        conn: ConnId,
        phase: &mut Phase,
        decoder: &FrameDecoder,
        buf: &mut BytesMut,
    ) -> Result<(), ConnError> {
        while let Some(frame) = decoder.decode::<CallerFrame>(buf)? {
            self.on_frame(conn, phase, frame)?;
        }
        Ok(())
    }

    fn refuse(&self, conn: ConnId, e: WireError) -> ConnError {
        let mut conns = lock(&self.conns);
        if let Some(tx) = conns.get(&conn) {
            let _ = tx.try_send(ProxyFrame::Refused(e.clone()));
        }
        // Dropping the queue lets the writer flush the refusal and close.
        conns.remove(&conn);
        ConnError::Refused(e)
    }

    fn on_frame(
        &self,
        conn: ConnId,
        phase: &mut Phase,
        frame: CallerFrame,
    ) -> Result<(), ConnError> {
        match (*phase, frame) {
            (Phase::Hello, CallerFrame::Hello { version, role }) => {
                if version != PROTOCOL_VERSION {
                    return Err(self.refuse(
                        conn,
                        WireError::new(
                            ErrorCode::ProtocolError,
                            format!("unsupported protocol version {version}"),
                        ),
                    ));
                }
                let welcome = ProxyFrame::Welcome {
                    node_id: self.cfg.node_id.clone(),
                    inline_limit: self.cfg.inline_limit,
                };
                match role {
                    Role::Caller => {
                        push(&mut lock(&self.conns), conn, welcome);
                        *phase = Phase::Caller;
                    }
                    Role::Instance {
                        function,
                        instance_id,
                        concurrency,
                    } => {
                        let mut router = lock(&self.router);
                        match router.register(
                            conn,
                            &function,
                            &instance_id,
                            concurrency,
                            Instant::now(),
                        ) {
                            Ok(actions) => {
                                let mut conns = lock(&self.conns);
                                push(&mut conns, conn, welcome);
                                apply(&mut conns, actions);
                                tracing::debug!(conn, %function, %instance_id, concurrency, "instance registered");
                                *phase = Phase::Instance;
                            }
                            Err(e) => {
                                drop(router);
                                return Err(self.refuse(conn, e));
                            }
                        }
                    }
                }
                Ok(())
            }
            (Phase::Hello, _) => Err(self.refuse(
                conn,
                WireError::new(ErrorCode::ProtocolError, "the first frame must be Hello"),
            )),
            (
                Phase::Caller,
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
                        push(
                            &mut lock(&self.conns),
                            conn,
                            ProxyFrame::Reply { id, result: Err(e) },
                        );
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
                };
                let mut router = lock(&self.router);
                let actions = router.call(conn, req, Instant::now());
                apply(&mut lock(&self.conns), actions);
                drop(router);
                self.timer.notify_one();
                Ok(())
            }
            (Phase::Instance, CallerFrame::Result { id, result }) => {
                let mut router = lock(&self.router);
                let actions = router.result(conn, id, result, Instant::now());
                apply(&mut lock(&self.conns), actions);
                Ok(())
            }
            (p, f) => Err(ConnError::Protocol(format!(
                "unexpected {} frame from a {p:?} connection",
                match f {
                    CallerFrame::Hello { .. } => "Hello",
                    CallerFrame::Call { .. } => "Call",
                    CallerFrame::Result { .. } => "Result",
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
                    apply(&mut lock(&self.conns), actions);
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
        apply(&mut conns, actions);
        conns.clear();
    }
}
