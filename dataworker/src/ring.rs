//! The mailbox poller: one OS thread that serves requests clients post to their shared-memory
//! mailboxes, so a request costs no syscall while the poller is awake.
//!
//! The poller spins for `ring_spin` after its last piece of work (yielding the CPU between
//! sweeps), then sleeps on the control region's doorbell until a client rings it. Requests
//! are handled by the same [`Worker::handle`] as socket requests, under the same store lock.
//!
//! Ordering with the socket: one-way frames (release, abort) still travel on the socket. A
//! mailbox request carries how many one-way frames the client had written before it; the
//! poller handles it only after the connection task has handled that many. Such a request is
//! not work: the poller sleeps over it (a client announcing one-way frames it never sends
//! cannot keep it spinning), having told the client's [`RingClient`] what count it waits for;
//! the connection task rings the doorbell when it reaches that count (the same Dekker pattern
//! as the sleep itself: announce, re-check; publish, then look).
//!
//! Bounds: the mailbox holds one request, and requests that must wait (remote gets, cluster
//! deletes) continue in a task. The protocol allows one such task per client (a client posts
//! its next request only after reading the reply); a client that posts more anyway gets
//! `Overloaded` at once past [`MAX_DEFERRED_PER_CLIENT`].
//!
//! Lifecycle: a client's mailbox is registered when it connects and closed (under its state
//! lock, so an in-flight request finishes first) before the client's resources are released.
use crate::conn::op_name;
use crate::local::{GetMode, GetOutcome};
use crate::ops;
use crate::tenancy::{self, Caller};
use crate::worker::Worker;
use shoal_protocol::{
    encode_frame, ClientFrame, ErrorCode, FrameDecoder, Request, Response, ServerFrame,
};
use shoal_shm::{Ctl, Mailbox};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Most requests of one client's mailbox waiting in tasks at once; see the module docs.
pub(crate) const MAX_DEFERRED_PER_CLIENT: usize = 4;

#[derive(Debug)]
struct MailboxState {
    open: bool,
    last: u32,
}

/// One client's mailbox as the worker sees it.
#[derive(Debug)]
pub(crate) struct RingClient {
    client: u64,
    /// Who the client is: its requests are checked and qualified as on its socket.
    caller: Arc<Caller>,
    mailbox: Mailbox,
    state: Mutex<MailboxState>,
    /// One-way socket frames of this client that the connection task has handled.
    oneways_done: AtomicU64,
    /// The count of one-way frames a pending request waits for (0: none); the connection
    /// task rings `bell` when it reaches it.
    waiting_for: AtomicU64,
    /// The poller's doorbell, set by the poller before it first waits for one-way frames.
    bell: OnceLock<Arc<Ctl>>,
    /// Requests handed to the runtime (remote gets, cluster deletes); they answer in the
    /// mailbox when done.
    deferred: TaskTracker,
    cancel: CancellationToken,
}

impl RingClient {
    pub(crate) fn new(client: u64, mailbox: Mailbox, caller: Arc<Caller>) -> Arc<Self> {
        Arc::new(Self {
            client,
            caller,
            mailbox,
            state: Mutex::new(MailboxState {
                open: true,
                last: 0,
            }),
            oneways_done: AtomicU64::new(0),
            waiting_for: AtomicU64::new(0),
            bell: OnceLock::new(),
            deferred: TaskTracker::new(),
            cancel: CancellationToken::new(),
        })
    }

    /// Stops this client's deferred requests and waits for them. Call before its resources
    /// are released: afterwards nothing pins on its behalf any more (a deferred request pins
    /// only in the synchronous step that also writes its reply).
    pub(crate) async fn close_deferred(&self) {
        self.cancel.cancel();
        self.deferred.close();
        self.deferred.wait().await;
    }

