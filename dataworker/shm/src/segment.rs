//! Segments: one memfd per object that a client writes itself (payloads above the inline
//! limit), and the bounded pool of ready-made ones.
//!
//! Lifecycle (the worker drives it; see ARCHITECTURE.md, "Local clients: threat model"):
//! 1. The worker makes the memfd ([`Segment::create`]): sized and sealed
//!    `F_SEAL_SHRINK | F_SEAL_GROW`, so nobody can ever resize it. Its pages are taken when
//!    first written (by the pool's prefault, or the client's `MAP_POPULATE`): the worker never
//!    maps an unsealed segment and reads a never-written page of a sealed one as the shared
//!    zero page, so nothing a client does to its segment can fault the worker. The store
//!    counts the whole segment against its budget from the start.
//! 2. It passes the fd to the one client that created the object, which maps it read-write
//!    ([`SegmentWriter`]), writes, and unmaps.
//! 3. On seal the worker adds `F_SEAL_WRITE | F_SEAL_SEAL` ([`Segment::seal`]). The kernel
//!    refuses `F_SEAL_WRITE` while any writable mapping of the file exists (anywhere), so a
//!    client that keeps its mapping gets [`ShmError::StillMapped`] and its object stays
//!    unsealed: it only hurts itself. Once sealed, no process can write the bytes by any
//!    route, and readers map them read-only ([`crate::ReadMap`]).
//! 4. The worker drops its fd when the store frees the object; the memory goes when the last
//!    mapping and fd of it (a reader's cache included) are gone.
use crate::arena::{add_seals, fixed_size, new_memfd, read_only_fd, seals_of};
use crate::{ReadMap, ShmError, PAGE};
use memmap2::{MmapOptions, MmapRaw};
use nix::fcntl::SealFlag;
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex};

/// The worker's handle on one segment memfd. It never maps the segment writable.
#[derive(Debug)]
pub struct Segment {
    file: File,
    /// Bytes the memfd holds (the object's length rounded up to a page).
    cap: u64,
}

impl Segment {
    /// A new segment able to hold `len` bytes: sized to whole pages, its size sealed.
    pub fn create(len: u64) -> Result<Segment, ShmError> {
        let cap = len.div_ceil(PAGE).saturating_mul(PAGE);
        let size = i64::try_from(cap).map_err(|_| ShmError::Resize {
            size: cap,
            source: nix::Error::EINVAL,
        })?;
        let fd = new_memfd("shoal-segment")?;
        nix::unistd::ftruncate(&fd, size)
            .map_err(|source| ShmError::Resize { size: cap, source })?;
        add_seals(fd.as_fd(), fixed_size(), "shrink, grow")?;
        Ok(Segment {
            file: File::from(fd),
            cap,
        })
    }

    /// Allocates every page now (through a mapping dropped before this returns), so the
    /// kernel has zeroed them and a client's `MAP_POPULATE` only maps them: on a VM, where a
    /// first-touch fault costs microseconds, this moves most of a large create's cost off its
    /// path (the pool does it on its own thread). An allocation failure is an error here,
    /// not a signal.
    pub fn prefault(&self) -> Result<(), ShmError> {
        if self.cap == 0 {
            return Ok(());
        }
        let len = usize::try_from(self.cap).map_err(|_| ShmError::Invalid("too large".into()))?;
        let map = MmapOptions::new()
            .len(len)
            .map_raw(&self.file)
            .map_err(|source| ShmError::Map {
                size: self.cap,
                source,
            })?;
        // The mapping goes away when this returns, so it never stands in the way of
        // `F_SEAL_WRITE`.
        map.advise(memmap2::Advice::PopulateWrite)
            .map_err(|source| ShmError::Map {
                size: self.cap,
                source,
            })
    }

    /// Bytes it can hold.
    pub fn capacity(&self) -> u64 {
        self.cap
    }

    /// The read-write fd, for the one client that writes the object (before it is sealed).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// A read-only fd, for readers of the sealed object.
    pub fn read_only_fd(&self) -> Result<OwnedFd, ShmError> {
        read_only_fd(self.file.as_fd())
    }

