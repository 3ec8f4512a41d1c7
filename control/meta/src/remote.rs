//! Remote access: control serves a store to nodes over TCP ([`serve`]); nodes use
//! [`RemoteStore`].
//!
//! Wire: shoal's framing (`[u32 len][u8 version][postcard body]`). The client sends
//! [`ClientMsg`]s, each with a `u32` id; the server answers each with a
//! [`ServerMsg::Reply`] carrying that id, in any order, so many calls share one connection. A
//! watch is a request whose reply is `Watching`, followed by `Event`s tagged with the
//! request's id, until `WatchEnded` (the store ended it) or `CancelWatch` from the client.
//!
//! Invariants:
//! - Every queue is bounded: per connection at most [`MAX_INFLIGHT`] requests run at once
//!   (the server stops reading beyond that), replies and events wait in a queue of
//!   [`OUT_QUEUE`], and a client's watch whose [`WATCH_QUEUE`] fills is ended, not buffered.
//! - A malformed, truncated-then-closed or oversized frame closes that connection only.
//! - Every task is owned: connection tasks by [`serve`] (which waits for them at shutdown),
//!   a client connection's reader and writer by the [`RemoteStore`] (they stop when it is
//!   dropped or closed).
use crate::keys::Namespace;
use crate::types::{
    KeyValue, LeaseId, MetaError, MetaStore, Revision, Txn, WatchEvent, WatchStream,
};
use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use shoal_protocol::{encode_frame, FrameDecoder, FrameError, FRAME_HEADER_LEN};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

/// Largest request body the server accepts.
pub(crate) const MAX_REQUEST_FRAME: usize = 4 << 20;
/// Largest reply body the client accepts (a big `range`); larger replies become errors.
pub(crate) const MAX_REPLY_FRAME: usize = 64 << 20;
/// Connections one server accepts at once.
const MAX_CONNECTIONS: usize = 1024;
/// Requests one connection may have running at once.
const MAX_INFLIGHT: usize = 64;
/// Watches one connection may hold.
const MAX_WATCHES: usize = 1024;
/// Messages waiting to be written, per connection and direction.
const OUT_QUEUE: usize = 256;
/// Events a client's watch may fall behind by before it is ended.
const WATCH_QUEUE: usize = 1024;
/// Bytes gathered into one socket write.
const WRITE_BATCH: usize = 64 << 10;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A request from a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ClientMsg {
    /// Matches the reply (and, for a watch, its events).
    pub(crate) id: u32,
    /// The call.
    pub(crate) req: Req,
}

/// The calls of [`MetaStore`], plus cancelling a watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Req {
    Get {
        key: String,
    },
    Range {
        prefix: String,
    },
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
    Txn(Txn),
    Grant {
        ttl: Duration,
    },
    KeepAlive {
        lease: LeaseId,
    },
    Revoke {
        lease: LeaseId,
    },
    Watch {
        prefix: String,
        after: Revision,
    },
    /// Stop the watch started by request `watch` (no reply).
    CancelWatch {
        watch: u32,
    },
}

/// Successful results.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Resp {
    Get(Option<KeyValue>),
    Range(Vec<KeyValue>, Revision),
    Put(Revision),
    Delete(bool),
    Txn(bool),
    Grant(LeaseId),
    KeepAlive(Duration),
    Revoke,
    Watching,
}

/// [`MetaError`] on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum WireMetaError {
    Unavailable(String),
    LeaseNotFound(LeaseId),
    InvalidArgument(String),
    Compacted(Revision),
    Backend(String),
}

impl From<MetaError> for WireMetaError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::Unavailable(m) => Self::Unavailable(m),
            MetaError::LeaseNotFound(l) => Self::LeaseNotFound(l),
            MetaError::InvalidArgument(m) => Self::InvalidArgument(m),
            MetaError::Compacted(r) => Self::Compacted(r),
            MetaError::Backend(m) => Self::Backend(m),
        }
    }
}

impl From<WireMetaError> for MetaError {
    fn from(e: WireMetaError) -> Self {
        match e {
            WireMetaError::Unavailable(m) => Self::Unavailable(m),
            WireMetaError::LeaseNotFound(l) => Self::LeaseNotFound(l),
            WireMetaError::InvalidArgument(m) => Self::InvalidArgument(m),
            WireMetaError::Compacted(r) => Self::Compacted(r),
            WireMetaError::Backend(m) => Self::Backend(m),
        }
    }
}

