//! The instance's side: [`FunctionInstance`] registers with the proxy (with its own
//! credential) and runs the handler for each call (from the proxy or a lane), answering every
//! call it took exactly once; [`serve`] is the one-call entry point, [`InstanceEnv`] the
//! settings the agent passes in.
//!
//! Result objects it stores are deleted by it, through its own dataworker client: when the
//! caller releases one (a `Release` from the proxy, or the lane slot freed), when it has been
//! held `RESULT_HOLD` unreleased, past `MAX_HELD_RESULTS`, or when the instance stops.
use crate::lane::{run_holding, Admission, CallFn, LaneListener, LaneServer, ReleaseFn};
use crate::{CallOptions, Client, Error};
use bytes::BytesMut;
use shoal_protocol::{
    CallerFrame, ErrorCode, FrameDecoder, LaneKey, ObjectId, Payload, ProxyFrame, Role, WireError,
};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::task::JoinSet;

use super::data::{put_object, view_object, Data, OBJECT_WAIT};
use super::{encode, handshake, max_frame};

/// Longest an object result waits for its caller's release before the instance deletes it.
pub(crate) const RESULT_HOLD: Duration = Duration::from_secs(30);
/// Object results held unreleased at most (through the proxy); past it the oldest is deleted.
pub(crate) const MAX_HELD_RESULTS: usize = 4096;
/// Object results handed over for deletion and not deleted yet, at most (then the releasing
/// side deletes them itself).
const RELEASE_QUEUE: usize = 4096;

/// Object results this instance stored and its callers have not released yet (through the
/// proxy), oldest first, and the deletions under way.
struct HeldResults {
    store: Option<Client>,
    held: VecDeque<(tokio::time::Instant, u64, ObjectId)>,
    deleting: JoinSet<()>,
}

impl HeldResults {
    fn new(store: Option<Client>) -> Self {
        Self {
            store,
            held: VecDeque::new(),
            deleting: JoinSet::new(),
        }
    }

    /// Deletes `id` through the instance's own client (so in its own tenant).
    fn delete(&mut self, id: ObjectId) {
        if let Some(store) = self.store.clone() {
            self.deleting.spawn(async move {
                let _ = store.delete(id.as_str()).await;
            });
        }
    }

    /// Invoke `invoke` was answered with object `id`.
    fn hold(&mut self, invoke: u64, id: ObjectId) {
        if self.held.len() >= MAX_HELD_RESULTS {
            if let Some((_, _, old)) = self.held.pop_front() {
                self.delete(old);
            }
        }
        let until = tokio::time::Instant::now() + RESULT_HOLD;
        self.held.push_back((until, invoke, id));
    }

    /// The caller of `invoke` is done with its result.
    fn release(&mut self, invoke: u64) {
        if let Some(pos) = self.held.iter().position(|(_, i, _)| *i == invoke) {
            if let Some((_, _, id)) = self.held.remove(pos) {
                self.delete(id);
            }
        }
    }

    /// When the oldest result is due.
    fn next_due(&self) -> Option<tokio::time::Instant> {
        self.held.front().map(|(t, _, _)| *t)
    }

    /// Deletes what is due.
    fn expire(&mut self) {
        let now = tokio::time::Instant::now();
        while self.held.front().is_some_and(|(t, _, _)| *t <= now) {
            if let Some((_, _, id)) = self.held.pop_front() {
                self.delete(id);
            }
        }
    }

