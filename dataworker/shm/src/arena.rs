//! Memfd-backed shared memory: [`Arena`], a region this process maps read-write, and
//! [`ReadMap`], a sealed region it maps read-only.
//!
//! Every memfd created here is sealed before any fd of it leaves the process, so no holder of
//! the fd can resize it (a client that could `ftruncate` a region would make every other
//! mapper die of SIGBUS on its next access):
//! - shared read-write regions (mailboxes, pin pages, the doorbell page, lanes):
//!   `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL` at creation;
//! - worker-only regions (the arena, the index; [`Arena::create_worker_only`]): the same, and
//!   `F_SEAL_FUTURE_WRITE` once the worker has mapped them: from then on nobody, whatever fd
//!   or reopened `/proc/self/fd` path they use, can write them with `write(2)`, punch holes,
//!   map them writable or `mprotect` a read-only mapping to writable (kernel ≥ 6.7 clears
//!   `VM_MAYWRITE` on such mappings). Only the mapping the worker made before the seal writes.
//!
//! Soundness: shared memory can change under this process at any time (other processes write
//! it), so this module never hands out a Rust reference to memory that someone may write:
//! - [`Arena::write`] and [`Arena::read_into`] copy with atomic accesses only, so concurrent
//!   access from another thread or process is never a data race;
//! - [`ReadMap::bytes`] hands out `&[u8]` only of mappings whose bytes nobody writes while the
//!   borrow lives: sealed segments (`F_SEAL_WRITE`: the kernel refuses every write) and sealed
//!   ranges of the arena (only the worker writes the arena, and never a range a pin holds; see
//!   `ctl.rs`).
use memmap2::{MmapOptions, MmapRaw};
use nix::fcntl::{fallocate, fcntl, FallocateFlags, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// Failures to set up or access shared memory.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// memfd_create failed.
    #[error("memfd_create failed: {0}")]
    Memfd(#[source] nix::Error),
    /// The memfd could not be sized.
    #[error("sizing the shared memory to {size} bytes failed: {source}")]
    Resize {
        /// Requested size.
        size: u64,
        /// OS error.
        #[source]
        source: nix::Error,
    },
    /// The memory could not be reserved (not enough RAM or memory-cgroup room).
    #[error("cannot back {size} bytes of shared memory (is there enough free memory, or a cgroup limit?): {source}")]
    CannotBack {
        /// Requested size.
        size: u64,
        /// OS error.
        #[source]
        source: nix::Error,
    },
    /// The machine (or the memory cgroup) has less free memory than requested.
    #[error("cannot back {size} bytes of shared memory: only {available} bytes are available (MemAvailable or the memory cgroup limit)")]
    TooBig {
        /// Requested size.
        size: u64,
        /// Available bytes.
        available: u64,
    },
    /// mmap failed.
    #[error("mapping {size} bytes of shared memory failed: {source}")]
    Map {
        /// Requested size.
        size: u64,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The fd is smaller than announced.
    #[error("shared memory fd has {actual} bytes, expected at least {expected}")]
    SizeMismatch {
        /// Announced.
        expected: u64,
        /// Found.
        actual: u64,
    },
    /// An access outside the mapping.
    #[error("range {offset}+{len} is outside the {size}-byte mapping")]
    OutOfBounds {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// Mapping size.
        size: u64,
    },
    /// A layout no region can have (a peer's announcement, or a bad request).
    #[error("invalid shared-memory layout: {0}")]
    Invalid(String),
    /// fd passing failed.
    #[error("passing file descriptors failed: {0}")]
    FdPass(#[source] nix::Error),
    /// The peer sent no or too few fds.
    #[error("expected {expected} file descriptors, got {got}")]
    MissingFds {
        /// Wanted.
        expected: usize,
        /// Received.
        got: usize,
    },
    /// Sealing a memfd failed (or the kernel does not support the seal).
    #[error("sealing shared memory ({what}) failed: {source}")]
    Seal {
        /// Which seals.
        what: &'static str,
        /// OS error.
        #[source]
        source: nix::Error,
    },
    /// A received fd lacks the seals that make it safe to map.
    #[error("shared memory fd is not sealed as required ({0})")]
    NotSealed(&'static str),
    /// `F_SEAL_WRITE` was refused because someone still maps the segment writable.
    #[error("the segment is still mapped writable somewhere: unmap it before sealing")]
    StillMapped,
}

/// Size of a page, the unit a memfd is backed and mapped in.
pub const PAGE: u64 = 4096;

/// Seals of a region whose size nobody may change (every shared region).
pub(crate) fn fixed_size() -> SealFlag {
    SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW
}

/// A fresh sealable memfd.
pub(crate) fn new_memfd(name: &str) -> Result<OwnedFd, ShmError> {
    memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).map_err(ShmError::Memfd)
}

/// Adds `seals` to a memfd.
pub(crate) fn add_seals(
    fd: BorrowedFd<'_>,
    seals: SealFlag,
    what: &'static str,
) -> Result<(), ShmError> {
    fcntl(fd, FcntlArg::F_ADD_SEALS(seals))
        .map(drop)
        .map_err(|source| match source {
            nix::Error::EBUSY => ShmError::StillMapped,
            source => ShmError::Seal { what, source },
        })
}

/// The seals of a memfd (empty for a file that cannot be sealed).
pub fn seals_of(fd: BorrowedFd<'_>) -> SealFlag {
    fcntl(fd, FcntlArg::F_GET_SEALS)
        .map(SealFlag::from_bits_truncate)
        .unwrap_or(SealFlag::empty())
}

/// A new, read-only file description of the same file (through `/proc/self/fd`), so that
/// what a reader receives cannot be written through even where a seal would not stop it.
/// Falls back to a duplicate when `/proc` is not mounted (the seals still hold).
pub(crate) fn read_only_fd(fd: BorrowedFd<'_>) -> Result<OwnedFd, ShmError> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    match std::fs::OpenOptions::new().read(true).open(path) {
        Ok(f) => Ok(f.into()),
        Err(_) => fd
            .try_clone_to_owned()
            .map_err(|source| ShmError::Map { size: 0, source }),
    }
}

fn size_of_fd(file: &File, size: u64) -> Result<u64, ShmError> {
    Ok(file
        .metadata()
        .map_err(|source| ShmError::Map { size, source })?
        .len())
}

/// A shared mapping of a memfd, read-write in this process. The mapping is dropped before the
/// fd (field order).
#[derive(Debug)]
pub struct Arena {
    map: MmapRaw,
    file: File,
    size: u64,
}

impl Arena {
    /// Creates a memfd of `size` bytes, reserves its memory (`fallocate`, so a later page fault
    /// can never hit SIGBUS for lack of memory), seals its size and maps it. With `populate`,
    /// every page is also faulted in now so first writes run at memory speed.
    pub fn create(name: &str, size: u64, populate: bool) -> Result<Arena, ShmError> {
        let fd = Self::reserved(name, size)?;
        add_seals(
            fd.as_fd(),
            fixed_size() | SealFlag::F_SEAL_SEAL,
            "shrink, grow, seal",
        )?;
        Self::map(File::from(fd), size, populate)
    }

    /// Like [`Arena::create`], for a region only this process may write (the worker's arena
    /// and index): after mapping it, seals it with `F_SEAL_FUTURE_WRITE`, so every mapping made
    /// later (by anyone, through any fd) is read-only and `write(2)` is refused.
    pub fn create_worker_only(name: &str, size: u64, populate: bool) -> Result<Arena, ShmError> {
        let fd = Self::reserved(name, size)?;
        add_seals(fd.as_fd(), fixed_size(), "shrink, grow")?;
        let arena = Self::map(File::from(fd), size, populate)?;
        add_seals(
            arena.file.as_fd(),
            SealFlag::F_SEAL_FUTURE_WRITE | SealFlag::F_SEAL_SEAL,
            "future write, seal",
        )?;
        Ok(arena)
    }

    /// Creates a memfd of `size` bytes whose pages are taken on first touch, not reserved now:
    /// for small regions mostly left untouched (call lanes), where reserving every page
    /// would cost far more memory than is used. Running out of memory on a touch is then a
    /// fault, as for any allocation. Its size is sealed like [`Arena::create`]'s.
    pub fn create_sparse(name: &str, size: u64) -> Result<Arena, ShmError> {
        let (fd, _) = Self::memfd(name, size)?;
        add_seals(
            fd.as_fd(),
            fixed_size() | SealFlag::F_SEAL_SEAL,
            "shrink, grow, seal",
        )?;
        Self::map(File::from(fd), size, false)
    }

    /// A memfd of `size` bytes with every page reserved.
    fn reserved(name: &str, size: u64) -> Result<OwnedFd, ShmError> {
        let (fd, len) = Self::memfd(name, size)?;
        // fallocate on a memfd takes pages one by one until memory runs out, so an arena the
        // machine cannot hold must be refused before it, not discovered by the OOM killer.
        if let Some(available) = available_memory() {
            if size > available {
                return Err(ShmError::TooBig { size, available });
            }
        }
        if size > 0 {
            fallocate(&fd, FallocateFlags::empty(), 0, len)
                .map_err(|source| ShmError::CannotBack { size, source })?;
        }
        Ok(fd)
    }

    /// A memfd sized to `size` bytes, and that size as `ftruncate` takes it.
    fn memfd(name: &str, size: u64) -> Result<(OwnedFd, i64), ShmError> {
        let fd = new_memfd(name)?;
        let len = i64::try_from(size).map_err(|_| ShmError::Resize {
            size,
            source: nix::Error::EINVAL,
        })?;
        nix::unistd::ftruncate(&fd, len).map_err(|source| ShmError::Resize { size, source })?;
        Ok((fd, len))
    }

    /// Maps read-write a region received from a worker (a mailbox, a pin page, the doorbell
    /// page, a lane). Fails if the fd is smaller than `size` or its size is not sealed (so
    /// that no other holder can shrink it under this mapping).
    pub fn open(fd: OwnedFd, size: u64, populate: bool) -> Result<Arena, ShmError> {
        if !seals_of(fd.as_fd()).contains(SealFlag::F_SEAL_SHRINK) {
            return Err(ShmError::NotSealed("shrink"));
        }
        let file = File::from(fd);
        let actual = size_of_fd(&file, size)?;
        if actual < size {
            return Err(ShmError::SizeMismatch {
                expected: size,
                actual,
            });
        }
        Self::map(file, size, populate)
    }

    fn map(file: File, size: u64, populate: bool) -> Result<Arena, ShmError> {
        let len = map_len(size)?;
        let mut opts = MmapOptions::new();
        opts.len(len);
        if populate {
            opts.populate();
        }
        let map = opts
            .map_raw(&file)
            .map_err(|source| ShmError::Map { size, source })?;
        Ok(Arena { map, file, size })
    }

    /// The memfd (read-write), to pass to a client that shares the region.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// A read-only fd of the region, to pass to clients that only read it.
    pub fn read_only_fd(&self) -> Result<OwnedFd, ShmError> {
        read_only_fd(self.file.as_fd())
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn check(&self, offset: u64, len: u64) -> Result<usize, ShmError> {
        check(offset, len, self.size)
    }

    /// Copies `data` into the region at `offset`. Sound whoever else reads or writes the range
    /// meanwhile (every access goes through atomics); what the bytes mean is the protocol's
    /// business (the worker writes only ranges it owns and no reader pins).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), ShmError> {
        let start = self.check(offset, data.len() as u64)?;
        // SAFETY: the destination range is inside the live mapping (checked); this process
        // touches shared memory only with atomic accesses, so there is no data race.
        unsafe { racy_store(self.map.as_mut_ptr().add(start), data) };
        Ok(())
    }

    /// Copies `out.len()` bytes at `offset` out of the region, with atomic loads (see
    /// [`Arena::write`]).
    pub fn read_into(&self, offset: u64, out: &mut [u8]) -> Result<(), ShmError> {
        let start = self.check(offset, out.len() as u64)?;
        // SAFETY: the source range is inside the live mapping (checked); atomic loads only.
        unsafe { racy_load(self.map.as_ptr().add(start), out) };
        Ok(())
    }

    pub(crate) fn base(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }
}

fn map_len(size: u64) -> Result<usize, ShmError> {
    let len = usize::try_from(size).map_err(|_| ShmError::Map {
        size,
        source: std::io::Error::other("size does not fit in usize"),
    })?;
    Ok(len.max(1))
}

fn check(offset: u64, len: u64, size: u64) -> Result<usize, ShmError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(offset as usize),
        _ => Err(ShmError::OutOfBounds { offset, len, size }),
    }
}

