//! The instance's side of call lanes: the listener that hands each caller who presents the
//! lane key a region and the gauge, the lane thread that polls every lane's slots (then
//! sleeps in `poll(2)` once idle), and the admission that makes lane calls and proxy calls
//! share the instance's concurrency units. Object results are held per slot until the caller
//! frees it, then handed to the [`ReleaseFn`].
use super::{
    encode_result, lock, poll_step, slot_capacity, CONNECT_TIMEOUT, HELLO_LEN, HELLO_MAGIC,
    KEY_MAGIC, MAX_LANES, MAX_PENDING, SLOTS, SOCKET_CHECK,
};
use crate::Error;
use bytes::BytesMut;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use shoal_protocol::{ErrorCode, FrameDecoder, LaneKey, ObjectId, Payload, ProxyFrame, WireError};
use shoal_shm::{LaneGauge, LaneRegion, SlotState};
use std::collections::HashMap;
use std::future::Future;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// A call's work: the handler applied to an argument with `timeout_ms` left.
pub(crate) type CallFn = Arc<
    dyn Fn(Payload, u64) -> Pin<Box<dyn Future<Output = Result<Payload, WireError>> + Send>>
        + Send
        + Sync,
>;

/// Deletes an object result the caller is done with (in the instance's own tenant).
pub(crate) type ReleaseFn = Arc<dyn Fn(ObjectId) + Send + Sync>;

/// The instance's concurrency units, shared by calls from the proxy and from lanes (counted
/// by the [`LaneGauge`], which mirrors the count for callers to read).
#[derive(Debug)]
pub(crate) struct Admission {
    pub(crate) gauge: LaneGauge,
    /// Woken whenever a unit is given back (the proxy side's queue waits on it).
    pub(crate) released: Notify,
    /// Rings the lane thread when a unit is given back while lane calls wait for one.
    lane_bell: Mutex<Option<UnixStream>>,
    lane_blocked: AtomicBool,
}

impl Admission {
    pub(crate) fn new(limit: u32) -> Result<Arc<Admission>, Error> {
        Ok(Arc::new(Admission {
            gauge: LaneGauge::create(limit)?,
            released: Notify::new(),
            lane_bell: Mutex::new(None),
            lane_blocked: AtomicBool::new(false),
        }))
    }

    /// One unit, if free (`from_proxy` calls may pass lane calls waiting for room).
    pub(crate) fn try_acquire(self: &Arc<Self>, from_proxy: bool) -> Option<Permit> {
        self.gauge.try_acquire(from_proxy).then(|| Permit {
            admission: self.clone(),
        })
    }

    fn release(&self) {
        self.gauge.release();
        self.released.notify_one();
        if self.lane_blocked.load(Ordering::SeqCst) {
            if let Some(bell) = lock(&self.lane_bell).as_ref() {
                let _ = (&*bell).write(&[1]);
            }
        }
    }
}

/// One concurrency unit; given back on drop.
#[derive(Debug)]
pub(crate) struct Permit {
    admission: Arc<Admission>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.release();
    }
}

/// Runs `fut` holding `permit` until it finishes or `deadline` passes (the caller has been
/// answered `Timeout` by then, so the unit is free for the next call), whichever is first.
pub(crate) async fn run_holding<T>(
    fut: impl Future<Output = T>,
    permit: Permit,
    deadline: Option<tokio::time::Instant>,
) -> T {
    let Some(deadline) = deadline else {
        let out = fut.await;
        drop(permit);
        return out;
    };
    tokio::pin!(fut);
    tokio::select! {
        out = &mut fut => out,
        _ = tokio::time::sleep_until(deadline) => {
            drop(permit);
            fut.await
        }
    }
}

/// Where an instance hands out lanes: a socket beside the proxy's.
#[derive(Debug)]
pub(crate) struct LaneListener {
    listener: UnixListener,
    path: PathBuf,
}

