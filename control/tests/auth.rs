//! The attacks on control's REST API, each played over real HTTP against a real control
//! process (127.0.0.1:0, `MemStore`): requests without a token, with a forged, malformed,
//! revoked or expired one, with a token of too small a role, with another tenant's token;
//! a quota exceeded by one instance; the token routes' rules; `/metrics` off loopback; the
//! admin token file. Tokens are issued on the store as an operator would (or through the
//! API under test).
#![allow(clippy::unwrap_used)]

mod support;

use serde_json::json;
use shoal_control::{AdminTokenState, DEFAULT_MAX_INVOKE_BODY};
use shoal_control_client::{ErrorCode, FunctionSpec, Quota, TokenRequest};
use shoal_meta::records::{Role, DEFAULT_TENANT, SYSTEM_TENANT};
use shoal_meta::{MemStore, MetaStore};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn spec(name: &str, max_instances: u32) -> FunctionSpec {
    serde_json::from_value(json!({
        "name": name,
        "code": {"kind": "dir", "path": "/srv/fn"},
        "command": ["./run"],
        "resources": {"cpu_milli": 500, "mem_mib": 256},
        "max_instances": max_instances,
    }))
    .unwrap()
}

/// The function keys in the store.
async fn stored_functions(store: &MemStore) -> Vec<String> {
    let (kvs, _) = store.range("functions/").await.unwrap();
    kvs.into_iter().map(|kv| kv.key).collect()
}

/// Every route's path with its parameter filled in.
fn concrete(path: &str) -> String {
    path.replace("{name}", "f")
        .replace("{id}", "0123456789abcdef")
        .replace("{tenant}", "default")
}

#[tokio::test]
async fn every_route_but_health_needs_a_token() {
    let (c, store, _admin) = start().await;
    let a = c.http_addr();
    for (method, path) in shoal_control::api_routes() {
        let r = request(a, None, method, &concrete(path), b"{}").await;
        if path.starts_with("/health") {
            assert_eq!(r.status, 200, "{method} {path}: {}", r.text());
            continue;
        }
        if path == "/metrics" {
            // Open on a loopback listener (see `metrics_off_loopback_need_a_system_token`);
            // this control has no recorder.
            r.error(404, "NotFound");
            continue;
        }
        r.error(401, "Unauthenticated");
        assert_eq!(
            r.header("www-authenticate"),
            Some("Bearer realm=\"shoal\""),
            "{method} {path}"
        );
    }
    // A deploy without a token stored nothing.
    let err = anonymous(a).create_function(&spec("f", 1)).await;
    refused(err, 401, ErrorCode::Unauthenticated);
    assert!(stored_functions(&store).await.is_empty());
    c.shutdown().await;
}

#[tokio::test]
async fn forged_and_malformed_tokens_are_refused_alike() {
    let (c, store, admin) = start().await;
    let a = c.http_addr();
    let good = issue(store.as_ref(), "team-a", Role::Admin).await;
    // The same id with another secret; an unknown id; garbage; another scheme.
    let (id_part, secret) = good.rsplit_once('_').unwrap();
    let flipped = if secret.starts_with('0') { "1" } else { "0" };
    let wrong_secret = format!("{id_part}_{flipped}{}", &secret[1..]);
    let unknown = format!("shoal_{}_{}", "f".repeat(16), "a".repeat(64));
    let mut messages = Vec::new();
    for token in [
        wrong_secret.as_str(),
        unknown.as_str(),
        "garbage",
        "",
        &good.to_uppercase(),
    ] {
        let r = request(a, Some(token), "GET", "/v1/functions", b"").await;
        messages.push(r.error(401, "Unauthenticated"));
    }
    for header in ["Basic dXNlcjpwYXNz", "Bearer", &good] {
        let raw = format!(
            "GET /v1/functions HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: {header}\r\n\r\n"
        );
        let mut s = tokio::net::TcpStream::connect(a).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        messages.push(parse(&out).error(401, "Unauthenticated"));
    }
    messages.dedup();
    assert_eq!(
        messages.len(),
        1,
        "every refusal says the same: {messages:?}"
    );
    // The good token and the operator's work.
    client(a, &good).functions().await.unwrap();
    client(a, &admin).functions().await.unwrap();
    c.shutdown().await;
}