/// A read-only mapping of a sealed memfd: a client's view of the arena and the index, and
/// anyone's view of a sealed segment. This process cannot write it (`PROT_READ`, and the
/// seals forbid a writable mapping or `mprotect` to one).
#[derive(Debug)]
pub struct ReadMap {
    map: MmapRaw,
    _file: File,
    size: u64,
}

impl ReadMap {
    /// Maps `size` bytes of `fd` read-only. The fd must be sealed against shrinking and
    /// against writes (`F_SEAL_WRITE`, or `F_SEAL_FUTURE_WRITE` for regions only their creator
    /// writes), so neither a resize (SIGBUS) nor a write through another fd can reach it.
    pub fn open(fd: OwnedFd, size: u64, populate: bool) -> Result<ReadMap, ShmError> {
        let seals = seals_of(fd.as_fd());
        if !seals.contains(SealFlag::F_SEAL_SHRINK) {
            return Err(ShmError::NotSealed("shrink"));
        }
        if !seals.intersects(SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_FUTURE_WRITE) {
            return Err(ShmError::NotSealed("write"));
        }
        let file = File::from(fd);
        let actual = size_of_fd(&file, size)?;
        if actual < size {
            return Err(ShmError::SizeMismatch {
                expected: size,
                actual,
            });
        }
        let mut opts = MmapOptions::new();
        opts.len(map_len(size)?);
        if populate {
            opts.populate();
        }
        let map = opts
            .map_raw_read_only(&file)
            .map_err(|source| ShmError::Map { size, source })?;
        Ok(ReadMap {
            map,
            _file: file,
            size,
        })
    }

