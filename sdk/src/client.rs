use crate::conn::{handshake, Conn, MailboxConn};
use crate::view::{ObjectBuilder, View};
use crate::Error;
use shoal_protocol::{
    tenant_prefix, ClientHello, ErrorCode, Hello, IdKind, KvEntry, ListEntry, Namespace, ObjectId,
    Request, Response, StatusInfo,
};
use shoal_shm::{Ctl, FastReader, Mailbox, ReadMap, SegmentWriter};
use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The environment variable [`ConnectOptions::from_env`] reads.
pub const SOCKET_ENV: &str = "SHOAL_DATAWORKER_SOCKET";
/// The environment variable [`ConnectOptions::new`] takes the token from (a function
/// instance's own credential, set by its agent).
pub const TOKEN_ENV: &str = "SHOAL_TOKEN";

/// Longest id whose tenant-qualified form a fast-path lookup builds on the stack; longer
/// ones use a heap buffer.
const STACK_NAME: usize = 256;
/// Sealed segments a client keeps mapped for fast reads (views hold their own reference, so
/// dropping one from here never unmaps memory a view reads).
const SEGMENT_CACHE: usize = 256;

/// How to connect.
#[derive(Clone)]
pub struct ConnectOptions {
    /// The dataworker's socket.
    pub socket: PathBuf,
    /// Fault the whole arena into this process at connect (slower connect, first writes run
    /// at memory speed). Off by default.
    pub populate: bool,
    /// Use the shared index for syscall-free local hits. On by default.
    pub fast_path: bool,
    /// Send requests through the shared-memory mailbox when the worker offers one (blocking
    /// clients only). On by default.
    pub mailbox: bool,
    /// How long a caller waiting for a mailbox reply keeps polling (yielding the CPU between
    /// polls) before it sleeps on the shared reply futex. 200 µs by default; the figure
    /// matters little under load because sleepers are woken together, one syscall per sweep.
    pub mailbox_spin: Duration,
    /// A token to present at connect: the connection then acts in the token's tenant with its
    /// role. Without one the worker knows the client by its uid (the worker's own uid: the
    /// default tenant). [`ConnectOptions::new`] takes it from `SHOAL_TOKEN` when set.
    pub token: Option<String>,
    /// Act in this tenant instead of the credential's own (only the operator, the system
    /// tenant's admin, may; without it the operator acts in the default tenant).
    pub tenant: Option<String>,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("socket", &self.socket)
            .field("populate", &self.populate)
            .field("fast_path", &self.fast_path)
            .field("mailbox", &self.mailbox)
            .field("mailbox_spin", &self.mailbox_spin)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tenant", &self.tenant)
            .finish()
    }
}

impl ConnectOptions {
    /// Options for `socket`, with the token from `SHOAL_TOKEN` when that is set (so a
    /// function instance acts in its own tenant however its code connects). This is the one
    /// variable it reads; set `token` to `None` to connect by uid regardless.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            populate: false,
            fast_path: true,
            mailbox: true,
            mailbox_spin: Duration::from_micros(200),
            token: std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()),
            tenant: None,
        }
    }

    /// These options with `token` presented at connect.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The hello to send, once the tenant named (if any) passes the protocol's rule: a bad
    /// name is refused here, before a connection is made.
    fn client_hello(&self) -> Result<ClientHello, Error> {
        if let Some(t) = &self.tenant {
            IdKind::Tenant.check(t)?;
        }
        Ok(ClientHello {
            token: self.token.clone(),
            tenant: self.tenant.clone(),
        })
    }

    /// Options from `SHOAL_DATAWORKER_SOCKET`.
    pub fn from_env() -> Result<Self, Error> {
        std::env::var_os(SOCKET_ENV)
            .map(Self::new)
            .ok_or(Error::NoSocket(SOCKET_ENV))
    }
}

/// Options of a KV set.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetOptions {
    /// Expire after this long (whole seconds; `None` keeps the key).
    pub ttl: Option<Duration>,
    /// Write only when the key does not exist (NX).
    pub if_absent: bool,
}

/// Read-only mappings of sealed segments, by generation, oldest first out.
#[derive(Debug, Default)]
struct SegmentCache {
    maps: HashMap<u64, Arc<ReadMap>>,
    order: VecDeque<u64>,
}

