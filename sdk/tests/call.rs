//! Function calls end to end: a real proxy (each test on both engines) on a Unix socket in a
//! temp dir, real `CallClient`s and function instances.
#![allow(clippy::unwrap_used)] // test helpers panic on setup failure by design
mod support;

use shoal_meta::records::{InstanceBinding, DEFAULT_TENANT};
use shoal_meta::MetaStore;
use shoal_protocol::Role;
use shoal_proxy::{EngineKind, Proxy, ProxyConfig};
use shoal_sdk::{CallClient, ErrorCode, FunctionInstance};
use std::future::Future;
use std::io::{Read, Write};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{raw, wait_for, wait_until};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;

const SEC: Duration = Duration::from_secs(1);

struct Node {
    proxy: Proxy,
    /// The store the proxy checks tokens against (and follows quotas on).
    meta: Arc<dyn MetaStore>,
    _dir: tempfile::TempDir,
}

/// An in-memory metadata store for a proxy.
fn store() -> Arc<dyn MetaStore> {
    Arc::new(shoal_meta::MemStore::open(None, "").unwrap())
}

/// The credential of instance `instance` of `function` in `tenant`, issued on `meta` as the
/// node's agent would.
async fn token_in(
    meta: &Arc<dyn MetaStore>,
    tenant: &str,
    function: &str,
    instance: &str,
) -> String {
    let binding = InstanceBinding {
        function: function.into(),
        instance: instance.into(),
    };
    shoal_meta::issue_instance_token(meta.as_ref(), tenant, binding)
        .await
        .unwrap()
        .token
}

