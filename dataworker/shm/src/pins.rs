//! A client's pin page: the one memfd a client and the worker both write-map for the fast
//! path, holding the client's pins and the ring of its recent fast reads.
//!
//! Layout (one memfd per client, sealed against resizing): a 64-byte header (live pin count,
//! high-water mark of pin slots used, ring head), `pins` pin words, then `ring` words of
//! recently read generations.
//!
//! The client writes the page; the worker only reads it, and treats every value as untrusted
//! input: a count or a mark is a hint that lets the worker skip work, clamped before use; a
//! pin word names a generation the worker keeps alive only if it is a live allocation of the
//! client's own tenant (checked by the caller); the ring is drained at most `ring` entries a
//! time whatever its head says. A client that writes nonsense here can keep at most `pins`
//! of its tenant's allocations alive, and only while it is connected: when it goes, the
//! worker drops the page and every pin with it.
//!
//! The pin handshake (with [`crate::ctl`]'s seqlock) is a Dekker pattern on fences, so that it
//! works on the read-only index a client maps: the client stores its pin, `fence(SeqCst)`,
//! then re-reads the slot's `seq`; the worker withdraws the slot (bumps `seq`),
//! `fence(SeqCst)`, then reads the pin words. In the total order of the two fences one comes
//! first: either the worker sees the pin, or the client sees the new `seq` and backs off.
//! The count and mark are raised before the pin store, so a worker that reads `count == 0`
//! or a mark below a slot does so only when that pin was not yet stored before its fence.
//! Releasing stores the word with `Release`; the worker reads it, then `fence(Acquire)`
//! before reusing memory, so the client's reads happen before the reuse. The loom models
//! at the bottom check both.
use crate::sync::{Model, Std, Word};
use crate::{Arena, ShmError};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

const HEADER_WORDS: usize = 8;

/// References to the words of one pin page, generic over the atomic model.
pub(crate) struct PinWords<'a, M: Model> {
    pub(crate) count: &'a M::U64,
    pub(crate) mark: &'a M::U64,
    pub(crate) head: &'a M::U64,
    pub(crate) pins: &'a [M::U64],
    pub(crate) ring: &'a [M::U64],
}

impl<M: Model> PinWords<'_, M> {
    /// Client: stores a pin of `gen` in slot `i` (count and mark first). The caller then
    /// confirms with the slot's seqlock ([`crate::ctl`]), which fences. False if `i` is not
    /// a slot.
    pub(crate) fn pin(&self, i: usize, gen: u64) -> bool {
        let Some(w) = self.pins.get(i) else {
            return false;
        };
        self.count.fetch_add(1, Ordering::Relaxed);
        self.mark.fetch_max(i as u64 + 1, Ordering::Relaxed);
        w.store(gen, Ordering::Relaxed);
        true
    }

    /// Client: ends the pin in slot `i`.
    pub(crate) fn unpin(&self, i: usize) {
        if let Some(w) = self.pins.get(i) {
            w.store(0, Ordering::Release);
            self.count.fetch_sub(1, Ordering::Release);
        }
    }

    /// Client: records a fast read of `gen` for the worker's LRU.
    pub(crate) fn note_read(&self, gen: u64) {
        let n = self.ring.len() as u64;
        if n == 0 {
            return;
        }
        let h = self.head.load(Ordering::Relaxed);
        if let Some(w) = self.ring.get((h % n) as usize) {
            w.store(gen, Ordering::Relaxed);
        }
        self.head.store(h.wrapping_add(1), Ordering::Release);
    }

    /// Worker, after withdrawing a slot and `fence(SeqCst)`: the non-zero pin words this
    /// client may hold now, at most `pins` of them.
    pub(crate) fn held(&self) -> impl Iterator<Item = u64> + '_ {
        let live = self.count.load(Ordering::Relaxed) != 0;
        let used = if live {
            // Untrusted: clamped to the page.
            (self
                .mark
                .load(Ordering::Relaxed)
                .min(self.pins.len() as u64)) as usize
        } else {
            0
        };
        self.pins[..used]
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .filter(|g| *g != 0)
    }

    /// Worker: the reads noted since `seen` (at most the ring's size, whatever the head says),
    /// oldest first; advances `seen`.
    pub(crate) fn drain(&self, seen: &mut u64, mut f: impl FnMut(u64)) {
        let n = self.ring.len() as u64;
        let h = self.head.load(Ordering::Acquire);
        if n == 0 {
            return;
        }
        let from = (*seen).min(h).max(h.saturating_sub(n));
        for i in from..h {
            if let Some(w) = self.ring.get((i % n) as usize) {
                let g = w.load(Ordering::Relaxed);
                if g != 0 {
                    f(g);
                }
            }
        }
        *seen = h;
    }
}

