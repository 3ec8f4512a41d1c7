//! The REST API against a real control process on 127.0.0.1:0 with a `MemStore`, called with
//! an operator token. Ordinary calls go through `shoal-control-client`; requests the client
//! cannot or would not send (malformed JSON, over-limit and chunked bodies, garbage, unknown
//! routes and methods, a header the client does not expose) are written by hand over a TCP
//! socket. The attacks on authentication and tenancy are in `auth.rs`.
#![allow(clippy::unwrap_used)]

mod support;

use serde_json::{json, Value};
use shoal_control::{Control, DEFAULT_MAX_INVOKE_BODY};
use shoal_control_client::{ControlRole, ErrorCode, FunctionSpec, InstanceRecord, Pool};
use shoal_meta::records::{Role, SYSTEM_TENANT};
use shoal_meta::{MemStore, MetaStore};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `spec(name)` as the record.
fn typed(v: Value) -> FunctionSpec {
    serde_json::from_value(v).unwrap()
}

fn spec(name: &str) -> Value {
    json!({
        "name": name,
        "code": {"kind": "dir", "path": "/srv/fn"},
        "command": ["python3", "main.py"],
        "env": {"MODE": "test"},
        "resources": {"cpu_milli": 500, "mem_mib": 256},
        "max_instances": 4,
        "concurrency": 8,
        "labels": {"team": "a"},
        "affinity": ["other"],
    })
}

#[tokio::test]
async fn function_lifecycle() {
    let (c, _store, admin) = start().await;
    let api = client(c.http_addr(), &admin);

    let created = api.create_function(&typed(spec("hello"))).await.unwrap();
    assert_eq!(created.version, 1);
    assert_eq!(created.name, "hello");
    assert_eq!(created.min_instances, 0);
    assert_eq!(api.function("hello").await.unwrap(), created);

    api.create_function(&typed(spec("bye"))).await.unwrap();
    let names: Vec<String> = api
        .functions()
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(names, ["bye", "hello"]);

    // Update based on version 1: stored as version 2.
    let mut next = created.clone();
    next.concurrency = 16;
    let updated = api.update_function("hello", &next).await.unwrap();
    assert_eq!((updated.version, updated.concurrency), (2, 16));
    assert_eq!(api.function("hello").await.unwrap().version, 2);

    // The same stale update again: conflict.
    let msg = refused(
        api.update_function("hello", &next).await,
        409,
        ErrorCode::AlreadyExists,
    );
    assert!(msg.contains("version conflict"), "{msg}");
    // Without a version: invalid.
    let mut unversioned = next.clone();
    unversioned.version = 0;
    let msg = refused(
        api.update_function("hello", &unversioned).await,
        400,
        ErrorCode::InvalidArgument,
    );
    assert!(msg.contains("version"), "{msg}");
    // Body name differs from the path.
    let msg = refused(
        api.update_function("bye", &next).await,
        400,
        ErrorCode::InvalidArgument,
    );
    assert!(msg.contains("`name`"), "{msg}");
    // Update of a missing function.
    let mut ghost = next.clone();
    ghost.name = "ghost".into();
    refused(
        api.update_function("ghost", &ghost).await,
        404,
        ErrorCode::NotFound,
    );

    // The answer names what was deleted (the client only checks it is JSON).
    let del = request(
        c.http_addr(),
        Some(&admin),
        "DELETE",
        "/v1/functions/hello",
        b"",
    )
    .await;
    assert_eq!(del.status, 200, "{}", del.text());
    assert_eq!(del.json()["deleted"], "hello");
    refused(api.function("hello").await, 404, ErrorCode::NotFound);
    refused(api.delete_function("hello").await, 404, ErrorCode::NotFound);
    api.delete_function("bye").await.unwrap();
    c.shutdown().await;
}

#[tokio::test]
async fn duplicate_create_is_conflict() {
    let (c, _store, admin) = start().await;
    let api = client(c.http_addr(), &admin);
    api.create_function(&typed(spec("dup"))).await.unwrap();
    let msg = refused(
        api.create_function(&typed(spec("dup"))).await,
        409,
        ErrorCode::AlreadyExists,
    );
    assert!(msg.contains("dup"), "{msg}");
    c.shutdown().await;
}