    /// Answers request `seq` in a task, or `Overloaded` at once when the client already has
    /// [`MAX_DEFERRED_PER_CLIENT`] of them.
    fn defer(
        self: &Arc<Self>,
        worker: &Arc<Worker>,
        seq: u32,
        id: u32,
        req: Request,
        out: &mut Vec<u8>,
    ) {
        if self.deferred.len() >= MAX_DEFERRED_PER_CLIENT {
            metrics::counter!("shoal_mailbox_overloaded_total").increment(1);
            let resp = Response::error(
                ErrorCode::Overloaded,
                format!(
                    "more than {MAX_DEFERRED_PER_CLIENT} waiting mailbox requests from this client"
                ),
            );
            encode_reply(&self.mailbox, id, resp, out);
            self.mailbox.respond(seq, out);
            return;
        }
        let (rc, worker2) = (self.clone(), worker.clone());
        let cancel = self.cancel.clone();
        metrics::gauge!("shoal_mailbox_deferred").increment(1.0);
        let fut = self.deferred.track_future(async move {
            let _count = DeferredGauge;
            let resp = tokio::select! {
                _ = cancel.cancelled() => return,
                r = ops::run(worker2.clone(), rc.client, req) => r,
            };
            let st = rc.lock();
            if st.open {
                let mut out = Vec::new();
                encode_reply(&rc.mailbox, id, resp, &mut out);
                rc.mailbox.respond(seq, &out);
                worker2.local.ctl.wake_sleepers();
            }
        });
        worker.rt.spawn(fut);
    }

    pub(crate) fn mailbox(&self) -> &Mailbox {
        &self.mailbox
    }