/// One client's pin page, mapped by the client and by the worker.
#[derive(Debug)]
pub struct PinPage {
    mem: Arena,
    pins: usize,
    ring: usize,
}

impl PinPage {
    fn size_for(pins: u32, ring: u32) -> Option<u64> {
        let words = (HEADER_WORDS as u64)
            .checked_add(u64::from(pins))?
            .checked_add(u64::from(ring))?;
        words.checked_mul(8)
    }

    /// A fresh page for a client with `pins` pin slots and a ring of `ring` reads (worker
    /// side).
    pub fn create(pins: u32, ring: u32) -> Result<PinPage, ShmError> {
        let size =
            Self::size_for(pins, ring).ok_or_else(|| ShmError::Invalid("too large".into()))?;
        Ok(PinPage {
            mem: Arena::create("shoal-pins", size, true)?,
            pins: pins as usize,
            ring: ring as usize,
        })
    }

    /// Maps a page received from the worker (client side).
    pub fn open(fd: OwnedFd, pins: u32, ring: u32) -> Result<PinPage, ShmError> {
        let size =
            Self::size_for(pins, ring).ok_or_else(|| ShmError::Invalid("too large".into()))?;
        Ok(PinPage {
            mem: Arena::open(fd, size, true)?,
            pins: pins as usize,
            ring: ring as usize,
        })
    }

    /// The memfd, to pass to the client.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.mem.fd()
    }

    /// Pin slots.
    pub fn pins(&self) -> u32 {
        self.pins as u32
    }

    fn all(&self) -> &[AtomicU64] {
        let n = HEADER_WORDS + self.pins + self.ring;
        // SAFETY: the mapping is exactly `n * 8` bytes (`size_for`, checked against the fd by
        // `Arena::open`/`create`), page-aligned, and lives as long as `self`; AtomicU64 has the
        // size and alignment of u64 and this process touches the page only through atomics.
        unsafe { std::slice::from_raw_parts(self.mem.base().cast::<AtomicU64>(), n) }
    }

    pub(crate) fn words(&self) -> PinWords<'_, Std> {
        let all = self.all();
        let (head, rest) = all.split_at(HEADER_WORDS);
        let (pins, ring) = rest.split_at(self.pins);
        PinWords {
            count: &head[0],
            mark: &head[1],
            head: &head[2],
            pins,
            ring,
        }
    }

    /// Overwrites every word of the page with `f(i)`: what a hostile client can do to its
    /// own page (tests play it).
    #[doc(hidden)]
    pub fn scribble(&self, f: impl Fn(usize) -> u64) {
        for (i, w) in self.all().iter().enumerate() {
            w.store(f(i), Ordering::Relaxed);
        }
    }

    /// Words of the page: header, then pins, then ring (for tests that forge a page).
    #[doc(hidden)]
    pub fn layout(&self) -> (usize, usize, usize) {
        (HEADER_WORDS, self.pins, self.ring)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_marks_and_ring() {
        let p = PinPage::create(4, 3).unwrap();
        let c = PinPage::open(p.fd().try_clone_to_owned().unwrap(), 4, 3).unwrap();
        let (w, cw) = (p.words(), c.words());
        assert!(cw.pin(2, 77));
        assert!(!cw.pin(4, 1), "slot 4 does not exist");
        assert_eq!(w.held().collect::<Vec<_>>(), vec![77]);
        cw.unpin(2);
        assert_eq!(w.held().count(), 0);
        let mut seen = 0;
        for g in 1..=5 {
            cw.note_read(g);
        }
        let mut got = Vec::new();
        w.drain(&mut seen, |g| got.push(g));
        assert_eq!(got, vec![3, 4, 5], "only the ring's worth");
        got.clear();
        w.drain(&mut seen, |g| got.push(g));
        assert!(got.is_empty());
    }

    #[test]
    fn hostile_words_are_bounded() {
        let p = PinPage::create(8, 4).unwrap();
        // Count and mark claim everything, every word holds a generation, the ring head is
        // near the end of the u64 range and then goes backwards.
        p.scribble(|i| match i {
            0 | 1 => u64::MAX,
            2 => u64::MAX - 1,
            i => i as u64,
        });
        let w = p.words();
        assert_eq!(w.held().count(), 8, "the mark is clamped to the page");
        let mut seen = 0;
        let mut n = 0;
        w.drain(&mut seen, |_| n += 1);
        assert_eq!(n, 4, "at most one ring's worth per drain");
        p.scribble(|i| if i == 2 { 3 } else { 0 });
        n = 0;
        w.drain(&mut seen, |_| n += 1);
        assert!(n <= 4);
        assert_eq!(seen, 3);
    }
}
