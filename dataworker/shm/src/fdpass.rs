//! Passing file descriptors over a Unix socket with `SCM_RIGHTS`.
use crate::ShmError;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

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
}
