use crate::{ErrorCode, ObjectId, WireError};
use serde::{Deserialize, Serialize};

/// Which keyspace a name lives in. Objects are immutable once sealed; KV values may be
/// overwritten and expire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Namespace {
    /// Immutable objects (create/seal/get).
    Object,
    /// Key-value entries (set/get/ttl).
    Kv,
}

impl Namespace {
    /// The byte that prefixes a name in the shared-memory index.
    pub fn tag(self) -> u8 {
        match self {
            Namespace::Object => b'o',
            Namespace::Kv => b'k',
        }
    }
}

/// Where a readable (or, after `Create`, writable) payload lives: in the arena, or in a
/// segment of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewDesc {
    /// Allocation generation: unique per allocation for the worker's lifetime; what a pin names.
    pub gen: u64,
    /// Byte offset of the payload in the arena, or in its segment.
    pub offset: u64,
    /// Payload length in bytes.
    pub len: u64,
    /// The payload is in a segment (a memfd of its own, whose id is `gen`), not in the arena.
    /// A reply on the socket carries one fd (`SCM_RIGHTS`) for every segment view it holds,
    /// in order: read-write for a `Create`/`KvCreate` (the client's own unsealed buffer),
    /// read-only otherwise. Replies through the mailbox carry none.
    pub segment: bool,
}

/// One entry of `mset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    /// The key.
    pub key: ObjectId,
    /// The value bytes.
    pub value: Vec<u8>,
}

/// One line of `list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListEntry {
    /// The id.
    pub id: ObjectId,
    /// Payload size in bytes.
    pub size: u64,
    /// Sealed (visible) or still being written.
    pub sealed: bool,
    /// Number of live views.
    pub pins: u32,
    /// Spilled to disk (not in memory right now).
    pub spilled: bool,
}

/// Figures of one dataworker, for `shoal status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Node id.
    pub node_id: String,
    /// Arena size in bytes.
    pub arena_bytes: u64,
    /// Bytes allocated in the arena.
    pub used_bytes: u64,
    /// Sealed objects (in memory or spilled).
    pub objects: u64,
    /// Unsealed buffers.
    pub unsealed: u64,
    /// KV entries.
    pub kv_keys: u64,
    /// Live views (socket and shared-memory pins).
    pub pins: u64,
    /// Connected clients.
    pub clients: u64,
    /// Objects evicted (dropped) so far.
    pub evictions: u64,
    /// Objects spilled to disk so far.
    pub spills: u64,
    /// Objects currently on disk.
    pub spilled_now: u64,
    /// Deleted objects still held by a view.
    pub zombies: u64,
    /// The cluster's nodes as this worker sees them (empty for a standalone node).
    pub members: Vec<crate::NodeRecord>,
}

/// Layout of the shared index and of a client's pin page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtlLayout {
    /// Number of index buckets (power of two).
    pub buckets: u32,
    /// Pin slots of a client's pin page.
    pub pins: u32,
    /// Recent reads a client's pin page remembers (the worker's LRU reads them).
    pub ring: u32,
}

/// The first frame a worker sends on a new connection, together with its fds
/// (`SCM_RIGHTS`), in this order: the arena (read-only), the index (read-only), the doorbell
/// page, then the client's pin page (when `fast_path`) and its mailbox (when `mailbox` is
/// set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`crate::PROTOCOL_VERSION`] of the worker.
    pub version: u8,
    /// This connection's client id.
    pub client_id: u64,
    /// Node id of the worker.
    pub node_id: String,
    /// Arena size in bytes (the client maps exactly this much, read-only).
    pub arena_bytes: u64,
    /// Control region layout.
    pub ctl: CtlLayout,
    /// Whether this client got a pin page (the fast path); the worker gives one to at most
    /// its configured number of clients.
    pub fast_path: bool,
    /// Capacity of this client's shared-memory mailbox, whose fd comes third, if it has one.
    pub mailbox: Option<u64>,
    /// Largest payload that may travel inline in a frame.
    pub inline_limit: u64,
    /// Largest frame the worker accepts.
    pub max_frame: u32,
    /// The tenant this connection acts in. Every id the client sends is the tenant's own;
    /// the client looks its ids up in the shared index under [`crate::tenant_prefix`] of it.
    pub tenant: String,
}

/// Longest token a [`ClientHello`] may carry (a shoal token is 87 bytes).
pub const MAX_TOKEN_LEN: usize = 256;
/// Largest [`ClientHello`] frame body a worker reads.
pub const MAX_CLIENT_HELLO: usize = 1024;

/// The first frame a client sends on a new connection, before the worker answers with
/// [`Hello`] (or [`ServerFrame::Refused`]). Without a token the worker maps the client by
/// its uid (`SO_PEERCRED`); with one, the token decides, and a bad token is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientHello {
    /// A bearer token (`shoal_<id>_<secret>`), e.g. from `SHOAL_TOKEN`.
    pub token: Option<String>,
    /// Act in this tenant instead of the credential's own; only the operator (the system
    /// tenant's admin) may name another tenant.
    pub tenant: Option<String>,
}

impl ClientHello {
    /// Checks the bounds a worker enforces before it looks at the contents.
    pub fn check(&self) -> Result<(), WireError> {
        if self.token.as_ref().is_some_and(|t| t.len() > MAX_TOKEN_LEN) {
            return Err(WireError::new(ErrorCode::Unauthenticated, "token too long"));
        }
        if let Some(Err(e)) = self
            .tenant
            .as_deref()
            .map(|t| crate::IdKind::Tenant.check(t))
        {
            return Err(WireError::new(ErrorCode::InvalidArgument, e.to_string()));
        }
        Ok(())
    }
}