impl LaneListener {
    /// Binds `l-<pid>-<n>.sock` in the proxy socket's directory; `None` (the instance then
    /// serves through the proxy only) if that is not possible.
    pub(crate) fn bind(proxy_socket: &Path) -> Option<LaneListener> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = proxy_socket.parent()?;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("l-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = match UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) => {
                tracing_free_warn(&format!("no call lanes: binding {}: {e}", path.display()));
                return None;
            }
        };
        listener.set_nonblocking(true).ok()?;
        Some(LaneListener { listener, path })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LaneListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The SDK has no logging dependency: a lane that cannot be set up is worth one line on
/// stderr, since calls then take the slower path.
fn tracing_free_warn(msg: &str) {
    eprintln!("shoal-sdk: {msg}");
}

/// One caller's lane, instance side.
#[derive(Debug)]
struct ServerLane {
    region: LaneRegion,
    stream: UnixStream,
    /// Set when the lane misbehaved or its caller left: the lane thread drops it.
    closed: AtomicBool,
    /// Object results by slot, kept until the caller frees the slot.
    held: Mutex<Vec<Option<ObjectId>>>,
    /// How many of `held` are set (the sweep looks at them only then).
    holding: AtomicUsize,
}

impl ServerLane {
    fn new(region: LaneRegion, stream: UnixStream) -> Self {
        let slots = region.slots() as usize;
        ServerLane {
            region,
            stream,
            closed: AtomicBool::new(false),
            held: Mutex::new(vec![None; slots]),
            holding: AtomicUsize::new(0),
        }
    }

    /// Publishes a reply and rings the caller if it sleeps. An object result is held until
    /// the caller frees the slot.
    fn finish(
        &self,
        slot: u32,
        id: u64,
        result: Result<Payload, WireError>,
        buf: &mut Vec<u8>,
        release: &ReleaseFn,
    ) {
        if let Ok(Payload::Object(o)) = &result {
            self.hold(slot, o.clone(), release);
        }
        encode_result(id, result, buf);
        if !self.region.complete(slot, buf) {
            if let Some(o) = self.unhold(slot) {
                release(o);
            }
            let e = WireError::new(ErrorCode::Internal, "the result does not fit the lane");
            encode_result(id, Err(e), buf);
            if !self.region.complete(slot, buf) {
                self.closed.store(true, Ordering::SeqCst);
            }
        }
        if self.region.callers_sleep() {
            self.ring();
        }
    }

