//! The QUIC endpoint: one UDP socket that is both client (cached connections to peers) and server
//! (an accept loop dispatching streams to a [`Service`]).
//!
//! Invariants:
//! - One bidirectional stream carries exactly one request and its reply (see `wire`).
//! - At most one cached outbound connection per peer address; concurrent first calls share one
//!   handshake, and a failed handshake is reported to every caller that waited for it.
//! - Every server-side connection and stream runs in a task tracked by the serve loop; shutdown
//!   stops accepting, waits up to `shutdown_grace` for in-flight streams, then resets the rest.
//! - A server stream that ends without completing its reply (handler panic, shutdown, task
//!   dropped) is reset, never finished, so a client can't mistake a partial reply for a whole one.
//! - Reply bodies are handed to QUIC without copying; the [`Body`] is dropped once every byte is
//!   acknowledged or the stream is abandoned.
//!
//! This file holds the [`Endpoint`] handle, its shared state and its lifecycle (serve, close).
//! The rest, one job per file:
//! - `config`: [`TransportConfig`] and [`Congestion`], the settings callers choose.
//! - `error`: [`TransportError`] and the mapping of quinn's errors onto it.
//! - `service`: what a server plugs in: [`Service`], [`Reply`], [`Body`].
//! - `setup`: [`Endpoint::bind`]: the UDP socket and the quinn configurations built from the
//!   settings (windows, MTU, congestion, stateless-reset key, connection ids).
//! - `client`: the connection cache and the client side of an exchange ([`Endpoint::call`],
//!   [`Endpoint::fetch`]).
//! - `server`: the accept loop and the server side of an exchange.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::wire::close;

mod client;
mod config;
mod error;
mod server;
mod service;
mod setup;

pub use config::{Congestion, TransportConfig};
pub use error::TransportError;
pub use service::{Body, Reply, Service};

use client::Slot;
use server::serve_loop;

#[derive(Debug, Clone, Copy)]
struct Limits {
    max_frame: usize,
    connect_timeout: Duration,
    request_timeout: Duration,
    shutdown_grace: Duration,
    max_connections: usize,
}

struct Inner {
    quinn: quinn::Endpoint,
    local_addr: SocketAddr,
    client: quinn::ClientConfig,
    client_loopback: quinn::ClientConfig,
    server_loopback: Arc<quinn::ServerConfig>,
    conns: Mutex<HashMap<SocketAddr, Arc<Slot>>>,
    limits: Limits,
}

/// A QUIC endpoint: one UDP socket, both client and server. Cheap to clone.
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("local_addr", &self.inner.local_addr)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Runs the accept loop until `shutdown` is cancelled (or the endpoint is closed). Each
    /// connection and each stream is a task tracked by the loop; on shutdown the loop stops
    /// accepting, waits up to `shutdown_grace` for in-flight streams, resets what is left, closes
    /// its connections and returns.
    pub fn serve<S: Service>(
        &self,
        svc: Arc<S>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(serve_loop(self.inner.clone(), svc, shutdown))
    }

    /// Number of QUIC connections on this endpoint, inbound and outbound (including ones still
    /// closing).
    pub fn open_connections(&self) -> usize {
        self.inner.quinn.open_connections()
    }

    /// Closes every connection and the endpoint, then waits (at most `shutdown_grace`) for the
    /// close to reach peers. Serve loops end; later calls fail.
    pub async fn close(&self) {
        let slots: Vec<_> = self.lock_conns().drain().map(|(_, s)| s).collect();
        for slot in slots {
            slot.cancel.cancel();
        }
        self.inner.quinn.close(close::NORMAL, b"closing");
        let _ = tokio::time::timeout(
            self.inner.limits.shutdown_grace,
            self.inner.quinn.wait_idle(),
        )
        .await;
    }

    fn lock_conns(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<Slot>>> {
        self.inner
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
