//! Isolation between functions (#13): each attack on the proxy and call lanes, played
//! against a real proxy with real instances and callers. Every one of them succeeded before
//! the proxy checked who connects.
#![allow(clippy::unwrap_used)] // test helpers panic on setup failure by design
mod support;

use shoal_meta::records::{quota_key, InstanceBinding, Role as TokenRole, DEFAULT_TENANT};
use shoal_meta::MetaStore;
use shoal_protocol::{CallerFrame, ObjectId, Payload, ProxyFrame, Role};
use shoal_proxy::{EngineKind, Proxy, ProxyConfig};
use shoal_sdk::{CallClient, CallOptions, ErrorCode, FunctionInstance};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::{raw, wait_for, wait_until};
use tokio::sync::Semaphore;

const SEC: Duration = Duration::from_secs(1);

struct Node {
    proxy: Proxy,
    meta: Arc<dyn MetaStore>,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(engine: EngineKind, tweak: impl FnOnce(&mut ProxyConfig)) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let meta: Arc<dyn MetaStore> = Arc::new(shoal_meta::MemStore::open(None, "").unwrap());
        let mut cfg = ProxyConfig::new("n1", dir.path().join("proxy.sock"));
        cfg.engine = engine;
        cfg.meta = Some(meta.clone());
        tweak(&mut cfg);
        Node {
            proxy: Proxy::start(cfg).unwrap(),
            meta,
            _dir: dir,
        }
    }

    /// The credential of instance `id` of `function` in `tenant`, as its agent issues it.
    async fn instance_token(&self, tenant: &str, function: &str, id: &str) -> String {
        let binding = InstanceBinding {
            function: function.into(),
            instance: id.into(),
        };
        shoal_meta::issue_instance_token(self.meta.as_ref(), tenant, binding)
            .await
            .unwrap()
            .token
    }

    /// A user's token: `role` in `tenant`.
    async fn user_token(&self, tenant: &str, role: TokenRole) -> String {
        shoal_meta::issue_token(self.meta.as_ref(), tenant, role, "test", None)
            .await
            .unwrap()
            .token
    }

    async fn register(
        &self,
        function: &str,
        id: &str,
        concurrency: u32,
        token: Option<&str>,
    ) -> Result<FunctionInstance, shoal_sdk::Error> {
        FunctionInstance::register(self.proxy.socket_path(), function, id, concurrency, token).await
    }

    /// An echo instance `id` of `function` in `tenant`, served in a task.
    async fn echo(&self, tenant: &str, function: &str, id: &str) {
        let token = self.instance_token(tenant, function, id).await;
        let inst = self.register(function, id, 4, Some(&token)).await.unwrap();
        tokio::spawn(inst.run(|a: Vec<u8>| async move { Ok(a) }));
    }

    async fn caller(&self, token: Option<&str>, lanes: bool) -> CallClient {
        let opts = CallOptions {
            token: token.map(Into::into),
            lanes,
            ..CallOptions::default()
        };
        CallClient::connect_with(self.proxy.socket_path(), opts)
            .await
            .unwrap()
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, shoal_sdk::Error>) -> ErrorCode {
    r.unwrap_err().code()
}

/// An instance registers only as itself: without a credential, with a garbage or revoked
/// one, with another instance's, or with its own under another function or instance name,
/// the proxy refuses it, and the instance it tried to pass for keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_registration_is_refused() {
    for engine in [EngineKind::Tokio, EngineKind::Uring] {
        let node = Node::start(engine, |_| {});
        node.echo(DEFAULT_TENANT, "echo", "e1").await;
        let other = node.instance_token(DEFAULT_TENANT, "echo", "e2").await;
        let own = node.instance_token(DEFAULT_TENANT, "echo", "e3").await;
        let cases: [(&str, &str, Option<&str>, ErrorCode); 6] = [
            ("echo", "e1", None, ErrorCode::Unauthenticated),
            (
                "echo",
                "e1",
                Some("shoal_0123456789abcdef_00"),
                ErrorCode::Unauthenticated,
            ),
            ("echo", "e1", Some(&other), ErrorCode::PermissionDenied),
            ("echo", "e9", Some(&other), ErrorCode::PermissionDenied),
            ("evil", "e3", Some(&own), ErrorCode::PermissionDenied),
            ("echo", "e1", Some(&own), ErrorCode::PermissionDenied),
        ];
        for (function, id, token, want) in cases {
            let r = node.register(function, id, 1, token).await;
            assert_eq!(code(r), want, "{engine:?}: {function}/{id}");
        }
        // A revoked credential stops working (within a second: the book follows the store).
        let revoked = node.instance_token(DEFAULT_TENANT, "echo", "e4").await;
        let id = shoal_meta::records::parse_token(&revoked)
            .unwrap()
            .id
            .to_owned();
        assert!(shoal_meta::revoke_token(node.meta.as_ref(), &id)
            .await
            .unwrap());
        wait_until("the revocation reaches the proxy", 5 * SEC, || async {
            code(node.register("echo", "e4", 1, Some(&revoked)).await) == ErrorCode::Unauthenticated
        })
        .await;
        // The victim is untouched.
        let c = node.caller(None, false).await;
        assert_eq!(
            c.invoke_instance("echo", "e1", b"still me", SEC)
                .await
                .unwrap(),
            b"still me"
        );
        // Its own credential registers it.
        let inst = node.register("echo", "e3", 1, Some(&own)).await;
        assert!(inst.is_ok(), "{engine:?}");
        node.proxy.shutdown().await;
    }
}