#[tokio::test]
async fn roles_limit_what_a_token_may_do() {
    let (c, store, _admin) = start().await;
    let a = c.http_addr();
    let reader = client(a, &issue(store.as_ref(), "team-a", Role::Reader).await);
    let invoker = client(a, &issue(store.as_ref(), "team-a", Role::Invoker).await);
    let deployer = client(a, &issue(store.as_ref(), "team-a", Role::Deployer).await);
    let admin = client(a, &issue(store.as_ref(), "team-a", Role::Admin).await);

    // A reader may not deploy; nothing is stored.
    let msg = refused(
        reader.create_function(&spec("f", 1)).await,
        403,
        ErrorCode::PermissionDenied,
    );
    assert!(msg.contains("reader"), "{msg}");
    assert!(stored_functions(&store).await.is_empty());
    // An invoker may not read functions.
    refused(invoker.functions().await, 403, ErrorCode::PermissionDenied);
    // A deployer deploys in its own tenant (filled in), but not in another one.
    let f = deployer.create_function(&spec("f", 1)).await.unwrap();
    assert_eq!(f.tenant, "team-a");
    let mut elsewhere = spec("g", 1);
    elsewhere.tenant = "team-b".into();
    refused(
        deployer.create_function(&elsewhere).await,
        403,
        ErrorCode::PermissionDenied,
    );
    // Reads by a reader; invoke by an invoker gets past authorization (no proxy here).
    assert_eq!(reader.function("f").await.unwrap().tenant, "team-a");
    refused(
        invoker.invoke("f", &b"x"[..], None).await,
        503,
        ErrorCode::Unavailable,
    );
    refused(
        reader.invoke("f", &b"x"[..], None).await,
        403,
        ErrorCode::PermissionDenied,
    );
    // Pools are the cluster's: even a tenant's admin may read but not write them.
    let pool =
        serde_json::from_value(json!({"name": "p", "cpu_milli": 1000, "mem_mib": 1024})).unwrap();
    refused(
        admin.create_pool(&pool).await,
        403,
        ErrorCode::PermissionDenied,
    );
    refused(
        admin.delete_pool("p").await,
        403,
        ErrorCode::PermissionDenied,
    );
    assert!(invoker.pools().await.unwrap().is_empty());
    c.shutdown().await;
}

#[tokio::test]
async fn another_tenants_function_is_as_absent() {
    let (c, store, op) = start().await;
    let a = c.http_addr();
    let team_a = client(a, &issue(store.as_ref(), "team-a", Role::Admin).await);
    let team_b = client(a, &issue(store.as_ref(), "team-b", Role::Admin).await);
    let fa = team_a.create_function(&spec("fa", 1)).await.unwrap();
    team_b.create_function(&spec("fb", 1)).await.unwrap();
    for (f, id) in [("fa", "fa-1"), ("fb", "fb-1")] {
        let rec = json!({"id": id, "function": f, "node": "n1", "state": "running"});
        store
            .put(
                &shoal_meta::records::instance_key(f, id),
                rec.to_string().into_bytes(),
                None,
            )
            .await
            .unwrap();
    }

    // Every call on team-a's function by team-b answers as for a function that does not
    // exist: same status, same code, same message.
    fn absent<T: std::fmt::Debug>(r: Result<T, shoal_control_client::ClientError>, name: &str) {
        let msg = refused(r, 404, ErrorCode::NotFound);
        assert_eq!(msg, format!("function `{name}` not found"));
    }
    absent(team_b.function("fa").await, "fa");
    absent(team_b.function("nope").await, "nope");
    absent(team_b.update_function("fa", &fa).await, "fa");
    absent(team_b.delete_function("fa").await, "fa");
    absent(team_b.instances(Some("fa")).await, "fa");
    absent(team_b.logs("fa", None).await, "fa");
    absent(team_b.invoke("fa", &b"x"[..], None).await, "fa");
    // A name is cluster-unique: taking it answers 409 and nothing more.
    let msg = refused(
        team_b.create_function(&spec("fa", 1)).await,
        409,
        ErrorCode::AlreadyExists,
    );
    assert!(!msg.contains("team-a"), "{msg}");

    // Listings hold the caller's tenant only.
    let names = |fs: Vec<FunctionSpec>| fs.into_iter().map(|f| f.name).collect::<Vec<_>>();
    assert_eq!(names(team_b.functions().await.unwrap()), ["fb"]);
    let insts = team_b.instances(None).await.unwrap();
    assert_eq!(insts.len(), 1);
    assert_eq!(insts[0].function, "fb");
    // Asking for another tenant's listing gives nothing.
    let r = get(
        a,
        Some(&issue(store.as_ref(), "team-b", Role::Reader).await),
        "/v1/functions?tenant=team-a",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["functions"], json!([]));

    // team-a's function is untouched, and its owner still reaches it.
    assert_eq!(team_a.function("fa").await.unwrap(), fa);
    // The operator sees every tenant, or one.
    let operator = client(a, &op);
    assert_eq!(names(operator.functions().await.unwrap()), ["fa", "fb"]);
    let r = get(a, Some(&op), "/v1/functions?tenant=team-a").await;
    assert_eq!(r.json()["functions"][0]["name"], "fa");
    assert_eq!(operator.instances(None).await.unwrap().len(), 2);
    let r = get(a, Some(&op), "/v1/instances?tenant=team-b").await;
    assert_eq!(r.json()["instances"][0]["function"], "fb");
    get(a, Some(&op), "/v1/functions?tenant=Bad_Tenant")
        .await
        .error(400, "InvalidArgument");
    c.shutdown().await;
}

