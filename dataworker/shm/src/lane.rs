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
//! Either side may be another process that writes anything into the mapping, at any time,
//! so each side treats what the other wrote as untrusted input: every word is read once into
//! a local; a length beyond the slot's capacity is refused (an error, the lane is broken), not
//! clamped into a garbage message; payloads are copied out of shared memory once and only the
//! copy is decoded; an unknown state is reported as such. The memfds' sizes are sealed (see
//! `fdpass`), and a side refuses a lane or gauge whose size is not, so neither side can
//! truncate the mapping under the other.
//!
//! The slot state machine and the sleep announcements are written once, over the
//! `mailbox::words` traits ([`Slot`], [`Sleep`]): production runs them on the mapping, and
//! the loom models in `lane/model.rs` run them in ordinary memory, under every interleaving
//! of a caller and an instance, the rings of the lane socket modelled as a futex. The
//! announcements are Dekker handshakes with a `SeqCst` fence on each side: the caller posts,
//! fences, then looks whether the instance sleeps; the instance announces its sleep, fences,
//! then sweeps once more. The same between completing a call and a caller's sleep.
use crate::fdpass::{check_size_sealed, sealed_memfd};
use crate::mailbox::words::{shm_u32, Buf, ShmBuf, Word32};
use crate::{Arena, ShmError};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

#[cfg(test)]
mod model;

const HEADER: u64 = 64;
const SLOT_HEADER: u64 = 64;
/// Header words: the instance's "I sleep" flag, and the count of sleeping callers.
const SERVER_SLEEPING: u64 = 0;
const CALLER_SLEEPERS: u64 = 4;
/// Slot header words.
const STATE: u64 = 0;
const REQ_LEN: u64 = 4;
const REP_LEN: u64 = 8;
/// Limits of a lane's layout (the size then fits easily in a u64).
const MAX_SLOTS: u32 = 1024;
const MAX_CAP: u64 = 1 << 30;

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

/// A peer announced more bytes than the slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BadLength(pub(crate) u32);

/// One slot's protocol over its words and buffers, wherever they live.
#[derive(Debug)]
pub(crate) struct Slot<'a, W, B> {
    pub(crate) state: &'a W,
    pub(crate) req_len: &'a W,
    pub(crate) rep_len: &'a W,
    pub(crate) req: B,
    pub(crate) rep: B,
}

impl<W: Word32, B: Buf> Slot<'_, W, B> {
    pub(crate) fn state(&self) -> SlotState {
        SlotState::from_word(self.state.load(Ordering::SeqCst))
    }

    fn cas(&self, from: u32, to: u32) -> bool {
        self.state
            .compare_exchange(from, to, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Caller: posts into a free slot (see [`LaneRegion::post`]).
    pub(crate) fn post(&self, req: &[u8]) -> bool {
        if self.state() != SlotState::Free || !self.req.put(req) {
            return false;
        }
        // `put` took at most the capacity, which fits a u32.
        self.req_len.store(req.len() as u32, Ordering::Relaxed);
        self.state.store(POSTED, Ordering::Release);
        true
    }

    /// Caller: takes a posted request back.
    pub(crate) fn withdraw(&self) -> bool {
        self.cas(POSTED, FREE)
    }

    /// Caller: copies a done slot's reply out; with `free`, frees the slot.
    pub(crate) fn reply(&self, out: &mut Vec<u8>, free: bool) -> Result<bool, BadLength> {
        out.clear();
        if self.state() != SlotState::Done {
            return Ok(false);
        }
        let len = self.rep_len.load(Ordering::Relaxed);
        if !self.rep.get(len as usize, out) {
            return Err(BadLength(len));
        }
        if free {
            self.state.store(FREE, Ordering::Release);
        }
        Ok(true)
    }

    /// Caller: frees a done or bounced slot.
    pub(crate) fn reset(&self) -> bool {
        self.cas(DONE, FREE) || self.cas(BOUNCED, FREE)
    }

    /// Instance: takes a posted request and copies it out.
    pub(crate) fn take(&self, out: &mut Vec<u8>) -> Result<bool, BadLength> {
        out.clear();
        if !self.cas(POSTED, TAKEN) {
            return Ok(false);
        }
        let len = self.req_len.load(Ordering::Relaxed);
        if !self.req.get(len as usize, out) {
            return Err(BadLength(len));
        }
        Ok(true)
    }

    /// Instance: gives a posted request back unstarted.
    pub(crate) fn bounce(&self) -> bool {
        self.cas(POSTED, BOUNCED)
    }

    /// Instance: publishes the reply of a taken slot.
    pub(crate) fn complete(&self, reply: &[u8]) -> bool {
        if self.state() != SlotState::Taken || !self.rep.put(reply) {
            return false;
        }
        self.rep_len.store(reply.len() as u32, Ordering::Relaxed);
        self.state.store(DONE, Ordering::Release);
        true
    }
}

/// The sleep announcements of a lane's two sides.
#[derive(Debug)]
pub(crate) struct Sleep<'a, W> {
    pub(crate) server_sleeping: &'a W,
    pub(crate) caller_sleepers: &'a W,
}

