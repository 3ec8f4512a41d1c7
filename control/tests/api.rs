//! The REST API against a real control process on 127.0.0.1:0 with a `MemStore`, spoken to
//! over plain HTTP/1.1 on a TCP socket.
#![allow(clippy::unwrap_used)]

use serde_json::{json, Value};
use shoal_control::{Control, ControlConfig, DEFAULT_MAX_INVOKE_BODY};
use shoal_meta::{MemStore, MetaStore};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(max_invoke_body: usize) -> ControlConfig {
    ControlConfig {
        meta_addr: None,
        http_addr: "127.0.0.1:0".parse().unwrap(),
        election_ttl: Duration::from_secs(2),
        name: "test-control".into(),
        max_invoke_body,
        frontend: Default::default(),
    }
}

async fn start_with(meta: Arc<dyn MetaStore>, max_invoke_body: usize) -> Control {
    let c = Control::start(config(max_invoke_body), meta, None)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !c.is_leader() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never became leader"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c
}

async fn start() -> (Control, Arc<MemStore>) {
    let store = Arc::new(MemStore::open(None, "").unwrap());
    (
        start_with(store.clone(), DEFAULT_MAX_INVOKE_BODY).await,
        store,
    )
}

/// One answer: status, lower-cased headers, body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Asserts an error answer: status and stable code.
    fn error(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status, status, "{}", self.text());
        let j = self.json();
        assert_eq!(j["code"], code, "{j}");
        j["message"].as_str().unwrap().to_string()
    }
}

