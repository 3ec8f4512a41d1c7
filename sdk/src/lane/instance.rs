//! The instance's side of call lanes: the listener that hands each caller a region and the gauge,
//! the lane thread that polls every lane's slots (then sleeps in `poll(2)` once idle), and the
//! admission that makes lane calls and proxy calls share the instance's concurrency units.
use super::{
    encode_result, lock, poll_step, slot_capacity, HELLO_LEN, HELLO_MAGIC, MAX_LANES, SLOTS,
    SOCKET_CHECK,
};
use crate::Error;
use bytes::BytesMut;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use shoal_protocol::{ErrorCode, FrameDecoder, Payload, ProxyFrame, WireError};
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
