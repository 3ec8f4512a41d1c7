//! Cluster commands: `shoal control`, `shoal proxy`, `shoal agent` and `shoal ca`, the
//! metadata store the node components join, and the ready line each component prints for
//! `shoal up`.
use crate::args::{
    default_socket_dir, AgentArgs, CaOp, ChildArgs, ControlArgs, MetaArgs, ProxyArgs, TlsArgs,
};
use crate::serve::{init_logging, install_metrics, stop_signal};
use anyhow::Context;
use shoal_devcluster::{AgentReady, ControlReady, ProxyReady};
use shoal_meta::MetaStore;
use std::process::ExitCode;
use std::sync::Arc;

/// The metadata store named by `--meta` (control's API, over mutual TLS as node `node` with
/// the certificate `tls` names) or `--etcd` (directly; etcd client TLS is a follow-up).
pub(crate) async fn meta_store(
    store: &MetaArgs,
    tls: &TlsArgs,
    node: &str,
) -> anyhow::Result<Arc<dyn MetaStore>> {
    if !store.etcd.is_empty() {
        return etcd_store(&store.etcd, &store.etcd_prefix).await;
    }
    let addr = store
        .meta
        .as_deref()
        .context("no metadata store: pass --meta or --etcd")?;
    let files = tls
        .tls_files(node)
        .context("--meta: control's metadata API is mutual TLS")?;
    let identity = shoal_pki::NodeTls::load(&files).context("--meta: this node's certificate")?;
    let addr = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("--meta {addr}"))?
        .next()
        .with_context(|| format!("--meta {addr}: no address"))?;
    Ok(Arc::new(shoal_meta::RemoteStore::connect(addr, &identity)?))
}

#[cfg(feature = "etcd")]
async fn etcd_store(etcd: &[String], prefix: &str) -> anyhow::Result<Arc<dyn MetaStore>> {
    let s = shoal_meta::EtcdStore::connect(etcd, prefix)
        .await
        .with_context(|| format!("--etcd {}", etcd.join(",")))?;
    Ok(Arc::new(s))
}

#[cfg(not(feature = "etcd"))]
async fn etcd_store(_: &[String], _: &str) -> anyhow::Result<Arc<dyn MetaStore>> {
    anyhow::bail!(
        "--etcd: this shoal was built without etcd support (build with `--features etcd`; it needs protoc)"
    )
}

/// Checks (creating it 0700 if missing) the directory `flag` names, where a component keeps
/// its sockets, files or secrets: refused unless it is a real directory of this user that
/// nobody else may write (`shoal_pki::ensure_private_dir`), with a message saying how to fix
/// it. For the default directory, the runtime directory above it (`/tmp/shoal-<uid>`) is
/// checked first, so a predictable directory someone else made is never used.
pub(crate) fn private_dir(flag: &str, dir: &std::path::Path) -> anyhow::Result<()> {
    let runtime = default_socket_dir();
    if dir.starts_with(&runtime) {
        shoal_pki::ensure_private_dir(&runtime)
            .with_context(|| format!("the runtime directory {}", runtime.display()))?;
    }
    shoal_pki::ensure_private_dir(dir).with_context(|| format!("{flag} {}", dir.display()))
}

