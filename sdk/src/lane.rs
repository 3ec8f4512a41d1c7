//! Call lanes: a caller and a function instance on the same node talk over shared memory
//! instead of through the proxy (two socket hops and two wake-ups fewer per call, none at all
//! while both sides are busy). The proxy stays the router: it tells callers which local
//! instances offer a lane, stops naming an instance once it drains, and carries every call a
//! lane cannot (no room, another node, a lane gone).
//!
//! - The instance runs a lane thread: it listens on a Unix socket next to the proxy's, hands
//!   each caller connection a [`LaneRegion`] and the instance's [`LaneGauge`] (two memfds),
//!   then polls the slots of all its lanes; once idle for a while (200 µs by default,
//!   [`crate::FunctionInstance::poll_after_call`]) it sleeps in `poll(2)` on the sockets.
//! - A handler runs on the lane thread until it first awaits, then moves to the instance's
//!   runtime; a call holds one of the instance's concurrency units (shared with calls from
//!   the proxy) until it answers or its deadline passes.
//! - A caller posts into a free slot of the least-busy lane with room, spins briefly for the
//!   reply, then sleeps until the instance rings the lane's socket.
//! - A call the instance never started (it drains, or its lane closed) goes through the proxy
//!   instead. A call that started and lost its lane fails with `InstanceFailed`, as through
//!   the proxy.
use crate::Error;
use bytes::BytesMut;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use shoal_protocol::{
    encode_frame, CallerFrame, ErrorCode, FrameDecoder, LaneInfo, Payload, ProxyFrame, WireError,
};
use shoal_shm::{LaneGauge, LaneRegion, ShmError, SlotState};
use std::collections::HashMap;
use std::future::Future;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Slots per lane: calls one caller connection can have in flight on one instance through
/// it (more go through the proxy).
const SLOTS: u32 = 16;
/// Room for a frame's own bytes beside its payload.
const FRAME_SLACK: u64 = 1024;
/// Largest slot: payloads above this travel through the proxy (or as objects).
const MAX_SLOT: u64 = 1 << 20;
/// Lanes one instance serves at most; further callers go through the proxy.
const MAX_LANES: usize = 1024;
/// How often a busy lane thread still looks at its sockets (new lanes, closed ones).
const SOCKET_CHECK: Duration = Duration::from_millis(1);
/// Magic of the hello an instance sends with a lane's two fds.
const HELLO_MAGIC: &[u8; 8] = b"SHOALLN1";
const HELLO_LEN: usize = 24;
/// A caller waits this long at most for an instance's lane hello.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A slot's capacity for an inline limit: every inline payload fits with its framing.
pub(crate) fn slot_capacity(inline_limit: u64) -> u64 {
    (inline_limit.min(MAX_SLOT) + FRAME_SLACK).next_multiple_of(64)
}

