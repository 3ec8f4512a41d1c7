//! A typed client for control's REST API: what the CLI and the tests use instead of speaking
//! HTTP by hand.
//!
//! - [`ControlClient`] has one async method per call: functions (create, get, list, update,
//!   delete, their instances, invoke, logs), all instances, pools, nodes, leader, health,
//!   tokens (issue, list, revoke), tenant quotas and `whoami`. Requests and answers are the
//!   records of `shoal_meta::records` ([`FunctionSpec`], [`Pool`], [`InstanceRecord`],
//!   [`NodeRecord`], [`LeaderInfo`], [`Quota`]) and the few bodies defined here ([`Health`],
//!   [`Leader`], [`Nodes`], [`InstanceLogs`], [`TokenRequest`], [`IssuedToken`],
//!   [`TokenInfo`], [`QuotaStatus`], [`WhoAmI`]).
//! - Every route but `/health` needs a bearer token ([`ControlClient::with_token`]);
//!   [`find_token`] finds the user's the way the CLI does (`--token`, `SHOAL_TOKEN`,
//!   `SHOAL_TOKEN_FILE`, then the admin token `shoal up` leaves in the runtime directory).
//!   The token never appears in debug output.
//! - [`ClientError`] names the step that failed. An error answer from control becomes
//!   [`ClientError::Api`] with control's stable [`ErrorCode`] parsed from its JSON body
//!   (`{"code": "NotFound", "message": ...}`), so callers branch on the code, not on text
//!   or HTTP statuses.
//! - Every request has a deadline ([`DEFAULT_TIMEOUT`], or [`ControlClient::with_timeout`];
//!   an invoke waits for its call's own deadline plus [`INVOKE_MARGIN`]).
//!
//! Invariant: every request's method and path come from [`ROUTES`], and `tests/openapi.rs`
//! checks that each entry is an operation of `control/openapi.json`, the API's contract. So no
//! method can call a route the document does not declare.
//!
//! This crate never depends on `shoal-control` (the server): only on the shared records and
//! error codes. It holds no `unsafe`, reads no environment (the caller passes a lookup to
//! [`find_token`]) and keeps no global state (TLS, for an `https://` control, is configured
//! per client with the ring provider; nothing is installed process-wide).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod error;
mod routes;
mod token;
mod types;

pub use client::{ControlClient, DEFAULT_TIMEOUT, INVOKE_MARGIN};
pub use error::ClientError;
pub use routes::ROUTES;
pub use token::{
    default_runtime_dir, find_token, read_token_file, FoundToken, TokenSource, ADMIN_TOKEN_FILE,
    TOKEN_ENV, TOKEN_FILE_ENV,
};
pub use types::{
    ControlRole, Health, InstanceLogs, IssuedToken, Leader, Nodes, QuotaStatus, QuotaUsage,
    TokenInfo, TokenRequest, WhoAmI,
};

pub use shoal_meta::records::{
    FunctionSpec, InstanceRecord, LeaderInfo, NodeRecord, Pool, Quota, Role,
};
pub use shoal_protocol::ErrorCode;
