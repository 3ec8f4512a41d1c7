//! A per-client request mailbox in shared memory: one request and one reply at a time, handed
//! over through sequence numbers, so a request costs no syscall while both sides are awake.
//!
//! Layout (one memfd per client, its size sealed: see `fdpass`): a 64-byte header, then `cap`
//! bytes of request, then `cap` bytes of reply.
//!
//! Protocol and its invariants:
//! - The client writes the request bytes and length, then stores `req_seq = n` (release). It
//!   posts request `n + 1` only after it has read reply `n`; the first request is 1.
//! - The worker handles a request when `req_seq` is the successor of the last one it handled,
//!   writes the reply and its length, then stores `resp_seq = n` (release).
//! - Sleeping without lost wake-ups ([`Doorbell`], [`ReplyBell`], whose words live in the
//!   control region): the sleeper announces itself, fences, re-checks, then waits on a futex
//!   word; the waker publishes, fences, then reads the announcement and wakes. Both fences are
//!   `SeqCst`, so one side always sees the other (a Dekker handshake). The client rings the
//!   worker's doorbell after posting; the worker wakes the reply sleepers after a sweep.
//! - Futexes here are shared (no `FUTEX_PRIVATE_FLAG`): the words live in memory mapped by two
//!   processes.
//!
//! The client may write anything into its mailbox at any time (it maps it read-write), so
//! the worker treats every header word as untrusted input: each is read once into a local; a
//! sequence number that is not the successor of the last one handled is no request; a length
//! beyond the capacity is refused, never clamped into a garbage request; the bytes are copied
//! out of shared memory once, and only the copy is decoded. The mailbox's size is sealed, so a
//! client cannot truncate it under the worker.
//!
//! The protocol is written once, over the [`words`] traits: production runs it on the mapping,
//! and the loom models in `mailbox/model.rs` run it in ordinary memory, under every
//! interleaving of a client and the worker, sleeps included.
use crate::fdpass::{check_size_sealed, sealed_memfd};
use crate::{Arena, ShmError};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use words::{shm_u32, shm_u64, Buf, Futex, ShmBuf, Word32, Word64};

pub(crate) mod words;

#[cfg(test)]
pub(crate) mod model;

/// Header bytes before the request.
const HEADER: u64 = 64;
/// Offsets of the header words.
const REQ_SEQ: u64 = 0;
const RESP_SEQ: u64 = 4;
const REQ_LEN: u64 = 12;
const RESP_LEN: u64 = 16;
const REQ_ONEWAYS: u64 = 24;
const _: () = assert!(REQ_ONEWAYS + 8 <= HEADER && REQ_ONEWAYS.is_multiple_of(8));
/// Largest request or reply (lengths travel in `u32` words).
const MAX_CAP: u64 = 1 << 30;

/// Blocks while `*word == expected`, at most `timeout`. Spurious returns are fine: callers
/// re-check their condition.
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a live, 4-aligned u32 (an AtomicU32 reference) for the duration of the
    // call; FUTEX_WAIT only reads it and sleeps; `ts` outlives the call; the unused arguments
    // are ignored by FUTEX_WAIT. Errors (EAGAIN, ETIMEDOUT, EINTR) just return.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes up to `n` waiters on `word`.
pub(crate) fn futex_wake(word: &AtomicU32, n: i32) {
    // SAFETY: `word` is a live, 4-aligned u32; FUTEX_WAKE does not access memory through the
    // pointer beyond using its address as the key; the unused arguments are ignored.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            n,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// The kernel's futex on a shared word; a wait lasts at most the given time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OsFutex(pub(crate) Duration);

impl Futex<AtomicU32> for OsFutex {
    fn wait(&self, word: &AtomicU32, expected: u32) {
        futex_wait(word, expected, self.0);
    }

    fn wake(&self, word: &AtomicU32, n: i32) {
        futex_wake(word, n);
    }
}

/// The worker's doorbell: `sleeping` is 1 while the mailbox poller sleeps on `bell`.
#[derive(Debug)]
pub(crate) struct Doorbell<'a, S, W> {
    /// The poller's "I sleep" flag: in the worker's read-only index, so a client can only
    /// read it.
    pub(crate) sleeping: &'a S,
    pub(crate) bell: &'a W,
}

