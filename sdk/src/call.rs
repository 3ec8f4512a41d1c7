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
//! Arguments and results up to the proxy's inline limit travel in the call itself; larger ones
//! travel as objects in the dataworker, named by id, when the caller (or the instance) has a
//! dataworker [`Client`] ([`CallClient::connect_with_store`], [`FunctionInstance::with_store`]).
//! The side that creates such an object for a call deletes it once the call is answered (the
//! caller its argument; the caller, after reading it, the instance's result). Without a
//! client, payloads above the limit fail with `TooLarge`. A handler that takes [`Data`] sees an
//! object argument as a zero-copy [`View`], on whichever node the object lives (another node's
//! object is pulled once).
//!
//! Calls to instances on the caller's own node take a call lane when the instance offers one
//! (see the `lane` module): shared memory between caller and instance, with the proxy only
//! telling the caller where the lanes are. [`CallOptions::lanes`] turns that off.
use crate::lane::{
    run_holding, Admission, CallFn, CallerLane, LaneListener, LaneOutcome, LaneServer, LaneSet,
};
use crate::{Client, Error, View};
use bytes::BytesMut;
use shoal_protocol::{
    encode_frame, CallerFrame, ErrorCode, FrameDecoder, LaneInfo, Payload, ProxyFrame, Role,
    WireError, PROTOCOL_VERSION,
};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
/// How long a caller trusts what the proxy said about a function's lanes.
const LANE_REFRESH: Duration = Duration::from_secs(1);
/// ... when it said there were none (an instance starting up announces its lane a moment
/// after it registers).
const NO_LANE_REFRESH: Duration = Duration::from_millis(100);
/// Longest wait for the proxy's answer about lanes (then: no lanes, for now).
const LANE_QUERY_TIMEOUT: Duration = Duration::from_secs(1);

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

/// An argument or a result: bytes, or a zero-copy view of an object in the dataworker.
#[derive(Debug)]
pub enum Data {
    /// Bytes that travelled inline.
    Bytes(Vec<u8>),
    /// An object's bytes, mapped from shared memory.
    Object(View),
}

impl Data {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Data::Bytes(b) => b,
            Data::Object(v) => v.as_bytes(),
        }
    }

    /// The bytes, owned (copies an object's).
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            Data::Bytes(b) => b,
            Data::Object(v) => v.as_bytes().to_vec(),
        }
    }
}

