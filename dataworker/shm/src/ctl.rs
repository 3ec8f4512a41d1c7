//! The control region: the index of sealed objects that local clients probe without a
//! syscall, the mailbox doorbell words, and the worker's side of the clients' pin pages.
//!
//! Two memfds:
//! - the **index** (worker-only: clients map it read-only, it is sealed
//!   `F_SEAL_FUTURE_WRITE`): a 64-byte header (magic, layout, the worker's sleeping flag),
//!   then `buckets` buckets of [`SLOTS_PER_BUCKET`] 64-byte slots;
//! - the **bell** page (every client maps it read-write, size sealed): the doorbell, sleeper
//!   count and reply epoch futex words of the mailboxes. A client can scribble them; the
//!   worst it does is wake the worker for nothing or make mailbox callers wait out their
//!   bounded sleep (their replies are still there).
//!
//! Each client's pins live in a pin page of its own ([`PinPage`]).
//!
//! Invariants:
//! - Only the worker writes slots (single writer, under its store lock). Each slot is a
//!   seqlock: the writer stores `seq` odd, `fence(Release)`, the fields, then `seq` even with
//!   `Release`; a reader loads `seq` (`Acquire`), the fields, `fence(Acquire)`, `seq` again,
//!   and uses the fields only if both reads are the same even value. Nothing read from a slot
//!   (a name offset, a length) is used before that check, and the name bytes the entry points
//!   to are compared with atomic loads, because the entry may be withdrawn and its memory
//!   reused while the reader looks; the pin handshake below confirms the entry afterwards.
//! - Readers only load (`Relaxed`/`Acquire`) from the index: it is mapped read-only.
//! - Pinning is the Dekker handshake of [`crate::pins`]: after `unpublish` returns and the
//!   pin pages show no pin of a generation, no client holds or can take one, so its memory
//!   may be reused. Nothing is ever freed under a pin (loom models at the bottom).
use crate::arena::ReadMap;
use crate::mailbox::{Doorbell, OsFutex, ReplyBell};
#[cfg(test)]
use crate::pins::PinWords;
use crate::sync::{Model, Std, Word};
use crate::{Arena, PinPage, ShmError};
use std::collections::HashMap;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Slots probed per bucket: a lookup reads at most this many slots.
pub const SLOTS_PER_BUCKET: usize = 8;
const MAGIC: u64 = u64::from_le_bytes(*b"SHOALIX2");
const HEADER: usize = 64;
const SLOT: usize = 64;
const BELL: u64 = 64;
/// Recent fast reads a client's pin page remembers for the worker's LRU.
pub const READ_RING: u32 = 64;
/// `key_meta` flag: the payload is a segment (its own memfd, id = generation), not the arena.
const SEGMENT: u64 = 1 << 40;

/// One slot, generic over the atomic model (shared memory in production, loom in models).
#[repr(C, align(64))]
pub(crate) struct Slot<M: Model> {
    seq: M::U64,
    hash: M::U64,
    gen: M::U64,
    offset: M::U64,
    len: M::U64,
    key_off: M::U64,
    /// Low 32 bits: key length; bits 32..40: namespace tag; bit 40: segment.
    key_meta: M::U64,
    _spare: M::U64,
}

const _: () = assert!(std::mem::size_of::<Slot<Std>>() == SLOT);

/// What a slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct SlotValue {
    pub(crate) hash: u64,
    pub(crate) gen: u64,
    pub(crate) offset: u64,
    pub(crate) len: u64,
    pub(crate) key_off: u64,
    pub(crate) key_meta: u64,
}

impl SlotValue {
    fn key_len(&self) -> u64 {
        self.key_meta & 0xffff_ffff
    }
    fn tag(&self) -> u8 {
        (self.key_meta >> 32) as u8
    }
    fn segment(&self) -> bool {
        self.key_meta & SEGMENT != 0
    }
}