impl<S: Word64, W: Word32> Doorbell<'_, S, W> {
    /// Client side, after posting: wakes the poller if it sleeps.
    pub(crate) fn ring(&self, futex: &impl Futex<W>) {
        // Pairs with the fence in `sleep`: either this load sees the poller's announcement,
        // or the poller's re-check after its fence sees the post made before this one.
        W::fence_seq_cst();
        if self.sleeping.load(Ordering::SeqCst) != 0 {
            self.bell.fetch_add(1, Ordering::SeqCst);
            futex.wake(self.bell, 1);
        }
    }

    /// Poller side: sleeps until a client rings (or the futex gives up), unless
    /// `work_pending`, checked after the announcement, finds a post.
    pub(crate) fn sleep(&self, futex: &impl Futex<W>, work_pending: impl Fn() -> bool) {
        self.sleeping.store(1, Ordering::SeqCst);
        W::fence_seq_cst();
        let bell = self.bell.load(Ordering::SeqCst);
        if !work_pending() {
            futex.wait(self.bell, bell);
        }
        self.sleeping.store(0, Ordering::SeqCst);
    }

    /// Wakes the poller whether or not it announced a sleep (shutdown).
    pub(crate) fn ring_always(&self, futex: &impl Futex<W>) {
        self.bell.fetch_add(1, Ordering::SeqCst);
        futex.wake(self.bell, 1);
    }
}

/// The reply sleepers: `sleepers` counts clients waiting on `epoch` for a reply.
#[derive(Debug)]
pub(crate) struct ReplyBell<'a, W> {
    pub(crate) sleepers: &'a W,
    pub(crate) epoch: &'a W,
}

impl<W: Word32> ReplyBell<'_, W> {
    /// Client side: sleeps until `ready()` holds or the futex gives up (spurious returns are
    /// possible; callers loop).
    pub(crate) fn sleep_until(&self, futex: &impl Futex<W>, ready: impl Fn() -> bool) {
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        // Pairs with the fence in `wake`.
        W::fence_seq_cst();
        let epoch = self.epoch.load(Ordering::SeqCst);
        if !ready() {
            futex.wait(self.epoch, epoch);
        }
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }

    /// Worker side, after publishing replies: wakes the sleepers, if any (one syscall).
    pub(crate) fn wake(&self, futex: &impl Futex<W>) {
        W::fence_seq_cst();
        if self.sleepers.load(Ordering::SeqCst) != 0 {
            self.epoch.fetch_add(1, Ordering::SeqCst);
            futex.wake(self.epoch, i32::MAX);
        }
    }
}

/// The mailbox protocol over its words and buffers, wherever they live.
#[derive(Debug)]
pub(crate) struct Proto<'a, W, D, B> {
    pub(crate) req_seq: &'a W,
    pub(crate) resp_seq: &'a W,
    pub(crate) req_len: &'a W,
    pub(crate) resp_len: &'a W,
    pub(crate) req_oneways: &'a D,
    pub(crate) req: B,
    pub(crate) resp: B,
}

