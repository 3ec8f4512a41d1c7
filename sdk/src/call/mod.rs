//! Function calls through the node's proxy: [`CallClient`] makes calls, [`serve`] (or
//! [`FunctionInstance`]) runs a function instance that answers them.
//!
//! ```no_run
//! # async fn demo() -> Result<(), shoal_sdk::Error> {
//! use std::time::Duration;
//! let client = shoal_sdk::CallClient::connect("/run/shoal/proxy.sock").await?;
//! let out = client.invoke("echo", b"hi", Duration::from_secs(1)).await?;
//! assert_eq!(out, b"hi");
//! # Ok(()) }
//! ```
//!
//! Arguments and results up to the proxy's inline limit travel in the call itself; larger ones
//! travel as objects in the dataworker, named by id, when the caller (or the instance) has a
//! dataworker [`Client`] ([`CallClient::connect_with_store`], [`FunctionInstance::with_store`]).
//! The side that creates such an object for a call deletes it, on its own connection (so in
//! its own tenant): the caller its argument once the call is answered; the instance its result
//! once the caller says it holds a view of it (or, failing that, after a while or when the
//! instance stops). A caller never deletes an object it did not create: an instance that
//! returns someone else's id gets nothing released. Without a client, payloads above the
//! limit fail with `TooLarge`.
//!
//! Credentials: a connection presents a token in its hello when it has one
//! ([`CallOptions::token`]; [`CallOptions::from_env`] takes `SHOAL_TOKEN`); without one the
//! proxy knows a caller by its uid. An instance must present its own credential, which its
//! agent passes as `SHOAL_TOKEN` ([`InstanceEnv`]). A handler that takes [`Data`] sees an
//! object argument as a zero-copy [`View`], on whichever node the object lives (another node's
//! object is pulled once).
//!
//! Calls to instances on the caller's own node take a call lane when the instance offers one
//! (see the `lane` module): shared memory between caller and instance, with the proxy only
//! telling the caller where the lanes are. [`CallOptions::lanes`] turns that off.
//!
//! Layout, one job per file: `client` ([`CallClient`], [`CallOptions`]: the caller's side),
//! `instance` ([`FunctionInstance`], [`serve`], [`InstanceEnv`]: the instance's side), `data`
//! ([`Data`] and the objects that carry large payloads); this file holds the framing and
//! handshake both sides share.
use crate::Error;
use bytes::BytesMut;
use shoal_protocol::{
    encode_frame, CallerFrame, ErrorCode, FrameDecoder, ProxyFrame, Role, WireError,
    PROTOCOL_VERSION,
};
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

mod client;
mod data;
mod instance;

pub use client::{CallClient, CallOptions};
pub use data::Data;
pub use instance::{serve, FunctionInstance, InstanceEnv};

#[cfg(doc)]
use crate::{Client, View};

fn max_frame(inline_limit: u64) -> usize {
    usize::try_from(inline_limit)
        .unwrap_or(usize::MAX / 2)
        .saturating_add(64 * 1024)
        .max(1 << 20)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn encode(frame: &CallerFrame) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    encode_frame(frame, &mut out).map_err(|e| Error::protocol(format!("encoding: {e}")))?;
    Ok(out)
}

fn closed() -> WireError {
    WireError::new(ErrorCode::Unavailable, "the proxy closed the connection")
}

/// Reads one frame, buffering into `buf`; `Ok(None)` at a clean end of stream.
async fn read_frame(
    stream: &mut UnixStream,
    dec: &FrameDecoder,
    buf: &mut BytesMut,
) -> Result<Option<ProxyFrame>, Error> {
    loop {
        if let Some(f) = dec
            .decode::<ProxyFrame>(buf)
            .map_err(|e| Error::protocol(e.to_string()))?
        {
            return Ok(Some(f));
        }
        if stream.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// Connects and says hello (presenting `token`, if any); returns the stream, leftover bytes,
/// node id and inline limit.
async fn handshake(
    proxy_socket: &Path,
    role: Role,
    token: Option<&str>,
) -> Result<(UnixStream, BytesMut, String, u64), Error> {
    let mut stream = UnixStream::connect(proxy_socket).await?;
    let hello = encode(&CallerFrame::Hello {
        version: PROTOCOL_VERSION,
        role,
        token: token.map(str::to_owned),
    })?;
    stream.write_all(&hello).await?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    match read_frame(&mut stream, &FrameDecoder::new(1 << 20), &mut buf).await? {
        Some(ProxyFrame::Welcome {
            node_id,
            inline_limit,
        }) => Ok((stream, buf, node_id, inline_limit)),
        Some(ProxyFrame::Refused(e)) => Err(Error::Remote(e)),
        Some(_) => Err(Error::protocol("expected Welcome from the proxy")),
        None => Err(Error::Remote(closed())),
    }
}
