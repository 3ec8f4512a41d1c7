//! `/metrics` (Prometheus text) and `/health` (JSON) over HTTP/1.
use crate::state::Shared;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn reply(status: StatusCode, ctype: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = ctype.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn route(
    req: &Request<hyper::body::Incoming>,
    shared: &Shared,
    metrics: Option<&PrometheusHandle>,
) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/health") | (&Method::GET, "/healthz") => {
            let s = match shared.handle(0, shoal_protocol::Request::Status) {
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
                "metrics are not enabled\n".into(),
            ),
        },
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) {
    let metrics = Arc::new(metrics);
    let conns = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    continue;
                }
            },
        };
        let (shared, metrics, shutdown) = (shared.clone(), metrics.clone(), shutdown.clone());
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let resp = route(&req, &shared, metrics.as_ref().as_ref());
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { tracing::debug!(error = %e, "http connection closed") },
                _ = shutdown.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
    conns.close();
    conns.wait().await;
}
