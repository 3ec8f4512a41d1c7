//! The accept loop and one task per connection; see the crate docs for the bounds.
use crate::body::{Body, Tripped, Verdict};
use crate::io::WriteStall;
use crate::{reply, Limits, Resp};
use hyper::body::Incoming;
use hyper::{header, Request, StatusCode};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long the accept loop pauses after a failed accept (out of file descriptors, say).
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

/// Serves `listener` with `handler` until `shutdown`, with the default [`Limits`].
pub async fn serve<H, F>(listener: TcpListener, handler: H, shutdown: CancellationToken)
where
    H: Fn(Request<Body>) -> F + Send + Sync + 'static,
    F: Future<Output = Resp> + Send + 'static,
{
    serve_with(listener, Limits::default(), handler, shutdown).await;
}

/// An error reply that also closes the connection (the rest of the request is not read).
fn refuse(status: StatusCode, code: &str, message: String) -> Resp {
    let body = format!(
        "{{\"code\":\"{code}\",\"message\":{}}}",
        json_string(&message)
    );
    let mut r = reply(status, "application/json", body);
    r.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    r
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn too_large(max: u64) -> Resp {
    refuse(
        StatusCode::PAYLOAD_TOO_LARGE,
        "TooLarge",
        format!("request body is over the limit of {max} bytes"),
    )
}

/// Serves `listener` with `handler` under `limits` until `shutdown`; see the crate docs.
pub async fn serve_with<H, F>(
    listener: TcpListener,
    limits: Limits,
    handler: H,
    shutdown: CancellationToken,
) where
    H: Fn(Request<Body>) -> F + Send + Sync + 'static,
    F: Future<Output = Resp> + Send + 'static,
{
    let handler = Arc::new(handler);
    let limits = Arc::new(limits);
    let conns = tokio_util::task::TaskTracker::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                    continue;
                }
            },
        };
        let (handler, limits, shutdown) = (handler.clone(), limits.clone(), shutdown.clone());
        conns.spawn(async move {
            let _permit = permit;
            let svc_limits = limits.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let limits = &svc_limits;
                let declared = req
                    .headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                let verdict = Arc::new(Verdict::default());
                let (max, timeout) = (limits.max_body, limits.body_timeout);
                let resp = declared.is_none_or(|n| n <= max).then(|| {
                    handler(req.map(|b| Body::new(b, max, timeout, verdict.clone())))
                });
                async move {
                    let Some(resp) = resp else {
                        return Ok::<_, std::convert::Infallible>(too_large(max));
                    };
                    let resp = resp.await;
                    Ok(match verdict.get() {
                        Some(Tripped::TooLarge) => too_large(max),
                        Some(Tripped::TimedOut) => refuse(
                            StatusCode::REQUEST_TIMEOUT,
                            "Timeout",
                            format!("the request body did not arrive within {timeout:?}"),
                        ),
                        None => resp,
                    })
                }
            });
            let io = WriteStall::new(stream, limits.write_timeout);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
            tokio::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(limits.shutdown_grace, conn.as_mut()).await {
                        Ok(r) => r,
                        Err(_) => {
                            tracing::debug!("http request still in progress at the end of the shutdown grace; dropping it");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = r {
                tracing::debug!(error = %e, "http connection closed");
            }
        });
    }
    conns.close();
    conns.wait().await;
}
