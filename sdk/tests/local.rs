//! End-to-end tests: a real dataworker on a Unix socket in a temp dir, real clients, real
//! child processes for the kill and uid cases.
#![allow(clippy::unwrap_used)] // test helpers panic on setup failure by design
mod support;

use shoal_dataworker::{Config, Dataworker};
use shoal_protocol::{
    encode_frame, ClientFrame, ErrorCode, FrameDecoder, ObjectId, Request, ServerFrame,
};
use shoal_sdk::{Client, SetOptions};
use std::io::{BufRead, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};
use support::wait_until;

const MIB: u64 = 1 << 20;
const CHILD_ENV: &str = "SHOAL_TEST_CHILD_SOCKET";

struct Node {
    worker: Option<Dataworker>,
    dir: tempfile::TempDir,
}

impl Node {
    async fn start(shm: u64, tweak: impl FnOnce(&mut Config)) -> Node {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut cfg = Config::new(dir.path().join("sock"));
        cfg.shm_size = shm;
        cfg.http_addr = Some("127.0.0.1:0".parse().unwrap());
        tweak(&mut cfg);
        let worker = Dataworker::start(cfg, None).await.unwrap();
        Node {
            worker: Some(worker),
            dir,
        }
    }

    fn w(&self) -> &Dataworker {
        self.worker.as_ref().unwrap()
    }

    async fn client(&self) -> Client {
        Client::connect(self.w().socket_path()).await.unwrap()
    }

    /// Waits (bounded) until `f` holds for the worker's status.
    async fn until(&self, what: &str, f: impl Fn(&shoal_protocol::StatusInfo) -> bool) {
        wait_until(what, Duration::from_secs(1), || async {
            f(&self.w().status())
        })
        .await;
    }

