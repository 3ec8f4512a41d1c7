//! Connections that go away while the worker is blocked writing to them (#14): the worker's
//! connection task owns its socket (tokio's `UnixStream`, deregistered from the reactor
//! before its fd is closed, once). Each round leaves a connection with a reply backlog it
//! can never deliver and an unsealed buffer, then closes it; the worker must end the task,
//! release the buffer, close every fd of the connection, and serve the next connection,
//! which the kernel gives the numbers just freed.
//!
//! Its own test binary: it counts the process's open fds, which other tests would disturb.
#![allow(clippy::unwrap_used)] // test setup panics on failure by design
use bytes::BytesMut;
use nix::sys::socket::{recv, MsgFlags};
use shoal_dataworker::{Config, Dataworker};
use shoal_devcluster::wait::wait_for;
use shoal_protocol::{
    encode_frame, ClientFrame, ClientHello, FrameDecoder, ObjectId, Request, Response, ServerFrame,
};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(10);

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A connection spoken by hand.
struct Raw {
    s: UnixStream,
    buf: BytesMut,
}

impl Raw {
    /// Connects and completes the handshake (the fds that come with the hello are closed).
    fn open(path: &Path) -> Raw {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(WITHIN)).unwrap();
        let mut first = Vec::new();
        encode_frame(&ClientHello::default(), &mut first).unwrap();
        s.write_all(&first).unwrap();
        let mut chunk = vec![0u8; 64 << 10];
        let (n, fds) = shoal_shm::recv_with_fds(s.as_fd(), &mut chunk, 4).unwrap();
        drop(fds);
        let mut r = Raw {
            s,
            buf: BytesMut::from(&chunk[..n]),
        };
        assert!(matches!(r.next(), ServerFrame::Hello(_)));
        r
    }

    fn next(&mut self) -> ServerFrame {
        loop {
            if let Some(f) = FrameDecoder::new(1 << 20)
                .decode::<ServerFrame>(&mut self.buf)
                .unwrap()
            {
                return f;
            }
            let mut chunk = [0u8; 4096];
            let n = self.s.read(&mut chunk).unwrap();
            assert!(n > 0, "the worker closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn call(&mut self, id: u32, req: Request) -> Response {
        let mut out = Vec::new();
        encode_frame(&ClientFrame { id, req }, &mut out).unwrap();
        self.s.write_all(&out).unwrap();
        match self.next() {
            ServerFrame::Reply { id: got, resp } if got == id => resp,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Sends status requests without reading a reply until the socket takes no more. By
    /// then the worker holds a socket buffer of requests whose replies (each several times
    /// larger) cannot fit in ours: it is left blocked in its write. Waits until the replies
    /// queued for us show it is writing.
    fn flood_until_the_worker_blocks(&mut self) {
        let mut frame = Vec::new();
        encode_frame(
            &ClientFrame {
                id: 7,
                req: Request::Status,
            },
            &mut frame,
        )
        .unwrap();
        let batch: Vec<u8> = frame
            .iter()
            .copied()
            .cycle()
            .take(frame.len() * 512)
            .collect();
        self.s.set_nonblocking(true).unwrap();
        loop {
            match self.s.write(&batch) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("flooding: {e}"),
            }
        }
        let mut peek = vec![0u8; 128 << 10];
        let fd = self.s.as_raw_fd();
        wait_for("a backlog of replies", WITHIN, || {
            let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
            let n = recv(fd, &mut peek, flags).unwrap_or(0);
            (n == peek.len()).then_some(())
        })
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_while_a_write_is_pending_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(dir.path());
    cfg.shm_size = 16 << 20;
    let w = Dataworker::start(cfg, None).await.unwrap();
    let path = w.socket_path().to_owned();
    let baseline = open_fds();
    let rounds = tokio::task::spawn_blocking(move || {
        for round in 0..8u32 {
            let mut c = Raw::open(&path);
            let id = ObjectId::new(format!("unsealed-{round}")).unwrap();
            let resp = c.call(1, Request::Create { id, size: 4096 });
            assert!(!matches!(resp, Response::Error(_)), "{resp:?}");
            c.flood_until_the_worker_blocks();
            drop(c);
        }
        path
    });
    let path = rounds.await.unwrap();
    wait_for("every connection's resources released", WITHIN, || {
        let s = w.status();
        (s.clients == 0 && s.unsealed == 0 && s.used_bytes == 0).then_some(())
    })
    .unwrap();
    wait_for("every connection's fds closed", WITHIN, || {
        (open_fds() == baseline).then_some(())
    })
    .unwrap();
    // The worker serves on, on the fd numbers just freed.
    tokio::task::spawn_blocking(move || {
        let mut c = Raw::open(&path);
        assert!(matches!(c.call(1, Request::Status), Response::Status(_)));
    })
    .await
    .unwrap();
    w.shutdown().await;
}
