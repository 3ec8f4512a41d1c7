//! Function calls: what callers, function instances and a node's proxy say to each other on
//! the proxy's Unix socket (same framing as the dataworker's: `[u32 len][u8 version][postcard]`).
//!
//! A connection starts with [`CallerFrame::Hello`], naming its role and presenting a token if
//! it has one. A caller sends `Call`s and gets a `Reply` per call id, in any order (many calls
//! in flight on one connection). An instance receives `Invoke`s (at most its declared
//! concurrency at once) and answers each with `Result`. Arguments and results travel inline up
//! to the proxy's inline limit; larger ones are objects in the node's dataworker, named by id.
//!
//! Who may do what: the proxy maps a caller to a tenant by its token, else by its uid
//! (`SO_PEERCRED`), and serves it only its tenant's functions. An instance must present its
//! own credential (a token bound to exactly the function and instance id it registers as).
//!
//! Result objects are released by the instance that stored them, in its own tenant: the caller
//! says [`CallerFrame::Release`] once it holds the object, the proxy passes that on as
//! [`ProxyFrame::Release`], and the instance deletes the object. A caller never deletes an
//! object it did not create.
//!
//! Call lanes: an instance may also serve calls from callers on its own node directly, over
//! shared memory ([`CallerFrame::Lane`] announces the Unix socket where it hands out lanes,
//! and the key a caller must present there). A caller asks the proxy which local instances
//! of a function offer one ([`CallerFrame::Lanes`]); the proxy answers only for functions
//! the caller may call, and stays the router for everything else.
use crate::{ObjectId, WireError};
use serde::{Deserialize, Serialize};

/// Bytes of the secret a caller presents on an instance's lane socket ([`LaneInfo::key`]).
pub const LANE_KEY_LEN: usize = 16;

/// The secret that opens an instance's call lanes: drawn by the instance, told to the proxy,
/// and handed by the proxy only to callers that may call the instance's function.
pub type LaneKey = [u8; LANE_KEY_LEN];

/// Argument or result bytes of a call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// The bytes themselves (at most the inline limit).
    Inline(Vec<u8>),
    /// An object in the dataworker holding the bytes.
    Object(ObjectId),
}

/// Who is on the other end of a proxy connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Makes calls.
    Caller,
    /// A function instance that serves calls.
    Instance {
        /// Function name.
        function: String,
        /// Instance id (unique on the node).
        instance_id: String,
        /// Calls it handles at once.
        concurrency: u32,
    },
    /// Another node's proxy forwarding calls (on the network listener only): its calls are
    /// served by this node's instances and never forwarded again.
    Peer {
        /// The forwarding proxy's node id.
        node_id: String,
    },
}

/// A frame from a caller or an instance to the proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallerFrame {
    /// First frame on a connection.
    Hello {
        /// [`crate::PROTOCOL_VERSION`] of the client.
        version: u8,
        /// What this connection is.
        role: Role,
        /// A bearer token (`shoal_<id>_<secret>`): a caller's decides its tenant (without one,
        /// its uid does); an instance must present its own credential. Peers send none (the
        /// network listener takes mutual TLS instead).
        token: Option<String>,
    },
    /// Call a function (caller role).
    Call {
        /// Caller-chosen id, echoed in the reply.
        id: u64,
        /// Function name.
        function: String,
        /// A specific instance, or any.
        instance: Option<String>,
        /// Argument.
        args: Payload,
        /// Deadline relative to now; the call fails with `Timeout` past it.
        timeout_ms: u64,
        /// Trace id carried to the instance.
        trace_id: u64,
    },
    /// The result of an `Invoke` (instance role).
    Result {
        /// The invoke's id.
        id: u64,
        /// What the handler returned.
        result: Result<Payload, WireError>,
    },
    /// The instance is stopping (instance role): send it no new calls. The proxy answers
    /// `Drained`; every `Invoke` sent before that still gets a `Result`.
    Drain,
    /// The instance hands out call lanes on the Unix socket at `path` (instance role, once,
    /// after its `Welcome`). The proxy stops naming it once the instance drains or leaves.
    Lane {
        /// Socket path, on the proxy's node (beside the proxy's own socket).
        path: String,
        /// What a caller must present on that socket to be handed a lane.
        key: LaneKey,
    },
    /// Which local instances of `function` offer call lanes (caller role); answered with
    /// [`ProxyFrame::Lanes`].
    Lanes {
        /// Caller-chosen id, echoed in the answer.
        id: u64,
        /// Function name.
        function: String,
    },
    /// The caller holds the object result of its call `id` (caller or peer role): the
    /// instance that stored it may delete it now. Unknown ids are ignored.
    Release {
        /// The call's id.
        id: u64,
    },
}

/// A local instance that offers call lanes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneInfo {
    /// Instance id.
    pub instance_id: String,
    /// Where the instance hands out lanes.
    pub path: String,
    /// What to present there.
    pub key: LaneKey,
}

/// A frame from the proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProxyFrame {
    /// The connection is accepted.
    Welcome {
        /// Node id of the proxy.
        node_id: String,
        /// Largest payload that may travel inline.
        inline_limit: u64,
    },
    /// The connection is refused; the proxy closes it next.
    Refused(WireError),
    /// Run a call (to an instance).
    Invoke {
        /// Id to answer with.
        id: u64,
        /// Function name.
        function: String,
        /// Argument.
        args: Payload,
        /// Time left, in milliseconds.
        timeout_ms: u64,
        /// Trace id.
        trace_id: u64,
    },
    /// After a `Drain`: no `Invoke` follows (to an instance).
    Drained,
    /// The outcome of a call (to a caller).
    Reply {
        /// The call's id.
        id: u64,
        /// Result bytes, or the error (`NotFound` for an unknown function, `Overloaded`,
        /// `Timeout`, `InstanceFailed`, ...).
        result: Result<Payload, WireError>,
    },
    /// The answer to [`CallerFrame::Lanes`] (to a caller): possibly empty.
    Lanes {
        /// The question's id.
        id: u64,
        /// Local instances of the function that offer lanes and take new calls.
        lanes: Vec<LaneInfo>,
    },
    /// The caller of invoke `id` holds its object result (to an instance): delete the object.
    Release {
        /// The invoke's id.
        id: u64,
    },
}