impl<M: Model> Slot<M> {
    /// Worker: replaces the slot's contents (single writer).
    pub(crate) fn write(&self, v: &SlotValue) {
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1) | 1, Ordering::Relaxed);
        // Orders the odd `seq` before the field stores: a reader that sees any new field
        // then sees the odd (or a later) `seq` on its second read.
        M::fence(Ordering::Release);
        self.gen.store(v.gen, Ordering::Relaxed);
        self.offset.store(v.offset, Ordering::Relaxed);
        self.len.store(v.len, Ordering::Relaxed);
        self.key_off.store(v.key_off, Ordering::Relaxed);
        self.key_meta.store(v.key_meta, Ordering::Relaxed);
        self.hash.store(v.hash, Ordering::Relaxed);
        self.seq
            .store((s.wrapping_add(1) | 1).wrapping_add(1), Ordering::Release);
    }

    /// Worker: empties the slot (a withdrawn entry): a reader that sees `hash == 0` or
    /// `gen == 0` skips it, and one that read the entry before sees `seq` change.
    pub(crate) fn clear(&self) {
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1) | 1, Ordering::Relaxed);
        M::fence(Ordering::Release);
        self.hash.store(0, Ordering::Relaxed);
        self.gen.store(0, Ordering::Relaxed);
        self.seq
            .store((s.wrapping_add(1) | 1).wrapping_add(1), Ordering::Release);
    }

    /// Whether the slot is empty (worker side, under its lock).
    fn is_free(&self) -> bool {
        self.hash.load(Ordering::Relaxed) == 0
    }

    /// Reader: a consistent snapshot and the `seq` it was taken at, or `None` while the slot
    /// is being written (or changed under us).
    pub(crate) fn read(&self) -> Option<(u64, SlotValue)> {
        let seq = self.seq.load(Ordering::Acquire);
        if seq & 1 == 1 {
            return None;
        }
        let v = SlotValue {
            hash: self.hash.load(Ordering::Relaxed),
            gen: self.gen.load(Ordering::Relaxed),
            offset: self.offset.load(Ordering::Relaxed),
            len: self.len.load(Ordering::Relaxed),
            key_off: self.key_off.load(Ordering::Relaxed),
            key_meta: self.key_meta.load(Ordering::Relaxed),
        };
        M::fence(Ordering::Acquire);
        (self.seq.load(Ordering::Relaxed) == seq).then_some((seq, v))
    }

    /// Reader, after storing its pin: whether the slot still holds what it read at `seq`
    /// (the client's half of the Dekker handshake).
    pub(crate) fn unchanged_since(&self, seq: u64) -> bool {
        M::fence(Ordering::SeqCst);
        self.seq.load(Ordering::Relaxed) == seq
    }
}