    /// Copies `data` in at `offset` with `pwrite` (objects the worker fills itself: restores
    /// from disk, copies pulled from other nodes). Fails once sealed.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), ShmError> {
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|e| e > self.cap) {
            return Err(ShmError::OutOfBounds {
                offset,
                len: data.len() as u64,
                size: self.cap,
            });
        }
        self.file
            .write_all_at(data, offset)
            .map_err(|source| ShmError::Map {
                size: self.cap,
                source,
            })
    }

    /// Makes the bytes immutable for good: `F_SEAL_WRITE | F_SEAL_SEAL`.
    /// [`ShmError::StillMapped`] while anyone maps it writable (nothing changes then; the
    /// writer may unmap and seal again).
    pub fn seal(&self) -> Result<(), ShmError> {
        if self.is_sealed() {
            return Ok(());
        }
        add_seals(
            self.file.as_fd(),
            SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SEAL,
            "write, seal",
        )?;
        // A client holding the fd may have added seals of its own; what matters is that the
        // write and size seals are all there now.
        if self.is_sealed() {
            Ok(())
        } else {
            Err(ShmError::NotSealed("write, shrink, grow"))
        }
    }

    /// Whether its bytes can no longer change.
    pub fn is_sealed(&self) -> bool {
        seals_of(self.file.as_fd())
            .contains(SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW)
    }

    /// A read-only mapping of the first `len` bytes of the sealed segment.
    pub fn map(&self, len: u64) -> Result<ReadMap, ShmError> {
        if !self.is_sealed() {
            return Err(ShmError::NotSealed("write"));
        }
        if len > self.cap {
            return Err(ShmError::SizeMismatch {
                expected: len,
                actual: self.cap,
            });
        }
        ReadMap::open(self.read_only_fd()?, len, false)
    }
}

/// A client's writable mapping of the segment of an object it created and has not sealed.
/// Dropping it unmaps (which [`Segment::seal`] requires).
#[derive(Debug)]
pub struct SegmentWriter {
    map: Option<MmapRaw>,
    len: u64,
}

impl SegmentWriter {
    /// Maps `len` bytes of a segment the worker passed for writing, read-write and populated
    /// (first writes then run at memory speed). The fd is closed once mapped. Fails if the
    /// segment is smaller than `len` or its size is not sealed.
    pub fn open(fd: OwnedFd, len: u64) -> Result<SegmentWriter, ShmError> {
        if !seals_of(fd.as_fd()).contains(fixed_size()) {
            return Err(ShmError::NotSealed("shrink, grow"));
        }
        let file = File::from(fd);
        let actual = file
            .metadata()
            .map_err(|source| ShmError::Map { size: len, source })?
            .len();
        if actual < len {
            return Err(ShmError::SizeMismatch {
                expected: len,
                actual,
            });
        }
        if len == 0 {
            return Ok(SegmentWriter { map: None, len });
        }
        let n = usize::try_from(len).map_err(|_| ShmError::Invalid("too large".into()))?;
        let map = MmapOptions::new()
            .len(n)
            .populate()
            .map_raw(&file)
            .map_err(|source| ShmError::Map { size: len, source })?;
        Ok(SegmentWriter {
            map: Some(map),
            len,
        })
    }

    /// A writer of an empty payload (nothing to map).
    pub fn empty() -> SegmentWriter {
        SegmentWriter { map: None, len: 0 }
    }

    /// Payload size.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The writable payload.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &self.map {
            // SAFETY: the mapping is `len` bytes, read-write, and lives as long as `self`;
            // the worker made this segment for this client alone and never maps it writable
            // or writes it, nobody else holds its fd, and `&mut self` makes this the only
            // borrow of the mapping in this process.
            Some(m) => unsafe { std::slice::from_raw_parts_mut(m.as_mut_ptr(), self.len as usize) },
            None => &mut [],
        }
    }
}

/// Segments kept ready so that a large create does not wait for the kernel to allocate and
/// zero its pages: a few per recently asked size, within a byte budget, made by a thread of
/// their own. Bounded in every dimension; a miss just makes the segment on the spot.
#[derive(Debug)]
pub struct SegmentPool {
    shared: Arc<PoolShared>,
    filler: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug)]
struct PoolShared {
    state: Mutex<PoolState>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct PoolState {
    /// (capacity, ready segments), most recently asked first.
    classes: VecDeque<(u64, Vec<Segment>)>,
    bytes: u64,
    stop: bool,
}

/// Sizes remembered at once.
const POOL_CLASSES: usize = 4;
/// Ready segments per size.
const POOL_PER_CLASS: usize = 2;

impl SegmentPool {
    /// A pool holding at most `max_bytes` of ready segments, only for sizes of at least
    /// `min_size` bytes (smaller ones cost little to make on the spot).
    pub fn new(max_bytes: u64, min_size: u64) -> Result<SegmentPool, ShmError> {
        let shared = Arc::new(PoolShared {
            state: Mutex::new(PoolState::default()),
            wake: Condvar::new(),
        });
        let s = shared.clone();
        let filler = std::thread::Builder::new()
            .name("shoal-segment-pool".into())
            .spawn(move || fill(&s, max_bytes, min_size))
            .map_err(|source| ShmError::Map { size: 0, source })?;
        Ok(SegmentPool {
            shared,
            filler: Some(filler),
        })
    }

