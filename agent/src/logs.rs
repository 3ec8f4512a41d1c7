//! The agent's log endpoint: `GET /v1/logs/{instance id}?tail=N` answers
//! `{"id", "stdout", "stderr"}` with the last `N` bytes of each of the instance's log files
//! (default [`DEFAULT_TAIL`], at most [`MAX_TAIL`]; lossy UTF-8). The files are read from the
//! log directory, so an instance that crashed or stopped still shows what it wrote. Control's
//! `GET /v1/functions/{name}/logs` (and `shoal fn logs`) asks each instance's agent here, at
//! the `logs_addr` of its record.
use crate::supervisor::{log_path, read_tail, valid_id, LogStream};
use hyper::{Method, Request, StatusCode};
use shoal_httpd::{reply, Resp};
use std::path::PathBuf;
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

async fn answer(req: Request<hyper::body::Incoming>, log_dir: Arc<PathBuf>) -> Resp {
    let Some(id) = req.uri().path().strip_prefix("/v1/logs/") else {
        return error(StatusCode::NOT_FOUND, "NotFound", "no such path".into());
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

/// Serves the log endpoint on `listener` until `stop`.
pub(crate) async fn serve(listener: TcpListener, log_dir: PathBuf, stop: CancellationToken) {
    let log_dir = Arc::new(log_dir);
    shoal_httpd::serve(listener, move |req| answer(req, log_dir.clone()), stop).await;
}