#[tokio::test]
async fn invalid_specs_name_the_field() {
    let (c, _store, admin) = start().await;
    let a = c.http_addr();
    let cases: Vec<(Value, &str)> = vec![
        (
            {
                let mut s = spec("f");
                s["resources"]["cpu_milli"] = json!(0);
                s
            },
            "resources.cpu_milli",
        ),
        (
            {
                let mut s = spec("f");
                s["resources"]["mem_mib"] = json!(262_145);
                s
            },
            "resources.mem_mib",
        ),
        (
            {
                let mut s = spec("f");
                s["command"] = json!([]);
                s
            },
            "command",
        ),
        (
            {
                let mut s = spec("f");
                s["min_instances"] = json!(5);
                s
            },
            "min_instances",
        ),
        (
            {
                let mut s = spec("f");
                s["max_instances"] = json!(1001);
                s
            },
            "max_instances",
        ),
        (
            {
                let mut s = spec("f");
                s["concurrency"] = json!(0);
                s
            },
            "concurrency",
        ),
        (spec("Bad_Name"), "name"),
        (spec("9lives"), "name"),
        (
            {
                let mut s = spec("f");
                s["digest"] = json!("md5:abc");
                s
            },
            "digest",
        ),
        (
            {
                let mut s = spec("f");
                s["code"] = json!({"kind": "s3", "url": "https://x"});
                s
            },
            "code.url",
        ),
        (
            {
                let mut s = spec("f");
                s["anti_affinity"] = json!(["UPPER"]);
                s
            },
            "anti_affinity[0]",
        ),
        // serde names the field for type errors, missing and unknown fields.
        (
            {
                let mut s = spec("f");
                s.as_object_mut().unwrap().remove("command");
                s
            },
            "command",
        ),
        (
            {
                let mut s = spec("f");
                s["replicas"] = json!(3);
                s
            },
            "replicas",
        ),
        (
            {
                let mut s = spec("f");
                s["code"] = json!({"kind": "ftp", "path": "/x"});
                s
            },
            "ftp",
        ),
    ];
    for (body, field) in cases {
        let msg = send_json(a, Some(&admin), "POST", "/v1/functions", &body)
            .await
            .error(400, "InvalidArgument");
        assert!(msg.contains(field), "{field}: {msg}");
    }
    let msg = request(a, Some(&admin), "POST", "/v1/functions", b"{\"name\": ")
        .await
        .error(400, "InvalidArgument");
    assert!(msg.contains("invalid JSON"), "{msg}");
    // Nothing was stored.
    assert!(client(a, &admin).functions().await.unwrap().is_empty());
    // An over-long JSON body.
    let big = vec![b' '; shoal_control::MAX_JSON_BODY + 1];
    request(a, Some(&admin), "POST", "/v1/functions", &big)
        .await
        .error(413, "TooLarge");
    // A bad name in the path.
    refused(
        client(a, &admin).function("No_Such").await,
        400,
        ErrorCode::InvalidArgument,
    );
    c.shutdown().await;
}

#[tokio::test]
async fn invoke_answers() {
    let store = Arc::new(MemStore::open(None, "").unwrap());
    let admin = issue(store.as_ref(), SYSTEM_TENANT, Role::Admin).await;
    let c = start_with(store, 1024).await;
    let api = client(c.http_addr(), &admin);
    let msg = refused(
        api.invoke("nope", &b"args"[..], None).await,
        404,
        ErrorCode::NotFound,
    );
    assert!(msg.contains("nope"), "{msg}");
    api.create_function(&typed(spec("f"))).await.unwrap();
    let msg = refused(
        api.invoke("f", vec![7u8; 1024], None).await,
        503,
        ErrorCode::Unavailable,
    );
    assert!(msg.contains("no proxy"), "{msg}");
    refused(
        api.invoke("f", vec![7u8; 1025], None).await,
        413,
        ErrorCode::TooLarge,
    );
    let msg = refused(
        api.invoke("f", &b"x"[..], Some(Duration::ZERO)).await,
        400,
        ErrorCode::InvalidArgument,
    );
    assert!(msg.contains("timeout_ms"), "{msg}");
    c.shutdown().await;
}

/// An over-limit body with the default limit, declared by Content-Length and also streamed
/// in chunks without a length: both 413, and the server keeps serving.
#[tokio::test]
async fn invoke_over_default_limit() {
    let (c, _store, admin) = start().await;
    let a = c.http_addr();
    client(a, &admin)
        .create_function(&typed(spec("f")))
        .await
        .unwrap();

    let mut s = TcpStream::connect(a).await.unwrap();
    let head = format!(
        "POST /v1/functions/f/invoke HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{}Content-Length: {}\r\n\r\n",
        auth_line(Some(&admin)),
        DEFAULT_MAX_INVOKE_BODY + 1
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    parse(&raw).error(413, "TooLarge");

    // Chunked, no declared length: the limit is found while reading.
    let s = TcpStream::connect(a).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let auth = auth_line(Some(&admin));
    let writer = tokio::spawn(async move {
        let head = format!("POST /v1/functions/f/invoke HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{auth}Transfer-Encoding: chunked\r\n\r\n");
        wr.write_all(head.as_bytes()).await?;
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..(DEFAULT_MAX_INVOKE_BODY / chunk.len() + 2) {
            wr.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .await?;
            wr.write_all(&chunk).await?;
            wr.write_all(b"\r\n").await?;
        }
        wr.write_all(b"0\r\n\r\n").await
    });
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut raw))
        .await
        .unwrap();
    parse(&raw).error(413, "TooLarge");
    let _ = writer.await;
    client(a, &admin).health().await.unwrap();
    c.shutdown().await;
}