    /// A segment for `len` bytes: a ready one of the same page-rounded size, or a new one.
    /// Either way the size is remembered, so the pool has one ready next time.
    pub fn take(&self, len: u64) -> Result<Segment, ShmError> {
        let cap = len.div_ceil(PAGE).saturating_mul(PAGE);
        let ready = {
            let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
            let pos = st.classes.iter().position(|(c, _)| *c == cap);
            let mut class = match pos {
                Some(i) => st.classes.remove(i).unwrap_or((cap, Vec::new())),
                None => (cap, Vec::new()),
            };
            let seg = class.1.pop();
            if seg.is_some() {
                st.bytes -= cap;
            }
            st.classes.push_front(class);
            while st.classes.len() > POOL_CLASSES {
                if let Some((c, v)) = st.classes.pop_back() {
                    st.bytes -= c * v.len() as u64;
                }
            }
            seg
        };
        self.shared.wake.notify_one();
        match ready {
            Some(s) => Ok(s),
            None => Segment::create(len),
        }
    }

    /// Bytes of ready segments now.
    pub fn ready_bytes(&self) -> u64 {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .bytes
    }
}

impl Drop for SegmentPool {
    fn drop(&mut self) {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.filler.take() {
            let _ = t.join();
        }
    }
}

/// The pool's thread: makes what the remembered sizes lack, within the budget.
fn fill(shared: &PoolShared, max_bytes: u64, min_size: u64) {
    let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if st.stop {
            return;
        }
        let want = st
            .classes
            .iter()
            .find(|(c, v)| *c >= min_size && v.len() < POOL_PER_CLASS && st.bytes + *c <= max_bytes)
            .map(|(c, _)| *c);
        let Some(cap) = want else {
            st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            continue;
        };
        // Reserve the bytes, then make the segment without the lock.
        st.bytes += cap;
        drop(st);
        let made = Segment::create(cap).and_then(|s| s.prefault().map(|()| s));
        st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        st.bytes -= cap;
        match made {
            Ok(seg) => {
                let s = &mut *st;
                if let Some((_, v)) = s.classes.iter_mut().find(|(c, _)| *c == cap) {
                    if v.len() < POOL_PER_CLASS && !s.stop {
                        v.push(seg);
                        s.bytes += cap;
                    }
                }
            }
            // Out of memory or fds: wait for the next take rather than spin.
            Err(_) => st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_unmap_seal_read() {
        let seg = Segment::create(10_000).unwrap();
        assert_eq!(seg.capacity(), 3 * PAGE);
        let mut w = SegmentWriter::open(seg.fd().try_clone_to_owned().unwrap(), 10_000).unwrap();
        w.as_mut_slice().fill(7);
        // Mapped writable: the seal is refused and nothing changes.
        assert!(matches!(seg.seal(), Err(ShmError::StillMapped)));
        assert!(!seg.is_sealed());
        drop(w);
        seg.seal().unwrap();
        let r = seg.map(10_000).unwrap();
        assert_eq!(r.bytes(0, 10_000).unwrap(), &[7u8; 10_000][..]);
        // Sealed: no writable mapping, no write, no resize, through any fd.
        let fd = seg.fd().try_clone_to_owned().unwrap();
        assert!(SegmentWriter::open(fd, 10_000).is_err());
        assert!(seg.write_at(0, b"x").is_err());
        assert!(nix::unistd::ftruncate(seg.fd(), 0).is_err());
        assert!(seg.seal().is_ok(), "sealing twice is fine");
    }

    #[test]
    fn worker_filled_segment() {
        let seg = Segment::create(5).unwrap();
        seg.write_at(0, b"hello").unwrap();
        assert!(seg.write_at(PAGE - 1, b"xx").is_err(), "past the capacity");
        seg.seal().unwrap();
        assert_eq!(seg.map(5).unwrap().bytes(0, 5).unwrap(), b"hello");
        let empty = Segment::create(0).unwrap();
        empty.seal().unwrap();
        assert_eq!(empty.map(0).unwrap().bytes(0, 0).unwrap(), b"");
    }

    #[test]
    fn pool_refills_recent_sizes_within_budget() {
        let pool = SegmentPool::new(4 * 65536, 65536).unwrap();
        let a = pool.take(65536).unwrap();
        assert_eq!(a.capacity(), 65536);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while pool.ready_bytes() < 2 * 65536 {
            assert!(std::time::Instant::now() < deadline, "pool never filled");
            std::thread::yield_now();
        }
        let b = pool.take(65000).unwrap();
        assert_eq!(
            b.capacity(),
            65536,
            "same page-rounded size comes from the pool"
        );
        // Small sizes are not pooled; the budget caps the rest.
        let _ = pool.take(100).unwrap();
        assert!(pool.ready_bytes() <= 4 * 65536);
    }
}
