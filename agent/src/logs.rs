//! The agent's log endpoint: `GET /v1/logs/{instance id}?tail=N` answers
//! `{"id", "stdout", "stderr"}` with the last `N` bytes of each of the instance's log files
//! (default [`DEFAULT_TAIL`], at most [`MAX_TAIL`]; lossy UTF-8). The files are read from the
//! log directory, so an instance that crashed or stopped still shows what it wrote. Control's
//! `GET /v1/functions/{name}/logs` (and `shoal fn logs`) asks each instance's agent here, at
//! the `logs_addr` of its record, forwarding its caller's token.
//!
//! Every log request needs `Authorization: Bearer <token>`, checked against the agent's
//! [`TokenBook`] and authorized for reading the metadata of the instance's function's tenant
//! (recorded beside its logs when it started, `<id>.tenant`): no token or a bad one is 401,
//! a role that may not read is 403, another tenant's instance (or one whose tenant is not
//! known) 404, as an unknown one. `GET /health` stays open.
use crate::supervisor::{log_path, read_tail, valid_id, LogStream};
use hyper::{Method, Request, StatusCode};
use shoal_httpd::{reply, Resp};
use shoal_meta::records::{validate_tenant, Action, Denied};
use shoal_meta::{TokenBook, TokenFollower};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Bytes of each stream returned when the request does not say.
pub(crate) const DEFAULT_TAIL: u64 = 64 << 10;
/// Most bytes of each stream one request gets.
pub(crate) const MAX_TAIL: u64 = 4 << 20;

fn error(status: StatusCode, code: &str, message: String) -> Resp {
    let body = serde_json::json!({ "code": code, "message": message }).to_string();
    reply(status, "application/json", body)
}

fn tail_of(query: Option<&str>) -> Result<u64, String> {
    match query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("tail="))
    {
        None => Ok(DEFAULT_TAIL),
        Some(v) => v
            .parse::<u64>()
            .map(|n| n.min(MAX_TAIL))
            .map_err(|_| format!("tail={v}: not a number")),
    }
}

fn tenant_path(log_dir: &Path, id: &str) -> PathBuf {
    log_dir.join(format!("{id}.tenant"))
}

/// Notes that instance `id`'s logs belong to `tenant` (read back by the log endpoint). A
/// failure is logged: that instance's logs are then readable by the operator only.
pub(crate) fn record_tenant(log_dir: &Path, id: &str, tenant: &str) {
    if let Err(e) = std::fs::write(tenant_path(log_dir, id), tenant) {
        tracing::warn!(instance = %id, error = %e, "recording the instance's tenant failed");
    }
}

/// The tenant recorded for instance `id`, if any (and well-formed).
fn tenant_of(log_dir: &Path, id: &str) -> Option<String> {
    let t = std::fs::read_to_string(tenant_path(log_dir, id)).ok()?;
    validate_tenant(&t).is_ok().then_some(t)
}

/// The bearer token of `req`, if it has one.
fn bearer(req: &Request<shoal_httpd::Body>) -> Option<&str> {
    req.headers()
        .get(hyper::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn refused(d: Denied) -> Resp {
    match d {
        Denied::Unauthenticated => error(
            StatusCode::UNAUTHORIZED,
            "Unauthenticated",
            "missing, unknown or expired token".into(),
        ),
        Denied::Role { .. } => error(StatusCode::FORBIDDEN, "PermissionDenied", d.to_string()),
        Denied::OtherTenant => error(StatusCode::NOT_FOUND, "NotFound", "no such instance".into()),
    }
}

async fn answer(req: Request<shoal_httpd::Body>, log_dir: Arc<PathBuf>, book: TokenBook) -> Resp {
    if req.uri().path() == "/health" && req.method() == Method::GET {
        return reply(StatusCode::OK, "application/json", r#"{"status":"ok"}"#);
    }
    let Some(id) = req.uri().path().strip_prefix("/v1/logs/") else {
        return error(StatusCode::NOT_FOUND, "NotFound", "no such path".into());
    };
    let principal = match bearer(&req).map(|t| book.authenticate(t)) {
        Some(Ok(p)) => p,
        Some(Err(d)) => return refused(d),
        None => return refused(Denied::Unauthenticated),
    };
    if req.method() != Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "InvalidArgument",
            "only GET".into(),
        );
    }
    if !valid_id(id) {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidArgument",
            format!("invalid instance id {id:?}"),
        );
    }
    let tenant = {
        let (dir, id) = (log_dir.clone(), id.to_owned());
        tokio::task::spawn_blocking(move || tenant_of(&dir, &id))
            .await
            .ok()
            .flatten()
    };
    // An instance whose tenant is not known is the operator's to read.
    let tenant = tenant
        .as_deref()
        .unwrap_or(shoal_meta::records::SYSTEM_TENANT);
    if let Err(d) = principal.authorize(Action::ReadMeta, tenant) {
        return refused(d);
    }
    let tail = match tail_of(req.uri().query()) {
        Ok(t) => t,
        Err(m) => return error(StatusCode::BAD_REQUEST, "InvalidArgument", m),
    };
    let (id, dir) = (id.to_owned(), log_dir.clone());
    let read = tokio::task::spawn_blocking(move || {
        let out = read_tail(&log_path(&dir, &id, LogStream::Stdout), tail)?;
        let err = read_tail(&log_path(&dir, &id, LogStream::Stderr), tail)?;
        Ok::<_, std::io::Error>(serde_json::json!({ "id": id, "stdout": out, "stderr": err }))
    })
    .await;
    match read {
        Ok(Ok(v)) => reply(StatusCode::OK, "application/json", v.to_string()),
        Ok(Err(e)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal",
            format!("reading the logs: {e}"),
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal",
            format!("reading the logs: {e}"),
        ),
    }
}

/// Serves the log endpoint on `listener` until `stop`, checking tokens against `book`
/// (whose `follower` is stopped with it).
pub(crate) async fn serve(
    listener: TcpListener,
    log_dir: PathBuf,
    book: TokenBook,
    follower: TokenFollower,
    stop: CancellationToken,
) {
    let log_dir = Arc::new(log_dir);
    shoal_httpd::serve(
        listener,
        move |req| answer(req, log_dir.clone(), book.clone()),
        stop,
    )
    .await;
    follower.stop().await;
}