/// One step of a polling loop: a pure spin for the first `pure` steps, then the thread
/// yields (so other threads on a busy machine run first).
fn poll_step(spins: &mut u32, pure: u32) {
    *spins = spins.saturating_add(1);
    if *spins < pure {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

fn encode_result(id: u64, result: Result<Payload, WireError>, out: &mut Vec<u8>) {
    out.clear();
    if encode_frame(&CallerFrame::Result { id, result }, out).is_err() {
        out.clear();
    }
}

// ------------------------------------------------------------------------------------------
// Instance side
// ------------------------------------------------------------------------------------------

/// A call's work: the handler applied to an argument with `timeout_ms` left.
pub(crate) type CallFn = Arc<
    dyn Fn(Payload, u64) -> Pin<Box<dyn Future<Output = Result<Payload, WireError>> + Send>>
        + Send
        + Sync,
>;

/// The instance's concurrency units, shared by calls from the proxy and from lanes (the
/// count itself lives in the [`LaneGauge`] so callers can read it).
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
}

impl ServerLane {
    /// Publishes a reply and rings the caller if it sleeps.
    fn finish(&self, slot: u32, id: u64, result: Result<Payload, WireError>, buf: &mut Vec<u8>) {
        encode_result(id, result, buf);
        if !self.region.complete(slot, buf) {
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

    fn ring(&self) {
        // A full socket buffer already holds a ring.
        let _ = (&self.stream).write(&[1]);
    }
}

/// State the lane thread shares with the tasks it spawns and with its owner.
struct LaneCtx {
    admission: Arc<Admission>,
    call: CallFn,
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
    /// Starts serving lanes on `listener`.
    pub(crate) fn start(
        listener: LaneListener,
        admission: Arc<Admission>,
        call: CallFn,
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
            .spawn(move || LaneLoop::new(thread_ctx, listener, bell_rx, cap, poll).run())?;
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

struct LaneLoop {
    ctx: Arc<LaneCtx>,
    listener: LaneListener,
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
        bell: UnixStream,
        cap: u64,
        poll: Duration,
    ) -> Self {
        LaneLoop {
            ctx,
            listener,
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
            for slot in 0..lane.region.slots() {
                match lane.region.state(slot) {
                    SlotState::Posted => {}
                    SlotState::Invalid(_) => {
                        lane.closed.store(true, Ordering::SeqCst);
                        break;
                    }
                    _ => continue,
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
                if !lane.region.take(slot, &mut self.req) {
                    continue; // withdrawn meanwhile; the permit goes back
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
                lane.finish(slot, id, result, &mut self.rep);
            }
            Err(_) => {
                drop(permit);
                let e = WireError::new(ErrorCode::Internal, "handler panicked");
                lane.finish(slot, id, Err(e), &mut self.rep);
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
            if let Some(result) = result {
                lane.finish(slot, id, result, &mut Vec::new());
            }
            lock(&watcher.tasks).remove(&task);
            watcher.in_flight.fetch_sub(1, Ordering::SeqCst);
            watcher.admission.released.notify_one();
        });
    }

    /// Waits up to `timeout` for socket events: new lanes, rings (drained), closed lanes.
    fn check_sockets(&mut self, timeout: PollTimeout) {
        self.lanes.retain(|l| {
            let keep = !l.closed.load(Ordering::SeqCst);
            if !keep {
                let _ = l.stream.shutdown(std::net::Shutdown::Both);
            }
            keep
        });
        let (new_lane, bell, ready) = {
            let mut fds = Vec::with_capacity(self.lanes.len() + 2);
            fds.push(PollFd::new(
                self.listener.listener.as_fd(),
                PollFlags::POLLIN,
            ));
            fds.push(PollFd::new(self.bell.as_fd(), PollFlags::POLLIN));
            for l in &self.lanes {
                fds.push(PollFd::new(l.stream.as_fd(), PollFlags::POLLIN));
            }
            if nix::poll::poll(&mut fds, timeout).unwrap_or(0) <= 0 {
                return;
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (
                ready(&fds[0]),
                ready(&fds[1]),
                fds[2..].iter().map(ready).collect::<Vec<_>>(),
            )
        };
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

    fn accept(&mut self) {
        while let Ok((stream, _)) = self.listener.listener.accept() {
            if self.lanes.len() >= MAX_LANES {
                continue; // dropped: that caller goes through the proxy
            }
            match self.open_lane(stream) {
                Ok(l) => self.lanes.push(Arc::new(l)),
                Err(e) => tracing_free_warn(&format!("a call lane could not be set up: {e}")),
            }
        }
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
        Ok(ServerLane {
            region,
            stream,
            closed: AtomicBool::new(false),
        })
    }
}

// ------------------------------------------------------------------------------------------
// Caller side
// ------------------------------------------------------------------------------------------

/// How a lane call ended.
pub(crate) enum LaneOutcome {
    /// The instance answered (or the call failed after it started).
    Answered(Result<Payload, WireError>),
    /// The call never started; it may go through the proxy.
    NotStarted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotUse {
    Free,
    Busy,
    /// Its call timed out after the instance took it: free again once the reply lands.
    Abandoned,
}

/// One caller connection's lane to one local instance.
#[derive(Debug)]
pub(crate) struct CallerLane {
    pub(crate) instance_id: String,
    /// The socket it was handed out on.
    pub(crate) path: String,
    region: LaneRegion,
    gauge: LaneGauge,
    stream: Arc<tokio::net::UnixStream>,
    slots: Mutex<Vec<SlotUse>>,
    in_flight: AtomicUsize,
    dead: Arc<AtomicBool>,
    rung: Arc<Notify>,
    reader: tokio::task::JoinHandle<()>,
    decoder: FrameDecoder,
}

impl Drop for CallerLane {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn would_block(e: &ShmError) -> bool {
    matches!(e, ShmError::FdPass(nix::errno::Errno::EAGAIN))
}

impl CallerLane {
    /// Connects to an instance's lane socket and maps what it hands out.
    pub(crate) async fn connect(info: &LaneInfo) -> Result<CallerLane, Error> {
        tokio::time::timeout(CONNECT_TIMEOUT, Self::open(info))
            .await
            .map_err(|_| Error::protocol("the instance did not hand out a lane in time"))?
    }

    async fn open(info: &LaneInfo) -> Result<CallerLane, Error> {
        let stream = tokio::net::UnixStream::connect(&info.path).await?;
        let mut hello = [0u8; HELLO_LEN];
        let (n, mut fds) = loop {
            stream.readable().await?;
            match shoal_shm::recv_with_fds(stream.as_fd(), &mut hello, 2) {
                Ok(r) => break r,
                Err(e) if would_block(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        if n != HELLO_LEN || &hello[..8] != HELLO_MAGIC || fds.len() != 2 {
            return Err(Error::protocol("malformed lane hello"));
        }
        let slots = u32::from_le_bytes(hello[8..12].try_into().unwrap_or_default());
        let cap = u64::from_le_bytes(hello[12..20].try_into().unwrap_or_default());
        let gauge_fd = fds.pop().ok_or_else(|| Error::protocol("no gauge fd"))?;
        let region_fd = fds.pop().ok_or_else(|| Error::protocol("no lane fd"))?;
        let region = LaneRegion::open(region_fd, slots, cap)?;
        let gauge = LaneGauge::open(gauge_fd)?;
        let stream = Arc::new(stream);
        let dead = Arc::new(AtomicBool::new(false));
        let rung = Arc::new(Notify::new());
        let reader = tokio::spawn(read_rings(stream.clone(), dead.clone(), rung.clone()));
        Ok(CallerLane {
            instance_id: info.instance_id.clone(),
            path: info.path.clone(),
            slots: Mutex::new(vec![SlotUse::Free; slots as usize]),
            region,
            gauge,
            stream,
            in_flight: AtomicUsize::new(0),
            dead,
            rung,
            reader,
            decoder: FrameDecoder::new(cap as usize),
        })
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// Calls in flight through this lane.
    pub(crate) fn load(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether a call posted now would start at once (a free slot, and room in the instance).
    pub(crate) fn has_room(&self) -> bool {
        !self.is_dead()
            && self.gauge.has_room()
            && lock(&self.slots).iter().any(|s| *s != SlotUse::Busy)
    }

    fn claim_slot(&self) -> Option<u32> {
        let mut slots = lock(&self.slots);
        for (i, s) in slots.iter_mut().enumerate() {
            let i = i as u32;
            match *s {
                SlotUse::Free => {}
                SlotUse::Abandoned if self.region.reset(i) => {}
                _ => continue,
            }
            *s = SlotUse::Busy;
            return Some(i);
        }
        None
    }

    fn set_slot(&self, slot: u32, to: SlotUse) {
        if let Some(s) = lock(&self.slots).get_mut(slot as usize) {
            *s = to;
        }
    }

    /// Posts `frame` (an encoded `Invoke`) and waits for its answer until `deadline`,
    /// polling for `spin` first when it is this lane's only call.
    pub(crate) async fn call(
        &self,
        frame: &[u8],
        deadline: tokio::time::Instant,
        spin: Duration,
    ) -> LaneOutcome {
        let Some(slot) = self.claim_slot() else {
            return LaneOutcome::NotStarted;
        };
        if !self.region.post(slot, frame) {
            self.set_slot(slot, SlotUse::Free);
            return LaneOutcome::NotStarted;
        }
        let alone = self.in_flight.fetch_add(1, Ordering::SeqCst) == 0;
        if self.region.server_sleeps() {
            let _ = self.stream.try_write(&[1]);
        }
        let out = self
            .wait(slot, deadline, if alone { spin } else { Duration::ZERO })
            .await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        out
    }

    /// What `slot` holds now, if the call is over.
    fn settle(&self, slot: u32, timed_out: bool) -> Option<LaneOutcome> {
        match self.region.state(slot) {
            SlotState::Done => {
                let mut buf = Vec::new();
                self.region.reply(slot, &mut buf);
                self.set_slot(slot, SlotUse::Free);
                let mut b = BytesMut::from(&buf[..]);
                Some(LaneOutcome::Answered(
                    match self.decoder.decode::<CallerFrame>(&mut b) {
                        Ok(Some(CallerFrame::Result { result, .. })) => result,
                        _ => {
                            self.dead.store(true, Ordering::SeqCst);
                            Err(WireError::new(
                                ErrorCode::ProtocolError,
                                "malformed reply on the call lane",
                            ))
                        }
                    },
                ))
            }
            SlotState::Bounced => {
                self.region.reset(slot);
                self.set_slot(slot, SlotUse::Free);
                Some(LaneOutcome::NotStarted)
            }
            SlotState::Posted if timed_out || self.is_dead() => {
                if self.region.withdraw(slot) {
                    self.set_slot(slot, SlotUse::Free);
                    return Some(if timed_out {
                        LaneOutcome::Answered(Err(timeout_error()))
                    } else {
                        LaneOutcome::NotStarted
                    });
                }
                None // taken meanwhile: look again
            }
            SlotState::Taken if timed_out || self.is_dead() => {
                self.set_slot(slot, SlotUse::Abandoned);
                Some(LaneOutcome::Answered(Err(if timed_out {
                    timeout_error()
                } else {
                    WireError::new(
                        ErrorCode::InstanceFailed,
                        "the instance closed its call lane mid-call",
                    )
                })))
            }
            SlotState::Posted | SlotState::Taken => None,
            SlotState::Free | SlotState::Invalid(_) => {
                self.dead.store(true, Ordering::SeqCst);
                self.set_slot(slot, SlotUse::Abandoned);
                Some(LaneOutcome::Answered(Err(WireError::new(
                    ErrorCode::InstanceFailed,
                    "the call lane was corrupted",
                ))))
            }
        }
    }

    async fn wait(&self, slot: u32, deadline: tokio::time::Instant, spin: Duration) -> LaneOutcome {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let timed_out = tokio::time::Instant::now() >= deadline;
            if let Some(out) = self.settle(slot, timed_out) {
                return out;
            }
            if timed_out {
                continue; // taken meanwhile: settle again
            }
            if start.elapsed() < spin {
                poll_step(&mut spins, 16);
                continue;
            }
            let rung = self.rung.notified();
            tokio::pin!(rung);
            rung.as_mut().enable();
            self.region.caller_sleeping(true);
            if matches!(
                self.region.state(slot),
                SlotState::Posted | SlotState::Taken
            ) && !self.is_dead()
            {
                let _ = tokio::time::timeout_at(deadline, rung).await;
            }
            self.region.caller_sleeping(false);
        }
    }
}

fn timeout_error() -> WireError {
    WireError::new(
        ErrorCode::Timeout,
        "no answer from the instance by the deadline",
    )
}

/// Reads rings off a lane's socket and wakes the waiting calls; marks the lane dead at EOF.
async fn read_rings(stream: Arc<tokio::net::UnixStream>, dead: Arc<AtomicBool>, rung: Arc<Notify>) {
    let mut buf = [0u8; 256];
    loop {
        if stream.readable().await.is_err() {
            break;
        }
        match stream.try_read(&mut buf) {
            Ok(0) => break,
            Ok(_) => rung.notify_waiters(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
    }
    dead.store(true, Ordering::SeqCst);
    rung.notify_waiters();
}

/// A caller's lanes to the local instances of one function.
#[derive(Debug)]
pub(crate) struct LaneSet {
    pub(crate) lanes: Vec<Arc<CallerLane>>,
    pub(crate) checked: Instant,
}

impl LaneSet {
    /// The lane a call should take: to `instance` if named, with room, least busy first.
    pub(crate) fn pick(&self, instance: Option<&str>, turn: usize) -> Option<Arc<CallerLane>> {
        let n = self.lanes.len();
        (0..n)
            .map(|k| &self.lanes[(turn + k) % n])
            .filter(|l| instance.is_none_or(|i| l.instance_id == i))
            .filter(|l| l.has_room())
            .min_by_key(|l| l.load())
            .cloned()
    }
}