impl<W: Word32> Sleep<'_, W> {
    /// Caller: counts itself in (then re-checks its slot) or out as sleeping.
    pub(crate) fn caller_sleeping(&self, sleeping: bool) {
        if sleeping {
            self.caller_sleepers.fetch_add(1, Ordering::SeqCst);
            // Pairs with the fence in `callers_sleep`: either the instance sees this count
            // after completing, or the caller's re-check sees the completion.
            W::fence_seq_cst();
        } else {
            self.caller_sleepers.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Caller, after posting: whether the instance sleeps (then ring it).
    pub(crate) fn server_sleeps(&self) -> bool {
        // Pairs with the fence in `set_server_sleeping(true)`.
        W::fence_seq_cst();
        self.server_sleeping.load(Ordering::SeqCst) != 0
    }

    /// Instance: announces (then sweeps once more) or withdraws its sleep.
    pub(crate) fn set_server_sleeping(&self, sleeping: bool) {
        self.server_sleeping
            .store(u32::from(sleeping), Ordering::SeqCst);
        if sleeping {
            W::fence_seq_cst();
        }
    }

    /// Instance, after completing: whether a caller sleeps (then ring it).
    pub(crate) fn callers_sleep(&self) -> bool {
        W::fence_seq_cst();
        self.caller_sleepers.load(Ordering::SeqCst) != 0
    }
}

/// One caller connection's lane, mapped by the caller and the instance.
#[derive(Debug)]
pub struct LaneRegion {
    mem: Arena,
    slots: u32,
    cap: u64,
}

impl LaneRegion {
    fn size_for(slots: u32, cap: u64) -> Result<u64, ShmError> {
        if slots == 0 || slots > MAX_SLOTS || cap == 0 || cap > MAX_CAP || !cap.is_multiple_of(64) {
            return Err(ShmError::Invalid(format!(
                "lane of {slots} slots of {cap} bytes"
            )));
        }
        Ok(HEADER + u64::from(slots) * (SLOT_HEADER + 2 * cap))
    }

    /// Creates a lane of `slots` slots whose requests and replies hold up to `cap` bytes each
    /// (a multiple of 64) (instance side). Pages are taken on first touch: a lane carrying
    /// small calls costs a few pages, not its full size. Its size is sealed.
    pub fn create(slots: u32, cap: u64) -> Result<LaneRegion, ShmError> {
        let size = Self::size_for(slots, cap)?;
        let fd = sealed_memfd("shoal-lane", size, false)?;
        Ok(LaneRegion {
            mem: Arena::open(fd, size, false)?,
            slots,
            cap,
        })
    }

    /// Maps a lane received from an instance; refused unless its size is sealed.
    pub fn open(fd: OwnedFd, slots: u32, cap: u64) -> Result<LaneRegion, ShmError> {
        let size = Self::size_for(slots, cap)?;
        check_size_sealed(&fd)?;
        Ok(LaneRegion {
            mem: Arena::open(fd, size, false)?,
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

    /// Slot `slot` of the mapping. Slot numbers come from this side's own loops, so one out
    /// of range is a bug: it panics rather than touch memory past the lane.
    fn slot(&self, slot: u32) -> Slot<'_, AtomicU32, ShmBuf<'_>> {
        assert!(slot < self.slots, "slot {slot} of {}", self.slots);
        let base = HEADER + u64::from(slot) * (SLOT_HEADER + 2 * self.cap);
        Slot {
            state: shm_u32(&self.mem, base + STATE),
            req_len: shm_u32(&self.mem, base + REQ_LEN),
            rep_len: shm_u32(&self.mem, base + REP_LEN),
            req: ShmBuf::new(&self.mem, base + SLOT_HEADER, self.cap),
            rep: ShmBuf::new(&self.mem, base + SLOT_HEADER + self.cap, self.cap),
        }
    }

    fn sleep(&self) -> Sleep<'_, AtomicU32> {
        Sleep {
            server_sleeping: shm_u32(&self.mem, SERVER_SLEEPING),
            caller_sleepers: shm_u32(&self.mem, CALLER_SLEEPERS),
        }
    }

    fn bad_length(&self, BadLength(len): BadLength) -> ShmError {
        ShmError::Invalid(format!(
            "the peer announced {len} bytes in a {}-byte lane slot",
            self.cap
        ))
    }

    /// The state of `slot`.
    pub fn state(&self, slot: u32) -> SlotState {
        self.slot(slot).state()
    }

    // ----- caller side -----

    /// Posts `req` into free `slot`. False if the slot is not free or `req` is larger than
    /// the capacity (nothing is posted). Look at [`LaneRegion::server_sleeps`] afterwards.
    pub fn post(&self, slot: u32, req: &[u8]) -> bool {
        self.slot(slot).post(req)
    }

    /// Takes a posted request back before the instance took it; false if it was taken.
    pub fn withdraw(&self, slot: u32) -> bool {
        self.slot(slot).withdraw()
    }

    /// Copies the reply out and frees the slot; `Ok(false)` (and nothing read) unless it is
    /// done. An error if the instance announced a reply longer than the capacity (the slot
    /// is left as it is: the lane is broken).
    pub fn reply(&self, slot: u32, out: &mut Vec<u8>) -> Result<bool, ShmError> {
        self.slot(slot)
            .reply(out, true)
            .map_err(|e| self.bad_length(e))
    }

    /// Copies the reply out and leaves the slot done (the caller frees it later with
    /// [`LaneRegion::reset`], telling the instance it is finished with the reply); `Ok(false)`
    /// (and nothing read) unless it is done. An error as for [`LaneRegion::reply`].
    pub fn peek_reply(&self, slot: u32, out: &mut Vec<u8>) -> Result<bool, ShmError> {
        self.slot(slot)
            .reply(out, false)
            .map_err(|e| self.bad_length(e))
    }

    /// Frees a done or bounced slot without reading it; false in any other state.
    pub fn reset(&self, slot: u32) -> bool {
        self.slot(slot).reset()
    }

    /// Counts the caller in (`true`; re-check the slot afterwards) or out as sleeping until
    /// a reply.
    pub fn caller_sleeping(&self, sleeping: bool) {
        self.sleep().caller_sleeping(sleeping)
    }

    /// Whether the instance announced it sleeps (ask after posting; ring it if so).
    pub fn server_sleeps(&self) -> bool {
        self.sleep().server_sleeps()
    }

    // ----- instance side -----

    /// Takes a posted request: marks the slot taken and copies the request out; `Ok(false)`
    /// if none is posted. An error if the caller announced a request longer than the
    /// capacity (the slot stays taken, nothing is copied: the lane is broken).
    pub fn take(&self, slot: u32, out: &mut Vec<u8>) -> Result<bool, ShmError> {
        self.slot(slot).take(out).map_err(|e| self.bad_length(e))
    }

    /// Gives a posted request back unstarted; false if none is posted.
    pub fn bounce(&self, slot: u32) -> bool {
        self.slot(slot).bounce()
    }

    /// Publishes the reply of a taken slot. False (nothing published) if the slot is not
    /// taken or `reply` is larger than the capacity. Look at [`LaneRegion::callers_sleep`]
    /// afterwards.
    pub fn complete(&self, slot: u32, reply: &[u8]) -> bool {
        self.slot(slot).complete(reply)
    }

    /// Announces (`true`; sweep once more afterwards) or withdraws that the instance sleeps
    /// until rung.
    pub fn set_server_sleeping(&self, sleeping: bool) {
        self.sleep().set_server_sleeping(sleeping)
    }

    /// Whether a caller sleeps until a reply (ask after completing; ring it if so).
    pub fn callers_sleep(&self) -> bool {
        self.sleep().callers_sleep()
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
        let fd = sealed_memfd("shoal-lane-gauge", GAUGE_SIZE, true)?;
        let g = LaneGauge {
            mem: Arena::open(fd, GAUGE_SIZE, false)?,
            own: Some(Counts {
                limit,
                active: AtomicU32::new(0),
                queued: AtomicU32::new(0),
                draining: AtomicU32::new(0),
            }),
        };
        shm_u32(&g.mem, G_LIMIT).store(limit, Ordering::SeqCst);
        Ok(g)
    }

    /// Maps a gauge received from an instance (caller side: only [`LaneGauge::has_room`]
    /// and [`LaneGauge::is_draining`] read it); refused unless its size is sealed.
    pub fn open(fd: OwnedFd) -> Result<LaneGauge, ShmError> {
        check_size_sealed(&fd)?;
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
        shm_u32(&self.mem, off).store(v, Ordering::SeqCst);
    }

    /// The instance's limit (what it was created with; the mirror's copy is not read back).
    pub fn limit(&self) -> u32 {
        match &self.own {
            Some(c) => c.limit,
            None => shm_u32(&self.mem, G_LIMIT).load(Ordering::SeqCst),
        }
    }

    /// Caller side: whether the instance would start a call now, by the mirror (advisory:
    /// callers racing for the last unit may wait in their slots for a moment).
    pub fn has_room(&self) -> bool {
        let w = |off| shm_u32(&self.mem, off).load(Ordering::SeqCst);
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
            None => shm_u32(&self.mem, G_DRAINING).load(Ordering::SeqCst) != 0,
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
        assert!(
            !server.take(0, &mut buf).unwrap(),
            "nothing posted in slot 0"
        );
        assert!(server.take(1, &mut buf).unwrap());
        assert_eq!(buf, b"ping");
        assert!(!caller.withdraw(1), "taken: too late to withdraw");
        assert!(!caller.reply(1, &mut buf).unwrap(), "no reply yet");
        assert!(
            !server.complete(1, &[0u8; 129]),
            "oversized replies are refused"
        );
        assert!(server.complete(1, b"pong"));
        assert!(caller.reply(1, &mut buf).unwrap());
        assert_eq!(buf, b"pong");
        assert_eq!(caller.state(1), SlotState::Free);

        assert!(caller.post(0, b"x"));
        assert!(caller.withdraw(0));
        assert!(!server.take(0, &mut buf).unwrap(), "withdrawn");
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

    /// A peer's raw view of a slot's header word: it writes any value there, at any time.
    fn scribble(region: &LaneRegion, slot: u32, off: u64, v: u32) {
        let base = HEADER + u64::from(slot) * (SLOT_HEADER + 2 * region.cap);
        shm_u32(&region.mem, base + off).store(v, Ordering::SeqCst);
    }

    /// A caller announcing a request longer than the slot, and an instance announcing such a
    /// reply: refused with an error and nothing copied (before, the length was clamped and
    /// the slot's whole capacity handed on as if it were the message).
    #[test]
    fn garbage_lengths_are_refused_and_garbage_states_reported() {
        let server = LaneRegion::create(2, 64).unwrap();
        let caller = LaneRegion::open(server.fd().try_clone_to_owned().unwrap(), 2, 64).unwrap();
        let mut buf = vec![1, 2, 3];
        assert!(caller.post(0, b"call"));
        scribble(&caller, 0, REQ_LEN, u32::MAX);
        assert!(server.take(0, &mut buf).is_err());
        assert!(buf.is_empty(), "nothing copied");
        assert_eq!(
            server.state(0),
            SlotState::Taken,
            "the slot is not handed back"
        );

        assert!(caller.post(1, b"call"));
        assert!(server.take(1, &mut buf).unwrap());
        assert_eq!(buf, b"call");
        assert!(server.complete(1, b"answer"));
        for len in [65, u32::MAX] {
            scribble(&server, 1, REP_LEN, len);
            assert!(caller.peek_reply(1, &mut buf).is_err(), "length {len}");
            assert!(buf.is_empty());
            assert!(caller.reply(1, &mut buf).is_err(), "length {len}");
            assert_eq!(caller.state(1), SlotState::Done, "not freed on garbage");
        }
        scribble(&server, 1, REP_LEN, 6);
        assert!(caller.reply(1, &mut buf).unwrap());
        assert_eq!(buf, b"answer");

        scribble(&caller, 0, STATE, 77);
        assert_eq!(server.state(0), SlotState::Invalid(77));
        assert!(!server.bounce(0) && !caller.withdraw(0) && !caller.reset(0));
        assert!(!server.take(0, &mut buf).unwrap());
        assert!(LaneRegion::create(0, 64).is_err());
        assert!(LaneRegion::create(1, 65).is_err());
        assert!(LaneRegion::create(MAX_SLOTS + 1, 64).is_err());
        assert!(LaneRegion::create(1, MAX_CAP + 64).is_err());
    }

    /// A caller that rewrites a slot's length and bytes while the instance takes it: every
    /// take is refused or a copy no longer than a length the caller announced.
    #[test]
    fn lengths_changing_under_the_instance_never_read_out_of_bounds() {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let server = LaneRegion::create(1, 64).unwrap();
        let caller = LaneRegion::open(server.fd().try_clone_to_owned().unwrap(), 1, 64).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let hostile = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut i = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    scribble(&caller, 0, REQ_LEN, [8, u32::MAX, 65, 0, 40][i % 5]);
                    scribble(&caller, 0, STATE, POSTED);
                    caller.slot(0).req.put(&[i as u8; 64]);
                    i += 1;
                }
            })
        };
        let mut buf = Vec::new();
        let (mut refused, mut copied) = (0u32, 0u32);
        while refused < 1000 || copied < 1000 {
            match server.take(0, &mut buf) {
                Ok(true) => {
                    assert!([8, 0, 40].contains(&buf.len()), "{} bytes", buf.len());
                    copied += 1;
                }
                Ok(false) => {}
                Err(_) => {
                    assert!(buf.is_empty());
                    refused += 1;
                }
            }
        }
        stop.store(true, Ordering::SeqCst);
        hostile.join().unwrap();
    }

    /// Neither side can shrink a lane or a gauge under the other (the other would fault with
    /// SIGBUS on its next access), and neither maps one whose size the other could change.
    #[test]
    fn lanes_and_gauges_are_sealed_and_only_sealed_ones_are_mapped() {
        use std::os::fd::AsRawFd;
        let region = LaneRegion::create(1, 64).unwrap();
        let gauge = LaneGauge::create(1).unwrap();
        for fd in [region.fd(), gauge.fd()] {
            let file = std::fs::File::from(fd.try_clone_to_owned().unwrap());
            assert!(file.set_len(0).is_err());
            let reopened = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
                .unwrap();
            assert!(reopened.set_len(0).is_err(), "through a re-open");
        }
        // A hostile instance hands out memfds it could truncate later: refused.
        let size = LaneRegion::size_for(1, 64).unwrap();
        let plain =
            nix::sys::memfd::memfd_create("t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&plain, size.max(GAUGE_SIZE) as i64).unwrap();
        let fd = || plain.try_clone().unwrap();
        assert!(LaneRegion::open(fd(), 1, 64).is_err());
        assert!(LaneGauge::open(fd()).is_err());
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
            shm_u32(&caller.mem, off).store(v, Ordering::SeqCst);
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
            shm_u32(&caller.mem, G_ACTIVE).load(Ordering::SeqCst),
            0,
            "the instance rewrote its count"
        );
    }

    #[test]
    fn a_peeked_reply_stays_until_reset() {
        let server = LaneRegion::create(1, 64).unwrap();
        let caller = LaneRegion::open(server.fd().try_clone_to_owned().unwrap(), 1, 64).unwrap();
        let mut buf = Vec::new();
        assert!(!caller.peek_reply(0, &mut buf).unwrap());
        assert!(caller.post(0, b"q"));
        assert!(server.take(0, &mut buf).unwrap());
        assert!(server.complete(0, b"r"));
        assert!(caller.peek_reply(0, &mut buf).unwrap());
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
