//! The caller's side: [`CallClient`] multiplexes calls over one proxy connection (each waits at
//! most its timeout plus `REPLY_GRACE`; at most `OUTBOUND_FRAMES` frames queue towards the
//! proxy), and takes a call lane to an instance on this node when one is offered. An object
//! result is viewed, then released to the instance that stored it (a `Release` frame through
//! the proxy, or the lane slot given back), never deleted here.
use crate::lane::{CallerLane, LaneOutcome, LaneSet, SlotHold};
use crate::{Client, Error};
use shoal_protocol::{
    encode_frame, CallerFrame, ErrorCode, FrameDecoder, LaneInfo, Payload, ProxyFrame, Role,
    WireError,
};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::data::{put_object, too_large, view_object, Data, OBJECT_WAIT};
use super::{closed, encode, handshake, lock, max_frame};

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
    /// A bearer token presented to the proxy: the caller acts in its tenant. Without one the
    /// proxy maps the caller's uid to a tenant (the local user's is `default`). Never logged.
    pub token: Option<String>,
}

impl Default for CallOptions {
    fn default() -> Self {
        Self {
            lanes: true,
            lane_spin: Duration::from_micros(100),
            store: None,
            token: None,
        }
    }
}

impl CallOptions {
    /// The defaults, with [`CallOptions::token`] from `SHOAL_TOKEN` when it is set (a
    /// function instance's own credential, when its agent started it).
    pub fn from_env() -> CallOptions {
        CallOptions {
            token: std::env::var("SHOAL_TOKEN").ok().filter(|t| !t.is_empty()),
            ..CallOptions::default()
        }
    }
}

/// What tells the instance that stored an object result that this caller holds it.
enum Holding {
    /// Through the proxy: `Release` of this call id.
    Proxy(u64),
    /// Through a lane: the slot, given back on drop.
    Lane(SlotHold),
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
            handshake(proxy_socket.as_ref(), Role::Caller, opts.token.as_deref()).await?;
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
    /// zero-copy view; once it is viewed, the instance that stored it is told to delete it
    /// (the view stays valid).
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
            (Payload::Inline(v), _) => Ok(Data::Bytes(v)),
            (Payload::Object(id), holding) => {
                let view = view_object(self.inner.store.as_ref(), &id, OBJECT_WAIT, false).await;
                if let Some(h) = holding {
                    self.release(h).await;
                }
                Ok(Data::Object(view?))
            }
        }
    }

    /// Tells the instance that stored an object result that this caller is done with it.
    async fn release(&self, holding: Holding) {
        match holding {
            Holding::Lane(slot) => drop(slot),
            Holding::Proxy(id) => {
                if let Ok(frame) = encode(&CallerFrame::Release { id }) {
                    // A closed connection released everything it held.
                    let _ = self.inner.tx.send(frame).await;
                }
            }
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

    /// Makes the call; an object result comes with what releases it.
    async fn call(
        &self,
        function: &str,
        instance: Option<&str>,
        args: Payload,
        timeout: Duration,
    ) -> Result<(Payload, Option<Holding>), Error> {
        let inner = &*self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let args = match &inner.lanes {
            Some(lanes) => match self
                .lane_call(lanes, id, function, instance, args, timeout)
                .await
            {
                Ok((result, hold)) => return Ok((result?, hold.map(Holding::Lane))),
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
        let payload = result?;
        let holding = matches!(payload, Payload::Object(_)).then_some(Holding::Proxy(id));
        Ok((payload, holding))
    }

    /// Makes the call through a lane to a local instance with room, if there is one; gives
    /// the argument back when the call did not start there. An object result comes with its
    /// slot, held until the caller has viewed it.
    async fn lane_call(
        &self,
        lanes: &Lanes,
        id: u64,
        function: &str,
        instance: Option<&str>,
        args: Payload,
        timeout: Duration,
    ) -> Result<(Result<Payload, WireError>, Option<SlotHold>), Payload> {
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
            LaneOutcome::Answered(result, hold) => {
                lanes.calls.fetch_add(1, Ordering::Relaxed);
                Ok((result, hold))
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