    async fn stop(mut self) {
        self.worker.take().unwrap().shutdown().await;
        assert!(
            !self.dir.path().join("sock/dataworker.sock").exists(),
            "socket removed on shutdown"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_small_and_large_byte_exact_zero_copy() {
    let n = Node::start(64 * MIB, |_| {}).await;
    let c = n.client().await;
    assert!(c.has_fast_path());
    c.put("small", b"hello").await.unwrap();
    let big: Vec<u8> = (0..(3 * MIB as usize))
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    c.put("big", &big).await.unwrap();
    let v = c.get("small", Duration::ZERO).await.unwrap();
    assert_eq!(&v[..], b"hello");
    assert!(
        v.is_fast(),
        "a sealed local object is served from the shared index"
    );
    let v2 = c.get("big", Duration::ZERO).await.unwrap();
    assert!(v2[..] == big[..]);
    // Another client sees the same bytes at the same place: no copy.
    let c2 = n.client().await;
    let w = c2.get("big", Duration::ZERO).await.unwrap();
    assert_eq!(w.len(), big.len());
    assert!(c.contains("big").await.unwrap());
    let names: Vec<String> = c
        .list("", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id.to_string())
        .collect();
    assert_eq!(names, ["big", "small"]);
    // Without the fast path the socket path gives the same answer.
    let slow = Client::connect_with(shoal_sdk::ConnectOptions {
        fast_path: false,
        ..shoal_sdk::ConnectOptions::new(n.w().socket_path())
    })
    .await
    .unwrap();
    let s = slow.get("small", Duration::ZERO).await.unwrap();
    assert!(!s.is_fast());
    assert_eq!(&s[..], b"hello");
    let st = c.status().await.unwrap();
    assert_eq!(st.objects, 2);
    assert!(st.pins >= 4, "{st:?}");
    drop((v, v2, w, s));
    n.until("pins released", |s| s.pins == 0).await;
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_waits_for_seal_and_times_out() {
    let n = Node::start(16 * MIB, |_| {}).await;
    let writer = n.client().await;
    let reader = n.client().await;
    let waiting = tokio::spawn({
        let reader = reader.clone();
        async move { reader.get("later", Duration::from_secs(5)).await }
    });
    let mut b = writer.create("later", 4).await.unwrap();
    b.as_mut_slice().copy_from_slice(b"done");
    // Proving that something does not happen: a get that wrongly answered an unsealed
    // object would have finished within this window.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!waiting.is_finished(), "get must wait while unsealed");
    b.seal().await.unwrap();
    let v = waiting.await.unwrap().unwrap();
    assert_eq!(&v[..], b"done");
    // Missing: NotFound at once with no timeout, Timeout after a short one.
    let e = reader.get("never", Duration::ZERO).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotFound);
    let t = Instant::now();
    let e = reader
        .get("never", Duration::from_millis(100))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Timeout);
    assert!(t.elapsed() >= Duration::from_millis(100));
    // get_many: per-id results.
    let r = reader
        .get_many(&["later", "never"], Duration::from_millis(10))
        .await
        .unwrap();
    assert!(r[0].is_ok());
    assert_eq!(r[1].as_ref().unwrap_err().code(), ErrorCode::Timeout);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ids_and_lifecycle_errors() {
    let n = Node::start(16 * MIB, |_| {}).await;
    let c = n.client().await;
    assert_eq!(
        c.put("", b"x").await.unwrap_err().code(),
        ErrorCode::InvalidId
    );
    assert_eq!(
        c.put(&"x".repeat(1025), b"x").await.unwrap_err().code(),
        ErrorCode::InvalidId
    );
    c.put(&"y".repeat(1024), b"max length id").await.unwrap();
    // Size 0 objects are valid.
    c.put("empty", b"").await.unwrap();
    assert_eq!(c.get("empty", Duration::ZERO).await.unwrap().len(), 0);
    // Objects are immutable: a second put is refused, so is a second seal.
    assert_eq!(
        c.put("empty", b"again").await.unwrap_err().code(),
        ErrorCode::AlreadyExists
    );
    let b = c.create("twice", 8).await.unwrap();
    b.seal().await.unwrap();
    let mut raw = RawConn::open(n.w().socket_path());
    let r = raw.call(Request::Seal {
        id: ObjectId::new("twice").unwrap(),
    });
    assert!(matches!(r, shoal_protocol::Response::Error(e) if e.code == ErrorCode::AlreadySealed));
    // Sealing someone else's buffer is refused (a buffer above the inline limit: smaller
    // ones live in the creating process until their seal).
    let other = c.create("mine", 100_000).await.unwrap();
    let r = raw.call(Request::Seal {
        id: ObjectId::new("mine").unwrap(),
    });
    assert!(matches!(r, shoal_protocol::Response::Error(e) if e.code == ErrorCode::NotSealed));
    drop(other);
    // A non-UTF-8 id inside a frame is a protocol violation: that connection is closed.
    let mut body = postcard::to_stdvec(&1u32).unwrap();
    body.extend(postcard::to_stdvec(&4u32).unwrap()); // Request::Get
    body.extend([1u8, 2, 0xff, 0xfe]); // one id of two bytes, invalid UTF-8
    body.extend(postcard::to_stdvec(&0u64).unwrap());
    raw.send_raw_body(&body);
    assert!(raw.closed(), "connection closed after a malformed frame");
    // Oversized create: StoreFull with figures, worker keeps serving.
    let e = c.create("huge", 1 << 40).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::StoreFull);
    assert_eq!(&c.get("empty", Duration::ZERO).await.unwrap()[..], b"");
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_of_pinned_object_waits_for_last_view() {
    let n = Node::start(16 * MIB, |_| {}).await;
    let c = n.client().await;
    let base = n.w().status().used_bytes;
    c.put("p", &vec![9u8; 100_000]).await.unwrap();
    let fast = c.get("p", Duration::ZERO).await.unwrap();
    let slow = c
        .get_many(&["p"], Duration::ZERO)
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    c.delete("p").await.unwrap();
    assert!(!c.contains("p").await.unwrap());
    assert_eq!(
        c.get("p", Duration::ZERO).await.unwrap_err().code(),
        ErrorCode::NotFound
    );
    // The bytes stay valid while viewed.
    assert!(fast.iter().all(|b| *b == 9) && slow.iter().all(|b| *b == 9));
    assert_eq!(n.w().status().zombies, 1);
    // The id can be reused at once.
    c.put("p", b"new").await.unwrap();
    drop(slow);
    drop(fast);
    n.until("zombie freed", |s| s.zombies == 0).await;
    c.delete("p").await.unwrap();
    n.until("usage back to base", |s| s.used_bytes == base)
        .await;
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_releases_pins_and_unsealed_buffers() {
    let n = Node::start(64 * MIB, |_| {}).await;
    let keeper = n.client().await;
    keeper.put("shared", &vec![1u8; 1 << 20]).await.unwrap();
    let base = n.w().status();
    // A raw client that pins, creates and then vanishes without releasing anything.
    let mut raw = RawConn::open(n.w().socket_path());
    let id = |s: &str| ObjectId::new(s).unwrap();
    assert!(matches!(
        raw.call(Request::Get {
            ids: vec![id("shared")],
            timeout_ms: 0
        }),
        shoal_protocol::Response::Views(_)
    ));
    assert!(matches!(
        raw.call(Request::Create {
            id: id("half-written"),
            size: 8 * MIB
        }),
        shoal_protocol::Response::View(_)
    ));
    assert!(matches!(
        raw.call(Request::KvCreate {
            key: id("kv-half"),
            size: MIB
        }),
        shoal_protocol::Response::View(_)
    ));
    keeper.delete("shared").await.unwrap();
    let during = n.w().status();
    assert!(during.used_bytes > base.used_bytes && during.zombies == 1 && during.pins == 1);
    drop(raw);
    n.until("everything of the client released", |s| {
        s.used_bytes == base.used_bytes - MIB - 64
            && s.clients == 1
            && s.pins == 0
            && s.unsealed == 0
            && s.zombies == 0
    })
    .await;
    n.stop().await;
}

/// Child process entry point for `sigkill_in_the_middle_of_a_write_leaks_nothing`: does nothing
/// unless started by that test with the socket in the environment.
#[test]
fn child_writer_process() {
    let Some(sock) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let c = shoal_sdk::blocking::Client::connect(sock).unwrap();
    let _pin = c.get("victim", Duration::ZERO).unwrap();
    let _slow = c.get_many(&["victim"], Duration::ZERO).unwrap();
    let mut b = c.create("being-written", 16 * MIB).unwrap();
    b.as_mut_slice()[..4 * MIB as usize].fill(0xab);
    println!("ready");
    std::io::stdout().flush().unwrap();
    // Parked mid-write until the test kills this process (it never waits this long).
    std::thread::sleep(Duration::from_secs(60));
}

fn spawn_child(sock: &std::path::Path, uid: Option<u32>) -> std::process::Child {
    try_spawn_child(sock, uid).unwrap()
}

fn try_spawn_child(
    sock: &std::path::Path,
    uid: Option<u32>,
) -> std::io::Result<std::process::Child> {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_writer_process",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, sock)
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    if let Some(u) = uid {
        std::os::unix::process::CommandExt::uid(&mut cmd, u);
    }
    cmd.spawn()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_the_middle_of_a_write_leaks_nothing() {
    let n = Node::start(64 * MIB, |_| {}).await;
    let c = n.client().await;
    c.put("victim", &vec![5u8; 200_000]).await.unwrap();
    let base = n.w().status();
    let mut child = spawn_child(n.w().socket_path(), None);
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let ready = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        while out.read_line(&mut line).unwrap() > 0 {
            if line.contains("ready") {
                return true;
            }
            line.clear();
        }
        false
    })
    .await
    .unwrap();
    assert!(ready, "child did not get ready");
    let during = n.w().status();
    assert!(
        during.used_bytes >= base.used_bytes + 16 * MIB && during.pins >= 2 && during.unsealed == 1
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();
    let killed_at = Instant::now();
    n.until("arena usage back to its earlier value", |s| {
        s.used_bytes == base.used_bytes && s.pins == base.pins && s.unsealed == 0 && s.clients == 1
    })
    .await;
    assert!(killed_at.elapsed() < Duration::from_secs(1));
    assert_eq!(
        &c.get("victim", Duration::ZERO).await.unwrap()[..10],
        &[5u8; 10]
    );
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uid_not_allowed_is_refused() {
    let n = Node::start(16 * MIB, |_| {}).await;
    if !nix::unistd::getuid().is_root() {
        // Only root can start a process under another uid; check the own-uid path instead.
        assert!(Client::connect(n.w().socket_path()).await.is_ok());
        return;
    }
    let exe = std::env::current_exe().unwrap();
    // The child must be able to read its own binary and reach the socket.
    let readable = std::fs::metadata(&exe).unwrap().permissions().mode() & 0o005 == 0o005;
    let mut child = match try_spawn_child(n.w().socket_path(), Some(65534)) {
        Ok(c) => c,
        // A directory on the binary's path is private (a checkout under a 0700 `mktemp -d`):
        // the other uid cannot even start, so nothing of it can reach the worker.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            assert_eq!(n.w().status().clients, 0);
            n.stop().await;
            return;
        }
        Err(e) => panic!("spawning the child: {e}"),
    };
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success());
    if readable {
        assert!(err.contains("PermissionDenied"), "child stderr: {err}");
    }
    assert_eq!(n.w().status().clients, 0);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_frames_close_only_that_connection() {
    let n = Node::start(16 * MIB, |_| {}).await;
    let good = n.client().await;
    good.put("k", b"v").await.unwrap();
    for junk in [
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0xff; 64],
        vec![0x00, 0x00, 0x00, 0x7f, 1, 0, 0], // 2 GiB frame announced
        vec![3, 0, 0, 0, 9, 1, 2, 3],          // wrong version
    ] {
        let mut raw = RawConn::open(n.w().socket_path());
        raw.stream.write_all(&junk).unwrap();
        assert!(raw.closed(), "connection closed after {junk:?}");
    }
    // Truncated frame then EOF: closed cleanly.
    let mut raw = RawConn::open(n.w().socket_path());
    raw.stream.write_all(&[200, 0, 0, 0, 1, 0]).unwrap();
    drop(raw);
    assert_eq!(&good.get("k", Duration::ZERO).await.unwrap()[..], b"v");
    good.put("k2", b"still fine").await.unwrap();
    n.until("raw clients gone", |s| s.clients == 1).await;
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_of_pinned_objects_is_store_full_and_keeps_serving() {
    let n = Node::start(8 * MIB, |_| {}).await;
    let c = n.client().await;
    let mut views = Vec::new();
    let mut i = 0;
    let err = loop {
        match c.put(&format!("o{i}"), &vec![i as u8; 512 << 10]).await {
            Ok(()) => views.push(c.get(&format!("o{i}"), Duration::ZERO).await.unwrap()),
            Err(e) => break e,
        }
        i += 1;
        assert!(i < 100, "never filled up");
    };
    assert_eq!(err.code(), ErrorCode::StoreFull);
    let msg = err.to_string();
    assert!(
        msg.contains("requested") && msg.contains("used") && msg.contains("pinned"),
        "{msg}"
    );
    for (j, v) in views.iter().enumerate() {
        assert_eq!(v[0], j as u8);
    }
    assert_eq!(c.get("o0", Duration::ZERO).await.unwrap()[100], 0);
    // Once views drop, the same put succeeds by evicting.
    views.clear();
    n.until("pins released", |s| s.pins == 0).await;
    c.put(&format!("o{i}"), &vec![1u8; 512 << 10])
        .await
        .unwrap();
    assert!(n.w().status().evictions > 0);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_spills_to_disk_and_restores_byte_exact() {
    let spill = tempfile::tempdir().unwrap();
    let sp = spill.path().to_owned();
    let n = Node::start(8 * MIB, move |c| c.spill_dir = Some(sp)).await;
    let c = n.client().await;
    let payload = |i: usize| -> Vec<u8> {
        (0..MIB as usize)
            .map(|j| ((i * 31 + j) % 256) as u8)
            .collect()
    };
    for i in 0..20 {
        c.put(&format!("s{i}"), &payload(i)).await.unwrap();
    }
    let st = n.w().status();
    assert!(st.spills > 0 && st.spilled_now > 0, "{st:?}");
    assert!(std::fs::read_dir(spill.path()).unwrap().count() > 0);
    for i in 0..20 {
        let v = c.get(&format!("s{i}"), Duration::ZERO).await.unwrap();
        assert!(v[..] == payload(i)[..], "object {i} restored byte-exact");
    }
    c.delete("s0").await.unwrap();
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_operations() {
    let n = Node::start(16 * MIB, |_| {}).await;
    let c = n.client().await;
    assert!(c.kv_set("a", b"1", SetOptions::default()).await.unwrap());
    assert!(!c
        .kv_set(
            "a",
            b"2",
            SetOptions {
                if_absent: true,
                ..Default::default()
            }
        )
        .await
        .unwrap());
    assert_eq!(&c.kv_get("a").await.unwrap().unwrap()[..], b"1");
    let old = c.kv_get("a").await.unwrap().unwrap();
    assert!(c.kv_set("a", b"22", SetOptions::default()).await.unwrap());
    assert_eq!(&old[..], b"1", "an old view keeps the old value");
    assert_eq!(&c.kv_get("a").await.unwrap().unwrap()[..], b"22");
    c.kv_mset(&[("b", b"bee"), ("c", b"sea")], None)
        .await
        .unwrap();
    let got = c.kv_mget(&["a", "b", "nope", "c"]).await.unwrap();
    let got: Vec<Option<Vec<u8>>> = got.into_iter().map(|v| v.map(|v| v.to_vec())).collect();
    assert_eq!(
        got,
        vec![
            Some(b"22".to_vec()),
            Some(b"bee".to_vec()),
            None,
            Some(b"sea".to_vec())
        ]
    );
    assert!(c.kv_exists("b").await.unwrap());
    assert_eq!(c.kv_del(&["b", "nope"]).await.unwrap(), 1);
    assert!(!c.kv_exists("b").await.unwrap());
    assert!(c.kv_get("b").await.unwrap().is_none());
    // Objects and KV are separate keyspaces.
    assert!(!c.contains("a").await.unwrap());
    // Offset reads.
    c.kv_set("long", b"0123456789", SetOptions::default())
        .await
        .unwrap();
    assert_eq!(&c.kv_read("long", 3, 4).await.unwrap()[..], b"3456");
    assert_eq!(&c.kv_read("long", 8, 100).await.unwrap()[..], b"89");
    assert_eq!(
        c.kv_read("long", 11, 1).await.unwrap_err().code(),
        ErrorCode::InvalidArgument
    );
    // Large values go through shared memory.
    let big = vec![3u8; 200_000];
    c.kv_set("big", &big, SetOptions::default()).await.unwrap();
    assert!(c.kv_get("big").await.unwrap().unwrap()[..] == big[..]);
    // TTL.
    assert_eq!(c.kv_ttl("long").await.unwrap(), Some(None));
    assert_eq!(c.kv_ttl("nope").await.unwrap(), None);
    assert!(c
        .kv_expire("long", Some(Duration::from_secs(100)))
        .await
        .unwrap());
    assert_eq!(
        c.kv_ttl("long").await.unwrap(),
        Some(Some(Duration::from_secs(100)))
    );
    assert!(c.kv_expire("long", None).await.unwrap());
    assert_eq!(c.kv_ttl("long").await.unwrap(), Some(None));
    c.kv_set(
        "brief",
        b"x",
        SetOptions {
            ttl: Some(Duration::from_secs(1)),
            if_absent: false,
        },
    )
    .await
    .unwrap();
    let set_at = Instant::now();
    assert!(c.kv_exists("brief").await.unwrap());
    wait_until("the key expires", Duration::from_secs(3), || async {
        !c.kv_exists("brief").await.unwrap()
    })
    .await;
    let lived = set_at.elapsed();
    assert!(
        lived >= Duration::from_millis(950) && lived < Duration::from_millis(1500),
        "expired after {lived:?}"
    );
    assert!(c.kv_get("brief").await.unwrap().is_none());
    let keys: Vec<String> = c
        .kv_keys("", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id.to_string())
        .collect();
    assert_eq!(keys, ["a", "big", "c", "long"]);
    drop(old);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(dir.path());
    cfg.shm_size = 8 * MIB;
    cfg.http_addr = Some("127.0.0.1:0".parse().unwrap());
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    // A local recorder would not reach the worker's tasks; install globally once per process.
    let _ = metrics::set_global_recorder(recorder);
    let w = Dataworker::start(cfg, Some(handle)).await.unwrap();
    let c = Client::connect(w.socket_path()).await.unwrap();
    c.put("m", b"x").await.unwrap();
    let addr = w.http_addr().unwrap();
    let get = |path: &'static str| {
        tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).unwrap();
            body
        })
    };
    let health = get("/health").await.unwrap();
    assert!(
        health.starts_with("HTTP/1.1 200") && health.contains("\"status\":\"ok\""),
        "{health}"
    );
    // The gauges appear after the worker's first timer turn.
    wait_until(
        "/metrics shows requests and the arena",
        Duration::from_secs(5),
        || async {
            let m = get("/metrics").await.unwrap();
            m.contains("shoal_requests_total") && m.contains("shoal_arena_used_bytes")
        },
    )
    .await;
    assert!(get("/nope").await.unwrap().starts_with("HTTP/1.1 404"));
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(dir.path());
    cfg.shm_size = 1 << 50;
    let e = Dataworker::start(cfg.clone(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--shm-size") || e.contains("shared memory"),
        "{e}"
    );
    cfg.shm_size = 8 * MIB;
    let w = Dataworker::start(cfg.clone(), None).await.unwrap();
    let e = Dataworker::start(cfg, None).await.unwrap_err().to_string();
    assert!(e.contains("already listening"), "{e}");
    w.shutdown().await;
}

/// Runs blocking-client code off the async test runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_client_goes_through_the_mailbox() {
    let n = Node::start(32 * MIB, |_| {}).await;
    let sock = n.w().socket_path().to_owned();
    blocking(move || {
        let c = shoal_sdk::blocking::Client::connect(&sock).unwrap();
        c.put("m1", b"mailbox").unwrap();
        let big = vec![7u8; 3 * MIB as usize];
        c.put("m2", &big).unwrap();
        assert_eq!(&c.get("m1", Duration::ZERO).unwrap()[..], b"mailbox");
        assert!(c.kv_set("k", b"v", SetOptions::default()).unwrap());
        assert_eq!(&c.kv_get("k").unwrap().unwrap()[..], b"v");
        assert_eq!(
            c.put("m1", b"again").unwrap_err().code(),
            ErrorCode::AlreadyExists
        );
        assert_eq!(
            c.get("none", Duration::ZERO).unwrap_err().code(),
            ErrorCode::NotFound
        );
        assert_eq!(
            c.get("none", Duration::from_millis(30)).unwrap_err().code(),
            ErrorCode::Timeout
        );
        assert!(c.status().unwrap().objects >= 2);
        assert!(c.mailbox_calls() >= 6, "requests went through the mailbox");
        // A list may be large: it stays on the socket and still works.
        assert_eq!(c.list("m", 10).unwrap().len(), 2);
        // Without the mailbox, the same calls use the socket.
        let s = shoal_sdk::blocking::Client::connect_with(shoal_sdk::ConnectOptions {
            mailbox: false,
            ..shoal_sdk::ConnectOptions::new(&sock)
        })
        .unwrap();
        s.put("m3", b"socket").unwrap();
        assert_eq!(s.mailbox_calls(), 0);
    })
    .await;
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_one_ways_stay_ordered_before_mailbox_requests() {
    let n = Node::start(32 * MIB, |_| {}).await;
    let sock = n.w().socket_path().to_owned();
    blocking(move || {
        let c = shoal_sdk::blocking::Client::connect(&sock).unwrap();
        for i in 0..200 {
            // Abort travels on the socket (one-way); the put right after goes through the
            // mailbox and must see the abort done.
            let mut b = c.create("again", 64).unwrap();
            b.as_mut_slice()[0] = i as u8;
            drop(b);
            c.put("again", &[i as u8; 64]).unwrap();
            // A socket-pinned view released on drop, then a delete through the mailbox:
            // the release comes first, so nothing is left as a zombie.
            let v = c
                .get_many(&["again"], Duration::ZERO)
                .unwrap()
                .remove(0)
                .unwrap();
            assert_eq!(v[0], i as u8);
            drop(v);
            c.delete("again").unwrap();
            assert_eq!(c.status().unwrap().zombies, 0, "round {i}");
        }
    })
    .await;
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailbox_client_gets_an_error_when_the_worker_stops() {
    let n = Node::start(16 * MIB, |_| {}).await;
    let sock = n.w().socket_path().to_owned();
    let c = blocking(move || shoal_sdk::blocking::Client::connect(&sock).unwrap()).await;
    n.stop().await;
    let r = blocking(move || c.put("late", b"x")).await;
    assert!(r.is_err(), "no hang, an error");
}

/// A value whose bytes all derive from its version: any byte from another value shows.
fn stamped(version: u64, len: usize) -> Vec<u8> {
    let mut v = vec![(version % 251) as u8; len];
    v[..8].copy_from_slice(&version.to_le_bytes());
    v
}

fn check_stamp(v: &[u8]) {
    let version = u64::from_le_bytes(v[..8].try_into().unwrap());
    let fill = (version % 251) as u8;
    assert!(
        v[8..].iter().all(|b| *b == fill),
        "view of version {version} changed under its pin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_never_see_memory_reused_under_a_pin() {
    // A small arena, constant overwrites and eviction: memory is reused as fast as it can be.
    let n = Node::start(4 * MIB, |_| {}).await;
    let sock = n.w().socket_path().to_owned();
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut threads = Vec::new();
    for w in 0..2u64 {
        let sock = sock.clone();
        threads.push(std::thread::spawn(move || {
            let c = shoal_sdk::blocking::Client::connect(&sock).unwrap();
            let mut version = w;
            while Instant::now() < deadline {
                version += 2;
                let key = format!("k{}", version % 16);
                c.kv_set(&key, &stamped(version, 16 << 10), SetOptions::default())
                    .unwrap();
                let id = format!("o{}", version % 32);
                let _ = c.delete(&id);
                match c.put(&id, &stamped(version, 100 << 10)) {
                    Ok(()) => {}
                    // Another writer re-created it first, or every byte is pinned right now.
                    Err(e)
                        if matches!(e.code(), ErrorCode::AlreadyExists | ErrorCode::StoreFull) => {}
                    Err(e) => panic!("put: {e}"),
                }
            }
        }));
    }
    for r in 0..3u64 {
        let sock = sock.clone();
        threads.push(std::thread::spawn(move || {
            let c = shoal_sdk::blocking::Client::connect_with(shoal_sdk::ConnectOptions {
                // One reader without the fast path, so socket pins are raced too.
                fast_path: r != 0,
                ..shoal_sdk::ConnectOptions::new(&sock)
            })
            .unwrap();
            let mut held = std::collections::VecDeque::new();
            let mut i = r;
            while Instant::now() < deadline {
                i += 1;
                if let Some(v) = c.kv_get(&format!("k{}", i % 16)).unwrap() {
                    check_stamp(&v);
                    held.push_back(v);
                }
                if let Ok(v) = c.get(&format!("o{}", i % 32), Duration::ZERO) {
                    check_stamp(&v);
                    held.push_back(v);
                }
                // Hold a few views while writers overwrite and evict, then check them again.
                while held.len() > 6 {
                    let v = held.pop_front().unwrap();
                    check_stamp(&v);
                }
            }
            held.iter().for_each(|v| check_stamp(v));
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    n.until("all pins and zombies gone", |s| {
        s.pins == 0 && s.zombies == 0 && s.clients == 0
    })
    .await;
    n.stop().await;
}

/// A client speaking raw frames, for protocol-violation tests.
struct RawConn {
    stream: std::os::unix::net::UnixStream,
    buf: bytes::BytesMut,
}

impl RawConn {
    fn open(path: &std::path::Path) -> RawConn {
        let stream = std::os::unix::net::UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut r = RawConn {
            stream,
            buf: bytes::BytesMut::new(),
        };
        // The client speaks first: a hello without a token (known by its uid).
        let mut hello = Vec::new();
        encode_frame(&shoal_protocol::ClientHello::default(), &mut hello).unwrap();
        r.stream.write_all(&hello).unwrap();
        assert!(matches!(r.next(), Some(ServerFrame::Hello(_))));
        r
    }

    fn next(&mut self) -> Option<ServerFrame> {
        let dec = FrameDecoder::new(1 << 20);
        loop {
            if let Some(f) = dec.decode::<ServerFrame>(&mut self.buf).unwrap() {
                return Some(f);
            }
            let mut tmp = [0u8; 4096];
            let n = self.stream.read(&mut tmp).ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }

    fn call(&mut self, req: Request) -> shoal_protocol::Response {
        let mut out = Vec::new();
        encode_frame(&ClientFrame { id: 9, req }, &mut out).unwrap();
        self.stream.write_all(&out).unwrap();
        match self.next() {
            Some(ServerFrame::Reply { resp, .. }) => resp,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn send_raw_body(&mut self, body: &[u8]) {
        let mut out = (body.len() as u32).to_le_bytes().to_vec();
        out.push(shoal_protocol::PROTOCOL_VERSION);
        out.extend_from_slice(body);
        self.stream.write_all(&out).unwrap();
    }

    /// True when the worker closed the connection (EOF or reset).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        matches!(self.stream.read(&mut b), Ok(0) | Err(_))
    }
}
