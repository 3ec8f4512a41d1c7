//! The two IO engines. Each runs on its own thread with its own runtime and drives the same
//! [`Shared`] state; they differ only in how bytes move:
//!
//! - `Tokio`: a multi-thread tokio runtime, `tokio::net::UnixListener`, split streams.
//! - `Uring`: a `tokio_uring` runtime (one thread), `tokio_uring::net` sockets and owned
//!   buffers that stay with the kernel across each `.await`.
//!
//! Each connection is one task joining a reader and a writer. The reader feeds bytes to
//! [`Shared::on_bytes`]; the writer drains the connection's outbound queue. The writer ends
//! when the queue is dropped (connection closed, refused or proxy shutdown) or the socket
//! fails, and then cancels the reader. Shutdown: stop accepting, fail all calls with
//! `Unavailable`, drop all queues, wait for every connection task and the timer.
use crate::access::PeerCred;
use crate::peer::{self, PeerSetup};
use crate::shared::{Conn, ConnError, ConnState, Phase, Shared};
use crate::StartError;
use bytes::BytesMut;
use shoal_protocol::{encode_frame, ProxyFrame};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const READ_CHUNK: usize = 64 * 1024;
/// Frames encoded into one write at most.
const WRITE_BATCH: usize = 64;

/// A running engine thread.
#[derive(Debug)]
pub(crate) struct EngineThread {
    pub(crate) stop: CancellationToken,
    pub(crate) done: oneshot::Receiver<()>,
    pub(crate) thread: std::thread::JoinHandle<()>,
}

fn encode_batch(first: ProxyFrame, rx: &mut mpsc::Receiver<ProxyFrame>, out: &mut Vec<u8>) {
    out.clear();
    let mut next = Some(first);
    let mut n = 0;
    while let Some(f) = next {
        if let Err(e) = encode_frame(&f, out) {
            tracing::error!(error = %e, "encoding a frame failed");
        }
        n += 1;
        next = if n < WRITE_BATCH {
            rx.try_recv().ok()
        } else {
            None
        };
    }
}

fn log_end(conn: u64, r: Result<(), ConnError>) {
    match r {
        Ok(()) => tracing::debug!(conn, "connection closed"),
        // A peer proxy that goes away without a TLS close_notify: an ordinary end.
        Err(ConnError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            tracing::debug!(conn, error = %e, "connection closed")
        }
        Err(e) => tracing::warn!(conn, error = %e, "closing connection"),
    }
}

/// Runs the accept loop and timer until `stop`, then shuts the state down and waits.
async fn lifecycle<A>(shared: Arc<Shared>, tracker: TaskTracker, accept: A)
where
    A: std::future::Future<Output = ()>,
{
    accept.await;
    shared.shutdown_calls();
    tracker.close();
    tracker.wait().await;
}

// ---------------------------------------------------------------- tokio

pub(crate) fn start_tokio(
    shared: Arc<Shared>,
    listener: std::os::unix::net::UnixListener,
    peer: Option<PeerSetup>,
) -> Result<EngineThread, StartError> {
    listener
        .set_nonblocking(true)
        .map_err(StartError::Runtime)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("shoal-proxy")
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    let stop = CancellationToken::new();
    let (done_tx, done) = oneshot::channel();
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("shoal-proxy-tokio".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::UnixListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot register the listener");
                        return;
                    }
                };
                let tracker = TaskTracker::new();
                {
                    let s = shared.clone();
                    let st = stop2.clone();
                    tracker.spawn(async move { s.timer_loop(st).await });
                }
                if let Some(meta) = shared.cfg.meta.clone() {
                    tracker.spawn(shared.access.clone().follow(meta, stop2.clone()));
                }
                if let Some(p) = peer {
                    tracker.spawn(peer::run(shared.clone(), p, stop2.clone(), tracker.clone()));
                }
                let accept = async {
                    loop {
                        tokio::select! {
                            _ = stop2.cancelled() => break,
                            r = listener.accept() => match r {
                                Ok((stream, _)) => match peer_cred(&stream) {
                                    Some(cred) => {
                                        tracker.spawn(serve_stream(shared.clone(), stream, ConnState::local(cred)));
                                    }
                                    None => drop(stream),
                                },
                                Err(e) => {
                                    tracing::warn!(error = %e, "accept failed");
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                }
                            }
                        }
                    }
                };
                lifecycle(shared.clone(), tracker.clone(), accept).await;
            });
            rt.shutdown_timeout(Duration::from_secs(1));
            let _ = done_tx.send(());
        })
        .map_err(StartError::Thread)?;
    Ok(EngineThread { stop, done, thread })
}

/// The uid of a local peer; `None` (the connection is dropped) if the kernel cannot say.
fn peer_cred(stream: &tokio::net::UnixStream) -> Option<PeerCred> {
    match stream.peer_cred() {
        Ok(c) => Some(PeerCred { uid: c.uid() }),
        Err(e) => {
            tracing::warn!(error = %e, "no peer credentials; closing");
            None
        }
    }
}