#[tokio::test]
async fn the_operators_functions_go_to_the_default_tenant() {
    let (c, _store, op) = start().await;
    let api = client(c.http_addr(), &op);
    let f = api.create_function(&spec("mine", 1)).await.unwrap();
    assert_eq!(f.tenant, DEFAULT_TENANT);
    let mut theirs = spec("theirs", 1);
    theirs.tenant = "team-x".into();
    assert_eq!(api.create_function(&theirs).await.unwrap().tenant, "team-x");
    // A function never changes tenant.
    let mut moved = api.function("mine").await.unwrap();
    moved.tenant = "team-x".into();
    let msg = refused(
        api.update_function("mine", &moved).await,
        400,
        ErrorCode::InvalidArgument,
    );
    assert!(msg.contains("tenant"), "{msg}");
    let me = api.whoami().await.unwrap();
    assert_eq!(
        (me.tenant.as_str(), me.role, me.home_tenant.as_str()),
        (SYSTEM_TENANT, Role::Admin, DEFAULT_TENANT)
    );
    c.shutdown().await;
}

#[tokio::test]
async fn a_revoked_token_stops_working_within_a_second() {
    let (c, store, op) = start().await;
    let a = c.http_addr();
    let operator = client(a, &op);
    let issued = operator
        .create_token(&TokenRequest {
            tenant: Some("team-a".into()),
            role: Role::Deployer,
            description: Some("ci".into()),
            ttl_secs: None,
        })
        .await
        .unwrap();
    let victim = client(a, &issued.token);
    wait_until("the new token works", || async {
        victim.functions().await.is_ok()
    })
    .await;
    operator.revoke_token(&issued.record.id).await.unwrap();
    shoal_devcluster::wait::wait_for_async(
        "the revoked token to be refused",
        Duration::from_secs(1),
        || async {
            victim
                .functions()
                .await
                .err()
                .filter(|e| e.code() == Some(ErrorCode::Unauthenticated))
        },
    )
    .await
    .unwrap();
    refused(
        victim.create_function(&spec("late", 1)).await,
        401,
        ErrorCode::Unauthenticated,
    );
    assert!(stored_functions(&store).await.is_empty());
    // Revoked twice: gone.
    refused(
        operator.revoke_token(&issued.record.id).await,
        404,
        ErrorCode::NotFound,
    );
    c.shutdown().await;
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let (c, store, op) = start().await;
    let a = c.http_addr();
    // Issued with a lifetime of one second through the API: it works, then it does not.
    let issued = client(a, &op)
        .create_token(&TokenRequest {
            tenant: None,
            role: Role::Reader,
            description: None,
            ttl_secs: Some(1),
        })
        .await
        .unwrap();
    assert!(issued.record.expires_ms.is_some());
    let short = client(a, &issued.token);
    wait_until("the short-lived token expires", || async {
        short.functions().await.err().and_then(|e| e.code()) == Some(ErrorCode::Unauthenticated)
    })
    .await;
    // One that expired before it was ever used.
    let gone = shoal_meta::issue_token(
        store.as_ref(),
        "team-a",
        Role::Admin,
        "",
        Some(Duration::from_millis(1)),
    )
    .await
    .unwrap();
    wait_until("an expired token is refused", || async {
        client(a, &gone.token)
            .functions()
            .await
            .err()
            .and_then(|e| e.code())
            == Some(ErrorCode::Unauthenticated)
    })
    .await;
    c.shutdown().await;
}

