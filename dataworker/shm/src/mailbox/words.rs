//! What the mailbox and call-lane protocols are made of, behind small traits so that the same
//! protocol code runs on `std` atomics in a shared mapping (production) and on `loom`'s in
//! ordinary memory (the models in `mailbox/model.rs` and `lane/model.rs`):
//!
//! - [`Word32`], [`Word64`]: an atomic word, and the `SeqCst` fence of its kind. The
//!   protocols' sleep/wake handshakes (announce, then look at the other side's word) put a
//!   fence between the store and the load on both sides: that is the form of the Dekker
//!   pattern the C11 model guarantees and the one `loom` checks (it treats `SeqCst` loads and
//!   stores as acquire/release, but models `SeqCst` fences exactly).
//! - [`Futex`]: sleeping until a word changes.
//! - [`Buf`]: a byte buffer one side fills and the other copies out. [`ShmBuf`] is a range of
//!   a shared mapping that another process may write at any moment: it never hands out a
//!   Rust reference to those bytes, copies them once into private memory (validation and
//!   decoding look only at the copy), and checks every length against its capacity.
use crate::Arena;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// An atomic `u32`.
pub(crate) trait Word32 {
    fn load(&self, order: Ordering) -> u32;
    fn store(&self, v: u32, order: Ordering);
    fn fetch_add(&self, v: u32, order: Ordering) -> u32;
    fn fetch_sub(&self, v: u32, order: Ordering) -> u32;
    fn compare_exchange(&self, cur: u32, new: u32, ok: Ordering, err: Ordering)
        -> Result<u32, u32>;
    /// A `SeqCst` fence of the same world (std's or loom's).
    fn fence_seq_cst()
    where
        Self: Sized;
}

/// An atomic `u64`.
pub(crate) trait Word64 {
    fn load(&self, order: Ordering) -> u64;
    fn store(&self, v: u64, order: Ordering);
}

macro_rules! words {
    ($a32:ty, $a64:ty, $fence:path) => {
        impl Word32 for $a32 {
            #[inline]
            fn load(&self, order: Ordering) -> u32 {
                <$a32>::load(self, order)
            }
            #[inline]
            fn store(&self, v: u32, order: Ordering) {
                <$a32>::store(self, v, order)
            }
            #[inline]
            fn fetch_add(&self, v: u32, order: Ordering) -> u32 {
                <$a32>::fetch_add(self, v, order)
            }
            #[inline]
            fn fetch_sub(&self, v: u32, order: Ordering) -> u32 {
                <$a32>::fetch_sub(self, v, order)
            }
            #[inline]
            fn compare_exchange(
                &self,
                cur: u32,
                new: u32,
                ok: Ordering,
                err: Ordering,
            ) -> Result<u32, u32> {
                <$a32>::compare_exchange(self, cur, new, ok, err)
            }
            #[inline]
            fn fence_seq_cst() {
                $fence(Ordering::SeqCst)
            }
        }
        impl Word64 for $a64 {
            #[inline]
            fn load(&self, order: Ordering) -> u64 {
                <$a64>::load(self, order)
            }
            #[inline]
            fn store(&self, v: u64, order: Ordering) {
                <$a64>::store(self, v, order)
            }
        }
    };
}

words!(AtomicU32, AtomicU64, std::sync::atomic::fence);
#[cfg(test)]
words!(
    loom::sync::atomic::AtomicU32,
    loom::sync::atomic::AtomicU64,
    loom::sync::atomic::fence
);

/// Sleeping until a word changes (the kernel's futex in production, a mutex and condvar in
/// the models).
pub(crate) trait Futex<W> {
    /// Sleeps while `*word == expected`. It may return early (a timeout, a signal): callers
    /// re-check their condition.
    fn wait(&self, word: &W, expected: u32);
    /// Wakes up to `n` sleepers of `word`.
    fn wake(&self, word: &W, n: i32);
}

