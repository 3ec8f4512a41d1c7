//! Commands that run components in the foreground.
use crate::args::{BenchArgs, DataworkerArgs};
use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use shoal_dataworker::Dataworker;
use signals::wait_for_signal;
use std::process::ExitCode;

/// Logs to stderr; `SHOAL_LOG` (env-filter syntax) overrides `default`.
pub(crate) fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub(crate) fn install_metrics() -> Option<PrometheusHandle> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| tracing::warn!(error = %e, "metrics recorder not installed"))
        .ok()
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    shoal_dataworker::runtime(threads).context("starting the async runtime")
}

mod signals {
    /// Resolves on Ctrl-C or SIGTERM.
    pub(crate) async fn wait_for_signal() -> std::io::Result<()> {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    }
}

/// Resolves on Ctrl-C, SIGTERM or when `token` is cancelled (e.g. the parent went away).
pub(crate) async fn stop_signal(token: &tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
    tokio::select! {
        r = wait_for_signal() => r.context("waiting for a signal"),
        _ = token.cancelled() => Ok(()),
    }
}

async fn start_worker(
    a: &DataworkerArgs,
    metrics: Option<PrometheusHandle>,
) -> anyhow::Result<Dataworker> {
    let cfg = a.to_config()?;
    crate::cluster_cmds::private_dir("--socket-dir", &cfg.socket_dir)?;
    let parts = if a.cluster.enabled() {
        let files = a.cluster.tls.tls_files(&a.node_id)?;
        let tls = shoal_transport::NodeTls::load(&files)?;
        let meta = a.cluster.store.connect(&a.cluster.tls, &a.node_id).await?;
        Some(shoal_dataworker::ClusterParts { meta, tls })
    } else {
        None
    };
    Dataworker::start_with(cfg, metrics, parts)
        .await
        .context("starting the dataworker")
}

/// `shoal dataworker`.
pub(crate) fn dataworker(a: DataworkerArgs) -> anyhow::Result<ExitCode> {
    init_logging("info");
    let metrics = install_metrics();
    runtime(a.worker_threads)?.block_on(async {
        let w = start_worker(&a, metrics).await?;
        let ready = shoal_devcluster::DataworkerReady {
            node: a.node_id.clone(),
            socket: w.socket_path().to_path_buf(),
            http: w.http_addr(),
            peer_addr: w.peer_addr(),
            pid: std::process::id(),
            arena_bytes: w.status().arena_bytes,
        };
        crate::cluster_cmds::ready_then_wait(&a.child, &ready, w.shutdown_token()).await?;
        tracing::info!("shutting down");
        w.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}

/// `shoal bench`.
pub(crate) fn bench(a: BenchArgs) -> anyhow::Result<ExitCode> {
    init_logging("warn");
    if a.suite == "calls" {
        let opts = shoal_perf::CallsOptions {
            quick: a.quick,
            table: !a.json_only,
            only: a.only,
        };
        shoal_perf::run_calls(&opts)?;
        return Ok(ExitCode::SUCCESS);
    }
    if a.suite == "cluster" {
        let opts = shoal_perf::ClusterOptions {
            quick: a.quick,
            table: !a.json_only,
            only: a.only,
            shoal: std::env::current_exe().context("finding the shoal binary")?,
        };
        shoal_perf::run_cluster(&opts)?;
        return Ok(ExitCode::SUCCESS);
    }
    let opts = shoal_perf::LocalOptions {
        quick: a.quick,
        table: !a.json_only,
        only: a.only,
    };
    shoal_perf::run_local(&opts)?;
    Ok(ExitCode::SUCCESS)
}
