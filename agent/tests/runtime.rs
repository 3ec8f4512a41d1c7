//! One `MemStore`, one `Control` (HTTP on 127.0.0.1:0) and one `Agent` in-process: functions
//! posted over the REST API (through `shoal-control-client`) get instance records placed on
//! the agent's node, which runs them and reports their state back. Remote packages come from
//! a real S3 server (moto) and a real dataworker.
#![allow(clippy::unwrap_used)]

mod support;

use serde_json::{json, Value};
use shoal_agent::{Agent, AgentConfig, S3Settings};
use shoal_control::{Control, ControlConfig, DEFAULT_MAX_INVOKE_BODY};
use shoal_control_client::{ControlClient, ErrorCode, FunctionSpec};
use shoal_meta::records::{InstancePhase, InstanceRecord};
use shoal_meta::{MemStore, MetaStore};
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

/// Polls `f` until it returns `Some`, at most `WAIT`.
async fn wait_for<T, F, Fut>(what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    support::wait_for(what, WAIT, f).await
}

/// Control's REST API: its address and an operator token issued on its store.
struct Api {
    addr: SocketAddr,
    token: String,
}

/// A client of control's REST API at `http`.
fn client(http: &Api) -> ControlClient {
    ControlClient::new(&http.addr.to_string())
        .unwrap()
        .with_token(&http.token)
        .unwrap()
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
    let (kvs, _) = meta
        .range(&shoal_meta::records::instances_of(function))
        .await
        .unwrap();
    kvs.iter()
        .map(|kv| serde_json::from_slice(&kv.value).unwrap())
        .collect()
}

async fn running(meta: &dyn MetaStore, function: &str) -> (InstanceRecord, u32) {
    wait_for(&format!("{function} running"), || async {
        let r = records(meta, function).await;
        match r.as_slice() {
            [one] if one.state == InstancePhase::Running => one.pid.map(|p| (one.clone(), p)),
            _ => None,
        }
    })
    .await
}

/// Waits until `/v1/instances` shows the one instance of `function` as `failed`; returns its
/// record.
async fn failed_instance(http: &Api, function: &str) -> InstanceRecord {
    let c = client(http);
    wait_for(&format!("{function} failed in /v1/instances"), || async {
        c.instances(None)
            .await
            .unwrap()
            .into_iter()
            .find(|i| i.function == function && i.state == InstancePhase::Failed)
    })
    .await
}

/// A control process on `store` that has become leader, and its API with an operator token.
async fn leading_control(store: Arc<dyn MetaStore>) -> (Control, Api) {
    let token = shoal_meta::issue_token(
        store.as_ref(),
        shoal_meta::records::SYSTEM_TENANT,
        shoal_meta::records::Role::Admin,
        "test",
        None,
    )
    .await
    .unwrap()
    .token;
    let control = Control::start(
        ControlConfig {
            meta_addr: None,
            meta_tls: None,
            http_addr: "127.0.0.1:0".parse().unwrap(),
            election_ttl: Duration::from_secs(2),
            name: "test-control".into(),
            max_invoke_body: DEFAULT_MAX_INVOKE_BODY,
            frontend: Default::default(),
            admin_token_file: None,
        },
        store,
        None,
    )
    .await
    .unwrap();
    wait_for("leader", || async { control.is_leader().then_some(()) }).await;
    let addr = control.http_addr();
    (control, Api { addr, token })
}

/// Node `node-a`'s agent, keeping its files under `dir` (`work`, `logs`).
fn agent_config(
    dir: &std::path::Path,
    dataworker_socket: std::path::PathBuf,
    s3: S3Settings,
) -> AgentConfig {
    AgentConfig {
        node_id: "node-a".into(),
        work_dir: dir.join("work"),
        log_dir: dir.join("logs"),
        proxy_socket: dir.join("proxy.sock"),
        dataworker_socket,
        lease_ttl: Duration::from_secs(2),
        grace: Duration::from_millis(500),
        s3,
        logs_addr: "127.0.0.1:0".parse().unwrap(),
        labels: Default::default(),
    }
}