/// A message from the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ServerMsg {
    /// The result of request `id`.
    Reply {
        id: u32,
        result: Result<Resp, WireMetaError>,
    },
    /// An event of the watch started by request `watch`.
    Event { watch: u32, event: WatchEvent },
    /// The watch started by request `watch` ended; no more events follow.
    WatchEnded { watch: u32 },
}

/// Takes one request off `buf` (what the server runs on every byte a client sends).
pub(crate) fn decode_request(
    dec: &FrameDecoder,
    buf: &mut BytesMut,
) -> Result<Option<ClientMsg>, FrameError> {
    dec.decode(buf)
}

/// Takes one server message off `buf` (what the client runs on every byte it receives).
pub(crate) fn decode_server_msg(
    dec: &FrameDecoder,
    buf: &mut BytesMut,
) -> Result<Option<ServerMsg>, FrameError> {
    dec.decode(buf)
}

// ---------------------------------------------------------------------------------------
// Server

/// Serves `store` to [`RemoteStore`] clients on `listener` until `shutdown` is cancelled;
/// then closes every connection and returns once their tasks have ended.
pub async fn serve(store: Arc<dyn MetaStore>, listener: TcpListener, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let store = store.clone();
                let token = shutdown.child_token();
                tracker.spawn(async move {
                    serve_conn(store, stream, peer, token).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accepting a metadata connection failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
    tracker.close();
    tracker.wait().await;
}

type WatchTokens = Arc<Mutex<HashMap<u32, CancellationToken>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn serve_conn(
    store: Arc<dyn MetaStore>,
    stream: TcpStream,
    peer: SocketAddr,
    token: CancellationToken,
) {
    let (mut rd, wr) = stream.into_split();
    let (out, out_rx) = mpsc::channel::<ServerMsg>(OUT_QUEUE);
    let tasks = TaskTracker::new();
    tasks.spawn(server_write(wr, out_rx, token.clone(), peer));
    let inflight = Arc::new(Semaphore::new(MAX_INFLIGHT));
    let watches: WatchTokens = Arc::default();
    let dec = FrameDecoder::new(MAX_REQUEST_FRAME);
    let mut buf = BytesMut::with_capacity(8 << 10);
    'conn: loop {
        loop {
            let msg = match decode_request(&dec, &mut buf) {
                Ok(Some(msg)) => msg,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "bad frame from a metadata client; closing its connection");
                    break 'conn;
                }
            };
            let ClientMsg { id, req } = msg;
            if let Req::CancelWatch { watch } = req {
                if let Some(t) = lock(&watches).remove(&watch) {
                    t.cancel();
                }
                continue;
            }
            let permit = tokio::select! {
                _ = token.cancelled() => break 'conn,
                p = inflight.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break 'conn,
                },
            };
            match req {
                Req::Watch { prefix, after } => {
                    let refused = {
                        let mut w = lock(&watches);
                        let held = w.len();
                        match w.entry(id) {
                            Entry::Occupied(_) => Some(format!("watch id {id} is in use")),
                            Entry::Vacant(_) if held >= MAX_WATCHES => {
                                Some(format!("more than {MAX_WATCHES} watches on one connection"))
                            }
                            Entry::Vacant(slot) => {
                                let wt = token.child_token();
                                slot.insert(wt.clone());
                                tasks.spawn(serve_watch(
                                    store.clone(),
                                    id,
                                    prefix,
                                    after,
                                    out.clone(),
                                    wt,
                                    watches.clone(),
                                    permit,
                                ));
                                None
                            }
                        }
                    };
                    if let Some(why) = refused {
                        let msg = ServerMsg::Reply {
                            id,
                            result: Err(WireMetaError::InvalidArgument(why)),
                        };
                        if !send(&out, msg, &token).await {
                            break 'conn;
                        }
                    }
                }
                req => {
                    tasks.spawn(serve_call(
                        store.clone(),
                        id,
                        req,
                        out.clone(),
                        token.clone(),
                        permit,
                    ));
                }
            }
        }
        let read = tokio::select! {
            _ = token.cancelled() => break,
            r = rd.read_buf(&mut buf) => r,
        };
        match read {
            Ok(0) => {
                if !buf.is_empty() {
                    tracing::warn!(%peer, bytes = buf.len(), "metadata client closed mid-frame");
                }
                break;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(%peer, error = %e, "metadata connection read failed");
                break;
            }
        }
    }
    token.cancel();
    drop(out);
    tasks.close();
    tasks.wait().await;
}