    /// Called by the connection task after each one-way frame: wakes the poller if a pending
    /// request was waiting for this many.
    pub(crate) fn oneway_done(&self) {
        let done = self.oneways_done.fetch_add(1, Ordering::SeqCst) + 1;
        let want = self.waiting_for.load(Ordering::SeqCst);
        if want != 0 && done >= want {
            if let Some(bell) = self.bell.get() {
                bell.ring_doorbell();
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MailboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the connection task has handled the `oneways` frames a request waits for. If
    /// not, announces the wait (so that `oneway_done` rings `bell`), then looks again.
    fn oneways_arrived(&self, oneways: u64, bell: &Arc<Ctl>) -> bool {
        if self.oneways_done.load(Ordering::SeqCst) >= oneways {
            return true;
        }
        self.bell.get_or_init(|| bell.clone());
        self.waiting_for.store(oneways, Ordering::SeqCst);
        self.oneways_done.load(Ordering::SeqCst) >= oneways
    }

    /// A request the poller can serve now (not one still waiting for one-way frames).
    fn has_work(&self, bell: &Arc<Ctl>) -> bool {
        let st = self.lock();
        st.open
            && self
                .mailbox
                .pending(st.last)
                .is_some_and(|(_, oneways)| self.oneways_arrived(oneways, bell))
    }
}

/// Counts a deferred request in `shoal_mailbox_deferred` for as long as it lives.
struct DeferredGauge;

impl Drop for DeferredGauge {
    fn drop(&mut self) {
        metrics::gauge!("shoal_mailbox_deferred").decrement(1.0);
    }
}

/// The set of mailboxes and the poller's stop flag.
#[derive(Debug, Default)]
pub(crate) struct Poller {
    clients: Mutex<Vec<Arc<RingClient>>>,
    version: AtomicU64,
    stop: AtomicBool,
}

impl Poller {
    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Arc<RingClient>>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn add(&self, rc: Arc<RingClient>) {
        self.list().push(rc);
        self.version.fetch_add(1, Ordering::SeqCst);
    }

    /// Closes a client's mailbox; returns once no request of it is being handled.
    pub(crate) fn remove(&self, client: u64) {
        let rc = {
            let mut l = self.list();
            let i = l.iter().position(|r| r.client == client);
            i.map(|i| l.swap_remove(i))
        };
        self.version.fetch_add(1, Ordering::SeqCst);
        if let Some(rc) = rc {
            rc.lock().open = false;
        }
    }

    pub(crate) fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// The poller thread's body; returns after [`Poller::request_stop`] (and a doorbell).
    pub(crate) fn run(&self, worker: &Arc<Worker>, spin: Duration) {
        let decoder = FrameDecoder::new(worker.local.cfg.max_frame());
        let (mut req, mut out) = (Vec::new(), Vec::new());
        let mut snapshot: Vec<Arc<RingClient>> = Vec::new();
        let mut seen = u64::MAX;
        let mut idle_since = Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            let v = self.version.load(Ordering::SeqCst);
            if v != seen {
                snapshot = self.list().clone();
                seen = v;
            }
            let mut did = false;
            for rc in &snapshot {
                did |= serve_one(worker, &decoder, rc, &mut req, &mut out);
            }
            if did {
                worker.local.ctl.wake_sleepers();
                idle_since = Instant::now();
            } else if idle_since.elapsed() < spin {
                // Let client threads run on a small machine; come straight back.
                std::thread::yield_now();
            } else {
                let ctl = &worker.local.ctl;
                let slept = Cell::new(false);
                ctl.worker_sleep(
                    || {
                        let busy = snapshot.iter().any(|rc| rc.has_work(ctl));
                        slept.set(!busy);
                        busy
                    },
                    Duration::from_millis(100),
                );
                if slept.get() {
                    metrics::counter!("shoal_mailbox_poller_sleeps_total").increment(1);
                }
                idle_since = Instant::now();
            }
        }
    }
}

fn serve_one(
    worker: &Arc<Worker>,
    decoder: &FrameDecoder,
    rc: &Arc<RingClient>,
    req: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> bool {
    let mut st = rc.lock();
    if !st.open {
        return false;
    }
    let Some((seq, oneways)) = rc.mailbox.pending(st.last) else {
        return false;
    };
    if !rc.oneways_arrived(oneways, &worker.local.ctl) {
        // Socket frames that came first are not handled yet; the connection task rings when
        // they are.
        return false;
    }
    if rc.waiting_for.load(Ordering::Relaxed) != 0 {
        rc.waiting_for.store(0, Ordering::SeqCst);
    }
    st.last = seq;
    rc.mailbox.request(req);
    let mut buf = bytes::BytesMut::from(&req[..]);
    let (id, resp) = match decoder.decode::<ClientFrame>(&mut buf) {
        Ok(Some(f)) => {
            let op = op_name(&f.req);
            let started = Instant::now();
            metrics::counter!("shoal_requests_total", "op" => op, "path" => "mailbox").increment(1);
            let in_cluster = worker.in_cluster();
            let req = match tenancy::qualify(f.req, &rc.caller) {
                Ok(r) => r,
                Err(e) => {
                    encode_reply(&rc.mailbox, f.id, Response::Error(e), out);
                    rc.mailbox.respond(seq, out);
                    return true;
                }
            };
            let resp = match req {
                Request::Get { ids, timeout_ms: 0 } => {
                    // In a cluster a miss may be sealed on another node: pull it in a task.
                    let mode = if in_cluster {
                        GetMode::Wait
                    } else {
                        GetMode::NoWait
                    };
                    match worker.local.try_get(rc.client, &ids, mode) {
                        GetOutcome::Done(r) => r,
                        GetOutcome::Wait(_) => {
                            let req = Request::Get { ids, timeout_ms: 0 };
                            rc.defer(worker, seq, f.id, req, out);
                            return true;
                        }
                    }
                }
                Request::Get { .. } => Response::error(
                    ErrorCode::InvalidArgument,
                    "waiting gets go through the socket",
                ),
                r if ops::is_deferred(worker, &r) => {
                    rc.defer(worker, seq, f.id, r, out);
                    return true;
                }
                r => worker.handle(rc.client, r),
            };
            metrics::histogram!("shoal_request_seconds", "op" => op)
                .record(started.elapsed().as_secs_f64());
            (f.id, resp)
        }
        Ok(None) => (
            0,
            Response::error(ErrorCode::ProtocolError, "truncated mailbox request"),
        ),
        Err(e) => (
            0,
            Response::error(
                ErrorCode::ProtocolError,
                format!("malformed mailbox request: {e}"),
            ),
        ),
    };
    encode_reply(&rc.mailbox, id, resp, out);
    rc.mailbox.respond(seq, out);
    true
}

fn encode_reply(mailbox: &Mailbox, id: u32, resp: Response, out: &mut Vec<u8>) {
    out.clear();
    let reply = ServerFrame::Reply { id, resp };
    if encode_frame(&reply, out).is_err() || out.len() as u64 > mailbox.capacity() {
        out.clear();
        let resp = Response::error(
            ErrorCode::TooLarge,
            "reply does not fit the mailbox; ask on the socket",
        );
        let _ = encode_frame(&ServerFrame::Reply { id, resp }, out);
    }
}
