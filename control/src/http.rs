//! Control's HTTP server: accepts connections (at most [`MAX_CONNECTIONS`] at once, each
//! with a header read timeout) and hands every request to the router. A connection that
//! breaks the protocol is answered (400) and closed by hyper; the others are unaffected.
use crate::router;
use crate::View;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Most HTTP connections served at once; further ones wait in the listen backlog.
pub(crate) const MAX_CONNECTIONS: usize = 1024;
/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn serve(
    listener: TcpListener,
    view: Arc<View>,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) {
    let metrics = Arc::new(metrics);
    let conns = tokio_util::task::TaskTracker::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
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
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (view, metrics, shutdown) = (view.clone(), metrics.clone(), shutdown.clone());
        conns.spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let (view, metrics) = (view.clone(), metrics.clone());
                async move {
                    let resp = router::handle(req, &view, metrics.as_ref().as_ref()).await;
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
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
