//! A hostile local client (issue #14): a real process that connects like any client, then
//! tries every route to write or resize each memfd it holds (its mapping, `write(2)`,
//! `ftruncate`, `fallocate`, `mprotect`, `/proc/self/mem`, the same after reopening
//! `/proc/self/fd/N` read-write), stores through its read-only views, forges and zeroes pins,
//! stamps recent reads of other clients' objects, keeps its own segment mapped while asking
//! to seal it, scribbles over every page it may write, and dies. Meanwhile honest SDK clients
//! keep writing and reading: they must see correct bytes throughout, the worker must stay up,
//! and arena use must come back to its baseline once the hostile client is gone.
//!
//! The hostile client is this test binary run again (`hostile_child`), with the socket in
//! its environment.
#![allow(clippy::unwrap_used)] // test setup panics on failure by design
use bytes::BytesMut;
use shoal_dataworker::{Config, Dataworker};
use shoal_protocol::{
    encode_frame, ClientFrame, ClientHello, ErrorCode, FrameDecoder, Hello, ObjectId, Request,
    Response, ServerFrame, ViewDesc,
};
use shoal_shm::probe::{store_faults, write_access};
use shoal_shm::{Arena, Ctl, FastReader, PinPage, ReadMap, SegmentWriter};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const HOSTILE_ENV: &str = "SHOAL_TEST_HOSTILE_SOCKET";
const SMALL: &str = "victim-small";
const BIG: &str = "victim-big";
const BIG_LEN: usize = 300_000;

fn small_bytes() -> Vec<u8> {
    (0..1000u32).map(|i| (i * 7) as u8).collect()
}

fn big_bytes() -> Vec<u8> {
    (0..BIG_LEN as u32).map(|i| (i % 251) as u8).collect()
}

/// A client speaking the protocol by hand, keeping the fds replies bring.
struct Raw {
    s: UnixStream,
    buf: BytesMut,
    fds: Vec<OwnedFd>,
    next_id: u32,
}

impl Raw {
    fn connect(path: &str) -> (Raw, Hello) {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Raw {
            s,
            buf: BytesMut::new(),
            fds: Vec::new(),
            next_id: 1,
        };
        let mut out = Vec::new();
        encode_frame(&ClientHello::default(), &mut out).unwrap();
        r.s.write_all(&out).unwrap();
        match r.frame() {
            ServerFrame::Hello(h) => (r, h),
            other => panic!("expected a hello, got {other:?}"),
        }
    }

    fn frame(&mut self) -> ServerFrame {
        let dec = FrameDecoder::new(8 << 20);
        loop {
            if let Some(f) = dec.decode::<ServerFrame>(&mut self.buf).unwrap() {
                return f;
            }
            let mut tmp = vec![0u8; 64 << 10];
            let (n, fds) = shoal_shm::recv_with_fds(self.s.as_fd(), &mut tmp, 253).unwrap();
            assert!(n > 0, "the worker closed the connection");
            self.buf.extend_from_slice(&tmp[..n]);
            self.fds.extend(fds);
        }
    }