impl std::ops::Deref for Data {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

/// Longest wait for a payload object to appear, past the call's own deadline.
const OBJECT_WAIT: Duration = Duration::from_secs(10);

fn too_large(what: &str, len: usize, limit: u64) -> Error {
    Error::Remote(WireError::new(
        ErrorCode::TooLarge,
        format!(
            "{what} of {len} bytes exceeds the inline limit of {limit}, and no dataworker \
             client was given to pass it as an object"
        ),
    ))
}

/// Stores `bytes` as a fresh object; its id.
async fn put_object(store: &Client, bytes: &[u8]) -> Result<shoal_protocol::ObjectId, Error> {
    let id = Client::generate_id();
    store.put(id.as_str(), bytes).await?;
    Ok(id)
}

/// The view of object `id`, waiting up to `wait` for it; the object is deleted once viewed
/// when `consume` (the view stays valid).
async fn view_object(
    store: Option<&Client>,
    id: &shoal_protocol::ObjectId,
    wait: Duration,
    consume: bool,
) -> Result<View, Error> {
    let store = store.ok_or_else(|| {
        Error::Remote(WireError::new(
            ErrorCode::InvalidArgument,
            format!("payload is object {id}, and no dataworker client was given to read it"),
        ))
    })?;
    let view = store.get(id.as_str(), wait).await?;
    if consume {
        let _ = store.delete(id.as_str()).await;
    }
    Ok(view)
}

type Pending = HashMap<u64, oneshot::Sender<Result<Payload, WireError>>>;

#[derive(Debug, Default)]
struct Calls {
    pending: Pending,
    /// Questions about lanes, by id.
    queries: HashMap<u64, oneshot::Sender<Vec<LaneInfo>>>,
    /// Set when the connection ended; no new calls are accepted.
    closed: bool,
}

/// How a [`CallClient`] makes calls.
#[derive(Debug, Clone)]
pub struct CallOptions {
    /// Call instances on this node through their call lanes (shared memory) when they offer
    /// one. On by default.
    pub lanes: bool,
    /// How long a caller polls a lane for its reply before it sleeps, when that call is the
    /// lane's only one (polling costs a core while it lasts and saves two wake-ups). 100 µs
    /// by default; zero never polls.
    pub lane_spin: Duration,
    /// Pass payloads above the inline limit as objects through this client of the node's
    /// dataworker. Without it, such payloads fail with `TooLarge`.
    pub store: Option<Client>,
}

impl Default for CallOptions {
    fn default() -> Self {
        Self {
            lanes: true,
            lane_spin: Duration::from_micros(100),
            store: None,
        }
    }
}

/// A caller's lanes, by function.
#[derive(Debug)]
struct Lanes {
    sets: Mutex<HashMap<String, LaneSet>>,
    /// One refresh at a time per client.
    refresh: tokio::sync::Mutex<()>,
    spin: Duration,
    turn: AtomicUsize,
    calls: AtomicU64,
}

#[derive(Debug)]
struct ClientInner {
    tx: mpsc::Sender<Vec<u8>>,
    calls: Arc<Mutex<Calls>>,
    next_id: AtomicU64,
    node_id: String,
    inline_limit: u64,
    store: Option<Client>,
    lanes: Option<Lanes>,
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
    /// Connects to the proxy at `proxy_socket` as a caller. Payloads above the proxy's
    /// inline limit fail with `TooLarge`; see [`CallClient::connect_with_store`].
    pub async fn connect(proxy_socket: impl AsRef<Path>) -> Result<CallClient, Error> {
        Self::connect_with(proxy_socket, CallOptions::default()).await
    }

    /// Connects to the proxy at `proxy_socket` as a caller that passes payloads above the
    /// inline limit as objects through `store` (a client of the same node's dataworker).
    pub async fn connect_with_store(
        proxy_socket: impl AsRef<Path>,
        store: Client,
    ) -> Result<CallClient, Error> {
        let opts = CallOptions {
            store: Some(store),
            ..CallOptions::default()
        };
        Self::connect_with(proxy_socket, opts).await
    }

    /// Connects to the proxy at `proxy_socket` as a caller, with options.
    pub async fn connect_with(
        proxy_socket: impl AsRef<Path>,
        opts: CallOptions,
    ) -> Result<CallClient, Error> {
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
                match frame {
                    ProxyFrame::Reply { id, result } => {
                        if let Some(tx) = lock(&reader_calls).pending.remove(&id) {
                            let _ = tx.send(result);
                        }
                    }
                    ProxyFrame::Lanes { id, lanes } => {
                        if let Some(tx) = lock(&reader_calls).queries.remove(&id) {
                            let _ = tx.send(lanes);
                        }
                    }
                    _ => {}
                }
            }
            let mut c = lock(&reader_calls);
            c.closed = true;
            c.queries.clear();
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
                store: opts.store,
                lanes: opts.lanes.then(|| Lanes {
                    sets: Mutex::new(HashMap::new()),
                    refresh: tokio::sync::Mutex::new(()),
                    spin: opts.lane_spin,
                    turn: AtomicUsize::new(0),
                    calls: AtomicU64::new(0),
                }),
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

    /// Calls answered through call lanes so far (the rest went through the proxy).
    pub fn lane_calls(&self) -> u64 {
        self.inner
            .lanes
            .as_ref()
            .map_or(0, |l| l.calls.load(Ordering::Relaxed))
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
        self.call_bytes(function, None, args, timeout).await
    }