#[tokio::test]
async fn a_quota_exceeded_by_one_instance_is_refused_and_changes_nothing() {
    let (c, store, op) = start().await;
    let a = c.http_addr();
    let operator = client(a, &op);
    let team = client(a, &issue(store.as_ref(), "team-q", Role::Deployer).await);
    // Only the operator sets quotas.
    let quota = Quota {
        instances: Some(4),
        cpu_milli: Some(10_000),
        ..Quota::default()
    };
    refused(
        team.set_quota("team-q", &quota).await,
        403,
        ErrorCode::PermissionDenied,
    );
    let set = operator.set_quota("team-q", &quota).await.unwrap();
    assert_eq!((set.quota, set.usage.instances), (quota.clone(), 0));

    team.create_function(&spec("f1", 3)).await.unwrap();
    // One instance too many: 429, and nothing stored.
    let msg = refused(
        team.create_function(&spec("f2", 2)).await,
        429,
        ErrorCode::QuotaExceeded,
    );
    assert!(msg.contains("instances"), "{msg}");
    refused(team.function("f2").await, 404, ErrorCode::NotFound);
    assert_eq!(stored_functions(&store).await, ["functions/f1"]);
    // Exactly at the limit is fine.
    team.create_function(&spec("f2", 1)).await.unwrap();
    // An update that grows past it is refused and leaves the stored version.
    let mut f1 = team.function("f1").await.unwrap();
    f1.max_instances = 4;
    refused(
        team.update_function("f1", &f1).await,
        429,
        ErrorCode::QuotaExceeded,
    );
    assert_eq!(team.function("f1").await.unwrap().max_instances, 3);
    // Shrinking is always allowed, even under a lowered quota.
    operator
        .set_quota(
            "team-q",
            &Quota {
                instances: Some(1),
                ..Quota::default()
            },
        )
        .await
        .unwrap();
    f1.max_instances = 2;
    assert_eq!(team.update_function("f1", &f1).await.unwrap().version, 2);

    // Use against quota, for the tenant and the operator; another tenant sees nothing.
    let status = team.quota("team-q").await.unwrap();
    assert_eq!(
        (
            status.usage.instances,
            status.usage.cpu_milli,
            status.usage.mem_mib
        ),
        (3, 1500, 768)
    );
    assert_eq!(operator.quota("team-q").await.unwrap(), status);
    let other = client(a, &issue(store.as_ref(), "team-o", Role::Admin).await);
    refused(other.quota("team-q").await, 404, ErrorCode::NotFound);
    // Quotas of other tenants do not count.
    other.create_function(&spec("o1", 50)).await.unwrap();
    // A bad quota is refused.
    let r = send_json(
        a,
        Some(&op),
        "PUT",
        "/v1/tenants/team-q/quota",
        &json!({"instances": u64::MAX}),
    )
    .await;
    r.error(400, "InvalidArgument");
    let r = send_json(
        a,
        Some(&op),
        "PUT",
        "/v1/tenants/team-q/quota",
        &json!({"bogus": 1}),
    )
    .await;
    r.error(400, "InvalidArgument");
    c.shutdown().await;
}