/// Sends unless the connection is closing; `false` if the message was not sent.
async fn send<T>(out: &mpsc::Sender<T>, msg: T, token: &CancellationToken) -> bool {
    tokio::select! {
        _ = token.cancelled() => false,
        r = out.send(msg) => r.is_ok(),
    }
}

async fn serve_call(
    store: Arc<dyn MetaStore>,
    id: u32,
    req: Req,
    out: mpsc::Sender<ServerMsg>,
    token: CancellationToken,
    permit: OwnedSemaphorePermit,
) {
    let result = tokio::select! {
        _ = token.cancelled() => return,
        r = run(&*store, req) => r,
    };
    let msg = ServerMsg::Reply {
        id,
        result: result.map_err(WireMetaError::from),
    };
    send(&out, msg, &token).await;
    drop(permit);
}

async fn run(store: &dyn MetaStore, req: Req) -> Result<Resp, MetaError> {
    Ok(match req {
        Req::Get { key } => Resp::Get(store.get(&key).await?),
        Req::Range { prefix } => {
            let (kvs, rev) = store.range(&prefix).await?;
            Resp::Range(kvs, rev)
        }
        Req::Put { key, value, lease } => Resp::Put(store.put(&key, value, lease).await?),
        Req::Delete { key } => Resp::Delete(store.delete(&key).await?),
        Req::Txn(txn) => Resp::Txn(store.txn(txn).await?),
        Req::Grant { ttl } => Resp::Grant(store.grant(ttl).await?),
        Req::KeepAlive { lease } => Resp::KeepAlive(store.keep_alive(lease).await?),
        Req::Revoke { lease } => {
            store.revoke(lease).await?;
            Resp::Revoke
        }
        Req::Watch { .. } | Req::CancelWatch { .. } => {
            return Err(MetaError::InvalidArgument("not a call".into()))
        }
    })
}

#[allow(clippy::too_many_arguments)]
async fn serve_watch(
    store: Arc<dyn MetaStore>,
    id: u32,
    prefix: String,
    after: Revision,
    out: mpsc::Sender<ServerMsg>,
    token: CancellationToken,
    watches: WatchTokens,
    permit: OwnedSemaphorePermit,
) {
    let started = tokio::select! {
        _ = token.cancelled() => None,
        r = store.watch(&prefix, after) => Some(r),
    };
    let mut stream = match started {
        Some(Ok(s)) => {
            let msg = ServerMsg::Reply {
                id,
                result: Ok(Resp::Watching),
            };
            if send(&out, msg, &token).await {
                Some(s)
            } else {
                None
            }
        }
        Some(Err(e)) => {
            let msg = ServerMsg::Reply {
                id,
                result: Err(e.into()),
            };
            send(&out, msg, &token).await;
            None
        }
        None => None,
    };
    drop(permit);
    if let Some(stream) = stream.as_mut() {
        loop {
            let event = tokio::select! {
                _ = token.cancelled() => break,
                e = stream.recv() => e,
            };
            let msg = match event {
                Some(event) => ServerMsg::Event { watch: id, event },
                None => {
                    send(&out, ServerMsg::WatchEnded { watch: id }, &token).await;
                    break;
                }
            };
            if !send(&out, msg, &token).await {
                break;
            }
        }
    }
    lock(&watches).remove(&id);
}

/// Appends `msg` as a frame; a reply too large for clients becomes an error reply, an event
/// too large ends its watch (cannot happen within the key and value limits).
fn encode_server_msg(msg: &ServerMsg, buf: &mut Vec<u8>) {
    let start = buf.len();
    let fits = match encode_frame(msg, buf) {
        Ok(()) => buf.len() - start - FRAME_HEADER_LEN <= MAX_REPLY_FRAME,
        Err(_) => false,
    };
    if fits {
        return;
    }
    let size = buf.len() - start;
    buf.truncate(start);
    let substitute = match msg {
        ServerMsg::Reply { id, .. } => ServerMsg::Reply {
            id: *id,
            result: Err(WireMetaError::Backend(format!(
                "reply of {size} bytes exceeds the {MAX_REPLY_FRAME}-byte limit; read a narrower prefix"
            ))),
        },
        ServerMsg::Event { watch, .. } | ServerMsg::WatchEnded { watch } => {
            ServerMsg::WatchEnded { watch: *watch }
        }
    };
    if encode_frame(&substitute, buf).is_err() {
        buf.truncate(start);
    }
}

