//! Call lanes: shared memory between one caller connection and one function instance on the
//! same node, so a warm call costs no syscall while both sides are awake.
//!
//! A [`LaneRegion`] (one memfd per lane) holds a 64-byte header and `slots` slots; each slot
//! is a 64-byte slot header, `cap` bytes of request and `cap` bytes of reply. A slot moves
//! through states, each move made by one side only:
//!
//! ```text
//!  caller: Free --post--> Posted --(withdraw)--> Free
//!  instance:              Posted --take--> Taken --complete--> Done
//!  instance:              Posted --bounce--> Bounced        (not started: go elsewhere)
//!  caller:  Done / Bounced --reply / reset--> Free
//! ```
//!
//! The side that owns a state is the only writer of the slot's bytes in it (the caller while
//! `Free`, the instance while `Taken`), and it publishes them with a SeqCst store of the next
//! state. Sleeping is announced in the header (`server_sleeping`, `caller_sleepers`) with the
//! same Dekker pattern as the mailbox: announce, re-check, then sleep; the other side stores
//! its state, then reads the announcement and rings. The ring itself is a byte on the lane's
//! Unix socket, which the sleeper polls; this module does no IO.
//!
//! A [`LaneGauge`] (one small memfd per instance, shared by all its lanes) counts the calls
//! the instance runs against its concurrency limit, so callers can see when it has no room
//! and go through the proxy instead.
//!
//! Either side may be another process that writes anything into the mapping: lengths read
//! back are clamped to the capacity, and an unknown state is reported as such.
use crate::{Arena, ShmError};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

const HEADER: u64 = 64;
const SLOT_HEADER: u64 = 64;

/// A slot's state (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// The caller may post.
    Free,
    /// A request waits for the instance.
    Posted,
    /// The instance runs the request.
    Taken,
    /// The reply is there.
    Done,
    /// The instance gave the request back unstarted.
    Bounced,
    /// A value no state has (a peer wrote garbage).
    Invalid(u32),
}

const FREE: u32 = 0;
const POSTED: u32 = 1;
const TAKEN: u32 = 2;
const DONE: u32 = 3;
const BOUNCED: u32 = 4;

impl SlotState {
    fn from_word(w: u32) -> SlotState {
        match w {
            FREE => SlotState::Free,
            POSTED => SlotState::Posted,
            TAKEN => SlotState::Taken,
            DONE => SlotState::Done,
            BOUNCED => SlotState::Bounced,
            other => SlotState::Invalid(other),
        }
    }
}

/// Returns a reference to the atomic u32 at byte offset `off` of `mem`.
fn word(mem: &Arena, off: u64) -> &AtomicU32 {
    assert!(
        off.is_multiple_of(4) && off + 4 <= mem.size(),
        "word out of the mapping"
    );
    // SAFETY: `off` is 4-aligned and inside the mapping (checked above), whose base is
    // page-aligned and which lives as long as the returned borrow of `mem`. The words used
    // here (headers and slot headers) are only ever accessed through atomics, by both sides.
    unsafe { &*(mem.base().add(off as usize) as *const AtomicU32) }
}

/// One caller connection's lane, mapped by the caller and the instance.
#[derive(Debug)]
pub struct LaneRegion {
    mem: Arena,
    slots: u32,
    cap: u64,
}

impl LaneRegion {
    fn size_for(slots: u32, cap: u64) -> u64 {
        HEADER + u64::from(slots) * (SLOT_HEADER + 2 * cap)
    }

    fn check(slots: u32, cap: u64) -> Result<(), ShmError> {
        if slots == 0 || slots > 1024 || cap == 0 || cap > (1 << 30) || !cap.is_multiple_of(64) {
            return Err(ShmError::Invalid(format!(
                "lane of {slots} slots of {cap} bytes"
            )));
        }
        Ok(())
    }

    /// Creates a lane of `slots` slots whose requests and replies hold up to `cap` bytes each
    /// (a multiple of 64) (instance side). Pages are taken on first touch: a lane carrying
    /// small calls costs a few pages, not its full size.
    pub fn create(slots: u32, cap: u64) -> Result<LaneRegion, ShmError> {
        Self::check(slots, cap)?;
        Ok(LaneRegion {
            mem: Arena::create_sparse("shoal-lane", Self::size_for(slots, cap))?,
            slots,
            cap,
        })
    }

