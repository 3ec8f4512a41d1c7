//! One client connection: the client's hello (its token, if any), who it is (uid or token,
//! see [`crate::tenancy`]), our hello with the arena fds, then a request loop in which every
//! request is checked against the caller's role and qualified with its tenant.
//!
//! The client speaks first: one [`ClientHello`] frame (at most [`MAX_CLIENT_HELLO`] bytes,
//! within [`HELLO_TIMEOUT`]), then nothing until it has read our [`Hello`]. A connection that
//! breaks this, or whose credential is refused, gets a `Refused` frame and is closed. A
//! connection made with a token is closed within a second of the token's revocation.
//!
//! The loop owns the socket. Requests that complete at once are answered inline, in order;
//! a get that must wait for an unsealed object runs as a child task whose reply comes back
//! through a bounded channel. When the connection ends for any reason (EOF, SIGKILL of the
//! client, a malformed frame, shutdown), every pin and unsealed buffer of the client is
//! released before the task returns.
use crate::local::{GetMode, GetOutcome};
use crate::ops;
use crate::ring::RingClient;
use crate::tenancy::{self, Caller};
use crate::worker::Worker;
use bytes::BytesMut;
use shoal_protocol::{
    encode_frame, ClientFrame, ClientHello, ErrorCode, FrameDecoder, Request, Response,
    ServerFrame, WireError, MAX_CLIENT_HELLO,
};
use shoal_shm::Mailbox;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed frame: {0}")]
    Frame(#[from] shoal_protocol::FrameError),
    #[error("passing the arena: {0}")]
    FdPass(#[from] shoal_shm::ShmError),
}

fn encode(frame: &ServerFrame, out: &mut Vec<u8>) {
    // Encoding our own reply types into a Vec cannot fail.
    if let Err(e) = encode_frame(frame, out) {
        tracing::error!(error = %e, "encoding a reply failed");
    }
}

/// How long a new client has to send its [`ClientHello`].
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the token of a connection made with one is checked again.
const RECHECK: Duration = Duration::from_secs(1);

/// Reads the client's first frame.
async fn read_client_hello(stream: &mut UnixStream) -> Result<ClientHello, WireError> {
    let bad = |m: String| WireError::new(ErrorCode::ProtocolError, m);
    let decoder = FrameDecoder::new(MAX_CLIENT_HELLO);
    let mut buf = BytesMut::with_capacity(256);
    loop {
        if let Some(h) = decoder
            .decode::<ClientHello>(&mut buf)
            .map_err(|e| bad(format!("the first frame must be a ClientHello: {e}")))?
        {
            if !buf.is_empty() {
                return Err(bad("bytes after the ClientHello, before the Hello".into()));
            }
            return Ok(h);
        }
        let n = stream
            .read_buf(&mut buf)
            .await
            .map_err(|e| bad(e.to_string()))?;
        if n == 0 {
            return Err(bad("closed before its ClientHello".into()));
        }
    }
}

/// Refuses a connection with a typed error, then closes it.
async fn refuse(mut stream: UnixStream, err: WireError) {
    let mut out = Vec::new();
    encode(&ServerFrame::Refused(err), &mut out);
    let _ = stream.write_all(&out).await;
    let _ = stream.shutdown().await;
}

pub(crate) async fn serve(
    worker: Arc<Worker>,
    mut stream: UnixStream,
    client: u64,
    shutdown: CancellationToken,
) {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(client, error = %e, "no peer credentials; closing");
            return;
        }
    };
    let hello = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = tokio::time::timeout(HELLO_TIMEOUT, read_client_hello(&mut stream)) => r,
    };
    let admitted = match hello {
        Ok(Ok(h)) => worker.auth.admit(cred.uid(), h).await,
        Ok(Err(e)) => Err(e),
        Err(_) => Err(WireError::new(
            ErrorCode::ProtocolError,
            format!("no ClientHello within {HELLO_TIMEOUT:?}"),
        )),
    };
    let caller = match admitted {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::warn!(client, uid = cred.uid(), pid = ?cred.pid(), error = %e, "client refused");
            metrics::counter!("shoal_refused_clients_total").increment(1);
            refuse(stream, e).await;
            return;
        }
    };
    let region = match worker.local.client_joined() {
        Ok(r) => r,
        Err(e) => {
            refuse(stream, e).await;
            return;
        }
    };
    tracing::debug!(client, pid = ?cred.pid(), tenant = %caller.tenant, ?region, "client connected");
    let mut sock = stream;
    let mailbox = if worker.local.cfg.mailbox {
        match Mailbox::create(worker.local.cfg.max_frame() as u64) {
            Ok(m) => {
                let rc = RingClient::new(client, m, caller.clone());
                worker.ring.add(rc.clone());
                Some(rc)
            }
            Err(e) => {
                tracing::warn!(client, error = %e, "no mailbox for this client; socket only");
                None
            }
        }
    } else {
        None
    };
    let session = Session {
        client,
        region,
        mailbox: mailbox.as_deref(),
        caller: &caller,
    };
    match run(&worker, &mut sock, &session, &shutdown).await {
        Ok(()) => tracing::debug!(client, "client disconnected"),
        Err(e) => tracing::warn!(client, error = %e, "closing connection"),
    }
    if let Some(m) = &mailbox {
        m.close_deferred().await;
    }
    worker.client_left(client, region);
}

