//! `/metrics` (Prometheus text) and `/health` (JSON) over HTTP/1.
use crate::worker::Worker;
use hyper::{Method, Request, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use shoal_httpd::{reply, Resp};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn route(
    req: &Request<hyper::body::Incoming>,
    worker: &Worker,
    metrics: Option<&PrometheusHandle>,
) -> Resp {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/health") | (&Method::GET, "/healthz") => {
            let s = match worker.handle(0, shoal_protocol::Request::Status) {
                shoal_protocol::Response::Status(s) => s,
                _ => Default::default(),
            };
            reply(
                StatusCode::OK,
                "application/json",
                format!(
                    "{{\"status\":\"ok\",\"node\":\"{}\",\"arena_bytes\":{},\"used_bytes\":{},\"clients\":{}}}",
                    s.node_id, s.arena_bytes, s.used_bytes, s.clients
                ),
            )
        }
        (&Method::GET, "/metrics") => match metrics {
            Some(h) => reply(StatusCode::OK, "text/plain; version=0.0.4", h.render()),
            None => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "metrics are not enabled\n",
            ),
        },
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

pub(crate) async fn serve(
    listener: TcpListener,
    worker: Arc<Worker>,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) {
    let metrics = Arc::new(metrics);
    let handler = move |req: Request<hyper::body::Incoming>| {
        let resp = route(&req, &worker, metrics.as_ref().as_ref());
        async move { resp }
    };
    shoal_httpd::serve(listener, handler, shutdown).await;
}
