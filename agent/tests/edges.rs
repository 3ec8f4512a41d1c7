//! Validated edges (#14): an instance record's names never become paths unchecked. One
//! `MemStore` and one `Agent`, with records written as anything that can write the store
//! could write them.
#![allow(clippy::unwrap_used)]

mod support;

use shoal_agent::{Agent, AgentConfig, S3Settings};
use shoal_meta::records::{function_key, instance_key, InstancePhase, InstanceRecord};
use shoal_meta::{MemStore, MetaStore};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

fn config(root: &Path) -> AgentConfig {
    AgentConfig {
        node_id: "node-a".into(),
        work_dir: root.join("work"),
        log_dir: root.join("logs"),
        proxy_socket: root.join("proxy.sock"),
        dataworker_socket: root.join("dataworker.sock"),
        lease_ttl: Duration::from_secs(2),
        grace: Duration::from_millis(200),
        s3: S3Settings::default(),
        logs_addr: "127.0.0.1:0".parse().unwrap(),
        labels: Default::default(),
    }
}

async fn put_instance(meta: &dyn MetaStore, function: &str, id: &str) {
    let rec = InstanceRecord {
        id: id.into(),
        function: function.into(),
        node: "node-a".into(),
        state: InstancePhase::Scheduled,
        reason: None,
        pid: None,
        function_version: Some(1),
    };
    meta.put(
        &instance_key(function, id),
        serde_json::to_vec(&rec).unwrap(),
        None,
    )
    .await
    .unwrap();
}

async fn state_of(meta: &dyn MetaStore, function: &str, id: &str) -> Option<InstanceRecord> {
    let kv = meta.get(&instance_key(function, id)).await.unwrap()?;
    serde_json::from_slice(&kv.value).ok()
}

/// A directory with a file in it, standing for what an attacker would like the agent to
/// clear.
fn victim(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("precious"), b"keep me").unwrap();
}

/// Instance ids `../victim`, an absolute path and one holding CR/LF are refused as
/// `failed` ("invalid instance record") before anything is done with them: the directories
/// they name are not cleared, nothing is unpacked or logged there. A well-named instance of
/// the same function runs beside them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_instance_ids_never_become_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let node = tmp.path().join("node");
    let pkg = tmp.path().join("pkg");
    std::fs::create_dir_all(&pkg).unwrap();
    let script = pkg.join("run.sh");
    std::fs::write(&script, "#!/bin/sh\nexec sleep 30\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sibling = node.join("victim");
    let absolute = tmp.path().join("abs-victim");
    victim(&sibling);
    victim(&absolute);

    let meta: Arc<dyn MetaStore> = Arc::new(MemStore::open(None, "").unwrap());
    let agent = Agent::start(config(&node), meta.clone()).await.unwrap();
    let spec = serde_json::json!({
        "name": "f",
        "version": 1,
        "code": {"kind": "dir", "path": pkg.display().to_string()},
        "command": ["./run.sh"],
        "resources": {"cpu_milli": 100, "mem_mib": 16},
        "max_instances": 8,
    });
    meta.put(&function_key("f"), serde_json::to_vec(&spec).unwrap(), None)
        .await
        .unwrap();
    let abs_id = absolute.display().to_string();
    let bad = ["../victim", abs_id.as_str(), "f-2\r\nX-Injected: yes", "."];
    for id in bad {
        put_instance(meta.as_ref(), "f", id).await;
    }
    put_instance(meta.as_ref(), "f", "f-1").await;

    support::wait_for("the good instance runs", WAIT, || async {
        state_of(meta.as_ref(), "f", "f-1")
            .await
            .filter(|r| r.state == InstancePhase::Running)
    })
    .await;
    for id in bad {
        let rec = support::wait_for(&format!("{id:?} is handled"), WAIT, || async {
            state_of(meta.as_ref(), "f", id)
                .await
                .filter(|r| !matches!(r.state, InstancePhase::Scheduled | InstancePhase::Starting))
        })
        .await;
        assert_eq!(rec.state, InstancePhase::Failed, "{id:?}: {rec:?}");
        let reason = rec.reason.unwrap_or_default();
        assert!(
            reason.contains("invalid instance record"),
            "{id:?}: {reason}"
        );
    }
    for dir in [&sibling, &absolute] {
        assert_eq!(
            std::fs::read(dir.join("precious")).unwrap(),
            b"keep me",
            "{} was touched",
            dir.display()
        );
        assert!(
            !dir.join("run.sh").exists(),
            "a package landed in {}",
            dir.display()
        );
    }
    // Only the good instance has a directory and logs.
    let mut work: Vec<String> = std::fs::read_dir(node.join("work"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    work.sort();
    assert_eq!(work, ["f-1"]);
    for e in std::fs::read_dir(node.join("logs")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(name.starts_with("f-1."), "unexpected log file {name:?}");
    }

    // The log endpoint: an id with an (encoded) CR/LF or a traversal is refused as such, and
    // nothing of it reaches a header of the answer.
    let addr = {
        let kv = meta
            .get(&shoal_meta::records::agent_key("node-a"))
            .await
            .unwrap()
            .unwrap();
        serde_json::from_slice::<shoal_meta::records::AgentRecord>(&kv.value)
            .unwrap()
            .logs_addr
            .unwrap()
    };
    let operator = shoal_meta::issue_token(
        meta.as_ref(),
        shoal_meta::records::SYSTEM_TENANT,
        shoal_meta::records::Role::Admin,
        "test",
        None,
    )
    .await
    .unwrap()
    .token;
    for path in [
        "/v1/logs/f-1%0D%0AX-Injected:%20yes",
        "/v1/logs/..%2F..%2Fetc%2Fpasswd",
        "/v1/logs/.",
    ] {
        let (addr, token) = (addr.clone(), operator.clone());
        let (status, head) = support::wait_for("the agent knows the token", WAIT, || {
            let (addr, token) = (addr.clone(), token.clone());
            async move {
                let answer = tokio::task::spawn_blocking(move || raw_get(&addr, path, &token))
                    .await
                    .unwrap();
                (answer.0 != 401).then_some(answer)
            }
        })
        .await;
        assert_eq!(status, 400, "{path}: {head}");
        assert!(!head.to_ascii_lowercase().contains("x-injected"), "{head}");
    }
    agent.shutdown().await;
}

/// `GET path` with a bearer token, raw: the status and the head of the answer.
fn raw_get(addr: &str, path: &str, token: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: agent\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let head = resp.split("\r\n\r\n").next().unwrap_or("").to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head)
}