/// What the worker gave one connection.
struct Session<'a> {
    client: u64,
    region: Option<u32>,
    mailbox: Option<&'a RingClient>,
    caller: &'a Caller,
}

async fn send_hello(
    worker: &Worker,
    sock: &mut UnixStream,
    s: &Session<'_>,
) -> Result<(), ConnError> {
    let (hello, fds) =
        worker.hello(s.client, s.region, s.mailbox.map(|m| m.mailbox()), s.caller)?;
    let mut out = Vec::new();
    encode(&ServerFrame::Hello(hello), &mut out);
    // A fresh socket has room for a small hello; the fds ride on its first byte.
    send_with_fds(sock, &out, &fds).await?;
    Ok(())
}

/// Encodes a reply, collecting the fds of its segment views (see `Local::attach_fds`).
fn reply(
    worker: &Worker,
    client: u64,
    id: u32,
    mut resp: Response,
    out: &mut Vec<u8>,
    fds: &mut Vec<OwnedFd>,
) {
    fds.extend(worker.local.attach_fds(client, &mut resp));
    encode(&ServerFrame::Reply { id, resp }, out);
}

async fn run(
    worker: &Arc<Worker>,
    sock: &mut UnixStream,
    session: &Session<'_>,
    shutdown: &CancellationToken,
) -> Result<(), ConnError> {
    let client = session.client;
    send_hello(worker, sock, session).await?;
    let decoder = FrameDecoder::new(worker.local.cfg.max_frame());
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    let mut out = Vec::with_capacity(64 << 10);
    let mut fds = Vec::new();
    let (tx, mut deferred) = mpsc::channel::<(u32, Response)>(64);
    let mut waiting = JoinSet::new();
    let mut recheck = tokio::time::interval(RECHECK);
    let caller = session.caller;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = recheck.tick(), if caller.token.is_some() => {
                let token = caller.token.as_deref().unwrap_or_default();
                if !worker.auth.still_valid(token, &caller.principal) {
                    tracing::info!(client, tenant = %caller.tenant, "token revoked or expired; closing");
                    break;
                }
                continue;
            }
            Some((id, resp)) = deferred.recv() => {
                reply(worker, client, id, resp, &mut out, &mut fds);
            }
            Some(_) = waiting.join_next(), if !waiting.is_empty() => continue,
            n = read_some(sock, &mut rbuf) => {
                if n? == 0 {
                    break;
                }
                while let Some(frame) = decoder.decode::<ClientFrame>(&mut rbuf)? {
                    let op = op_name(&frame.req);
                    let started = Instant::now();
                    metrics::counter!("shoal_requests_total", "op" => op).increment(1);
                    let one_way = frame.req.is_one_way();
                    let req = match tenancy::qualify(frame.req, caller) {
                        Ok(r) => r,
                        Err(e) if one_way => {
                            tracing::debug!(client, error = %e, "one-way request refused");
                            if let Some(m) = session.mailbox {
                                m.oneway_done();
                            }
                            continue;
                        }
                        Err(e) => {
                            encode(&ServerFrame::Reply { id: frame.id, resp: Response::Error(e) }, &mut out);
                            continue;
                        }
                    };
                    if ops::is_deferred(worker, &req) {
                        // A get of objects sealed here answers inline; the rest waits in a task.
                        let now = match &req {
                            Request::Get { ids, timeout_ms } => match worker.local.try_get(client, ids, get_mode(worker, *timeout_ms)) {
                                GetOutcome::Done(resp) => Some(resp),
                                GetOutcome::Wait(_) => None,
                            },
                            _ => None,
                        };
                        match now {
                            Some(resp) => reply(worker, client, frame.id, resp, &mut out, &mut fds),
                            None if waiting.len() < worker.local.cfg.max_waiting_gets => {
                                let (worker, tx, id) = (worker.clone(), tx.clone(), frame.id);
                                waiting.spawn(async move {
                                    let resp = ops::run(worker, client, req).await;
                                    // If the connection is gone its pins were released by client_left.
                                    let _ = tx.send((id, resp)).await;
                                });
                            }
                            None => {
                                let resp = Response::error(ErrorCode::Overloaded, "too many waiting requests on this connection");
                                encode(&ServerFrame::Reply { id: frame.id, resp }, &mut out);
                            }
                        }
                    } else {
                        let resp = worker.handle(client, req);
                        if !one_way {
                            reply(worker, client, frame.id, resp, &mut out, &mut fds);
                        } else if let Some(m) = session.mailbox {
                            m.oneway_done();
                        }
                    }
                    metrics::histogram!("shoal_request_seconds", "op" => op).record(started.elapsed().as_secs_f64());
                }
            }
        }
        if !out.is_empty() {
            send_with_fds(sock, &out, &fds).await?;
            out.clear();
            fds.clear();
        }
    }
    waiting.shutdown().await;
    Ok(())
}

