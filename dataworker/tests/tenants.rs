//! Tenants across a cluster: two dataworkers sharing an embedded metadata store, clients
//! connecting with tokens issued there. A tenant's objects travel between nodes under their
//! qualified ids; another tenant on another node cannot get or delete them, and the quotas
//! in the store reach every node.
#![allow(clippy::unwrap_used)] // test setup panics on failure by design
use shoal_dataworker::{ClusterConfig, ClusterParts, Config, Dataworker};
use shoal_meta::records::{quota_key, Quota, Role};
use shoal_meta::{issue_token, MemStore, MetaStore};
use shoal_sdk::{Client, ConnectOptions, ErrorCode};
use shoal_transport::{DevCa, NodeTls};
use std::sync::Arc;
use std::time::Duration;

/// A remote get right after a put on another node gives the registration this long.
const SETTLE: Duration = Duration::from_secs(5);

async fn node(id: &str, meta: Arc<dyn MetaStore>, ca: &DevCa) -> (Dataworker, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(dir.path());
    cfg.node_id = id.into();
    cfg.shm_size = 64 << 20;
    let mut c = ClusterConfig::new("127.0.0.1:0".parse().unwrap());
    c.lease_ttl = Duration::from_secs(1);
    cfg.cluster = Some(c);
    let tls = NodeTls::from_node_cert(&ca.issue(id).unwrap()).unwrap();
    let w = Dataworker::start_with(cfg, None, Some(ClusterParts { meta, tls }))
        .await
        .unwrap();
    (w, dir)
}

async fn connect(w: &Dataworker, token: Option<&str>) -> Client {
    let opts = ConnectOptions {
        token: token.map(str::to_owned),
        ..ConnectOptions::new(w.socket_path())
    };
    Client::connect_with(opts).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenant_cannot_reach_an_object_on_another_node() {
    let ca = DevCa::generate().unwrap();
    let meta: Arc<dyn MetaStore> = Arc::new(MemStore::open(None, "").unwrap());
    let token = |tenant: &'static str| {
        let meta = meta.clone();
        async move {
            issue_token(&*meta, tenant, Role::Invoker, "test", None)
                .await
                .unwrap()
                .token
        }
    };
    let (ta, tb) = (token("team-a").await, token("team-b").await);
    let (n0, _d0) = node("n0", meta.clone(), &ca).await;
    let (n1, _d1) = node("n1", meta.clone(), &ca).await;
    for n in [&n0, &n1] {
        shoal_devcluster::wait::wait_for_async("both members", SETTLE, || async {
            (n.status().members.len() == 2).then_some(())
        })
        .await
        .unwrap();
    }
    let a0 = connect(&n0, Some(&ta)).await;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    a0.put("report", &data).await.unwrap();
    // The owner's tenant reads it on the other node: pulled under its qualified id.
    let a1 = connect(&n1, Some(&ta)).await;
    assert_eq!(&a1.get("report", SETTLE).await.unwrap()[..], &data[..]);
    // Another tenant on the other node: not found at once, nothing arrives while it waits,
    // its delete finds nothing; the same for the default tenant.
    let b1 = connect(&n1, Some(&tb)).await;
    let d1 = connect(&n1, None).await;
    for (who, c) in [("team-b", &b1), ("default", &d1)] {
        let e = c.get("report", Duration::ZERO).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::NotFound, "{who}");
        let e = c
            .get("report", Duration::from_millis(300))
            .await
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::Timeout, "{who}");
        assert_eq!(
            c.delete("report").await.unwrap_err().code(),
            ErrorCode::NotFound,
            "{who}"
        );
        assert!(c.list("", 10).await.unwrap().is_empty(), "{who}");
    }
    let b0 = connect(&n0, Some(&tb)).await;
    assert_eq!(
        b0.get("report", Duration::ZERO).await.unwrap_err().code(),
        ErrorCode::NotFound
    );
    assert_eq!(
        &a0.get("report", Duration::ZERO).await.unwrap()[..],
        &data[..]
    );
    // A tenant's delete reaches its copies on every node, and only its own.
    b0.put("report", b"b's own").await.unwrap();
    a0.delete("report").await.unwrap();
    shoal_devcluster::wait::wait_for_async("the replica is dropped", SETTLE, || async {
        (!a1.contains("report").await.unwrap()).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(
        &b0.get("report", Duration::ZERO).await.unwrap()[..],
        b"b's own"
    );

    // Quotas written to the store reach every node.
    let quota = Quota {
        arena_bytes: Some(100),
        ..Quota::default()
    };
    meta.put(
        &quota_key("team-a"),
        serde_json::to_vec(&quota).unwrap(),
        None,
    )
    .await
    .unwrap();
    let mut i = 0;
    shoal_devcluster::wait::wait_for_async("n1 enforces team-a's quota", SETTLE, || {
        i += 1;
        let (a1, id) = (a1.clone(), format!("probe-{i}"));
        async move {
            match a1.put(&id, &[0u8; 200]).await {
                Err(e) if e.code() == ErrorCode::QuotaExceeded => Some(()),
                _ => None,
            }
        }
    })
    .await
    .unwrap();
    b0.put("unlimited", &[0u8; 200]).await.unwrap();
    n0.shutdown().await;
    n1.shutdown().await;
}