/// Nobody but an instance sets its limits. The gauge its lane callers map is a mirror: a
/// caller that writes a limit of 0 (and a full count, and "draining") into it stops nothing;
/// and another instance cannot re-register it with another concurrency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_sets_another_instances_limits() {
    let node = Node::start(EngineKind::Tokio, |_| {});
    node.echo(DEFAULT_TENANT, "echo", "e1").await;
    // An instance of another function, with its own good credential, tries to take the
    // victim's place with concurrency 0: refused.
    let evil = node.instance_token(DEFAULT_TENANT, "evil", "x1").await;
    assert_eq!(
        code(node.register("echo", "e1", 0, Some(&evil)).await),
        ErrorCode::PermissionDenied
    );
    // A caller of the tenant opens the victim's lane and scribbles over the gauge.
    let path = node.proxy.socket_path().to_owned();
    tokio::task::spawn_blocking(move || {
        let mut caller = raw::open(&path, Role::Caller, None).unwrap();
        let info = wait_for_lane(&mut caller, "echo");
        let lane = raw::open_lane(&info.path, &info.key).expect("a lane");
        for (offset, value) in [(4u64, 0u32), (0, u32::MAX), (12, 1), (8, 1)] {
            lane.gauge.write_at(&value.to_le_bytes(), offset).unwrap();
        }
        // The writes landed in the shared memory: every caller now reads "no room".
        let fd = std::os::fd::OwnedFd::from(lane.gauge.try_clone().unwrap());
        let seen = shoal_shm::LaneGauge::open(fd).unwrap();
        assert!(!seen.has_room() && seen.is_draining() && seen.limit() == 0);
        lane
    })
    .await
    .unwrap();
    // The victim serves on, through the proxy and through lanes.
    let through_proxy = node.caller(None, false).await;
    let with_lanes = node.caller(None, true).await;
    for i in 0..20u8 {
        assert_eq!(through_proxy.invoke("echo", &[i], SEC).await.unwrap(), [i]);
        assert_eq!(with_lanes.invoke("echo", &[i], SEC).await.unwrap(), [i]);
    }
    node.proxy.shutdown().await;
}

/// The proxy's answer to "which lanes does `function` offer", once one does.
fn wait_for_lane(caller: &mut raw::Conn, function: &str) -> shoal_protocol::LaneInfo {
    let deadline = std::time::Instant::now() + 5 * SEC;
    for id in 1.. {
        if let Some(l) = caller.lanes(id, function).pop() {
            return l;
        }
        assert!(std::time::Instant::now() < deadline, "no lane offered");
        // The poll interval: an instance announces its lane a moment after registering.
        std::thread::sleep(Duration::from_millis(10));
    }
    unreachable!()
}

