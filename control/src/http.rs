//! Control's HTTP API (JSON): `/health`, `/v1/nodes`, `/v1/leader`, `/metrics`. Every answer
//! says whether this process leads; a standby answers reads itself and names the leader.
use crate::{read, View};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
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

fn json_reply(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", v.to_string())
}

fn route(
    req: &Request<hyper::body::Incoming>,
    view: &View,
    metrics: Option<&PrometheusHandle>,
) -> Response<Full<Bytes>> {
    let (role, leader) = view.role();
    let mut resp = match (req.method(), req.uri().path()) {
        (&Method::GET, "/health") | (&Method::GET, "/healthz") => json_reply(
            StatusCode::OK,
            json!({"status": "ok", "name": view.name, "role": role, "leader": leader}),
        ),
        (&Method::GET, "/v1/leader") => json_reply(
            StatusCode::OK,
            json!({"role": role, "name": view.name, "leader": leader}),
        ),
        (&Method::GET, "/v1/nodes") => {
            let nodes: Vec<_> = read(&view.nodes).values().cloned().collect();
            json_reply(
                StatusCode::OK,
                json!({"role": role, "leader": leader, "nodes": nodes}),
            )
        }
        (&Method::GET, "/metrics") => match metrics {
            Some(h) => reply(StatusCode::OK, "text/plain; version=0.0.4", h.render()),
            None => json_reply(
                StatusCode::NOT_FOUND,
                json!({"code": "NotFound", "message": "metrics are not enabled"}),
            ),
        },
        (_, path) => json_reply(
            StatusCode::NOT_FOUND,
            json!({"code": "NotFound", "message": format!("no route {} {path}", req.method())}),
        ),
    };
    if let Ok(v) = role.parse() {
        resp.headers_mut().insert("x-shoal-role", v);
    }
    resp
}

pub(crate) async fn serve(
    listener: TcpListener,
    view: Arc<View>,
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
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (view, metrics, shutdown) = (view.clone(), metrics.clone(), shutdown.clone());
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let resp = route(&req, &view, metrics.as_ref().as_ref());
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
