//! The dataworker's HTTP endpoint: `/health` (open), `/metrics` (Prometheus text) and
//! `GET /v1/usage` (per-tenant usage against quota).
//!
//! Who may ask: `/health` is open. `/metrics` is open when the listener is bound to a
//! loopback address, else it needs a bearer token of the system tenant. `/v1/usage` always
//! needs a bearer token (checked with the worker's token book): a principal sees its own
//! tenant, the operator (the system tenant's admin) every tenant. A worker without a
//! metadata store has no token book, so those routes answer 401 there (except a loopback
//! `/metrics`). Errors are `{"code": "<ErrorCode name>", "message": "..."}`.
use crate::worker::Worker;
use hyper::{header, Method, Request, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use shoal_httpd::{reply, Resp};
use shoal_meta::records::{Principal, SYSTEM_TENANT};
use shoal_protocol::{ErrorCode, WireError};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn error_reply(e: &WireError) -> Resp {
    let status = match e.code {
        ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let body = serde_json::json!({"code": e.code.name(), "message": e.message});
    let mut r = reply(status, "application/json", body.to_string());
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    r
}

/// The bearer token of a request, if it carries one.
fn bearer(req: &Request<shoal_httpd::Body>) -> Option<String> {
    let v = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

async fn principal(worker: &Worker, token: Option<String>) -> Result<Principal, WireError> {
    let token = token
        .ok_or_else(|| WireError::new(ErrorCode::Unauthenticated, "a bearer token is required"))?;
    worker.auth.authenticate(&token).await
}

fn health(worker: &Worker) -> Resp {
    let s = worker.status();
    let body = serde_json::json!({
        "status": "ok",
        "node": s.node_id,
        "arena_bytes": s.arena_bytes,
        "used_bytes": s.used_bytes,
        "clients": s.clients,
    });
    reply(StatusCode::OK, "application/json", body.to_string())
}

async fn route(
    method: Method,
    path: String,
    token: Option<String>,
    worker: Arc<Worker>,
    metrics: Arc<Option<PrometheusHandle>>,
    loopback: bool,
) -> Resp {
    match (&method, path.as_str()) {
        (&Method::GET, "/health") | (&Method::GET, "/healthz") => health(&worker),
        (&Method::GET, "/metrics") => {
            if !loopback {
                match principal(&worker, token).await {
                    Ok(p) if p.tenant == SYSTEM_TENANT => {}
                    Ok(_) => {
                        return error_reply(&WireError::new(
                            ErrorCode::PermissionDenied,
                            "metrics need a token of the system tenant",
                        ))
                    }
                    Err(e) => return error_reply(&e),
                }
            }
            match metrics.as_ref() {
                Some(h) => reply(StatusCode::OK, "text/plain; version=0.0.4", h.render()),
                None => reply(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    "metrics are not enabled\n",
                ),
            }
        }
        (&Method::GET, "/v1/usage") => match principal(&worker, token).await {
            Ok(p) => {
                let only = (!p.is_system_admin()).then_some(p.tenant.as_str());
                let body = serde_json::to_string(&worker.local.usage(only))
                    .unwrap_or_else(|_| "{}".into());
                reply(StatusCode::OK, "application/json", body)
            }
            Err(e) => error_reply(&e),
        },
        _ => error_reply(&WireError::new(ErrorCode::NotFound, "no such route")),
    }
}

pub(crate) async fn serve(
    listener: TcpListener,
    worker: Arc<Worker>,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) {
    let loopback = listener.local_addr().is_ok_and(|a| a.ip().is_loopback());
    let metrics = Arc::new(metrics);
    let handler = move |req: Request<shoal_httpd::Body>| {
        let token = bearer(&req);
        route(
            req.method().clone(),
            req.uri().path().to_owned(),
            token,
            worker.clone(),
            metrics.clone(),
            loopback,
        )
    };
    shoal_httpd::serve(listener, handler, shutdown).await;
}