impl<W: Word32, D: Word64, B: Buf> Proto<'_, W, D, B> {
    /// Client: posts request `seq` (see [`Mailbox::post`]).
    pub(crate) fn post(&self, seq: u32, oneways: u64, req: &[u8]) -> bool {
        if !self.req.put(req) {
            return false;
        }
        // `put` took at most the capacity, which fits a u32.
        self.req_len.store(req.len() as u32, Ordering::Relaxed);
        self.req_oneways.store(oneways, Ordering::Relaxed);
        self.req_seq.store(seq, Ordering::Release);
        true
    }

    /// Client: whether reply `seq` is there.
    pub(crate) fn reply_ready(&self, seq: u32) -> bool {
        self.resp_seq.load(Ordering::Acquire) == seq
    }

    /// Client: copies the reply out; false (and `out` empty) if its length is beyond the
    /// capacity.
    pub(crate) fn reply(&self, out: &mut Vec<u8>) -> bool {
        let len = self.resp_len.load(Ordering::Relaxed);
        self.resp.get(len as usize, out)
    }

    /// Worker: the request after `last`, with its one-way count, if it is posted. Any other
    /// `req_seq` (the same, going backwards, skipping ahead) is no request.
    pub(crate) fn pending(&self, last: u32) -> Option<(u32, u64)> {
        let seq = self.req_seq.load(Ordering::Acquire);
        (seq == last.wrapping_add(1)).then(|| (seq, self.req_oneways.load(Ordering::Relaxed)))
    }

    /// Worker: copies the request out; false (and `out` empty) if the announced length is
    /// beyond the capacity.
    pub(crate) fn request(&self, out: &mut Vec<u8>) -> bool {
        let len = self.req_len.load(Ordering::Relaxed);
        self.req.get(len as usize, out)
    }

    /// Worker: publishes reply `seq`. A reply beyond the capacity is replaced by an empty one
    /// (which the client cannot decode), and false is returned.
    pub(crate) fn respond(&self, seq: u32, reply: &[u8]) -> bool {
        let fits = self.resp.put(reply);
        let len = if fits { reply.len() as u32 } else { 0 };
        self.resp_len.store(len, Ordering::Relaxed);
        self.resp_seq.store(seq, Ordering::Release);
        fits
    }
}

/// One client's mailbox, mapped by the client and the worker.
#[derive(Debug)]
pub struct Mailbox {
    mem: Arena,
    cap: u64,
}

impl Mailbox {
    /// The mapping's size for a capacity, if the capacity is one a mailbox may have.
    fn size_for(cap: u64) -> Result<u64, ShmError> {
        if cap == 0 || cap > MAX_CAP {
            return Err(ShmError::Invalid(format!(
                "a mailbox of {cap} bytes (1 to {MAX_CAP})"
            )));
        }
        Ok(HEADER + 2 * cap)
    }

    /// Creates a mailbox whose request and reply may each hold `cap` bytes (worker side). Its
    /// memory is reserved now and its size sealed.
    pub fn create(cap: u64) -> Result<Mailbox, ShmError> {
        let size = Self::size_for(cap)?;
        let fd = sealed_memfd("shoal-mailbox", size, true)?;
        Ok(Mailbox {
            mem: Arena::open(fd, size, true)?,
            cap,
        })
    }

    /// Maps a mailbox received from the worker; refused unless its size is sealed.
    pub fn open(fd: OwnedFd, cap: u64) -> Result<Mailbox, ShmError> {
        let size = Self::size_for(cap)?;
        check_size_sealed(&fd)?;
        Ok(Mailbox {
            mem: Arena::open(fd, size, true)?,
            cap,
        })
    }

