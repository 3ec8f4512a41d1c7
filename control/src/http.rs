//! Control's HTTP server: the shared loop (`shoal_httpd::serve`: bounded connections, header
//! timeout, graceful shutdown) handing every request to the router.
use crate::router;
use crate::View;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub(crate) async fn serve(
    listener: TcpListener,
    view: Arc<View>,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) {
    let metrics = Arc::new(metrics);
    let handler = move |req| {
        let (view, metrics) = (view.clone(), metrics.clone());
        async move { router::handle(req, &view, metrics.as_ref().as_ref()).await }
    };
    shoal_httpd::serve(listener, handler, shutdown).await;
}
