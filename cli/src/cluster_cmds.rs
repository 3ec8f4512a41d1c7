//! Cluster commands: `shoal control`, `shoal ca`, and `shoal up` with several nodes.
use crate::args::{default_socket_dir, AgentArgs, CaOp, ChildArgs, ControlArgs, ProxyArgs, UpArgs};
use crate::serve::{init_logging, install_metrics, stop_signal};
use anyhow::Context;
use shoal_meta::MetaStore;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The metadata store named by `--meta` (control's API) or `--etcd`.
pub(crate) async fn meta_store(
    meta: Option<&str>,
    etcd: &[String],
    prefix: &str,
) -> anyhow::Result<Arc<dyn MetaStore>> {
    if !etcd.is_empty() {
        return etcd_store(etcd, prefix).await;
    }
    let addr = meta.context("no metadata store: pass --meta or --etcd")?;
    let addr = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("--meta {addr}"))?
        .next()
        .with_context(|| format!("--meta {addr}: no address"))?;
    Ok(Arc::new(shoal_meta::RemoteStore::connect(addr)))
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
    ready: serde_json::Value,
    token: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    if child.ready_json {
        println!("{ready}");
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
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("--data-dir {}", dir.display()))?;
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
        let cfg = shoal_control::ControlConfig {
            meta_addr: a.listen.0,
            http_addr: a.http_addr,
            election_ttl: a.election_ttl,
            name,
            max_invoke_body: shoal_control::DEFAULT_MAX_INVOKE_BODY,
            frontend: shoal_control::FrontendConfig {
                proxy_socket: a.proxy_socket.clone(),
                dataworker_socket: a.dataworker_socket.clone(),
            },
        };
        let c = shoal_control::Control::start(cfg, meta, metrics).await?;
        let ready = serde_json::json!({
            "meta": c.meta_addr().map(|m| m.to_string()),
            "http": c.http_addr().to_string(),
            "pid": std::process::id(),
        });
        ready_then_wait(&a.child, ready, tokio_util::sync::CancellationToken::new()).await?;
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
    std::fs::create_dir_all(&dir).with_context(|| format!("--socket-dir {}", dir.display()))?;
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
    rt.block_on(async {
        if a.store.enabled() {
            let files = a.tls.tls_files(&a.node_id)?;
            let tls = shoal_transport::NodeTls::load(&files)?;
            cfg.peer = Some(shoal_proxy::PeerConfig {
                listen: a.peer_listen,
                advertise: None,
                tls,
                meta: a.store.connect().await?,
                lease_ttl: a.lease_ttl,
            });
        }
        let http = tokio::net::TcpListener::bind(a.http_addr)
            .await
            .with_context(|| format!("--http-addr {}", a.http_addr))?;
        let http_addr = http.local_addr()?;
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
        let ready = serde_json::json!({
            "node": a.node_id,
            "socket": p.socket_path().display().to_string(),
            "engine": format!("{:?}", p.engine()),
            "peer_addr": p.peer_addr().map(|a| a.to_string()),
            "http": http_addr.to_string(),
            "pid": std::process::id(),
        });
        ready_then_wait(&a.child, ready, tokio_util::sync::CancellationToken::new()).await?;
        tracing::info!("shutting down");
        p.shutdown().await;
        stop_http.cancel();
        let _ = served.await;
        Ok(ExitCode::SUCCESS)
    })
}

/// The proxy's `/metrics` (Prometheus text) and `/health`.
fn proxy_http(
    req: &hyper::Request<hyper::body::Incoming>,
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let meta = a.store.connect().await?;
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
        let ready = serde_json::json!({
            "node": a.node_id,
            "work_dir": dir.join("agent").display().to_string(),
            "pid": std::process::id(),
        });
        ready_then_wait(&a.child, ready, tokio_util::sync::CancellationToken::new()).await?;
        tracing::info!("shutting down: stopping every instance");
        agent.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}

