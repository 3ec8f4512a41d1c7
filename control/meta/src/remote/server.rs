//! [`serve`]: control's side of the remote store. One task per connection, all owned by
//! [`serve`], which waits for them at shutdown. A connection holds one of [`MAX_CONNECTIONS`]
//! slots from the moment it is accepted, through its TLS handshake (at most
//! [`HANDSHAKE_TIMEOUT`]) until it closes; per connection at most [`MAX_INFLIGHT`] requests
//! run at once (reading stops beyond that), replies and events wait in a queue of
//! [`OUT_QUEUE`], and a malformed or oversized frame closes that connection only. Nothing is
//! read as a request before the client has presented a certificate signed by the cluster CA.
use super::wire::{
    decode_request, encode_server_msg, ClientMsg, Req, Resp, ServerMsg, WireMetaError,
};
use super::{
    lock, HANDSHAKE_TIMEOUT, MAX_CONNECTIONS, MAX_INFLIGHT, MAX_REQUEST_FRAME, MAX_WATCHES,
    OUT_QUEUE, WRITE_BATCH,
};
use crate::types::{MetaError, MetaStore, Revision};
use bytes::BytesMut;
use shoal_pki::ControlTls;
use shoal_protocol::FrameDecoder;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[cfg(doc)]
use super::RemoteStore;

/// Serves `store` to [`RemoteStore`] clients on `listener` until `shutdown` is cancelled;
/// then closes every connection and returns once their tasks have ended.
///
/// Every connection is mutual TLS with control's identity `tls`: a client that presents no
/// certificate, or one the cluster CA did not sign, is refused before any request is read, and
/// one that does not finish its handshake within 5 s is dropped (it holds one of the 1024
/// connection slots until then).
pub async fn serve(
    store: Arc<dyn MetaStore>,
    listener: TcpListener,
    tls: ControlTls,
    shutdown: CancellationToken,
) {
    serve_with(store, listener, tls, shutdown, Limits::default()).await
}

/// The server's limits; tests shrink them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// Connections held at once, handshakes included.
    pub(super) max_connections: usize,
    /// Longest a TLS handshake may take.
    pub(super) handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: MAX_CONNECTIONS,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        }
    }
}

pub(super) async fn serve_with(
    store: Arc<dyn MetaStore>,
    listener: TcpListener,
    tls: ControlTls,
    shutdown: CancellationToken,
    limits: Limits,
) {
    let acceptor = TlsAcceptor::from(tls.server_config());
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
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
                let acceptor = acceptor.clone();
                // The permit is held through the handshake: a client that connects and says
                // nothing occupies a slot for at most the handshake timeout.
                tracker.spawn(async move {
                    let handshake = tokio::time::timeout(
                        limits.handshake_timeout,
                        acceptor.accept(stream),
                    );
                    let accepted = tokio::select! {
                        _ = token.cancelled() => None,
                        r = handshake => match r {
                            Ok(Ok(tls)) => Some(tls),
                            Ok(Err(e)) => {
                                tracing::warn!(%peer, error = %e, "metadata client refused: TLS handshake failed");
                                None
                            }
                            Err(_) => {
                                tracing::warn!(%peer, timeout = ?limits.handshake_timeout, "metadata client dropped: no TLS handshake in time");
                                None
                            }
                        },
                    };
                    if let Some(tls) = accepted {
                        serve_conn(store, tls, peer, token).await;
                    }
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

async fn serve_conn(
    store: Arc<dyn MetaStore>,
    stream: TlsStream<TcpStream>,
    peer: SocketAddr,
    token: CancellationToken,
) {
    let (mut rd, wr) = tokio::io::split(stream);
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

/// Runs one call on `store` (every request but the watches).
pub async fn run(store: &dyn MetaStore, req: Req) -> Result<Resp, MetaError> {
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

async fn server_write(
    mut wr: WriteHalf<TlsStream<TcpStream>>,
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
            r = write_flush(&mut wr, &buf) => r,
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

/// Writes `buf` and flushes it: TLS may hold encrypted records back until flushed.
pub(super) async fn write_flush<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    buf: &[u8],
) -> std::io::Result<()> {
    wr.write_all(buf).await?;
    wr.flush().await
}