async fn deploy(http: &Api, spec: Value) {
    let spec: FunctionSpec = serde_json::from_value(spec).unwrap();
    client(http).create_function(&spec).await.unwrap();
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
    let (control, api) = leading_control(store.clone()).await;
    let http = &api;

    let log_dir = tmp.path().join("logs");
    let agent = Agent::start(
        agent_config(
            tmp.path(),
            tmp.path().join("dw.sock"),
            S3Settings::default(),
        ),
        store.clone(),
    )
    .await
    .unwrap();
    let agent_rec: Value = serde_json::from_slice(
        &store
            .get(&shoal_meta::records::agent_key("node-a"))
            .await
            .unwrap()
            .unwrap()
            .value,
    )
    .unwrap();
    assert!(
        agent_rec["cpu_milli"].as_u64().unwrap() >= 1000,
        "{agent_rec}"
    );
    assert!(
        agent_rec["mem_total_mib"].as_u64().unwrap() > 0,
        "{agent_rec}"
    );
    // The record lives under a lease; a lost one (revoked, as a store that forgot it would
    // say) is granted again and the record rewritten.
    let agent_key = shoal_meta::records::agent_key("node-a");
    let lease = store.get(&agent_key).await.unwrap().unwrap().lease.unwrap();
    store.revoke(lease).await.unwrap();
    wait_for("agent record under a new lease", || async {
        let kv = store.get(&agent_key).await.unwrap()?;
        kv.lease.filter(|l| *l != lease)
    })
    .await;

    // 1. A function with min_instances 1 runs on the agent's node.
    deploy(http, function("hello", &pkg)).await;
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
    // The same log through control's REST API, which reads it from the agent.
    let logs = client(http).logs("hello", Some(4096)).await.unwrap();
    let inst = &logs[0];
    assert_eq!(inst.id, rec.id, "{logs:?}");
    assert!(
        inst.stdout.as_deref().unwrap().starts_with("started\n"),
        "{logs:?}"
    );
    assert!(inst.error.is_none(), "{logs:?}");
    let e = client(http).logs("nope", None).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");

    // 2. Deleting the function removes the record and the process.
    client(http).delete_function("hello").await.unwrap();
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
    deploy(http, function("broken", &missing)).await;
    let shown = failed_instance(http, "broken").await;
    let reason = shown.reason.as_deref().unwrap();
    assert!(reason.contains(&missing.display().to_string()), "{reason}");
    assert_eq!(shown.node, "node-a");
    // The failed record stays visible (no replacement churn) for the retry delay.
    assert_eq!(records(store.as_ref(), "broken").await.len(), 1);

    // 4. Shutdown stops every instance: no process left behind.
    deploy(http, function("again", &pkg)).await;
    let (_, pid) = running(store.as_ref(), "again").await;
    assert!(alive(pid));
    agent.shutdown().await;
    assert!(!alive(pid), "instance process {pid} outlived the agent");
    // The agent's lease is revoked with it.
    assert!(store.get(&agent_key).await.unwrap().is_none());
    control.shutdown().await;
}

