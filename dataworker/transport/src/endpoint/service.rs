//! What a server plugs into [`Endpoint::serve`]: the [`Service`] that handles one request, and
//! its [`Reply`] with an optional raw [`Body`] that is sent without a copy (a body must return the
//! same slice every time it is read).

use std::fmt;
use std::net::SocketAddr;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

#[cfg(doc)]
use super::Endpoint;

/// A request handler run by [`Endpoint::serve`], once per incoming stream.
#[async_trait::async_trait]
pub trait Service: Send + Sync + 'static {
    /// The request type.
    type Req: DeserializeOwned + Send;
    /// The response type.
    type Resp: Serialize + Send;
    /// Handles one request from `peer`. The future is dropped if the client abandons the request
    /// or the server's shutdown grace expires.
    async fn handle(&self, peer: SocketAddr, req: Self::Req) -> Reply<Self::Resp>;
}

/// Bytes streamed after a response frame. The server drops the body once every byte has been
/// acknowledged by the client or the stream has been abandoned.
///
/// `bytes` must return the same slice every time it is called (it is read once, then the slice is
/// referenced until the body is dropped).
pub trait Body: Send + Sync {
    /// The body's bytes.
    fn bytes(&self) -> &[u8];
}

impl Body for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl Body for Box<[u8]> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl Body for Bytes {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl Body for &'static [u8] {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// Adapts a [`Body`] to `Bytes::from_owner`.
pub(super) struct BodyOwner(pub(super) Box<dyn Body>);

impl AsRef<[u8]> for BodyOwner {
    fn as_ref(&self) -> &[u8] {
        self.0.bytes()
    }
}

/// A handler's reply: the response, and optionally a raw body streamed after it.
pub struct Reply<R> {
    /// The response frame.
    pub resp: R,
    /// The raw body, if any.
    pub body: Option<Box<dyn Body>>,
}

impl<R> Reply<R> {
    /// A reply without body.
    pub fn new(resp: R) -> Reply<R> {
        Reply { resp, body: None }
    }

    /// A reply with a body.
    pub fn with_body(resp: R, body: impl Body + 'static) -> Reply<R> {
        Reply {
            resp,
            body: Some(Box::new(body)),
        }
    }
}

impl<R: fmt::Debug> fmt::Debug for Reply<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reply")
            .field("resp", &self.resp)
            .field("body_len", &self.body.as_ref().map(|b| b.bytes().len()))
            .finish()
    }
}