async fn server_write(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<ServerMsg>,
    token: CancellationToken,
    peer: SocketAddr,
) {
    let mut buf = Vec::with_capacity(WRITE_BATCH);
    loop {
        let msg = tokio::select! {
            _ = token.cancelled() => break,
            m = rx.recv() => match m {
                Some(m) => m,
                None => break,
            },
        };
        encode_server_msg(&msg, &mut buf);
        while buf.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(m) => encode_server_msg(&m, &mut buf),
                Err(_) => break,
            }
        }
        let written = tokio::select! {
            _ = token.cancelled() => break,
            r = wr.write_all(&buf) => r,
        };
        if let Err(e) = written {
            tracing::debug!(%peer, error = %e, "metadata connection write failed");
            token.cancel();
            break;
        }
        buf.clear();
        if buf.capacity() > 4 * WRITE_BATCH {
            buf = Vec::with_capacity(WRITE_BATCH);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Client

/// A [`MetaStore`] served by another process ([`serve`]). Connects lazily on the first call;
/// when the connection breaks, calls in flight fail with `Unavailable`, watches end, and the
/// next call connects again.
pub struct RemoteStore {
    addr: SocketAddr,
    ns: Namespace,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStore")
            .field("addr", &self.addr)
            .field("prefix", &self.ns.prefix())
            .finish_non_exhaustive()
    }
}

/// One live connection. Dropping it stops its tasks.
struct Conn {
    shared: Arc<ConnShared>,
    out: mpsc::Sender<Vec<u8>>,
    stop: CancellationToken,
    tasks: TaskTracker,
    _stop_on_drop: DropGuard,
}

/// What the connection's reader shares with callers.
struct ConnShared {
    addr: SocketAddr,
    ns: Namespace,
    next_id: AtomicU32,
    /// Cancelled when the connection broke.
    dead: CancellationToken,
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    /// Set when the connection broke: no new slots.
    closed: bool,
    map: HashMap<u32, Slot>,
}

type ReplyTx = oneshot::Sender<Result<Resp, WireMetaError>>;

enum Slot {
    Call(ReplyTx),
    Watch {
        started: Option<ReplyTx>,
        events: mpsc::Sender<WatchEvent>,
    },
}

/// Removes a slot when its caller gives up (the future is dropped or fails); for a watch,
/// also tells the server.
struct SlotGuard<'a> {
    conn: &'a Conn,
    id: u32,
    watch: bool,
    armed: bool,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        lock(&self.conn.shared.slots).map.remove(&self.id);
        if self.watch {
            self.conn.cancel_watch(self.id);
        }
    }
}

impl RemoteStore {
    /// A client of the server at `addr`; nothing happens until the first call.
    pub fn connect(addr: SocketAddr) -> RemoteStore {
        RemoteStore {
            addr,
            ns: Namespace::new(""),
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// Keeps this client's keys under `prefix` (within the served store's own prefix).
    pub fn with_prefix(self, prefix: &str) -> RemoteStore {
        RemoteStore {
            addr: self.addr,
            ns: Namespace::new(prefix),
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes the connection (calls in flight fail, watches end) and waits for its tasks.
    /// The next call connects again.
    pub async fn close(&self) {
        let conn = self.conn.lock().await.take();
        if let Some(conn) = conn {
            conn.stop.cancel();
            conn.tasks.close();
            conn.tasks.wait().await;
        }
    }

    async fn conn(&self) -> Result<Arc<Conn>, MetaError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.shared.dead.is_cancelled() {
                return Ok(c.clone());
            }
        }
        *slot = None;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr))
            .await
            .map_err(|_| {
                MetaError::Unavailable(format!(
                    "connecting to metadata server {}: no answer within {CONNECT_TIMEOUT:?}",
                    self.addr
                ))
            })?
            .map_err(|e| {
                MetaError::Unavailable(format!("connecting to metadata server {}: {e}", self.addr))
            })?;
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(Conn::start(stream, self.addr, self.ns.clone()));
        *slot = Some(conn.clone());
        Ok(conn)
    }

    async fn call(&self, req: Req) -> Result<Resp, MetaError> {
        let conn = self.conn().await?;
        let (tx, rx) = oneshot::channel();
        let id = conn.register(Slot::Call(tx))?;
        let mut guard = SlotGuard {
            conn: &conn,
            id,
            watch: false,
            armed: true,
        };
        conn.send(&ClientMsg { id, req }).await?;
        let reply = conn.await_reply(rx).await;
        guard.armed = false;
        reply
    }
}