impl Node {
    fn start(engine: EngineKind, tweak: impl FnOnce(&mut ProxyConfig)) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let meta = store();
        let mut cfg = ProxyConfig::new("n1", dir.path().join("proxy.sock"));
        cfg.engine = engine;
        cfg.meta = Some(meta.clone());
        tweak(&mut cfg);
        let proxy = Proxy::start(cfg).unwrap();
        assert_eq!(proxy.engine(), engine);
        Node {
            proxy,
            meta,
            _dir: dir,
        }
    }

    /// The credential of instance `id` of `function` (tenant `default`).
    async fn token(&self, function: &str, id: &str) -> String {
        token_in(&self.meta, DEFAULT_TENANT, function, id).await
    }

    /// Registers instance `id` of `function` with its own credential.
    async fn register(
        &self,
        function: &str,
        id: &str,
        concurrency: u32,
    ) -> Result<FunctionInstance, shoal_sdk::Error> {
        let token = self.token(function, id).await;
        FunctionInstance::register(
            self.proxy.socket_path(),
            function,
            id,
            concurrency,
            Some(&token),
        )
        .await
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
        let inst = self.register(function, id, concurrency).await.unwrap();
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

/// Polls `call` once and returns it, to be awaited or spawned later. A call through the
/// proxy hands its frame to the connection on its first turn, so the frame goes out ahead
/// of any sent after this returns; the proxy handles one connection's frames in order, so
/// once it has answered a later call on the same connection, it has taken this one.
async fn sent<F: Future>(call: F) -> Pin<Box<F>> {
    let mut call = Box::pin(call);
    std::future::poll_fn(|cx| {
        assert!(
            call.as_mut().poll(cx).is_pending(),
            "the call ended on its first turn"
        );
        std::task::Poll::Ready(())
    })
    .await;
    call
}

/// Returns once the proxy has handled every frame sent on `c`'s connection so far (see
/// [`sent`]): it answers a call to a function nobody serves at once.
async fn proxy_caught_up(c: &CallClient) {
    assert_eq!(
        code(c.invoke("no-such-function", b"", SEC).await),
        ErrorCode::NotFound
    );
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
                    // Stands for work (not a wait on anything): the unit is held a while,
                    // so calls overlap and spread over both instances.
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
    let dup = node.register("echo", "e1", 1).await;
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
    // Through the proxy only: it fails the call and forgets the instance in one step, so the
    // next call finds none. (A lane call can fail before the proxy has seen the instance go;
    // `an_instance_lost_mid_lane_call` covers that.)
    let c = node.proxy_client().await;
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
    // The only unit is taken: the second call waits in the proxy's queue.
    let queued = sent(c.invoke("f", b"y", 5 * SEC)).await;
    proxy_caught_up(&c).await;
    let t = Instant::now();
    node.proxy.shutdown().await;
    assert!(t.elapsed() < 2 * SEC);
    assert_eq!(code(running.await.unwrap()), ErrorCode::Unavailable);
    assert_eq!(code(queued.await), ErrorCode::Unavailable);
    assert_eq!(code(c.invoke("f", b"z", SEC).await), ErrorCode::Unavailable);
}

#[tokio::test]
async fn auto_picks_an_engine() {
    let dir = tempfile::tempdir().unwrap();
    let meta = store();
    let mut cfg = ProxyConfig::new("n1", dir.path().join("p.sock"));
    cfg.meta = Some(meta.clone());
    let proxy = Proxy::start(cfg).unwrap();
    assert_ne!(proxy.engine(), EngineKind::Auto);
    let token = token_in(&meta, DEFAULT_TENANT, "f", "i").await;
    let _i = FunctionInstance::register(proxy.socket_path(), "f", "i", 1, Some(&token))
        .await
        .unwrap();
    proxy.shutdown().await;
}

/// Payloads above the inline limit travel as objects and none is left behind: the caller
/// deletes its argument, the instance its result once the caller has read it, and an
/// instance that finishes past the deadline stores nothing (nobody would read it).
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
    let inst = node
        .register("echo", "e1", 4)
        .await
        .unwrap()
        .with_store(store.clone());
    // A call starting with `s` is slow: its handler returns once the test opens the gate,
    // and says so just before.
    let gate = Arc::new(Semaphore::new(0));
    let returning = Arc::new(Notify::new());
    let (g, ret) = (gate.clone(), returning.clone());
    tokio::spawn(inst.run(move |a: Vec<u8>| {
        let (g, ret) = (g.clone(), ret.clone());
        async move {
            if a.first() == Some(&b's') {
                g.acquire().await.unwrap().forget();
                ret.notify_one();
            }
            Ok(a)
        }
    }));
    let c = CallClient::connect_with_store(node.proxy.socket_path(), store.clone())
        .await
        .unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    assert!(c.invoke("echo", &big, SEC).await.unwrap() == big);
    // The result is deleted by the instance once the caller released it: soon after.
    wait_until("no payload object left", 5 * SEC, || async {
        store.status().await.unwrap().objects == 0
    })
    .await;
    // The same through the proxy.
    let via_proxy = CallClient::connect_with(
        node.proxy.socket_path(),
        shoal_sdk::CallOptions {
            lanes: false,
            store: Some(store.clone()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(via_proxy.invoke("echo", &big, SEC).await.unwrap() == big);
    wait_until("no payload object left (proxy)", 5 * SEC, || async {
        store.status().await.unwrap().objects == 0
    })
    .await;

    // Past the deadline: Timeout for the caller, and no result object stored afterwards.
    let mut slow = big.clone();
    slow[0] = b's';
    let r = c.invoke("echo", &slow, Duration::from_millis(100)).await;
    assert_eq!(code(r), ErrorCode::Timeout);
    gate.add_permits(1);
    returning.notified().await;
    // Proving that something does not happen: nothing marks the moment the instance decides
    // not to store the late result, so give a result object the time to show.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        store.status().await.unwrap().objects,
        0,
        "late result stored"
    );
    node.proxy.shutdown().await;
    drop((c, store));
    worker.shutdown().await;
}

// ----- call lanes: callers and instances on one node, over shared memory -----

/// Calls `function` until a call takes a lane (an instance announces its lane a moment
/// after it registers); the lane calls made so far.
async fn lane_ready(c: &CallClient, function: &str) -> u64 {
    let before = c.lane_calls();
    wait_for("a call takes a lane", 10 * SEC, || async {
        c.invoke(function, b"warm", SEC).await.unwrap();
        let now = c.lane_calls();
        (now > before).then_some(now)
    })
    .await
}

/// How many handlers run at once, the most seen, and how many have finished.
#[derive(Default)]
struct Gauge {
    now: AtomicUsize,
    peak: AtomicUsize,
    done: AtomicUsize,
}

impl Gauge {
    fn enter(&self) {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(n, Ordering::SeqCst);
    }
    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
        self.done.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_carry_calls_to_local_instances() {
    let node = Node::start(EngineKind::Tokio, |_| {});
    let _e = node.echo("echo", "e1").await;
    let c = node.client().await;
    let warm = lane_ready(&c, "echo").await;
    for i in 0..50u32 {
        let arg = i.to_le_bytes();
        assert_eq!(c.invoke("echo", &arg, SEC).await.unwrap(), arg);
    }
    assert_eq!(c.lane_calls(), warm + 50, "every call took the lane");
    assert_eq!(
        c.invoke_instance("echo", "e1", b"named", SEC)
            .await
            .unwrap(),
        b"named"
    );
    let max = vec![9u8; 64 * 1024];
    assert_eq!(c.invoke("echo", &max, SEC).await.unwrap(), max);
    assert_eq!(c.lane_calls(), warm + 52);
    // What no lane serves still goes through the proxy, with the proxy's answers.
    assert_eq!(code(c.invoke("nope", b"x", SEC).await), ErrorCode::NotFound);
    assert_eq!(
        code(c.invoke_instance("echo", "e9", b"x", SEC).await),
        ErrorCode::NotFound
    );
    let big = vec![7u8; 64 * 1024 + 1];
    assert_eq!(code(c.invoke("echo", &big, SEC).await), ErrorCode::TooLarge);
    // An instance that offers no lane is served through the proxy.
    let plain = node
        .register("plain", "p1", 1)
        .await
        .unwrap()
        .without_lanes();
    tokio::spawn(plain.run(|a| async move { Ok(a) }));
    assert_eq!(c.invoke("plain", b"p", SEC).await.unwrap(), b"p");
    assert_eq!(c.lane_calls(), warm + 52);
    node.proxy.shutdown().await;
}

/// An instance runs at most its concurrency of calls at once, counting calls from the proxy
/// and from lanes together: with both units taken by lane calls, calls the proxy sends (it
/// does not see lane calls) wait in the instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_concurrency_count_across_lanes_and_the_proxy() {
    let node = Node::start(EngineKind::Tokio, |_| {});
    let gauge = Arc::new(Gauge::default());
    let gate = Arc::new(Semaphore::new(0));
    let (g, gt) = (gauge.clone(), gate.clone());
    let _i = node
        .instance("work", "w1", 2, move |a| {
            let (g, gt) = (g.clone(), gt.clone());
            async move {
                if a != b"warm" {
                    g.enter();
                    gt.acquire().await.unwrap().forget();
                    g.leave();
                }
                Ok(a)
            }
        })
        .await;
    let (lane_client, proxy_client) = (node.client().await, node.proxy_client().await);
    let warm = lane_ready(&lane_client, "work").await;
    let call = |c: &CallClient, i: u8| {
        let c = c.clone();
        tokio::spawn(async move {
            assert_eq!(c.invoke("work", &[i], 20 * SEC).await.unwrap(), [i]);
        })
    };
    let mut calls = vec![call(&lane_client, 0), call(&lane_client, 1)];
    wait_until("the lane calls start", 5 * SEC, || async {
        gauge.now.load(Ordering::SeqCst) >= 2
    })
    .await;
    // The proxy's calls: it sends two to the instance (as far as it knows both units are
    // free), which keeps them waiting, and queues the others. Once the proxy has answered a
    // later frame, it has sent them (when the instance reads them is its own business).
    for i in 2..6 {
        let c = proxy_client.clone();
        let one = sent(async move {
            assert_eq!(c.invoke("work", &[i], 20 * SEC).await.unwrap(), [i]);
        })
        .await;
        calls.push(tokio::spawn(one));
    }
    proxy_caught_up(&proxy_client).await;
    // Release one handler at a time: each release lets one call finish and one waiting call
    // start.
    for k in 1..=6 {
        assert!(gauge.now.load(Ordering::SeqCst) <= 2);
        gate.add_permits(1);
        wait_until(&format!("call {k} finishes"), 5 * SEC, || async {
            gauge.done.load(Ordering::SeqCst) >= k
        })
        .await;
    }
    for t in calls {
        t.await.unwrap();
    }
    assert_eq!(
        gauge.peak.load(Ordering::SeqCst),
        2,
        "more than two ran at once"
    );
    assert_eq!(lane_client.lane_calls(), warm + 2);
    assert_eq!(proxy_client.lane_calls(), 0);
    node.proxy.shutdown().await;
}

/// A lane call past its deadline times out at the deadline, and its concurrency unit is free
/// for the next call while the stuck handler goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_instance_times_out_on_its_lane() {
    let node = Node::start(EngineKind::Tokio, |_| {});
    let _i = node
        .instance("f", "i1", 1, |a: Vec<u8>| async move {
            if a == b"hang" {
                std::future::pending::<()>().await;
            }
            Ok(a)
        })
        .await;
    let c = node.client().await;
    let warm = lane_ready(&c, "f").await;
    let t = Instant::now();
    let r = c.invoke("f", b"hang", Duration::from_millis(200)).await;
    let took = t.elapsed();
    assert_eq!(code(r), ErrorCode::Timeout);
    assert!(took >= Duration::from_millis(190), "early: {took:?}");
    assert!(took < Duration::from_millis(900), "late: {took:?}");
    // The stuck handler gave its unit back at the deadline (racing this caller's own timer:
    // `next` may go through the proxy); with that unit free, calls take the lane again.
    assert_eq!(c.invoke("f", b"next", SEC).await.unwrap(), b"next");
    let before = c.lane_calls();
    assert_eq!(c.invoke("f", b"after", SEC).await.unwrap(), b"after");
    assert_eq!(c.lane_calls(), before + 1);
    assert!(before > warm, "the timed-out call took the lane");
    node.proxy.shutdown().await;
}

/// An instance that goes away mid-call: that call fails with `InstanceFailed`; calls it never
/// started go through the proxy; a new instance serves later calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_lost_mid_lane_call() {
    let node = Node::start(EngineKind::Tokio, |_| {});
    let started = Arc::new(Notify::new());
    let s = started.clone();
    let doomed = node
        .instance("f", "doomed", 1, move |a: Vec<u8>| {
            let s = s.clone();
            async move {
                if a == b"block" {
                    s.notify_one();
                    std::future::pending::<()>().await;
                }
                Ok(a)
            }
        })
        .await;
    let c = node.client().await;
    let warm = lane_ready(&c, "f").await;
    let call = {
        let c = c.clone();
        tokio::spawn(async move { c.invoke("f", b"block", 5 * SEC).await })
    };
    started.notified().await;
    doomed.abort();
    assert_eq!(code(call.await.unwrap()), ErrorCode::InstanceFailed);
    assert_eq!(c.lane_calls(), warm + 1, "the lost call was on the lane");
    // The lane closing can reach the caller before the proxy has seen the instance's
    // connection end: until it has, a call may still be routed there and fail with
    // `InstanceFailed`; then `NotFound`.
    let deadline = Instant::now() + 5 * SEC;
    loop {
        match code(c.invoke("f", b"x", SEC).await) {
            ErrorCode::NotFound => break,
            ErrorCode::InstanceFailed => assert!(Instant::now() < deadline),
            other => panic!("unexpected {other:?}"),
        }
    }
    let _new = node.echo("f", "fresh").await;
    assert_eq!(c.invoke("f", b"again", SEC).await.unwrap(), b"again");
    node.proxy.shutdown().await;
}