/// Why a control region could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Mapping failed.
    #[error(transparent)]
    Shm(#[from] ShmError),
    /// The region does not hold what the layout says.
    #[error("control region is not valid: {0}")]
    Invalid(&'static str),
}

/// The hash that places a key in the index; both sides must agree on it.
pub fn key_hash(tag: u8, name: &[u8]) -> u64 {
    match xxhash_rust::xxh3::xxh3_64_with_seed(name, u64::from(tag)) {
        0 => 1,
        h => h,
    }
}

#[derive(Debug)]
enum IndexMem {
    /// The worker's read-write mapping.
    Owner(Arena),
    /// A client's read-only mapping.
    Reader(ReadMap),
}

impl IndexMem {
    fn base(&self) -> *const u8 {
        match self {
            IndexMem::Owner(a) => a.base(),
            IndexMem::Reader(r) => r.base(),
        }
    }
}

/// The mapped control region (index and bell page), on either side.
#[derive(Debug)]
pub struct Ctl {
    index: IndexMem,
    bell: Arena,
    buckets: usize,
    fast_clients: u32,
    pins: u32,
    ring: u32,
}

impl Ctl {
    fn index_size(buckets: usize) -> Option<u64> {
        let slots = buckets.checked_mul(SLOTS_PER_BUCKET)?.checked_mul(SLOT)?;
        Some(HEADER.checked_add(slots)? as u64)
    }

    /// Creates a region (worker side): an index of `buckets` buckets (rounded up to a power
    /// of two), for up to `fast_clients` clients with a pin page of `pins` slots each.
    pub fn create(buckets: u32, fast_clients: u32, pins: u32) -> Result<Ctl, CtlError> {
        let buckets = (buckets.max(1) as usize).next_power_of_two();
        let size = Self::index_size(buckets).ok_or(CtlError::Invalid("too large"))?;
        let index = Arena::create_worker_only("shoal-index", size, true)?;
        let bell = Arena::create("shoal-bell", BELL, true)?;
        let ctl = Ctl {
            index: IndexMem::Owner(index),
            bell,
            buckets,
            fast_clients,
            pins,
            ring: READ_RING,
        };
        let h = ctl.header();
        for (i, v) in [MAGIC, buckets as u64, u64::from(pins), u64::from(READ_RING)]
            .iter()
            .enumerate()
        {
            h[i].store(*v, Ordering::Release);
        }
        Ok(ctl)
    }

    /// Maps a region received from a worker (client side) and checks it matches the
    /// announced layout. The index is mapped read-only.
    pub fn open(
        index_fd: OwnedFd,
        bell_fd: OwnedFd,
        buckets: u32,
        pins: u32,
        ring: u32,
    ) -> Result<Ctl, CtlError> {
        let b = buckets as usize;
        if !b.is_power_of_two() {
            return Err(CtlError::Invalid("bucket count is not a power of two"));
        }
        let size = Self::index_size(b).ok_or(CtlError::Invalid("too large"))?;
        // Not pre-faulted: a client touches only the slots it probes.
        let index = ReadMap::open(index_fd, size, false)?;
        let bell = Arena::open(bell_fd, BELL, true)?;
        let ctl = Ctl {
            index: IndexMem::Reader(index),
            bell,
            buckets: b,
            fast_clients: 0,
            pins,
            ring,
        };
        let h = ctl.header();
        let got: Vec<u64> = (0..4).map(|i| h[i].load(Ordering::Acquire)).collect();
        if got != [MAGIC, b as u64, u64::from(pins), u64::from(ring)] {
            return Err(CtlError::Invalid(
                "header does not match the announced layout",
            ));
        }
        Ok(ctl)
    }

    /// The index as a read-only fd, to pass to clients.
    pub fn index_fd(&self) -> Result<OwnedFd, ShmError> {
        match &self.index {
            IndexMem::Owner(a) => a.read_only_fd(),
            IndexMem::Reader(_) => {
                Err(ShmError::Invalid("only the worker passes the index".into()))
            }
        }
    }

    /// The bell page (read-write), to pass to clients.
    pub fn bell_fd(&self) -> BorrowedFd<'_> {
        self.bell.fd()
    }

    /// Bucket count.
    pub fn buckets(&self) -> u32 {
        self.buckets as u32
    }

    /// Clients that may have a pin page (fast path) at once.
    pub fn fast_clients(&self) -> u32 {
        self.fast_clients
    }

    /// Pin slots per client page.
    pub fn pins_per_client(&self) -> u32 {
        self.pins
    }

    /// Reads each client page remembers.
    pub fn read_ring(&self) -> u32 {
        self.ring
    }

    /// A new pin page of this layout, for a client (worker side).
    pub fn new_pin_page(&self) -> Result<PinPage, ShmError> {
        PinPage::create(self.pins, self.ring)
    }

    /// Maps a pin page received with this region (client side).
    pub fn open_pin_page(&self, fd: OwnedFd) -> Result<PinPage, ShmError> {
        PinPage::open(fd, self.pins, self.ring)
    }

    fn header(&self) -> &[AtomicU64; 8] {
        // SAFETY: the index mapping is at least HEADER (64) bytes (`index_size`, checked
        // against the fd when mapped), page-aligned, and lives as long as `self`; the header
        // is only accessed through atomics (clients only load: it is read-only for them).
        unsafe { &*self.index.base().cast::<[AtomicU64; 8]>() }
    }

    fn slots(&self) -> &[Slot<Std>] {
        // SAFETY: the mapping holds `buckets * SLOTS_PER_BUCKET` 64-byte slots after the
        // 64-byte header (`index_size`, checked when mapped); the base is page-aligned so
        // every slot is 64-aligned; `Slot<Std>` is repr(C) of AtomicU64s only, and the index
        // is only accessed through them (clients only load).
        unsafe {
            std::slice::from_raw_parts(
                self.index.base().add(HEADER).cast::<Slot<Std>>(),
                self.buckets * SLOTS_PER_BUCKET,
            )
        }
    }

    fn bell_words(&self) -> &[AtomicU32; 16] {
        // SAFETY: the bell mapping is BELL (64) bytes, page-aligned, lives as long as `self`,
        // and is only accessed through atomics.
        unsafe { &*self.bell.base().cast::<[AtomicU32; 16]>() }
    }

    /// The word the worker's sleeping flag lives in (index header: only the worker writes).
    fn worker_sleeping(&self) -> &AtomicU64 {
        &self.header()[5]
    }

    fn doorbell(&self) -> &AtomicU32 {
        &self.bell_words()[0]
    }

    /// Callers sleeping until a mailbox reply.
    fn sleepers(&self) -> &AtomicU32 {
        &self.bell_words()[1]
    }

    /// Bumped (and woken) by the worker after a sweep that answered requests.
    fn reply_epoch(&self) -> &AtomicU32 {
        &self.bell_words()[2]
    }

    /// The poller's doorbell words (the protocol is `mailbox::Doorbell`, model-checked).
    fn bell(&self) -> Doorbell<'_, AtomicU64, AtomicU32> {
        Doorbell {
            sleeping: self.worker_sleeping(),
            bell: self.doorbell(),
        }
    }

    /// Client side, after posting to its mailbox: wakes the worker's poller if it sleeps (the
    /// only syscall of a mailbox request, and only when the worker was idle).
    pub fn ring_doorbell(&self) {
        self.bell().ring(&OsFutex(std::time::Duration::ZERO));
    }

    /// Worker side: sleeps until a client rings or `timeout` passes, unless `work_pending`
    /// (checked after announcing the sleep, so no post is missed) says there is work.
    pub fn worker_sleep(&self, work_pending: impl Fn() -> bool, timeout: std::time::Duration) {
        if !matches!(self.index, IndexMem::Owner(_)) {
            return;
        }
        self.bell().sleep(&OsFutex(timeout), work_pending);
    }

    /// The reply sleepers' words (the protocol is `mailbox::ReplyBell`, model-checked).
    fn replies(&self) -> ReplyBell<'_, AtomicU32> {
        ReplyBell {
            sleepers: self.sleepers(),
            epoch: self.reply_epoch(),
        }
    }

    /// Client side: sleeps until `ready()` holds or `timeout` passes (spurious returns are
    /// possible; callers loop). All callers of all clients share one futex word, so one wake
    /// after a sweep reaches every sleeper whose reply that sweep wrote.
    pub fn sleep_until(&self, ready: impl Fn() -> bool, timeout: std::time::Duration) {
        self.replies().sleep_until(&OsFutex(timeout), ready);
    }

    /// Worker side, after publishing replies: wakes sleeping callers (one syscall, and only if
    /// someone sleeps). A caller that counted itself before its last check is seen here.
    pub fn wake_sleepers(&self) {
        self.replies().wake(&OsFutex(std::time::Duration::ZERO));
    }

    /// Wakes the poller regardless (shutdown).
    pub fn wake_worker(&self) {
        self.bell().ring_always(&OsFutex(std::time::Duration::ZERO));
    }

    fn bucket_of(&self, hash: u64) -> usize {
        (hash as usize & (self.buckets - 1)) * SLOTS_PER_BUCKET
    }
}