    /// Like [`CallClient::invoke`], on one named instance.
    pub async fn invoke_instance(
        &self,
        function: &str,
        instance: &str,
        args: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, Error> {
        self.call_bytes(function, Some(instance), args, timeout)
            .await
    }

    /// Calls `function` (or its `instance`) with `args` as given: inline bytes, or the id of
    /// an object already in the store (left there). An object result comes back as a
    /// zero-copy view, and the result object is deleted (the view stays valid).
    pub async fn invoke_payload(
        &self,
        function: &str,
        instance: Option<&str>,
        args: Payload,
        timeout: Duration,
    ) -> Result<Data, Error> {
        if let Payload::Inline(a) = &args {
            if a.len() as u64 > self.inner.inline_limit {
                return Err(too_large("argument", a.len(), self.inner.inline_limit));
            }
        }
        match self.call(function, instance, args, timeout).await? {
            Payload::Inline(v) => Ok(Data::Bytes(v)),
            Payload::Object(id) => Ok(Data::Object(
                view_object(self.inner.store.as_ref(), &id, OBJECT_WAIT, true).await?,
            )),
        }
    }

    async fn call_bytes(
        &self,
        function: &str,
        instance: Option<&str>,
        args: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, Error> {
        let inner = &*self.inner;
        if args.len() as u64 <= inner.inline_limit {
            let r = self
                .invoke_payload(function, instance, Payload::Inline(args.to_vec()), timeout)
                .await?;
            return Ok(r.into_vec());
        }
        let store = inner
            .store
            .as_ref()
            .ok_or_else(|| too_large("argument", args.len(), inner.inline_limit))?;
        let id = put_object(store, args).await?;
        let r = self
            .invoke_payload(function, instance, Payload::Object(id.clone()), timeout)
            .await;
        let _ = store.delete(id.as_str()).await;
        Ok(r?.into_vec())
    }

    async fn call(
        &self,
        function: &str,
        instance: Option<&str>,
        args: Payload,
        timeout: Duration,
    ) -> Result<Payload, Error> {
        let inner = &*self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let args = match &inner.lanes {
            Some(lanes) => match self
                .lane_call(lanes, id, function, instance, args, timeout)
                .await
            {
                Ok(result) => return Ok(result?),
                Err(args) => args,
            },
            None => args,
        };
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
            args,
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
        Ok(result?)
    }

    /// Makes the call through a lane to a local instance with room, if there is one; gives
    /// the argument back when the call did not start there.
    async fn lane_call(
        &self,
        lanes: &Lanes,
        id: u64,
        function: &str,
        instance: Option<&str>,
        args: Payload,
        timeout: Duration,
    ) -> Result<Result<Payload, WireError>, Payload> {
        let Some(lane) = self.lane_for(lanes, function, instance).await else {
            return Err(args);
        };
        let frame = ProxyFrame::Invoke {
            id,
            function: function.to_owned(),
            args,
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            trace_id: id,
        };
        let give_back = |frame: ProxyFrame| match frame {
            ProxyFrame::Invoke { args, .. } => args,
            _ => Payload::Inline(Vec::new()), // never: built just above
        };
        let mut bytes = Vec::new();
        if encode_frame(&frame, &mut bytes).is_err() {
            return Err(give_back(frame));
        }
        let now = tokio::time::Instant::now();
        let deadline = now
            .checked_add(timeout)
            .unwrap_or_else(|| now + Duration::from_secs(365 * 86_400));
        match lane.call(&bytes, deadline, lanes.spin).await {
            LaneOutcome::Answered(result) => {
                lanes.calls.fetch_add(1, Ordering::Relaxed);
                Ok(result)
            }
            LaneOutcome::NotStarted => {
                if lane.is_dead() || !lane.has_room() {
                    // Drained or gone: ask the proxy again on the next call.
                    lock(&lanes.sets).remove(function);
                }
                Err(give_back(frame))
            }
        }
    }

    /// The lane a call to `function` (or its `instance`) should take, asking the proxy which
    /// local instances offer one when what it said last is stale.
    async fn lane_for(
        &self,
        lanes: &Lanes,
        function: &str,
        instance: Option<&str>,
    ) -> Option<Arc<CallerLane>> {
        let turn = lanes.turn.fetch_add(1, Ordering::Relaxed);
        let fresh = |sets: &HashMap<String, LaneSet>| {
            sets.get(function)
                .filter(|s| {
                    let ttl = match s.lanes.is_empty() {
                        true => NO_LANE_REFRESH,
                        false => LANE_REFRESH,
                    };
                    s.checked.elapsed() < ttl
                })
                .filter(|s| s.lanes.iter().all(|l| !l.is_dead()))
                .map(|s| s.pick(instance, turn))
        };
        if let Some(pick) = fresh(&lock(&lanes.sets)) {
            return pick;
        }
        let _one = lanes.refresh.lock().await;
        if let Some(pick) = fresh(&lock(&lanes.sets)) {
            return pick;
        }
        let infos = self.query_lanes(function).await;
        let old = lock(&lanes.sets).remove(function);
        let mut set = LaneSet {
            lanes: Vec::new(),
            checked: std::time::Instant::now(),
        };
        for info in infos {
            let kept = old
                .iter()
                .flat_map(|s| &s.lanes)
                .find(|l| l.instance_id == info.instance_id && l.path == info.path)
                .filter(|l| !l.is_dead());
            match kept {
                Some(l) => set.lanes.push(l.clone()),
                // An instance whose lane cannot be opened is called through the proxy.
                None => match CallerLane::connect(&info).await {
                    Ok(l) => set.lanes.push(Arc::new(l)),
                    Err(_) => continue,
                },
            }
        }
        let pick = set.pick(instance, turn);
        lock(&lanes.sets).insert(function.to_owned(), set);
        pick
    }

    /// Asks the proxy which local instances of `function` offer lanes (none if it cannot say).
    async fn query_lanes(&self, function: &str) -> Vec<LaneInfo> {
        let inner = &*self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut c = lock(&inner.calls);
            if c.closed {
                return Vec::new();
            }
            c.queries.insert(id, tx);
        }
        let asked = match encode(&CallerFrame::Lanes {
            id,
            function: function.to_owned(),
        }) {
            Ok(frame) => inner.tx.send(frame).await.is_ok(),
            Err(_) => false,
        };
        let lanes = match asked {
            true => tokio::time::timeout(LANE_QUERY_TIMEOUT, rx).await,
            false => return Vec::new(),
        };
        lock(&inner.calls).queries.remove(&id);
        lanes.ok().and_then(Result::ok).unwrap_or_default()
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
    store: Option<Client>,
    drain_on_sigterm: bool,
    proxy_socket: PathBuf,
    concurrency: u32,
    lanes: bool,
    poll: Duration,
}

/// An invoke from the proxy waiting for one of the instance's concurrency units.
struct Queued {
    id: u64,
    args: Payload,
    timeout_ms: u64,
    deadline: Option<tokio::time::Instant>,
}

/// The handler's answer to one call: reads an object argument, runs the handler, and stores
/// a result above the inline limit as an object.
async fn answer<F, Fut>(
    handler: Arc<F>,
    store: Option<Client>,
    inline_limit: u64,
    args: Payload,
    timeout_ms: u64,
) -> Result<Payload, WireError>
where
    F: Fn(Data) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<u8>, String>> + Send + 'static,
{
    // None: a deadline too far away to represent.
    let deadline = tokio::time::Instant::now().checked_add(Duration::from_millis(timeout_ms));
    let data = match args {
        Payload::Inline(a) => Data::Bytes(a),
        Payload::Object(o) => {
            let wait = Duration::from_millis(timeout_ms).min(OBJECT_WAIT);
            match view_object(store.as_ref(), &o, wait, false).await {
                Ok(v) => Data::Object(v),
                Err(Error::Remote(e)) => return Err(e),
                Err(e) => {
                    return Err(WireError::new(
                        ErrorCode::Internal,
                        format!("reading argument object {o}: {e}"),
                    ))
                }
            }
        }
    };
    let out = handler(data)
        .await
        .map_err(|msg| WireError::new(ErrorCode::Internal, msg))?;
    if out.len() as u64 <= inline_limit {
        return Ok(Payload::Inline(out));
    }
    if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
        // The caller has been answered `Timeout` already and drops what comes now: an
        // object stored for it would never be read.
        return Err(WireError::new(
            ErrorCode::Timeout,
            "the handler finished past the call's deadline",
        ));
    }
    let Some(store) = store else {
        return Err(WireError::new(
            ErrorCode::TooLarge,
            format!(
                "result of {} bytes exceeds the inline limit of {inline_limit}, and the \
                 instance has no dataworker client",
                out.len()
            ),
        ));
    };
    match put_object(&store, &out).await {
        Ok(id) => Ok(Payload::Object(id)),
        Err(Error::Remote(e)) => Err(e),
        Err(e) => Err(WireError::new(
            ErrorCode::Internal,
            format!("storing the result object: {e}"),
        )),
    }
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
            store: None,
            drain_on_sigterm: false,
            proxy_socket: proxy_socket.as_ref().to_owned(),
            concurrency: concurrency.max(1),
            lanes: true,
            poll: DEFAULT_POLL,
        })
    }

    /// On SIGTERM, drain instead of dying mid-call: ask the proxy for no new calls, finish
    /// the calls already routed here, then return `Ok` from `run`. For processes whose
    /// lifetime an agent manages (it stops instances with SIGTERM, then SIGKILL after a
    /// grace period); [`InstanceEnv::register`] turns it on. The handler is process-wide.
    pub fn drain_on_sigterm(mut self) -> FunctionInstance {
        self.drain_on_sigterm = true;
        self
    }

    /// Reads object arguments and stores results above the inline limit as objects through
    /// `store` (a client of the same node's dataworker). Without it, object arguments fail
    /// with `InvalidArgument` and large results with `TooLarge`.
    pub fn with_store(mut self, store: Client) -> FunctionInstance {
        self.store = Some(store);
        self
    }

    /// Serves calls from the proxy only: offers no call lanes to callers on this node. By
    /// default an instance offers them (a socket beside the proxy's and one thread).
    pub fn without_lanes(mut self) -> FunctionInstance {
        self.lanes = false;
        self
    }

    /// How long the instance keeps looking for its next call after one before its threads
    /// park (200 µs by default). Polling costs CPU for that long after each burst of calls;
    /// parking costs a thread wake-up (tens of microseconds on some VMs) on the next call.
    /// Zero parks at once.
    pub fn poll_after_call(mut self, poll: Duration) -> FunctionInstance {
        self.poll = poll;
        self
    }

    /// The proxy's node id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Serves calls with `handler` until the proxy closes the connection (then `Ok`).
    /// Each call runs as its own task; a handler's `Err(message)` or panic reaches the
    /// caller as an `Internal` error. Dropping the returned future disconnects the instance
    /// and aborts its running handlers. Object arguments are copied into the `Vec`; use
    /// [`FunctionInstance::run_data`] to read them in place.
    pub async fn run<F, Fut>(self, handler: F) -> Result<(), Error>
    where
        F: Fn(Vec<u8>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<u8>, String>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.run_data(move |d: Data| {
            let h = handler.clone();
            async move { h(d.into_vec()).await }
        })
        .await
    }

    /// Like [`FunctionInstance::run`], with the argument as [`Data`]: an object argument is a
    /// zero-copy view of the object.
    ///
    /// At most the declared concurrency of calls run at once, whether they came through the
    /// proxy or through call lanes; a call holds its unit until it answers or its deadline
    /// passes. Calls from the proxy that find no unit free wait here, ahead of lane calls.
    pub async fn run_data<F, Fut>(self, handler: F) -> Result<(), Error>
    where
        F: Fn(Data) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<u8>, String>> + Send + 'static,
    {
        let FunctionInstance {
            stream,
            mut buf,
            inline_limit,
            store,
            drain_on_sigterm,
            proxy_socket,
            concurrency,
            lanes,
            poll,
            ..
        } = self;
        let (mut rd, mut wr) = stream.into_split();
        let dec = FrameDecoder::new(max_frame(inline_limit));
        let handler = Arc::new(handler);
        let call: CallFn = Arc::new(move |args, timeout_ms| {
            Box::pin(answer(
                handler.clone(),
                store.clone(),
                inline_limit,
                args,
                timeout_ms,
            ))
        });
        let admission = Admission::new(concurrency)?;
        let lanes = match lanes.then(|| LaneListener::bind(&proxy_socket)).flatten() {
            Some(listener) => {
                let path = listener.path().to_string_lossy().into_owned();
                let server = LaneServer::start(
                    listener,
                    admission.clone(),
                    call.clone(),
                    inline_limit,
                    poll,
                )?;
                wr.write_all(&encode(&CallerFrame::Lane { path })?).await?;
                Some(server)
            }
            None => None,
        };
        let mut tasks: JoinSet<Result<Payload, WireError>> = JoinSet::new();
        let mut ids: HashMap<tokio::task::Id, u64> = HashMap::new();
        let mut queue: VecDeque<Queued> = VecDeque::new();
        let start = |q: Queued, permit, tasks: &mut JoinSet<_>, ids: &mut HashMap<_, _>| {
            let t = tasks.spawn(run_holding(call(q.args, q.timeout_ms), permit, q.deadline));
            ids.insert(t.id(), q.id);
        };
        let mut term = if drain_on_sigterm {
            Some(tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::terminate(),
            )?)
        } else {
            None
        };
        // Drain asked for, and the proxy's `Drained` seen.
        let (mut draining, mut drained) = (false, false);
        let mut hot_until: Option<std::time::Instant> = None;
        // What the gauge says waits in `queue` (written only when it changes: callers on
        // other cores read that word).
        let mut queued = 0usize;
        loop {
            while let Some(frame) = dec
                .decode::<ProxyFrame>(&mut buf)
                .map_err(|e| Error::protocol(e.to_string()))?
            {
                match frame {
                    ProxyFrame::Invoke {
                        id,
                        args,
                        timeout_ms,
                        ..
                    } => {
                        let q = Queued {
                            id,
                            args,
                            timeout_ms,
                            deadline: tokio::time::Instant::now()
                                .checked_add(Duration::from_millis(timeout_ms)),
                        };
                        match admission.try_acquire(true).filter(|_| queue.is_empty()) {
                            Some(permit) => start(q, permit, &mut tasks, &mut ids),
                            None => queue.push_back(q),
                        }
                    }
                    ProxyFrame::Drained => drained = true,
                    other => {
                        return Err(Error::protocol(format!(
                            "unexpected frame from the proxy: {other:?}"
                        )))
                    }
                }
            }
            if queue.len() != queued {
                queued = queue.len();
                admission.gauge.set_queued(queued as u32);
            }
            let lane_calls = lanes.as_ref().map_or(0, LaneServer::in_flight);
            if drained && tasks.is_empty() && queue.is_empty() && lane_calls == 0 {
                return Ok(());
            }
            // Right after a call, look for the next one for a while without parking this
            // thread (one more branch that yields and comes back): on the proxy path a
            // parked instance costs a wake-up per call.
            let hot = hot_until.is_some_and(|t| std::time::Instant::now() < t);
            tokio::select! {
                n = rd.read_buf(&mut buf) => {
                    if n? == 0 {
                        return Ok(());
                    }
                    hot_until = std::time::Instant::now().checked_add(poll);
                }
                _ = sigterm(&mut term), if !draining => {
                    draining = true;
                    if let Some(l) = &lanes {
                        l.drain();
                    }
                    wr.write_all(&encode(&CallerFrame::Drain)?).await?;
                }
                _ = admission.released.notified(), if !queue.is_empty() || drained => {
                    while let Some(q) = queue.pop_front() {
                        if q.deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                            continue; // the proxy answered `Timeout` and forgot it
                        }
                        match admission.try_acquire(true) {
                            Some(permit) => start(q, permit, &mut tasks, &mut ids),
                            None => {
                                queue.push_front(q);
                                break;
                            }
                        }
                    }
                }
                Some(done) = tasks.join_next_with_id() => {
                    if let Some(out) = result_frame(done, &mut ids)? {
                        wr.write_all(&out).await?;
                    }
                    hot_until = std::time::Instant::now().checked_add(poll);
                }
                // The thread yields too, so a busy machine's other threads run first.
                _ = async { std::thread::yield_now(); tokio::task::yield_now().await }, if hot => {}
            }
        }
    }
}