/// A caller that writes garbage into its lane loses that lane; other callers' lanes go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_a_lane_closes_only_that_lane() {
    let node = Node::start(EngineKind::Tokio, |_| {});
    let _e = node.echo("echo", "e1").await;
    let good = node.client().await;
    let warm = lane_ready(&good, "echo").await;
    let path = node.proxy.socket_path().to_owned();
    tokio::task::spawn_blocking(move || {
        // A caller of the function's tenant, as the SDK would be: it asks the proxy for the
        // lane and its key, then opens the lane itself.
        let mut caller = raw::open(&path, Role::Caller, None).unwrap();
        let info = caller.lanes(1, "echo").pop().expect("the instance's lane");
        let raw::Lane { mut s, region, .. } =
            raw::open_lane(&info.path, &info.key).expect("a lane");
        assert!(region.post(0, b"\x05\x00\x00\x00\x01garbage"));
        s.write_all(&[1]).unwrap(); // ring, in case the instance sleeps
        s.set_read_timeout(Some(5 * SEC)).unwrap();
        let mut rest = Vec::new();
        // The instance closes this lane: EOF (or a reset, as it leaves our ring unread),
        // not the timeout.
        match s.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
    })
    .await
    .unwrap();
    for i in 0..20u8 {
        assert_eq!(good.invoke("echo", &[i], SEC).await.unwrap(), [i]);
    }
    assert_eq!(
        good.lane_calls(),
        warm + 20,
        "the good caller kept its lane"
    );
    node.proxy.shutdown().await;
}

