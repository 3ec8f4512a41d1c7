//! The shoal client library: objects and KV in the node's shared memory, with zero-copy reads.
//!
//! ```no_run
//! # async fn demo() -> Result<(), shoal_sdk::Error> {
//! let client = shoal_sdk::Client::connect("/run/shoal/dataworker.sock").await?;
//! client.put("greeting", b"hello").await?;
//! let view = client.get("greeting", std::time::Duration::from_secs(1)).await?;
//! assert_eq!(&view[..], b"hello"); // bytes in shared memory, not a copy
//! # Ok(()) }
//! ```
//!
//! A local hit costs no syscall: the client probes the worker's shared index and pins the
//! object in its own pin page (see ARCHITECTURE.md). Views release their pin when dropped.
//! Everything else is one request on the worker's Unix socket.
//!
//! Each connection acts in one tenant: the worker's own uid's clients in the default tenant,
//! a client that presents a token (`SHOAL_TOKEN`, or [`ConnectOptions::token`]) in the
//! token's. Ids are the tenant's own; another tenant's objects and keys are invisible.
//!
//! Memory: the arena and the index are mapped read-only (the worker sealed them so that no
//! route can write them); what this client writes goes to its own process memory (payloads
//! up to the inline limit, sent inline) or to a segment of its own that it maps read-write
//! until sealing unmaps it. Sealed segments it reads are mapped read-only and cached. There is
//! no `unsafe` here: the mappings are `shoal-shm`'s.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod blocking;
mod call;
mod client;
mod conn;
mod error;
mod lane;
mod view;

pub use call::{serve, CallClient, CallOptions, Data, FunctionInstance, InstanceEnv};
pub use client::{Client, ConnectOptions, SetOptions, SOCKET_ENV, TOKEN_ENV};
pub use error::Error;
pub use shoal_protocol::Payload;
pub use shoal_protocol::{ErrorCode, ListEntry, ObjectId, StatusInfo};
pub use view::{ObjectBuilder, View};
