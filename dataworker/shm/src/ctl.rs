//! The control region: a shared index of sealed objects that local clients probe without a
//! syscall, and one pin table per client.
//!
//! Layout (all little-endian, 64-byte aligned): a header (magic, layout, the worker's coarse
//! clock), then `buckets` buckets of [`SLOTS_PER_BUCKET`] slots, then `pin_regions` regions of
//! `pins_per_region` 8-byte pin words.
//!
//! Invariants:
//! - Only the worker writes slots (single writer, under its store lock). Each slot is a seqlock:
//!   `seq` is odd while the worker rewrites the slot; a reader that sees the same even `seq`
//!   before and after reading the fields has a consistent entry. Clients write only `atime`.
//! - A client writes only its own pin region. A non-zero pin word holds the generation of an
//!   allocation the client is reading.
//! - Pinning is a Dekker handshake, all with `SeqCst`: the client stores its pin and then
//!   re-reads the slot's `seq`; the worker, before freeing an allocation, bumps `seq` (removing
//!   the entry) and then scans the pin words. In the single total order of `SeqCst` operations
//!   one of the two comes first, so either the client sees the changed `seq` and backs off, or
//!   the worker sees the pin and keeps the memory. No allocation is ever freed under a pin.
//! - Each pin region starts with two words the client maintains: the number of live pins and
//!   a high-water mark of slots used. The client raises both (SeqCst) before storing a pin,
//!   so a worker that reads `count == 0`, or a mark below a slot, does so before that pin's
//!   store in the SeqCst order; the client's later re-read of `seq` then sees the worker's
//!   bump and backs off. The worker therefore skips idle clients and scans only used slots.
//! - Clearing a client's whole pin region is done by the worker only after the client's
//!   connection is gone.
use crate::mailbox::{Doorbell, OsFutex, ReplyBell};
use crate::{Arena, ShmError};
use std::collections::HashMap;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Slots probed per bucket: a lookup reads at most this many slots.
pub const SLOTS_PER_BUCKET: usize = 8;
const MAGIC: u64 = u64::from_le_bytes(*b"SHOALCT1");
const HEADER: usize = 64;
const SLOT: usize = 64;
/// Words before the pin slots of each region: live pin count, high-water slot mark.
const REGION_HEADER_WORDS: usize = 2;

#[repr(C, align(64))]
struct Slot {
    seq: AtomicU64,
    hash: AtomicU64,
    gen: AtomicU64,
    offset: AtomicU64,
    len: AtomicU64,
    key_off: AtomicU64,
    /// Low 32 bits: key length; bits 32..40: namespace tag.
    key_meta: AtomicU64,
    atime: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<Slot>() == SLOT);

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

/// The mapped control region.
#[derive(Debug)]
pub struct Ctl {
    mem: Arena,
    buckets: usize,
    pin_regions: usize,
    pins_per_region: usize,
}

impl Ctl {
    fn size_for(buckets: usize, regions: usize, pins: usize) -> Option<u64> {
        let slots = buckets.checked_mul(SLOTS_PER_BUCKET)?.checked_mul(SLOT)?;
        let pin_bytes = regions
            .checked_mul(pins.checked_add(REGION_HEADER_WORDS)?)?
            .checked_mul(8)?;
        Some((HEADER + slots).checked_add(pin_bytes)? as u64)
    }

    /// Creates a region (worker side). `buckets` is rounded up to a power of two.
    pub fn create(buckets: u32, pin_regions: u32, pins_per_region: u32) -> Result<Ctl, CtlError> {
        let buckets = (buckets.max(1) as usize).next_power_of_two();
        let (regions, pins) = (pin_regions as usize, pins_per_region as usize);
        let size = Self::size_for(buckets, regions, pins).ok_or(CtlError::Invalid("too large"))?;
        let mem = Arena::create("shoal-ctl", size, true)?;
        let ctl = Ctl {
            mem,
            buckets,
            pin_regions: regions,
            pins_per_region: pins,
        };
        for (i, v) in [MAGIC, buckets as u64, regions as u64, pins as u64]
            .iter()
            .enumerate()
        {
            ctl.word(i * 8).store(*v, Ordering::Release);
        }
        Ok(ctl)
    }

