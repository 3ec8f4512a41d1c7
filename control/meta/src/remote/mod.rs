//! Remote access: control serves a store to nodes ([`serve`]); nodes use [`RemoteStore`].
//!
//! Transport: TLS 1.3 over TCP with mutual authentication under the cluster CA (`shoal-pki`),
//! and nothing else: there is no plain-TCP mode. Control presents its own certificate
//! (`ControlTls`, name `shoal-control`), which a node verifies by that name against the CA; a
//! node presents its node certificate (`NodeTls`), which control verifies against the CA. A
//! client without such a certificate is refused before any request is read.
//!
//! Wire, inside TLS: shoal's framing (`[u32 len][u8 version][postcard body]`). The client sends
//! [`ClientMsg`]s, each with a `u32` id; the server answers each with a
//! [`ServerMsg::Reply`] carrying that id, in any order, so many calls share one connection. A
//! watch is a request whose reply is `Watching`, followed by `Event`s tagged with the
//! request's id, until `WatchEnded` (the store ended it) or `CancelWatch` from the client.
//!
//! Invariants:
//! - Connections are bounded: at most [`MAX_CONNECTIONS`] at once, each counted from its
//!   accept, so handshakes count too; a handshake that does not finish within
//!   [`HANDSHAKE_TIMEOUT`] is dropped.
//! - Every queue is bounded: per connection at most [`MAX_INFLIGHT`] requests run at once
//!   (the server stops reading beyond that), replies and events wait in a queue of
//!   [`OUT_QUEUE`], and a client's watch whose [`WATCH_QUEUE`] fills is ended, not buffered.
//! - A malformed, truncated-then-closed or oversized frame closes that connection only.
//! - Every task is owned: connection tasks by [`serve`] (which waits for them at shutdown),
//!   a client connection's reader and writer by the [`RemoteStore`] (they stop when it is
//!   dropped or closed).
//!
//! Layout, one job per file: `wire` (the messages and their codec), `server` ([`serve`]),
//! `client` ([`RemoteStore`]); the limits below are shared by both sides.
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

mod client;
mod server;
mod wire;

pub use client::RemoteStore;
pub use server::serve;

#[cfg(test)]
mod tests;

/// Not an API: the protocol's messages, their codec and the server's handling of one call,
/// for shoal's fuzz targets (`common/fuzz`), which feed them what a client or a server could
/// send. Hidden from the docs; it may change with any commit.
#[doc(hidden)]
pub mod fuzz_support {
    pub use super::server::run;
    pub use super::wire::{
        decode_request, decode_server_msg, encode_server_msg, ClientMsg, Req, Resp, ServerMsg,
        WireMetaError,
    };
    pub use super::{MAX_REPLY_FRAME, MAX_REQUEST_FRAME};
}

#[cfg(doc)]
use wire::{ClientMsg, ServerMsg};

/// Largest request body the server accepts.
pub const MAX_REQUEST_FRAME: usize = 4 << 20;
/// Largest reply body the client accepts (a big `range`); larger replies become errors.
pub const MAX_REPLY_FRAME: usize = 64 << 20;
/// Connections one server accepts at once (those still in their TLS handshake included).
const MAX_CONNECTIONS: usize = 1024;
/// Longest the server waits for a client to finish its TLS handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests one connection may have running at once.
const MAX_INFLIGHT: usize = 64;
/// Watches one connection may hold.
const MAX_WATCHES: usize = 1024;
/// Messages waiting to be written, per connection and direction.
const OUT_QUEUE: usize = 256;
/// Events a client's watch may fall behind by before it is ended.
const WATCH_QUEUE: usize = 1024;
/// Bytes gathered into one socket write.
const WRITE_BATCH: usize = 64 << 10;
/// Longest a client waits for a connection: TCP connect and TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
