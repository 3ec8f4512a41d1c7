//! The bounds every HTTP server applies (see the crate docs for what each one covers).
use std::time::Duration;

/// Most HTTP connections served at once, by default.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long a client may take to send a request's head (and how long a kept-alive
/// connection may sit idle), by default.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// One server's bounds; [`Limits::default`] suits endpoints that take no request bodies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once (at least 1).
    pub max_connections: usize,
    /// From waiting for a request (new connection, or idle after a response) to its whole
    /// head.
    pub header_timeout: Duration,
    /// From the end of the head to the end of the body.
    pub body_timeout: Duration,
    /// Largest request body, in bytes.
    pub max_body: u64,
    /// How long a response write may make no progress.
    pub write_timeout: Duration,
    /// How long requests in progress may take to finish after shutdown is asked for.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            header_timeout: HEADER_READ_TIMEOUT,
            body_timeout: Duration::from_secs(30),
            max_body: 64 << 10,
            write_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}