/// What the worker publishes for a sealed object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// Namespace tag.
    pub tag: u8,
    /// `key_hash(tag, name)`.
    pub hash: u64,
    /// Allocation generation (non-zero).
    pub gen: u64,
    /// Payload offset: in the arena, or in its segment.
    pub offset: u64,
    /// Payload length.
    pub len: u64,
    /// Offset of the name bytes in the arena.
    pub key_off: u64,
    /// Name length.
    pub key_len: u32,
    /// The payload is in the segment whose id is `gen`, not in the arena.
    pub segment: bool,
}

/// A client's pin page as the worker holds it.
#[derive(Debug)]
struct Attached {
    page: PinPage,
    tenant: u32,
    /// Ring position drained so far.
    seen: u64,
}

/// The worker's side of the index (the single writer) and of the clients' pin pages.
#[derive(Debug)]
pub struct IndexWriter {
    ctl: Arc<Ctl>,
    by_gen: HashMap<u64, usize>,
    /// Pin pages of connected clients, by region number.
    pages: HashMap<u32, Attached>,
}

impl IndexWriter {
    /// A writer over a region this process created. `Invalid` for a client's region.
    pub fn new(ctl: Arc<Ctl>) -> Result<Self, CtlError> {
        if !matches!(ctl.index, IndexMem::Owner(_)) {
            return Err(CtlError::Invalid("only the worker writes the index"));
        }
        Ok(Self {
            ctl,
            by_gen: HashMap::new(),
            pages: HashMap::new(),
        })
    }

    /// The region.
    pub fn ctl(&self) -> &Arc<Ctl> {
        &self.ctl
    }

    /// Entries published now.
    pub fn published(&self) -> usize {
        self.by_gen.len()
    }

    /// Whether `gen` is published now.
    pub fn is_published(&self, gen: u64) -> bool {
        self.by_gen.contains_key(&gen)
    }

    /// Makes an entry visible to clients. Returns false (and publishes nothing) when its
    /// bucket is full; such objects are served through the socket only.
    pub fn publish(&mut self, e: IndexEntry) -> bool {
        if e.gen == 0 || e.hash == 0 || self.by_gen.contains_key(&e.gen) {
            return false;
        }
        let base = self.ctl.bucket_of(e.hash);
        let slots = self.ctl.slots();
        let Some(idx) = (base..base + SLOTS_PER_BUCKET).find(|&i| slots[i].is_free()) else {
            return false;
        };
        let flags = if e.segment { SEGMENT } else { 0 };
        slots[idx].write(&SlotValue {
            hash: e.hash,
            gen: e.gen,
            offset: e.offset,
            len: e.len,
            key_off: e.key_off,
            key_meta: u64::from(e.key_len) | (u64::from(e.tag) << 32) | flags,
        });
        self.by_gen.insert(e.gen, idx);
        true
    }

    /// Removes the entry of `gen` so no new fast pin can be taken. After this returns, a
    /// [`IndexWriter::is_pinned`] answer of `false` means the memory can be reused.
    pub fn unpublish(&mut self, gen: u64) -> bool {
        let Some(idx) = self.by_gen.remove(&gen) else {
            return false;
        };
        if let Some(s) = self.ctl.slots().get(idx) {
            s.clear();
        }
        true
    }

    /// Takes a client's pin page into account, as region `region` of tenant `tenant` (a
    /// number the caller gives each tenant). False when `region` is taken or past the
    /// region's fast-client limit.
    pub fn attach(&mut self, region: u32, page: PinPage, tenant: u32) -> bool {
        if region >= self.ctl.fast_clients || self.pages.contains_key(&region) {
            return false;
        }
        self.pages.insert(
            region,
            Attached {
                page,
                tenant,
                seen: 0,
            },
        );
        true
    }

    /// Drops the pin page of a client that is gone, and every pin in it.
    pub fn detach(&mut self, region: u32) {
        self.pages.remove(&region);
    }

