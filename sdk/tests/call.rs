//! Function calls end to end: a real proxy (each test on both engines) on a Unix socket in a
//! temp dir, real `CallClient`s and function instances.
#![allow(clippy::unwrap_used)] // test helpers panic on setup failure by design
use shoal_proxy::{EngineKind, Proxy, ProxyConfig};
use shoal_sdk::{CallClient, ErrorCode, FunctionInstance};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;

const SEC: Duration = Duration::from_secs(1);

struct Node {
    proxy: Proxy,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(engine: EngineKind, tweak: impl FnOnce(&mut ProxyConfig)) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = ProxyConfig::new("n1", dir.path().join("proxy.sock"));
        cfg.engine = engine;
        tweak(&mut cfg);
        let proxy = Proxy::start(cfg).unwrap();
        assert_eq!(proxy.engine(), engine);
        Node { proxy, _dir: dir }
    }

    async fn client(&self) -> CallClient {
        CallClient::connect(self.proxy.socket_path()).await.unwrap()
    }

    /// A client whose calls all go through the proxy (no call lanes): for what only the
    /// proxy does (its queue, its shutdown).
    async fn proxy_client(&self) -> CallClient {
        let opts = shoal_sdk::CallOptions {
            lanes: false,
            ..Default::default()
        };
        CallClient::connect_with(self.proxy.socket_path(), opts)
            .await
            .unwrap()
    }

    /// Registers an instance and serves it with `handler` in a task.
    async fn instance<F, Fut>(
        &self,
        function: &str,
        id: &str,
        concurrency: u32,
        handler: F,
    ) -> JoinHandle<Result<(), shoal_sdk::Error>>
    where
        F: Fn(Vec<u8>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Vec<u8>, String>> + Send + 'static,
    {
        let inst = FunctionInstance::register(self.proxy.socket_path(), function, id, concurrency)
            .await
            .unwrap();
        tokio::spawn(inst.run(handler))
    }

    async fn echo(&self, function: &str, id: &str) -> JoinHandle<Result<(), shoal_sdk::Error>> {
        self.instance(function, id, 4, |a| async move { Ok(a) })
            .await
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, shoal_sdk::Error>) -> ErrorCode {
    r.unwrap_err().code()
}

macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {
        mod tokio_engine {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(shoal_proxy::EngineKind::Tokio).await })*
        }
        mod uring_engine {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(shoal_proxy::EngineKind::Uring).await })*
        }
    };
}

both_engines!(
    echo_round_trip,
    many_concurrent_calls_respect_concurrency,
    unknown_function_is_not_found,
    full_queue_is_overloaded,
    silent_instance_times_out,
    instance_disconnect_fails_call,
    garbage_closes_only_that_connection,
    shutdown_fails_in_flight_calls,
);

async fn echo_round_trip(engine: EngineKind) {
    let node = Node::start(engine, |_| {});
    let inst = node.echo("echo", "e1").await;
    let c = node.client().await;
    assert_eq!(c.node_id(), "n1");
    assert_eq!(c.invoke("echo", b"hello", SEC).await.unwrap(), b"hello");
    assert_eq!(
        c.invoke_instance("echo", "e1", b"", SEC).await.unwrap(),
        b""
    );
    // Over the inline limit: TooLarge, and the connection still works.
    let big = vec![7u8; 64 * 1024 + 1];
    assert_eq!(code(c.invoke("echo", &big, SEC).await), ErrorCode::TooLarge);
    let max = vec![7u8; 64 * 1024];
    assert_eq!(c.invoke("echo", &max, SEC).await.unwrap(), max);
    node.proxy.shutdown().await;
    // The instance sees the proxy close and returns cleanly.
    inst.await.unwrap().unwrap();
}

async fn many_concurrent_calls_respect_concurrency(engine: EngineKind) {
    let node = Node::start(engine, |_| {});
    let mut peaks = Vec::new();
    let mut handles = Vec::new();
    for name in ["a", "b"] {
        let now = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        peaks.push((peak.clone(), calls.clone()));
        handles.push(
            node.instance("work", name, 4, move |a| {
                let (now, peak, calls) = (now.clone(), peak.clone(), calls.clone());
                async move {
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(n, Ordering::SeqCst);
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    Ok(a)
                }
            })
            .await,
        );
    }
    let c = node.client().await;
    let mut calls = Vec::new();
    for i in 0..200u32 {
        let c = c.clone();
        calls.push(tokio::spawn(async move {
            let arg = i.to_le_bytes();
            let out = c.invoke("work", &arg, 10 * SEC).await.unwrap();
            assert_eq!(out, arg);
        }));
    }
    for t in calls {
        t.await.unwrap();
    }
    let mut total = 0;
    for (peak, n) in &peaks {
        let p = peak.load(Ordering::SeqCst);
        assert!((1..=4).contains(&p), "peak {p} in flight on one instance");
        total += n.load(Ordering::SeqCst);
        assert!(n.load(Ordering::SeqCst) > 0, "both instances get calls");
    }
    assert_eq!(total, 200);
    node.proxy.shutdown().await;
    for h in handles {
        h.await.unwrap().unwrap();
    }
}