/// How long an instance keeps looking for its next call after one, before it parks.
const DEFAULT_POLL: Duration = Duration::from_micros(200);

/// The `Result` frame for a finished handler task (`None`: not a call's task).
fn result_frame(
    done: Result<(tokio::task::Id, Result<Payload, WireError>), tokio::task::JoinError>,
    ids: &mut HashMap<tokio::task::Id, u64>,
) -> Result<Option<Vec<u8>>, Error> {
    let (task, result) = match done {
        Ok((task, r)) => (task, r),
        Err(e) => (
            e.id(),
            Err(WireError::new(
                ErrorCode::Internal,
                format!("handler panicked: {e}"),
            )),
        ),
    };
    let Some(id) = ids.remove(&task) else {
        return Ok(None);
    };
    Ok(Some(encode(&CallerFrame::Result { id, result })?))
}

/// Resolves on the next SIGTERM; never without a handler.
async fn sigterm(term: &mut Option<tokio::signal::unix::Signal>) {
    match term {
        Some(t) => {
            t.recv().await;
        }
        None => std::future::pending().await,
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

/// How an agent describes an instance to its process, through the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceEnv {
    /// `SHOAL_PROXY_SOCKET` (required).
    pub proxy_socket: std::path::PathBuf,
    /// `SHOAL_DATAWORKER_SOCKET`, if set.
    pub dataworker_socket: Option<std::path::PathBuf>,
    /// `SHOAL_FUNCTION` (else `default_function`).
    pub function: String,
    /// `SHOAL_INSTANCE_ID` (else `<function>-<pid>`).
    pub instance_id: String,
    /// `SHOAL_CONCURRENCY` (else 1).
    pub concurrency: u32,
}

impl InstanceEnv {
    /// Reads the environment; `InvalidArgument` when `SHOAL_PROXY_SOCKET` is missing or
    /// `SHOAL_CONCURRENCY` is not a positive number.
    pub fn from_env(default_function: &str) -> Result<InstanceEnv, Error> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let invalid = |m: String| Error::Remote(WireError::new(ErrorCode::InvalidArgument, m));
        let proxy_socket = var("SHOAL_PROXY_SOCKET")
            .ok_or_else(|| invalid("SHOAL_PROXY_SOCKET is not set".into()))?
            .into();
        let function = var("SHOAL_FUNCTION").unwrap_or_else(|| default_function.to_owned());
        let concurrency =
            match var("SHOAL_CONCURRENCY") {
                None => 1,
                Some(c) => c.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| {
                    invalid(format!("SHOAL_CONCURRENCY={c}: not a positive number"))
                })?,
            };
        Ok(InstanceEnv {
            proxy_socket,
            dataworker_socket: var("SHOAL_DATAWORKER_SOCKET").map(Into::into),
            instance_id: var("SHOAL_INSTANCE_ID")
                .unwrap_or_else(|| format!("{function}-{}", std::process::id())),
            function,
            concurrency,
        })
    }

    /// Registers with the proxy, with a dataworker client when a socket is named, draining
    /// on SIGTERM ([`FunctionInstance::drain_on_sigterm`]).
    pub async fn register(&self) -> Result<FunctionInstance, Error> {
        let inst = FunctionInstance::register(
            &self.proxy_socket,
            &self.function,
            &self.instance_id,
            self.concurrency,
        )
        .await?
        .drain_on_sigterm();
        Ok(match &self.dataworker_socket {
            Some(s) => inst.with_store(Client::connect(s).await?),
            None => inst,
        })
    }
}
