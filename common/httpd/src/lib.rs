//! The HTTP/1 server loop shared by control's REST API, the dataworker's `/health` and
//! `/metrics`, the agent's log endpoint and the proxy's `/metrics`: every HTTP server of
//! shoal goes through [`serve`] (or [`serve_with`]), so each gets the same bounds ([`Limits`]):
//!
//! - at most `max_connections` connections at once (further ones wait in the listen backlog
//!   until one ends);
//! - `header_timeout` to send a request's head, counted from when the server starts waiting
//!   for it: on a new connection, and on a kept-alive one after the previous response, so it
//!   is also the keep-alive idle timeout;
//! - `body_timeout` for the body, counted from the end of the head: the whole request arrives
//!   within `header_timeout + body_timeout` or the connection is cut (408) — a client that
//!   trickles its body cannot hold a connection;
//! - `max_body` bytes of body, enforced while reading (a declared `Content-Length` over it is
//!   refused before the handler runs): 413, and the connection closes;
//! - `write_timeout` without progress while writing a response (a client that stops reading
//!   is cut off);
//! - on shutdown, requests in progress get `shutdown_grace` to finish (hyper's graceful
//!   shutdown), then their connections are dropped.
//!
//! A connection that breaks the protocol is answered (400) and closed by hyper; the others are
//! unaffected. Handlers receive the request with a [`Body`] that enforces the body bounds;
//! when it trips, the handler's response is replaced by the 408 or 413.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod body;
mod io;
mod limits;
mod server;

pub use body::{Body, BodyError};
pub use limits::{Limits, HEADER_READ_TIMEOUT, MAX_CONNECTIONS};
pub use server::{serve, serve_with};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};

/// A whole response.
pub type Resp = Response<Full<Bytes>>;

/// A response with `status`, a `Content-Type` and `body`.
pub fn reply(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = ctype.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}