async fn unknown_function_is_not_found(engine: EngineKind) {
    let node = Node::start(engine, |_| {});
    let _e = node.echo("echo", "e1").await;
    let c = node.client().await;
    assert_eq!(code(c.invoke("nope", b"x", SEC).await), ErrorCode::NotFound);
    assert_eq!(
        code(c.invoke_instance("echo", "e9", b"x", SEC).await),
        ErrorCode::NotFound
    );
    // A second instance with the same id is refused.
    let dup = FunctionInstance::register(node.proxy.socket_path(), "echo", "e1", 1).await;
    assert_eq!(code(dup), ErrorCode::AlreadyExists);
    node.proxy.shutdown().await;
}

async fn full_queue_is_overloaded(engine: EngineKind) {
    let node = Node::start(engine, |c| c.max_queue = 2);
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let _i = node
        .instance("slow", "s1", 1, move |a| {
            let g = g.clone();
            async move {
                g.acquire().await.unwrap().forget();
                Ok(a)
            }
        })
        .await;
    let c = node.proxy_client().await;
    // Ten calls at once on a function with one slot and a queue of two: whatever the order,
    // exactly seven are refused at once and three complete once the handler is released.
    let (tx, mut rx) = tokio::sync::mpsc::channel(10);
    for i in 0..10u8 {
        let (c, tx) = (c.clone(), tx.clone());
        tokio::spawn(async move {
            let r = c.invoke("slow", &[i], 5 * SEC).await;
            tx.send((i, r)).await.unwrap();
        });
    }
    for _ in 0..7 {
        let (_, r) = rx.recv().await.unwrap();
        assert_eq!(code(r), ErrorCode::Overloaded);
    }
    gate.add_permits(3);
    for _ in 0..3 {
        let (i, r) = rx.recv().await.unwrap();
        assert_eq!(r.unwrap(), [i]);
    }
    node.proxy.shutdown().await;
}

async fn silent_instance_times_out(engine: EngineKind) {
    let node = Node::start(engine, |_| {});
    let _stuck = node
        .instance("f", "stuck", 1, |_| std::future::pending())
        .await;
    let _ok = node.echo("f", "ok").await;
    let c = node.client().await;
    let t = Instant::now();
    let r = c
        .invoke_instance("f", "stuck", b"x", Duration::from_millis(200))
        .await;
    let took = t.elapsed();
    assert_eq!(code(r), ErrorCode::Timeout);
    assert!(
        took >= Duration::from_millis(190),
        "timed out early: {took:?}"
    );
    assert!(
        took < Duration::from_millis(900),
        "timed out late: {took:?}"
    );
    assert_eq!(
        c.invoke_instance("f", "ok", b"next", SEC).await.unwrap(),
        b"next"
    );
    // The stuck instance's slot was freed: a queued call is dispatched (and times out too).
    let r = c
        .invoke_instance("f", "stuck", b"y", Duration::from_millis(100))
        .await;
    assert_eq!(code(r), ErrorCode::Timeout);
    node.proxy.shutdown().await;
}

async fn instance_disconnect_fails_call(engine: EngineKind) {
    let node = Node::start(engine, |_| {});
    let started = Arc::new(Notify::new());
    let s = started.clone();
    let doomed = node
        .instance("f", "doomed", 1, move |_| {
            s.notify_one();
            std::future::pending()
        })
        .await;
    let c = node.client().await;
    let call = {
        let c = c.clone();
        tokio::spawn(async move { c.invoke("f", b"x", 5 * SEC).await })
    };
    started.notified().await;
    doomed.abort(); // drops the instance's connection mid-call
    assert_eq!(code(call.await.unwrap()), ErrorCode::InstanceFailed);
    // No instance left: NotFound; a new instance serves the next call.
    assert_eq!(code(c.invoke("f", b"x", SEC).await), ErrorCode::NotFound);
    let _new = node.echo("f", "fresh").await;
    assert_eq!(c.invoke("f", b"again", SEC).await.unwrap(), b"again");
    node.proxy.shutdown().await;
}