impl Conn {
    fn start(stream: TcpStream, addr: SocketAddr, ns: Namespace) -> Conn {
        let (rd, wr) = stream.into_split();
        let shared = Arc::new(ConnShared {
            addr,
            ns,
            next_id: AtomicU32::new(1),
            dead: CancellationToken::new(),
            slots: Mutex::new(Slots::default()),
        });
        let stop = CancellationToken::new();
        let (out, out_rx) = mpsc::channel(OUT_QUEUE);
        let tasks = TaskTracker::new();
        tasks.spawn(client_write(wr, out_rx, shared.clone(), stop.clone()));
        tasks.spawn(client_read(
            rd,
            shared.clone(),
            out.downgrade(),
            stop.clone(),
        ));
        Conn {
            shared,
            out,
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
            tasks,
        }
    }

    fn lost(&self) -> MetaError {
        MetaError::Unavailable(format!(
            "connection to metadata server {} lost",
            self.shared.addr
        ))
    }

    fn register(&self, slot: Slot) -> Result<u32, MetaError> {
        let mut slots = lock(&self.shared.slots);
        if slots.closed {
            return Err(self.lost());
        }
        loop {
            let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
            if let Entry::Vacant(free) = slots.map.entry(id) {
                free.insert(slot);
                return Ok(id);
            }
        }
    }

    async fn send(&self, msg: &ClientMsg) -> Result<(), MetaError> {
        let mut frame = Vec::new();
        encode_frame(msg, &mut frame)
            .map_err(|e| MetaError::InvalidArgument(format!("request cannot be encoded: {e}")))?;
        let body = frame.len() - FRAME_HEADER_LEN;
        if body > MAX_REQUEST_FRAME {
            return Err(MetaError::InvalidArgument(format!(
                "request of {body} bytes exceeds the {MAX_REQUEST_FRAME}-byte limit"
            )));
        }
        tokio::select! {
            _ = self.shared.dead.cancelled() => Err(self.lost()),
            r = self.out.send(frame) => r.map_err(|_| self.lost()),
        }
    }

    async fn await_reply(
        &self,
        rx: oneshot::Receiver<Result<Resp, WireMetaError>>,
    ) -> Result<Resp, MetaError> {
        match tokio::time::timeout(CALL_TIMEOUT, rx).await {
            Err(_) => {
                // A server that does not answer at all is as good as gone: drop the
                // connection so that the next call starts afresh.
                self.shared.dead.cancel();
                Err(MetaError::Unavailable(format!(
                    "metadata server {} did not answer within {CALL_TIMEOUT:?}",
                    self.shared.addr
                )))
            }
            Ok(Err(_)) => Err(self.lost()),
            Ok(Ok(r)) => r.map_err(MetaError::from),
        }
    }

    fn cancel_watch(&self, watch: u32) {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = Vec::new();
        let msg = ClientMsg {
            id,
            req: Req::CancelWatch { watch },
        };
        // Best effort: if the queue is full or the connection gone, the server's watch ends
        // with the connection or its events are ignored.
        if encode_frame(&msg, &mut frame).is_ok() {
            let _ = self.out.try_send(frame);
        }
    }
}

impl ConnShared {
    fn strip(&self, mut kv: KeyValue) -> KeyValue {
        if let Some(k) = self.ns.strip(&kv.key) {
            kv.key = k.to_owned();
        }
        kv
    }

    fn strip_event(&self, e: WatchEvent) -> WatchEvent {
        match e {
            WatchEvent::Put(kv) => WatchEvent::Put(self.strip(kv)),
            WatchEvent::Delete { key, mod_revision } => WatchEvent::Delete {
                key: self.ns.strip(&key).map(str::to_owned).unwrap_or(key),
                mod_revision,
            },
        }
    }

