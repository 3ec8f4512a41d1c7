//! Every client call against a real control (in-process, `MemStore`, HTTP on 127.0.0.1:0),
//! the answers decoded into records and the refusals into their stable `ErrorCode`; and a
//! token found the way the CLI finds it.
#![allow(clippy::unwrap_used)]

use serde_json::json;
use shoal_control::{Control, ControlConfig};
use shoal_control_client::{
    find_token, ClientError, ControlClient, ControlRole, ErrorCode, FunctionSpec, Pool, Quota,
    Role, TokenRequest, TokenSource,
};
use shoal_meta::MemStore;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

fn config(admin_token_file: Option<PathBuf>) -> ControlConfig {
    ControlConfig {
        meta_addr: None,
        meta_tls: None,
        http_addr: "127.0.0.1:0".parse().unwrap(),
        election_ttl: Duration::from_secs(2),
        name: "client-test".into(),
        max_invoke_body: 1024,
        frontend: Default::default(),
        admin_token_file,
    }
}

/// A leading control and an operator token issued on its store.
async fn leading_control() -> (Control, String) {
    let store = Arc::new(MemStore::open(None, "").unwrap());
    let admin = shoal_meta::issue_token(
        store.as_ref(),
        shoal_meta::records::SYSTEM_TENANT,
        Role::Admin,
        "test",
        None,
    )
    .await
    .unwrap()
    .token;
    let c = Control::start(config(None), store, None).await.unwrap();
    shoal_devcluster::wait::wait_for_async("leader", Duration::from_secs(10), || async {
        c.is_leader().then_some(())
    })
    .await
    .unwrap();
    (c, admin)
}

fn spec(name: &str) -> FunctionSpec {
    serde_json::from_value(json!({
        "name": name,
        "code": {"kind": "dir", "path": "/srv/fn"},
        "command": ["python3", "main.py"],
        "resources": {"cpu_milli": 500, "mem_mib": 256},
        "max_instances": 4,
    }))
    .unwrap()
}