/// State shared by a client and the views it handed out.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The arena, mapped read-only.
    pub(crate) arena: ReadMap,
    segments: std::sync::Mutex<SegmentCache>,
    pub(crate) fast: Option<FastReader>,
    pub(crate) hello: Hello,
    /// What this connection's names start with in the shared index (empty for the default
    /// tenant).
    prefix: Box<[u8]>,
    conn: tokio::sync::Mutex<Conn>,
    /// One-way requests a `Drop` could not write because a request was in flight.
    pending: std::sync::Mutex<Vec<Request>>,
}

impl Shared {
    /// Sends a one-way request without blocking (from `Drop`).
    pub(crate) fn one_way(&self, req: Request) {
        match self.conn.try_lock() {
            Ok(mut c) => c.send_one_way_nonblocking(req),
            Err(_) => {
                if let Ok(mut p) = self.pending.lock() {
                    p.push(req);
                }
            }
        }
    }

    pub(crate) async fn call(&self, req: Request) -> Result<Response, Error> {
        Ok(self.call_fds(req, false).await?.0)
    }

    /// [`Shared::call`] with the fds of the reply's segment views (`socket_only` when they
    /// are needed: the mailbox carries none).
    pub(crate) async fn call_fds(
        &self,
        req: Request,
        socket_only: bool,
    ) -> Result<(Response, Vec<OwnedFd>), Error> {
        let mut c = self.conn.lock().await;
        let queued = self
            .pending
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default();
        for r in queued {
            c.queue_one_way(r);
        }
        match c.call(req, socket_only).await? {
            (Response::Error(e), _) => Err(Error::Remote(e)),
            r => Ok(r),
        }
    }

    /// A cached mapping of sealed segment `gen`.
    pub(crate) fn cached_segment(&self, gen: u64) -> Option<Arc<ReadMap>> {
        self.segments.lock().ok()?.maps.get(&gen).cloned()
    }

    /// Maps sealed segment `gen` from the fd a reply brought (or takes the cached mapping).
    fn segment_from(&self, gen: u64, fd: OwnedFd) -> Result<Arc<ReadMap>, Error> {
        if let Some(m) = self.cached_segment(gen) {
            return Ok(m);
        }
        let m = Arc::new(ReadMap::open_all(fd)?);
        if let Ok(mut c) = self.segments.lock() {
            if c.maps.insert(gen, m.clone()).is_none() {
                c.order.push_back(gen);
            }
            while c.order.len() > SEGMENT_CACHE {
                if let Some(old) = c.order.pop_front() {
                    c.maps.remove(&old);
                }
            }
        }
        Ok(m)
    }

    pub(crate) async fn expect_ok(&self, req: Request) -> Result<(), Error> {
        match self.call(req).await? {
            Response::Ok => Ok(()),
            r => Err(unexpected(r)),
        }
    }
}

fn unexpected(r: Response) -> Error {
    Error::protocol(format!("unexpected reply {r:?}"))
}

fn ttl_secs(ttl: Option<Duration>) -> u64 {
    ttl.map_or(0, |d| d.as_secs_f64().ceil() as u64)
}

/// A connection to the node's dataworker. Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

impl Client {
    /// Connects to the dataworker listening on `socket`.
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Client, Error> {
        Self::connect_with(ConnectOptions::new(socket.as_ref())).await
    }

    /// Connects with options. Must run inside a tokio runtime.
    pub async fn connect_with(opts: ConnectOptions) -> Result<Client, Error> {
        let path = opts.socket.clone();
        let hello = opts.client_hello()?;
        let parts = tokio::task::spawn_blocking(move || handshake(&path, &hello))
            .await
            .map_err(|e| Error::protocol(e.to_string()))??;
        Self::from_handshake(parts, &opts, false)
    }

    /// Connects without a runtime; requests then block the calling thread.
    pub(crate) fn connect_blocking(opts: &ConnectOptions) -> Result<Client, Error> {
        Self::from_handshake(handshake(&opts.socket, &opts.client_hello()?)?, opts, true)
    }

