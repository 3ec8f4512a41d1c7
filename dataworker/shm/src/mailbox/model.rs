//! Loom models of the mailbox: the production protocol code ([`Proto`], [`Doorbell`],
//! [`ReplyBell`]) run on loom's atomics in ordinary memory, a client thread against the
//! worker, under every interleaving loom explores (bounded preemptions).
//!
//! What a run checks:
//! - No lost wake-up: the model futex has no timeout, so if a ring or a reply wake-up is
//!   lost, both threads end up blocked and loom reports a deadlock.
//! - The request and reply bytes are handed over, never shared: the buffers are loom
//!   `UnsafeCell`s, and loom fails the run if one side can touch them while the other does
//!   without a happens-before edge between them.
//! - Each reply is the one to its request.
//!
//! `without_the_fences_a_wake_up_is_lost` runs the same code with the `SeqCst` fences
//! removed and expects loom to find the lost wake-up: the models can fail.
use super::words::{Buf, Futex, Word32};
use super::{Doorbell, Proto, ReplyBell};
use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicU32, AtomicU64};
use loom::sync::{Condvar, Mutex};
use std::sync::atomic::Ordering;

/// Bytes a model buffer holds.
const CAP: usize = 4;

/// A futex in the model: a waiter checks the word and sleeps under a mutex, which a waker
/// takes before it notifies, so no wake can slip between the check and the sleep. Waits
/// have no timeout.
#[derive(Debug)]
pub(crate) struct ModelFutex {
    lock: Mutex<()>,
    cv: Condvar,
}

impl ModelFutex {
    pub(crate) fn new() -> Self {
        ModelFutex {
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }
}

impl<W: Word32> Futex<W> for ModelFutex {
    fn wait(&self, word: &W, expected: u32) {
        let guard = self.lock.lock().unwrap();
        if word.load(Ordering::SeqCst) == expected {
            drop(self.cv.wait(guard).unwrap());
        }
    }

    fn wake(&self, _word: &W, _n: i32) {
        let _guard = self.lock.lock().unwrap();
        self.cv.notify_all();
    }
}

/// A buffer in the model: loom checks every access to it for races.
#[derive(Debug)]
pub(crate) struct CellBuf(UnsafeCell<[u8; CAP]>);

// SAFETY: the cell is only accessed through loom's `with`/`with_mut`, which check every
// access for races across the model's threads (and fail the model if one is possible).
unsafe impl Sync for CellBuf {}

impl CellBuf {
    pub(crate) fn new() -> Self {
        CellBuf(UnsafeCell::new([0; CAP]))
    }
}

impl Buf for &CellBuf {
    fn put(&self, data: &[u8]) -> bool {
        if data.len() > CAP {
            return false;
        }
        self.0.with_mut(|p| {
            // SAFETY: `p` points to the live array inside the cell; loom's `with_mut` fails
            // the model if another thread may access the cell concurrently.
            unsafe { (&mut *p)[..data.len()].copy_from_slice(data) }
        });
        true
    }

    fn get(&self, len: usize, out: &mut Vec<u8>) -> bool {
        out.clear();
        if len > CAP {
            return false;
        }
        self.0.with(|p| {
            // SAFETY: as in `put`; `with` fails the model on a concurrent write.
            out.extend_from_slice(unsafe { &(&*p)[..len] })
        });
        true
    }
}

/// A word whose `SeqCst` fence does nothing: the protocol as it would be without its fences.
#[derive(Debug)]
pub(crate) struct NoFence(pub(crate) AtomicU32);

impl Word32 for NoFence {
    fn load(&self, order: Ordering) -> u32 {
        self.0.load(order)
    }
    fn store(&self, v: u32, order: Ordering) {
        self.0.store(v, order)
    }
    fn fetch_add(&self, v: u32, order: Ordering) -> u32 {
        self.0.fetch_add(v, order)
    }
    fn fetch_sub(&self, v: u32, order: Ordering) -> u32 {
        self.0.fetch_sub(v, order)
    }
    fn compare_exchange(
        &self,
        cur: u32,
        new: u32,
        ok: Ordering,
        err: Ordering,
    ) -> Result<u32, u32> {
        self.0.compare_exchange(cur, new, ok, err)
    }
    fn fence_seq_cst() {}
}

/// Everything a client and the worker share: the mailbox, and the control region's doorbell
/// and reply-sleeper words.
#[derive(Debug)]
struct Shared<W> {
    req_seq: W,
    resp_seq: W,
    req_len: W,
    resp_len: W,
    req_oneways: AtomicU64,
    req: CellBuf,
    resp: CellBuf,
    worker_sleeping: AtomicU64,
    doorbell: W,
    sleepers: W,
    reply_epoch: W,
    futex: ModelFutex,
}

impl<W: Word32> Shared<W> {
    fn new(word: impl Fn() -> W) -> Self {
        Shared {
            req_seq: word(),
            resp_seq: word(),
            req_len: word(),
            resp_len: word(),
            req_oneways: AtomicU64::new(0),
            req: CellBuf::new(),
            resp: CellBuf::new(),
            worker_sleeping: AtomicU64::new(0),
            doorbell: word(),
            sleepers: word(),
            reply_epoch: word(),
            futex: ModelFutex::new(),
        }
    }

