//! Tenants on one dataworker, played as attacks: a real worker following an embedded
//! metadata store for tokens and quotas, real clients connecting with tokens or by uid.
//! Another tenant's objects and keys cannot be read, listed, deleted or overwritten (through
//! the socket, the mailbox or the shared index); unknown and revoked credentials do not
//! connect; a reader does not write; a quota passed by one byte changes nothing.
#![allow(clippy::unwrap_used)] // test helpers panic on setup failure by design
mod support;

use shoal_dataworker::{Config, Dataworker, StartParts, UidTenant};
use shoal_meta::records::{quota_key, Quota, Role};
use shoal_meta::{issue_token, revoke_token, MemStore, MetaStore};
use shoal_protocol::{
    encode_frame, ClientFrame, ClientHello, FrameDecoder, ObjectId, Request, Response, ServerFrame,
};
use shoal_sdk::{Client, ConnectOptions, ErrorCode, SetOptions};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use support::{wait_for, wait_until};

const MIB: u64 = 1 << 20;
/// How long a change in the metadata store may take to reach the worker.
const PROPAGATE: Duration = Duration::from_secs(5);

struct Node {
    worker: Option<Dataworker>,
    meta: Arc<dyn MetaStore>,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(tweak: impl FnOnce(&mut Config)) -> Node {
        let meta: Arc<dyn MetaStore> = Arc::new(MemStore::open(None, "").unwrap());
        Self::start_on(meta, tweak).await
    }

    async fn start_on(meta: Arc<dyn MetaStore>, tweak: impl FnOnce(&mut Config)) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::new(dir.path().join("sock"));
        cfg.shm_size = 32 * MIB;
        cfg.http_addr = Some("127.0.0.1:0".parse().unwrap());
        tweak(&mut cfg);
        let parts = StartParts {
            cluster: None,
            meta: Some(meta.clone()),
        };
        let worker = Dataworker::start_parts(cfg, None, parts).await.unwrap();
        Node {
            worker: Some(worker),
            meta,
            _dir: dir,
        }
    }

    fn w(&self) -> &Dataworker {
        self.worker.as_ref().unwrap()
    }

    fn opts(&self, token: Option<&str>) -> ConnectOptions {
        ConnectOptions {
            token: token.map(str::to_owned),
            ..ConnectOptions::new(self.w().socket_path())
        }
    }

    /// A client known by its uid (the worker's own: the default tenant).
    async fn local(&self) -> Client {
        Client::connect_with(self.opts(None)).await.unwrap()
    }

    /// Connects with `token`, once the worker's book has it (a token issued a moment ago
    /// reaches the worker through a watch).
    async fn with_token(&self, token: &str) -> Client {
        let opts = self.opts(Some(token));
        wait_for("the worker knows the token", PROPAGATE, || {
            let opts = opts.clone();
            async move { Client::connect_with(opts).await.ok() }
        })
        .await
    }

    async fn token(&self, tenant: &str, role: Role) -> String {
        issue_token(&*self.meta, tenant, role, "test", None)
            .await
            .unwrap()
            .token
    }

    async fn stop(mut self) {
        self.worker.take().unwrap().shutdown().await;
    }
}

/// `GET path` on the worker's HTTP endpoint: status and body.
async fn http_get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let status = resp[9..12].parse().unwrap();
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    })
    .await
    .unwrap()
}

/// One tenant's `/v1/usage` line as the operator sees it.
async fn usage_of(n: &Node, admin: &str, tenant: &str) -> serde_json::Value {
    let (status, body) = http_get(n.w().http_addr().unwrap(), "/v1/usage", Some(admin)).await;
    assert_eq!(status, 200, "{body}");
    let all: serde_json::Value = serde_json::from_str(&body).unwrap();
    all.get(tenant).cloned().unwrap_or(serde_json::Value::Null)
}