    /// Maps the whole of a sealed fd read-only (a segment received with a view: its size is
    /// the file's), with the checks of [`ReadMap::open`].
    pub fn open_all(fd: OwnedFd) -> Result<ReadMap, ShmError> {
        let size = nix::sys::stat::fstat(fd.as_fd())
            .map_err(|e| ShmError::Map {
                size: 0,
                source: e.into(),
            })?
            .st_size as u64;
        Self::open(fd, size, false)
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// A read-only view of `len` bytes at `offset` (a sealed object).
    ///
    /// The slice borrows the mapping, which lives as long as `self`. Nobody writes a sealed
    /// segment (the kernel refuses it), and the worker never writes an arena range a pin
    /// holds, so the bytes do not change while a pinned view borrows them.
    pub fn bytes(&self, offset: u64, len: u64) -> Result<&[u8], ShmError> {
        let start = check(offset, len, self.size)?;
        if len == 0 {
            return Ok(&[]);
        }
        // SAFETY: `start..start+len` is inside the live mapping (checked above); the mapping
        // outlives the returned borrow of `self`; this process cannot write it (PROT_READ) and
        // the bytes of a pinned sealed object are not written by anyone (see above).
        Ok(unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(start), len as usize) })
    }

    /// Whether the `want.len()` bytes at `offset` equal `want`, read with atomic loads: for
    /// bytes that may be changing (a name whose entry may be withdrawn and its memory reused
    /// while we look). A wrong answer is possible only while the bytes change; callers
    /// confirm with the seqlock afterwards. Out-of-bounds ranges compare unequal.
    pub fn racy_eq(&self, offset: u64, want: &[u8]) -> bool {
        let Ok(start) = check(offset, want.len() as u64, self.size) else {
            return false;
        };
        // SAFETY: in bounds of the live mapping (checked); atomic loads only.
        unsafe { racy_eq(self.map.as_ptr().add(start), want) }
    }

    pub(crate) fn base(&self) -> *const u8 {
        self.map.as_ptr()
    }
}