    /// Whether a client of `tenant` holds a fast pin on `gen`. Call after
    /// [`IndexWriter::unpublish`]. Pins of other tenants' clients count for nothing: a
    /// client's fast path only ever finds its own tenant's names.
    pub fn is_pinned(&self, gen: u64, tenant: u32) -> bool {
        std::sync::atomic::fence(Ordering::SeqCst);
        let pinned = self
            .pages
            .values()
            .filter(|a| a.tenant == tenant)
            .any(|a| a.page.words().held().any(|g| g == gen));
        // Pairs with the client's release of its pin: its reads happen before our reuse.
        std::sync::atomic::fence(Ordering::Acquire);
        pinned
    }

    /// Fast pins held now, per (tenant, generation); the caller counts only live ones.
    pub fn pin_counts(&self) -> HashMap<(u32, u64), u32> {
        let mut m = HashMap::new();
        for a in self.pages.values() {
            for g in a.page.words().held() {
                *m.entry((a.tenant, g)).or_insert(0) += 1;
            }
        }
        m
    }

    /// The fast reads clients noted since the last drain, as (tenant, generation), only for
    /// entries published now; at most a ring's worth per client whatever its page says.
    pub fn drain_reads(&mut self, mut f: impl FnMut(u32, u64)) {
        let by_gen = &self.by_gen;
        for a in self.pages.values_mut() {
            let tenant = a.tenant;
            a.page.words().drain(&mut a.seen, |g| {
                if by_gen.contains_key(&g) {
                    f(tenant, g);
                }
            });
        }
    }
}

/// A fast pin a client holds; give it back with [`FastReader::release`].
#[derive(Debug, PartialEq, Eq)]
pub struct FastPin {
    /// Allocation generation.
    pub gen: u64,
    /// Payload offset (in the arena, or in the segment).
    pub offset: u64,
    /// Payload length.
    pub len: u64,
    /// The payload is in the segment whose id is `gen`.
    pub segment: bool,
    slot: u32,
}

/// A client's side of the index: lookups and its own pin page.
#[derive(Debug)]
pub struct FastReader {
    ctl: Arc<Ctl>,
    page: PinPage,
    free: Mutex<Vec<u32>>,
}

impl FastReader {
    /// A reader that pins into `page`.
    pub fn new(ctl: Arc<Ctl>, page: PinPage) -> Self {
        let free = (0..page.pins()).rev().collect();
        Self {
            ctl,
            page,
            free: Mutex::new(free),
        }
    }

    /// Finds the sealed entry for (`tag`, `name`) and pins it, without a syscall. `None` when
    /// it is not published, is being changed, or this client's pin table is full: the caller
    /// then asks the worker over the socket. `arena` is this client's read-only arena map
    /// (names live there; arena payloads are checked against it).
    pub fn get(&self, arena: &ReadMap, tag: u8, name: &[u8]) -> Option<FastPin> {
        let hash = key_hash(tag, name);
        let base = self.ctl.bucket_of(hash);
        let slots = self.ctl.slots();
        for idx in base..base + SLOTS_PER_BUCKET {
            let s = slots.get(idx)?;
            let Some((seq, v)) = s.read() else {
                continue;
            };
            if v.hash != hash
                || v.gen == 0
                || v.tag() != tag
                || v.key_len() != name.len() as u64
                || !arena.racy_eq(v.key_off, name)
            {
                continue;
            }
            if !v.segment() && arena.bytes(v.offset, v.len).is_err() {
                return None;
            }
            let pin_slot = self.free.lock().ok()?.pop()?;
            let words = self.page.words();
            words.pin(pin_slot as usize, v.gen);
            if !s.unchanged_since(seq) {
                self.unpin_slot(pin_slot);
                return None;
            }
            words.note_read(v.gen);
            return Some(FastPin {
                gen: v.gen,
                offset: v.offset,
                len: v.len,
                segment: v.segment(),
                slot: pin_slot,
            });
        }
        None
    }

    /// Ends a fast pin.
    pub fn release(&self, pin: FastPin) {
        self.unpin_slot(pin.slot);
    }