fn names(l: Vec<shoal_sdk::ListEntry>) -> Vec<String> {
    l.into_iter().map(|e| e.id.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenant_cannot_get_list_delete_or_overwrite() {
    let n = Node::start(|_| {}).await;
    let (ta, tb) = (
        n.token("team-a", Role::Invoker).await,
        n.token("team-b", Role::Invoker).await,
    );
    let a = n.with_token(&ta).await;
    let b = n.with_token(&tb).await;
    let local = n.local().await;
    assert_eq!(
        (a.tenant(), b.tenant(), local.tenant()),
        ("team-a", "team-b", "default")
    );
    a.put("secret", b"a's bytes").await.unwrap();
    a.put("big", &vec![7u8; 200_000]).await.unwrap();
    a.kv_set("k", b"a's value", SetOptions::default())
        .await
        .unwrap();
    // The owner reads through the shared index, no syscall, as the default tenant would.
    let own = a.get("secret", Duration::ZERO).await.unwrap();
    assert!(own.is_fast() && &own[..] == b"a's bytes");
    assert!(a.kv_get("k").await.unwrap().unwrap().is_fast());

    for (who, c) in [("team-b", &b), ("default", &local)] {
        // Get: through the fast path first, then the socket; a waiting get times out.
        for id in ["secret", "big"] {
            let e = c.get(id, Duration::ZERO).await.unwrap_err();
            assert_eq!(e.code(), ErrorCode::NotFound, "{who} got {id}");
        }
        let e = c
            .get("secret", Duration::from_millis(20))
            .await
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::Timeout);
        let many = c.get_many(&["secret"], Duration::ZERO).await.unwrap();
        assert_eq!(many[0].as_ref().unwrap_err().code(), ErrorCode::NotFound);
        assert!(!c.contains("secret").await.unwrap());
        // List: nothing of team-a's, not even with a prefix.
        assert!(names(c.list("", 100).await.unwrap()).is_empty(), "{who}");
        assert!(names(c.list("sec", 100).await.unwrap()).is_empty(), "{who}");
        assert!(names(c.kv_keys("", 100).await.unwrap()).is_empty(), "{who}");
        // Delete: NotFound, and team-a's object is untouched.
        assert_eq!(
            c.delete("secret").await.unwrap_err().code(),
            ErrorCode::NotFound
        );
        // KV.
        assert!(c.kv_get("k").await.unwrap().is_none());
        assert_eq!(
            c.kv_mget(&["k"]).await.unwrap()[0].as_ref().map(|_| ()),
            None
        );
        assert!(!c.kv_exists("k").await.unwrap());
        assert_eq!(c.kv_ttl("k").await.unwrap(), None);
        assert!(!c
            .kv_expire("k", Some(Duration::from_secs(1)))
            .await
            .unwrap());
        assert_eq!(
            c.kv_read("k", 0, 1).await.unwrap_err().code(),
            ErrorCode::NotFound
        );
        assert_eq!(c.kv_del(&["k"]).await.unwrap(), 0);
    }
    // "Overwrite": the same name is another tenant's own key, not team-a's.
    b.put("secret", b"b's bytes").await.unwrap();
    b.kv_set("k", b"b's value", SetOptions::default())
        .await
        .unwrap();
    let theirs = b.get("secret", Duration::ZERO).await.unwrap();
    assert!(theirs.is_fast(), "a tenant's own reads take the fast path");
    assert_eq!(&theirs[..], b"b's bytes");
    assert_eq!(
        &a.get("secret", Duration::ZERO).await.unwrap()[..],
        b"a's bytes"
    );
    assert_eq!(&a.kv_get("k").await.unwrap().unwrap()[..], b"a's value");
    assert_eq!(b.kv_del(&["k"]).await.unwrap(), 1);
    assert_eq!(&a.kv_get("k").await.unwrap().unwrap()[..], b"a's value");
    assert_eq!(names(a.list("", 100).await.unwrap()), ["big", "secret"]);
    assert_eq!(names(b.list("", 100).await.unwrap()), ["secret"]);
    assert_eq!(names(a.kv_keys("", 100).await.unwrap()), ["k"]);

    // The same through the blocking client's shared-memory mailbox.
    let opts = n.opts(Some(&tb));
    tokio::task::spawn_blocking(move || {
        let c = shoal_sdk::blocking::Client::connect_with(opts).unwrap();
        assert_eq!(
            c.get("big", Duration::ZERO).unwrap_err().code(),
            ErrorCode::NotFound
        );
        assert_eq!(c.delete("big").unwrap_err().code(), ErrorCode::NotFound);
        assert!(c.kv_get("k").unwrap().is_none());
        assert_eq!(c.kv_del(&["k"]).unwrap(), 0);
        assert!(c.mailbox_calls() >= 4, "went through the mailbox");
    })
    .await
    .unwrap();
    assert_eq!(a.get("big", Duration::ZERO).await.unwrap().len(), 200_000);
    drop((own, theirs));
    n.stop().await;
}

/// A client speaking raw frames: its own hello, then requests.
struct Raw {
    stream: std::os::unix::net::UnixStream,
    buf: bytes::BytesMut,
}

impl Raw {
    fn open(path: &std::path::Path, hello: &ClientHello) -> (Raw, Option<ServerFrame>) {
        let mut stream = std::os::unix::net::UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut out = Vec::new();
        encode_frame(hello, &mut out).unwrap();
        stream.write_all(&out).unwrap();
        let mut r = Raw {
            stream,
            buf: bytes::BytesMut::new(),
        };
        let first = r.next();
        (r, first)
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

    fn call(&mut self, req: Request) -> Response {
        let mut out = Vec::new();
        encode_frame(&ClientFrame { id: 1, req }, &mut out).unwrap();
        self.stream.write_all(&out).unwrap();
        match self.next() {
            Some(ServerFrame::Reply { resp, .. }) => resp,
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn refused_with(first: Option<ServerFrame>) -> ErrorCode {
    match first {
        Some(ServerFrame::Refused(e)) => e.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qualified_ids_cannot_be_smuggled_in() {
    let n = Node::start(|_| {}).await;
    let ta = n.token("team-a", Role::Invoker).await;
    let a = n.with_token(&ta).await;
    a.put("secret", b"a's").await.unwrap();
    // The SDK refuses a NUL in an id; a raw client that sends team-a's stored name as an id
    // gets InvalidId, from the default tenant and from another tenant alike.
    assert_eq!(
        a.put("x\0y", b"").await.unwrap_err().code(),
        ErrorCode::InvalidId
    );
    let tb = n.token("team-b", Role::Invoker).await;
    n.with_token(&tb).await;
    for hello in [
        ClientHello::default(),
        ClientHello {
            token: Some(tb.clone()),
            tenant: None,
        },
    ] {
        let (mut raw, first) = Raw::open(n.w().socket_path(), &hello);
        assert!(matches!(first, Some(ServerFrame::Hello(_))), "{first:?}");
        let stored = ObjectId::parse_any("team-a\0secret").unwrap();
        for req in [
            Request::Get {
                ids: vec![stored.clone()],
                timeout_ms: 0,
            },
            Request::Delete { id: stored.clone() },
            Request::KvGet {
                keys: vec![stored.clone()],
            },
            Request::List {
                ns: shoal_protocol::Namespace::Object,
                prefix: "team-a\0".into(),
                limit: 10,
            },
        ] {
            match raw.call(req) {
                Response::Error(e) => assert_eq!(e.code, ErrorCode::InvalidId),
                other => panic!("smuggled id answered {other:?}"),
            }
        }
    }
    assert_eq!(&a.get("secret", Duration::ZERO).await.unwrap()[..], b"a's");
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_unknown_and_revoked_tokens_do_not_connect() {
    let n = Node::start(|_| {}).await;
    let bad = |t: &str| ClientHello {
        token: Some(t.into()),
        tenant: None,
    };
    // Malformed, and well-formed but unknown: Unauthenticated (never the uid's tenant).
    let unknown = format!("shoal_{}_{}", "0".repeat(16), "0".repeat(64));
    for t in ["garbage", unknown.as_str()] {
        let (_, first) = Raw::open(n.w().socket_path(), &bad(t));
        assert_eq!(refused_with(first), ErrorCode::Unauthenticated, "{t}");
    }
    let e = Client::connect_with(n.opts(Some("garbage")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unauthenticated);
    // A revoked token stops connecting, and its open connections are closed.
    let issued = issue_token(&*n.meta, "team-a", Role::Invoker, "to revoke", None)
        .await
        .unwrap();
    let c = n.with_token(&issued.token).await;
    c.put("before", b"x").await.unwrap();
    assert!(revoke_token(&*n.meta, &issued.record.id).await.unwrap());
    wait_until("the revoked token is refused", PROPAGATE, || async {
        matches!(
            Client::connect_with(n.opts(Some(&issued.token))).await,
            Err(e) if e.code() == ErrorCode::Unauthenticated
        )
    })
    .await;
    wait_until(
        "the revoked token's connection is closed",
        PROPAGATE,
        || async { c.contains("before").await.is_err() },
    )
    .await;
    // A first frame that is not a ClientHello is refused as a protocol error.
    let mut s = std::os::unix::net::UnixStream::connect(n.w().socket_path()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&[0xff; 16]).unwrap();
    let mut raw = Raw {
        stream: s,
        buf: bytes::BytesMut::new(),
    };
    assert_eq!(refused_with(raw.next()), ErrorCode::ProtocolError);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_need_a_metadata_store() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(dir.path());
    cfg.shm_size = 8 * MIB;
    let w = Dataworker::start(cfg, None).await.unwrap();
    let token = format!("shoal_{}_{}", "1".repeat(16), "2".repeat(64));
    let opts = ConnectOptions {
        token: Some(token),
        ..ConnectOptions::new(w.socket_path())
    };
    let e = Client::connect_with(opts).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unauthenticated);
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_reads_but_never_writes() {
    let n = Node::start(|_| {}).await;
    let (writer, reader) = (
        n.token("team-a", Role::Invoker).await,
        n.token("team-a", Role::Reader).await,
    );
    let w = n.with_token(&writer).await;
    w.put("doc", b"hello").await.unwrap();
    w.kv_set("k", b"v", SetOptions::default()).await.unwrap();
    let r = n.with_token(&reader).await;
    assert_eq!(&r.get("doc", Duration::ZERO).await.unwrap()[..], b"hello");
    assert_eq!(&r.kv_get("k").await.unwrap().unwrap()[..], b"v");
    assert_eq!(names(r.list("", 10).await.unwrap()), ["doc"]);
    let denied = |e: shoal_sdk::Error| assert_eq!(e.code(), ErrorCode::PermissionDenied);
    denied(r.put("new", b"x").await.unwrap_err());
    denied(r.put("big", &vec![1u8; 100_000]).await.unwrap_err());
    denied(r.delete("doc").await.unwrap_err());
    denied(
        r.kv_set("k", b"w", SetOptions::default())
            .await
            .unwrap_err(),
    );
    denied(r.kv_del(&["k"]).await.unwrap_err());
    denied(r.kv_expire("k", None).await.unwrap_err());
    // Through the mailbox as well.
    let opts = n.opts(Some(&reader));
    tokio::task::spawn_blocking(move || {
        let c = shoal_sdk::blocking::Client::connect_with(opts).unwrap();
        assert_eq!(
            c.put("new", b"x").unwrap_err().code(),
            ErrorCode::PermissionDenied
        );
        assert_eq!(&c.get("doc", Duration::ZERO).unwrap()[..], b"hello");
    })
    .await
    .unwrap();
    assert!(!w.contains("new").await.unwrap() && w.kv_exists("k").await.unwrap());
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uid_mappings_put_a_local_user_in_a_tenant() {
    let own = nix::unistd::getuid().as_raw();
    let map = |spec: String| -> UidTenant { spec.parse().unwrap() };
    let n = Node::start(|c| c.tenant_uids = vec![map(format!("{own}=team-u"))]).await;
    let u = n.local().await;
    assert_eq!(u.tenant(), "team-u");
    u.put("mine", b"u's").await.unwrap();
    let v = u.get("mine", Duration::ZERO).await.unwrap();
    assert!(
        v.is_fast(),
        "zero-syscall reads of the tenant's own objects"
    );
    let d = n.with_token(&n.token("default", Role::Admin).await).await;
    assert_eq!(d.tenant(), "default");
    assert_eq!(
        d.get("mine", Duration::ZERO).await.unwrap_err().code(),
        ErrorCode::NotFound
    );
    n.stop().await;
    // Mapped as a reader: may read, not write.
    let n = Node::start(|c| c.tenant_uids = vec![map(format!("{own}=team-u:reader"))]).await;
    let r = n.local().await;
    assert_eq!(
        r.put("x", b"").await.unwrap_err().code(),
        ErrorCode::PermissionDenied
    );
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_operator_acts_in_another_tenant() {
    let n = Node::start(|_| {}).await;
    let a = n.with_token(&n.token("team-a", Role::Admin).await).await;
    a.put("report", b"numbers").await.unwrap();
    let as_tenant = |token: String, tenant: &str| ConnectOptions {
        token: Some(token),
        tenant: Some(tenant.to_owned()),
        ..ConnectOptions::new(n.w().socket_path())
    };
    let admin = n.token("system", Role::Admin).await;
    // Without naming a tenant the operator works in the default one, like the local user.
    assert_eq!(n.with_token(&admin).await.tenant(), "default");
    let op = Client::connect_with(as_tenant(admin, "team-a"))
        .await
        .unwrap();
    assert_eq!(op.tenant(), "team-a");
    assert_eq!(
        &op.get("report", Duration::ZERO).await.unwrap()[..],
        b"numbers"
    );
    let tb = n.token("team-b", Role::Admin).await;
    n.with_token(&tb).await;
    let e = Client::connect_with(as_tenant(tb, "team-a"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::PermissionDenied);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_passed_by_one_byte_refuses_and_changes_nothing() {
    let n = Node::start(|_| {}).await;
    let admin = n.token("system", Role::Admin).await;
    let q = n.with_token(&n.token("team-q", Role::Invoker).await).await;
    let quota = Quota {
        arena_bytes: Some(1000),
        ..Quota::default()
    };
    n.meta
        .put(
            &quota_key("team-q"),
            serde_json::to_vec(&quota).unwrap(),
            None,
        )
        .await
        .unwrap();
    wait_until("the worker follows the quota", PROPAGATE, || async {
        usage_of(&n, &admin, "team-q").await["quota"]["arena_bytes"] == 1000
    })
    .await;
    // Charged: payload plus the name as the tenant wrote it. 996 + "obj" = 999 bytes.
    q.put("obj", &[1u8; 996]).await.unwrap();
    let before = usage_of(&n, &admin, "team-q").await;
    assert_eq!(before["arena_bytes"], 999);
    // One byte past the limit: 999 + 1 + "z" = 1001.
    let e = q.put("z", b"x").await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::QuotaExceeded, "{e}");
    assert!(!q.contains("z").await.unwrap(), "nothing was created");
    // Every other way to add bytes is refused the same way, and all at once for a mset.
    let refused = |e: shoal_sdk::Error| assert_eq!(e.code(), ErrorCode::QuotaExceeded, "{e}");
    refused(
        q.kv_set("z", b"x", SetOptions::default())
            .await
            .unwrap_err(),
    );
    refused(q.create("big", 100_000).await.unwrap_err());
    refused(
        q.kv_set("bigk", &vec![0u8; 100_000], SetOptions::default())
            .await
            .unwrap_err(),
    );
    refused(
        q.kv_mset(&[("m1", &b""[..]), ("m2", &b"xx"[..])], None)
            .await
            .unwrap_err(),
    );
    assert!(!q.kv_exists("m1").await.unwrap() && !q.kv_exists("z").await.unwrap());
    assert_eq!(
        usage_of(&n, &admin, "team-q").await,
        before,
        "usage unchanged"
    );
    // Exactly at the limit is fine: 999 + 0 + "z" = 1000.
    q.put("z", b"").await.unwrap();
    assert_eq!(usage_of(&n, &admin, "team-q").await["arena_bytes"], 1000);
    // Other tenants are not limited by team-q's quota.
    n.local().await.put("free", &[0u8; 5000]).await.unwrap();
    // Deleting makes room again; usage goes back to zero.
    q.delete("obj").await.unwrap();
    q.delete("z").await.unwrap();
    assert_eq!(usage_of(&n, &admin, "team-q").await["arena_bytes"], 0);
    q.put("z", b"x").await.unwrap();
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_metrics_need_a_token_unless_metrics_are_on_loopback() {
    let n = Node::start(|c| c.http_addr = Some("0.0.0.0:0".parse().unwrap())).await;
    let port = n.w().http_addr().unwrap().port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let (admin, ta, tb) = (
        n.token("system", Role::Admin).await,
        n.token("team-a", Role::Reader).await,
        n.token("team-b", Role::Invoker).await,
    );
    n.with_token(&tb).await.put("b", b"12345").await.unwrap();
    n.local().await.put("d", b"1").await.unwrap();
    assert_eq!(
        http_get(addr, "/health", None).await.0,
        200,
        "health is open"
    );
    let (status, body) = http_get(addr, "/v1/usage", None).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("Unauthenticated"), "{body}");
    assert_eq!(
        http_get(addr, "/v1/usage", Some("shoal_bogus")).await.0,
        401
    );
    // A tenant sees itself only; the operator sees everyone.
    let (status, body) = http_get(addr, "/v1/usage", Some(&ta)).await;
    assert_eq!(status, 200);
    let mine: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(mine.as_object().unwrap().len(), 1);
    assert_eq!(mine["team-a"]["arena_bytes"], 0);
    let (_, body) = http_get(addr, "/v1/usage", Some(&admin)).await;
    let all: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(all["team-b"]["arena_bytes"], 6);
    assert_eq!(all["default"]["arena_bytes"], 2);
    // Not bound to loopback: /metrics needs a token of the system tenant.
    assert_eq!(http_get(addr, "/metrics", None).await.0, 401);
    assert_eq!(http_get(addr, "/metrics", Some(&ta)).await.0, 403);
    let (status, _) = http_get(addr, "/metrics", Some(&admin)).await;
    assert!(
        status == 200 || status == 404,
        "authorized (404: no recorder here)"
    );
    n.stop().await;
    // Bound to loopback: /metrics is open.
    let n = Node::start(|_| {}).await;
    let (status, _) = http_get(n.w().http_addr().unwrap(), "/metrics", None).await;
    assert!(status == 200 || status == 404, "{status}");
    n.stop().await;
}