#[tokio::test]
async fn pools_crud() {
    let (c, _store, admin) = start().await;
    let api = client(c.http_addr(), &admin);
    let pool: Pool = serde_json::from_value(
        json!({"name": "gpu", "node_selector": {"gpu": "a100"}, "cpu_milli": 64000, "mem_mib": 512000}),
    )
    .unwrap();
    assert_eq!(api.create_pool(&pool).await.unwrap(), pool);
    refused(api.create_pool(&pool).await, 409, ErrorCode::AlreadyExists);
    let empty: Pool =
        serde_json::from_value(json!({"name": "p", "cpu_milli": 0, "mem_mib": 1})).unwrap();
    let msg = refused(
        api.create_pool(&empty).await,
        400,
        ErrorCode::InvalidArgument,
    );
    assert!(msg.contains("cpu_milli"), "{msg}");
    assert_eq!(api.pool("gpu").await.unwrap(), pool);
    assert_eq!(api.pools().await.unwrap(), [pool]);
    api.delete_pool("gpu").await.unwrap();
    refused(api.pool("gpu").await, 404, ErrorCode::NotFound);
    refused(api.delete_pool("gpu").await, 404, ErrorCode::NotFound);
    assert!(api.pools().await.unwrap().is_empty());
    c.shutdown().await;
}

#[tokio::test]
async fn instances_are_read_from_the_store() {
    let (c, store, admin) = start().await;
    let api = client(c.http_addr(), &admin);
    api.create_function(&typed(spec("f"))).await.unwrap();
    api.create_function(&typed(spec("f-2"))).await.unwrap();
    let rec = |f: &str, id: &str, state: &str| json!({"id": id, "function": f, "node": "n1", "state": state, "reason": null, "pid": 42});
    for (f, id, state) in [
        ("f", "i1", "running"),
        ("f", "i2", "starting"),
        ("f-2", "j1", "failed"),
    ] {
        store
            .put(
                &shoal_meta::records::instance_key(f, id),
                rec(f, id, state).to_string().into_bytes(),
                None,
            )
            .await
            .unwrap();
    }
    store
        .put(
            &shoal_meta::records::instance_key("f", "garbage"),
            b"not json".to_vec(),
            None,
        )
        .await
        .unwrap();
    // `f`'s prefix must not pick up `f-2`'s instances.
    let mine = api.instances(Some("f")).await.unwrap();
    let want: Vec<InstanceRecord> = [rec("f", "i1", "running"), rec("f", "i2", "starting")]
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
    assert_eq!(mine, want);
    assert_eq!(api.instances(None).await.unwrap().len(), 3);
    refused(api.instances(Some("ghost")).await, 404, ErrorCode::NotFound);
    c.shutdown().await;
}

#[tokio::test]
async fn state_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.json");
    let admin;
    {
        let store = Arc::new(MemStore::open(Some(&path), "").unwrap());
        admin = issue(store.as_ref(), SYSTEM_TENANT, Role::Admin).await;
        let c = start_with(store.clone(), DEFAULT_MAX_INVOKE_BODY).await;
        let api = client(c.http_addr(), &admin);
        let mut next = api.create_function(&typed(spec("keep"))).await.unwrap();
        next.max_instances = 9;
        api.update_function("keep", &next).await.unwrap();
        let pool: Pool =
            serde_json::from_value(json!({"name": "p", "cpu_milli": 1000, "mem_mib": 1024}))
                .unwrap();
        api.create_pool(&pool).await.unwrap();
        c.shutdown().await;
        store.close().await;
    }
    let store = Arc::new(MemStore::open(Some(&path), "").unwrap());
    let c = start_with(store.clone(), DEFAULT_MAX_INVOKE_BODY).await;
    let api = client(c.http_addr(), &admin);
    let f = api.function("keep").await.unwrap();
    assert_eq!((f.version, f.max_instances), (2, 9));
    api.pool("p").await.unwrap();
    c.shutdown().await;
    store.close().await;
}