/// Room the read buffer keeps for one read.
const READ_CHUNK: usize = 64 << 10;

/// Reads what the socket has into `buf`; 0 at EOF. Cancel-safe (a `select!` branch).
///
/// The socket is tokio's own `UnixStream`, which owns its fd and deregisters it before
/// closing it, so no readiness registration can outlive the fd or land on a reused number.
/// It also keeps the round-trip saving this path depends on: after a read that did not fill
/// the buffer, tokio clears the read readiness itself, so the `read` that would only return
/// `EAGAIN` is never made (data that arrives meanwhile still wakes us: readiness is cleared
/// only if no new event came since the read started).
async fn read_some(sock: &mut UnixStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < READ_CHUNK / 2 {
        buf.reserve(READ_CHUNK);
    }
    sock.read_buf(buf).await
}

/// Sends `data` with `fds` attached to its first bytes (at most the kernel's limit per
/// message, so a long list rides on several of the first bytes, in order), then the rest.
async fn send_with_fds(
    sock: &mut UnixStream,
    mut data: &[u8],
    fds: &[OwnedFd],
) -> Result<(), ConnError> {
    let mut fds: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    while !fds.is_empty() && !data.is_empty() {
        let n = fds.len().min(shoal_shm::MAX_FDS_PER_MESSAGE);
        // The last batch takes the rest of the bytes; earlier ones one byte each.
        let len = if n == fds.len() { data.len() } else { 1 };
        let send = || {
            shoal_shm::send_with_fds(sock.as_fd(), &data[..len], &fds[..n]).map_err(|e| match e {
                shoal_shm::ShmError::FdPass(errno) => std::io::Error::from(errno),
                e => std::io::Error::other(e),
            })
        };
        let sent = loop {
            // Try first: the socket almost always has room. `try_io` clears the write
            // readiness on `WouldBlock`, so the wait below is for real room.
            match sock.try_io(Interest::WRITABLE, send) {
                Ok(sent) => break sent,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => sock.writable().await?,
                Err(e) => return Err(e.into()),
            }
        };
        fds.drain(..n);
        data = &data[sent..];
    }
    sock.write_all(data).await?;
    Ok(())
}

/// How to look a get up inline: without a cluster, a zero timeout means "answer now".
fn get_mode(worker: &Worker, timeout_ms: u64) -> GetMode {
    if timeout_ms == 0 && !worker.in_cluster() {
        GetMode::NoWait
    } else {
        GetMode::Wait
    }
}

pub(crate) fn op_name(r: &Request) -> &'static str {
    match r {
        Request::Create { .. } => "create",
        Request::Seal { .. } => "seal",
        Request::Abort { .. } => "abort",
        Request::Put { .. } => "put",
        Request::Get { .. } => "get",
        Request::Release { .. } => "release",
        Request::Delete { .. } => "delete",
        Request::Contains { .. } => "contains",
        Request::List { .. } => "list",
        Request::KvSet { .. } => "kv_set",
        Request::KvCreate { .. } => "kv_create",
        Request::KvCommit { .. } => "kv_commit",
        Request::KvMSet { .. } => "kv_mset",
        Request::KvGet { .. } => "kv_get",
        Request::KvRead { .. } => "kv_read",
        Request::KvDel { .. } => "kv_del",
        Request::KvExists { .. } => "kv_exists",
        Request::KvExpire { .. } => "kv_expire",
        Request::KvTtl { .. } => "kv_ttl",
        Request::Status => "status",
    }
}