#[tokio::test]
async fn token_routes_keep_each_tenant_to_itself() {
    let (c, store, op) = start().await;
    let a = c.http_addr();
    let team_admin = client(a, &issue(store.as_ref(), "team-a", Role::Admin).await);
    let deployer = client(a, &issue(store.as_ref(), "team-a", Role::Deployer).await);
    let b_admin = client(a, &issue(store.as_ref(), "team-b", Role::Admin).await);
    let req = |tenant: Option<&str>, role| TokenRequest {
        tenant: tenant.map(str::to_string),
        role,
        description: Some("t".into()),
        ttl_secs: None,
    };

    // A tenant's admin issues any role in its own tenant (the default)...
    let own = team_admin
        .create_token(&req(None, Role::Admin))
        .await
        .unwrap();
    assert_eq!(
        (own.record.tenant.as_str(), own.record.role),
        ("team-a", Role::Admin)
    );
    team_admin
        .create_token(&req(Some("team-a"), Role::Reader))
        .await
        .unwrap();
    // ...but never in another tenant or the system tenant.
    for t in ["team-b", SYSTEM_TENANT] {
        refused(
            team_admin.create_token(&req(Some(t), Role::Reader)).await,
            403,
            ErrorCode::PermissionDenied,
        );
    }
    // Other roles manage no tokens.
    refused(
        deployer.create_token(&req(None, Role::Reader)).await,
        403,
        ErrorCode::PermissionDenied,
    );
    refused(
        deployer.tokens(None).await,
        403,
        ErrorCode::PermissionDenied,
    );
    // Bad requests.
    for body in [
        json!({"role": "root"}),
        json!({"role": "reader", "ttl_secs": 0}),
        json!({"role": "reader", "tenant": "Bad"}),
        json!({"role": "reader", "extra": 1}),
    ] {
        send_json(a, Some(&op), "POST", "/v1/tokens", &body)
            .await
            .error(400, "InvalidArgument");
    }

    // Listings: the caller's tenant, without secrets or hashes.
    let listed = team_admin.tokens(None).await.unwrap();
    assert!(listed.iter().all(|t| t.tenant == "team-a"), "{listed:?}");
    assert!(listed.iter().any(|t| t.id == own.record.id));
    let raw = get(a, Some(&op), "/v1/tokens").await;
    assert_eq!(raw.status, 200);
    let text = raw.text();
    assert!(
        !text.contains("secret") && !text.contains("shoal_"),
        "{text}"
    );
    assert!(!text.contains(own.token.rsplit('_').next().unwrap()));
    // The operator sees every tenant's, or one's.
    let all = client(a, &op).tokens(None).await.unwrap();
    assert!(all.iter().any(|t| t.tenant == "team-b"));
    let only_b = client(a, &op).tokens(Some("team-b")).await.unwrap();
    assert!(!only_b.is_empty() && only_b.iter().all(|t| t.tenant == "team-b"));
    // And the operator issues for any tenant.
    let for_b = client(a, &op)
        .create_token(&req(Some("team-b"), Role::Invoker))
        .await
        .unwrap();

    // Another tenant's token cannot be revoked: 404, as a missing one; it keeps working.
    let msg = refused(
        team_admin.revoke_token(&for_b.record.id).await,
        404,
        ErrorCode::NotFound,
    );
    assert_eq!(msg, format!("token `{}` not found", for_b.record.id));
    refused(
        team_admin.revoke_token("not-an-id").await,
        400,
        ErrorCode::InvalidArgument,
    );
    let b_invoker = client(a, &for_b.token);
    wait_until("the operator's token for team-b works", || async {
        b_invoker.whoami().await.is_ok()
    })
    .await;
    b_admin.revoke_token(&for_b.record.id).await.unwrap();
    c.shutdown().await;
}

#[tokio::test]
async fn metrics_off_loopback_need_a_system_token() {
    let store: Arc<dyn MetaStore> = Arc::new(MemStore::open(None, "").unwrap());
    let op = issue(store.as_ref(), SYSTEM_TENANT, Role::Reader).await;
    let tenant = issue(store.as_ref(), "team-a", Role::Admin).await;
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let mut cfg = config(DEFAULT_MAX_INVOKE_BODY);
    cfg.http_addr = "0.0.0.0:0".parse().unwrap();
    let c = shoal_control::Control::start(cfg, store.clone(), Some(recorder.handle()))
        .await
        .unwrap();
    let a = std::net::SocketAddr::from(([127, 0, 0, 1], c.http_addr().port()));
    get(a, None, "/metrics").await.error(401, "Unauthenticated");
    get(a, Some(&tenant), "/metrics")
        .await
        .error(403, "PermissionDenied");
    let r = get(a, Some(&op), "/metrics").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get(a, None, "/health").await.status, 200);
    c.shutdown().await;

    // On loopback, /metrics is open.
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let c = shoal_control::Control::start(
        config(DEFAULT_MAX_INVOKE_BODY),
        store,
        Some(recorder.handle()),
    )
    .await
    .unwrap();
    assert_eq!(get(c.http_addr(), None, "/metrics").await.status, 200);
    c.shutdown().await;
}

