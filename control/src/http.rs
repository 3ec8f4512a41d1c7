//! Control's HTTP server: the shared loop (`shoal_httpd::serve_with`: bounded connections,
//! header, body and write timeouts, graceful shutdown) handing every request to the router.
//! The body limit is the largest any route takes (JSON bodies or invoke arguments); the
//! router then holds each route to its own.
use crate::router::{self, MAX_JSON_BODY};
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
    let limits = shoal_httpd::Limits {
        max_body: MAX_JSON_BODY.max(view.max_invoke_body) as u64,
        ..shoal_httpd::Limits::default()
    };
    let metrics = Arc::new(metrics);
    let handler = move |req| {
        let (view, metrics) = (view.clone(), metrics.clone());
        async move { router::handle(req, &view, metrics.as_ref().as_ref()).await }
    };
    shoal_httpd::serve_with(listener, limits, handler, shutdown).await;
}
