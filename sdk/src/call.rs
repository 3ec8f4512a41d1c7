//! Function calls through the node's proxy: [`CallClient`] makes calls, [`serve`] (or
//! [`FunctionInstance`]) runs a function instance that answers them.
//!
//! ```no_run
//! # async fn demo() -> Result<(), shoal_sdk::Error> {
//! use std::time::Duration;
//! let client = shoal_sdk::CallClient::connect("/run/shoal/proxy.sock").await?;
//! let out = client.invoke("echo", b"hi", Duration::from_secs(1)).await?;
//! assert_eq!(out, b"hi");
//! # Ok(()) }
//! ```
//!
//! Arguments and results travel inline only: arguments above the proxy's inline limit fail
//! with `TooLarge` (putting them into the dataworker as objects is not done yet), and so do
//! results above it.
use crate::Error;
use bytes::BytesMut;
use shoal_protocol::{
    encode_frame, CallerFrame, ErrorCode, FrameDecoder, Payload, ProxyFrame, Role, WireError,
    PROTOCOL_VERSION,
};
use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

/// Extra time a caller waits past a call's timeout for the proxy's `Timeout` reply.
const REPLY_GRACE: Duration = Duration::from_secs(1);
/// Encoded frames queued towards the proxy at most (callers wait for room).
const OUTBOUND_FRAMES: usize = 1024;

fn max_frame(inline_limit: u64) -> usize {
    usize::try_from(inline_limit)
        .unwrap_or(usize::MAX / 2)
        .saturating_add(64 * 1024)
        .max(1 << 20)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn encode(frame: &CallerFrame) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    encode_frame(frame, &mut out).map_err(|e| Error::protocol(format!("encoding: {e}")))?;
    Ok(out)
}

fn closed() -> WireError {
    WireError::new(ErrorCode::Unavailable, "the proxy closed the connection")
}

/// Reads one frame, buffering into `buf`; `Ok(None)` at a clean end of stream.
async fn read_frame(
    stream: &mut UnixStream,
    dec: &FrameDecoder,
    buf: &mut BytesMut,
) -> Result<Option<ProxyFrame>, Error> {
    loop {
        if let Some(f) = dec
            .decode::<ProxyFrame>(buf)
            .map_err(|e| Error::protocol(e.to_string()))?
        {
            return Ok(Some(f));
        }
        if stream.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// Connects and says hello; returns the stream, leftover bytes, node id and inline limit.
async fn handshake(
    proxy_socket: &Path,
    role: Role,
) -> Result<(UnixStream, BytesMut, String, u64), Error> {
    let mut stream = UnixStream::connect(proxy_socket).await?;
    let hello = encode(&CallerFrame::Hello {
        version: PROTOCOL_VERSION,
        role,
    })?;
    stream.write_all(&hello).await?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    match read_frame(&mut stream, &FrameDecoder::new(1 << 20), &mut buf).await? {
        Some(ProxyFrame::Welcome {
            node_id,
            inline_limit,
        }) => Ok((stream, buf, node_id, inline_limit)),
        Some(ProxyFrame::Refused(e)) => Err(Error::Remote(e)),
        Some(_) => Err(Error::protocol("expected Welcome from the proxy")),
        None => Err(Error::Remote(closed())),
    }
}

type Pending = HashMap<u64, oneshot::Sender<Result<Payload, WireError>>>;

#[derive(Debug, Default)]
struct Calls {
    pending: Pending,
    /// Set when the connection ended; no new calls are accepted.
    closed: bool,
}

#[derive(Debug)]
struct ClientInner {
    tx: mpsc::Sender<Vec<u8>>,
    calls: Arc<Mutex<Calls>>,
    next_id: AtomicU64,
    node_id: String,
    inline_limit: u64,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A caller connection to the node's proxy. Cheap to clone; clones share the connection,
/// and many calls may be in flight at once (replies are matched by id). The connection
/// closes when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct CallClient {
    inner: Arc<ClientInner>,
}

/// Removes a call's reply slot if the call is abandoned (timeout or cancellation).
struct PendingGuard<'a> {
    calls: &'a Mutex<Calls>,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(self.calls).pending.remove(&self.id);
    }
}