/// A request from a local client to its dataworker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Allocate a writable buffer of `size` bytes for `id` (a segment: the reply `View`
    /// carries its fd on the socket); reply `View`.
    Create {
        /// Object id.
        id: ObjectId,
        /// Payload size.
        size: u64,
    },
    /// Make a created buffer immutable and visible; reply `Ok`. The client must have unmapped
    /// its writable mapping of the segment first (else `InvalidArgument`, and it stays
    /// unsealed).
    Seal {
        /// Object id.
        id: ObjectId,
    },
    /// Drop a created, unsealed buffer. One-way: no reply.
    Abort {
        /// Object id.
        id: ObjectId,
    },
    /// Create, copy the inline bytes, seal; reply `Ok`.
    Put {
        /// Object id.
        id: ObjectId,
        /// Payload (at most the inline limit).
        data: Vec<u8>,
    },
    /// Wait up to `timeout_ms` until each object is sealed; pin each; reply `Views`.
    Get {
        /// Object ids.
        ids: Vec<ObjectId>,
        /// How long to wait for objects that do not exist yet.
        timeout_ms: u64,
    },
    /// End views (unpin). One-way: no reply.
    Release {
        /// Generations of the views.
        gens: Vec<u64>,
    },
    /// Delete an object (freed when its last view ends); reply `Ok`.
    Delete {
        /// Object id.
        id: ObjectId,
    },
    /// Whether a sealed object exists; reply `Bools`.
    Contains {
        /// Object ids.
        ids: Vec<ObjectId>,
    },
    /// List names in a namespace; reply `List`.
    List {
        /// Namespace.
        ns: Namespace,
        /// Only names starting with this.
        prefix: String,
        /// At most this many entries.
        limit: u32,
    },
    /// Set a KV value; reply `Bools` with one element: whether it was written.
    KvSet {
        /// Key.
        key: ObjectId,
        /// Value (at most the inline limit).
        value: Vec<u8>,
        /// Expire after this many seconds (0 = keep).
        ttl_secs: u64,
        /// Only when the key is absent (NX).
        if_absent: bool,
    },
    /// Allocate a KV value for the client to fill; reply `View`; publish with `KvCommit`.
    KvCreate {
        /// Key.
        key: ObjectId,
        /// Value size.
        size: u64,
    },
    /// Publish a value created with `KvCreate`; reply `Ok`.
    KvCommit {
        /// Key.
        key: ObjectId,
        /// Expire after this many seconds (0 = keep).
        ttl_secs: u64,
    },
    /// Set several values; reply `Ok`.
    KvMSet {
        /// Entries.
        entries: Vec<KvEntry>,
        /// Expire after this many seconds (0 = keep).
        ttl_secs: u64,
    },
    /// Read values (pinned views); reply `Views`, `NotFound` per missing key.
    KvGet {
        /// Keys.
        keys: Vec<ObjectId>,
    },
    /// Read part of a value (pinned view of the range); reply `Views`.
    KvRead {
        /// Key.
        key: ObjectId,
        /// Start offset in the value.
        offset: u64,
        /// At most this many bytes.
        len: u64,
    },
    /// Delete keys; reply `Count` of keys removed.
    KvDel {
        /// Keys.
        keys: Vec<ObjectId>,
    },
    /// Whether keys exist; reply `Bools`.
    KvExists {
        /// Keys.
        keys: Vec<ObjectId>,
    },
    /// Set a key's TTL (0 = persist); reply `Bools` with whether the key exists.
    KvExpire {
        /// Key.
        key: ObjectId,
        /// Seconds.
        ttl_secs: u64,
    },
    /// Remaining TTL; reply `Ttl`.
    KvTtl {
        /// Key.
        key: ObjectId,
    },
    /// Worker figures; reply `Status`.
    Status,
}

impl Request {
    /// Whether the worker sends no reply.
    pub fn is_one_way(&self) -> bool {
        matches!(self, Request::Release { .. } | Request::Abort { .. })
    }

    /// Whether the request changes data (needs the `WriteData` permission); everything else
    /// only reads.
    pub fn writes(&self) -> bool {
        matches!(
            self,
            Request::Create { .. }
                | Request::Seal { .. }
                | Request::Abort { .. }
                | Request::Put { .. }
                | Request::Delete { .. }
                | Request::KvSet { .. }
                | Request::KvCreate { .. }
                | Request::KvCommit { .. }
                | Request::KvMSet { .. }
                | Request::KvDel { .. }
                | Request::KvExpire { .. }
        )
    }
}

/// A reply from the dataworker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Done.
    Ok,
    /// A writable (after `Create`) region.
    View(ViewDesc),
    /// One result per requested id, in order.
    Views(Vec<Result<ViewDesc, WireError>>),
    /// One flag per requested id, in order.
    Bools(Vec<bool>),
    /// A count.
    Count(u64),
    /// Remaining TTL in seconds: `None` when the key does not exist, `Some(None)` when it has
    /// no TTL.
    Ttl(Option<Option<u64>>),
    /// Listing.
    List(Vec<ListEntry>),
    /// Figures.
    Status(StatusInfo),
    /// The request failed.
    Error(WireError),
}

impl Response {
    /// An error reply.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Response::Error(WireError::new(code, message))
    }
}

/// A client-to-worker frame body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientFrame {
    /// Request id, echoed in the reply.
    pub id: u32,
    /// The request.
    pub req: Request,
}

/// A worker-to-client frame body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerFrame {
    /// First frame on a connection (carries fds).
    Hello(Hello),
    /// The connection is refused (e.g. `PermissionDenied`); the worker closes it next.
    Refused(WireError),
    /// A reply to request `id`.
    Reply {
        /// Request id.
        id: u32,
        /// The reply.
        resp: Response,
    },
}