/// A caller of tenant B cannot call tenant A's function: not through the proxy (`NotFound`,
/// as for a function that does not exist), not through a lane (the proxy names none, and the
/// lane socket hands out nothing without the key). Tenant A's callers and the operator can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_of_another_tenant_cannot_call_a_function() {
    let node = Node::start(EngineKind::Tokio, |_| {});
    node.echo("team-a", "secret", "s1").await;
    let b = node.user_token("team-b", TokenRole::Admin).await;
    for lanes in [false, true] {
        let c = node.caller(Some(&b), lanes).await;
        assert_eq!(
            code(c.invoke("secret", b"x", SEC).await),
            ErrorCode::NotFound
        );
        assert_eq!(
            code(c.invoke_instance("secret", "s1", b"x", SEC).await),
            ErrorCode::NotFound
        );
        assert_eq!(c.lane_calls(), 0);
    }
    // The local user (uid-mapped to tenant `default`) is another tenant too.
    let local = node.caller(None, true).await;
    assert_eq!(
        code(local.invoke("secret", b"x", SEC).await),
        ErrorCode::NotFound
    );
    // A reader of team-a may not call.
    let reader = node.user_token("team-a", TokenRole::Reader).await;
    let c = node.caller(Some(&reader), false).await;
    assert_eq!(
        code(c.invoke("secret", b"x", SEC).await),
        ErrorCode::PermissionDenied
    );
    // Team a's invoker may, through lanes too; and so may the operator.
    let a = node.user_token("team-a", TokenRole::Invoker).await;
    let c = node.caller(Some(&a), true).await;
    wait_for("team a's call takes the lane", 5 * SEC, || async {
        assert_eq!(c.invoke("secret", b"a", SEC).await.unwrap(), b"a");
        (c.lane_calls() > 0).then_some(())
    })
    .await;
    let op = node
        .user_token(shoal_meta::records::SYSTEM_TENANT, TokenRole::Admin)
        .await;
    let c = node.caller(Some(&op), false).await;
    assert_eq!(c.invoke("secret", b"op", SEC).await.unwrap(), b"op");
    // Tenant b asks for the lanes itself: none; it finds the socket anyway: no lane without
    // the key.
    let path = node.proxy.socket_path().to_owned();
    let dir = path.parent().unwrap().to_owned();
    tokio::task::spawn_blocking(move || {
        let mut caller = raw::open(&path, Role::Caller, Some(&b)).unwrap();
        assert!(caller.lanes(1, "secret").is_empty());
        let lane_socket = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path().display().to_string())
            .find(|p| p.contains("/l-"))
            .expect("the instance's lane socket");
        assert!(raw::open_lane(&lane_socket, &[0; 16]).is_none());
    })
    .await
    .unwrap();
    node.proxy.shutdown().await;
}

/// An instance that returns an object id it did not create gets nothing released: the caller
/// reads it (in its own tenant) and tells the instance it is done; it deletes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returned_foreign_object_is_not_released() {
    let dir = tempfile::tempdir().unwrap();
    let mut wcfg = shoal_dataworker::Config::new(dir.path().join("dw"));
    wcfg.shm_size = 16 << 20;
    let worker = shoal_dataworker::Dataworker::start(wcfg, None)
        .await
        .unwrap();
    let store = shoal_sdk::Client::connect(worker.socket_path())
        .await
        .unwrap();
    store
        .put("precious", b"the caller's own data")
        .await
        .unwrap();
    let node = Node::start(EngineKind::Tokio, |_| {});
    // The instance speaks the protocol itself: every call is answered with "precious".
    let token = node.instance_token(DEFAULT_TENANT, "evil", "v1").await;
    let path = node.proxy.socket_path().to_owned();
    let role = Role::Instance {
        function: "evil".into(),
        instance_id: "v1".into(),
        concurrency: 1,
    };
    let mut inst = raw::open(&path, role, Some(&token)).unwrap();
    let evil = tokio::task::spawn_blocking(move || {
        let Some(ProxyFrame::Invoke { id, .. }) = inst.recv() else {
            panic!("expected a call");
        };
        inst.send(&CallerFrame::Result {
            id,
            result: Ok(Payload::Object(ObjectId::new("precious").unwrap())),
        });
        // What the proxy says next: the caller is done with the result.
        (id, inst.recv())
    });
    let opts = CallOptions {
        store: Some(store.clone()),
        ..CallOptions::default()
    };
    let c = CallClient::connect_with(&path, opts).await.unwrap();
    let out = c
        .invoke_payload("evil", None, Payload::Inline(vec![]), SEC)
        .await
        .unwrap();
    assert_eq!(&*out, b"the caller's own data");
    let (invoke, next) = evil.await.unwrap();
    assert_eq!(next, Some(ProxyFrame::Release { id: invoke }));
    drop(out);
    // Still there, on a fresh look.
    let v = store.get("precious", SEC).await.unwrap();
    assert_eq!(v.as_bytes(), b"the caller's own data");
    node.proxy.shutdown().await;
    drop((c, store, v));
    worker.shutdown().await;
}