/// The code of a refusal; panics on any other outcome.
fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (ErrorCode, String) {
    match r {
        Err(ClientError::Api { code, message, .. }) => (code, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn every_call_against_a_real_control() {
    let (control, admin) = leading_control().await;
    let c = ControlClient::new(&control.http_addr().to_string())
        .unwrap()
        .with_token(&admin)
        .unwrap();
    assert!(
        !format!("{c:?}").contains(&admin),
        "the token leaks into debug output"
    );
    // Without the token: refused, health excepted.
    let anonymous = ControlClient::new(&control.http_addr().to_string()).unwrap();
    anonymous.health().await.unwrap();
    let (k, _) = code(anonymous.functions().await);
    assert_eq!(k, ErrorCode::Unauthenticated);

    let h = c.health().await.unwrap();
    assert_eq!((h.status.as_str(), h.name.as_str()), ("ok", "client-test"));
    assert_eq!(h.role, ControlRole::Leader);
    let l = c.leader().await.unwrap();
    assert_eq!((l.role, l.leader), (ControlRole::Leader, None));
    let n = c.nodes().await.unwrap();
    assert_eq!(n.role, ControlRole::Leader);
    assert!(n.nodes.is_empty());

    // Functions.
    let created = c.create_function(&spec("hello")).await.unwrap();
    assert_eq!((created.name.as_str(), created.version), ("hello", 1));
    let (k, msg) = code(c.create_function(&spec("hello")).await);
    assert_eq!(k, ErrorCode::AlreadyExists, "{msg}");
    let mut bad = spec("bad");
    bad.resources.cpu_milli = 0;
    let (k, msg) = code(c.create_function(&bad).await);
    assert_eq!(k, ErrorCode::InvalidArgument);
    assert!(msg.contains("cpu_milli"), "{msg}");
    c.create_function(&spec("bye")).await.unwrap();
    assert_eq!(c.function("hello").await.unwrap(), created);
    let (k, _) = code(c.function("ghost").await);
    assert_eq!(k, ErrorCode::NotFound);
    let names: Vec<String> = c
        .functions()
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(names, ["bye", "hello"]);

    let mut next = created.clone();
    next.concurrency = 16;
    let updated = c.update_function("hello", &next).await.unwrap();
    assert_eq!((updated.version, updated.concurrency), (2, 16));
    let (k, msg) = code(c.update_function("hello", &next).await);
    assert_eq!(k, ErrorCode::AlreadyExists);
    assert!(msg.contains("version conflict"), "{msg}");
    // A name that is not one path segment stays one (and is refused as a name).
    let (k, _) = code(c.function("a/b").await);
    assert_ne!(k, ErrorCode::Unknown(0));

    // Instances and logs (no agents: none).
    assert!(c.instances(None).await.unwrap().is_empty());
    assert!(c.instances(Some("hello")).await.unwrap().is_empty());
    let (k, _) = code(c.instances(Some("ghost")).await);
    assert_eq!(k, ErrorCode::NotFound);
    assert!(c.logs("hello", Some(100)).await.unwrap().is_empty());
    let (k, _) = code(c.logs("ghost", None).await);
    assert_eq!(k, ErrorCode::NotFound);

    // Invoke: refusals (running a call needs a node; the CLI's cluster tests do that).
    let (k, _) = code(c.invoke("ghost", &b"x"[..], None).await);
    assert_eq!(k, ErrorCode::NotFound);
    let (k, msg) = code(c.invoke("hello", &b"x"[..], Some(Duration::ZERO)).await);
    assert_eq!(k, ErrorCode::InvalidArgument);
    assert!(msg.contains("timeout_ms"), "{msg}");
    let (k, _) = code(c.invoke("hello", vec![7u8; 1025], None).await);
    assert_eq!(k, ErrorCode::TooLarge);
    let (k, msg) = code(c.invoke("hello", &b"x"[..], None).await);
    assert_eq!(k, ErrorCode::Unavailable);
    assert!(msg.contains("no proxy"), "{msg}");

    c.delete_function("hello").await.unwrap();
    let (k, _) = code(c.delete_function("hello").await);
    assert_eq!(k, ErrorCode::NotFound);

    // Pools.
    let pool: Pool = serde_json::from_value(json!({
        "name": "gpu", "node_selector": {"gpu": "yes"}, "cpu_milli": 4000, "mem_mib": 8192,
    }))
    .unwrap();
    assert_eq!(c.create_pool(&pool).await.unwrap(), pool);
    let (k, _) = code(c.create_pool(&pool).await);
    assert_eq!(k, ErrorCode::AlreadyExists);
    assert_eq!(c.pool("gpu").await.unwrap(), pool);
    assert_eq!(c.pools().await.unwrap(), [pool]);
    c.delete_pool("gpu").await.unwrap();
    let (k, _) = code(c.pool("gpu").await);
    assert_eq!(k, ErrorCode::NotFound);
    assert!(c.pools().await.unwrap().is_empty());

    // Who am I, tokens and quotas.
    let me = c.whoami().await.unwrap();
    assert_eq!(
        (me.tenant.as_str(), me.home_tenant.as_str()),
        ("system", "default")
    );
    let issued = c
        .create_token(&TokenRequest {
            tenant: Some("team-a".into()),
            role: Role::Reader,
            description: Some("dashboards".into()),
            ttl_secs: Some(3600),
        })
        .await
        .unwrap();
    assert!(!format!("{issued:?}").contains(&issued.token));
    assert_eq!(issued.record.description, "dashboards");
    let listed = c.tokens(Some("team-a")).await.unwrap();
    assert_eq!(listed, std::slice::from_ref(&issued.record));
    c.revoke_token(&issued.record.id).await.unwrap();
    let (k, _) = code(c.revoke_token(&issued.record.id).await);
    assert_eq!(k, ErrorCode::NotFound);
    let q = Quota {
        instances: Some(10),
        ..Quota::default()
    };
    let status = c.set_quota("default", &q).await.unwrap();
    assert_eq!((status.quota, status.usage.instances), (q, 4));
    assert_eq!(c.quota("default").await.unwrap().tenant, "default");
    let (k, _) = code(
        c.create_function(&{
            let mut s = spec("big");
            s.max_instances = 7;
            s
        })
        .await,
    );
    assert_eq!(k, ErrorCode::QuotaExceeded);

    control.shutdown().await;
}

/// The admin token control writes is the one a client finds by itself, through
/// `SHOAL_TOKEN_FILE` or in the runtime directory.
#[tokio::test]
async fn a_client_finds_the_admin_token_control_writes() {
    let xdg = tempfile::tempdir().unwrap();
    let file = xdg.path().join("shoal").join("admin.token");
    let store = Arc::new(MemStore::open(None, "").unwrap());
    let control = Control::start(config(Some(file.clone())), store, None)
        .await
        .unwrap();
    assert_eq!(
        control.admin_token().await,
        shoal_control::AdminTokenState::Ready
    );
    let xdg_s = OsString::from(xdg.path());
    let by_default = move |k: &str| (k == "XDG_RUNTIME_DIR").then(|| xdg_s.clone());
    let found = find_token(None, &by_default).unwrap().unwrap();
    assert_eq!(found.source, TokenSource::Default(file.clone()));
    let file_s = OsString::from(&file);
    let named = move |k: &str| (k == "SHOAL_TOKEN_FILE").then(|| file_s.clone());
    let also = find_token(None, &named).unwrap().unwrap();
    assert_eq!(also.token, found.token);
    let c = ControlClient::new(&control.http_addr().to_string())
        .unwrap()
        .with_token(&found.token)
        .unwrap();
    assert_eq!(c.whoami().await.unwrap().role, Role::Admin);
    control.shutdown().await;
}

#[tokio::test]
async fn transport_failures_are_typed() {
    // Nobody listens: a transport error, not an API one.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let c = ControlClient::new(&format!("http://{closed}")).unwrap();
    let e = c.health().await.unwrap_err();
    assert!(matches!(e, ClientError::Transport { .. }), "{e:?}");
    assert_eq!(e.code(), None);

    // A listener that never answers: the request's deadline.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let c = ControlClient::new(&addr.to_string())
        .unwrap()
        .with_timeout(Duration::from_millis(200));
    let e = c.functions().await.unwrap_err();
    assert!(matches!(e, ClientError::Timeout { .. }), "{e:?}");
    drop(silent);
}

#[test]
fn addresses_are_checked() {
    for bad in ["ftp://h:1", "h:1/v1", "http://", ""] {
        let e = ControlClient::new(bad).unwrap_err();
        assert!(
            matches!(e, ClientError::InvalidAddress { .. }),
            "{bad}: {e:?}"
        );
    }
    let c = ControlClient::new("127.0.0.1:7070/").unwrap();
    assert_eq!(c.base(), "http://127.0.0.1:7070");
}