    fn from_handshake(
        (stream, hello, mut fds): (
            std::os::unix::net::UnixStream,
            Hello,
            Vec<std::os::fd::OwnedFd>,
        ),
        opts: &ConnectOptions,
        blocking: bool,
    ) -> Result<Client, Error> {
        let mailbox_fd = match hello.mailbox {
            Some(_) => fds.pop(),
            None => None,
        };
        let pin_fd = if hello.fast_path { fds.pop() } else { None };
        let mut fds = fds.into_iter();
        let mut next = |what: &str| {
            fds.next()
                .ok_or_else(|| Error::protocol(format!("missing {what} fd")))
        };
        let (arena_fd, index_fd, bell_fd) = (next("arena")?, next("index")?, next("bell")?);
        let arena = ReadMap::open(arena_fd, hello.arena_bytes, opts.populate)?;
        let ctl = Ctl::open(
            index_fd,
            bell_fd,
            hello.ctl.buckets,
            hello.ctl.pins,
            hello.ctl.ring,
        )?;
        let ctl = Arc::new(ctl);
        let fast = match (opts.fast_path, pin_fd) {
            (true, Some(fd)) => Some(FastReader::new(ctl.clone(), ctl.open_pin_page(fd)?)),
            _ => None,
        };
        let mailbox = match (blocking && opts.mailbox, mailbox_fd, hello.mailbox) {
            (true, Some(fd), Some(cap)) => Some(MailboxConn::new(
                Mailbox::open(fd, cap)?,
                ctl,
                opts.mailbox_spin,
            )),
            _ => None,
        };
        let conn = Conn::new(stream, hello.max_frame, blocking, mailbox)?;
        Ok(Client {
            shared: Arc::new(Shared {
                arena,
                segments: std::sync::Mutex::new(SegmentCache::default()),
                fast,
                prefix: tenant_prefix(&hello.tenant).into_boxed_slice(),
                hello,
                conn: tokio::sync::Mutex::new(conn),
                pending: std::sync::Mutex::new(Vec::new()),
            }),
        })
    }

    /// Connects to the socket named by `SHOAL_DATAWORKER_SOCKET`.
    pub async fn connect_from_env() -> Result<Client, Error> {
        Self::connect_with(ConnectOptions::from_env()?).await
    }

    /// A fresh random id (32 hex digits).
    pub fn generate_id() -> ObjectId {
        let n: u128 = rand::random();
        // 32 hex digits are always a valid id.
        ObjectId::new(format!("{n:032x}")).unwrap_or_else(|_| unreachable!())
    }

    /// The node's id.
    pub fn node_id(&self) -> &str {
        &self.shared.hello.node_id
    }

    /// The tenant this connection acts in (`default` for the local user).
    pub fn tenant(&self) -> &str {
        &self.shared.hello.tenant
    }

    /// Requests this client sent through its shared-memory mailbox (diagnostics).
    pub async fn mailbox_calls(&self) -> u64 {
        self.shared.conn.lock().await.mailbox_calls
    }

    /// Whether local hits skip the socket.
    pub fn has_fast_path(&self) -> bool {
        self.shared.fast.is_some()
    }

    /// Largest payload sent inline in one request.
    pub fn inline_limit(&self) -> u64 {
        self.shared.hello.inline_limit
    }

    /// Looks `id` up in the shared index under this connection's tenant, with no syscall:
    /// the default tenant's names are the ids themselves (no copy); another tenant's are
    /// `tenant\0id` (see [`Client::fast_get_qualified`]).
    fn fast_get(&self, ns: Namespace, id: &ObjectId) -> Option<View> {
        let fast = self.shared.fast.as_ref()?;
        let pin = if self.shared.prefix.is_empty() {
            fast.get(&self.shared.arena, ns.tag(), id.as_str().as_bytes())?
        } else {
            self.fast_get_qualified(fast, ns, id)?
        };
        let segment = if pin.segment {
            // A segment this client has not mapped yet: its fd comes with a socket get.
            match self.shared.cached_segment(pin.gen) {
                Some(m) => Some(m),
                None => {
                    fast.release(pin);
                    return None;
                }
            }
        } else {
            None
        };
        Some(View::fast(self.shared.clone(), pin, segment))
    }

    /// The lookup of a non-default tenant: the qualified name is built on the stack (on the
    /// heap past [`STACK_NAME`] bytes). Kept out of line so the default tenant's path stays
    /// what it was.
    #[inline(never)]
    fn fast_get_qualified(
        &self,
        fast: &FastReader,
        ns: Namespace,
        id: &ObjectId,
    ) -> Option<shoal_shm::FastPin> {
        let (prefix, name) = (&*self.shared.prefix, id.as_str().as_bytes());
        let n = prefix.len() + name.len();
        if n <= STACK_NAME {
            let mut buf = [0u8; STACK_NAME];
            buf[..prefix.len()].copy_from_slice(prefix);
            buf[prefix.len()..n].copy_from_slice(name);
            fast.get(&self.shared.arena, ns.tag(), &buf[..n])
        } else {
            fast.get(&self.shared.arena, ns.tag(), &[prefix, name].concat())
        }
    }

