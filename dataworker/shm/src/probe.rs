//! Probes of what a holder of a shared-memory fd can do to it: every route a hostile client
//! would take to write or resize memory it may only read. The worker runs them at start on a
//! scratch region sealed like its arena (and refuses to start if the kernel lets any through);
//! tests run them as the hostile client does, on every fd it receives.
//!
//! Every probe that succeeds has done what it tried (a write, a resize): run them only on fds
//! whose contents may be destroyed, or that should refuse them.
use crate::{ReadMap, ShmError, PAGE};
use nix::fcntl::{fallocate, FallocateFlags, OFlag};
use nix::sys::mman::{MapFlags, ProtFlags};
use nix::sys::stat::Mode;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;

/// Which writes or resizes of one fd the kernel allowed (each `true` is a hole).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriteAccess {
    /// `ftruncate` to a smaller size.
    pub shrink: bool,
    /// `ftruncate` to a larger size.
    pub grow: bool,
    /// `fallocate(PUNCH_HOLE)` of the first page.
    pub punch_hole: bool,
    /// `fallocate` past the end.
    pub allocate_past_end: bool,
    /// `pwrite(2)` of one byte.
    pub write: bool,
    /// A `MAP_SHARED` mapping with `PROT_WRITE`.
    pub map_writable: bool,
    /// A read-only shared mapping made writable with `mprotect`.
    pub mprotect_writable: bool,
    /// A write through `/proc/self/mem` into a read-only mapping (the kernel's forced
    /// write, as a debugger does).
    pub proc_mem_write: bool,
    /// The same probes on the file reopened read-write through `/proc/self/fd/N` (`None`
    /// when it could not be reopened at all).
    pub reopened: Option<Box<WriteAccess>>,
}

impl WriteAccess {
    /// Whether every route was refused.
    pub fn none(&self) -> bool {
        let own = !(self.shrink
            || self.grow
            || self.punch_hole
            || self.allocate_past_end
            || self.write
            || self.map_writable
            || self.mprotect_writable
            || self.proc_mem_write);
        own && self.reopened.as_ref().is_none_or(|r| r.none())
    }

    /// Whether the size could be changed by any route.
    pub fn resizable(&self) -> bool {
        self.shrink
            || self.grow
            || self.allocate_past_end
            || self.reopened.as_ref().is_some_and(|r| r.resizable())
    }
}

/// Tries every route to write or resize `fd`, directly and after reopening it read-write.
pub fn write_access(fd: BorrowedFd<'_>) -> WriteAccess {
    let mut a = probe_one(fd);
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    if let Ok(rw) = nix::fcntl::open(
        path.as_str(),
        OFlag::O_RDWR | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        a.reopened = Some(Box::new(probe_one(rw.as_fd())));
    }
    a
}

fn size_of(fd: BorrowedFd<'_>) -> u64 {
    nix::sys::stat::fstat(fd).map_or(0, |s| s.st_size as u64)
}

fn probe_one(fd: BorrowedFd<'_>) -> WriteAccess {
    let size = size_of(fd);
    let len = i64::try_from(size).unwrap_or(i64::MAX);
    let page = PAGE as i64;
    let mut a = WriteAccess {
        shrink: size > 0 && nix::unistd::ftruncate(fd, len - 1).is_ok(),
        grow: nix::unistd::ftruncate(fd, len.saturating_add(page)).is_ok(),
        punch_hole: size > 0
            && fallocate(
                fd,
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                0,
                page,
            )
            .is_ok(),
        allocate_past_end: fallocate(fd, FallocateFlags::empty(), len, page).is_ok(),
        ..WriteAccess::default()
    };
    // The file may have changed size above if a probe got through; use what it is now.
    let size = size_of(fd);
    let file = fd.try_clone_to_owned().map(std::fs::File::from);
    a.write = size > 0 && file.as_ref().is_ok_and(|f| f.write_at(&[0], 0).is_ok());
    let Some(n) = NonZeroUsize::new(PAGE as usize).filter(|_| size >= PAGE) else {
        return a;
    };
    // SAFETY: a fresh mapping at an address the kernel picks; it aliases no Rust object and is
    // unmapped before returning without being dereferenced.
    if let Ok(p) = unsafe {
        nix::sys::mman::mmap(
            None,
            n,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            fd,
            0,
        )
    } {
        a.map_writable = true;
        // SAFETY: `p` is the mapping of `n` bytes made just above.
        let _ = unsafe { nix::sys::mman::munmap(p, n.get()) };
    }
    let read_only = {
        // SAFETY: as above; this mapping is read-only and never dereferenced here.
        unsafe { nix::sys::mman::mmap(None, n, ProtFlags::PROT_READ, MapFlags::MAP_SHARED, fd, 0) }
    };
    if let Ok(p) = read_only {
        // SAFETY: `p..p+n` is the mapping made just above, owned by this function.
        a.mprotect_writable = unsafe {
            nix::sys::mman::mprotect(p, n.get(), ProtFlags::PROT_READ | ProtFlags::PROT_WRITE)
        }
        .is_ok();
        if !a.mprotect_writable {
            a.proc_mem_write = proc_mem_write(p.as_ptr() as u64);
        }
        // SAFETY: the mapping made above.
        let _ = unsafe { nix::sys::mman::munmap(p, n.get()) };
    }
    a
}