/// Past `quotas/<tenant>`'s calls in flight, a call is refused with `QuotaExceeded` at once
/// and changes nothing; a tenant under that quota takes no lanes (its calls are all counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_over_quota_are_refused_at_once() {
    let node = Node::start(EngineKind::Tokio, |_| {});
    let gate = Arc::new(Semaphore::new(0));
    let (started, g) = (Arc::new(AtomicUsize::new(0)), gate.clone());
    let s = started.clone();
    let token = node.instance_token(DEFAULT_TENANT, "slow", "s1").await;
    let inst = node.register("slow", "s1", 8, Some(&token)).await.unwrap();
    tokio::spawn(inst.run(move |a: Vec<u8>| {
        let (g, s) = (g.clone(), s.clone());
        async move {
            if a == b"hold" {
                s.fetch_add(1, Ordering::SeqCst);
                g.acquire().await.unwrap().forget();
            }
            Ok(a)
        }
    }));
    let quota = |n: u64| {
        let meta = node.meta.clone();
        async move {
            let q = shoal_meta::records::Quota {
                calls_in_flight: Some(n),
                ..Default::default()
            };
            meta.put(
                &quota_key(DEFAULT_TENANT),
                serde_json::to_vec(&q).unwrap(),
                None,
            )
            .await
            .unwrap();
        }
    };
    let c = node.caller(None, true).await;
    // The proxy follows the quota: at 0 nothing goes, at 2 calls go again.
    quota(0).await;
    wait_until("the quota of 0 applies", 5 * SEC, || async {
        matches!(c.invoke("slow", b"x", SEC).await, Err(e) if e.code() == ErrorCode::QuotaExceeded)
    })
    .await;
    quota(2).await;
    wait_until("the quota of 2 applies", 5 * SEC, || async {
        c.invoke("slow", b"x", SEC).await.is_ok()
    })
    .await;
    let held: Vec<_> = (0..2)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.invoke("slow", b"hold", 20 * SEC).await })
        })
        .collect();
    wait_until("two calls in flight", 5 * SEC, || async {
        started.load(Ordering::SeqCst) == 2
    })
    .await;
    let t = std::time::Instant::now();
    assert_eq!(
        code(c.invoke("slow", b"hold", 20 * SEC).await),
        ErrorCode::QuotaExceeded
    );
    assert!(t.elapsed() < 10 * SEC, "refused at once, not at a deadline");
    assert_eq!(started.load(Ordering::SeqCst), 2, "the refused call ran");
    gate.add_permits(2);
    for h in held {
        assert_eq!(h.await.unwrap().unwrap(), b"hold");
    }
    assert_eq!(c.invoke("slow", b"after", SEC).await.unwrap(), b"after");
    assert_eq!(
        c.lane_calls(),
        0,
        "a tenant under a calls quota takes no lanes"
    );
    node.proxy.shutdown().await;
}

/// The socket takes only allowed uids: a peer whose uid is neither allowed nor mapped is
/// refused before anything it says counts, credential or not; an allowed uid that maps to
/// no tenant must present a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_another_uid_is_refused() {
    let me = nix::unistd::getuid().as_raw();
    let node = Node::start(EngineKind::Tokio, |cfg| {
        cfg.allowed_uids = Vec::new();
        cfg.tenant_uids = [(me.wrapping_add(1), DEFAULT_TENANT.to_string())].into();
    });
    let r = CallClient::connect(node.proxy.socket_path()).await;
    assert_eq!(code(r), ErrorCode::PermissionDenied);
    let token = node.instance_token(DEFAULT_TENANT, "echo", "e1").await;
    let r = node.register("echo", "e1", 1, Some(&token)).await;
    assert_eq!(code(r), ErrorCode::PermissionDenied);
    node.proxy.shutdown().await;

    let node = Node::start(EngineKind::Tokio, |cfg| {
        cfg.allowed_uids = vec![me];
        cfg.tenant_uids = Default::default();
    });
    let r = CallClient::connect(node.proxy.socket_path()).await;
    assert_eq!(code(r), ErrorCode::Unauthenticated);
    node.echo(DEFAULT_TENANT, "echo", "e1").await;
    let t = node.user_token(DEFAULT_TENANT, TokenRole::Invoker).await;
    let c = node.caller(Some(&t), false).await;
    assert_eq!(c.invoke("echo", b"ok", SEC).await.unwrap(), b"ok");
    node.proxy.shutdown().await;
}

/// A caller's token revoked while its connection is open stops working there too, within a
/// second or so; a new connection with it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_callers_token_stops_working() {
    let node = Node::start(EngineKind::Tokio, |_| {});
    node.echo("team-a", "f", "f1").await;
    let issued = shoal_meta::issue_token(
        node.meta.as_ref(),
        "team-a",
        TokenRole::Invoker,
        "test",
        None,
    )
    .await
    .unwrap();
    let c = node.caller(Some(&issued.token), false).await;
    assert_eq!(c.invoke("f", b"ok", SEC).await.unwrap(), b"ok");
    shoal_meta::revoke_token(node.meta.as_ref(), &issued.record.id)
        .await
        .unwrap();
    wait_until("the open connection stops serving", 10 * SEC, || async {
        c.invoke("f", b"x", SEC).await.is_err()
    })
    .await;
    let again = CallClient::connect_with(
        node.proxy.socket_path(),
        CallOptions {
            token: Some(issued.token.clone()),
            ..CallOptions::default()
        },
    )
    .await;
    assert_eq!(code(again), ErrorCode::Unauthenticated);
    node.proxy.shutdown().await;
}