    /// Maps a region received from a worker and checks it matches the announced layout.
    pub fn open(
        fd: OwnedFd,
        buckets: u32,
        pin_regions: u32,
        pins_per_region: u32,
    ) -> Result<Ctl, CtlError> {
        let (b, r, p) = (
            buckets as usize,
            pin_regions as usize,
            pins_per_region as usize,
        );
        if !b.is_power_of_two() {
            return Err(CtlError::Invalid("bucket count is not a power of two"));
        }
        let size = Self::size_for(b, r, p).ok_or(CtlError::Invalid("too large"))?;
        // Not pre-faulted: a client touches only the slots it probes and its own pin region.
        let mem = Arena::open(fd, size, false)?;
        let ctl = Ctl {
            mem,
            buckets: b,
            pin_regions: r,
            pins_per_region: p,
        };
        let header: Vec<u64> = (0..4)
            .map(|i| ctl.word(i * 8).load(Ordering::Acquire))
            .collect();
        if header != [MAGIC, b as u64, r as u64, p as u64] {
            return Err(CtlError::Invalid(
                "header does not match the announced layout",
            ));
        }
        Ok(ctl)
    }

    /// The memfd, to pass to clients.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.mem.fd()
    }

    /// Bucket count.
    pub fn buckets(&self) -> u32 {
        self.buckets as u32
    }

    /// Number of client pin regions.
    pub fn pin_regions(&self) -> u32 {
        self.pin_regions as u32
    }

    /// Pin words per region.
    pub fn pins_per_region(&self) -> u32 {
        self.pins_per_region as u32
    }

    fn word(&self, byte_off: usize) -> &AtomicU64 {
        debug_assert!(byte_off.is_multiple_of(8) && (byte_off as u64) + 8 <= self.mem.size());
        // SAFETY: every caller passes an 8-aligned offset inside the mapping (header fields,
        // slots and pin words are laid out by `size_for`); the mapping is page-aligned and
        // lives as long as `self`; AtomicU64 has the size and alignment of u64 and shared
        // memory is only ever accessed through atomics here.
        unsafe { &*(self.mem.base().add(byte_off) as *const AtomicU64) }
    }

    fn slot(&self, idx: usize) -> &Slot {
        debug_assert!(idx < self.buckets * SLOTS_PER_BUCKET);
        // SAFETY: idx is below the slot count, so the 64-byte slot lies inside the mapping
        // after the 64-byte header; the base is page-aligned so the slot is 64-aligned; Slot
        // is repr(C) of atomics only.
        unsafe { &*(self.mem.base().add(HEADER + idx * SLOT) as *const Slot) }
    }

    fn region_word(&self, region: usize, i: usize) -> &AtomicU64 {
        let slots = self.buckets * SLOTS_PER_BUCKET * SLOT;
        let stride = self.pins_per_region + REGION_HEADER_WORDS;
        self.word(HEADER + slots + (region * stride + i) * 8)
    }

    fn pin_word(&self, region: usize, i: usize) -> &AtomicU64 {
        self.region_word(region, REGION_HEADER_WORDS + i)
    }

    fn pin_count(&self, region: usize) -> &AtomicU64 {
        self.region_word(region, 0)
    }

    fn pin_mark(&self, region: usize) -> &AtomicU64 {
        self.region_word(region, 1)
    }

    /// The worker's coarse clock (milliseconds), which clients copy into `atime`.
    pub fn clock(&self) -> u64 {
        self.word(32).load(Ordering::Relaxed)
    }

    /// Advances the coarse clock (worker side).
    pub fn set_clock(&self, ms: u64) {
        self.word(32).store(ms, Ordering::Relaxed);
    }

    fn word32(&self, byte_off: usize) -> &AtomicU32 {
        debug_assert!(byte_off.is_multiple_of(4) && byte_off + 4 <= HEADER);
        // SAFETY: a 4-aligned offset inside the 64-byte header of the page-aligned mapping,
        // which lives as long as `self`; these header words are only accessed atomically.
        unsafe { &*(self.mem.base().add(byte_off) as *const AtomicU32) }
    }

    /// 1 while the worker's mailbox poller sleeps on the doorbell.
    fn worker_sleeping(&self) -> &AtomicU32 {
        self.word32(40)
    }

    fn doorbell(&self) -> &AtomicU32 {
        self.word32(44)
    }

    /// The poller's doorbell words (the protocol is `mailbox::Doorbell`, model-checked).
    fn bell(&self) -> Doorbell<'_, AtomicU32> {
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
        self.bell().sleep(&OsFutex(timeout), work_pending);
    }

    /// Callers sleeping until a mailbox reply.
    fn sleepers(&self) -> &AtomicU32 {
        self.word32(48)
    }

    /// Bumped (and woken) by the worker after a sweep that answered requests.
    fn reply_epoch(&self) -> &AtomicU32 {
        self.word32(52)
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
    /// Payload offset in the arena.
    pub offset: u64,
    /// Payload length.
    pub len: u64,
    /// Offset of the name bytes in the arena.
    pub key_off: u64,
    /// Name length.
    pub key_len: u32,
}

