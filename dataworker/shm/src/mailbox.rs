//! A per-client request mailbox in shared memory: one request and one reply at a time, handed
//! over through sequence numbers, so a request costs no syscall while both sides are awake.
//!
//! Layout (one memfd per client): a 64-byte header, then `cap` bytes of request, then `cap`
//! bytes of reply.
//!
//! Protocol and its invariants:
//! - The client writes the request bytes and length, then stores `req_seq = n` (SeqCst). It
//!   posts request `n + 1` only after it has read reply `n`.
//! - The worker handles a request when `req_seq` differs from the last one it handled, writes
//!   the reply and its length, then stores `resp_seq = n` (SeqCst).
//! - Sleeping without lost wake-ups uses the control region (same Dekker pattern both ways): a
//!   caller counts itself as a sleeper, re-checks `resp_seq`, and waits on the shared reply
//!   epoch; the worker, after a sweep that stored replies, reads the sleeper count and bumps
//!   and wakes the epoch ([`crate::Ctl::sleep_until`], [`crate::Ctl::wake_sleepers`]). The
//!   worker sleeps on the doorbell the same way ([`crate::Ctl::worker_sleep`],
//!   [`crate::Ctl::ring_doorbell`]).
//! - Futexes here are shared (no `FUTEX_PRIVATE_FLAG`): the words live in memory mapped by two
//!   processes.
use crate::{Arena, ShmError};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

const HEADER: u64 = 64;

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

/// One client's mailbox, mapped by the client and the worker.
#[derive(Debug)]
pub struct Mailbox {
    mem: Arena,
    cap: u64,
}

impl Mailbox {
    fn size_for(cap: u64) -> u64 {
        HEADER + 2 * cap
    }

    /// Creates a mailbox whose request and reply may each hold `cap` bytes (worker side).
    pub fn create(cap: u64) -> Result<Mailbox, ShmError> {
        Ok(Mailbox {
            mem: Arena::create("shoal-mailbox", Self::size_for(cap), true)?,
            cap,
        })
    }

    /// Maps a mailbox received from the worker.
    pub fn open(fd: OwnedFd, cap: u64) -> Result<Mailbox, ShmError> {
        Ok(Mailbox {
            mem: Arena::open(fd, Self::size_for(cap), true)?,
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

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off + 4 <= HEADER as usize && off.is_multiple_of(4));
        // SAFETY: `off` is a 4-aligned offset inside the 64-byte header of a page-aligned
        // mapping that lives as long as `self`; the header is only accessed through atomics.
        unsafe { &*(self.mem.base().add(off) as *const AtomicU32) }
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off + 8 <= HEADER as usize && off.is_multiple_of(8));
        // SAFETY: as in `u32_at`, with an 8-aligned offset.
        unsafe { &*(self.mem.base().add(off) as *const AtomicU64) }
    }

    fn req_seq(&self) -> &AtomicU32 {
        self.u32_at(0)
    }
    fn resp_seq(&self) -> &AtomicU32 {
        self.u32_at(4)
    }
    fn req_len(&self) -> &AtomicU32 {
        self.u32_at(12)
    }
    fn resp_len(&self) -> &AtomicU32 {
        self.u32_at(16)
    }
    fn req_oneways(&self) -> &AtomicU64 {
        self.u64_at(24)
    }

    // ----- client side -----

    /// Posts request `seq`: `oneways` is how many one-way frames the client had written to the
    /// socket before it (the worker handles this request only after those). False if `req` is
    /// larger than the capacity (nothing is posted).
    pub fn post(&self, seq: u32, oneways: u64, req: &[u8]) -> bool {
        if req.len() as u64 > self.cap {
            return false;
        }
        if self.mem.write(HEADER, req).is_err() {
            return false;
        }
        self.req_len().store(req.len() as u32, Ordering::Relaxed);
        self.req_oneways().store(oneways, Ordering::Relaxed);
        self.req_seq().store(seq, Ordering::SeqCst);
        true
    }

    /// Whether reply `seq` is there.
    pub fn reply_ready(&self, seq: u32) -> bool {
        self.resp_seq().load(Ordering::Acquire) == seq
    }

    /// Copies the reply out (call after [`Mailbox::reply_ready`]).
    pub fn reply(&self, out: &mut Vec<u8>) {
        let len = u64::from(self.resp_len().load(Ordering::Relaxed)).min(self.cap);
        out.clear();
        if let Ok(b) = self.mem.bytes(HEADER + self.cap, len) {
            out.extend_from_slice(b);
        }
    }

    // ----- worker side -----

    /// The newest request's sequence number and its one-way count, if it differs from `last`.
    pub fn pending(&self, last: u32) -> Option<(u32, u64)> {
        let seq = self.req_seq().load(Ordering::SeqCst);
        (seq != last).then(|| (seq, self.req_oneways().load(Ordering::Relaxed)))
    }

    /// Copies the request out.
    pub fn request(&self, out: &mut Vec<u8>) {
        let len = u64::from(self.req_len().load(Ordering::Relaxed)).min(self.cap);
        out.clear();
        if let Ok(b) = self.mem.bytes(HEADER, len) {
            out.extend_from_slice(b);
        }
    }

    /// Publishes reply `seq` (truncated to the capacity: callers keep replies small). The
    /// caller wakes sleepers afterwards with [`crate::Ctl::wake_sleepers`].
    pub fn respond(&self, seq: u32, reply: &[u8]) {
        let n = (reply.len() as u64).min(self.cap) as usize;
        let _ = self.mem.write(HEADER + self.cap, &reply[..n]);
        self.resp_len().store(n as u32, Ordering::Relaxed);
        self.resp_seq().store(seq, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn request_reply_across_threads_with_sleeping() {
        let ctl = Arc::new(crate::Ctl::create(1, 1, 1).unwrap());
        let worker_ctl = ctl.clone();
        let worker_side = Arc::new(Mailbox::create(1024).unwrap());
        let client_side =
            Mailbox::open(worker_side.fd().try_clone_to_owned().unwrap(), 1024).unwrap();
        let w = worker_side.clone();
        let t = std::thread::spawn(move || {
            let mut last = 0;
            let mut buf = Vec::new();
            while last < 200 {
                match w.pending(last) {
                    Some((seq, _)) => {
                        w.request(&mut buf);
                        buf.reverse();
                        // Sometimes make the client sleep before the reply comes.
                        if seq % 7 == 0 {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        w.respond(seq, &buf);
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
            client_side.reply(&mut out);
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
}