    fn hold(&self, slot: u32, object: ObjectId, release: &ReleaseFn) {
        let old = lock(&self.held)
            .get_mut(slot as usize)
            .and_then(|h| h.replace(object));
        match old {
            Some(o) => release(o), // never expected: the slot's last object, freed first
            None => {
                self.holding.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    fn unhold(&self, slot: u32) -> Option<ObjectId> {
        // The common case, every call without an object result: no lock taken.
        if self.holding.load(Ordering::SeqCst) == 0 {
            return None;
        }
        let o = lock(&self.held).get_mut(slot as usize)?.take()?;
        self.holding.fetch_sub(1, Ordering::SeqCst);
        Some(o)
    }

    /// Releases the objects of slots the caller has freed (a slot still taken holds a result
    /// being published; a posted one is released when it is taken).
    fn release_freed(&self, release: &ReleaseFn) {
        if self.holding.load(Ordering::SeqCst) == 0 {
            return;
        }
        for slot in 0..self.region.slots() {
            if self.region.state(slot) == SlotState::Free {
                if let Some(o) = self.unhold(slot) {
                    release(o);
                }
            }
        }
    }

    /// Releases every object held (the lane is going away).
    fn release_all(&self, release: &ReleaseFn) {
        for slot in 0..self.region.slots() {
            if let Some(o) = self.unhold(slot) {
                release(o);
            }
        }
    }

    fn ring(&self) {
        // A full socket buffer already holds a ring.
        let _ = (&self.stream).write(&[1]);
    }
}

/// State the lane thread shares with the tasks it spawns and with its owner.
struct LaneCtx {
    admission: Arc<Admission>,
    call: CallFn,
    release: ReleaseFn,
    rt: tokio::runtime::Handle,
    stop: AtomicBool,
    /// Handlers that moved to the runtime, by a lane-local id (aborted on stop).
    tasks: Mutex<HashMap<u64, tokio::task::AbortHandle>>,
    next_task: AtomicU64,
    in_flight: AtomicUsize,
}

/// The lane thread of one instance; stopped (and its handlers aborted) on drop.
pub(crate) struct LaneServer {
    ctx: Arc<LaneCtx>,
    bell: UnixStream,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for LaneServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaneServer").finish_non_exhaustive()
    }
}

impl LaneServer {
    /// Starts serving lanes on `listener` to callers that present `key`; object results
    /// callers are done with go to `release`.
    pub(crate) fn start(
        listener: LaneListener,
        key: LaneKey,
        admission: Arc<Admission>,
        call: CallFn,
        release: ReleaseFn,
        inline_limit: u64,
        poll: Duration,
    ) -> Result<LaneServer, Error> {
        let (bell, bell_rx) = UnixStream::pair()?;
        bell.set_nonblocking(true)?;
        bell_rx.set_nonblocking(true)?;
        *lock(&admission.lane_bell) = Some(bell.try_clone()?);
        let ctx = Arc::new(LaneCtx {
            admission,
            call,
            release,
            rt: tokio::runtime::Handle::current(),
            stop: AtomicBool::new(false),
            tasks: Mutex::new(HashMap::new()),
            next_task: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        });
        let thread_ctx = ctx.clone();
        let cap = slot_capacity(inline_limit);
        let thread = std::thread::Builder::new()
            .name("shoal-lanes".into())
            .spawn(move || LaneLoop::new(thread_ctx, listener, key, bell_rx, cap, poll).run())?;
        Ok(LaneServer {
            ctx,
            bell,
            thread: Some(thread),
        })
    }

    /// No new calls through lanes: calls posted from now on are given back unstarted.
    pub(crate) fn drain(&self) {
        self.ctx.admission.gauge.set_draining();
        let _ = (&self.bell).write(&[1]);
    }

    /// Handlers started from lanes that have not finished.
    pub(crate) fn in_flight(&self) -> usize {
        self.ctx.in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for LaneServer {
    fn drop(&mut self) {
        self.ctx.stop.store(true, Ordering::SeqCst);
        let _ = (&self.bell).write(&[1]);
        if let Some(t) = self.thread.take() {
            // The loop sees `stop` within one sweep or one wake-up; after it, no handler
            // moves to the runtime any more.
            let _ = t.join();
        }
        for (_, t) in lock(&self.ctx.tasks).drain() {
            t.abort();
        }
    }
}

/// What a sweep over the lanes found.
#[derive(Default)]
struct Sweep {
    /// Calls started or given back.
    worked: bool,
    /// Posted calls wait for a concurrency unit.
    blocked: bool,
}

/// A caller that connected and has not presented its key yet.
struct Pending {
    stream: UnixStream,
    got: [u8; HELLO_LEN],
    n: usize,
    since: Instant,
}

/// Whether `got` is the key message for `key` (compared in constant time).
fn key_matches(got: &[u8; HELLO_LEN], key: &LaneKey) -> bool {
    let diff = got[8..]
        .iter()
        .zip(key)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    got[..8] == KEY_MAGIC[..] && diff == 0
}

struct LaneLoop {
    ctx: Arc<LaneCtx>,
    listener: LaneListener,
    key: LaneKey,
    /// Callers that have not presented their key yet.
    pending: Vec<Pending>,
    own_uid: u32,
    bell: UnixStream,
    cap: u64,
    /// How long to keep polling after the last call before sleeping.
    poll: Duration,
    lanes: Vec<Arc<ServerLane>>,
    decoder: FrameDecoder,
    req: Vec<u8>,
    rep: Vec<u8>,
}

impl LaneLoop {
    fn new(
        ctx: Arc<LaneCtx>,
        listener: LaneListener,
        key: LaneKey,
        bell: UnixStream,
        cap: u64,
        poll: Duration,
    ) -> Self {
        LaneLoop {
            ctx,
            listener,
            key,
            pending: Vec::new(),
            own_uid: nix::unistd::getuid().as_raw(),
            bell,
            cap,
            poll,
            lanes: Vec::new(),
            decoder: FrameDecoder::new(cap as usize),
            req: Vec::new(),
            rep: Vec::new(),
        }
    }

    fn run(mut self) {
        let mut last_work = Instant::now();
        let mut last_check = Instant::now();
        let mut spins = 0u32;
        while !self.ctx.stop.load(Ordering::SeqCst) {
            let sweep = self.sweep();
            if last_check.elapsed() >= SOCKET_CHECK {
                self.check_sockets(PollTimeout::ZERO);
                last_check = Instant::now();
            }
            if sweep.worked {
                last_work = Instant::now();
                spins = 0;
                continue;
            }
            if !sweep.blocked && last_work.elapsed() < self.poll {
                poll_step(&mut spins, 64);
                continue;
            }
            // Sleep: announce it, look once more, then wait for a ring or a socket event.
            // Callers ring after posting; a unit given back rings only while posted calls
            // wait for one (announced before a last look, so no release is missed).
            for l in &self.lanes {
                l.region.set_server_sleeping(true);
            }
            let mut again = self.sweep();
            let admission = self.ctx.admission.clone();
            let blocked = &admission.lane_blocked;
            if again.blocked && !again.worked {
                blocked.store(true, Ordering::SeqCst);
                again = self.sweep();
            }
            if !again.worked {
                self.check_sockets(PollTimeout::from(1000u16));
                last_check = Instant::now();
            }
            blocked.store(false, Ordering::SeqCst);
            for l in &self.lanes {
                l.region.set_server_sleeping(false);
            }
            if again.worked {
                last_work = Instant::now();
            }
        }
        // Stopping: calls not started are given back; their callers go through the proxy.
        for l in &self.lanes {
            for slot in 0..l.region.slots() {
                if l.region.bounce(slot) {
                    l.ring();
                }
            }
            let _ = l.stream.shutdown(std::net::Shutdown::Both);
            l.release_all(&self.ctx.release);
        }
    }

    /// Starts every posted call there is room for (or gives them back while draining).
    fn sweep(&mut self) -> Sweep {
        let mut out = Sweep::default();
        let draining = self.ctx.admission.gauge.is_draining();
        for i in 0..self.lanes.len() {
            let lane = self.lanes[i].clone();
            if lane.closed.load(Ordering::SeqCst) {
                continue;
            }
            lane.release_freed(&self.ctx.release);
            for slot in 0..lane.region.slots() {
                match lane.region.state(slot) {
                    SlotState::Posted => {}
                    SlotState::Invalid(_) => {
                        lane.closed.store(true, Ordering::SeqCst);
                        break;
                    }
                    _ => continue,
                }
                // Posted again: the caller is done with the slot's last result.
                if let Some(o) = lane.unhold(slot) {
                    (self.ctx.release)(o);
                }
                if draining {
                    if lane.region.bounce(slot) {
                        lane.ring();
                        out.worked = true;
                    }
                    continue;
                }
                let Some(permit) = self.ctx.admission.try_acquire(false) else {
                    out.blocked = true;
                    return out;
                };
                match lane.region.take(slot, &mut self.req) {
                    Ok(true) => {}
                    Ok(false) => continue, // withdrawn meanwhile; the permit goes back
                    Err(_) => {
                        // A length beyond the slot: this caller breaks the protocol.
                        lane.closed.store(true, Ordering::SeqCst);
                        break;
                    }
                }
                out.worked = true;
                self.start(&lane, slot, permit);
            }
        }
        out
    }

    /// Runs a taken call: on this thread until the handler first waits, then on the runtime.
    fn start(&mut self, lane: &Arc<ServerLane>, slot: u32, permit: Permit) {
        let mut buf = BytesMut::from(&self.req[..]);
        let Ok(Some(ProxyFrame::Invoke {
            id,
            args,
            timeout_ms,
            ..
        })) = self.decoder.decode::<ProxyFrame>(&mut buf)
        else {
            // Not a call: this caller breaks the protocol; its lane is closed, others go on.
            lane.closed.store(true, Ordering::SeqCst);
            return;
        };
        let deadline = tokio::time::Instant::now().checked_add(Duration::from_millis(timeout_ms));
        let mut fut = (self.ctx.call)(args, timeout_ms);
        let polled = {
            let _rt = self.ctx.rt.enter();
            let mut cx = Context::from_waker(Waker::noop());
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.as_mut().poll(&mut cx)))
        };
        match polled {
            Ok(Poll::Ready(result)) => {
                drop(permit);
                lane.finish(slot, id, result, &mut self.rep, &self.ctx.release);
            }
            Err(_) => {
                drop(permit);
                let e = WireError::new(ErrorCode::Internal, "handler panicked");
                lane.finish(slot, id, Err(e), &mut self.rep, &self.ctx.release);
            }
            Ok(Poll::Pending) => self.spawn(lane.clone(), slot, id, fut, permit, deadline),
        }
    }

    /// Moves a handler that waits to the runtime; its reply is published from there.
    fn spawn(
        &self,
        lane: Arc<ServerLane>,
        slot: u32,
        id: u64,
        fut: Pin<Box<dyn Future<Output = Result<Payload, WireError>> + Send>>,
        permit: Permit,
        deadline: Option<tokio::time::Instant>,
    ) {
        let ctx = self.ctx.clone();
        let task = ctx.next_task.fetch_add(1, Ordering::Relaxed);
        ctx.in_flight.fetch_add(1, Ordering::SeqCst);
        let handle = ctx.rt.spawn(run_holding(fut, permit, deadline));
        lock(&ctx.tasks).insert(task, handle.abort_handle());
        let watcher = ctx.clone();
        ctx.rt.spawn(async move {
            let result = match handle.await {
                Ok(r) => Some(r),
                Err(e) if e.is_panic() => {
                    Some(Err(WireError::new(ErrorCode::Internal, "handler panicked")))
                }
                Err(_) => None, // aborted: the instance is going away
            };
            match result {
                Some(result) => lane.finish(slot, id, result, &mut Vec::new(), &watcher.release),
                None => {
                    if let Some(o) = lane.unhold(slot) {
                        (watcher.release)(o);
                    }
                }
            }
            lock(&watcher.tasks).remove(&task);
            watcher.in_flight.fetch_sub(1, Ordering::SeqCst);
            watcher.admission.released.notify_one();
        });
    }

    /// Waits up to `timeout` for socket events: new lanes, keys presented, rings (drained),
    /// closed lanes.
    fn check_sockets(&mut self, timeout: PollTimeout) {
        let release = self.ctx.release.clone();
        self.lanes.retain(|l| {
            let keep = !l.closed.load(Ordering::SeqCst);
            if !keep {
                let _ = l.stream.shutdown(std::net::Shutdown::Both);
                l.release_all(&release);
            }
            keep
        });
        self.pending.retain(|p| p.since.elapsed() < CONNECT_TIMEOUT);
        // While callers are presenting keys, wake up soon enough to drop the slow ones.
        let timeout = match self.pending.is_empty() || timeout == PollTimeout::ZERO {
            true => timeout,
            false => PollTimeout::from(10u16),
        };
        let (new_lane, bell, ready, keyed) = {
            let mut fds = Vec::with_capacity(self.lanes.len() + self.pending.len() + 2);
            fds.push(PollFd::new(
                self.listener.listener.as_fd(),
                PollFlags::POLLIN,
            ));
            fds.push(PollFd::new(self.bell.as_fd(), PollFlags::POLLIN));
            for l in &self.lanes {
                fds.push(PollFd::new(l.stream.as_fd(), PollFlags::POLLIN));
            }
            for p in &self.pending {
                fds.push(PollFd::new(p.stream.as_fd(), PollFlags::POLLIN));
            }
            if nix::poll::poll(&mut fds, timeout).unwrap_or(0) <= 0 {
                return;
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            let lanes_end = 2 + self.lanes.len();
            (
                ready(&fds[0]),
                ready(&fds[1]),
                fds[2..lanes_end].iter().map(ready).collect::<Vec<_>>(),
                fds[lanes_end..].iter().map(ready).collect::<Vec<_>>(),
            )
        };
        if keyed.iter().any(|r| *r) {
            self.read_keys(&keyed);
        }
        let mut scratch = [0u8; 256];
        if bell {
            while matches!((&self.bell).read(&mut scratch), Ok(n) if n > 0) {}
        }
        for (l, ready) in self.lanes.iter().zip(ready) {
            if !ready {
                continue;
            }
            loop {
                match (&l.stream).read(&mut scratch) {
                    Ok(0) => {
                        l.closed.store(true, Ordering::SeqCst);
                        break;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        l.closed.store(true, Ordering::SeqCst);
                        break;
                    }
                }
            }
        }
        if new_lane {
            self.accept();
        }
    }

    /// Takes new callers: those of another uid are closed at once (they go through the
    /// proxy); the others wait until they present the key.
    fn accept(&mut self) {
        while let Ok((stream, _)) = self.listener.listener.accept() {
            if self.lanes.len() >= MAX_LANES || self.pending.len() >= MAX_PENDING {
                continue; // dropped: that caller goes through the proxy
            }
            let uid =
                nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials);
            if uid.map_or(true, |c| c.uid() != self.own_uid) {
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            self.pending.push(Pending {
                stream,
                got: [0; HELLO_LEN],
                n: 0,
                since: Instant::now(),
            });
        }
    }

    /// Reads what the callers marked in `ready` sent; one that presented the right key gets
    /// its lane, a wrong key or a closed socket is dropped.
    fn read_keys(&mut self, ready: &[bool]) {
        let mut keep = Vec::with_capacity(self.pending.len());
        for (mut p, ready) in std::mem::take(&mut self.pending)
            .into_iter()
            .zip(ready.iter().copied().chain(std::iter::repeat(false)))
        {
            if !ready {
                keep.push(p);
                continue;
            }
            match (&p.stream).read(&mut p.got[p.n..]) {
                Ok(0) => continue,
                Ok(n) => p.n += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => continue,
            }
            if p.n < HELLO_LEN {
                keep.push(p);
                continue;
            }
            if !key_matches(&p.got, &self.key) || self.lanes.len() >= MAX_LANES {
                continue; // dropped: no lane without the key
            }
            match self.open_lane(p.stream) {
                Ok(l) => self.lanes.push(Arc::new(l)),
                Err(e) => tracing_free_warn(&format!("a call lane could not be set up: {e}")),
            }
        }
        self.pending = keep;
    }

    fn open_lane(&self, stream: UnixStream) -> Result<ServerLane, Error> {
        let region = LaneRegion::create(SLOTS, self.cap)?;
        let mut hello = [0u8; HELLO_LEN];
        hello[..8].copy_from_slice(HELLO_MAGIC);
        hello[8..12].copy_from_slice(&SLOTS.to_le_bytes());
        hello[12..20].copy_from_slice(&self.cap.to_le_bytes());
        let sent = shoal_shm::send_with_fds(
            stream.as_fd(),
            &hello,
            &[region.fd(), self.ctx.admission.gauge.fd()],
        )?;
        if sent != HELLO_LEN {
            return Err(Error::protocol("short lane hello"));
        }
        stream.set_nonblocking(true)?;
        Ok(ServerLane::new(region, stream))
    }
}
