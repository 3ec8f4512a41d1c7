//! [`RemoteStore`]: a node's client of a store served by control ([`serve`]). One lazily made
//! mutual-TLS connection (the node's certificate; control verified against the cluster CA by
//! the name [`CONTROL_SERVER_NAME`]), shared by every call (each with its own id) and watch; its
//! reader and writer tasks stop when the store is dropped or closed. A broken connection fails
//! the calls in flight with `Unavailable` and ends the watches; the next call connects and
//! handshakes again. A watch whose [`WATCH_QUEUE`] fills is ended, not buffered.
use super::wire::{decode_server_msg, ClientMsg, Req, Resp, ServerMsg, WireMetaError};
use super::{
    lock, CALL_TIMEOUT, CONNECT_TIMEOUT, MAX_REPLY_FRAME, MAX_REQUEST_FRAME, OUT_QUEUE,
    WATCH_QUEUE, WRITE_BATCH,
};
use crate::keys::Namespace;
use crate::types::{
    KeyValue, LeaseId, MetaError, MetaStore, Revision, Txn, WatchEvent, WatchStream,
};
use bytes::BytesMut;
use rustls::pki_types::ServerName;
use shoal_pki::{NodeTls, PkiError, CONTROL_SERVER_NAME};
use shoal_protocol::{encode_frame, FrameDecoder, FRAME_HEADER_LEN};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

#[cfg(doc)]
use super::serve;

/// A [`MetaStore`] served by another process ([`serve`]), over mutual TLS. Connects lazily on
/// the first call; when the connection breaks, calls in flight fail with `Unavailable`,
/// watches end, and the next call connects (and handshakes) again.
pub struct RemoteStore {
    addr: SocketAddr,
    tls: TlsConnector,
    /// [`CONTROL_SERVER_NAME`], which control's certificate must carry.
    server_name: ServerName<'static>,
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
    /// A client of the server at `addr`, authenticated as the node `tls` holds the certificate
    /// of; it accepts only a server whose certificate the same cluster CA issued for
    /// [`CONTROL_SERVER_NAME`]. Nothing happens on the network until the first call. Fails only
    /// if rustls refuses to build a client configuration from `tls`.
    pub fn connect(addr: SocketAddr, tls: &NodeTls) -> Result<RemoteStore, PkiError> {
        let server_name =
            ServerName::try_from(CONTROL_SERVER_NAME).map_err(|e| PkiError::Config {
                side: "client",
                reason: format!("{CONTROL_SERVER_NAME:?}: {e}"),
            })?;
        Ok(RemoteStore {
            addr,
            tls: TlsConnector::from(tls.client_config()?),
            server_name,
            ns: Namespace::new(""),
            conn: tokio::sync::Mutex::new(None),
        })
    }

    /// Keeps this client's keys under `prefix` (within the served store's own prefix).
    pub fn with_prefix(self, prefix: &str) -> RemoteStore {
        RemoteStore {
            addr: self.addr,
            tls: self.tls,
            server_name: self.server_name,
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
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, self.open())
            .await
            .map_err(|_| {
                MetaError::Unavailable(format!(
                    "connecting to metadata server {}: no answer within {CONNECT_TIMEOUT:?}",
                    self.addr
                ))
            })??;
        let conn = Arc::new(Conn::start(stream, self.addr, self.ns.clone()));
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// TCP connect and TLS handshake. With TLS 1.3 a server that refuses this node's
    /// certificate says so after the client's handshake is done: the connection then breaks
    /// at the first read, and the call fails as `Unavailable` like any lost connection.
    async fn open(&self) -> Result<TlsStream<TcpStream>, MetaError> {
        let tcp = TcpStream::connect(self.addr).await.map_err(|e| {
            MetaError::Unavailable(format!("connecting to metadata server {}: {e}", self.addr))
        })?;
        let _ = tcp.set_nodelay(true);
        self.tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| {
                MetaError::Unavailable(format!(
                    "TLS handshake with metadata server {}: {e}",
                    self.addr
                ))
            })
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
    fn start(stream: TlsStream<TcpStream>, addr: SocketAddr, ns: Namespace) -> Conn {
        let (rd, wr) = tokio::io::split(stream);
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
    mut wr: WriteHalf<TlsStream<TcpStream>>,
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
            r = super::server::write_flush(&mut wr, &buf) => r,
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
    mut rd: ReadHalf<TlsStream<TcpStream>>,
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
impl RemoteStore {
    /// Requests and watches in flight on the current connection (`None`: not connected).
    pub(super) async fn open_slots(&self) -> Option<usize> {
        let c = self.conn.lock().await;
        c.as_ref().map(|c| lock(&c.shared.slots).map.len())
    }
}
