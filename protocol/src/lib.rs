//! shoal's wire protocol: object ids, stable error codes, the messages a local client and a
//! dataworker exchange, and the length-prefixed framing that carries them; and the one rule
//! of every kind of name (function, instance, object, key, pool, tenant, stream, node) that
//! every component checks at its edge ([`IdKind`]).
//!
//! This crate does no IO and never panics on input: every decoder returns a typed error for
//! garbage, truncated or oversized input (see the proptest suite in `frame`). Both sides of
//! every wire depend on it and on nothing else of each other.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod call;
mod error;
mod frame;
mod id;
mod message;
mod names;
mod peer;

pub use call::{CallerFrame, LaneInfo, LaneKey, Payload, ProxyFrame, Role, LANE_KEY_LEN};
pub use error::{ErrorCode, WireError};
pub use frame::{encode_frame, FrameDecoder, FrameError, FRAME_HEADER_LEN, PROTOCOL_VERSION};
pub use id::{split_qualified, tenant_prefix, ObjectId, DEFAULT_TENANT, TENANT_SEPARATOR};
pub use message::{
    ClientFrame, ClientHello, CtlLayout, Hello, KvEntry, ListEntry, Namespace, Request, Response,
    ServerFrame, StatusInfo, ViewDesc, MAX_CLIENT_HELLO, MAX_TOKEN_LEN,
};
pub use names::{
    IdError, IdKind, IdProblem, MAX_ID_LEN, MAX_INSTANCE_ID_LEN, MAX_NAME_LEN, MAX_NODE_ID_LEN,
    MAX_STREAM_NAME_LEN, MAX_TENANT_LEN,
};
pub use peer::{HeldObject, NodeRecord, PeerRequest, PeerResponse};