/// `shoal ca`.
pub(crate) fn ca(op: CaOp) -> anyhow::Result<ExitCode> {
    match op {
        CaOp::Init { dir, nodes } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("--dir {}", dir.display()))?;
            let ca = shoal_transport::DevCa::generate()?;
            ca.save(&dir)?;
            for n in &nodes {
                ca.issue(n)?.save(&dir, n)?;
            }
            println!(
                "cluster CA in {} ({} node certificate(s))",
                dir.display(),
                nodes.len()
            );
        }
        CaOp::Issue { dir, node } => {
            let ca = shoal_transport::DevCa::load(&dir)?;
            let files = ca.issue(&node)?.save(&dir, &node)?;
            println!("{}", files.cert.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The development CA of a local cluster: loaded from `dir`, or created there, with a
/// certificate for each node.
fn ensure_tls(dir: &Path, nodes: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = if dir.join("ca.pem").exists() {
        shoal_transport::DevCa::load(dir)?
    } else {
        let ca = shoal_transport::DevCa::generate()?;
        ca.save(dir)?;
        ca
    };
    for n in nodes {
        if !dir.join(format!("{n}.pem")).exists() {
            ca.issue(n)?.save(dir, n)?;
        }
    }
    Ok(())
}

/// A component process started by `up`; killed when dropped.
struct Proc {
    name: String,
    child: Child,
    ready: serde_json::Value,
}

impl Proc {
    fn spawn(name: &str, args: &[String]) -> anyhow::Result<Proc> {
        let exe = std::env::current_exe().context("finding the shoal binary")?;
        let mut child = Command::new(exe)
            .args(args)
            .arg("--ready-json")
            .arg("--exit-with-parent")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let mut line = String::new();
        let out = child.stdout.take().context("child stdout")?;
        BufReader::new(out)
            .read_line(&mut line)
            .with_context(|| format!("waiting for {name}"))?;
        let ready: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => {
                let status = child.wait().ok();
                anyhow::bail!("{name} did not start ({status:?}); see its error above");
            }
        };
        Ok(Proc {
            name: name.to_string(),
            child,
            ready,
        })
    }

    fn stop(&mut self, grace: Duration) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(component = %self.name, "did not stop in time; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[derive(serde::Serialize)]
struct NodeUp {
    id: String,
    socket_dir: String,
    dataworker_socket: String,
    proxy_socket: String,
    proxy_peer_addr: Option<String>,
    proxy_metrics: Option<String>,
    proxy_pid: u64,
    agent_pid: u64,
    peer_addr: Option<String>,
    http: Option<String>,
    metrics: Option<String>,
    health: Option<String>,
    pid: u64,
}

/// `shoal up --nodes N` (or with `--etcd`): control and one dataworker process per node.
pub(crate) fn up_cluster(a: UpArgs) -> anyhow::Result<ExitCode> {
    init_logging("info");
    anyhow::ensure!(
        (1..=64).contains(&a.nodes),
        "--nodes {}: between 1 and 64",
        a.nodes
    );
    let base: PathBuf = a
        .worker
        .socket_dir
        .clone()
        .unwrap_or_else(default_socket_dir);
    let names: Vec<String> = (1..=a.nodes).map(|i| format!("node-{i}")).collect();
    let tls = base.join("tls");
    ensure_tls(&tls, &names)?;
    let etcd = a.worker.cluster.store.etcd.join(",");
    let mut control_args: Vec<String> = vec![
        "control".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--http-addr".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        base.join("control").display().to_string(),
        // The REST frontend calls through the first node (connected on the first call).
        "--proxy-socket".into(),
        base.join(&names[0])
            .join("proxy.sock")
            .display()
            .to_string(),
        "--dataworker-socket".into(),
        base.join(&names[0])
            .join("dataworker.sock")
            .display()
            .to_string(),
    ];
    if !etcd.is_empty() {
        control_args.extend(["--etcd".into(), etcd.clone()]);
        control_args.extend([
            "--etcd-prefix".into(),
            a.worker.cluster.store.etcd_prefix.clone(),
        ]);
    }
    let mut control = Proc::spawn("control", &control_args)?;
    let meta = control.ready["meta"].as_str().map(str::to_string);
    // How every node component reaches the metadata store.
    let store_args: Vec<String> = if etcd.is_empty() {
        let m = meta
            .clone()
            .context("control did not report its metadata API")?;
        vec!["--meta".into(), m]
    } else {
        vec![
            "--etcd".into(),
            etcd.clone(),
            "--etcd-prefix".into(),
            a.worker.cluster.store.etcd_prefix.clone(),
        ]
    };
    let mut nodes = Vec::new();
    let mut proxies = Vec::new();
    let mut agents = Vec::new();
    for n in &names {
        let mut args: Vec<String> = vec![
            "dataworker".into(),
            "--node-id".into(),
            n.clone(),
            "--socket-dir".into(),
            base.join(n).display().to_string(),
            "--shm-size".into(),
            a.worker.shm_size.to_string(),
            "--tls-dir".into(),
            tls.display().to_string(),
            "--lease-ttl".into(),
            humantime::format_duration(a.worker.cluster.lease_ttl).to_string(),
        ];
        if a.worker.shm_populate {
            args.push("--shm-populate".into());
        }
        if let Some(d) = &a.worker.spill_dir {
            args.extend(["--spill-dir".into(), d.join(n).display().to_string()]);
        }
        args.extend(store_args.iter().cloned());
        nodes.push(Proc::spawn(n, &args)?);
        let mut proxy_args: Vec<String> = vec![
            "proxy".into(),
            "--node-id".into(),
            n.clone(),
            "--socket-dir".into(),
            base.join(n).display().to_string(),
            "--tls-dir".into(),
            tls.display().to_string(),
            "--lease-ttl".into(),
            humantime::format_duration(a.worker.cluster.lease_ttl).to_string(),
        ];
        proxy_args.extend(store_args.iter().cloned());
        proxies.push(Proc::spawn(&format!("{n} proxy"), &proxy_args)?);
        let mut agent_args: Vec<String> = vec![
            "agent".into(),
            "--node-id".into(),
            n.clone(),
            "--socket-dir".into(),
            base.join(n).display().to_string(),
            "--lease-ttl".into(),
            humantime::format_duration(a.worker.cluster.lease_ttl).to_string(),
        ];
        agent_args.extend(["--label".into(), format!("node={n}")]);
        agent_args.extend(store_args.iter().cloned());
        agents.push(Proc::spawn(&format!("{n} agent"), &agent_args)?);
    }
    let node_info: Vec<NodeUp> = nodes
        .iter()
        .zip(&proxies)
        .zip(&agents)
        .map(|((p, px), ag)| {
            let s = |k: &str| p.ready[k].as_str().map(str::to_string);
            let http = s("http");
            NodeUp {
                id: p.name.clone(),
                socket_dir: base.join(&p.name).display().to_string(),
                dataworker_socket: s("socket").unwrap_or_default(),
                proxy_socket: px.ready["socket"].as_str().unwrap_or_default().to_string(),
                proxy_peer_addr: px.ready["peer_addr"].as_str().map(str::to_string),
                proxy_metrics: px.ready["http"]
                    .as_str()
                    .map(|h| format!("http://{h}/metrics")),
                proxy_pid: px.ready["pid"].as_u64().unwrap_or(0),
                agent_pid: ag.ready["pid"].as_u64().unwrap_or(0),
                peer_addr: s("peer_addr"),
                metrics: http.as_ref().map(|h| format!("http://{h}/metrics")),
                health: http.as_ref().map(|h| format!("http://{h}/health")),
                http,
                pid: p.ready["pid"].as_u64().unwrap_or(0),
            }
        })
        .collect();
    let first = node_info
        .first()
        .map(|n| n.dataworker_socket.clone())
        .unwrap_or_default();
    let first_proxy = node_info
        .first()
        .map(|n| n.proxy_socket.clone())
        .unwrap_or_default();
    let info = serde_json::json!({
        "control": {
            "meta": meta,
            "http": control.ready["http"],
            "pid": control.ready["pid"],
            "etcd": if etcd.is_empty() { None } else { Some(etcd.clone()) },
        },
        "nodes": node_info,
        "env": {
            "SHOAL_DATAWORKER_SOCKET": first,
            "SHOAL_PROXY_SOCKET": first_proxy,
            "SHOAL_CONTROL": control.ready["http"],
        },
    });
    if a.json {
        println!("{info}");
    } else {
        println!("shoal is up: control + {} node(s)", node_info.len());
        println!(
            "  control: http {} metadata {}",
            control.ready["http"].as_str().unwrap_or("?"),
            if etcd.is_empty() {
                meta.clone().unwrap_or_default()
            } else {
                format!("etcd {etcd}")
            }
        );
        for n in &node_info {
            println!(
                "  {}: socket {}  quic {}  health {}",
                n.id,
                n.dataworker_socket,
                n.peer_addr.as_deref().unwrap_or("-"),
                n.health.as_deref().unwrap_or("-")
            );
        }
        println!();
        println!("In another terminal (any node's socket reaches the whole cluster):");
        println!("  export SHOAL_DATAWORKER_SOCKET={first}");
        println!("  export SHOAL_PROXY_SOCKET={first_proxy}");
        println!(
            "  export SHOAL_CONTROL={}",
            control.ready["http"].as_str().unwrap_or("")
        );
        println!("  shoal put hello ./some-file");
        if let Some(last) = node_info.last() {
            println!(
                "  shoal get hello -o copy --socket {}",
                last.dataworker_socket
            );
        }
        println!();
        println!("Ctrl-C stops it.");
    }
    use std::io::Write;
    std::io::stdout().flush()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let token = tokio_util::sync::CancellationToken::new();
        stop_signal(&token).await
    })?;
    tracing::info!("shutting down");
    // Agents first (they stop the instances), then proxies, then dataworkers.
    for n in nodes
        .iter_mut()
        .chain(proxies.iter_mut())
        .chain(agents.iter_mut())
        .rev()
    {
        n.stop(Duration::from_secs(5));
    }
    control.stop(Duration::from_secs(5));
    Ok(ExitCode::SUCCESS)
}
