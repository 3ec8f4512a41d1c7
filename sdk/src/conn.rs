//! The socket side of a client: handshake (our `ClientHello` with the token, if any; the
//! worker's hello + fds), request/reply, and one-way messages (release, abort) that can be
//! sent from `Drop` without blocking.
use crate::Error;
use bytes::BytesMut;
use nix::sys::socket::MsgFlags;
use shoal_protocol::{
    encode_frame, ClientFrame, ClientHello, FrameDecoder, Hello, Request, Response, ServerFrame,
    FRAME_HEADER_LEN,
};
use shoal_shm::{Ctl, Mailbox};
use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream as StdStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

/// Hello frames are small; anything bigger is not a shoal worker.
const MAX_HELLO: usize = 64 << 10;

/// Connects and completes the handshake on a blocking socket: sends `hello`, reads the
/// worker's. Returns the socket (still blocking), the hello and its fds (arena, index, bell
/// page, then the pin page and the mailbox when the hello announces them).
pub(crate) fn handshake(
    path: &Path,
    hello: &ClientHello,
) -> Result<(StdStream, Hello, Vec<OwnedFd>), Error> {
    let mut s = StdStream::connect(path)?;
    let mut first = Vec::new();
    encode_frame(hello, &mut first).map_err(|e| Error::protocol(e.to_string()))?;
    s.write_all(&first)?;
    let mut buf = vec![0u8; MAX_HELLO];
    let (mut n, fds) =
        shoal_shm::recv_with_fds(s.as_fd(), &mut buf, 5).map_err(|e| Error::Shm(e.to_string()))?;
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
                let want = 3 + usize::from(h.fast_path) + usize::from(h.mailbox.is_some());
                if fds.len() != want {
                    return Err(Error::protocol(format!(
                        "expected {want} fds with the hello, got {}",
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
                let m = std::io::Read::read(&mut s, &mut buf[n..])?;
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
    Blocking(StdStream),
}

/// Reads what the socket has, with the fds that came with it.
fn recv_fds(fd: BorrowedFd<'_>, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    shoal_shm::recv_with_fds(fd, buf, shoal_shm::MAX_FDS_PER_MESSAGE).map_err(|e| match e {
        shoal_shm::ShmError::FdPass(errno) => std::io::Error::from(errno),
        e => std::io::Error::other(e),
    })
}

/// How many fds a socket reply carries: one per segment view.
fn fds_in(resp: &Response) -> usize {
    match resp {
        Response::View(d) => usize::from(d.segment),
        Response::Views(v) => v
            .iter()
            .filter(|r| r.as_ref().is_ok_and(|d| d.segment))
            .count(),
        _ => 0,
    }
}

/// This client's shared-memory mailbox (blocking clients only: waiting for a reply spins,
/// yields, then sleeps on a futex, which would stall an async runtime).
#[derive(Debug)]
pub(crate) struct MailboxConn {
    mailbox: Mailbox,
    ctl: Arc<Ctl>,
    seq: u32,
    frame: Vec<u8>,
    reply: Vec<u8>,
    spin: Duration,
}

impl MailboxConn {
    pub(crate) fn new(mailbox: Mailbox, ctl: Arc<Ctl>, spin: Duration) -> Self {
        Self {
            mailbox,
            ctl,
            seq: 0,
            frame: Vec::new(),
            reply: Vec::new(),
            spin,
        }
    }
}

/// Requests whose replies are small enough for the mailbox and that never wait.
fn mailbox_eligible(req: &Request) -> bool {
    const MAX_KEYS: usize = 256;
    match req {
        Request::Get { ids, timeout_ms } => *timeout_ms == 0 && ids.len() <= MAX_KEYS,
        Request::Contains { ids } => ids.len() <= MAX_KEYS,
        Request::KvGet { keys } | Request::KvExists { keys } | Request::KvDel { keys } => {
            keys.len() <= MAX_KEYS
        }
        // Their replies carry an fd, which only the socket can.
        Request::Create { .. } | Request::KvCreate { .. } => false,
        Request::List { .. } | Request::Release { .. } | Request::Abort { .. } => false,
        _ => true,
    }
}

/// The request side of a connection. Callers serialize access (one request in flight).
#[derive(Debug)]
pub(crate) struct Conn {
    io: Io,
    mailbox: Option<MailboxConn>,
    /// One-way frames queued so far (the worker orders mailbox requests after them).
    oneways: u64,
    /// Requests answered through the mailbox (diagnostics).
    pub(crate) mailbox_calls: u64,
    rbuf: BytesMut,
    /// Fds received with socket bytes not yet decoded into their replies, in order.
    fds: VecDeque<OwnedFd>,
    scratch: Vec<u8>,
    /// Bytes queued for the socket, in order: one-way frames, then a request.
    wbuf: Vec<u8>,
    next_id: u32,
    decoder: FrameDecoder,
}

impl Conn {
    /// A connection; `blocking` for callers without a runtime of their own.
    pub(crate) fn new(
        stream: StdStream,
        max_frame: u32,
        blocking: bool,
        mailbox: Option<MailboxConn>,
    ) -> Result<Self, Error> {
        let io = if blocking {
            Io::Blocking(stream)
        } else {
            stream.set_nonblocking(true)?;
            Io::Async(UnixStream::from_std(stream)?)
        };
        Ok(Self {
            io,
            // The mailbox path blocks the caller while it waits, so only blocking clients use it.
            mailbox: mailbox.filter(|_| blocking),
            oneways: 0,
            mailbox_calls: 0,
            rbuf: BytesMut::with_capacity(64 << 10),
            fds: VecDeque::new(),
            scratch: vec![0u8; 64 << 10],
            wbuf: Vec::with_capacity(4096),
            next_id: 1,
            // Replies carry at most an inline payload plus framing; allow generous slack.
            decoder: FrameDecoder::new(max_frame as usize + (1 << 20)),
        })
    }

    fn push(&mut self, req: Request) -> Result<u32, Error> {
        if req.is_one_way() {
            self.oneways += 1;
        }
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
                Io::Blocking(s) => nix::sys::socket::send(
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

    /// Sends `req` (after anything queued) and waits for its reply, with the fds it carries
    /// (none through the mailbox). `socket_only` when the reply's fds are needed.
    pub(crate) async fn call(
        &mut self,
        req: Request,
        socket_only: bool,
    ) -> Result<(Response, Vec<OwnedFd>), Error> {
        if !socket_only && self.mailbox.is_some() && mailbox_eligible(&req) {
            return Ok((self.call_mailbox(req)?, Vec::new()));
        }
        let id = self.push(req)?;
        self.socket_reply(id).await
    }

    /// Sends `req` through the shared-memory mailbox and waits for the reply there. Falls
    /// back to the socket when the encoded request does not fit.
    fn call_mailbox(&mut self, req: Request) -> Result<Response, Error> {
        let Io::Blocking(sock) = &mut self.io else {
            return Err(Error::protocol("mailbox on an async connection"));
        };
        // Socket frames queued before this request must be on the wire: the worker handles
        // the request only after it has handled that many of them.
        if !self.wbuf.is_empty() {
            std::io::Write::write_all(sock, &self.wbuf)?;
            self.wbuf.clear();
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let Some(mb) = self.mailbox.as_mut() else {
            return Err(Error::protocol("no mailbox"));
        };
        mb.frame.clear();
        encode_frame(&ClientFrame { id, req }, &mut mb.frame)
            .map_err(|e| Error::protocol(e.to_string()))?;
        let seq = mb.seq.wrapping_add(1);
        if !mb.mailbox.post(seq, self.oneways, &mb.frame) {
            // Too large for the mailbox: the same frame goes on the socket.
            std::io::Write::write_all(sock, &mb.frame)?;
            return self.blocking_socket_reply(id).map(|(r, _)| r);
        }
        mb.seq = seq;
        mb.ctl.ring_doorbell();
        let start = Instant::now();
        let mut spins = 0u32;
        while !mb.mailbox.reply_ready(seq) {
            spins += 1;
            // A short pure spin (a `pause` costs ~100+ cycles on recent x86), then yields.
            if spins < 16 {
                std::hint::spin_loop();
            } else if start.elapsed() < mb.spin {
                std::thread::yield_now();
            } else {
                let mailbox = &mb.mailbox;
                mb.ctl
                    .sleep_until(|| mailbox.reply_ready(seq), Duration::from_millis(100));
                if !mailbox.reply_ready(seq) && !socket_alive(sock) {
                    return Err(Error::protocol("the dataworker closed the connection"));
                }
            }
        }
        mb.mailbox.reply(&mut mb.reply);
        self.mailbox_calls += 1;
        let mut b = BytesMut::from(&mb.reply[..]);
        match self
            .decoder
            .decode::<ServerFrame>(&mut b)
            .map_err(|e| Error::protocol(e.to_string()))?
        {
            Some(ServerFrame::Reply { id: rid, resp }) if rid == id => Ok(resp),
            other => Err(Error::protocol(format!(
                "unexpected mailbox reply {other:?}"
            ))),
        }
    }

    /// Takes frames off the read buffer until the reply to `id`, each with its fds; `None`
    /// if more bytes are needed. Replies to other ids (abandoned requests) are dropped with
    /// their fds.
    fn take_reply(&mut self, id: u32) -> Result<Option<(Response, Vec<OwnedFd>)>, Error> {
        while let Some(frame) = self
            .decoder
            .decode::<ServerFrame>(&mut self.rbuf)
            .map_err(|e| Error::protocol(e.to_string()))?
        {
            match frame {
                ServerFrame::Reply { id: rid, resp } => {
                    let n = fds_in(&resp);
                    if self.fds.len() < n {
                        return Err(Error::protocol(format!(
                            "a reply with {n} segment views came with {} fds",
                            self.fds.len()
                        )));
                    }
                    let fds: Vec<OwnedFd> = self.fds.drain(..n).collect();
                    if rid == id {
                        return Ok(Some((resp, fds)));
                    }
                }
                other => return Err(Error::protocol(format!("unexpected frame {other:?}"))),
            }
        }
        Ok(None)
    }

    /// Keeps what one read brought: bytes in the read buffer, fds in their queue.
    fn took(&mut self, n: usize, fds: Vec<OwnedFd>) -> Result<(), Error> {
        if n == 0 {
            return Err(Error::protocol("the dataworker closed the connection"));
        }
        self.rbuf.extend_from_slice(&self.scratch[..n]);
        self.fds.extend(fds);
        Ok(())
    }

    /// Writes what is queued and reads frames until the reply to `id`.
    async fn socket_reply(&mut self, id: u32) -> Result<(Response, Vec<OwnedFd>), Error> {
        let Io::Async(s) = &mut self.io else {
            if let Io::Blocking(s) = &mut self.io {
                std::io::Write::write_all(s, &self.wbuf)?;
            }
            self.wbuf.clear();
            return self.blocking_socket_reply(id);
        };
        s.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        loop {
            if let Some(r) = self.take_reply(id)? {
                return Ok(r);
            }
            let Io::Async(s) = &self.io else {
                return Err(Error::protocol("async read on a blocking connection"));
            };
            let scratch = &mut self.scratch;
            let (n, fds) = loop {
                s.readable().await?;
                match s.try_io(tokio::io::Interest::READABLE, || {
                    recv_fds(s.as_fd(), scratch)
                }) {
                    Ok(r) => break r,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e.into()),
                }
            };
            self.took(n, fds)?;
        }
    }

    /// The socket read loop for a blocking connection, without an executor.
    fn blocking_socket_reply(&mut self, id: u32) -> Result<(Response, Vec<OwnedFd>), Error> {
        loop {
            if let Some(r) = self.take_reply(id)? {
                return Ok(r);
            }
            let Io::Blocking(s) = &self.io else {
                return Err(Error::protocol("blocking read on an async connection"));
            };
            let (n, fds) = loop {
                match recv_fds(s.as_fd(), &mut self.scratch) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    r => break r?,
                }
            };
            self.took(n, fds)?;
        }
    }
}

/// Whether the worker's end of the socket is still open (a peek that does not block).
fn socket_alive(s: &StdStream) -> bool {
    let mut b = [0u8; 1];
    !matches!(
        nix::sys::socket::recv(
            s.as_raw_fd(),
            &mut b,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT
        ),
        Ok(0)
    )
}