/// The worker's side of the index: the single writer.
#[derive(Debug)]
pub struct IndexWriter {
    ctl: Arc<Ctl>,
    by_gen: HashMap<u64, usize>,
    /// Regions handed to connected clients (only these are scanned).
    active_regions: Vec<usize>,
}

impl IndexWriter {
    /// A writer over a fresh region.
    pub fn new(ctl: Arc<Ctl>) -> Self {
        Self {
            ctl,
            by_gen: HashMap::new(),
            active_regions: Vec::new(),
        }
    }

    /// The region.
    pub fn ctl(&self) -> &Arc<Ctl> {
        &self.ctl
    }

    /// Entries published now.
    pub fn published(&self) -> usize {
        self.by_gen.len()
    }

    /// Makes an entry visible to clients. Returns false (and publishes nothing) when its
    /// bucket is full; such objects are served through the socket only.
    pub fn publish(&mut self, e: IndexEntry) -> bool {
        if e.gen == 0 || self.by_gen.contains_key(&e.gen) {
            return false;
        }
        let base = self.ctl.bucket_of(e.hash);
        let Some(idx) = (base..base + SLOTS_PER_BUCKET)
            .find(|&i| self.ctl.slot(i).hash.load(Ordering::Relaxed) == 0)
        else {
            return false;
        };
        let s = self.ctl.slot(idx);
        s.seq.fetch_add(1, Ordering::SeqCst);
        s.gen.store(e.gen, Ordering::Relaxed);
        s.offset.store(e.offset, Ordering::Relaxed);
        s.len.store(e.len, Ordering::Relaxed);
        s.key_off.store(e.key_off, Ordering::Relaxed);
        s.key_meta.store(
            u64::from(e.key_len) | (u64::from(e.tag) << 32),
            Ordering::Relaxed,
        );
        s.atime.store(self.ctl.clock(), Ordering::Relaxed);
        s.hash.store(e.hash, Ordering::Relaxed);
        s.seq.fetch_add(1, Ordering::SeqCst);
        self.by_gen.insert(e.gen, idx);
        true
    }

    /// Removes the entry of `gen` so no new fast pin can be taken. After this returns, a
    /// [`IndexWriter::is_pinned`] answer of `false` means the memory can be freed.
    pub fn unpublish(&mut self, gen: u64) -> bool {
        let Some(idx) = self.by_gen.remove(&gen) else {
            return false;
        };
        let s = self.ctl.slot(idx);
        s.seq.fetch_add(1, Ordering::SeqCst);
        s.hash.store(0, Ordering::Relaxed);
        s.gen.store(0, Ordering::Relaxed);
        s.seq.fetch_add(1, Ordering::SeqCst);
        true
    }

    /// The last access time clients recorded for `gen`, if it is published.
    pub fn atime(&self, gen: u64) -> Option<u64> {
        let idx = *self.by_gen.get(&gen)?;
        Some(self.ctl.slot(idx).atime.load(Ordering::Relaxed))
    }

    /// Marks a pin region as handed to a client (only active regions are scanned).
    pub fn activate_region(&mut self, region: u32) {
        let r = region as usize;
        if r < self.ctl.pin_regions && !self.active_regions.contains(&r) {
            self.active_regions.push(r);
        }
    }

    /// Drops every pin of a region whose client is gone, and deactivates it.
    pub fn clear_region(&mut self, region: u32) {
        let r = region as usize;
        if r >= self.ctl.pin_regions {
            return;
        }
        for i in 0..self.ctl.pins_per_region {
            self.ctl.pin_word(r, i).store(0, Ordering::SeqCst);
        }
        self.ctl.pin_count(r).store(0, Ordering::SeqCst);
        self.ctl.pin_mark(r).store(0, Ordering::SeqCst);
        self.active_regions.retain(|a| *a != r);
    }

