//! The client side: the cache of outbound connections (one per peer, one shared handshake) and
//! one request/response exchange per stream ([`Endpoint::call`], [`Endpoint::fetch`]). A reply
//! that breaks the framing closes the connection; a stateless reset from a restarted peer is
//! retried once on a fresh connection (the peer never saw the request).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::{ConnectionError, RecvStream};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use super::error::{is_tls_refusal, lost, read_err, write_err};
use super::{Endpoint, TransportError};
use crate::wire::{self, close, reset, FrameError};
use shoal_pki::SERVER_NAME;

/// Why a shared connection attempt failed (cloneable, so every waiter gets it).
#[derive(Debug, Clone)]
enum ConnectFailure {
    Start(quinn::ConnectError),
    Timeout(Duration),
    Handshake(ConnectionError),
    Disconnected,
}

impl ConnectFailure {
    fn into_error(self, peer: SocketAddr) -> TransportError {
        match self {
            ConnectFailure::Start(quinn::ConnectError::EndpointStopping) => {
                TransportError::Closed { peer }
            }
            ConnectFailure::Start(source) => TransportError::Connect { peer, source },
            ConnectFailure::Timeout(after) => TransportError::ConnectTimeout { peer, after },
            ConnectFailure::Handshake(e) if is_tls_refusal(&e) => {
                TransportError::Refused { peer, source: e }
            }
            ConnectFailure::Handshake(e) => TransportError::Handshake { peer, source: e },
            ConnectFailure::Disconnected => TransportError::Closed { peer },
        }
    }
}

/// One cached outbound connection (or the attempt to make it).
pub(super) struct Slot {
    conn: OnceCell<Result<quinn::Connection, ConnectFailure>>,
    /// Cancelled by `disconnect`: aborts the handshake, if still running.
    pub(super) cancel: CancellationToken,
}

impl Slot {
    fn is_dead(&self) -> bool {
        match self.conn.get() {
            None => false,
            Some(Ok(c)) => c.close_reason().is_some(),
            Some(Err(_)) => true,
        }
    }
}

impl Endpoint {
    /// Sends `req` to `peer` on a new stream and returns the decoded response. A reply with a body
    /// is an error ([`TransportError::UnexpectedBody`]).
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        peer: SocketAddr,
        req: &Req,
    ) -> Result<Resp, TransportError> {
        let (resp, body_len, mut recv, conn) = self.exchange(peer, req).await?;
        if body_len != 0 {
            let _ = recv.stop(reset::CANCELLED);
            return Err(TransportError::UnexpectedBody {
                peer,
                len: body_len,
            });
        }
        expect_end(peer, &conn, &mut recv).await?;
        Ok(resp)
    }

    /// Sends `req` to `peer` and returns the decoded response after streaming the reply's body
    /// into `sink(offset_in_body, bytes)` as it arrives. Fails if the body ends before its
    /// announced length. Several fetches to one peer run in parallel on one connection.
    pub async fn fetch<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        peer: SocketAddr,
        req: &Req,
        sink: &mut (dyn FnMut(u64, &[u8]) -> io::Result<()> + Send),
    ) -> Result<Resp, TransportError> {
        let (resp, body_len, mut recv, conn) = self.exchange(peer, req).await?;
        let mut received = 0u64;
        while received < body_len {
            let remaining = usize::try_from(body_len - received).unwrap_or(usize::MAX);
            match recv.read_chunk(remaining, true).await {
                Ok(Some(chunk)) => {
                    if let Err(source) = sink(received, &chunk.bytes) {
                        let _ = recv.stop(reset::CANCELLED);
                        return Err(TransportError::Sink { peer, source });
                    }
                    received += chunk.bytes.len() as u64;
                }
                Ok(None) => {
                    return Err(TransportError::BodyTruncated {
                        peer,
                        expected: body_len,
                        received,
                    })
                }
                Err(e) => return Err(read_err(peer, e)),
            }
        }
        expect_end(peer, &conn, &mut recv).await?;
        Ok(resp)
    }

    /// quinn's statistics of the cached connection to `peer`, if one is established.
    pub fn connection_stats(&self, peer: SocketAddr) -> Option<quinn::ConnectionStats> {
        let slot = self.lock_conns().get(&peer).cloned()?;
        match slot.conn.get() {
            Some(Ok(conn)) => Some(conn.stats()),
            _ => None,
        }
    }

    /// Drops the cached connection to `peer` (it left the cluster): calls in flight on it fail
    /// promptly with [`TransportError::Closed`]; the next call connects afresh.
    pub fn disconnect(&self, peer: SocketAddr) {
        let slot = self.lock_conns().remove(&peer);
        if let Some(slot) = slot {
            slot.cancel.cancel();
            if let Some(Ok(conn)) = slot.conn.get() {
                conn.close(close::DISCONNECTED, b"disconnected");
            }
        }
    }

    /// The cached connection to `peer`, connecting (once, shared by concurrent callers) if needed.
    async fn connection(&self, peer: SocketAddr) -> Result<quinn::Connection, TransportError> {
        // Bounded: each round either returns or replaces a cached connection that died.
        for _ in 0..3 {
            let slot = {
                let mut conns = self.lock_conns();
                match conns.get(&peer) {
                    Some(slot) if !slot.is_dead() => slot.clone(),
                    _ => {
                        let slot = Arc::new(Slot {
                            conn: OnceCell::new(),
                            cancel: CancellationToken::new(),
                        });
                        conns.insert(peer, slot.clone());
                        slot
                    }
                }
            };
            let established_before = slot.conn.initialized();
            let result = slot
                .conn
                .get_or_init(|| self.connect(peer, slot.cancel.clone()))
                .await;
            match result {
                Ok(conn) => match conn.close_reason() {
                    None => return Ok(conn.clone()),
                    // A cached connection died since the liveness check: connect afresh.
                    Some(_) if established_before => self.evict(peer, &slot),
                    // Closed right after the handshake (e.g. the server refused our certificate
                    // after the client side of the TLS 1.3 handshake had completed).
                    Some(reason) => {
                        self.evict(peer, &slot);
                        return Err(lost(peer, reason));
                    }
                },
                Err(failure) => {
                    self.evict(peer, &slot);
                    return Err(failure.clone().into_error(peer));
                }
            }
        }
        Err(TransportError::Closed { peer })
    }

    fn evict(&self, peer: SocketAddr, slot: &Arc<Slot>) {
        let mut conns = self.lock_conns();
        if conns.get(&peer).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            conns.remove(&peer);
        }
    }

    async fn connect(
        &self,
        peer: SocketAddr,
        cancel: CancellationToken,
    ) -> Result<quinn::Connection, ConnectFailure> {
        let config = if peer.ip().is_loopback() {
            self.inner.client_loopback.clone()
        } else {
            self.inner.client.clone()
        };
        let connecting = self
            .inner
            .quinn
            .connect_with(config, peer, SERVER_NAME)
            .map_err(ConnectFailure::Start)?;
        let after = self.inner.limits.connect_timeout;
        tokio::select! {
            _ = cancel.cancelled() => Err(ConnectFailure::Disconnected),
            r = tokio::time::timeout(after, connecting) => match r {
                Err(_) => Err(ConnectFailure::Timeout(after)),
                Ok(Err(e)) => Err(ConnectFailure::Handshake(e)),
                Ok(Ok(conn)) => {
                    tracing::debug!(%peer, "connected");
                    Ok(conn)
                }
            },
        }
    }

    /// Opens a stream, sends the request frame, and reads the response frame and body length.
    async fn exchange<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        peer: SocketAddr,
        req: &Req,
    ) -> Result<(Resp, u64, RecvStream, quinn::Connection), TransportError> {
        let max = self.inner.limits.max_frame;
        let frame = wire::encode_frame(req, max, 0)
            .map_err(TransportError::Encode)?
            .map_err(|len| TransportError::FrameTooLarge {
                peer,
                len: len as u64,
                max,
            })?;
        let frame = Bytes::from(frame);
        let mut retried = false;
        loop {
            let conn = self.connection(peer).await?;
            match exchange_on(peer, &conn, frame.clone(), max).await {
                // A stateless reset proves the peer (restarted) holds no state for the connection,
                // so it never saw the request: retry once on a fresh connection.
                Err(TransportError::ConnectionLost {
                    source: ConnectionError::Reset,
                    ..
                }) if !retried => {
                    tracing::debug!(%peer, "connection reset by restarted peer; reconnecting");
                    retried = true;
                }
                r => return r.map(|(resp, body_len, recv)| (resp, body_len, recv, conn)),
            }
        }
    }
}

