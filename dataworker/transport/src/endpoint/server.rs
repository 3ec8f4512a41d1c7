//! The server side: the accept loop, one task per connection and per stream, all tracked so that
//! shutdown can wait for them (up to `shutdown_grace`) and then reset the rest. A stream whose
//! reply was not completed is reset on drop, never finished.

use std::sync::Arc;

use bytes::Bytes;
use quinn::{RecvStream, SendStream, VarInt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::error::is_tls_refusal;
use super::service::BodyOwner;
use super::{Inner, Limits, Service};
use crate::wire::{self, close, reset, FrameError};

pub(super) async fn serve_loop<S: Service>(
    inner: Arc<Inner>,
    svc: Arc<S>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    // Cancelled when the shutdown grace has expired: remaining streams are reset.
    let abort = CancellationToken::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            incoming = inner.quinn.accept() => {
                let Some(incoming) = incoming else { break };
                if tracker.len() >= inner.limits.max_connections {
                    tracing::warn!(
                        peer = %incoming.remote_address(),
                        limit = inner.limits.max_connections,
                        "connection limit reached; refusing"
                    );
                    incoming.refuse();
                    continue;
                }
                tracker.spawn(serve_conn(
                    inner.clone(),
                    incoming,
                    svc.clone(),
                    shutdown.clone(),
                    abort.clone(),
                ));
            }
        }
    }
    tracker.close();
    let grace = tokio::time::sleep(inner.limits.shutdown_grace);
    tokio::pin!(grace);
    let mut grace_over = false;
    loop {
        tokio::select! {
            biased;
            _ = tracker.wait() => break,
            _ = &mut grace, if !grace_over => {
                tracing::warn!(streams = tracker.len(), "shutdown grace expired; resetting streams");
                abort.cancel();
                grace_over = true;
            }
            incoming = inner.quinn.accept() => match incoming {
                Some(incoming) => incoming.refuse(),
                // The endpoint closed: every connection is gone, so are the stream tasks soon.
                None => {
                    abort.cancel();
                    tracker.wait().await;
                    break;
                }
            },
        }
    }
}

async fn serve_conn<S: Service>(
    inner: Arc<Inner>,
    incoming: quinn::Incoming,
    svc: Arc<S>,
    shutdown: CancellationToken,
    abort: CancellationToken,
) {
    let peer = incoming.remote_address();
    let connecting = if peer.ip().is_loopback() {
        incoming.accept_with(inner.server_loopback.clone())
    } else {
        incoming.accept()
    };
    let connecting = match connecting {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "accepting connection failed");
            return;
        }
    };
    let handshake = tokio::select! {
        _ = abort.cancelled() => return,
        r = tokio::time::timeout(inner.limits.connect_timeout, connecting) => r,
    };
    let conn = match handshake {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) if is_tls_refusal(&e) => {
            tracing::warn!(%peer, error = %e, "TLS handshake refused");
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "handshake timed out");
            return;
        }
    };
    tracing::debug!(%peer, "accepted connection");
    let streams = TaskTracker::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = conn.accept_bi() => match r {
                Ok((send, recv)) => {
                    streams.spawn(serve_stream(
                        conn.clone(),
                        send,
                        recv,
                        svc.clone(),
                        inner.limits,
                        abort.clone(),
                    ));
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "connection ended");
                    break;
                }
            },
        }
    }
    streams.close();
    streams.wait().await;
    if shutdown.is_cancelled() {
        conn.close(close::SHUTDOWN, b"shutting down");
    }
}

/// Owns a reply stream; resets it on drop unless the reply was completed.
struct ReplyStream {
    send: SendStream,
    completed: bool,
    reset_code: VarInt,
    abort: CancellationToken,
}

impl Drop for ReplyStream {
    fn drop(&mut self) {
        if !self.completed {
            let code = if self.abort.is_cancelled() {
                reset::SHUTDOWN
            } else {
                self.reset_code
            };
            let _ = self.send.reset(code);
        }
    }
}

async fn serve_stream<S: Service>(
    conn: quinn::Connection,
    send: SendStream,
    recv: RecvStream,
    svc: Arc<S>,
    limits: Limits,
    abort: CancellationToken,
) {
    let out = ReplyStream {
        send,
        // A panic in the handler unwinds through here: the client sees INTERNAL.
        reset_code: reset::INTERNAL,
        completed: false,
        abort: abort.clone(),
    };
    tokio::select! {
        // Dropping the handler future drops `out`, which resets the stream with SHUTDOWN.
        _ = abort.cancelled() => {}
        _ = handle_stream(&conn, out, recv, &*svc, limits) => {}
    }
}

async fn handle_stream<S: Service>(
    conn: &quinn::Connection,
    mut out: ReplyStream,
    mut recv: RecvStream,
    svc: &S,
    limits: Limits,
) {
    let peer = conn.remote_address();
    let frame = match tokio::time::timeout(
        limits.request_timeout,
        wire::read_frame(&mut recv, limits.max_frame),
    )
    .await
    {
        Err(_) => {
            tracing::debug!(%peer, "request frame timed out");
            out.reset_code = reset::REQUEST_TIMEOUT;
            return;
        }
        Ok(Ok(frame)) => frame,
        Ok(Err(FrameError::Read(e))) => {
            tracing::debug!(%peer, error = %e, "reading request failed");
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!(%peer, reason = e.reason(), "malformed request; closing the connection");
            conn.close(close::PROTOCOL_VIOLATION, e.reason().as_bytes());
            return;
        }
    };
    drop(recv);
    let req: S::Req = match wire::decode_frame(&frame) {
        Ok(req) => req,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "undecodable request; closing the connection");
            conn.close(close::PROTOCOL_VIOLATION, b"undecodable request");
            return;
        }
    };
    drop(frame);
    let stopped = out.send.stopped();
    let reply = tokio::select! {
        reply = svc.handle(peer, req) => reply,
        _ = stopped => {
            tracing::debug!(%peer, "client abandoned the request");
            out.completed = true;
            return;
        }
    };
    let head = match wire::encode_frame(&reply.resp, limits.max_frame, wire::BODY_LEN) {
        Ok(Ok(head)) => head,
        Ok(Err(len)) => {
            tracing::error!(%peer, len, max = limits.max_frame, "response exceeds max_frame");
            return;
        }
        Err(e) => {
            tracing::error!(%peer, error = %e, "encoding the response failed");
            return;
        }
    };
    let mut head = head;
    let body = reply.body.map(|b| Bytes::from_owner(BodyOwner(b)));
    let body_len = body.as_ref().map_or(0, |b| b.len() as u64);
    head.extend_from_slice(&body_len.to_le_bytes());
    let mut chunks = [Bytes::from(head), body.unwrap_or_default()];
    if let Err(e) = out.send.write_all_chunks(&mut chunks).await {
        tracing::debug!(%peer, error = %e, "writing reply failed");
        out.completed = true;
        return;
    }
    if out.send.finish().is_err() {
        out.completed = true;
        return;
    }
    out.completed = true;
    // Stay in flight until the client has acknowledged everything, so shutdown waits for it.
    let _ = out.send.stopped().await;
}