    fn active_pins(&self) -> impl Iterator<Item = u64> + '_ {
        let per = self.ctl.pins_per_region;
        self.active_regions
            .iter()
            .copied()
            .filter(|r| self.ctl.pin_count(*r).load(Ordering::SeqCst) != 0)
            .flat_map(move |r| {
                let used = (self.ctl.pin_mark(r).load(Ordering::SeqCst) as usize).min(per);
                (0..used).map(move |i| self.ctl.pin_word(r, i).load(Ordering::SeqCst))
            })
            .filter(|g| *g != 0)
    }

    /// Whether any client holds a fast pin on `gen`. Call after [`IndexWriter::unpublish`].
    pub fn is_pinned(&self, gen: u64) -> bool {
        fence(Ordering::SeqCst);
        self.active_pins().any(|g| g == gen)
    }

    /// Fast pins held now, per generation.
    pub fn pin_counts(&self) -> HashMap<u64, u32> {
        let mut m = HashMap::new();
        for g in self.active_pins() {
            *m.entry(g).or_insert(0) += 1;
        }
        m
    }
}

/// A fast pin a client holds; give it back with [`FastReader::release`].
#[derive(Debug, PartialEq, Eq)]
pub struct FastPin {
    /// Allocation generation.
    pub gen: u64,
    /// Payload offset in the arena.
    pub offset: u64,
    /// Payload length.
    pub len: u64,
    slot: u32,
}

/// A client's side of the index: lookups and its own pin region.
#[derive(Debug)]
pub struct FastReader {
    ctl: Arc<Ctl>,
    region: usize,
    free: Mutex<Vec<u32>>,
}

impl FastReader {
    /// A reader that pins into `region`.
    pub fn new(ctl: Arc<Ctl>, region: u32) -> Option<Self> {
        if region as usize >= ctl.pin_regions {
            return None;
        }
        let free = (0..ctl.pins_per_region as u32).rev().collect();
        Some(Self {
            ctl,
            region: region as usize,
            free: Mutex::new(free),
        })
    }