/// The proxy names the lanes of a function's local instances (with their keys), and stops
/// naming an instance once it drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_names_lanes_until_an_instance_drains() {
    use shoal_protocol::{CallerFrame, LaneInfo, ProxyFrame};
    let node = Node::start(EngineKind::Tokio, |_| {});
    let path = node.proxy.socket_path().to_owned();
    let dir = path.parent().unwrap().to_owned();
    let tokens = [
        node.token("f", "a").await,
        node.token("f", "b").await,
        node.token("f", "c").await,
    ];
    tokio::task::spawn_blocking(move || {
        let instance = |id: &str| Role::Instance {
            function: "f".into(),
            instance_id: id.into(),
            concurrency: 1,
        };
        let lane_path = |n: &str| dir.join(format!("l-{n}.sock")).display().to_string();
        let mut a = raw::open(&path, instance("a"), Some(&tokens[0])).unwrap();
        a.send(&CallerFrame::Lane {
            path: lane_path("a"),
            key: [1; 16],
        });
        let mut b = raw::open(&path, instance("b"), Some(&tokens[1])).unwrap();
        b.send(&CallerFrame::Lane {
            path: lane_path("b"),
            key: [2; 16],
        });
        let _c = raw::open(&path, instance("c"), Some(&tokens[2])).unwrap(); // no lane
        let mut caller = raw::open(&path, Role::Caller, None).unwrap();
        let lane = |id: &str, key: u8| LaneInfo {
            instance_id: id.into(),
            path: lane_path(id),
            key: [key; 16],
        };
        assert_eq!(caller.lanes(1, "f"), vec![lane("a", 1), lane("b", 2)]);
        assert_eq!(caller.lanes(2, "other"), vec![]);
        a.send(&CallerFrame::Drain);
        assert!(matches!(a.recv(), Some(ProxyFrame::Drained)));
        assert_eq!(caller.lanes(3, "f"), vec![lane("b", 2)]);
        drop(b);
        // The proxy notices b's connection closing on its own time.
        let deadline = Instant::now() + 5 * SEC;
        let mut id = 4;
        while !caller.lanes(id, "f").is_empty() {
            assert!(Instant::now() < deadline, "b's lane still named");
            id += 1;
            // The poll interval: the proxy tells nobody when it has seen b's end.
            std::thread::sleep(Duration::from_millis(10));
        }
        // A caller cannot announce a lane.
        caller.send(&CallerFrame::Lane {
            path: lane_path("x"),
            key: [0; 16],
        });
        assert!(caller.recv().is_none());
    })
    .await
    .unwrap();
    node.proxy.shutdown().await;
}