/// Packages from `s3://` and `shoal://` go through the whole flow: a good one runs; a 404, a
/// corrupt archive, a digest mismatch, a missing object and a command that is not in the
/// package each end `failed` with a reason that says why, visible over the REST API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_packages_run_or_fail_with_a_reason() {
    use support::{digest, garbage, hello_package, Moto};

    let moto = Moto::start();
    moto.create_bucket("pkgs");
    let good = hello_package();
    moto.put("pkgs", "hello.tar.gz", &good);
    moto.put("pkgs", "corrupt.tar.gz", &garbage());

    let tmp = tempfile::tempdir().unwrap();
    let dw_dir = tmp.path().join("dw");
    std::fs::create_dir(&dw_dir).unwrap();
    std::fs::set_permissions(&dw_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut dw_cfg = shoal_dataworker::Config::new(&dw_dir);
    dw_cfg.shm_size = 64 << 20;
    let worker = shoal_dataworker::Dataworker::start(dw_cfg, None)
        .await
        .unwrap();
    let client = shoal_sdk::Client::connect(worker.socket_path())
        .await
        .unwrap();
    client.put("pkg-hello", &good).await.unwrap();

    let store: Arc<dyn MetaStore> = Arc::new(MemStore::open(None, "").unwrap());
    let (control, api) = leading_control(store.clone()).await;
    let http = &api;
    let work_dir = tmp.path().join("work");
    let agent = Agent::start(
        agent_config(
            tmp.path(),
            worker.socket_path().to_path_buf(),
            moto.settings(),
        ),
        store.clone(),
    )
    .await
    .unwrap();

    let spec = |name: &str, code: Value, digest: Option<String>, command: &str| {
        let mut v = json!({
            "name": name,
            "code": code,
            "command": [command],
            "resources": {"cpu_milli": 100, "mem_mib": 16},
            "min_instances": 1,
        });
        if let Some(d) = digest {
            v["digest"] = json!(d);
        }
        v
    };
    let s3 = |url: &str| json!({"kind": "s3", "url": url});
    let object = |id: &str| json!({"kind": "object", "id": id});

    // Good packages from both sources run, with the digest checked.
    let good_digest = Some(digest(&good));
    deploy(
        http,
        spec(
            "from-s3",
            s3("s3://pkgs/hello.tar.gz"),
            good_digest.clone(),
            "./run.sh",
        ),
    )
    .await;
    deploy(
        http,
        spec(
            "from-store",
            object("pkg-hello"),
            good_digest.clone(),
            "./run.sh",
        ),
    )
    .await;
    let (rec, pid) = running(store.as_ref(), "from-s3").await;
    assert!(alive(pid));
    assert!(work_dir.join(&rec.id).join("lib/data.txt").is_file());
    let (_, pid) = running(store.as_ref(), "from-store").await;
    assert!(alive(pid));

    // Each failure reaches `failed` with a reason naming the source and the cause.
    let cases = [
        (
            spec(
                "s3-missing",
                s3("s3://pkgs/missing.tar.gz"),
                None,
                "./run.sh",
            ),
            vec!["fetch package", "s3://pkgs/missing.tar.gz not found (404)"],
        ),
        (
            spec(
                "s3-corrupt",
                s3("s3://pkgs/corrupt.tar.gz"),
                None,
                "./run.sh",
            ),
            vec!["fetch package", "s3://pkgs/corrupt.tar.gz", "corrupt"],
        ),
        (
            spec(
                "s3-digest",
                s3("s3://pkgs/hello.tar.gz"),
                Some(digest(b"another package")),
                "./run.sh",
            ),
            vec!["fetch package", "s3://pkgs/hello.tar.gz", "digest mismatch"],
        ),
        (
            spec("store-missing", object("no-such-package"), None, "./run.sh"),
            vec![
                "fetch package",
                "object no-such-package not found in the store",
            ],
        ),
        (
            spec(
                "no-command",
                s3("s3://pkgs/hello.tar.gz"),
                None,
                "./no-such-command",
            ),
            vec!["no-such-command"],
        ),
    ];
    for (spec, _) in &cases {
        deploy(http, spec.clone()).await;
    }
    for (spec, wanted) in &cases {
        let name = spec["name"].as_str().unwrap();
        let shown = failed_instance(http, name).await;
        let reason = shown.reason.as_deref().unwrap_or_default();
        for w in wanted {
            assert!(reason.contains(w), "{name}: {reason:?} lacks {w:?}");
        }
        assert_eq!(shown.node, "node-a");
    }
    // Every staged download is gone, whatever its outcome.
    let staged: Vec<_> = std::fs::read_dir(work_dir.join(".staging"))
        .unwrap()
        .collect();
    assert!(staged.is_empty(), "{staged:?}");

    agent.shutdown().await;
    control.shutdown().await;
    drop(client);
    worker.shutdown().await;
}