    /// Routes one message from the server; returns a watch to cancel on the server, if any.
    fn dispatch(&self, msg: ServerMsg) -> Option<u32> {
        let mut slots = lock(&self.slots);
        match msg {
            ServerMsg::Reply { id, result } => match slots.map.remove(&id) {
                Some(Slot::Call(tx)) => {
                    let _ = tx.send(result);
                }
                Some(Slot::Watch {
                    started: Some(tx),
                    events,
                }) => {
                    let ok = result.is_ok();
                    if tx.send(result).is_ok() && ok {
                        slots.map.insert(
                            id,
                            Slot::Watch {
                                started: None,
                                events,
                            },
                        );
                    } else if ok {
                        return Some(id);
                    }
                }
                Some(other) => {
                    slots.map.insert(id, other);
                }
                None => {}
            },
            ServerMsg::Event { watch, event } => {
                if let Some(Slot::Watch { events, .. }) = slots.map.get(&watch) {
                    match events.try_send(self.strip_event(event)) {
                        Ok(()) => {}
                        Err(e) => {
                            if matches!(e, mpsc::error::TrySendError::Full(_)) {
                                tracing::debug!(watch, "remote watcher fell behind; ending it");
                            }
                            slots.map.remove(&watch);
                            return Some(watch);
                        }
                    }
                }
            }
            ServerMsg::WatchEnded { watch } => {
                if matches!(slots.map.get(&watch), Some(Slot::Watch { .. })) {
                    slots.map.remove(&watch);
                }
            }
        }
        None
    }

    /// Fails every call in flight and ends every watch; no new ones after this.
    fn close(&self) {
        self.dead.cancel();
        let map = {
            let mut slots = lock(&self.slots);
            slots.closed = true;
            std::mem::take(&mut slots.map)
        };
        drop(map);
    }
}

async fn client_write(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Vec<u8>>,
    shared: Arc<ConnShared>,
    stop: CancellationToken,
) {
    let mut buf = Vec::with_capacity(WRITE_BATCH);
    loop {
        let frame = tokio::select! {
            _ = stop.cancelled() => break,
            _ = shared.dead.cancelled() => break,
            f = rx.recv() => match f {
                Some(f) => f,
                None => break,
            },
        };
        buf.extend_from_slice(&frame);
        while buf.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(f) => buf.extend_from_slice(&f),
                Err(_) => break,
            }
        }
        let written = tokio::select! {
            _ = stop.cancelled() => break,
            _ = shared.dead.cancelled() => break,
            r = wr.write_all(&buf) => r,
        };
        if let Err(e) = written {
            tracing::debug!(addr = %shared.addr, error = %e, "metadata connection write failed");
            break;
        }
        buf.clear();
        if buf.capacity() > 4 * WRITE_BATCH {
            buf = Vec::with_capacity(WRITE_BATCH);
        }
    }
    shared.close();
}