/// Stores `src` at `dst` with relaxed atomic stores (8 bytes at a time where aligned).
///
/// # Safety
/// `dst..dst+src.len()` must be valid for writes, and this process must access that memory
/// only atomically while the call runs.
pub(crate) unsafe fn racy_store(dst: *mut u8, src: &[u8]) {
    let n = src.len();
    let mut i = 0;
    while i < n && !(dst as usize + i).is_multiple_of(8) {
        // SAFETY: `dst + i` is in the caller's range; u8 atomics need no alignment.
        unsafe { AtomicU8::from_ptr(dst.add(i)) }.store(src[i], Ordering::Relaxed);
        i += 1;
    }
    while i + 8 <= n {
        let mut w = [0u8; 8];
        w.copy_from_slice(&src[i..i + 8]);
        // SAFETY: `dst + i` is 8-aligned (loop above) and the 8 bytes are in range.
        unsafe { AtomicU64::from_ptr(dst.add(i).cast::<u64>()) }
            .store(u64::from_ne_bytes(w), Ordering::Relaxed);
        i += 8;
    }
    while i < n {
        // SAFETY: as in the first loop.
        unsafe { AtomicU8::from_ptr(dst.add(i)) }.store(src[i], Ordering::Relaxed);
        i += 1;
    }
}

/// Loads `out.len()` bytes at `src` with relaxed atomic loads.
///
/// # Safety
/// `src..src+out.len()` must be valid for reads (it may be read-only memory: only relaxed
/// loads of at most 8 bytes are used), and this process must access it only atomically.
pub(crate) unsafe fn racy_load(src: *const u8, out: &mut [u8]) {
    let n = out.len();
    let mut i = 0;
    while i < n && !(src as usize + i).is_multiple_of(8) {
        // SAFETY: in the caller's range; relaxed loads do not write.
        out[i] = unsafe { AtomicU8::from_ptr(src.add(i).cast_mut()) }.load(Ordering::Relaxed);
        i += 1;
    }
    while i + 8 <= n {
        // SAFETY: 8-aligned and in range; a relaxed load does not write.
        let w = unsafe { AtomicU64::from_ptr(src.add(i).cast_mut().cast::<u64>()) }
            .load(Ordering::Relaxed);
        out[i..i + 8].copy_from_slice(&w.to_ne_bytes());
        i += 8;
    }
    while i < n {
        // SAFETY: as above.
        out[i] = unsafe { AtomicU8::from_ptr(src.add(i).cast_mut()) }.load(Ordering::Relaxed);
        i += 1;
    }
}