/// Shuts the component down when standard input closes: `shoal up` holds the other end, so
/// its children never outlive it, even when it is killed.
fn watch_parent(child: &ChildArgs, token: tokio_util::sync::CancellationToken) {
    if !child.exit_with_parent {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("parent-watch".into())
        .spawn(move || {
            let mut sink = [0u8; 64];
            loop {
                match std::io::Read::read(&mut std::io::stdin(), &mut sink) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            token.cancel();
        });
}

/// Prints the component's ready line when `shoal up` asked for one, then waits for Ctrl-C,
/// SIGTERM, `token`, or (with `--exit-with-parent`) the parent going away.
pub(crate) async fn ready_then_wait(
    child: &ChildArgs,
    ready: &impl serde::Serialize,
    token: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    if child.ready_json {
        println!("{}", serde_json::to_string(ready)?);
        std::io::Write::flush(&mut std::io::stdout())?;
    }
    watch_parent(child, token.clone());
    stop_signal(&token).await
}

/// `shoal control`.
pub(crate) fn control(a: ControlArgs) -> anyhow::Result<ExitCode> {
    init_logging("info");
    let metrics = install_metrics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let meta: Arc<dyn MetaStore> = if a.etcd.is_empty() {
            let dir = a
                .data_dir
                .clone()
                .unwrap_or_else(|| default_socket_dir().join("control"));
            private_dir("--data-dir", &dir)?;
            let file = dir.join("meta.db");
            let store = shoal_meta::MemStore::open(Some(&file), "")
                .with_context(|| format!("opening the metadata file {}", file.display()))?;
            Arc::new(store)
        } else {
            etcd_store(&a.etcd, &a.etcd_prefix).await?
        };
        let name = a
            .name
            .clone()
            .unwrap_or_else(|| format!("control-{}", std::process::id()));
        // After the store: a store that cannot open says so first.
        let meta_tls = match a.listen.0 {
            Some(_) => {
                let files = a.tls.tls_files()?;
                let tls = shoal_pki::ControlTls::load(&files)
                    .context("control's certificate for the metadata API")?;
                Some(tls)
            }
            None => None,
        };
        let admin_token_file = a
            .admin_token_file
            .as_deref()
            .map(std::path::absolute)
            .transpose()
            .context("--admin-token-file")?;
        let cfg = shoal_control::ControlConfig {
            meta_addr: a.listen.0,
            meta_tls,
            http_addr: a.http_addr,
            election_ttl: a.election_ttl,
            name,
            max_invoke_body: shoal_control::DEFAULT_MAX_INVOKE_BODY,
            frontend: shoal_control::FrontendConfig {
                proxy_socket: a.proxy_socket.clone(),
                dataworker_socket: a.dataworker_socket.clone(),
            },
            admin_token_file: admin_token_file.clone(),
        };
        let c = shoal_control::Control::start(cfg, meta, metrics).await?;
        // Ready only once the admin token is where clients look (or a leader will put it
        // there), so nobody who reads the ready line finds an empty file.
        match c.admin_token().await {
            shoal_control::AdminTokenState::Failed(e) => {
                c.shutdown().await;
                anyhow::bail!("--admin-token-file: {e}");
            }
            shoal_control::AdminTokenState::Standby => {
                tracing::info!("standby: the leader keeps the admin token file");
            }
            _ => {}
        }
        let ready = ControlReady {
            meta: c.meta_addr(),
            http: c.http_addr(),
            pid: std::process::id(),
            token_file: admin_token_file,
        };
        ready_then_wait(&a.child, &ready, tokio_util::sync::CancellationToken::new()).await?;
        tracing::info!("shutting down");
        c.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}

/// `shoal proxy`.
pub(crate) fn proxy(a: ProxyArgs) -> anyhow::Result<ExitCode> {
    init_logging("info");
    let metrics = crate::serve::install_metrics();
    let dir = a
        .socket_dir
        .clone()
        .unwrap_or_else(|| default_socket_dir().join(&a.node_id));
    private_dir("--socket-dir", &dir)?;
    let mut cfg = shoal_proxy::ProxyConfig::new(a.node_id.clone(), dir.join("proxy.sock"));
    cfg.inline_limit = a.inline_limit;
    cfg.max_queue = a.max_queue;
    cfg.engine = match a.engine.as_str() {
        "uring" => shoal_proxy::EngineKind::Uring,
        "tokio" => shoal_proxy::EngineKind::Tokio,
        _ => shoal_proxy::EngineKind::Auto,
    };
    // The metadata client's connection lives on this runtime, which runs until shutdown.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    cfg.allowed_uids = a.allow_uids.clone();
    // The dataworker's `UID=TENANT[:ROLE]` syntax and validation; the proxy uses the tenant.
    for m in &a.tenant_uids {
        cfg.tenant_uids.insert(m.uid, m.tenant.clone());
    }
    rt.block_on(async {
        if a.store.enabled() {
            let files = a.tls.tls_files(&a.node_id)?;
            let tls = shoal_transport::NodeTls::load(&files)?;
            cfg.meta = Some(a.store.connect(&a.tls, &a.node_id).await?);
            cfg.peer = Some(shoal_proxy::PeerConfig {
                listen: a.peer_listen,
                advertise: None,
                tls,
                lease_ttl: a.lease_ttl,
            });
        } else {
            tracing::warn!("no metadata store: tokens cannot be checked, so no function instance can register");
        }
        let http = tokio::net::TcpListener::bind(a.http_addr)
            .await
            .with_context(|| format!("--http-addr {}", a.http_addr))?;
        let http_addr = http.local_addr()?;
        // Metrics name functions and their load: only on a loopback listener.
        let metrics = metrics.filter(|_| http_addr.ip().is_loopback());
        if !http_addr.ip().is_loopback() {
            tracing::warn!(%http_addr, "the proxy's /metrics is served only on a loopback --http-addr; off here");
        }
        let p = shoal_proxy::Proxy::start(cfg).context("starting the proxy")?;
        let stop_http = tokio_util::sync::CancellationToken::new();
        let served = tokio::spawn(shoal_httpd::serve(
            http,
            move |req| {
                let metrics = metrics.clone();
                async move { proxy_http(&req, metrics.as_ref()) }
            },
            stop_http.clone(),
        ));
        tracing::info!(node = %a.node_id, socket = %p.socket_path().display(), engine = ?p.engine(), peer = ?p.peer_addr(), "proxy ready");
        let ready = ProxyReady {
            node: a.node_id.clone(),
            socket: p.socket_path().to_path_buf(),
            engine: format!("{:?}", p.engine()),
            peer_addr: p.peer_addr(),
            http: http_addr,
            pid: std::process::id(),
        };
        ready_then_wait(&a.child, &ready, tokio_util::sync::CancellationToken::new()).await?;
        tracing::info!("shutting down");
        p.shutdown().await;
        stop_http.cancel();
        let _ = served.await;
        Ok(ExitCode::SUCCESS)
    })
}

/// The proxy's `/metrics` (Prometheus text; `None` off a loopback listener) and `/health`.
fn proxy_http(
    req: &hyper::Request<shoal_httpd::Body>,
    metrics: Option<&metrics_exporter_prometheus::PrometheusHandle>,
) -> shoal_httpd::Resp {
    use hyper::StatusCode;
    match (req.method(), req.uri().path(), metrics) {
        (&hyper::Method::GET, "/metrics", Some(h)) => {
            shoal_httpd::reply(StatusCode::OK, "text/plain; version=0.0.4", h.render())
        }
        (&hyper::Method::GET, "/health", _) => {
            shoal_httpd::reply(StatusCode::OK, "application/json", r#"{"status":"ok"}"#)
        }
        _ => shoal_httpd::reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// `shoal agent`.
pub(crate) fn agent(a: AgentArgs) -> anyhow::Result<ExitCode> {
    init_logging("info");
    let dir = a
        .socket_dir
        .clone()
        .unwrap_or_else(|| default_socket_dir().join(&a.node_id));
    private_dir("--socket-dir", &dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let meta = a.store.connect(&a.tls, &a.node_id).await?;
        let cfg = shoal_agent::AgentConfig {
            node_id: a.node_id.clone(),
            work_dir: dir.join("agent").join("work"),
            log_dir: dir.join("agent").join("logs"),
            proxy_socket: dir.join("proxy.sock"),
            dataworker_socket: dir.join("dataworker.sock"),
            lease_ttl: a.lease_ttl,
            grace: a.grace,
            s3: shoal_agent::S3Settings::from_env(),
            logs_addr: a.logs_addr,
            labels: crate::fn_cmds::key_values("--label", &a.labels)?,
        };
        let agent = shoal_agent::Agent::start(cfg, meta)
            .await
            .context("starting the agent")?;
        let ready = AgentReady {
            node: a.node_id.clone(),
            work_dir: dir.join("agent"),
            pid: std::process::id(),
        };
        ready_then_wait(&a.child, &ready, tokio_util::sync::CancellationToken::new()).await?;
        tracing::info!("shutting down: stopping every instance");
        agent.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}

/// `shoal ca`.
pub(crate) fn ca(op: CaOp) -> anyhow::Result<ExitCode> {
    match op {
        CaOp::Init { dir, nodes } => {
            private_dir("--dir", &dir)?;
            let ca = shoal_pki::DevCa::generate()?;
            ca.save(&dir)?;
            ca.issue_control()?
                .save(&dir, shoal_pki::CONTROL_SERVER_NAME)?;
            for n in &nodes {
                ca.issue(n)?.save(&dir, n)?;
            }
            println!(
                "cluster CA in {} (control's certificate and {} node certificate(s))",
                dir.display(),
                nodes.len()
            );
        }
        CaOp::Issue { dir, node } => {
            let ca = shoal_pki::DevCa::load(&dir)?;
            let cert = if node == shoal_pki::CONTROL_SERVER_NAME {
                ca.issue_control()?
            } else {
                ca.issue(&node)?
            };
            let files = cert.save(&dir, &node)?;
            println!("{}", files.cert.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
