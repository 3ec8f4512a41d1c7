//! What dataworkers say to each other (over QUIC, one request per stream), and the record a
//! node publishes about itself in the metadata store.
use crate::{ObjectId, WireError};
use serde::{Deserialize, Serialize};

/// A node as it registers itself under `nodes/<id>` in the metadata store (JSON there, so
/// operators can read it with etcdctl).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node id.
    pub node_id: String,
    /// Changes every time the node's process starts; copies of older incarnations are gone.
    pub incarnation: u64,
    /// QUIC address other dataworkers reach it on.
    pub peer_addr: String,
    /// `/metrics` and `/health`, if served.
    pub http_addr: Option<String>,
    /// The node's dataworker socket.
    pub socket: String,
    /// Arena size in bytes.
    pub arena_bytes: u64,
    /// Process id (for `shoal status` on one machine).
    pub pid: u32,
}

/// One copy a node holds, as told to the id's directory owners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldObject {
    /// Object id.
    pub id: ObjectId,
    /// Payload size.
    pub size: u64,
    /// Sealed on this node (true) or pulled from another (replica).
    pub primary: bool,
}

/// A request from one dataworker to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRequest {
    /// "I hold these copies": to each directory owner of their ids. Reply `Ok`.
    Register {
        /// Sender's node id.
        node: String,
        /// Sender's incarnation.
        incarnation: u64,
        /// The copies.
        objects: Vec<HeldObject>,
    },
    /// "I no longer hold these" (evicted replicas, local deletes). Reply `Ok`.
    Unregister {
        /// Sender's node id.
        node: String,
        /// Ids.
        ids: Vec<ObjectId>,
    },
    /// Where is `id`? Waits up to `wait_ms` for it to be sealed somewhere. Reply `Located`,
    /// or an error: `ObjectLost` (every copy was on nodes that are gone), `NotFound`
    /// (`wait_ms` = 0 and unknown), `Timeout`.
    Locate {
        /// Object id.
        id: ObjectId,
        /// How long to wait for it.
        wait_ms: u64,
    },
    /// Delete `id` everywhere: to its directory owners, who tell the holders. Reply `Ok`.
    Delete {
        /// Object id.
        id: ObjectId,
    },
    /// Drop your copies of these (they were deleted). Reply `Ok`.
    DropCopies {
        /// Ids.
        ids: Vec<ObjectId>,
    },
    /// Send `len` bytes of `id` from `offset`. Reply `Fetched` followed by the bytes.
    Fetch {
        /// Object id.
        id: ObjectId,
        /// Start in the payload.
        offset: u64,
        /// Bytes wanted (clamped to the payload's end).
        len: u64,
    },
}

/// A reply between dataworkers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerResponse {
    /// Done.
    Ok,
    /// Where an object is.
    Located {
        /// Payload size.
        size: u64,
        /// Node ids of the holders, primary first.
        holders: Vec<String>,
    },
    /// The body that follows holds bytes `[offset, offset + len)` of an object of `size`.
    Fetched {
        /// Whole payload size.
        size: u64,
        /// Bytes in the body.
        len: u64,
    },
    /// The request failed.
    Error(WireError),
}