fn parse(raw: &[u8]) -> Answer {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = std::str::from_utf8(&raw[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// Sends one request (`Connection: close`) and reads the answer to EOF.
async fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Answer {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    parse(&raw)
}

async fn get(addr: SocketAddr, path: &str) -> Answer {
    request(addr, "GET", path, b"").await
}

async fn send_json(addr: SocketAddr, method: &str, path: &str, v: &Value) -> Answer {
    request(addr, method, path, v.to_string().as_bytes()).await
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
    let (c, _store) = start().await;
    let a = c.http_addr();

    let created = send_json(a, "POST", "/v1/functions", &spec("hello")).await;
    assert_eq!(created.status, 201, "{}", created.text());
    let created = created.json();
    assert_eq!(created["version"], 1);
    assert_eq!(created["name"], "hello");
    assert_eq!(created["min_instances"], 0);

    let got = get(a, "/v1/functions/hello").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json(), created);

    send_json(a, "POST", "/v1/functions", &spec("bye")).await;
    let list = get(a, "/v1/functions").await.json();
    let names: Vec<&str> = list["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["bye", "hello"]);

    // Update based on version 1: stored as version 2.
    let mut next = created.clone();
    next["concurrency"] = json!(16);
    let updated = send_json(a, "PUT", "/v1/functions/hello", &next).await;
    assert_eq!(updated.status, 200, "{}", updated.text());
    assert_eq!(updated.json()["version"], 2);
    assert_eq!(updated.json()["concurrency"], 16);
    assert_eq!(get(a, "/v1/functions/hello").await.json()["version"], 2);

    // The same stale update again: conflict.
    let stale = send_json(a, "PUT", "/v1/functions/hello", &next).await;
    let msg = stale.error(409, "AlreadyExists");
    assert!(msg.contains("version conflict"), "{msg}");
    // Without a version: invalid.
    let mut unversioned = next.clone();
    unversioned.as_object_mut().unwrap().remove("version");
    let msg = send_json(a, "PUT", "/v1/functions/hello", &unversioned)
        .await
        .error(400, "InvalidArgument");
    assert!(msg.contains("version"), "{msg}");
    // Body name differs from the path.
    let msg = send_json(a, "PUT", "/v1/functions/bye", &next)
        .await
        .error(400, "InvalidArgument");
    assert!(msg.contains("`name`"), "{msg}");
    // Update of a missing function.
    let mut ghost = next.clone();
    ghost["name"] = json!("ghost");
    send_json(a, "PUT", "/v1/functions/ghost", &ghost)
        .await
        .error(404, "NotFound");

    let del = request(a, "DELETE", "/v1/functions/hello", b"").await;
    assert_eq!(del.status, 200, "{}", del.text());
    assert_eq!(del.json()["deleted"], "hello");
    get(a, "/v1/functions/hello").await.error(404, "NotFound");
    request(a, "DELETE", "/v1/functions/hello", b"")
        .await
        .error(404, "NotFound");
    c.shutdown().await;
}

#[tokio::test]
async fn duplicate_create_is_conflict() {
    let (c, _store) = start().await;
    let a = c.http_addr();
    assert_eq!(
        send_json(a, "POST", "/v1/functions", &spec("dup"))
            .await
            .status,
        201
    );
    let msg = send_json(a, "POST", "/v1/functions", &spec("dup"))
        .await
        .error(409, "AlreadyExists");
    assert!(msg.contains("dup"), "{msg}");
    c.shutdown().await;
}

#[tokio::test]
async fn invalid_specs_name_the_field() {
    let (c, _store) = start().await;
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
        let msg = send_json(a, "POST", "/v1/functions", &body)
            .await
            .error(400, "InvalidArgument");
        assert!(msg.contains(field), "{field}: {msg}");
    }
    let msg = request(a, "POST", "/v1/functions", b"{\"name\": ")
        .await
        .error(400, "InvalidArgument");
    assert!(msg.contains("invalid JSON"), "{msg}");
    // Nothing was stored.
    assert_eq!(get(a, "/v1/functions").await.json()["functions"], json!([]));
    // An over-long JSON body.
    let big = vec![b' '; shoal_control::MAX_JSON_BODY + 1];
    request(a, "POST", "/v1/functions", &big)
        .await
        .error(413, "TooLarge");
    // A bad name in the path.
    get(a, "/v1/functions/No_Such")
        .await
        .error(400, "InvalidArgument");
    c.shutdown().await;
}

#[tokio::test]
async fn invoke_answers() {
    let store = Arc::new(MemStore::open(None, "").unwrap());
    let c = start_with(store, 1024).await;
    let a = c.http_addr();
    let msg = request(a, "POST", "/v1/functions/nope/invoke", b"args")
        .await
        .error(404, "NotFound");
    assert!(msg.contains("nope"), "{msg}");
    send_json(a, "POST", "/v1/functions", &spec("f")).await;
    let msg = request(a, "POST", "/v1/functions/f/invoke", &[7u8; 1024])
        .await
        .error(503, "Unavailable");
    assert!(msg.contains("no proxy"), "{msg}");
    request(a, "POST", "/v1/functions/f/invoke", &[7u8; 1025])
        .await
        .error(413, "TooLarge");
    c.shutdown().await;
}

/// An over-limit body with the default limit, declared by Content-Length and also streamed
/// in chunks without a length: both 413, and the server keeps serving.
#[tokio::test]
async fn invoke_over_default_limit() {
    let (c, _store) = start().await;
    let a = c.http_addr();
    send_json(a, "POST", "/v1/functions", &spec("f")).await;

    let mut s = TcpStream::connect(a).await.unwrap();
    let head = format!(
        "POST /v1/functions/f/invoke HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
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
    let writer = tokio::spawn(async move {
        let head = "POST /v1/functions/f/invoke HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n";
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
    assert_eq!(get(a, "/health").await.status, 200);
    c.shutdown().await;
}

#[tokio::test]
async fn pools_crud() {
    let (c, _store) = start().await;
    let a = c.http_addr();
    let pool = json!({"name": "gpu", "node_selector": {"gpu": "a100"}, "cpu_milli": 64000, "mem_mib": 512000});
    let created = send_json(a, "POST", "/v1/pools", &pool).await;
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(created.json(), pool);
    send_json(a, "POST", "/v1/pools", &pool)
        .await
        .error(409, "AlreadyExists");
    let msg = send_json(
        a,
        "POST",
        "/v1/pools",
        &json!({"name": "p", "cpu_milli": 0, "mem_mib": 1}),
    )
    .await
    .error(400, "InvalidArgument");
    assert!(msg.contains("cpu_milli"), "{msg}");
    assert_eq!(get(a, "/v1/pools/gpu").await.json(), pool);
    assert_eq!(get(a, "/v1/pools").await.json()["pools"], json!([pool]));
    assert_eq!(request(a, "DELETE", "/v1/pools/gpu", b"").await.status, 200);
    get(a, "/v1/pools/gpu").await.error(404, "NotFound");
    request(a, "DELETE", "/v1/pools/gpu", b"")
        .await
        .error(404, "NotFound");
    assert_eq!(get(a, "/v1/pools").await.json()["pools"], json!([]));
    c.shutdown().await;
}

#[tokio::test]
async fn instances_are_read_from_the_store() {
    let (c, store) = start().await;
    let a = c.http_addr();
    send_json(a, "POST", "/v1/functions", &spec("f")).await;
    send_json(a, "POST", "/v1/functions", &spec("f-2")).await;
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
    let mine = get(a, "/v1/functions/f/instances").await;
    assert_eq!(mine.status, 200, "{}", mine.text());
    assert_eq!(
        mine.json()["instances"],
        json!([rec("f", "i1", "running"), rec("f", "i2", "starting")])
    );
    let all = get(a, "/v1/instances").await.json();
    assert_eq!(all["instances"].as_array().unwrap().len(), 3);
    get(a, "/v1/functions/ghost/instances")
        .await
        .error(404, "NotFound");
    c.shutdown().await;
}

#[tokio::test]
async fn state_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.json");
    {
        let store = Arc::new(MemStore::open(Some(&path), "").unwrap());
        let c = start_with(store.clone(), DEFAULT_MAX_INVOKE_BODY).await;
        let a = c.http_addr();
        let created = send_json(a, "POST", "/v1/functions", &spec("keep")).await;
        assert_eq!(created.status, 201);
        let mut next = created.json();
        next["max_instances"] = json!(9);
        assert_eq!(
            send_json(a, "PUT", "/v1/functions/keep", &next)
                .await
                .status,
            200
        );
        let pool = json!({"name": "p", "cpu_milli": 1000, "mem_mib": 1024});
        assert_eq!(send_json(a, "POST", "/v1/pools", &pool).await.status, 201);
        c.shutdown().await;
        store.close().await;
    }
    let store = Arc::new(MemStore::open(Some(&path), "").unwrap());
    let c = start_with(store.clone(), DEFAULT_MAX_INVOKE_BODY).await;
    let a = c.http_addr();
    let f = get(a, "/v1/functions/keep").await.json();
    assert_eq!(f["version"], 2);
    assert_eq!(f["max_instances"], 9);
    assert_eq!(get(a, "/v1/pools/p").await.status, 200);
    c.shutdown().await;
    store.close().await;
}

#[tokio::test]
async fn garbage_closes_only_that_connection() {
    let (c, _store) = start().await;
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
    assert_eq!(get(a, "/health").await.status, 200);
    c.shutdown().await;
}

#[tokio::test]
async fn standby_refuses_writes_and_serves_reads() {
    let (leader, store) = start().await;
    let standby = Control::start(config(DEFAULT_MAX_INVOKE_BODY), store.clone(), None)
        .await
        .unwrap();
    let s = standby.http_addr();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let j = get(s, "/v1/leader").await.json();
        if j["role"] == "standby" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{j}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let msg = send_json(s, "POST", "/v1/functions", &spec("f"))
        .await
        .error(503, "Unavailable");
    assert!(
        msg.contains(&leader.http_addr().to_string()),
        "message should name the leader: {msg}"
    );
    request(s, "DELETE", "/v1/pools/x", b"")
        .await
        .error(503, "Unavailable");
    // The write goes through the leader and the standby reads it.
    assert_eq!(
        send_json(leader.http_addr(), "POST", "/v1/functions", &spec("f"))
            .await
            .status,
        201
    );
    let read = get(s, "/v1/functions/f").await;
    assert_eq!(read.status, 200);
    assert_eq!(read.header("x-shoal-role"), Some("standby"));
    standby.shutdown().await;
    leader.shutdown().await;
}

#[tokio::test]
async fn unknown_routes_and_methods() {
    let (c, _store) = start().await;
    let a = c.http_addr();
    get(a, "/v1/nothing").await.error(404, "NotFound");
    get(a, "/v1/functions/").await.error(404, "NotFound");
    let r = request(a, "PATCH", "/v1/functions/f", b"{}").await;
    r.error(405, "InvalidArgument");
    assert_eq!(r.header("allow"), Some("GET, PUT, DELETE"));
    let r = request(a, "DELETE", "/v1/functions", b"").await;
    r.error(405, "InvalidArgument");
    // /metrics without a recorder.
    get(a, "/metrics").await.error(404, "NotFound");
    let h = get(a, "/health").await;
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["role"], "leader");
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
    let (c, _store) = start().await;
    let r = get(c.http_addr(), "/v1/openapi.json").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.text(), shoal_control::OPENAPI_JSON);
    assert_eq!(r.text(), include_str!("../openapi.json"));
    c.shutdown().await;
}