/// Serves one connection on a tokio stream (a Unix socket, or a peer proxy's TLS stream),
/// starting in `state`.
pub(crate) async fn serve_stream<S>(shared: Arc<Shared>, stream: S, state: ConnState)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Conn {
        id,
        mut rx,
        admitted,
    } = shared.open_conn();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let closed = CancellationToken::new();
    let writer = async {
        let mut out = Vec::new();
        while let Some(f) = rx.recv().await {
            encode_batch(f, &mut rx, &mut out);
            if let Err(e) = wr.write_all(&out).await {
                tracing::debug!(conn = id, error = %e, "write failed");
                break;
            }
        }
        let _ = wr.shutdown().await;
        closed.cancel();
    };
    let reader = async {
        if !admitted {
            return;
        }
        let decoder = shared.decoder();
        let mut state = state;
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let r: Result<(), ConnError> = async {
            loop {
                buf.reserve(READ_CHUNK);
                tokio::select! {
                    _ = closed.cancelled() => return Ok(()),
                    n = rd.read_buf(&mut buf) => {
                        if n? == 0 {
                            return Ok(());
                        }
                        if state.phase == Phase::Hello {
                            shared.before_hello(&decoder, &buf).await;
                        }
                        shared.on_bytes(id, &mut state, &decoder, &mut buf)?;
                    }
                }
            }
        }
        .await;
        log_end(id, r);
        shared.close_conn(id, admitted);
    };
    tokio::join!(reader, writer);
}

// ---------------------------------------------------------------- io_uring

/// Starts the io_uring engine thread; fails with [`StartError::Uring`] when the runtime
/// cannot be created (the probe `Auto` relies on).
///
/// Connections are accepted by readiness (`tokio::net::UnixListener`, inside the uring
/// runtime) because tokio-uring 0.5's own `UnixListener::bind` sets `SO_REUSEPORT`, which
/// Unix sockets refuse; every read and write on an accepted connection goes through io_uring.
pub(crate) fn start_uring(
    shared: Arc<Shared>,
    listener: std::os::unix::net::UnixListener,
    peer: Option<PeerSetup>,
) -> Result<EngineThread, StartError> {
    listener
        .set_nonblocking(true)
        .map_err(StartError::Runtime)?;
    let stop = CancellationToken::new();
    let (done_tx, done) = oneshot::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), StartError>>();
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("shoal-proxy-uring".into())
        .spawn(move || {
            let rt = match tokio_uring::Runtime::new(&tokio_uring::builder()) {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(StartError::Uring(e)));
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::UnixListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(StartError::Runtime(e)));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let tracker = TaskTracker::new();
                {
                    let s = shared.clone();
                    let st = stop2.clone();
                    tokio_uring::spawn(tracker.track_future(async move { s.timer_loop(st).await }));
                }
                if let Some(meta) = shared.cfg.meta.clone() {
                    let follow = shared.access.clone().follow(meta, stop2.clone());
                    tokio_uring::spawn(tracker.track_future(follow));
                }
                if let Some(p) = peer {
                    // Peer connections are TLS streams on tokio sockets, inside this runtime.
                    let run = peer::run(shared.clone(), p, stop2.clone(), tracker.clone());
                    tokio_uring::spawn(tracker.track_future(run));
                }
                let accept = async {
                    loop {
                        tokio::select! {
                            _ = stop2.cancelled() => break,
                            r = listener.accept() => match r.and_then(|(s, _)| {
                                let cred = peer_cred(&s);
                                s.into_std().map(|s| (s, cred))
                            }) {
                                Ok((stream, Some(cred))) => {
                                    let stream = tokio_uring::net::UnixStream::from_std(stream);
                                    tokio_uring::spawn(tracker.track_future(uring_conn(shared.clone(), stream, cred)));
                                }
                                Ok((_, None)) => {}
                                Err(e) => {
                                    tracing::warn!(error = %e, "accept failed");
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                }
                            }
                        }
                    }
                };
                lifecycle(shared.clone(), tracker.clone(), accept).await;
            });
            drop(rt);
            let _ = done_tx.send(());
        })
        .map_err(StartError::Thread)?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(EngineThread { stop, done, thread }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(StartError::Uring(std::io::Error::other(
                "the io_uring thread exited during start",
            )))
        }
    }
}

async fn uring_conn(shared: Arc<Shared>, stream: tokio_uring::net::UnixStream, cred: PeerCred) {
    let stream = Rc::new(stream);
    let Conn {
        id,
        mut rx,
        admitted,
    } = shared.open_conn();
    let closed = CancellationToken::new();
    let writer = {
        let stream = stream.clone();
        let closed = closed.clone();
        async move {
            // Owned buffer: handed to the kernel for each write and returned after.
            let mut out = Vec::new();
            while let Some(f) = rx.recv().await {
                encode_batch(f, &mut rx, &mut out);
                let (r, back) = stream.write_all(out).await;
                out = back;
                if let Err(e) = r {
                    tracing::debug!(conn = id, error = %e, "write failed");
                    break;
                }
            }
            let _ = stream.shutdown(std::net::Shutdown::Write);
            closed.cancel();
        }
    };
    let reader = async {
        if !admitted {
            return;
        }
        let decoder = shared.decoder();
        let mut state = ConnState::local(cred);
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let mut chunk = vec![0u8; READ_CHUNK];
        let r: Result<(), ConnError> = async {
            loop {
                // If `closed` wins, the read is dropped; tokio-uring keeps the buffer alive
                // until the kernel completes the operation.
                let (n, back) = tokio::select! {
                    _ = closed.cancelled() => return Ok(()),
                    r = stream.read(chunk) => r,
                };
                chunk = back;
                let n = n?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
                if state.phase == Phase::Hello {
                    shared.before_hello(&decoder, &buf).await;
                }
                shared.on_bytes(id, &mut state, &decoder, &mut buf)?;
            }
        }
        .await;
        log_end(id, r);
        shared.close_conn(id, admitted);
    };
    tokio::join!(reader, writer);
}
