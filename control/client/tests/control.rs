//! Every client call against a real control (in-process, `MemStore`, HTTP on 127.0.0.1:0),
//! the answers decoded into records and the refusals into their stable `ErrorCode`.
#![allow(clippy::unwrap_used)]

use serde_json::json;
use shoal_control::{Control, ControlConfig};
use shoal_control_client::{
    ClientError, ControlClient, ControlRole, ErrorCode, FunctionSpec, Pool,
};
use shoal_meta::MemStore;
use std::sync::Arc;
use std::time::Duration;

async fn leading_control() -> Control {
    let store = Arc::new(MemStore::open(None, "").unwrap());
    let config = ControlConfig {
        meta_addr: None,
        meta_tls: None,
        http_addr: "127.0.0.1:0".parse().unwrap(),
        election_ttl: Duration::from_secs(2),
        name: "client-test".into(),
        max_invoke_body: 1024,
        frontend: Default::default(),
    };
    let c = Control::start(config, store, None).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !c.is_leader() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never became leader"
        );
        // The poll interval: control announces no change of role.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c
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
    let control = leading_control().await;
    let c = ControlClient::new(&control.http_addr().to_string()).unwrap();

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