/// One request/response exchange on `conn`, up to the response frame and body length.
async fn exchange_on<Resp: DeserializeOwned>(
    peer: SocketAddr,
    conn: &quinn::Connection,
    frame: Bytes,
    max: usize,
) -> Result<(Resp, u64, RecvStream), TransportError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(peer, e))?;
    send.write_chunk(frame)
        .await
        .map_err(|e| write_err(peer, e))?;
    // Finishing fails only if the peer already stopped or reset the stream; the read reports it.
    let _ = send.finish();
    let frame = match wire::read_frame(&mut recv, max).await {
        Ok(frame) => frame,
        Err(e) => return Err(frame_err(peer, conn, e)),
    };
    let resp = match wire::decode_frame(&frame) {
        Ok(resp) => resp,
        Err(source) => {
            tracing::warn!(%peer, error = %source, "undecodable reply; closing the connection");
            conn.close(close::PROTOCOL_VIOLATION, b"undecodable reply");
            return Err(TransportError::Decode { peer, source });
        }
    };
    let body_len = match wire::read_body_len(&mut recv).await {
        Ok(n) => n,
        Err(e) => return Err(frame_err(peer, conn, e)),
    };
    Ok((resp, body_len, recv))
}

/// Maps a reply framing error, closing the connection on a protocol violation.
fn frame_err(peer: SocketAddr, conn: &quinn::Connection, e: FrameError) -> TransportError {
    match e {
        FrameError::Read(e) => read_err(peer, e),
        FrameError::TooLarge { len, max } => {
            tracing::warn!(%peer, len, max, "oversized reply frame; closing the connection");
            conn.close(close::PROTOCOL_VIOLATION, e.reason().as_bytes());
            TransportError::FrameTooLarge { peer, len, max }
        }
        FrameError::Truncated => {
            // The server ends a stream without a complete reply only by resetting it, so a FIN
            // inside the frame is a protocol violation.
            tracing::warn!(%peer, "truncated reply frame; closing the connection");
            conn.close(close::PROTOCOL_VIOLATION, e.reason().as_bytes());
            TransportError::Malformed {
                peer,
                reason: "truncated reply frame",
            }
        }
    }
}

/// Checks that the reply stream ends right after the body.
async fn expect_end(
    peer: SocketAddr,
    conn: &quinn::Connection,
    recv: &mut RecvStream,
) -> Result<(), TransportError> {
    match recv.read_chunk(1, true).await {
        Ok(None) => Ok(()),
        Ok(Some(_)) => {
            tracing::warn!(%peer, "reply longer than announced; closing the connection");
            conn.close(close::PROTOCOL_VIOLATION, b"reply longer than announced");
            Err(TransportError::Malformed {
                peer,
                reason: "reply longer than announced",
            })
        }
        Err(e) => Err(read_err(peer, e)),
    }
}
