//! A local client that attacks its own shared-memory mailbox (#14): it maps the mailbox
//! read-write, so it can truncate the memfd under the worker, announce lengths beyond the
//! capacity, and write sequence numbers that skip ahead or go backwards, at any time. Each
//! attack hurts only that client: the worker answers it with an error or ignores it, never
//! faults, and serves everyone else.
#![allow(clippy::unwrap_used)] // test setup panics on failure by design
use bytes::BytesMut;
use shoal_dataworker::{Config, Dataworker};
use shoal_devcluster::wait::wait_for;
use shoal_protocol::{
    encode_frame, ClientFrame, ClientHello, ErrorCode, FrameDecoder, Hello, Request, Response,
    ServerFrame,
};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The mailbox layout (`shoal-shm`'s `mailbox.rs`): header words, then request, then reply.
const REQ_SEQ: u64 = 0;
const RESP_SEQ: u64 = 4;
const REQ_LEN: u64 = 12;
const RESP_LEN: u64 = 16;
const HEADER: u64 = 64;

/// The worker answers a mailbox within its poll interval (at most 100 ms asleep); generous.
const ANSWER: Duration = Duration::from_secs(10);

/// Connects by hand and returns the socket (kept open: the mailbox lives as long as the
/// connection), the worker's hello and the mailbox memfd as a file.
fn connect_raw(path: &Path) -> (UnixStream, Hello, std::fs::File) {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(ANSWER)).unwrap();
    let mut first = Vec::new();
    encode_frame(&ClientHello::default(), &mut first).unwrap();
    s.write_all(&first).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let (mut n, mut fds) = shoal_shm::recv_with_fds(s.as_fd(), &mut buf, 5).unwrap();
    let hello = loop {
        let mut b = BytesMut::from(&buf[..n]);
        match FrameDecoder::new(60 << 10)
            .decode::<ServerFrame>(&mut b)
            .unwrap()
        {
            Some(ServerFrame::Hello(h)) => break h,
            Some(other) => panic!("unexpected {other:?}"),
            None => n += s.read(&mut buf[n..]).unwrap(),
        }
    };
    assert_eq!(fds.len(), 5, "arena, index, bell page, pin page, mailbox");
    let mailbox: OwnedFd = fds.pop().unwrap();
    (s, hello, std::fs::File::from(mailbox))
}

fn word(mb: &std::fs::File, off: u64) -> u32 {
    let mut b = [0u8; 4];
    mb.read_exact_at(&mut b, off).unwrap();
    u32::from_le_bytes(b)
}

fn set_word(mb: &std::fs::File, off: u64, v: u32) {
    mb.write_all_at(&v.to_le_bytes(), off).unwrap();
}

/// Writes `req` as the request and announces it as `len` bytes under sequence number `seq`
/// (through the file: the same pages the worker maps).
fn post(mb: &std::fs::File, seq: u32, req: &Request, id: u32, len: Option<u32>) {
    let mut frame = Vec::new();
    encode_frame(
        &ClientFrame {
            id,
            req: req.clone(),
        },
        &mut frame,
    )
    .unwrap();
    mb.write_all_at(&frame, HEADER).unwrap();
    set_word(mb, REQ_LEN, len.unwrap_or(frame.len() as u32));
    set_word(mb, REQ_SEQ, seq);
}

/// Waits for reply `seq` and decodes it.
fn reply(mb: &std::fs::File, cap: u64, seq: u32) -> (u32, Response) {
    wait_for(&format!("reply {seq}"), ANSWER, || {
        (word(mb, RESP_SEQ) == seq).then_some(())
    })
    .unwrap();
    let len = u64::from(word(mb, RESP_LEN));
    assert!(len <= cap);
    let mut bytes = vec![0u8; len as usize];
    mb.read_exact_at(&mut bytes, HEADER + cap).unwrap();
    match FrameDecoder::new(cap as usize)
        .decode::<ServerFrame>(&mut BytesMut::from(&bytes[..]))
        .unwrap()
    {
        Some(ServerFrame::Reply { id, resp }) => (id, resp),
        other => panic!("unexpected reply {other:?}"),
    }
}

async fn start() -> (Dataworker, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(dir.path());
    cfg.shm_size = 16 << 20;
    let w = Dataworker::start(cfg, None).await.unwrap();
    let path = w.socket_path().to_owned();
    (w, dir, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_attacking_its_mailbox_hurts_only_itself() {
    let (w, _dir, path) = start().await;
    tokio::task::spawn_blocking(move || {
        let (_sock, hello, mb) = connect_raw(&path);
        let cap = hello.mailbox.expect("a mailbox");
        // A well-behaved client beside it, whose requests go through its own mailbox.
        let good = shoal_sdk::blocking::Client::connect(&path).unwrap();
        let mut good_round = {
            let mut i = 0u32;
            move || {
                i += 1;
                good.kv_set("good", &i.to_le_bytes(), Default::default())
                    .unwrap();
                assert_eq!(&good.kv_get("good").unwrap().unwrap()[..], i.to_le_bytes());
                good.mailbox_calls()
            }
        };
        assert!(good_round() > 0, "the good client uses its mailbox");

        // 1. Truncating the mailbox under the worker (its next sweep would fault with
        // SIGBUS), through the fd and through a read-write re-open: refused.
        assert!(mb.set_len(0).is_err(), "truncated through the fd");
        let reopened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{}", mb.as_raw_fd()))
            .unwrap();
        assert!(reopened.set_len(0).is_err(), "truncated through a re-open");
        assert!(
            reopened.set_len(1 << 30).is_err(),
            "grown through a re-open"
        );

        // 2. A length beyond the capacity: an error, not a request made of the capacity's
        // bytes.
        for (seq, len) in [(1, u32::MAX), (2, cap as u32 + 1)] {
            post(&mb, seq, &Request::Status, seq, Some(len));
            let (_, resp) = reply(&mb, cap, seq);
            match resp {
                Response::Error(e) => assert_eq!(e.code, ErrorCode::ProtocolError, "{e:?}"),
                other => panic!("length {len} answered {other:?}"),
            }
        }

        // 3. Sequence numbers that do not follow the last one handled (2): skipping ahead,
        // the same again, going backwards. None is a request. Three rounds of the good
        // client mean the poller has swept this mailbox since each write.
        for seq in [9, 2, 1, 0] {
            post(&mb, seq, &Request::Status, 100 + seq, None);
            for _ in 0..3 {
                good_round();
            }
            assert_eq!(word(&mb, RESP_SEQ), 2, "seq {seq} was answered");
        }

        // The next one in order is served as usual.
        post(&mb, 3, &Request::Status, 33, None);
        let (id, resp) = reply(&mb, cap, 3);
        assert_eq!(id, 33);
        assert!(matches!(resp, Response::Status(_)), "{resp:?}");
        good_round();
    })
    .await
    .unwrap();
    w.shutdown().await;
}