/// Compares `want.len()` bytes at `src` with `want`, with relaxed atomic loads.
///
/// # Safety
/// As [`racy_load`].
unsafe fn racy_eq(src: *const u8, want: &[u8]) -> bool {
    let mut chunk = [0u8; 64];
    for (i, part) in want.chunks(chunk.len()).enumerate() {
        let got = &mut chunk[..part.len()];
        // SAFETY: `src + i*64 ..+part.len()` is inside the caller's range.
        unsafe { racy_load(src.add(i * 64), got) };
        if got != part {
            return false;
        }
    }
    true
}

/// Bytes that can still be allocated: the smaller of MemAvailable and the room left under the
/// memory cgroup's limit (v2 `memory.max`, else v1 `memory.limit_in_bytes`). `None` if unknown.
pub fn available_memory() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let num = |p: &str| read(p).and_then(|s| s.trim().parse::<u64>().ok());
    let meminfo = read("/proc/meminfo").and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    let cgroup = [
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ]
    .iter()
    .find_map(|(limit, usage)| Some(num(limit)?.saturating_sub(num(usage).unwrap_or(0))));
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_write_read_share() {
        let a = Arena::create_worker_only("t", 1 << 20, false).unwrap();
        a.write(100, b"hello").unwrap();
        let mut out = [0u8; 5];
        a.read_into(100, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        assert!(a.read_into(1 << 20, &mut out[..1]).is_err());
        assert!(a.write(u64::MAX, b"x").is_err());
        // A read-only mapping of the same fd sees the bytes (what a client does).
        let b = ReadMap::open(a.read_only_fd().unwrap(), 1 << 20, true).unwrap();
        assert_eq!(b.bytes(100, 5).unwrap(), b"hello");
        assert!(b.racy_eq(100, b"hello"));
        assert!(!b.racy_eq(100, b"hellO"));
        assert!(
            !b.racy_eq((1 << 20) - 2, b"hello"),
            "out of bounds is unequal"
        );
        assert!(matches!(
            ReadMap::open(a.read_only_fd().unwrap(), 2 << 20, false),
            Err(ShmError::SizeMismatch { .. })
        ));
        // Writes made after the reader mapped show through (same pages).
        a.write(0, &[7u8; 300]).unwrap();
        assert_eq!(b.bytes(0, 300).unwrap(), &[7u8; 300][..]);
    }

    #[test]
    fn unaligned_copies_round_trip() {
        let a = Arena::create("t", 4096, false).unwrap();
        let data: Vec<u8> = (0..200u8).collect();
        for off in 0..9 {
            a.write(off, &data[..(100 + off as usize)]).unwrap();
            let mut out = vec![0u8; 100 + off as usize];
            a.read_into(off, &mut out).unwrap();
            assert_eq!(out, &data[..(100 + off as usize)]);
        }
    }

    #[test]
    fn unsealed_or_writable_fds_are_refused() {
        // A read-only mapping needs a write seal; a shared mapping needs a size seal.
        let shared = Arena::create("t", 4096, false).unwrap();
        assert!(matches!(
            ReadMap::open(shared.fd().try_clone_to_owned().unwrap(), 4096, false),
            Err(ShmError::NotSealed("write"))
        ));
        let raw = new_memfd("raw").unwrap();
        nix::unistd::ftruncate(&raw, 4096).unwrap();
        assert!(matches!(
            Arena::open(raw, 4096, false),
            Err(ShmError::NotSealed("shrink"))
        ));
        // The shared region's size cannot change, by any holder.
        let fd = shared.fd().try_clone_to_owned().unwrap();
        assert!(nix::unistd::ftruncate(&fd, 0).is_err());
        assert!(nix::unistd::ftruncate(&fd, 8192).is_err());
    }

    #[test]
    fn unbackable_size_is_a_clear_error() {
        // 1 PiB cannot be reserved on any test machine.
        let err = Arena::create("t", 1 << 50, false).unwrap_err();
        assert!(matches!(err, ShmError::TooBig { .. }), "{err}");
        assert!(err.to_string().contains("available"));
    }
}