    fn unpin_slot(&self, slot: u32) {
        self.page.words().unpin(slot as usize);
        if let Ok(mut f) = self.free.lock() {
            // Lowest slots are reused first (see `get`), which keeps the high-water mark low.
            f.push(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Setup {
        ctl: Arc<Ctl>,
        arena: Arena,
        view: ReadMap,
        w: IndexWriter,
    }

    fn setup(fast_clients: u32, pins: u32) -> Setup {
        let ctl = Arc::new(Ctl::create(4, fast_clients, pins).unwrap());
        let arena = Arena::create_worker_only("a", 1 << 16, false).unwrap();
        let view = ReadMap::open(arena.read_only_fd().unwrap(), 1 << 16, false).unwrap();
        let w = IndexWriter::new(ctl.clone()).unwrap();
        Setup {
            ctl,
            arena,
            view,
            w,
        }
    }

    fn entry(arena: &Arena, tag: u8, name: &str, gen: u64, off: u64) -> IndexEntry {
        arena.write(off + 100, name.as_bytes()).unwrap();
        IndexEntry {
            tag,
            hash: key_hash(tag, name.as_bytes()),
            gen,
            offset: off,
            len: 10,
            key_off: off + 100,
            key_len: name.len() as u32,
            segment: false,
        }
    }

    /// A client of region `r`: its page attached to the writer, and its reader.
    fn client(s: &mut Setup, r: u32, tenant: u32) -> FastReader {
        let page = s.ctl.new_pin_page().unwrap();
        let mine = s
            .ctl
            .open_pin_page(page.fd().try_clone_to_owned().unwrap())
            .unwrap();
        assert!(s.w.attach(r, page, tenant));
        let fd = s.ctl.index_fd().unwrap();
        let bell = s.ctl.bell_fd().try_clone_to_owned().unwrap();
        let c = Ctl::open(fd, bell, 4, s.ctl.pins_per_client(), READ_RING).unwrap();
        FastReader::new(Arc::new(c), mine)
    }

    #[test]
    fn publish_pin_unpublish() {
        let mut s = setup(2, 4);
        let e = entry(&s.arena, b'o', "x", 7, 0);
        assert!(s.w.publish(e));
        let r = client(&mut s, 0, 1);
        assert!(
            r.get(&s.view, b'k', b"x").is_none(),
            "namespace is part of the key"
        );
        assert!(r.get(&s.view, b'o', b"y").is_none());
        let pin = r.get(&s.view, b'o', b"x").unwrap();
        assert_eq!((pin.gen, pin.offset, pin.len), (7, 0, 10));
        assert!(s.w.unpublish(7));
        assert!(s.w.is_pinned(7, 1), "the pin outlives the entry");
        assert!(
            !s.w.is_pinned(7, 2),
            "another tenant's pin counts for nothing"
        );
        assert!(r.get(&s.view, b'o', b"x").is_none());
        r.release(pin);
        assert!(!s.w.is_pinned(7, 1));
    }

    #[test]
    fn reads_are_drained_for_live_entries_only() {
        let mut s = setup(1, 4);
        let r = client(&mut s, 0, 3);
        s.w.publish(entry(&s.arena, b'o', "x", 5, 0));
        let p = r.get(&s.view, b'o', b"x").unwrap();
        r.release(p);
        let mut got = Vec::new();
        s.w.drain_reads(|t, g| got.push((t, g)));
        assert_eq!(got, vec![(3, 5)]);
        // A forged ring: generations that are not published are dropped.
        let p = r.get(&s.view, b'o', b"x").unwrap();
        r.release(p);
        s.w.unpublish(5);
        got.clear();
        s.w.drain_reads(|t, g| got.push((t, g)));
        assert!(got.is_empty());
    }

    #[test]
    fn pin_table_full_falls_back_and_detach_drops_pins() {
        let mut s = setup(2, 4);
        let r = client(&mut s, 1, 0);
        s.w.publish(entry(&s.arena, b'o', "x", 1, 0));
        let pins: Vec<_> = (0..4)
            .map(|_| r.get(&s.view, b'o', b"x").unwrap())
            .collect();
        assert!(r.get(&s.view, b'o', b"x").is_none());
        assert_eq!(s.w.pin_counts().get(&(0, 1)), Some(&4));
        s.w.detach(1);
        assert!(!s.w.is_pinned(1, 0));
        drop(pins);
        assert!(
            !s.w.attach(2, s.ctl.new_pin_page().unwrap(), 0),
            "past the limit"
        );
    }

    #[test]
    fn full_bucket_is_refused_and_open_checks_layout() {
        let ctl = Arc::new(Ctl::create(1, 1, 1).unwrap());
        let arena = Arena::create_worker_only("a", 1 << 16, false).unwrap();
        let view = ReadMap::open(arena.read_only_fd().unwrap(), 1 << 16, false).unwrap();
        let mut w = IndexWriter::new(ctl.clone()).unwrap();
        for g in 1..=SLOTS_PER_BUCKET as u64 {
            assert!(w.publish(entry(&arena, b'o', &format!("k{g}"), g, g * 200)));
        }
        assert!(!w.publish(entry(&arena, b'o', "overflow", 99, 5000)));
        let bell = || ctl.bell_fd().try_clone_to_owned().unwrap();
        assert!(Ctl::open(ctl.index_fd().unwrap(), bell(), 2, 1, READ_RING).is_err());
        assert!(Ctl::open(ctl.index_fd().unwrap(), bell(), 1, 2, READ_RING).is_err());
        let c2 = Arc::new(Ctl::open(ctl.index_fd().unwrap(), bell(), 1, 1, READ_RING).unwrap());
        assert!(
            IndexWriter::new(c2.clone()).is_err(),
            "a client cannot write"
        );
        let page = ctl.new_pin_page().unwrap();
        let r = FastReader::new(c2, page);
        assert!(r.get(&view, b'o', b"k3").is_some());
    }

    #[test]
    fn the_index_is_read_only_for_clients() {
        use std::os::fd::AsFd;
        let ctl = Ctl::create(4, 1, 1).unwrap();
        let fd = ctl.index_fd().unwrap();
        let access = crate::probe::write_access(fd.as_fd());
        assert!(access.none(), "a client could write the index: {access:?}");
    }

    #[test]
    fn concurrent_readers_never_pin_a_freed_generation() {
        // The writer repeatedly republishes a key under new generations and "frees" the old
        // one only when no pin is seen after unpublish; readers check that the generation
        // they pinned was never freed while they held it.
        use std::sync::atomic::AtomicBool;
        let mut s = setup(3, 8);
        let freed = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        s.arena.write(1000, b"key").unwrap();
        let mk = |gen| IndexEntry {
            tag: b'o',
            hash: key_hash(b'o', b"key"),
            gen,
            offset: 0,
            len: 1,
            key_off: 1000,
            key_len: 3,
            segment: false,
        };
        let readers: Vec<FastReader> = (0..2).map(|r| client(&mut s, r, 0)).collect();
        s.w.publish(mk(1));
        let view =
            Arc::new(ReadMap::open(s.arena.read_only_fd().unwrap(), 1 << 16, false).unwrap());
        let threads: Vec<_> = readers
            .into_iter()
            .map(|rd| {
                let (view, freed, stop) = (view.clone(), freed.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(p) = rd.get(&view, b'o', b"key") {
                            n += 1;
                            std::hint::spin_loop();
                            assert!(
                                !freed.lock().unwrap().contains(&p.gen),
                                "pinned a freed gen"
                            );
                            rd.release(p);
                        }
                    }
                    n
                })
            })
            .collect();
        let mut zombies = Vec::new();
        for gen in 2..20_000u64 {
            s.w.unpublish(gen - 1);
            zombies.push(gen - 1);
            zombies.retain(|g| {
                if s.w.is_pinned(*g, 0) {
                    true
                } else {
                    freed.lock().unwrap().insert(*g);
                    false
                }
            });
            s.w.publish(mk(gen));
        }
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
    }
}

/// loom models of the seqlock and the pin handshake (run by `cargo test`).
#[cfg(test)]
mod loom_models {
    use super::*;
    use crate::sync::loom_model::Loom;
    use loom::cell::UnsafeCell;
    use loom::sync::atomic::AtomicU64 as LAtomic;
    use loom::sync::Arc as LArc;