#[tokio::test]
async fn the_admin_token_file_holds_a_working_operator_token() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rt").join("admin.token");
    let store: Arc<dyn MetaStore> = Arc::new(MemStore::open(None, "").unwrap());
    let mut cfg = config(DEFAULT_MAX_INVOKE_BODY);
    cfg.admin_token_file = Some(file.clone());
    let c = start_cfg(cfg.clone(), store.clone()).await;
    assert_eq!(c.admin_token().await, AdminTokenState::Ready);
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let token = std::fs::read_to_string(&file).unwrap().trim().to_string();
    let me = client(c.http_addr(), &token).whoami().await.unwrap();
    assert_eq!((me.tenant.as_str(), me.role), (SYSTEM_TENANT, Role::Admin));
    c.shutdown().await;

    // A restart keeps a token that still works.
    let c = start_cfg(cfg.clone(), store.clone()).await;
    assert_eq!(c.admin_token().await, AdminTokenState::Ready);
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), token);
    c.shutdown().await;

    // Another store (the old token unknown there): a new one replaces it.
    let fresh: Arc<dyn MetaStore> = Arc::new(MemStore::open(None, "").unwrap());
    let c = start_cfg(cfg.clone(), fresh).await;
    assert_eq!(c.admin_token().await, AdminTokenState::Ready);
    let renewed = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert_ne!(renewed, token);
    client(c.http_addr(), &renewed).whoami().await.unwrap();
    c.shutdown().await;

    // A directory others may write to is refused, and no token is issued.
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    cfg.admin_token_file = Some(open.join("admin.token"));
    let empty: Arc<dyn MetaStore> = Arc::new(MemStore::open(None, "").unwrap());
    let c = start_cfg(cfg, empty.clone()).await;
    assert!(matches!(
        c.admin_token().await,
        AdminTokenState::Failed(e) if e.contains("others may write")
    ));
    assert!(!open.join("admin.token").exists());
    assert!(empty.range("tokens/").await.unwrap().0.is_empty());
    c.shutdown().await;
}

/// Control reads logs from the agents on the caller's behalf: it forwards the caller's own
/// token, so the agent grants no more than that token may read.
#[tokio::test]
async fn log_requests_to_agents_carry_the_callers_token() {
    let (c, store, _op) = start().await;
    let a = c.http_addr();
    let token = issue(store.as_ref(), "team-a", Role::Reader).await;
    let deployer = client(a, &issue(store.as_ref(), "team-a", Role::Deployer).await);
    deployer.create_function(&spec("f", 1)).await.unwrap();
    // A stand-in agent that records the request it gets.
    let agent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_addr = agent.local_addr().unwrap();
    let seen = tokio::spawn(async move {
        let (mut s, _) = agent.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the request ended early");
            head.extend_from_slice(&buf[..n]);
        }
        let body = r#"{"stdout":"hi\n","stderr":""}"#;
        let answer = format!(
            "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(answer.as_bytes()).await.unwrap();
        String::from_utf8(head).unwrap()
    });
    let agent_rec = json!({"node_id": "n1", "cpu_milli": 1000, "mem_total_mib": 1024, "logs_addr": agent_addr.to_string()});
    store
        .put(
            &shoal_meta::records::agent_key("n1"),
            agent_rec.to_string().into_bytes(),
            None,
        )
        .await
        .unwrap();
    let inst = json!({"id": "f-1", "function": "f", "node": "n1", "state": "running"});
    store
        .put(
            &shoal_meta::records::instance_key("f", "f-1"),
            inst.to_string().into_bytes(),
            None,
        )
        .await
        .unwrap();
    let logs = client(a, &token).logs("f", Some(100)).await.unwrap();
    assert_eq!(logs[0].stdout.as_deref(), Some("hi\n"), "{logs:?}");
    let head = seen.await.unwrap();
    assert!(
        head.contains(&format!("Authorization: Bearer {token}\r\n")),
        "{head}"
    );
    c.shutdown().await;
}