impl CallClient {
    /// Connects to the proxy at `proxy_socket` as a caller.
    pub async fn connect(proxy_socket: impl AsRef<Path>) -> Result<CallClient, Error> {
        let (stream, mut buf, node_id, inline_limit) =
            handshake(proxy_socket.as_ref(), Role::Caller).await?;
        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(OUTBOUND_FRAMES);
        let calls = Arc::new(Mutex::new(Calls::default()));
        let writer = tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                if wr.write_all(&frame).await.is_err() {
                    break;
                }
            }
        });
        let reader_calls = calls.clone();
        let dec = FrameDecoder::new(max_frame(inline_limit));
        let reader = tokio::spawn(async move {
            loop {
                let frame = match dec.decode::<ProxyFrame>(&mut buf) {
                    Ok(Some(f)) => f,
                    Ok(None) => match rd.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => continue,
                    },
                    Err(_) => break,
                };
                if let ProxyFrame::Reply { id, result } = frame {
                    if let Some(tx) = lock(&reader_calls).pending.remove(&id) {
                        let _ = tx.send(result);
                    }
                }
            }
            let mut c = lock(&reader_calls);
            c.closed = true;
            for (_, tx) in c.pending.drain() {
                let _ = tx.send(Err(closed()));
            }
        });
        Ok(CallClient {
            inner: Arc::new(ClientInner {
                tx,
                calls,
                next_id: AtomicU64::new(1),
                node_id,
                inline_limit,
                tasks: [reader, writer],
            }),
        })
    }

    /// The proxy's node id.
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// Largest argument the proxy takes inline, in bytes.
    pub fn inline_limit(&self) -> u64 {
        self.inner.inline_limit
    }

    /// Calls `function` on any of its instances. Errors carry the proxy's code: `NotFound`
    /// (no instance), `Overloaded` (queue full), `Timeout`, `InstanceFailed`, `TooLarge`,
    /// `Unavailable` (proxy gone), or the handler's error.
    pub async fn invoke(
        &self,
        function: &str,
        args: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, Error> {
        self.call(function, None, args, timeout).await
    }

    /// Like [`CallClient::invoke`], on one named instance.
    pub async fn invoke_instance(
        &self,
        function: &str,
        instance: &str,
        args: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, Error> {
        self.call(function, Some(instance), args, timeout).await
    }

    async fn call(
        &self,
        function: &str,
        instance: Option<&str>,
        args: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, Error> {
        let inner = &*self.inner;
        if args.len() as u64 > inner.inline_limit {
            return Err(Error::Remote(WireError::new(
                ErrorCode::TooLarge,
                format!(
                    "argument of {} bytes exceeds the inline limit of {} (objects are not supported yet)",
                    args.len(),
                    inner.inline_limit
                ),
            )));
        }
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut c = lock(&inner.calls);
            if c.closed {
                return Err(Error::Remote(closed()));
            }
            c.pending.insert(id, tx);
        }
        let _guard = PendingGuard {
            calls: &inner.calls,
            id,
        };
        let frame = encode(&CallerFrame::Call {
            id,
            function: function.to_owned(),
            instance: instance.map(str::to_owned),
            args: Payload::Inline(args.to_vec()),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            trace_id: id,
        })?;
        inner
            .tx
            .send(frame)
            .await
            .map_err(|_| Error::Remote(closed()))?;
        let result = match tokio::time::timeout(timeout.saturating_add(REPLY_GRACE), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(closed()),
            Err(_) => Err(WireError::new(
                ErrorCode::Timeout,
                "no reply from the proxy past the deadline",
            )),
        };
        match result? {
            Payload::Inline(v) => Ok(v),
            Payload::Object(id) => Err(Error::protocol(format!(
                "result is object {id}; object results are not supported yet"
            ))),
        }
    }
}

/// A function instance registered with the proxy, not yet serving. [`FunctionInstance::run`]
/// serves it; calls routed to it before that wait in the socket.
#[derive(Debug)]
pub struct FunctionInstance {
    stream: UnixStream,
    buf: BytesMut,
    node_id: String,
    inline_limit: u64,
}

impl FunctionInstance {
    /// Connects to the proxy and registers `instance_id` as an instance of `function` that
    /// handles `concurrency` calls at once. Once this returns, calls can be routed to it.
    pub async fn register(
        proxy_socket: impl AsRef<Path>,
        function: &str,
        instance_id: &str,
        concurrency: u32,
    ) -> Result<FunctionInstance, Error> {
        let (stream, buf, node_id, inline_limit) = handshake(
            proxy_socket.as_ref(),
            Role::Instance {
                function: function.to_owned(),
                instance_id: instance_id.to_owned(),
                concurrency,
            },
        )
        .await?;
        Ok(FunctionInstance {
            stream,
            buf,
            node_id,
            inline_limit,
        })
    }

    /// The proxy's node id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Serves calls with `handler` until the proxy closes the connection (then `Ok`).
    /// Each call runs as its own task; a handler's `Err(message)` or panic reaches the
    /// caller as an `Internal` error. Dropping the returned future disconnects the instance
    /// and aborts its running handlers.
    pub async fn run<F, Fut>(self, handler: F) -> Result<(), Error>
    where
        F: Fn(Vec<u8>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<u8>, String>> + Send + 'static,
    {
        let FunctionInstance {
            stream,
            mut buf,
            inline_limit,
            ..
        } = self;
        let (mut rd, mut wr) = stream.into_split();
        let dec = FrameDecoder::new(max_frame(inline_limit));
        let handler = Arc::new(handler);
        let mut tasks: JoinSet<Result<Vec<u8>, String>> = JoinSet::new();
        let mut ids: HashMap<tokio::task::Id, u64> = HashMap::new();
        loop {
            while let Some(frame) = dec
                .decode::<ProxyFrame>(&mut buf)
                .map_err(|e| Error::protocol(e.to_string()))?
            {
                match frame {
                    ProxyFrame::Invoke { id, args, .. } => {
                        let h = handler.clone();
                        match args {
                            Payload::Inline(a) => {
                                let t = tasks.spawn(async move { h(a).await });
                                ids.insert(t.id(), id);
                            }
                            Payload::Object(o) => {
                                let e = WireError::new(
                                    ErrorCode::InvalidArgument,
                                    format!("object argument {o} is not supported yet"),
                                );
                                let out = encode(&CallerFrame::Result { id, result: Err(e) })?;
                                wr.write_all(&out).await?;
                            }
                        }
                    }
                    other => {
                        return Err(Error::protocol(format!(
                            "unexpected frame from the proxy: {other:?}"
                        )))
                    }
                }
            }
            tokio::select! {
                n = rd.read_buf(&mut buf) => {
                    if n? == 0 {
                        return Ok(());
                    }
                }
                Some(done) = tasks.join_next_with_id() => {
                    let (task, r) = match done {
                        Ok((task, r)) => (task, r),
                        Err(e) => (e.id(), Err(format!("handler panicked: {e}"))),
                    };
                    let Some(id) = ids.remove(&task) else { continue };
                    let result = match r {
                        Ok(v) if v.len() as u64 > inline_limit => Err(WireError::new(
                            ErrorCode::TooLarge,
                            format!("result of {} bytes exceeds the inline limit of {inline_limit}", v.len()),
                        )),
                        Ok(v) => Ok(Payload::Inline(v)),
                        Err(msg) => Err(WireError::new(ErrorCode::Internal, msg)),
                    };
                    let out = encode(&CallerFrame::Result { id, result })?;
                    wr.write_all(&out).await?;
                }
            }
        }
    }
}

/// Registers a function instance with the proxy at `proxy_socket` and serves calls with
/// `handler` (at most `concurrency` at once) until the proxy closes the connection.
pub async fn serve<F, Fut>(
    proxy_socket: impl AsRef<Path>,
    function: &str,
    instance_id: &str,
    concurrency: u32,
    handler: F,
) -> Result<(), Error>
where
    F: Fn(Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<u8>, String>> + Send + 'static,
{
    FunctionInstance::register(proxy_socket, function, instance_id, concurrency)
        .await?
        .run(handler)
        .await
}