    /// Deletes everything still held and waits for every deletion.
    async fn release_all(mut self, lanes: &mut tokio::sync::mpsc::Receiver<ObjectId>) {
        while let Some((_, _, id)) = self.held.pop_front() {
            self.delete(id);
        }
        while let Ok(id) = lanes.try_recv() {
            self.delete(id);
        }
        while self.deleting.join_next().await.is_some() {}
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
    /// handles `concurrency` calls at once, presenting `token`: the instance's own credential
    /// (its agent passes it as `SHOAL_TOKEN`), bound to exactly this function and instance id.
    /// Without it, or with another instance's, the proxy refuses (`Unauthenticated`,
    /// `PermissionDenied`). Once this returns, calls can be routed to it.
    pub async fn register(
        proxy_socket: impl AsRef<Path>,
        function: &str,
        instance_id: &str,
        concurrency: u32,
        token: Option<&str>,
    ) -> Result<FunctionInstance, Error> {
        let (stream, buf, node_id, inline_limit) = handshake(
            proxy_socket.as_ref(),
            Role::Instance {
                function: function.to_owned(),
                instance_id: instance_id.to_owned(),
                concurrency,
            },
            token,
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
        let mut results = HeldResults::new(store.clone());
        let call: CallFn = Arc::new(move |args, timeout_ms| {
            Box::pin(answer(
                handler.clone(),
                store.clone(),
                inline_limit,
                args,
                timeout_ms,
            ))
        });
        // Lane results callers are done with come here, to be deleted beside the others.
        let (released_tx, mut released) = tokio::sync::mpsc::channel::<ObjectId>(RELEASE_QUEUE);
        let release: ReleaseFn = {
            let store = results.store.clone();
            let rt = tokio::runtime::Handle::current();
            Arc::new(move |id: ObjectId| {
                if let Err(tokio::sync::mpsc::error::TrySendError::Full(id)) =
                    released_tx.try_send(id)
                {
                    if let Some(store) = store.clone() {
                        rt.spawn(async move {
                            let _ = store.delete(id.as_str()).await;
                        });
                    }
                }
            })
        };
        // Held for the loop's life, so `released` ends only when the loop does.
        let _release = release.clone();
        let admission = Admission::new(concurrency)?;
        let lanes = match lanes.then(|| LaneListener::bind(&proxy_socket)).flatten() {
            Some(listener) => {
                let path = listener.path().to_string_lossy().into_owned();
                let key: LaneKey = rand::random();
                let server = LaneServer::start(
                    listener,
                    key,
                    admission.clone(),
                    call.clone(),
                    release,
                    inline_limit,
                    poll,
                )?;
                wr.write_all(&encode(&CallerFrame::Lane { path, key })?)
                    .await?;
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
        let served: Result<(), Error> = async { loop {
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
                    ProxyFrame::Release { id } => results.release(id),
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
            let (due, deleting) = (results.next_due(), !results.deleting.is_empty());
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
                    if let Some((id, result)) = finished(done, &mut ids) {
                        if let Ok(Payload::Object(o)) = &result {
                            results.hold(id, o.clone());
                        }
                        wr.write_all(&encode(&CallerFrame::Result { id, result })?).await?;
                    }
                    hot_until = std::time::Instant::now().checked_add(poll);
                }
                Some(id) = released.recv() => results.delete(id),
                Some(_) = results.deleting.join_next(), if deleting => {}
                _ = tokio::time::sleep_until(due.unwrap_or_else(far_future)), if due.is_some() => {
                    results.expire();
                }
                // The thread yields too, so a busy machine's other threads run first.
                _ = async { std::thread::yield_now(); tokio::task::yield_now().await }, if hot => {}
            }
        } }
        .await;
        // The lane thread stops first, handing back what its lanes held.
        drop(lanes);
        results.release_all(&mut released).await;
        served
    }
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400)
}

/// How long an instance keeps looking for its next call after one, before it parks.
const DEFAULT_POLL: Duration = Duration::from_micros(200);

/// The invoke id and result of a finished handler task (`None`: not a call's task).
fn finished(
    done: Result<(tokio::task::Id, Result<Payload, WireError>), tokio::task::JoinError>,
    ids: &mut HashMap<tokio::task::Id, u64>,
) -> Option<(u64, Result<Payload, WireError>)> {
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
    let id = ids.remove(&task)?;
    Some((id, result))
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

/// Registers a function instance with the proxy at `proxy_socket`, presenting `token` (see
/// [`FunctionInstance::register`]), and serves calls with `handler` (at most `concurrency` at
/// once) until the proxy closes the connection.
pub async fn serve<F, Fut>(
    proxy_socket: impl AsRef<Path>,
    function: &str,
    instance_id: &str,
    concurrency: u32,
    token: Option<&str>,
    handler: F,
) -> Result<(), Error>
where
    F: Fn(Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<u8>, String>> + Send + 'static,
{
    FunctionInstance::register(proxy_socket, function, instance_id, concurrency, token)
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
    /// `SHOAL_TOKEN`: the instance's own credential, which the proxy requires to register it
    /// (and which its calls to other functions present). Never logged.
    pub token: Option<String>,
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
            token: var("SHOAL_TOKEN"),
        })
    }

    /// Options for this instance's own calls to other functions: they present its
    /// credential, so they act in its function's tenant.
    pub fn call_options(&self) -> CallOptions {
        CallOptions {
            token: self.token.clone(),
            ..CallOptions::default()
        }
    }

    /// Registers with the proxy, with a dataworker client when a socket is named, draining
    /// on SIGTERM ([`FunctionInstance::drain_on_sigterm`]).
    pub async fn register(&self) -> Result<FunctionInstance, Error> {
        let inst = FunctionInstance::register(
            &self.proxy_socket,
            &self.function,
            &self.instance_id,
            self.concurrency,
            self.token.as_deref(),
        )
        .await?
        .drain_on_sigterm();
        Ok(match &self.dataworker_socket {
            Some(s) => inst.with_store(Client::connect(s).await?),
            None => inst,
        })
    }
}
