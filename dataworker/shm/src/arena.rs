//! The arena: one memfd, mapped shared, that holds every payload of a node.
//!
//! Invariant the rest of shoal keeps: a byte range is written only by the one client that
//! created it, before it is sealed, and never after; sealed ranges are read-only until the
//! worker frees them, which it does only when no view pins them. The arena cannot enforce this
//! against a misbehaving process with the same uid; it only bounds-checks every access.
use memmap2::{MmapOptions, MmapRaw};
use nix::fcntl::{fallocate, FallocateFlags};
use nix::sys::memfd::{memfd_create, MFdFlags};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

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
}

/// A shared mapping of a memfd. The mapping is dropped before the fd (field order).
#[derive(Debug)]
pub struct Arena {
    map: MmapRaw,
    file: File,
    size: u64,
}

impl Arena {
    /// Creates a memfd of `size` bytes, reserves its memory (`fallocate`, so a later page fault
    /// can never hit SIGBUS for lack of memory) and maps it. With `populate`, every page is
    /// also faulted in now so first writes run at memory speed.
    pub fn create(name: &str, size: u64, populate: bool) -> Result<Arena, ShmError> {
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
        Self::map(File::from(fd), size, populate)
    }

    /// Creates a memfd of `size` bytes whose pages are taken on first touch, not reserved now:
    /// for small regions mostly left untouched (call lanes), where reserving every page
    /// would cost far more memory than is used. Running out of memory on a touch is then a
    /// fault, as for any allocation.
    pub fn create_sparse(name: &str, size: u64) -> Result<Arena, ShmError> {
        let (fd, _) = Self::memfd(name, size)?;
        Self::map(File::from(fd), size, false)
    }

    /// A memfd sized to `size` bytes, and that size as `ftruncate` takes it.
    fn memfd(name: &str, size: u64) -> Result<(OwnedFd, i64), ShmError> {
        let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC).map_err(ShmError::Memfd)?;
        let len = i64::try_from(size).map_err(|_| ShmError::Resize {
            size,
            source: nix::Error::EINVAL,
        })?;
        nix::unistd::ftruncate(&fd, len).map_err(|source| ShmError::Resize { size, source })?;
        Ok((fd, len))
    }

    /// Maps an arena received from a worker. Fails if the fd is smaller than `size`.
    pub fn open(fd: OwnedFd, size: u64, populate: bool) -> Result<Arena, ShmError> {
        let file = File::from(fd);
        let actual = file
            .metadata()
            .map_err(|source| ShmError::Map { size, source })?
            .len();
        if actual < size {
            return Err(ShmError::SizeMismatch {
                expected: size,
                actual,
            });
        }
        Self::map(file, size, populate)
    }

    fn map(file: File, size: u64, populate: bool) -> Result<Arena, ShmError> {
        let len = usize::try_from(size).map_err(|_| ShmError::Map {
            size,
            source: std::io::Error::other("size does not fit in usize"),
        })?;
        let mut opts = MmapOptions::new();
        opts.len(len.max(1));
        if populate {
            opts.populate();
        }
        let map = opts
            .map_raw(&file)
            .map_err(|source| ShmError::Map { size, source })?;
        Ok(Arena { map, file, size })
    }

    /// The memfd, to pass to clients.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn check(&self, offset: u64, len: u64) -> Result<usize, ShmError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(offset as usize),
            _ => Err(ShmError::OutOfBounds {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// A read-only view of `len` bytes at `offset` (a sealed object).
    ///
    /// The slice borrows the mapping, which lives as long as `self`. By the arena invariant no
    /// one writes a sealed range while a view pins it.
    pub fn bytes(&self, offset: u64, len: u64) -> Result<&[u8], ShmError> {
        let start = self.check(offset, len)?;
        if len == 0 {
            return Ok(&[]);
        }
        // SAFETY: `start..start+len` is inside the live mapping (checked above); the mapping
        // outlives the returned borrow of `self`. Sealed ranges are immutable by protocol.
        Ok(unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(start), len as usize) })
    }

    /// A writable view of `len` bytes at `offset`.
    ///
    /// # Safety
    /// The caller must own the range exclusively (it created it and has not sealed it) and must
    /// not hold another slice overlapping it while this one lives.
    // Shared memory is aliased by design; exclusivity is the caller's documented contract.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self, offset: u64, len: u64) -> Result<&mut [u8], ShmError> {
        let start = self.check(offset, len)?;
        if len == 0 {
            return Ok(&mut []);
        }
        // SAFETY: in bounds (checked); exclusivity is the caller's contract above.
        Ok(unsafe {
            std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(start), len as usize)
        })
    }

    /// Copies `data` into the arena at `offset` (a range the caller owns exclusively).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), ShmError> {
        let start = self.check(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        // SAFETY: destination is in bounds (checked) and cannot overlap `data`, which is a
        // Rust slice the caller owns (a range of this arena is never passed as `data` by
        // shoal; `copy` tolerates overlap anyway).
        unsafe { std::ptr::copy(data.as_ptr(), self.map.as_mut_ptr().add(start), data.len()) };
        Ok(())
    }

    pub(crate) fn base(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }
}

/// Bytes that can still be allocated: the smaller of MemAvailable and the room left under the
/// memory cgroup's limit (v2 `memory.max`, else v1 `memory.limit_in_bytes`). `None` if unknown.
fn available_memory() -> Option<u64> {
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
        let a = Arena::create("t", 1 << 20, false).unwrap();
        a.write(100, b"hello").unwrap();
        assert_eq!(a.bytes(100, 5).unwrap(), b"hello");
        assert!(a.bytes(1 << 20, 1).is_err());
        assert!(a.write(u64::MAX, b"x").is_err());
        // A second mapping of the same fd sees the bytes (what a client does).
        let fd = a.fd().try_clone_to_owned().unwrap();
        let b = Arena::open(fd, 1 << 20, true).unwrap();
        assert_eq!(b.bytes(100, 5).unwrap(), b"hello");
        let fd = a.fd().try_clone_to_owned().unwrap();
        assert!(matches!(
            Arena::open(fd, 2 << 20, false),
            Err(ShmError::SizeMismatch { .. })
        ));
    }

    #[test]
    fn unbackable_size_is_a_clear_error() {
        // 1 PiB cannot be reserved on any test machine.
        let err = Arena::create("t", 1 << 50, false).unwrap_err();
        assert!(matches!(err, ShmError::TooBig { .. }), "{err}");
        assert!(err.to_string().contains("available"));
    }
}