    /// The memfd, to pass to the client.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.mem.fd()
    }

    /// Largest request or reply.
    pub fn capacity(&self) -> u64 {
        self.cap
    }

    fn proto(&self) -> Proto<'_, AtomicU32, AtomicU64, ShmBuf<'_>> {
        Proto {
            req_seq: shm_u32(&self.mem, REQ_SEQ),
            resp_seq: shm_u32(&self.mem, RESP_SEQ),
            req_len: shm_u32(&self.mem, REQ_LEN),
            resp_len: shm_u32(&self.mem, RESP_LEN),
            req_oneways: shm_u64(&self.mem, REQ_ONEWAYS),
            req: ShmBuf::new(&self.mem, HEADER, self.cap),
            resp: ShmBuf::new(&self.mem, HEADER + self.cap, self.cap),
        }
    }

    // ----- client side -----

    /// Posts request `seq` (the previous one plus 1; the first is 1): `oneways` is how many
    /// one-way frames the client had written to the socket before it (the worker handles this
    /// request only after those). False if `req` is larger than the capacity (nothing is
    /// posted). The caller rings the doorbell afterwards ([`crate::Ctl::ring_doorbell`]).
    pub fn post(&self, seq: u32, oneways: u64, req: &[u8]) -> bool {
        self.proto().post(seq, oneways, req)
    }

    /// Whether reply `seq` is there.
    pub fn reply_ready(&self, seq: u32) -> bool {
        self.proto().reply_ready(seq)
    }

    /// Copies the reply out (call after [`Mailbox::reply_ready`]). False, and `out` empty, if
    /// the announced length is beyond the capacity.
    pub fn reply(&self, out: &mut Vec<u8>) -> bool {
        self.proto().reply(out)
    }

    // ----- worker side -----

    /// The request after `last` and its one-way count, if the client posted it. A sequence
    /// number that is not `last + 1` (the same, older, or ahead: a client writing garbage) is
    /// no request.
    pub fn pending(&self, last: u32) -> Option<(u32, u64)> {
        self.proto().pending(last)
    }

    /// Copies the request out. False, and `out` empty (which no decoder accepts), if the
    /// client announced more bytes than the capacity.
    pub fn request(&self, out: &mut Vec<u8>) -> bool {
        self.proto().request(out)
    }

    /// Publishes reply `seq`. False if `reply` is larger than the capacity: an empty reply is
    /// published instead (callers keep replies small). The caller wakes sleepers afterwards
    /// with [`crate::Ctl::wake_sleepers`].
    pub fn respond(&self, seq: u32, reply: &[u8]) -> bool {
        self.proto().respond(seq, reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// The worker's mailbox and the client's mapping of it.
    fn pair(cap: u64) -> (Arc<Mailbox>, Mailbox) {
        let worker = Arc::new(Mailbox::create(cap).unwrap());
        let client = Mailbox::open(worker.fd().try_clone_to_owned().unwrap(), cap).unwrap();
        (worker, client)
    }

    #[test]
    fn request_reply_across_threads_with_sleeping() {
        let ctl = Arc::new(crate::Ctl::create(1, 1, 1).unwrap());
        let worker_ctl = ctl.clone();
        let (worker_side, client_side) = pair(1024);
        let w = worker_side.clone();
        let t = std::thread::spawn(move || {
            let mut last = 0;
            let mut buf = Vec::new();
            while last < 200 {
                match w.pending(last) {
                    Some((seq, _)) => {
                        assert!(w.request(&mut buf));
                        buf.reverse();
                        // Sometimes make the client sleep before the reply comes.
                        if seq % 7 == 0 {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        assert!(w.respond(seq, &buf));
                        worker_ctl.wake_sleepers();
                        last = seq;
                    }
                    None => std::thread::yield_now(),
                }
            }
        });
        let mut out = Vec::new();
        for seq in 1..=200u32 {
            assert!(client_side.post(seq, 0, &seq.to_le_bytes()));
            while !client_side.reply_ready(seq) {
                ctl.sleep_until(|| client_side.reply_ready(seq), Duration::from_secs(5));
            }
            assert!(client_side.reply(&mut out));
            let mut want = seq.to_le_bytes().to_vec();
            want.reverse();
            assert_eq!(out, want);
        }
        t.join().unwrap();
        assert!(
            !client_side.post(201, 0, &[0u8; 2000]),
            "oversized requests are refused"
        );
    }

    /// A client's raw view of its mailbox header: it writes any value there, at any time.
    fn scribble(client: &Mailbox, off: u64, v: u32) {
        shm_u32(&client.mem, off).store(v, Ordering::SeqCst);
    }

    #[test]
    fn a_length_beyond_the_capacity_is_refused_not_clamped() {
        let (worker, client) = pair(64);
        assert!(client.post(1, 0, b"hello"));
        let mut out = vec![1, 2, 3];
        for len in [65, 1 << 20, u32::MAX] {
            scribble(&client, REQ_LEN, len);
            assert!(!worker.request(&mut out), "length {len}");
            assert!(out.is_empty(), "nothing copied for length {len}");
        }
        scribble(&client, REQ_LEN, 5);
        assert!(worker.request(&mut out));
        assert_eq!(out, b"hello");
        // The same holds for the client reading a reply.
        assert!(worker.respond(1, b"ok"));
        scribble(&worker, RESP_LEN, u32::MAX);
        assert!(!client.reply(&mut out));
        assert!(out.is_empty());
        // And a reply too large for the mailbox is not truncated into garbage.
        assert!(!worker.respond(2, &[7u8; 65]));
        assert!(client.reply_ready(2));
        assert!(client.reply(&mut out));
        assert!(out.is_empty());
    }

    #[test]
    fn a_sequence_number_that_does_not_follow_is_no_request() {
        let (worker, client) = pair(64);
        assert_eq!(worker.pending(0), None, "nothing posted");
        // Skipping ahead.
        assert!(client.post(5, 0, b"x"));
        assert_eq!(worker.pending(0), None);
        scribble(&client, REQ_SEQ, u32::MAX);
        assert_eq!(worker.pending(0), None);
        assert!(client.post(1, 3, b"x"));
        assert_eq!(worker.pending(0), Some((1, 3)));
        // Handled 1: the same number again, or going backwards, is nothing new.
        for seq in [1, 0, u32::MAX] {
            scribble(&client, REQ_SEQ, seq);
            assert_eq!(worker.pending(1), None, "seq {seq} after 1");
        }
        scribble(&client, REQ_SEQ, 2);
        assert!(worker.pending(1).is_some());
        // Wrapping around is the successor.
        scribble(&client, REQ_SEQ, 0);
        assert!(worker.pending(u32::MAX).is_some());
    }

    /// A client that rewrites the length and the bytes while the worker reads them: every
    /// read is either refused or a copy of at most what one announced length allowed, and
    /// nothing panics or reads outside the mailbox.
    #[test]
    fn lengths_changing_under_the_worker_never_read_out_of_bounds() {
        let (worker, client) = pair(64);
        let stop = Arc::new(AtomicBool::new(false));
        let hostile = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut i = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    let len = [8, u32::MAX, 65, 0, 40][i as usize % 5];
                    scribble(&client, REQ_LEN, len);
                    scribble(&client, REQ_SEQ, i);
                    client.proto().req.put(&[i as u8; 64]);
                    i = i.wrapping_add(1);
                }
                client
            })
        };
        let mut out = Vec::new();
        let (mut refused, mut copied) = (0u32, 0u32);
        while refused < 1000 || copied < 1000 {
            let _ = worker.pending(0);
            if worker.request(&mut out) {
                assert!([8, 0, 40].contains(&out.len()), "{} bytes", out.len());
                copied += 1;
            } else {
                assert!(out.is_empty());
                refused += 1;
            }
        }
        stop.store(true, Ordering::SeqCst);
        hostile.join().unwrap();
    }

    /// The client cannot shrink its mailbox under the worker (which would fault the worker
    /// with SIGBUS on its next sweep), through its fd or by re-opening it.
    #[test]
    fn a_client_cannot_resize_its_mailbox() {
        let (worker, client) = pair(64);
        let file = std::fs::File::from(client.fd().try_clone_to_owned().unwrap());
        assert!(file.set_len(0).is_err());
        let reopened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&file)
            ))
            .unwrap();
        assert!(reopened.set_len(0).is_err());
        assert_eq!(worker.pending(0), None, "the worker reads on");
    }

    #[test]
    fn layouts_no_mailbox_may_have_are_refused() {
        assert!(Mailbox::create(0).is_err());
        assert!(Mailbox::create(MAX_CAP + 1).is_err());
        let (worker, _client) = pair(64);
        let fd = || worker.fd().try_clone_to_owned().unwrap();
        assert!(Mailbox::open(fd(), u64::MAX).is_err(), "no overflow");
        assert!(Mailbox::open(fd(), 4096).is_err(), "larger than the memfd");
        // A memfd whose size is not sealed: the worker could shrink it under the client.
        let plain =
            nix::sys::memfd::memfd_create("t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&plain, 4096).unwrap();
        assert!(Mailbox::open(plain, 64).is_err());
    }
}