    fn slot() -> Slot<Loom> {
        Slot {
            seq: LAtomic::new(0),
            hash: LAtomic::new(0),
            gen: LAtomic::new(0),
            offset: LAtomic::new(0),
            len: LAtomic::new(0),
            key_off: LAtomic::new(0),
            key_meta: LAtomic::new(0),
            _spare: LAtomic::new(0),
        }
    }

    fn value(gen: u64) -> SlotValue {
        SlotValue {
            hash: 1,
            gen,
            offset: gen * 10,
            len: gen * 100,
            key_off: gen * 1000,
            key_meta: gen,
        }
    }

    /// Runs a model with a preemption bound of 2 (enough for these two-thread protocols,
    /// and seconds instead of minutes).
    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut b = loom::model::Builder::new();
        b.preemption_bound = Some(2);
        b.check(f);
    }

    /// A reader racing with the writer's rewrites of a slot never accepts a mix of two
    /// entries (nor a withdrawn one's leftovers as live).
    #[test]
    fn seqlock_reader_never_sees_a_torn_entry() {
        model(|| {
            let s = LArc::new(slot());
            s.write(&value(1));
            let w = s.clone();
            let writer = loom::thread::spawn(move || {
                w.clear();
                w.write(&value(2));
            });
            if let Some((seq, v)) = s.read() {
                assert_eq!(seq & 1, 0);
                let withdrawn = v.hash == 0 && v.gen == 0;
                assert!(
                    v == value(1) || v == value(2) || withdrawn,
                    "torn read {v:?}"
                );
            }
            writer.join().unwrap();
        });
    }

    /// The same model against the writer as it was before (no release fence after the odd
    /// `seq`): loom finds the torn read, so the model does test the fence.
    #[test]
    #[should_panic(expected = "torn read")]
    fn seqlock_model_catches_an_unfenced_writer() {
        model(|| {
            let s = LArc::new(slot());
            let w = s.clone();
            let writer = loom::thread::spawn(move || {
                for v in [value(1), value(2)] {
                    w.seq.fetch_add(1, Ordering::AcqRel);
                    w.gen.store(v.gen, Ordering::Relaxed);
                    w.offset.store(v.offset, Ordering::Relaxed);
                    w.len.store(v.len, Ordering::Relaxed);
                    w.key_off.store(v.key_off, Ordering::Relaxed);
                    w.key_meta.store(v.key_meta, Ordering::Relaxed);
                    w.hash.store(v.hash, Ordering::Relaxed);
                    w.seq.fetch_add(1, Ordering::AcqRel);
                }
            });
            if let Some((_, v)) = s.read() {
                assert!(
                    v == value(1) || v == value(2) || v == SlotValue::default(),
                    "torn read {v:?}"
                );
            }
            writer.join().unwrap();
        });
    }