    /// Maps a lane received from an instance.
    pub fn open(fd: OwnedFd, slots: u32, cap: u64) -> Result<LaneRegion, ShmError> {
        Self::check(slots, cap)?;
        Ok(LaneRegion {
            mem: Arena::open(fd, Self::size_for(slots, cap), false)?,
            slots,
            cap,
        })
    }

    /// The memfd, to pass to the caller.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.mem.fd()
    }

    /// Number of slots.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Largest request or reply.
    pub fn capacity(&self) -> u64 {
        self.cap
    }

    fn slot_base(&self, slot: u32) -> u64 {
        assert!(slot < self.slots, "slot {slot} of {}", self.slots);
        HEADER + u64::from(slot) * (SLOT_HEADER + 2 * self.cap)
    }

    fn state_word(&self, slot: u32) -> &AtomicU32 {
        word(&self.mem, self.slot_base(slot))
    }

    fn req_len(&self, slot: u32) -> &AtomicU32 {
        word(&self.mem, self.slot_base(slot) + 4)
    }

    fn rep_len(&self, slot: u32) -> &AtomicU32 {
        word(&self.mem, self.slot_base(slot) + 8)
    }

    fn copy_out(&self, off: u64, len: &AtomicU32, out: &mut Vec<u8>) {
        let len = u64::from(len.load(Ordering::Relaxed)).min(self.cap);
        out.clear();
        if let Ok(b) = self.mem.bytes(off, len) {
            out.extend_from_slice(b);
        }
    }

    /// The state of `slot`.
    pub fn state(&self, slot: u32) -> SlotState {
        SlotState::from_word(self.state_word(slot).load(Ordering::SeqCst))
    }

    fn cas(&self, slot: u32, from: u32, to: u32) -> bool {
        self.state_word(slot)
            .compare_exchange(from, to, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    // ----- caller side -----

    /// Posts `req` into free `slot`. False if the slot is not free or `req` is larger than
    /// the capacity (nothing is posted).
    pub fn post(&self, slot: u32, req: &[u8]) -> bool {
        if req.len() as u64 > self.cap || self.state(slot) != SlotState::Free {
            return false;
        }
        if self
            .mem
            .write(self.slot_base(slot) + SLOT_HEADER, req)
            .is_err()
        {
            return false;
        }
        self.req_len(slot)
            .store(req.len() as u32, Ordering::Relaxed);
        self.state_word(slot).store(POSTED, Ordering::SeqCst);
        true
    }

    /// Takes a posted request back before the instance took it; false if it was taken.
    pub fn withdraw(&self, slot: u32) -> bool {
        self.cas(slot, POSTED, FREE)
    }

    /// Copies the reply out and frees the slot; false (and nothing read) unless it is done.
    pub fn reply(&self, slot: u32, out: &mut Vec<u8>) -> bool {
        if self.state(slot) != SlotState::Done {
            return false;
        }
        self.copy_out(
            self.slot_base(slot) + SLOT_HEADER + self.cap,
            self.rep_len(slot),
            out,
        );
        self.state_word(slot).store(FREE, Ordering::SeqCst);
        true
    }

    /// Copies the reply out and leaves the slot done (the caller frees it later with
    /// [`LaneRegion::reset`], telling the instance it is finished with the reply); false (and
    /// nothing read) unless it is done.
    pub fn peek_reply(&self, slot: u32, out: &mut Vec<u8>) -> bool {
        if self.state(slot) != SlotState::Done {
            return false;
        }
        self.copy_out(
            self.slot_base(slot) + SLOT_HEADER + self.cap,
            self.rep_len(slot),
            out,
        );
        true
    }

    /// Frees a done or bounced slot without reading it; false in any other state.
    pub fn reset(&self, slot: u32) -> bool {
        self.cas(slot, DONE, FREE) || self.cas(slot, BOUNCED, FREE)
    }

    /// Counts the caller in (`true`) or out as sleeping until a reply.
    pub fn caller_sleeping(&self, sleeping: bool) {
        let w = word(&self.mem, 4);
        if sleeping {
            w.fetch_add(1, Ordering::SeqCst);
        } else {
            w.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Whether the instance announced it sleeps (ring it after posting).
    pub fn server_sleeps(&self) -> bool {
        word(&self.mem, 0).load(Ordering::SeqCst) != 0
    }

    // ----- instance side -----

    /// Takes a posted request: copies it out and marks the slot taken; false if none is posted.
    pub fn take(&self, slot: u32, out: &mut Vec<u8>) -> bool {
        if !self.cas(slot, POSTED, TAKEN) {
            return false;
        }
        self.copy_out(self.slot_base(slot) + SLOT_HEADER, self.req_len(slot), out);
        true
    }

    /// Gives a posted request back unstarted; false if none is posted.
    pub fn bounce(&self, slot: u32) -> bool {
        self.cas(slot, POSTED, BOUNCED)
    }

    /// Publishes the reply of a taken slot. False (nothing published) if the slot is not
    /// taken or `reply` is larger than the capacity.
    pub fn complete(&self, slot: u32, reply: &[u8]) -> bool {
        if reply.len() as u64 > self.cap || self.state(slot) != SlotState::Taken {
            return false;
        }
        let off = self.slot_base(slot) + SLOT_HEADER + self.cap;
        if self.mem.write(off, reply).is_err() {
            return false;
        }
        self.rep_len(slot)
            .store(reply.len() as u32, Ordering::Relaxed);
        self.state_word(slot).store(DONE, Ordering::SeqCst);
        true
    }

    /// Announces (or withdraws) that the instance sleeps until rung.
    pub fn set_server_sleeping(&self, sleeping: bool) {
        word(&self.mem, 0).store(u32::from(sleeping), Ordering::SeqCst);
    }

    /// Whether a caller sleeps until a reply (ring it after completing).
    pub fn callers_sleep(&self) -> bool {
        word(&self.mem, 4).load(Ordering::SeqCst) != 0
    }
}

/// An instance's admission counter. The instance counts in its own memory, which no caller
/// can reach, and mirrors the figures into a small memfd shared with the callers of all its
/// lanes, so they can see when it has no room and go through the proxy instead.
///
/// A caller maps the mirror writable (it is a memfd) and may write anything into it: that
/// misleads only callers' advisory [`LaneGauge::has_room`], never the instance's own
/// admission, limit or draining state.
#[derive(Debug)]
pub struct LaneGauge {
    mem: Arena,
    /// The instance's own counts (`None` on a caller's mapping).
    own: Option<Counts>,
}

/// The figures an instance admits by.
#[derive(Debug)]
struct Counts {
    limit: u32,
    active: AtomicU32,
    queued: AtomicU32,
    draining: AtomicU32,
}

/// Size of a gauge's mapping.
const GAUGE_SIZE: u64 = 4096;
/// Offsets of the mirrored figures.
const G_ACTIVE: u64 = 0;
const G_LIMIT: u64 = 4;
const G_QUEUED: u64 = 8;
const G_DRAINING: u64 = 12;

impl LaneGauge {
    /// Creates a gauge for an instance that runs `limit` calls at once (instance side).
    pub fn create(limit: u32) -> Result<LaneGauge, ShmError> {
        let limit = limit.max(1);
        let g = LaneGauge {
            mem: Arena::create("shoal-lane-gauge", GAUGE_SIZE, false)?,
            own: Some(Counts {
                limit,
                active: AtomicU32::new(0),
                queued: AtomicU32::new(0),
                draining: AtomicU32::new(0),
            }),
        };
        word(&g.mem, G_LIMIT).store(limit, Ordering::SeqCst);
        Ok(g)
    }

    /// Maps a gauge received from an instance (caller side: only [`LaneGauge::has_room`]
    /// and [`LaneGauge::is_draining`] read it).
    pub fn open(fd: OwnedFd) -> Result<LaneGauge, ShmError> {
        Ok(LaneGauge {
            mem: Arena::open(fd, GAUGE_SIZE, false)?,
            own: None,
        })
    }

    /// The memfd, to pass to callers.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.mem.fd()
    }

    fn mirror(&self, off: u64, v: u32) {
        word(&self.mem, off).store(v, Ordering::SeqCst);
    }

    /// The instance's limit (what it was created with; the mirror's copy is not read back).
    pub fn limit(&self) -> u32 {
        match &self.own {
            Some(c) => c.limit,
            None => word(&self.mem, G_LIMIT).load(Ordering::SeqCst),
        }
    }

    /// Caller side: whether the instance would start a call now, by the mirror (advisory:
    /// callers racing for the last unit may wait in their slots for a moment).
    pub fn has_room(&self) -> bool {
        let w = |off| word(&self.mem, off).load(Ordering::SeqCst);
        w(G_DRAINING) == 0 && w(G_QUEUED) == 0 && w(G_ACTIVE) < w(G_LIMIT)
    }

    /// Instance side: takes one unit if fewer than the limit are taken and, unless
    /// `queue_jumping`, no call waits in the instance's own queue. Always false on a
    /// caller's mapping.
    pub fn try_acquire(&self, queue_jumping: bool) -> bool {
        let Some(c) = &self.own else {
            return false;
        };
        if !queue_jumping && c.queued.load(Ordering::SeqCst) != 0 {
            return false;
        }
        match c
            .active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |a| {
                (a < c.limit).then_some(a + 1)
            }) {
            Ok(a) => {
                self.mirror(G_ACTIVE, a + 1);
                true
            }
            Err(_) => false,
        }
    }

    /// Instance side: gives one unit back.
    pub fn release(&self) {
        let Some(c) = &self.own else {
            return;
        };
        if let Ok(a) = c
            .active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |a| a.checked_sub(1))
        {
            self.mirror(G_ACTIVE, a - 1);
        }
    }

    /// Instance side: the number of calls waiting in its own queue.
    pub fn set_queued(&self, n: u32) {
        if let Some(c) = &self.own {
            c.queued.store(n, Ordering::SeqCst);
            self.mirror(G_QUEUED, n);
        }
    }

    /// Instance side: no new calls through lanes.
    pub fn set_draining(&self) {
        if let Some(c) = &self.own {
            c.draining.store(1, Ordering::SeqCst);
            self.mirror(G_DRAINING, 1);
        }
    }

    /// Whether the instance drains (its own state on the instance side; the mirror on a
    /// caller's mapping).
    pub fn is_draining(&self) -> bool {
        match &self.own {
            Some(c) => c.draining.load(Ordering::SeqCst) != 0,
            None => word(&self.mem, G_DRAINING).load(Ordering::SeqCst) != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_goes_round_between_two_mappings() {
        let server = LaneRegion::create(2, 128).unwrap();
        let caller = LaneRegion::open(server.fd().try_clone_to_owned().unwrap(), 2, 128).unwrap();
        let mut buf = Vec::new();
        assert!(caller.post(1, b"ping"));
        assert!(!caller.post(1, b"again"), "a posted slot is not free");
        assert!(!server.take(0, &mut buf), "nothing posted in slot 0");
        assert!(server.take(1, &mut buf));
        assert_eq!(buf, b"ping");
        assert!(!caller.withdraw(1), "taken: too late to withdraw");
        assert!(!caller.reply(1, &mut buf), "no reply yet");
        assert!(
            !server.complete(1, &[0u8; 129]),
            "oversized replies are refused"
        );
        assert!(server.complete(1, b"pong"));
        assert!(caller.reply(1, &mut buf));
        assert_eq!(buf, b"pong");
        assert_eq!(caller.state(1), SlotState::Free);

        assert!(caller.post(0, b"x"));
        assert!(caller.withdraw(0));
        assert!(!server.take(0, &mut buf), "withdrawn");
        assert!(caller.post(0, b"y"));
        assert!(server.bounce(0));
        assert_eq!(caller.state(0), SlotState::Bounced);
        assert!(caller.reset(0));
        assert!(
            !caller.post(0, &[0u8; 129]),
            "oversized requests are refused"
        );

        assert!(!caller.server_sleeps());
        server.set_server_sleeping(true);
        assert!(caller.server_sleeps());
        caller.caller_sleeping(true);
        assert!(server.callers_sleep());
        caller.caller_sleeping(false);
        assert!(!server.callers_sleep());
    }

    #[test]
    fn garbage_lengths_and_states_are_contained() {
        let server = LaneRegion::create(1, 64).unwrap();
        server.req_len(0).store(u32::MAX, Ordering::SeqCst);
        server.state_word(0).store(POSTED, Ordering::SeqCst);
        let mut buf = Vec::new();
        assert!(server.take(0, &mut buf));
        assert_eq!(buf.len(), 64, "clamped to the capacity");
        server.state_word(0).store(77, Ordering::SeqCst);
        assert_eq!(server.state(0), SlotState::Invalid(77));
        assert!(LaneRegion::create(0, 64).is_err());
        assert!(LaneRegion::create(1, 65).is_err());
    }

    #[test]
    fn the_gauge_admits_up_to_its_limit() {
        let inst = LaneGauge::create(2).unwrap();
        let caller = LaneGauge::open(inst.fd().try_clone_to_owned().unwrap()).unwrap();
        assert!(caller.has_room());
        assert!(inst.try_acquire(false));
        assert!(inst.try_acquire(false));
        assert!(!inst.try_acquire(true));
        assert!(!caller.has_room());
        inst.release();
        assert!(caller.has_room());
        inst.set_queued(1);
        assert!(!caller.has_room());
        assert!(!inst.try_acquire(false), "lanes do not jump the queue");
        assert!(inst.try_acquire(true));
        inst.set_queued(0);
        inst.release();
        inst.release();
        inst.release(); // never below zero
        assert!(inst.try_acquire(false));
        inst.set_draining();
        assert!(!caller.has_room());
        assert!(caller.is_draining());
        assert!(
            !caller.try_acquire(true),
            "a caller's mapping admits nothing"
        );
    }

    /// What a caller writes into its mapping of the gauge reaches the mirror only: the
    /// instance keeps admitting by its own limit and counts (#13: "a gauge limit of 0 stops
    /// it").
    #[test]
    fn a_caller_cannot_change_the_instances_limit() {
        let inst = LaneGauge::create(2).unwrap();
        let caller = LaneGauge::open(inst.fd().try_clone_to_owned().unwrap()).unwrap();
        for (off, v) in [
            (G_LIMIT, 0),
            (G_ACTIVE, u32::MAX),
            (G_QUEUED, 7),
            (G_DRAINING, 1),
        ] {
            word(&caller.mem, off).store(v, Ordering::SeqCst);
        }
        assert!(!caller.has_room(), "the mirror is what the caller wrote");
        assert_eq!(inst.limit(), 2);
        assert!(!inst.is_draining());
        assert!(inst.try_acquire(false));
        assert!(inst.try_acquire(false));
        assert!(!inst.try_acquire(true), "still its own limit of 2");
        inst.release();
        inst.release();
        assert_eq!(
            word(&caller.mem, G_ACTIVE).load(Ordering::SeqCst),
            0,
            "the instance rewrote its count"
        );
    }

    #[test]
    fn a_peeked_reply_stays_until_reset() {
        let server = LaneRegion::create(1, 64).unwrap();
        let caller = LaneRegion::open(server.fd().try_clone_to_owned().unwrap(), 1, 64).unwrap();
        let mut buf = Vec::new();
        assert!(!caller.peek_reply(0, &mut buf));
        assert!(caller.post(0, b"q"));
        assert!(server.take(0, &mut buf));
        assert!(server.complete(0, b"r"));
        assert!(caller.peek_reply(0, &mut buf));
        assert_eq!(buf, b"r");
        assert_eq!(
            server.state(0),
            SlotState::Done,
            "held until the caller resets"
        );
        assert!(caller.reset(0));
        assert_eq!(server.state(0), SlotState::Free);
    }
}