async fn client_read(
    mut rd: OwnedReadHalf,
    shared: Arc<ConnShared>,
    out: mpsc::WeakSender<Vec<u8>>,
    stop: CancellationToken,
) {
    let dec = FrameDecoder::new(MAX_REPLY_FRAME);
    let mut buf = BytesMut::with_capacity(8 << 10);
    'conn: loop {
        loop {
            match decode_server_msg(&dec, &mut buf) {
                Ok(Some(msg)) => {
                    if let Some(watch) = shared.dispatch(msg) {
                        let cancel = ClientMsg {
                            id: shared.next_id.fetch_add(1, Ordering::Relaxed),
                            req: Req::CancelWatch { watch },
                        };
                        let mut frame = Vec::new();
                        if let (Some(out), Ok(())) =
                            (out.upgrade(), encode_frame(&cancel, &mut frame))
                        {
                            let _ = out.try_send(frame);
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(addr = %shared.addr, error = %e, "bad frame from the metadata server; dropping the connection");
                    break 'conn;
                }
            }
        }
        let read = tokio::select! {
            _ = stop.cancelled() => break,
            _ = shared.dead.cancelled() => break,
            r = rd.read_buf(&mut buf) => r,
        };
        match read {
            Ok(0) => {
                tracing::debug!(addr = %shared.addr, "metadata server closed the connection");
                break;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(addr = %shared.addr, error = %e, "metadata connection read failed");
                break;
            }
        }
    }
    shared.close();
}

fn unexpected(resp: Resp) -> MetaError {
    MetaError::Backend(format!(
        "unexpected reply from the metadata server: {resp:?}"
    ))
}

#[async_trait::async_trait]
impl MetaStore for RemoteStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, MetaError> {
        let key = self.ns.key(key)?;
        match self.call(Req::Get { key }).await? {
            Resp::Get(kv) => Ok(kv.map(|kv| self.strip(kv))),
            other => Err(unexpected(other)),
        }
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), MetaError> {
        let prefix = self.ns.range(prefix)?;
        match self.call(Req::Range { prefix }).await? {
            Resp::Range(kvs, rev) => Ok((kvs.into_iter().map(|kv| self.strip(kv)).collect(), rev)),
            other => Err(unexpected(other)),
        }
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, MetaError> {
        let key = self.ns.key(key)?;
        crate::keys::check_value(&value)?;
        match self.call(Req::Put { key, value, lease }).await? {
            Resp::Put(rev) => Ok(rev),
            other => Err(unexpected(other)),
        }
    }

    async fn delete(&self, key: &str) -> Result<bool, MetaError> {
        let key = self.ns.key(key)?;
        match self.call(Req::Delete { key }).await? {
            Resp::Delete(existed) => Ok(existed),
            other => Err(unexpected(other)),
        }
    }

    async fn txn(&self, txn: Txn) -> Result<bool, MetaError> {
        let txn = self.ns.txn(txn)?;
        match self.call(Req::Txn(txn)).await? {
            Resp::Txn(ok) => Ok(ok),
            other => Err(unexpected(other)),
        }
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, MetaError> {
        crate::keys::lease_secs(ttl)?;
        match self.call(Req::Grant { ttl }).await? {
            Resp::Grant(id) => Ok(id),
            other => Err(unexpected(other)),
        }
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, MetaError> {
        match self.call(Req::KeepAlive { lease }).await? {
            Resp::KeepAlive(ttl) => Ok(ttl),
            other => Err(unexpected(other)),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), MetaError> {
        match self.call(Req::Revoke { lease }).await? {
            Resp::Revoke => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, MetaError> {
        let prefix = self.ns.range(prefix)?;
        let conn = self.conn().await?;
        let (tx, rx) = oneshot::channel();
        let (events, stream) = mpsc::channel(WATCH_QUEUE);
        let id = conn.register(Slot::Watch {
            started: Some(tx),
            events,
        })?;
        let mut guard = SlotGuard {
            conn: &conn,
            id,
            watch: true,
            armed: true,
        };
        conn.send(&ClientMsg {
            id,
            req: Req::Watch { prefix, after },
        })
        .await?;
        match conn.await_reply(rx).await {
            Ok(Resp::Watching) => {
                guard.armed = false;
                Ok(stream)
            }
            Ok(other) => Err(unexpected(other)),
            Err(e) => {
                // The server refused or never started it: nothing to cancel there.
                guard.watch = false;
                Err(e)
            }
        }
    }
}

impl RemoteStore {
    fn strip(&self, mut kv: KeyValue) -> KeyValue {
        if let Some(k) = self.ns.strip(&kv.key) {
            kv.key = k.to_owned();
        }
        kv
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::MemStore;
    use proptest::prelude::*;

    async fn server(
        store: Arc<dyn MetaStore>,
    ) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(store, listener, stop.clone()));
        (addr, stop, task)
    }

    /// Reads until the server closes the connection; panics if it stays open.
    async fn expect_closed(raw: &mut TcpStream) {
        let mut sink = [0u8; 1024];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match raw.read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "the server kept a garbage-sending connection open"
        );
    }

    #[tokio::test]
    async fn garbage_closes_only_that_connection() {
        let mem = MemStore::open(None, "").unwrap();
        let (addr, stop, task) = server(Arc::new(mem)).await;
        let good = RemoteStore::connect(addr);
        good.put("k", b"v".to_vec(), None).await.unwrap();
        let mut watch = good.watch("", 0).await.unwrap();

        // Oversized length.
        let mut raw = TcpStream::connect(addr).await.unwrap();
        raw.write_all(&[0xff; 64]).await.unwrap();
        expect_closed(&mut raw).await;
        // Right length and version, garbage body.
        let mut raw = TcpStream::connect(addr).await.unwrap();
        let mut frame = 8u32.to_le_bytes().to_vec();
        frame.push(shoal_protocol::PROTOCOL_VERSION);
        frame.extend_from_slice(&[0xfe; 8]);
        raw.write_all(&frame).await.unwrap();
        expect_closed(&mut raw).await;
        // A truncated frame, then the client goes away.
        let mut raw = TcpStream::connect(addr).await.unwrap();
        raw.write_all(&frame[..7]).await.unwrap();
        drop(raw);

        // The well-behaved client and its watch are unaffected; a new client works too.
        assert_eq!(good.get("k").await.unwrap().unwrap().value, b"v");
        let other = RemoteStore::connect(addr);
        let rev = other.put("k2", b"w".to_vec(), None).await.unwrap();
        assert_eq!(watch.recv().await.unwrap().key(), "k");
        let e = watch.recv().await.unwrap();
        assert_eq!((e.key(), e.revision()), ("k2", rev));
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn reconnects_after_the_server_comes_back() {
        let mem = MemStore::open(None, "").unwrap();
        let (addr, stop, task) = server(Arc::new(mem.clone())).await;
        let client = RemoteStore::connect(addr);
        client.put("k", b"1".to_vec(), None).await.unwrap();
        let mut watch = client.watch("", 0).await.unwrap();
        assert!(watch.recv().await.is_some());

        stop.cancel();
        task.await.unwrap();
        // The watch ends with the connection; calls fail as unavailable.
        let ended = tokio::time::timeout(Duration::from_secs(10), watch.recv())
            .await
            .unwrap();
        assert!(ended.is_none());
        assert!(matches!(
            client.get("k").await,
            Err(MetaError::Unavailable(_))
        ));

        let listener = TcpListener::bind(addr).await.unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(Arc::new(mem), listener, stop.clone()));
        assert_eq!(client.get("k").await.unwrap().unwrap().value, b"1");
        client.close().await;
        // Usable again after close: it reconnects.
        assert!(client.get("k").await.unwrap().is_some());
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn unreachable_server_is_unavailable() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let client = RemoteStore::connect(addr);
        assert!(matches!(
            client.get("k").await,
            Err(MetaError::Unavailable(_))
        ));
        assert!(matches!(
            client.watch("", 0).await,
            Err(MetaError::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn many_calls_in_flight_on_one_connection() {
        let mem = MemStore::open(None, "").unwrap();
        let (addr, stop, task) = server(Arc::new(mem)).await;
        let client = Arc::new(RemoteStore::connect(addr));
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..200u32 {
            let c = client.clone();
            calls.spawn(async move {
                c.put(&format!("k{i}"), i.to_le_bytes().to_vec(), None)
                    .await
            });
        }
        while let Some(r) = calls.join_next().await {
            r.unwrap().unwrap();
        }
        let (kvs, rev) = client.range("k").await.unwrap();
        assert_eq!((kvs.len(), rev), (200, 200));
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn dropped_watch_is_cancelled_on_the_server() {
        let mem = MemStore::open(None, "").unwrap();
        let (addr, stop, task) = server(Arc::new(mem)).await;
        let client = RemoteStore::connect(addr);
        let w = client.watch("", 0).await.unwrap();
        drop(w);
        // The next event finds the receiver gone; the client cancels the server's watch.
        client.put("k", vec![], None).await.unwrap();
        client.put("k", vec![], None).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let slots = {
                    let c = client.conn.lock().await;
                    c.as_ref().map(|c| lock(&c.shared.slots).map.len())
                };
                if slots == Some(0) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        stop.cancel();
        task.await.unwrap();
    }

    proptest! {
        // Whatever a client sends, the server's decoder returns a message, asks for more or
        // errors; it never panics. Same for what a client decodes.
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let dec = FrameDecoder::new(1024);
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = decode_request(&dec, &mut buf) {}
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = decode_server_msg(&dec, &mut buf) {}
        }

        // A valid frame header around arbitrary bytes: still no panic.
        #[test]
        fn framed_garbage_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut wire = (body.len() as u32).to_le_bytes().to_vec();
            wire.push(shoal_protocol::PROTOCOL_VERSION);
            wire.extend_from_slice(&body);
            let dec = FrameDecoder::new(MAX_REQUEST_FRAME);
            let _ = decode_request(&dec, &mut BytesMut::from(&wire[..]));
            let _ = decode_server_msg(&dec, &mut BytesMut::from(&wire[..]));
        }

        #[test]
        fn requests_round_trip(id in any::<u32>(), key in "[a-z/]{1,20}", value in proptest::collection::vec(any::<u8>(), 0..64)) {
            let msg = ClientMsg { id, req: Req::Put { key, value, lease: Some(7) } };
            let mut wire = Vec::new();
            encode_frame(&msg, &mut wire).unwrap();
            let dec = FrameDecoder::new(MAX_REQUEST_FRAME);
            prop_assert_eq!(decode_request(&dec, &mut BytesMut::from(&wire[..])).unwrap(), Some(msg));
        }
    }
}