    struct Page {
        count: LAtomic,
        mark: LAtomic,
        head: LAtomic,
        pins: [LAtomic; 2],
        ring: [LAtomic; 1],
    }

    impl Page {
        fn new() -> Self {
            Page {
                count: LAtomic::new(0),
                mark: LAtomic::new(0),
                head: LAtomic::new(0),
                pins: [LAtomic::new(0), LAtomic::new(0)],
                ring: [LAtomic::new(0)],
            }
        }
        fn words(&self) -> PinWords<'_, Loom> {
            PinWords {
                count: &self.count,
                mark: &self.mark,
                head: &self.head,
                pins: &self.pins,
                ring: &self.ring,
            }
        }
    }

    /// The pin handshake: a client reads the entry, pins it, confirms, reads the payload and
    /// releases; the worker withdraws the entry, scans the pins and, if it sees none, reuses
    /// the payload memory. loom checks every interleaving for a data race on the payload
    /// (a use after free) and that a confirmed pin always reads the published bytes.
    #[test]
    fn nothing_is_freed_under_a_pin() {
        model(|| {
            let s = LArc::new(slot());
            s.write(&value(1));
            let page = LArc::new(Page::new());
            let payload = LArc::new(UnsafeCell::new(11u64));
            let (ws, wp, wd) = (s.clone(), page.clone(), payload.clone());
            let worker = loom::thread::spawn(move || {
                ws.clear();
                Loom::fence(Ordering::SeqCst);
                let pinned = wp.words().held().any(|g| g == 1);
                Loom::fence(Ordering::Acquire);
                if !pinned {
                    // Free and reuse: new bytes for someone else.
                    // SAFETY: loom checks this access against every other one of the cell.
                    wd.with_mut(|p| unsafe { *p = 99 });
                }
                pinned
            });
            let words = page.words();
            if let Some((seq, v)) = s.read() {
                if v.gen == 1 {
                    assert!(words.pin(0, 1));
                    if s.unchanged_since(seq) {
                        // SAFETY: loom checks this access against every other one of the cell.
                        let got = payload.with(|p| unsafe { *p });
                        assert_eq!(got, 11, "read reused memory under a pin");
                    }
                    words.unpin(0);
                }
            }
            let _ = worker.join().unwrap();
        });
    }

    /// The same model with a client that confirms its pin without the SeqCst fence: loom
    /// finds the use after free, so the model does test the fence.
    #[test]
    #[should_panic(expected = "Causality violation")]
    fn handshake_model_catches_a_missing_fence() {
        model(|| {
            let s = LArc::new(slot());
            s.write(&value(1));
            let page = LArc::new(Page::new());
            let payload = LArc::new(UnsafeCell::new(11u64));
            let (ws, wp, wd) = (s.clone(), page.clone(), payload.clone());
            let worker = loom::thread::spawn(move || {
                ws.clear();
                Loom::fence(Ordering::SeqCst);
                let pinned = wp.words().held().any(|g| g == 1);
                Loom::fence(Ordering::Acquire);
                if !pinned {
                    // SAFETY: loom checks this access against every other one of the cell.
                    wd.with_mut(|p| unsafe { *p = 99 });
                }
            });
            let words = page.words();
            if let Some((seq, v)) = s.read() {
                if v.gen == 1 {
                    words.pin(0, 1);
                    // No fence: the pin store and this load may be reordered.
                    if s.seq.load(Ordering::Acquire) == seq {
                        // SAFETY: loom checks this access against every other one of the cell.
                        let got = payload.with(|p| unsafe { *p });
                        assert_eq!(got, 11, "read reused memory under a pin");
                    }
                    words.unpin(0);
                }
            }
            worker.join().unwrap();
        });
    }

    /// A second pin slot in use and released concurrently never hides the first from the
    /// worker (the count and mark are hints, never a reason to miss a pin).
    #[test]
    fn count_and_mark_never_hide_a_pin() {
        model(|| {
            let s = LArc::new(slot());
            s.write(&value(1));
            let page = LArc::new(Page::new());
            let (ws, wp) = (s.clone(), page.clone());
            let worker = loom::thread::spawn(move || {
                ws.clear();
                Loom::fence(Ordering::SeqCst);
                wp.words().held().any(|g| g == 1)
            });
            let words = page.words();
            // A short pin of slot 0 that ends, then the pin under test in slot 1.
            words.pin(0, 7);
            words.unpin(0);
            let held = match s.read() {
                Some((seq, v)) if v.gen == 1 => {
                    words.pin(1, 1);
                    s.unchanged_since(seq)
                }
                _ => false,
            };
            let seen = worker.join().unwrap();
            assert!(!held || seen, "a confirmed pin was missed by the worker");
        });
    }
}