/// Whether a forced write through `/proc/self/mem` to `addr` gets through.
fn proc_mem_write(addr: u64) -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/proc/self/mem")
        .is_ok_and(|f| f.write_at(&[0], addr).is_ok())
}

/// Writes one byte through a read-only mapping, from a forked child, and reports whether the
/// child was killed by the fault (`SIGSEGV`/`SIGBUS`) as it must be. `offset` is clamped to
/// the mapping. Also tries the forced write of `/proc/self/mem` (a debugger's route) in this
/// process: `Ok(false)` if that got through.
pub fn store_faults(map: &ReadMap, offset: u64) -> Result<bool, ShmError> {
    if map.size() == 0 {
        return Ok(true);
    }
    let addr = map.base() as usize + offset.min(map.size() - 1) as usize;
    if proc_mem_write(addr as u64) {
        return Ok(false);
    }
    // SAFETY: the child only performs one store and `_exit`s (async-signal-safe, no
    // allocation or lock after fork); the parent only waits for it.
    match unsafe { nix::unistd::fork() }.map_err(|e| ShmError::Invalid(format!("fork: {e}")))? {
        nix::unistd::ForkResult::Child => {
            // SAFETY: deliberately stores through a read-only mapping of this (disposable)
            // child process: the kernel kills it with SIGSEGV before the store happens. If
            // the mapping were writable the store would land in this child's view of the
            // shared page, which is what the caller wants to detect.
            unsafe {
                std::ptr::write_volatile(addr as *mut u8, 1);
                libc::_exit(0)
            }
        }
        nix::unistd::ForkResult::Parent { child } => {
            use nix::sys::signal::Signal;
            use nix::sys::wait::{waitpid, WaitStatus};
            match waitpid(child, None) {
                Ok(WaitStatus::Signaled(_, Signal::SIGSEGV | Signal::SIGBUS, _)) => Ok(true),
                Ok(_) => Ok(false),
                Err(e) => Err(ShmError::Invalid(format!("waitpid: {e}"))),
            }
        }
    }
}

/// Checks at start that this kernel enforces the seals the worker relies on: a scratch
/// region sealed like the arena must refuse every write and resize by every route.
pub fn check_kernel_seals() -> Result<(), ShmError> {
    let scratch = crate::Arena::create_worker_only("shoal-seal-check", 2 * PAGE, false)?;
    let fd = scratch.read_only_fd()?;
    let a = write_access(fd.as_fd());
    if !a.none() {
        return Err(ShmError::Invalid(format!(
            "this kernel does not enforce memfd seals as shoal needs (F_SEAL_FUTURE_WRITE, \
             and read-only mappings that cannot be made writable: Linux 6.7 or later): {a:?}"
        )));
    }
    let rw = scratch
        .fd()
        .try_clone_to_owned()
        .map_err(|source| ShmError::Map { size: 0, source })?;
    if write_access(rw.as_fd()).resizable() {
        return Err(ShmError::Invalid(
            "this kernel lets a sealed memfd be resized".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsealed_memory_is_writable_and_sealed_is_not() {
        // The probe finds the holes of an unsealed memfd (the arena before #14)...
        let open = crate::arena::new_memfd("open").unwrap();
        nix::unistd::ftruncate(&open, 2 * PAGE as i64).unwrap();
        let a = write_access(open.as_fd());
        assert!(
            a.shrink && a.write && a.map_writable && a.mprotect_writable,
            "{a:?}"
        );
        // ...and none in the sealed arena, even reopened read-write.
        check_kernel_seals().unwrap();
        let arena = crate::Arena::create_worker_only("a", 2 * PAGE, false).unwrap();
        let a = write_access(arena.fd());
        assert!(a.none(), "{a:?}");
        assert!(a.reopened.is_some(), "the reopen route was tried");
    }

    #[test]
    fn a_store_through_a_read_only_view_faults() {
        let arena = crate::Arena::create_worker_only("a", PAGE, false).unwrap();
        let view = ReadMap::open(arena.read_only_fd().unwrap(), PAGE, false).unwrap();
        assert!(store_faults(&view, 10).unwrap());
        let mut b = [9u8; 1];
        arena.read_into(10, &mut b).unwrap();
        assert_eq!(b, [0], "nothing was written");
    }
}
