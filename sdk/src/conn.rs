//! The socket side of a client: handshake (hello + fds), request/reply, and one-way messages
//! (release, abort) that can be sent from `Drop` without blocking.
use crate::Error;
use bytes::BytesMut;
use nix::sys::socket::MsgFlags;
use shoal_protocol::{
    encode_frame, ClientFrame, FrameDecoder, Hello, Request, Response, ServerFrame,
    FRAME_HEADER_LEN,
};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdStream;
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Hello frames are small; anything bigger is not a shoal worker.
const MAX_HELLO: usize = 64 << 10;

/// Connects and completes the handshake on a blocking socket. Returns the socket (still
/// blocking), the hello and the arena + control fds.
pub(crate) fn handshake(path: &Path) -> Result<(StdStream, Hello, Vec<OwnedFd>), Error> {
    let mut s = StdStream::connect(path)?;
    let mut buf = vec![0u8; MAX_HELLO];
    let (mut n, fds) =
        shoal_shm::recv_with_fds(s.as_fd(), &mut buf, 2).map_err(|e| Error::Shm(e.to_string()))?;
    if n == 0 {
        return Err(Error::protocol(
            "the worker closed the connection during the handshake",
        ));
    }
    let dec = FrameDecoder::new(MAX_HELLO - FRAME_HEADER_LEN);
    loop {
        let mut b = BytesMut::from(&buf[..n]);
        match dec
            .decode::<ServerFrame>(&mut b)
            .map_err(|e| Error::protocol(e.to_string()))?
        {
            Some(ServerFrame::Hello(h)) => {
                if fds.len() != 2 {
                    return Err(Error::protocol(format!(
                        "expected 2 fds with the hello, got {}",
                        fds.len()
                    )));
                }
                return Ok((s, h, fds));
            }
            Some(ServerFrame::Refused(e)) => return Err(Error::Remote(e)),
            Some(other) => {
                return Err(Error::protocol(format!("unexpected first frame {other:?}")))
            }
            None if n == buf.len() => return Err(Error::protocol("hello too large")),
            None => {
                let m = s.read(&mut buf[n..])?;
                if m == 0 {
                    return Err(Error::protocol(
                        "connection closed in the middle of the hello",
                    ));
                }
                n += m;
            }
        }
    }
}

/// The socket: async for the async client; plain blocking for the blocking client, which
/// then pays two syscalls per request (write, read) instead of four (write, read, epoll,
/// read): on machines where syscalls are expensive that is most of a round trip.
#[derive(Debug)]
enum Io {
    Async(UnixStream),
    Blocking(StdStream, Vec<u8>),
}

/// The request side of a connection. Callers serialize access (one request in flight).
#[derive(Debug)]
pub(crate) struct Conn {
    io: Io,
    rbuf: BytesMut,
    /// Bytes queued for the socket, in order: one-way frames, then a request.
    wbuf: Vec<u8>,
    next_id: u32,
    decoder: FrameDecoder,
}

impl Conn {
    /// A connection; `blocking` for callers without a runtime of their own.
    pub(crate) fn new(stream: StdStream, max_frame: u32, blocking: bool) -> Result<Self, Error> {
        let io = if blocking {
            Io::Blocking(stream, vec![0u8; 64 << 10])
        } else {
            stream.set_nonblocking(true)?;
            Io::Async(UnixStream::from_std(stream)?)
        };
        Ok(Self {
            io,
            rbuf: BytesMut::with_capacity(64 << 10),
            wbuf: Vec::with_capacity(4096),
            next_id: 1,
            // Replies carry at most an inline payload plus framing; allow generous slack.
            decoder: FrameDecoder::new(max_frame as usize + (1 << 20)),
        })
    }

    fn push(&mut self, req: Request) -> Result<u32, Error> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        encode_frame(&ClientFrame { id, req }, &mut self.wbuf)
            .map_err(|e| Error::protocol(e.to_string()))?;
        Ok(id)
    }

    /// Queues a one-way request and writes what the socket takes now, without blocking.
    pub(crate) fn send_one_way_nonblocking(&mut self, req: Request) {
        if self.push(req).is_ok() {
            self.flush_nonblocking();
        }
    }

    /// Queues a one-way request to go out with the next request.
    pub(crate) fn queue_one_way(&mut self, req: Request) {
        let _ = self.push(req);
    }

    fn flush_nonblocking(&mut self) {
        while !self.wbuf.is_empty() {
            let r = match &self.io {
                Io::Async(s) => s.try_write(&self.wbuf),
                Io::Blocking(s, _) => nix::sys::socket::send(
                    s.as_raw_fd(),
                    &self.wbuf,
                    MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
                )
                .map_err(std::io::Error::from),
            };
            match r {
                Ok(n) => {
                    self.wbuf.drain(..n);
                }
                Err(_) => break,
            }
        }
    }

    /// Sends `req` (after anything queued) and waits for its reply.
    pub(crate) async fn call(&mut self, req: Request) -> Result<Response, Error> {
        let id = self.push(req)?;
        match &mut self.io {
            Io::Async(s) => s.write_all(&self.wbuf).await?,
            Io::Blocking(s, _) => std::io::Write::write_all(s, &self.wbuf)?,
        }
        self.wbuf.clear();
        loop {
            if let Some(frame) = self
                .decoder
                .decode::<ServerFrame>(&mut self.rbuf)
                .map_err(|e| Error::protocol(e.to_string()))?
            {
                match frame {
                    ServerFrame::Reply { id: rid, resp } if rid == id => return Ok(resp),
                    ServerFrame::Reply { .. } => continue,
                    other => return Err(Error::protocol(format!("unexpected frame {other:?}"))),
                }
            }
            let n = match &mut self.io {
                Io::Async(s) => s.read_buf(&mut self.rbuf).await?,
                Io::Blocking(s, tmp) => {
                    let n = s.read(tmp)?;
                    self.rbuf.extend_from_slice(&tmp[..n]);
                    n
                }
            };
            if n == 0 {
                return Err(Error::protocol("the dataworker closed the connection"));
            }
        }
    }
}
