//! File descriptors shared with another process: passing them over a Unix socket with
//! `SCM_RIGHTS`, and the seals that fix the size of the small memfds (mailboxes, call lanes,
//! gauges) one side creates and the other maps.
//!
//! A process that maps a memfd another process can `ftruncate` is one truncate away from a
//! `SIGBUS` on its next access. So such memfds are created with `MFD_ALLOW_SEALING`, sized,
//! then sealed with `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL` before they are passed: seals
//! belong to the file, so they hold through every fd of it, a re-open through
//! `/proc/<pid>/fd` included, and nobody can add or remove one afterwards. The side that
//! receives one refuses it unless those seals are set ([`check_size_sealed`]).
use crate::ShmError;
use nix::fcntl::{fallocate, fcntl, FallocateFlags, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The seals of a memfd shared with a peer: its size is fixed, and so are its seals.
fn size_seals() -> SealFlag {
    SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL
}

/// A memfd of `size` bytes whose size is sealed (see the module docs). With `reserve`, its
/// pages are allocated now (`fallocate`), so touching them later cannot fail for lack of
/// memory; without, they are taken on first touch.
pub(crate) fn sealed_memfd(name: &str, size: u64, reserve: bool) -> Result<OwnedFd, ShmError> {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
        .map_err(ShmError::Memfd)?;
    let len = i64::try_from(size).map_err(|_| ShmError::Resize {
        size,
        source: nix::Error::EINVAL,
    })?;
    nix::unistd::ftruncate(&fd, len).map_err(|source| ShmError::Resize { size, source })?;
    if reserve && size > 0 {
        fallocate(&fd, FallocateFlags::empty(), 0, len)
            .map_err(|source| ShmError::CannotBack { size, source })?;
    }
    fcntl(&fd, FcntlArg::F_ADD_SEALS(size_seals()))
        .map_err(|e| ShmError::Invalid(format!("sealing a {size}-byte memfd failed: {e}")))?;
    Ok(fd)
}

/// Refuses a memfd received from a peer unless its size is sealed: a peer that kept the
/// right to shrink it could make every access of ours fault.
pub(crate) fn check_size_sealed(fd: impl AsFd) -> Result<(), ShmError> {
    let seals = fcntl(fd, FcntlArg::F_GET_SEALS).map_err(|e| {
        ShmError::Invalid(format!(
            "the peer's shared memory is not a sealable memfd: {e}"
        ))
    })?;
    let want = size_seals();
    if SealFlag::from_bits_truncate(seals).contains(want) {
        Ok(())
    } else {
        Err(ShmError::Invalid(format!(
            "the peer's shared memory is not sealed against resizing (seals {seals:#x}, need {:#x})",
            want.bits()
        )))
    }
}

/// Sends `data` with `fds` attached in one `sendmsg`. Returns the bytes sent (the caller
/// sends any rest with plain writes).
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<usize, ShmError> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(data)],
        &cmsg,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(ShmError::FdPass)
}

/// Most fds one message may carry (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS_PER_MESSAGE: usize = 253;

/// Receives into `buf` and takes up to `max_fds` passed fds. Returns (bytes read, fds).
/// Fds beyond what a caller expects are closed when the returned vector drops. A message
/// whose fds did not all fit (the kernel closed some) is an error: the caller could no longer
/// tell which fd belongs to which reply.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
) -> Result<(usize, Vec<OwnedFd>), ShmError> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(ShmError::FdPass)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(ShmError::FdPass)? {
        if let ControlMessageOwned::ScmRights(list) = c {
            for fd in list {
                // SAFETY: the kernel just installed `fd` in this process for us (SCM_RIGHTS);
                // nothing else owns it, so wrapping it in an OwnedFd gives it exactly one owner.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    let n = msg.bytes;
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(ShmError::FdPass(nix::Error::EMSGSIZE));
    }
    fds.truncate(max_fds);
    Ok((n, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn passes_a_memfd() {
        let (a, b) = UnixStream::pair().unwrap();
        let arena = crate::Arena::create_worker_only("t", 4096, false).unwrap();
        arena.write(0, b"shared").unwrap();
        assert_eq!(send_with_fds(a.as_fd(), b"hi", &[arena.fd()]).unwrap(), 2);
        let mut buf = [0u8; 16];
        let (n, mut fds) = recv_with_fds(b.as_fd(), &mut buf, 2).unwrap();
        assert_eq!(&buf[..n], b"hi");
        assert_eq!(fds.len(), 1);
        let mapped = crate::ReadMap::open(fds.remove(0), 4096, false).unwrap();
        assert_eq!(mapped.bytes(0, 6).unwrap(), b"shared");
    }

    /// What a peer holding a sealed memfd tries: shrink it, grow it, through its fd and
    /// through a read-write re-open of `/proc/self/fd/N`, or undo the seals. All refused.
    #[test]
    fn a_sealed_memfd_keeps_its_size_whatever_a_holder_does() {
        let fd = sealed_memfd("t", 8192, false).unwrap();
        check_size_sealed(&fd).unwrap();
        let peer = std::fs::File::from(fd.try_clone().unwrap());
        for len in [0, 4096, 1 << 20] {
            assert!(peer.set_len(len).is_err(), "resized to {len}");
        }
        let path = format!("/proc/self/fd/{}", peer.as_raw_fd());
        let reopened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        assert!(reopened.set_len(0).is_err(), "resized through a re-open");
        assert!(fcntl(
            &reopened,
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_FUTURE_WRITE)
        )
        .is_err());
        assert_eq!(peer.metadata().unwrap().len(), 8192);
    }

    #[test]
    fn an_unsealed_memfd_from_a_peer_is_refused() {
        let plain = memfd_create("t", MFdFlags::MFD_CLOEXEC).unwrap();
        assert!(check_size_sealed(&plain).is_err());
        let sealable =
            memfd_create("t", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
        fcntl(&sealable, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_GROW)).unwrap();
        assert!(
            check_size_sealed(&sealable).is_err(),
            "shrinking is still allowed"
        );
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(check_size_sealed(&a).is_err(), "not a memfd");
    }
}