    fn proto(&self) -> Proto<'_, W, AtomicU64, &CellBuf> {
        Proto {
            req_seq: &self.req_seq,
            resp_seq: &self.resp_seq,
            req_len: &self.req_len,
            resp_len: &self.resp_len,
            req_oneways: &self.req_oneways,
            req: &self.req,
            resp: &self.resp,
        }
    }

    fn doorbell(&self) -> Doorbell<'_, AtomicU64, W> {
        Doorbell {
            sleeping: &self.worker_sleeping,
            bell: &self.doorbell,
        }
    }

    fn replies(&self) -> ReplyBell<'_, W> {
        ReplyBell {
            sleepers: &self.sleepers,
            epoch: &self.reply_epoch,
        }
    }

    /// The client as the SDK runs it: post, ring, then sleep until the reply is there
    /// (no spinning: the model goes straight to the sleep, the path that can lose a wake-up).
    fn client(&self, requests: u32) {
        let p = self.proto();
        let mut out = Vec::new();
        for seq in 1..=requests {
            assert!(p.post(seq, u64::from(seq), &[seq as u8; 2]));
            self.doorbell().ring(&self.futex);
            while !p.reply_ready(seq) {
                self.replies()
                    .sleep_until(&self.futex, || p.reply_ready(seq));
            }
            assert!(p.reply(&mut out));
            assert_eq!(out, [seq as u8 + 100; 3], "reply {seq}");
        }
    }

    /// The worker's poller: serve what is pending, else sleep on the doorbell.
    fn worker(&self, requests: u32) {
        let p = self.proto();
        let (mut last, mut req) = (0, Vec::new());
        while last < requests {
            match p.pending(last) {
                Some((seq, oneways)) => {
                    assert_eq!(oneways, u64::from(seq), "the count posted with it");
                    assert!(p.request(&mut req));
                    assert_eq!(req, [seq as u8; 2], "request {seq}");
                    assert!(p.respond(seq, &[seq as u8 + 100; 3]));
                    self.replies().wake(&self.futex);
                    last = seq;
                }
                None => self
                    .doorbell()
                    .sleep(&self.futex, || p.pending(last).is_some()),
            }
        }
    }
}

fn run<W: Word32 + Send + Sync + 'static>(word: fn() -> W, requests: u32, preemptions: usize) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(preemptions);
    b.check(move || {
        let shared = loom::sync::Arc::new(Shared::new(word));
        let s = shared.clone();
        let client = loom::thread::spawn(move || s.client(requests));
        shared.worker(requests);
        client.join().unwrap();
    });
}

/// One request, with both sides free to go to sleep at any point.
#[test]
fn a_request_is_answered_and_no_wake_up_is_lost() {
    run(|| AtomicU32::new(0), 1, 3);
}

/// Two requests in a row: the second reuses both buffers, which is safe only because the
/// client posts it after reading the first reply, and the worker reads it after seeing it.
#[test]
fn buffers_are_reused_only_after_the_handover() {
    run(|| AtomicU32::new(0), 2, 2);
}

/// The same protocol without its fences: loom (which, like the hardware, lets a load pass an
/// earlier store to another word unless a fence stands between) finds a lost wake-up.
#[test]
fn without_the_fences_a_wake_up_is_lost() {
    expect_model_failure(
        module_path!(),
        "without_the_fences_a_wake_up_is_lost",
        || run(|| NoFence(AtomicU32::new(0)), 1, 3),
    );
}

/// Set in the child process that runs a model expected to fail.
const CHILD: &str = "SHOAL_SHM_FAILING_MODEL";

/// Runs `model`, which must fail with a deadlock, in a child process: a failing loom model
/// aborts its process (unwinding its blocked threads panics again). In the parent, runs this
/// same test (`module`, `test`) in a child and checks that it died reporting a deadlock.
pub(crate) fn expect_model_failure(module: &str, test: &str, model: impl FnOnce()) {
    if std::env::var_os(CHILD).is_some() {
        model();
        return; // the parent sees a child that passed, and fails
    }
    let module = module.split_once("::").map_or("", |(_crate, rest)| rest);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", &format!("{module}::{test}"), "--test-threads=1"])
        .env(CHILD, "1")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    // The harness may print the child's panic on either stream.
    let said = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("running 1 test"),
        "the child ran no test: {said}"
    );
    assert!(
        !out.status.success() && said.contains("deadlock;"),
        "the model should have found a lost wake-up: {}\n{said}",
        out.status
    );
}
