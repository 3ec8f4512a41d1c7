//! The agent and function credentials (#13): each instance it starts gets its own token,
//! bound to it and to its function's tenant, revoked once the instance is removed, and the
//! log endpoint answers only to a token that may read that tenant. One `MemStore` and one
//! `Agent`, the records written as control's placement would.
#![allow(clippy::unwrap_used)]

mod support;

use shoal_agent::{Agent, AgentConfig, S3Settings};
use shoal_meta::records::{
    agent_key, function_key, instance_key, AgentRecord, InstanceBinding, InstancePhase,
    InstanceRecord, Role, TokenRecord, SYSTEM_TENANT, TOKENS_PREFIX,
};
use shoal_meta::{MemStore, MetaStore, TokenBook};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

/// Writes function `name` of `tenant` (running `pkg/run.sh`) and one instance `id` of it
/// placed on node `node-a`.
async fn place(meta: &dyn MetaStore, pkg: &Path, tenant: &str, name: &str, id: &str, out: &Path) {
    let spec = serde_json::json!({
        "name": name,
        "tenant": tenant,
        "version": 1,
        "code": {"kind": "dir", "path": pkg.display().to_string()},
        "command": ["./run.sh"],
        "env": {"OUT": out.display().to_string()},
        "resources": {"cpu_milli": 100, "mem_mib": 16},
    });
    meta.put(
        &function_key(name),
        serde_json::to_vec(&spec).unwrap(),
        None,
    )
    .await
    .unwrap();
    let rec = InstanceRecord {
        id: id.into(),
        function: name.into(),
        node: "node-a".into(),
        state: InstancePhase::Scheduled,
        reason: None,
        pid: None,
        function_version: Some(1),
    };
    meta.put(
        &instance_key(name, id),
        serde_json::to_vec(&rec).unwrap(),
        None,
    )
    .await
    .unwrap();
}

/// The token records bound to instance `id` of `function`.
async fn bound(meta: &dyn MetaStore, function: &str, id: &str) -> Vec<TokenRecord> {
    let want = InstanceBinding {
        function: function.into(),
        instance: id.into(),
    };
    let (kvs, _) = meta.range(TOKENS_PREFIX).await.unwrap();
    kvs.iter()
        .map(|kv| serde_json::from_slice::<TokenRecord>(&kv.value).unwrap())
        .filter(|r| r.instance.as_ref() == Some(&want))
        .collect()
}

/// `GET path` from `addr` with an optional bearer token: the status code and the body.
fn get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(s, "GET {path} HTTP/1.0\r\nHost: agent\r\n{auth}\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap();
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_instance_gets_its_own_credential_and_its_logs_need_one() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = tmp.path().join("pkg");
    std::fs::create_dir(&pkg).unwrap();
    let script = pkg.join("run.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nprintf %s \"$SHOAL_TOKEN\" > \"$OUT.tmp\" && mv \"$OUT.tmp\" \"$OUT\"\necho hello from $SHOAL_INSTANCE_ID\nsleep 30\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let meta: Arc<dyn MetaStore> = Arc::new(MemStore::open(None, "").unwrap());
    let cfg = AgentConfig {
        node_id: "node-a".into(),
        work_dir: tmp.path().join("work"),
        log_dir: tmp.path().join("logs"),
        proxy_socket: tmp.path().join("proxy.sock"),
        dataworker_socket: tmp.path().join("dataworker.sock"),
        lease_ttl: Duration::from_secs(2),
        grace: Duration::from_millis(500),
        s3: S3Settings::default(),
        logs_addr: "127.0.0.1:0".parse().unwrap(),
        labels: Default::default(),
    };
    let agent = Agent::start(cfg, meta.clone()).await.unwrap();
    let out_a = tmp.path().join("token-a");
    place(meta.as_ref(), &pkg, "team-a", "fa", "fa-1", &out_a).await;

    // The instance's environment holds a token bound to it, in its function's tenant.
    let token = support::wait_for("the instance writes its token", WAIT, || async {
        std::fs::read_to_string(&out_a)
            .ok()
            .filter(|t| !t.is_empty())
    })
    .await;
    let (book, follower) = TokenBook::follow(meta.clone());
    let p = support::wait_for("the token authenticates", WAIT, || async {
        book.authenticate(&token).ok()
    })
    .await;
    assert_eq!(p.tenant, "team-a");
    assert_eq!(p.role, Role::Invoker);
    assert_eq!(
        p.instance,
        Some(InstanceBinding {
            function: "fa".into(),
            instance: "fa-1".into()
        })
    );
    assert_eq!(bound(meta.as_ref(), "fa", "fa-1").await.len(), 1);

    // The log endpoint: open health, and logs only with a token that may read team-a.
    let kv = meta.get(&agent_key("node-a")).await.unwrap().unwrap();
    let addr = serde_json::from_slice::<AgentRecord>(&kv.value)
        .unwrap()
        .logs_addr
        .unwrap();
    let issue = |tenant: &'static str, role| {
        let meta = meta.clone();
        async move {
            shoal_meta::issue_token(meta.as_ref(), tenant, role, "test", None)
                .await
                .unwrap()
                .token
        }
    };
    let reader_a = issue("team-a", Role::Reader).await;
    let admin_b = issue("team-b", Role::Admin).await;
    let operator = issue(SYSTEM_TENANT, Role::Admin).await;
    support::wait_for("the agent knows the new tokens", WAIT, || async {
        (book.authenticate(&operator).is_ok()).then_some(())
    })
    .await;
    let logs = "/v1/logs/fa-1?tail=100";
    let (a, path) = (addr.clone(), logs.to_string());
    let answers = tokio::task::spawn_blocking(move || {
        let mut out = vec![get(&a, "/health", None).0];
        for t in [
            None,
            Some("shoal_0000000000000000_00"),
            Some(admin_b.as_str()),
            Some(token.as_str()),
        ] {
            out.push(get(&a, &path, t).0);
        }
        out
    })
    .await
    .unwrap();
    assert_eq!(
        answers,
        [200, 401, 401, 404, 403],
        "health, none, garbage, team-b, invoker"
    );
    // A reader of team-a and the operator read them (the tokens reach the agent's book
    // within a moment of being issued).
    for t in [reader_a, operator] {
        let (a, path) = (addr.clone(), logs.to_string());
        support::wait_for("the logs with a good token", WAIT, move || {
            let (a, path, t) = (a.clone(), path.clone(), t.clone());
            async move {
                let (status, body) = tokio::task::spawn_blocking(move || get(&a, &path, Some(&t)))
                    .await
                    .unwrap();
                (status == 200 && body.contains("hello from fa-1")).then_some(())
            }
        })
        .await;
    }

    // The instance removed: its credential is revoked.
    meta.delete(&instance_key("fa", "fa-1")).await.unwrap();
    support::wait_for("the credential revoked", WAIT, || async {
        bound(meta.as_ref(), "fa", "fa-1")
            .await
            .is_empty()
            .then_some(())
    })
    .await;

    // At shutdown every credential still held is revoked.
    let out_b = tmp.path().join("token-b");
    place(meta.as_ref(), &pkg, "team-b", "fb", "fb-1", &out_b).await;
    support::wait_for("the second instance writes its token", WAIT, || async {
        std::fs::read_to_string(&out_b)
            .ok()
            .filter(|t| !t.is_empty())
    })
    .await;
    assert_eq!(bound(meta.as_ref(), "fb", "fb-1").await.len(), 1);
    agent.shutdown().await;
    assert!(bound(meta.as_ref(), "fb", "fb-1").await.is_empty());
    follower.stop().await;
}