#[tokio::test]
async fn garbage_closes_only_that_connection() {
    let (c, _store, admin) = start().await;
    let a = c.http_addr();
    let mut s = TcpStream::connect(a).await.unwrap();
    // An idle, well-behaved connection stays usable meanwhile.
    let mut other = TcpStream::connect(a).await.unwrap();
    s.write_all(b"\x00\x01\x02 garbage \xff\xfe\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    if !raw.is_empty() {
        assert!(raw.starts_with(b"HTTP/1.1 400"), "{raw:?}");
    }
    other
        .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    other.read_to_end(&mut raw).await.unwrap();
    assert_eq!(parse(&raw).status, 200);
    client(a, &admin).health().await.unwrap();
    c.shutdown().await;
}

#[tokio::test]
async fn standby_refuses_writes_and_serves_reads() {
    let (leader, store, admin) = start().await;
    let standby = Control::start(config(DEFAULT_MAX_INVOKE_BODY), store.clone(), None)
        .await
        .unwrap();
    let s = standby.http_addr();
    let on_standby = client(s, &admin);
    wait_until("the second control says it is standby", || async {
        on_standby.leader().await.unwrap().role == ControlRole::Standby
    })
    .await;
    let msg = refused(
        on_standby.create_function(&typed(spec("f"))).await,
        503,
        ErrorCode::Unavailable,
    );
    assert!(
        msg.contains(&leader.http_addr().to_string()),
        "message should name the leader: {msg}"
    );
    refused(
        on_standby.delete_pool("x").await,
        503,
        ErrorCode::Unavailable,
    );
    // The write goes through the leader and the standby reads it.
    client(leader.http_addr(), &admin)
        .create_function(&typed(spec("f")))
        .await
        .unwrap();
    on_standby.function("f").await.unwrap();
    // The role header is not part of the client's answers: read it by hand.
    let read = get(s, Some(&admin), "/v1/functions/f").await;
    assert_eq!(read.status, 200);
    assert_eq!(read.header("x-shoal-role"), Some("standby"));
    standby.shutdown().await;
    leader.shutdown().await;
}

#[tokio::test]
async fn unknown_routes_and_methods() {
    let (c, _store, admin) = start().await;
    let a = c.http_addr();
    get(a, Some(&admin), "/v1/nothing")
        .await
        .error(404, "NotFound");
    get(a, Some(&admin), "/v1/functions/")
        .await
        .error(404, "NotFound");
    let r = request(a, Some(&admin), "PATCH", "/v1/functions/f", b"{}").await;
    r.error(405, "InvalidArgument");
    assert_eq!(r.header("allow"), Some("GET, PUT, DELETE"));
    let r = request(a, Some(&admin), "DELETE", "/v1/functions", b"").await;
    r.error(405, "InvalidArgument");
    // /metrics without a recorder.
    get(a, Some(&admin), "/metrics")
        .await
        .error(404, "NotFound");
    assert_eq!(
        client(a, &admin).health().await.unwrap().role,
        ControlRole::Leader
    );
    c.shutdown().await;
}

/// The (method, path template) pairs of the OpenAPI document.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, _) in item.as_object().unwrap() {
            if [
                "get", "put", "post", "delete", "patch", "head", "options", "trace",
            ]
            .contains(&method.as_str())
            {
                out.insert((method.to_ascii_uppercase(), path.clone()));
            }
        }
    }
    out
}

#[test]
fn openapi_matches_the_route_table() {
    let doc: Value =
        serde_json::from_str(include_str!("../openapi.json")).expect("openapi.json parses");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.0"));
    let routes: BTreeSet<(String, String)> = shoal_control::api_routes()
        .into_iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        routes.len(),
        shoal_control::api_routes().len(),
        "duplicate route"
    );
    let docs = documented(&doc);
    let undocumented: Vec<_> = routes.difference(&docs).collect();
    let unrouted: Vec<_> = docs.difference(&routes).collect();
    assert!(
        undocumented.is_empty() && unrouted.is_empty(),
        "routes missing from openapi.json: {undocumented:?}; documented but not routed: {unrouted:?}"
    );
    // Every operation documents at least one success answer.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            let ok = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .any(|k| k.starts_with('2'));
            assert!(ok, "{method} {path} has no 2xx response");
        }
    }
}

#[tokio::test]
async fn openapi_is_served() {
    let (c, _store, admin) = start().await;
    let r = get(c.http_addr(), Some(&admin), "/v1/openapi.json").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.text(), shoal_control::OPENAPI_JSON);
    assert_eq!(r.text(), include_str!("../openapi.json"));
    c.shutdown().await;
}
