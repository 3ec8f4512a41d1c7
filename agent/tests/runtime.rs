//! One `MemStore`, one `Control` (HTTP on 127.0.0.1:0) and one `Agent` in-process: functions
//! posted over the REST API get instance records placed on the agent's node, which runs them
//! and reports their state back.
#![allow(clippy::unwrap_used)]

use serde_json::{json, Value};
use shoal_agent::{Agent, AgentConfig};
use shoal_control::{Control, ControlConfig, InstanceRecord, DEFAULT_MAX_INVOKE_BODY};
use shoal_meta::{MemStore, MetaStore};
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(15);

/// Polls `f` until it returns `Some`, at most `WAIT`.
async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = &raw[split + 4..];
    let v = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body).unwrap_or(Value::Null)
    };
    (status, v)
}

fn function(name: &str, dir: &Path) -> Value {
    json!({
        "name": name,
        "code": {"kind": "dir", "path": dir.display().to_string()},
        "command": ["./run.sh"],
        "env": {"MODE": "test"},
        "resources": {"cpu_milli": 100, "mem_mib": 16},
        "min_instances": 1,
    })
}

async fn records(meta: &dyn MetaStore, function: &str) -> Vec<InstanceRecord> {
    let (kvs, _) = meta.range(&format!("instances/{function}/")).await.unwrap();
    kvs.iter()
        .map(|kv| serde_json::from_slice(&kv.value).unwrap())
        .collect()
}

async fn running(meta: &dyn MetaStore, function: &str) -> (InstanceRecord, u32) {
    wait_for(&format!("{function} running"), || async {
        let r = records(meta, function).await;
        match r.as_slice() {
            [one] if one.state == "running" => one.pid.map(|p| (one.clone(), p)),
            _ => None,
        }
    })
    .await
}

fn alive(pid: u32) -> bool {
    // A reaped process has no /proc entry; a zombie would still say "Z".
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.contains(") Z "),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_places_and_agent_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = tmp.path().join("pkg");
    std::fs::create_dir(&pkg).unwrap();
    let script = pkg.join("run.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho started; echo \"$SHOAL_FUNCTION $SHOAL_INSTANCE_ID $SHOAL_PROXY_SOCKET $MODE\"; sleep 30\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();

    let store: Arc<dyn MetaStore> = Arc::new(MemStore::open(None, "").unwrap());
    let control = Control::start(
        ControlConfig {
            meta_addr: None,
            http_addr: "127.0.0.1:0".parse().unwrap(),
            election_ttl: Duration::from_secs(2),
            name: "test-control".into(),
            max_invoke_body: DEFAULT_MAX_INVOKE_BODY,
            frontend: Default::default(),
        },
        store.clone(),
        None,
    )
    .await
    .unwrap();
    wait_for("leader", || async { control.is_leader().then_some(()) }).await;
    let http = control.http_addr();

    let log_dir = tmp.path().join("logs");
    let agent = Agent::start(
        AgentConfig {
            node_id: "node-a".into(),
            work_dir: tmp.path().join("work"),
            log_dir: log_dir.clone(),
            proxy_socket: tmp.path().join("proxy.sock"),
            dataworker_socket: tmp.path().join("dw.sock"),
            lease_ttl: Duration::from_secs(2),
            grace: Duration::from_millis(500),
        },
        store.clone(),
    )
    .await
    .unwrap();
    let agent_rec: Value =
        serde_json::from_slice(&store.get("agents/node-a").await.unwrap().unwrap().value).unwrap();
    assert!(
        agent_rec["cpu_milli"].as_u64().unwrap() >= 1000,
        "{agent_rec}"
    );
    assert!(
        agent_rec["mem_total_mib"].as_u64().unwrap() > 0,
        "{agent_rec}"
    );

    // 1. A function with min_instances 1 runs on the agent's node.
    let body = function("hello", &pkg).to_string();
    let (status, v) = request(http, "POST", "/v1/functions", body.as_bytes()).await;
    assert!(status == 200 || status == 201, "{status} {v}");
    let (rec, pid) = running(store.as_ref(), "hello").await;
    assert_eq!(rec.node, "node-a");
    assert!(rec.id.starts_with("hello-"), "{}", rec.id);
    assert!(alive(pid));
    let log = log_dir.join(format!("{}.out", rec.id));
    let text = wait_for("log says started", || async {
        let t = std::fs::read_to_string(&log).unwrap_or_default();
        t.contains("/proxy.sock test").then_some(t)
    })
    .await;
    assert!(text.starts_with("started\n"), "{text}");
    assert!(text.contains(&format!("hello {} ", rec.id)), "{text}");

    // 2. Deleting the function removes the record and the process.
    let (status, v) = request(http, "DELETE", "/v1/functions/hello", b"").await;
    assert!(status == 200 || status == 204, "{status} {v}");
    wait_for("hello record gone", || async {
        records(store.as_ref(), "hello")
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    wait_for("hello process gone", || async {
        (!alive(pid)).then_some(())
    })
    .await;

    // 3. A missing package fails the instance with a reason naming the path.
    let missing = tmp.path().join("no-such-package");
    let body = function("broken", &missing).to_string();
    let (status, v) = request(http, "POST", "/v1/functions", body.as_bytes()).await;
    assert!(status == 200 || status == 201, "{status} {v}");
    let shown = wait_for("broken failed in /v1/instances", || async {
        let (status, v) = request(http, "GET", "/v1/instances", b"").await;
        assert_eq!(status, 200, "{v}");
        v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["function"] == "broken" && i["state"] == "failed")
            .cloned()
    })
    .await;
    let reason = shown["reason"].as_str().unwrap();
    assert!(reason.contains(&missing.display().to_string()), "{reason}");
    assert_eq!(shown["node"], "node-a");
    // The failed record stays visible (no replacement churn) for the retry delay.
    assert_eq!(records(store.as_ref(), "broken").await.len(), 1);

    // 4. Shutdown stops every instance: no process left behind.
    let body = function("again", &pkg).to_string();
    let (status, v) = request(http, "POST", "/v1/functions", body.as_bytes()).await;
    assert!(status == 200 || status == 201, "{status} {v}");
    let (_, pid) = running(store.as_ref(), "again").await;
    assert!(alive(pid));
    agent.shutdown().await;
    assert!(!alive(pid), "instance process {pid} outlived the agent");
    // The agent's lease is revoked with it.
    assert!(store.get("agents/node-a").await.unwrap().is_none());
    control.shutdown().await;
}