    /// Sends a request whose reply holds views: through the mailbox when it may, again on
    /// the socket if the reply names a segment this client has no mapping of (the mailbox
    /// cannot carry its fd; the first reply's pins are released).
    async fn call_views(&self, req: Request) -> Result<(Response, Vec<OwnedFd>), Error> {
        let (resp, fds) = self.shared.call_fds(req.clone(), false).await?;
        let Response::Views(v) = &resp else {
            return Ok((resp, fds));
        };
        let unmapped = fds.is_empty()
            && v.iter().any(|r| {
                r.as_ref()
                    .is_ok_and(|d| d.segment && self.shared.cached_segment(d.gen).is_none())
            });
        if !unmapped {
            return Ok((resp, fds));
        }
        let gens: Vec<u64> = v
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|d| d.gen)
            .collect();
        self.shared.one_way(Request::Release { gens });
        self.shared.call_fds(req, true).await
    }

    fn views(
        &self,
        (resp, fds): (Response, Vec<OwnedFd>),
    ) -> Result<Vec<Result<View, Error>>, Error> {
        let Response::Views(v) = resp else {
            return Err(unexpected(resp));
        };
        let mut fds = fds.into_iter();
        Ok(v.into_iter()
            .map(|r| {
                let d = r.map_err(Error::Remote)?;
                let segment = if d.segment {
                    let map = match fds.next() {
                        Some(fd) => self.shared.segment_from(d.gen, fd),
                        None => self
                            .shared
                            .cached_segment(d.gen)
                            .ok_or_else(|| Error::protocol("a segment view came without its fd")),
                    };
                    match map {
                        Ok(m) => Some(m),
                        Err(e) => {
                            self.shared.one_way(Request::Release { gens: vec![d.gen] });
                            return Err(e);
                        }
                    }
                } else {
                    None
                };
                View::socket(self.shared.clone(), d, segment)
            })
            .collect())
    }

    fn one_view(&self, resp: (Response, Vec<OwnedFd>)) -> Result<View, Error> {
        self.views(resp)?
            .into_iter()
            .next()
            .unwrap_or_else(|| Err(Error::protocol("empty reply")))
    }

    /// Asks for a buffer of `size` bytes: the reply's segment fd, mapped read-write.
    async fn create_segment(&self, req: Request) -> Result<SegmentWriter, Error> {
        match self.shared.call_fds(req, true).await? {
            (Response::View(d), mut fds) if d.segment && fds.len() == 1 => {
                let fd = fds.remove(0);
                Ok(SegmentWriter::open(fd, d.len)?)
            }
            (Response::View(d), _) if d.len == 0 => Ok(SegmentWriter::empty()),
            (r, _) => Err(unexpected(r)),
        }
    }

    // ----- objects -----

    /// Allocates a writable buffer of `size` bytes for `id`. Fill it, then seal it.
    ///
    /// Up to the inline limit the buffer is this process's memory and the seal sends it
    /// inline (so a taken id is reported by the seal); larger ones are a segment of their own
    /// that the worker creates now and that only this client can write until the seal.
    pub async fn create(&self, id: &str, size: u64) -> Result<ObjectBuilder, Error> {
        let id = ObjectId::new(id)?;
        if size <= self.inline_limit() {
            return Ok(ObjectBuilder::local(self.shared.clone(), id, size as usize));
        }
        let w = self
            .create_segment(Request::Create {
                id: id.clone(),
                size,
            })
            .await?;
        Ok(ObjectBuilder::segment(self.shared.clone(), id, w))
    }

    /// Stores `data` as a sealed object (inline for small payloads, through shared memory
    /// otherwise).
    pub async fn put(&self, id: &str, data: &[u8]) -> Result<(), Error> {
        if data.len() as u64 <= self.inline_limit() {
            let id = ObjectId::new(id)?;
            return self
                .shared
                .expect_ok(Request::Put {
                    id,
                    data: data.to_vec(),
                })
                .await;
        }
        let mut b = self.create(id, data.len() as u64).await?;
        b.as_mut_slice().copy_from_slice(data);
        b.seal().await
    }

    /// Waits up to `timeout` until `id` is sealed, then returns a zero-copy view.
    /// `Timeout` if it was not sealed in time; with a zero timeout, `NotFound` at once.
    pub async fn get(&self, id: &str, timeout: Duration) -> Result<View, Error> {
        let id = ObjectId::new(id)?;
        if let Some(v) = self.fast_get(Namespace::Object, &id) {
            return Ok(v);
        }
        let resp = self
            .call_views(Request::Get {
                ids: vec![id],
                timeout_ms: timeout.as_millis() as u64,
            })
            .await?;
        self.one_view(resp)
    }

    /// Gets several objects; waits up to `timeout` for all of them. One result per id.
    pub async fn get_many(
        &self,
        ids: &[&str],
        timeout: Duration,
    ) -> Result<Vec<Result<View, Error>>, Error> {
        let ids = ids
            .iter()
            .map(|s| ObjectId::new(*s))
            .collect::<Result<Vec<_>, _>>()?;
        let resp = self
            .call_views(Request::Get {
                ids,
                timeout_ms: timeout.as_millis() as u64,
            })
            .await?;
        self.views(resp)
    }

    /// Deletes an object. Views that are still alive keep its bytes until they drop.
    pub async fn delete(&self, id: &str) -> Result<(), Error> {
        let id = ObjectId::new(id)?;
        self.shared.expect_ok(Request::Delete { id }).await
    }

    /// Whether a sealed object exists.
    pub async fn contains(&self, id: &str) -> Result<bool, Error> {
        let id = ObjectId::new(id)?;
        match self
            .shared
            .call(Request::Contains { ids: vec![id] })
            .await?
        {
            Response::Bools(b) => Ok(b.first().copied().unwrap_or(false)),
            r => Err(unexpected(r)),
        }
    }

    /// Objects whose id starts with `prefix`, sorted, at most `limit`.
    pub async fn list(&self, prefix: &str, limit: u32) -> Result<Vec<ListEntry>, Error> {
        self.list_ns(Namespace::Object, prefix, limit).await
    }

    async fn list_ns(
        &self,
        ns: Namespace,
        prefix: &str,
        limit: u32,
    ) -> Result<Vec<ListEntry>, Error> {
        let req = Request::List {
            ns,
            prefix: prefix.to_owned(),
            limit,
        };
        match self.shared.call(req).await? {
            Response::List(l) => Ok(l),
            r => Err(unexpected(r)),
        }
    }

    /// Figures of the worker.
    pub async fn status(&self) -> Result<StatusInfo, Error> {
        match self.shared.call(Request::Status).await? {
            Response::Status(s) => Ok(s),
            r => Err(unexpected(r)),
        }
    }

    // ----- KV -----

    /// Sets `key`. Returns false when `if_absent` was asked and the key exists.
    pub async fn kv_set(&self, key: &str, value: &[u8], opts: SetOptions) -> Result<bool, Error> {
        let key = ObjectId::new(key)?;
        let ttl_secs = ttl_secs(opts.ttl);
        if value.len() as u64 <= self.inline_limit() {
            let req = Request::KvSet {
                key,
                value: value.to_vec(),
                ttl_secs,
                if_absent: opts.if_absent,
            };
            return match self.shared.call(req).await? {
                Response::Bools(b) => Ok(b.first().copied().unwrap_or(false)),
                r => Err(unexpected(r)),
            };
        }
        if opts.if_absent && self.kv_exists(key.as_str()).await? {
            return Ok(false);
        }
        let mut w = self
            .create_segment(Request::KvCreate {
                key: key.clone(),
                size: value.len() as u64,
            })
            .await?;
        w.as_mut_slice().copy_from_slice(value);
        // Unmapped before the commit: the worker seals the segment only once no writable
        // mapping of it is left.
        drop(w);
        self.shared
            .expect_ok(Request::KvCommit { key, ttl_secs })
            .await?;
        Ok(true)
    }

    /// A zero-copy view of `key`'s value, or `None`.
    pub async fn kv_get(&self, key: &str) -> Result<Option<View>, Error> {
        let key = ObjectId::new(key)?;
        if let Some(v) = self.fast_get(Namespace::Kv, &key) {
            return Ok(Some(v));
        }
        let resp = self.call_views(Request::KvGet { keys: vec![key] }).await?;
        match self.one_view(resp) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.code() == ErrorCode::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Views of several keys (`None` for missing ones).
    pub async fn kv_mget(&self, keys: &[&str]) -> Result<Vec<Option<View>>, Error> {
        let keys = keys
            .iter()
            .map(|s| ObjectId::new(*s))
            .collect::<Result<Vec<_>, _>>()?;
        let mut out: Vec<Option<View>> = keys
            .iter()
            .map(|k| self.fast_get(Namespace::Kv, k))
            .collect();
        let missing: Vec<ObjectId> = keys
            .iter()
            .zip(&out)
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.clone())
            .collect();
        if missing.is_empty() {
            return Ok(out);
        }
        let resp = self.call_views(Request::KvGet { keys: missing }).await?;
        let mut fetched = self.views(resp)?.into_iter();
        for slot in out.iter_mut().filter(|v| v.is_none()) {
            *slot = match fetched.next() {
                Some(Ok(v)) => Some(v),
                Some(Err(e)) if e.code() == ErrorCode::NotFound => None,
                Some(Err(e)) => return Err(e),
                None => return Err(Error::protocol("short mget reply")),
            };
        }
        Ok(out)
    }

    /// Sets several keys (all inline: their total must fit the inline limit).
    pub async fn kv_mset(
        &self,
        entries: &[(&str, &[u8])],
        ttl: Option<Duration>,
    ) -> Result<(), Error> {
        let entries = entries
            .iter()
            .map(|(k, v)| {
                Ok(KvEntry {
                    key: ObjectId::new(*k)?,
                    value: v.to_vec(),
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        self.shared
            .expect_ok(Request::KvMSet {
                entries,
                ttl_secs: ttl_secs(ttl),
            })
            .await
    }

    /// Deletes keys; returns how many existed.
    pub async fn kv_del(&self, keys: &[&str]) -> Result<u64, Error> {
        let keys = keys
            .iter()
            .map(|s| ObjectId::new(*s))
            .collect::<Result<Vec<_>, _>>()?;
        match self.shared.call(Request::KvDel { keys }).await? {
            Response::Count(n) => Ok(n),
            r => Err(unexpected(r)),
        }
    }

    /// Whether `key` exists.
    pub async fn kv_exists(&self, key: &str) -> Result<bool, Error> {
        let keys = vec![ObjectId::new(key)?];
        match self.shared.call(Request::KvExists { keys }).await? {
            Response::Bools(b) => Ok(b.first().copied().unwrap_or(false)),
            r => Err(unexpected(r)),
        }
    }

    /// Sets (or with `None` removes) `key`'s TTL. False if the key does not exist.
    pub async fn kv_expire(&self, key: &str, ttl: Option<Duration>) -> Result<bool, Error> {
        let req = Request::KvExpire {
            key: ObjectId::new(key)?,
            ttl_secs: ttl_secs(ttl),
        };
        match self.shared.call(req).await? {
            Response::Bools(b) => Ok(b.first().copied().unwrap_or(false)),
            r => Err(unexpected(r)),
        }
    }

    /// Remaining TTL: `None` if the key does not exist, `Some(None)` if it never expires.
    pub async fn kv_ttl(&self, key: &str) -> Result<Option<Option<Duration>>, Error> {
        let req = Request::KvTtl {
            key: ObjectId::new(key)?,
        };
        match self.shared.call(req).await? {
            Response::Ttl(t) => Ok(t.map(|t| t.map(Duration::from_secs))),
            r => Err(unexpected(r)),
        }
    }

    /// A view of `len` bytes of `key`'s value from `offset` (shorter at the end of the value).
    pub async fn kv_read(&self, key: &str, offset: u64, len: u64) -> Result<View, Error> {
        let req = Request::KvRead {
            key: ObjectId::new(key)?,
            offset,
            len,
        };
        let resp = self.call_views(req).await?;
        self.one_view(resp)
    }

    /// KV keys starting with `prefix`.
    pub async fn kv_keys(&self, prefix: &str, limit: u32) -> Result<Vec<ListEntry>, Error> {
        self.list_ns(Namespace::Kv, prefix, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tenant name that breaks the rule is refused before any connection is made.
    #[tokio::test]
    async fn a_bad_tenant_is_refused_before_connecting() {
        let mut opts = ConnectOptions::new("/nonexistent/shoal.sock");
        opts.token = None;
        for bad in ["Team", "a\r\nb", "", "-x"] {
            opts.tenant = Some(bad.into());
            let e = Client::connect_with(opts.clone()).await.unwrap_err();
            assert_eq!(e.code(), ErrorCode::InvalidId, "{bad:?}: {e}");
            let e = Client::connect_blocking(&opts).unwrap_err();
            assert_eq!(e.code(), ErrorCode::InvalidId, "{bad:?}: {e}");
        }
        opts.tenant = Some("team-a".into());
        let e = Client::connect_with(opts).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::Unavailable, "{e}");
    }
}