async fn garbage_closes_only_that_connection(engine: EngineKind) {
    let node = Node::start(engine, |_| {});
    let _e = node.echo("echo", "e1").await;
    let c = node.client().await;
    assert_eq!(c.invoke("echo", b"1", SEC).await.unwrap(), b"1");
    let path = node.proxy.socket_path().to_owned();
    let cases: [&[u8]; 3] = [
        b"\xff\xff\xff\x7f\x01garbage",      // oversized length
        b"\x03\x00\x00\x00\x01\xff\xff\xff", // malformed body
        b"\x02\x00\x00\x00\x09ab",           // wrong version
    ];
    for bytes in cases {
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
            s.set_read_timeout(Some(2 * SEC)).unwrap();
            s.write_all(bytes).unwrap();
            let mut rest = Vec::new();
            // The proxy closes the connection: read ends with EOF, not the timeout.
            s.read_to_end(&mut rest).unwrap();
        })
        .await
        .unwrap();
    }
    // A valid frame that is not Hello: refused, then closed.
    let path2 = path.clone();
    tokio::task::spawn_blocking(move || {
        let mut s = std::os::unix::net::UnixStream::connect(&path2).unwrap();
        s.set_read_timeout(Some(2 * SEC)).unwrap();
        let mut out = Vec::new();
        shoal_protocol_frame(&mut out);
        s.write_all(&out).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(!rest.is_empty(), "a Refused frame comes first");
    })
    .await
    .unwrap();
    assert_eq!(c.invoke("echo", b"2", SEC).await.unwrap(), b"2");
    let c2 = node.client().await;
    assert_eq!(c2.invoke("echo", b"3", SEC).await.unwrap(), b"3");
    node.proxy.shutdown().await;
}

/// A well-formed `Result` frame (wrong as a first frame).
fn shoal_protocol_frame(out: &mut Vec<u8>) {
    let f = shoal_protocol::CallerFrame::Result {
        id: 1,
        result: Ok(shoal_protocol::Payload::Inline(vec![])),
    };
    shoal_protocol::encode_frame(&f, out).unwrap();
}

async fn shutdown_fails_in_flight_calls(engine: EngineKind) {
    let node = Node::start(engine, |_| {});
    let started = Arc::new(Notify::new());
    let s = started.clone();
    let _i = node
        .instance("f", "i", 1, move |_| {
            s.notify_one();
            std::future::pending()
        })
        .await;
    let c = node.proxy_client().await;
    let running = {
        let c = c.clone();
        tokio::spawn(async move { c.invoke("f", b"x", 5 * SEC).await })
    };
    started.notified().await;
    let queued = {
        let c = c.clone();
        tokio::spawn(async move { c.invoke("f", b"y", 5 * SEC).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = Instant::now();
    node.proxy.shutdown().await;
    assert!(t.elapsed() < 2 * SEC);
    assert_eq!(code(running.await.unwrap()), ErrorCode::Unavailable);
    assert_eq!(code(queued.await.unwrap()), ErrorCode::Unavailable);
    assert_eq!(code(c.invoke("f", b"z", SEC).await), ErrorCode::Unavailable);
}

#[tokio::test]
async fn auto_picks_an_engine() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(ProxyConfig::new("n1", dir.path().join("p.sock"))).unwrap();
    assert_ne!(proxy.engine(), EngineKind::Auto);
    let _i = FunctionInstance::register(proxy.socket_path(), "f", "i", 1)
        .await
        .unwrap();
    proxy.shutdown().await;
}

/// Payloads above the inline limit travel as objects and none is left behind: the caller
/// deletes its argument and the result after reading it, and an instance that finishes past
/// the deadline stores nothing (nobody would read it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payloads_travel_as_objects_and_none_is_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut wcfg = shoal_dataworker::Config::new(dir.path().join("dw"));
    wcfg.shm_size = 64 << 20;
    let worker = shoal_dataworker::Dataworker::start(wcfg, None)
        .await
        .unwrap();
    let store = shoal_sdk::Client::connect(worker.socket_path())
        .await
        .unwrap();
    let node = Node::start(EngineKind::Tokio, |_| {});
    let inst = FunctionInstance::register(node.proxy.socket_path(), "echo", "e1", 4)
        .await
        .unwrap()
        .with_store(store.clone());
    tokio::spawn(inst.run(|a: Vec<u8>| async move {
        if a.first() == Some(&b's') {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Ok(a)
    }));
    let c = CallClient::connect_with_store(node.proxy.socket_path(), store.clone())
        .await
        .unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    assert!(c.invoke("echo", &big, SEC).await.unwrap() == big);
    assert_eq!(
        store.status().await.unwrap().objects,
        0,
        "payload objects left"
    );

    // Past the deadline: Timeout for the caller, and no result object stored afterwards.
    let mut slow = big.clone();
    slow[0] = b's';
    let r = c.invoke("echo", &slow, Duration::from_millis(100)).await;
    assert_eq!(code(r), ErrorCode::Timeout);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        store.status().await.unwrap().objects,
        0,
        "late result stored"
    );
    node.proxy.shutdown().await;
    drop((c, store));
    worker.shutdown().await;
}
