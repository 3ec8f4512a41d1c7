//! `shoal up`: a whole local shoal in the foreground. Control and, on each node, a
//! dataworker, a proxy and an agent, each its own process of this binary
//! ([`shoal_devcluster::RunningCluster`]); the description printed once all are ready; a clean
//! stop on Ctrl-C or SIGTERM.
//!
//! With no flags it is one node, `node-0`, in the default runtime directory, and control's
//! HTTP API on its default address: exactly where the client commands (`put`, `kv`, `fn`,
//! `status`) look when nothing is set.
use crate::args::{default_socket_dir, UpArgs, DEFAULT_CONTROL};
use crate::serve::{init_logging, stop_signal};
use anyhow::Context;
use shoal_devcluster::{Cluster, ClusterSpec, RunningCluster, Store};
use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

/// Time each stage of the shutdown (agents, proxies, dataworkers, control) gets after
/// SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// `shoal up`.
pub(crate) fn up(a: UpArgs) -> anyhow::Result<ExitCode> {
    init_logging("info");
    let spec = spec(&a)?;
    check_control_addr(spec.control_http)?;
    let cluster = RunningCluster::start(&spec)?;
    let info = cluster.describe();
    if a.json {
        println!("{}", serde_json::to_string(&info)?);
    } else {
        print_human(&info);
    }
    std::io::stdout().flush()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(stop_signal(&tokio_util::sync::CancellationToken::new()))?;
    tracing::info!("shutting down");
    cluster.stop(STOP_GRACE);
    Ok(ExitCode::SUCCESS)
}

/// What to start, from the flags.
fn spec(a: &UpArgs) -> anyhow::Result<ClusterSpec> {
    anyhow::ensure!(
        (1..=64).contains(&a.nodes),
        "--nodes {}: between 1 and 64",
        a.nodes
    );
    let ids: Vec<String> = if a.nodes == 1 {
        vec![a.worker.node_id.clone()]
    } else {
        (1..=a.nodes).map(|i| format!("node-{i}")).collect()
    };
    let exe = std::env::current_exe().context("finding the shoal binary")?;
    let dir = a
        .worker
        .socket_dir
        .clone()
        .unwrap_or_else(default_socket_dir);
    let mut spec = ClusterSpec::new(exe, dir, ids);
    for n in &mut spec.nodes {
        n.dataworker_flags = a.worker.child_flags(&n.id, a.nodes > 1);
    }
    spec.control_http = a.control_http_addr;
    let store = &a.worker.cluster.store;
    if !store.etcd.is_empty() {
        spec.store = Store::Etcd {
            urls: store.etcd.clone(),
            prefix: store.etcd_prefix.clone(),
        };
    }
    spec.lease_ttl = a.worker.cluster.lease_ttl;
    Ok(spec)
}

/// A clear message when control's HTTP port is taken: control itself could only say
/// "address in use" after the fact.
fn check_control_addr(addr: SocketAddr) -> anyhow::Result<()> {
    if addr.port() != 0 && std::net::TcpListener::bind(addr).is_err() {
        anyhow::bail!(
            "control's HTTP address {addr} is in use (another `shoal up` or `shoal control`?); \
             pass --control-http-addr 127.0.0.1:0 for a free port"
        );
    }
    Ok(())
}

/// The description for a person: endpoints, and what to type next.
fn print_human(info: &Cluster) {
    let control = &info.control;
    println!(
        "shoal is up: control + {} node{}",
        info.nodes.len(),
        if info.nodes.len() == 1 { "" } else { "s" }
    );
    let meta = match (&control.etcd, control.meta) {
        (Some(etcd), _) => format!("etcd {etcd}"),
        (None, Some(m)) => m.to_string(),
        (None, None) => "-".into(),
    };
    println!("  control: http {}  metadata {meta}", control.http);
    for n in &info.nodes {
        println!(
            "  {}: socket {}  quic {}  health {}",
            n.id,
            n.dataworker_socket.display(),
            n.peer_addr.map_or("-".into(), |p| p.to_string()),
            n.health.as_deref().unwrap_or("-")
        );
    }
    println!();
    if reached_by_default(info) {
        println!("In another terminal (the client commands find it without settings):");
    } else {
        println!("In another terminal (any node's socket reaches the whole cluster):");
        for (k, v) in info.env.vars() {
            println!("  export {k}={v}");
        }
    }
    println!("  shoal put hello ./some-file");
    if let Some(last) = info.nodes.last().filter(|_| info.nodes.len() > 1) {
        let socket = last.dataworker_socket.display();
        println!("  shoal get hello -o copy --socket {socket}");
    } else {
        println!("  shoal get hello -o copy");
    }
    println!("  shoal fn deploy NAME --path DIR -- ./COMMAND && shoal fn invoke NAME hello");
    println!("  shoal status");
    println!();
    println!("Ctrl-C stops it.");
}

/// Whether the client commands' defaults (no `--socket`, no `SHOAL_*`) reach `info`.
fn reached_by_default(info: &Cluster) -> bool {
    let socket = default_socket_dir().join("node-0").join("dataworker.sock");
    info.env.dataworker_socket == socket && info.env.control.to_string() == DEFAULT_CONTROL
}