    /// Finds the sealed entry for (`tag`, `name`) and pins it, without a syscall. `None` when
    /// it is not published, is being changed, or this client's pin table is full: the caller
    /// then asks the worker over the socket.
    pub fn get(&self, arena: &Arena, tag: u8, name: &[u8]) -> Option<FastPin> {
        let hash = key_hash(tag, name);
        let base = self.ctl.bucket_of(hash);
        for idx in base..base + SLOTS_PER_BUCKET {
            let s = self.ctl.slot(idx);
            let seq = s.seq.load(Ordering::Acquire);
            if seq & 1 == 1 || s.hash.load(Ordering::Relaxed) != hash {
                continue;
            }
            let gen = s.gen.load(Ordering::Relaxed);
            let offset = s.offset.load(Ordering::Relaxed);
            let len = s.len.load(Ordering::Relaxed);
            let key_off = s.key_off.load(Ordering::Relaxed);
            let meta = s.key_meta.load(Ordering::Relaxed);
            let same_key = (meta >> 32) as u8 == tag
                && (meta & 0xffff_ffff) as usize == name.len()
                && arena
                    .bytes(key_off, name.len() as u64)
                    .is_ok_and(|k| k == name);
            fence(Ordering::Acquire);
            if !same_key || s.seq.load(Ordering::Relaxed) != seq || gen == 0 {
                continue;
            }
            arena.bytes(offset, len).ok()?;
            let pin_slot = self.free.lock().ok()?.pop()?;
            self.ctl
                .pin_count(self.region)
                .fetch_add(1, Ordering::SeqCst);
            self.ctl
                .pin_mark(self.region)
                .fetch_max(u64::from(pin_slot) + 1, Ordering::SeqCst);
            let word = self.ctl.pin_word(self.region, pin_slot as usize);
            word.store(gen, Ordering::SeqCst);
            if s.seq.load(Ordering::SeqCst) != seq {
                self.unpin_slot(pin_slot);
                return None;
            }
            s.atime.store(self.ctl.clock(), Ordering::Relaxed);
            return Some(FastPin {
                gen,
                offset,
                len,
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
        self.ctl
            .pin_word(self.region, slot as usize)
            .store(0, Ordering::SeqCst);
        self.ctl
            .pin_count(self.region)
            .fetch_sub(1, Ordering::SeqCst);
        if let Ok(mut f) = self.free.lock() {
            // Lowest slots are reused first (see `get`), which keeps the high-water mark low.
            f.push(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (Arc<Ctl>, Arena, IndexWriter) {
        let ctl = Arc::new(Ctl::create(4, 2, 4).unwrap());
        let arena = Arena::create("a", 1 << 16, false).unwrap();
        let w = IndexWriter::new(ctl.clone());
        (ctl, arena, w)
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
        }
    }

    #[test]
    fn publish_pin_unpublish() {
        let (ctl, arena, mut w) = setup();
        w.activate_region(0);
        assert!(w.publish(entry(&arena, b'o', "x", 7, 0)));
        let r = FastReader::new(ctl.clone(), 0).unwrap();
        assert!(
            r.get(&arena, b'k', b"x").is_none(),
            "namespace is part of the key"
        );
        assert!(r.get(&arena, b'o', b"y").is_none());
        let pin = r.get(&arena, b'o', b"x").unwrap();
        assert_eq!((pin.gen, pin.offset, pin.len), (7, 0, 10));
        assert!(w.unpublish(7));
        assert!(w.is_pinned(7), "the pin outlives the entry");
        assert!(r.get(&arena, b'o', b"x").is_none());
        r.release(pin);
        assert!(!w.is_pinned(7));
    }

    #[test]
    fn pin_table_full_falls_back() {
        let (ctl, arena, mut w) = setup();
        w.activate_region(1);
        w.publish(entry(&arena, b'o', "x", 1, 0));
        let r = FastReader::new(ctl.clone(), 1).unwrap();
        let pins: Vec<_> = (0..4).map(|_| r.get(&arena, b'o', b"x").unwrap()).collect();
        assert!(r.get(&arena, b'o', b"x").is_none());
        assert_eq!(w.pin_counts().get(&1), Some(&4));
        w.clear_region(1);
        assert!(!w.is_pinned(1));
        drop(pins);
    }

    #[test]
    fn full_bucket_is_refused_and_open_checks_layout() {
        let ctl = Arc::new(Ctl::create(1, 1, 1).unwrap());
        let arena = Arena::create("a", 1 << 16, false).unwrap();
        let mut w = IndexWriter::new(ctl.clone());
        for g in 1..=SLOTS_PER_BUCKET as u64 {
            assert!(w.publish(entry(&arena, b'o', &format!("k{g}"), g, g * 200)));
        }
        assert!(!w.publish(entry(&arena, b'o', "overflow", 99, 5000)));
        let fd = ctl.fd().try_clone_to_owned().unwrap();
        assert!(Ctl::open(fd, 2, 1, 1).is_err());
        let fd = ctl.fd().try_clone_to_owned().unwrap();
        let c2 = Ctl::open(fd, 1, 1, 1).unwrap();
        let r = FastReader::new(Arc::new(c2), 0).unwrap();
        assert!(r.get(&arena, b'o', b"k3").is_some());
    }

    #[test]
    fn concurrent_readers_never_pin_a_freed_generation() {
        // The writer repeatedly republishes a key under new generations and "frees" the old
        // one only when no pin is seen after unpublish; readers check that the generation
        // they pinned was never freed while they held it.
        use std::sync::atomic::AtomicBool;
        let ctl = Arc::new(Ctl::create(2, 3, 8).unwrap());
        let arena = Arc::new(Arena::create("a", 1 << 16, false).unwrap());
        let freed = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut w = IndexWriter::new(ctl.clone());
        arena.write(1000, b"key").unwrap();
        let mk = |gen| IndexEntry {
            tag: b'o',
            hash: key_hash(b'o', b"key"),
            gen,
            offset: 0,
            len: 1,
            key_off: 1000,
            key_len: 3,
        };
        for r in 0..2 {
            w.activate_region(r);
        }
        w.publish(mk(1));
        let readers: Vec<_> = (0..2u32)
            .map(|r| {
                let (ctl, arena, freed, stop) =
                    (ctl.clone(), arena.clone(), freed.clone(), stop.clone());
                std::thread::spawn(move || {
                    let rd = FastReader::new(ctl, r).unwrap();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(p) = rd.get(&arena, b'o', b"key") {
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
            w.unpublish(gen - 1);
            zombies.push(gen - 1);
            zombies.retain(|g| {
                if w.is_pinned(*g) {
                    true
                } else {
                    freed.lock().unwrap().insert(*g);
                    false
                }
            });
            w.publish(mk(gen));
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
    }
}