/// A byte buffer handed from one side of a protocol to the other.
pub(crate) trait Buf {
    /// Copies `data` to the start of the buffer; false (nothing written) if it does not fit.
    fn put(&self, data: &[u8]) -> bool;
    /// Replaces `out` with a copy of the first `len` bytes; false (and `out` empty) if `len`
    /// exceeds the capacity.
    fn get(&self, len: usize, out: &mut Vec<u8>) -> bool;
}

/// The atomic `u32` at byte offset `off` of `mem`.
///
/// Offsets are layout constants of the callers, so a bad one is a bug: it is checked for
/// real (alignment and bounds) and panics rather than touch memory outside the mapping.
pub(crate) fn shm_u32(mem: &Arena, off: u64) -> &AtomicU32 {
    assert!(
        off.is_multiple_of(4) && off.checked_add(4).is_some_and(|end| end <= mem.size()),
        "u32 word at {off} outside the {}-byte mapping",
        mem.size()
    );
    // SAFETY: `off` is 4-aligned and `off..off+4` lies inside the mapping (checked above),
    // whose base is page-aligned and which lives as long as the returned borrow of `mem`.
    // Words are only ever accessed through atomics, by every process that maps them.
    unsafe { &*(mem.base().add(off as usize) as *const AtomicU32) }
}

/// The atomic `u64` at byte offset `off` of `mem` (checked as in [`shm_u32`]).
pub(crate) fn shm_u64(mem: &Arena, off: u64) -> &AtomicU64 {
    assert!(
        off.is_multiple_of(8) && off.checked_add(8).is_some_and(|end| end <= mem.size()),
        "u64 word at {off} outside the {}-byte mapping",
        mem.size()
    );
    // SAFETY: as in `shm_u32`, with an 8-aligned offset.
    unsafe { &*(mem.base().add(off as usize) as *const AtomicU64) }
}

/// `cap` bytes of a shared mapping, starting at a fixed offset.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ShmBuf<'a> {
    ptr: *mut u8,
    cap: usize,
    _mem: PhantomData<&'a Arena>,
}

impl<'a> ShmBuf<'a> {
    /// The range `off..off+cap` of `mem`; panics if it is not inside the mapping (offsets
    /// and capacities are the caller's layout, validated when the region was created or
    /// opened).
    pub(crate) fn new(mem: &'a Arena, off: u64, cap: u64) -> ShmBuf<'a> {
        assert!(
            off.checked_add(cap).is_some_and(|end| end <= mem.size()),
            "buffer {off}+{cap} outside the {}-byte mapping",
            mem.size()
        );
        ShmBuf {
            // SAFETY: `off <= mem.size()` (checked above), so the pointer stays inside the
            // mapping or one past its end.
            ptr: unsafe { mem.base().add(off as usize) },
            cap: cap as usize,
            _mem: PhantomData,
        }
    }
}

impl Buf for ShmBuf<'_> {
    fn put(&self, data: &[u8]) -> bool {
        if data.len() > self.cap {
            return false;
        }
        // SAFETY: `ptr..ptr+data.len()` is inside the live mapping (constructor, and the
        // length check above); `data` is private memory of this process, so the ranges do
        // not overlap. No reference to the shared bytes is formed: a peer that reads or
        // writes them meanwhile gets or leaves whatever bytes, which every reader validates.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr, data.len()) };
        true
    }

    fn get(&self, len: usize, out: &mut Vec<u8>) -> bool {
        out.clear();
        if len > self.cap {
            return false;
        }
        out.reserve(len);
        // SAFETY: the source `ptr..ptr+len` is inside the live mapping (constructor, and
        // `len <= cap` above); the destination is `out`'s spare capacity, at least `len`
        // bytes of private heap memory that cannot overlap the mapping. Every byte is read
        // once; a peer writing meanwhile makes the copy garbage, never a second, different
        // read of the same byte. `set_len` then covers exactly the bytes written.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr, out.as_mut_ptr(), len);
            out.set_len(len);
        }
        true
    }
}