    fn call(&mut self, req: Request) -> (Response, Vec<OwnedFd>) {
        let id = self.next_id;
        self.next_id += 1;
        let mut out = Vec::new();
        encode_frame(&ClientFrame { id, req }, &mut out).unwrap();
        self.s.write_all(&out).unwrap();
        match self.frame() {
            ServerFrame::Reply { id: rid, resp } if rid == id => {
                (resp, std::mem::take(&mut self.fds))
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn oid(s: &str) -> ObjectId {
    ObjectId::new(s).unwrap()
}

/// Overwrites every byte of a region this client may write (its own or shared ones).
fn scribble(mem: &Arena, seed: u8) {
    let junk: Vec<u8> = (0..mem.size())
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    mem.write(0, &junk).unwrap();
}

/// The hostile client. Does nothing unless started by `a_hostile_client_hurts_only_itself`.
#[test]
fn hostile_child() {
    let Ok(sock) = std::env::var(HOSTILE_ENV) else {
        return;
    };
    let (mut raw, hello) = Raw::connect(&sock);
    let mut fds = std::mem::take(&mut raw.fds).into_iter();
    let arena_fd = fds.next().unwrap();
    let index_fd = fds.next().unwrap();
    let bell_fd = fds.next().unwrap();
    assert!(hello.fast_path && hello.mailbox.is_some(), "{hello:?}");
    let pin_fd = fds.next().unwrap();
    let mailbox_fd = fds.next().unwrap();
    let dup = |fd: &OwnedFd| fd.try_clone().unwrap();

    // 1. The arena and the index: no route writes or resizes them, directly or reopened.
    for (what, fd) in [("arena", &arena_fd), ("index", &index_fd)] {
        let a = write_access(fd.as_fd());
        assert!(a.none(), "the {what} is writable: {a:?}");
        assert!(
            a.reopened.is_some(),
            "the {what} could not even be reopened"
        );
    }
    // A store through the read-only views faults (in a forked child), and the forced write
    // of /proc/self/mem is refused.
    let arena = ReadMap::open(dup(&arena_fd), hello.arena_bytes, false).unwrap();
    assert!(
        store_faults(&arena, 0).unwrap(),
        "stored through the arena view"
    );
    let index = ReadMap::open_all(dup(&index_fd)).unwrap();
    assert!(store_faults(&index, 64).unwrap(), "forged an index slot");

    // 2. Regions it may write (its pin page, the shared bell page, its mailbox): nobody can
    // resize them.
    for (what, fd) in [
        ("pin page", &pin_fd),
        ("bell", &bell_fd),
        ("mailbox", &mailbox_fd),
    ] {
        let a = write_access(fd.as_fd());
        assert!(!a.resizable(), "the {what} can be resized: {a:?}");
    }

    // 3. Pins: take real ones on the victims, then zero the page (that hurts only itself),
    // then forge: counts and marks at the maximum, every pin word a victim's generation or
    // garbage, the read ring claiming the victims over and over with the head near 2^64.
    let ctl = Arc::new(
        Ctl::open(
            dup(&index_fd),
            dup(&bell_fd),
            hello.ctl.buckets,
            hello.ctl.pins,
            hello.ctl.ring,
        )
        .unwrap(),
    );
    let reader = FastReader::new(ctl.clone(), ctl.open_pin_page(dup(&pin_fd)).unwrap());
    let page: PinPage = ctl.open_pin_page(dup(&pin_fd)).unwrap();
    let small = reader
        .get(&arena, b'o', SMALL.as_bytes())
        .expect("victim indexed");
    let big = reader
        .get(&arena, b'o', BIG.as_bytes())
        .expect("victim indexed");
    assert!(big.segment && !small.segment);
    let gens = [small.gen, big.gen];
    let (header, pins, _) = page.layout();
    let bell = Arena::open(dup(&bell_fd), 64, false).unwrap();
    let mailbox_len = 64 + 2 * hello.mailbox.unwrap();
    let mailbox = Arena::open(dup(&mailbox_fd), mailbox_len, false).unwrap();
    for round in 0..200u64 {
        page.scribble(|_| 0);
        page.scribble(|i| match i {
            0 | 1 => u64::MAX,
            2 => u64::MAX - round,
            i if i < header + pins => {
                if i % 3 == 0 {
                    round.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                } else {
                    gens[i % 2]
                }
            }
            i => gens[i % 2],
        });
        scribble(&bell, round as u8);
        scribble(&mailbox, round as u8);
    }

    // 4. Its own segment: kept mapped writable while it asks to seal, so the seal is refused
    // and the object stays unsealed; the segment cannot be resized by any route.
    let (resp, mut fds) = raw.call(Request::Create {
        id: oid("hostile-own"),
        size: 200_000,
    });
    let d: ViewDesc = match resp {
        Response::View(d) => d,
        other => panic!("create: {other:?}"),
    };
    assert!(d.segment && fds.len() == 1);
    let seg_fd = fds.remove(0);
    assert!(!write_access(seg_fd.as_fd()).resizable());
    let mut w = SegmentWriter::open(dup(&seg_fd), d.len).unwrap();
    w.as_mut_slice().fill(0xee);
    match raw
        .call(Request::Seal {
            id: oid("hostile-own"),
        })
        .0
    {
        Response::Error(e) => assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}"),
        other => panic!("sealed while mapped writable: {other:?}"),
    }

    // 5. A victim's sealed segment, fetched over the socket: read-only by every route.
    let (resp, mut fds) = raw.call(Request::Get {
        ids: vec![oid(BIG)],
        timeout_ms: 0,
    });
    assert!(
        matches!(&resp, Response::Views(v) if v.len() == 1 && v[0].is_ok()),
        "{resp:?}"
    );
    assert_eq!(fds.len(), 1);
    let victim_fd = fds.remove(0);
    let a = write_access(victim_fd.as_fd());
    assert!(a.none(), "a sealed segment is writable: {a:?}");
    let victim = ReadMap::open_all(victim_fd).unwrap();
    assert!(store_faults(&victim, 10).unwrap());
    assert_eq!(victim.bytes(0, BIG_LEN as u64).unwrap(), &big_bytes()[..]);

    println!("hostile: every route refused");
    std::io::stdout().flush().unwrap();
    // Dies holding its forged pins, its unsealed segment mapped and the victim pinned.
    std::mem::forget(w);
    std::process::exit(0);
}

/// Honest work: puts of inline and segment sizes, reads back, reads the victims, deletes.
fn honest(sock: std::path::PathBuf, me: usize, stop: Arc<AtomicBool>, ops: Arc<AtomicU64>) {
    let c = shoal_sdk::blocking::Client::connect(sock).unwrap();
    let (small, big) = (small_bytes(), big_bytes());
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) || n < 20 {
        let len = if n.is_multiple_of(2) { 2_000 } else { 150_000 };
        let data: Vec<u8> = (0..len).map(|i| (i as u64 ^ n ^ me as u64) as u8).collect();
        let id = format!("honest-{me}-{n}");
        c.put(&id, &data).unwrap();
        assert_eq!(&c.get(&id, Duration::ZERO).unwrap()[..], &data[..], "{id}");
        assert_eq!(&c.get(SMALL, Duration::ZERO).unwrap()[..], &small[..]);
        assert_eq!(&c.get(BIG, Duration::ZERO).unwrap()[..], &big[..]);
        c.delete(&id).unwrap();
        n += 1;
        ops.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_client_hurts_only_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(dir.path());
    cfg.shm_size = 64 << 20;
    let w = Dataworker::start(cfg, None).await.unwrap();
    let sock = w.socket_path().to_path_buf();
    let owner = shoal_sdk::Client::connect(&sock).await.unwrap();
    owner.put(SMALL, &small_bytes()).await.unwrap();
    owner.put(BIG, &big_bytes()).await.unwrap();
    let base = w.status();

    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let honest: Vec<_> = (0..2)
        .map(|me| {
            let (sock, stop, ops) = (sock.clone(), stop.clone(), ops.clone());
            std::thread::spawn(move || honest(sock, me, stop, ops))
        })
        .collect();

    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "hostile_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HOSTILE_ENV, &sock)
        .output();
    let child = tokio::task::spawn_blocking(move || child)
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&child.stdout);
    assert!(
        child.status.success() && out.contains("hostile: every route refused"),
        "the hostile client found a hole or failed: {}\n{out}\n{}",
        child.status,
        String::from_utf8_lossy(&child.stderr)
    );

    stop.store(true, Ordering::Relaxed);
    for h in honest {
        h.join()
            .expect("an honest client saw wrong bytes or an error");
    }
    assert!(ops.load(Ordering::Relaxed) >= 40);
    // The worker is up and serves the victims' bytes to a new client.
    let fresh = shoal_sdk::Client::connect(&sock).await.unwrap();
    assert_eq!(
        &fresh.get(BIG, Duration::ZERO).await.unwrap()[..],
        &big_bytes()[..]
    );
    assert_eq!(
        &fresh.get(SMALL, Duration::ZERO).await.unwrap()[..],
        &small_bytes()[..]
    );
    drop(fresh);
    // Everything the hostile client held (pins, its unsealed segment) is gone with it.
    let t = Instant::now();
    shoal_devcluster::wait::wait_for_async(
        "arena use back at its baseline",
        Duration::from_secs(5),
        || async {
            let s = w.status();
            (s.used_bytes == base.used_bytes
                && s.pins == base.pins
                && s.unsealed == 0
                && s.zombies == 0)
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?} vs {:?}", w.status(), base));
    assert!(t.elapsed() < Duration::from_secs(5));
    drop(owner);
    w.shutdown().await;
}
