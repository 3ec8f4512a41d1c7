//! The agent runtime: runs on a node what the metadata store assigns to it.
//!
//! [`Agent::start`] owns two tasks:
//!
//! - **Registration.** `agents/<node id>` ([`AgentRecord`]: capacity, use, whether limits are
//!   enforced) is written under a lease of [`AgentConfig::lease_ttl`] and held by a
//!   `shoal_meta::LeasedRecord` (kept alive; a lost lease is granted again and the record
//!   rewritten); the use figures are refreshed every [`USE_REFRESH`]. Shutdown removes the
//!   record, so control sees the node go at once.
//! - **Assignments.** `instances/` is followed (`shoal_meta::Follower`: read, then watched
//!   from that revision, read again when the watch ends). A record whose `node` is this node and whose `state` is `scheduled`,
//!   `starting` or `running` and that this agent does not run yet is started: the function's
//!   package is fetched into `<work_dir>/<instance id>` (a `shoal://` or `s3://` archive is
//!   first downloaded into an unnamed private file in `<work_dir>/.staging`) and
//!   run through the [`Supervisor`]
//!   ([`RestartPolicy::OnFailure`] with back-off). A per-instance reporter writes every status
//!   change back into the record (`state`, `reason`, `pid`) with a transaction on the record's
//!   mod revision, and never over a record that control marked `stopping` or moved. A deleted
//!   (or `stopping`) record stops the process: SIGTERM, SIGKILL after [`AgentConfig::grace`].
//!
//! Names from the store are checked before they are used: an instance id or function name
//! that breaks the protocol's rule (`shoal_protocol::IdKind`) is recorded as `failed` and
//! never becomes a path, an environment variable or a credential's binding (so a record
//! with the id `../x` or `/home/u` cannot make the agent clear a directory outside
//! `<work_dir>`).
//!
//! Each instance gets its own credential: before it starts, the agent issues a token bound
//! to it (`shoal_meta::issue_instance_token`, in the function's tenant; any older token bound
//! to the same function and instance is revoked first) and passes it as `SHOAL_TOKEN`. The
//! token is revoked when the instance ends for good, when it is stopped or removed, and at
//! shutdown. It is never logged.
//!
//! [`Agent::shutdown`] stops every instance and waits for their processes to be gone.
//! Downloading a remote package is async; unpacking runs on the blocking pool. The assignment
//! loop waits for both, so assignments are handled one at a time. Every failure before the
//! process runs is written into the record as `failed` with a reason naming the source.
use crate::cgroup::Limiter;
use crate::package::{fetch, PackageSource};
use crate::remote::{Downloader, RemoteSource, S3Settings};
use crate::resources::{CpuSampler, NodeResources};
use crate::supervisor::{
    InstanceSpec, InstanceState, InstanceStatus, RestartPolicy, Supervisor, SupervisorConfig,
};
use shoal_meta::records::{
    agent_key, function_key, AgentRecord, CodeSource, FunctionSpec, InstanceBinding, InstancePhase,
    InstanceRecord, TokenRecord, INSTANCES_PREFIX, TOKENS_PREFIX,
};
use shoal_meta::{
    issue_instance_token, revoke_token, Compare, Followed, Follower, LeasedRecord, MetaError,
    MetaStore, TokenBook, Txn, TxnOp, WatchEvent,
};
use shoal_protocol::IdKind;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often the use figures of the agent record are refreshed.
pub const USE_REFRESH: Duration = Duration::from_secs(5);
/// Most restarts of a failing instance before it is reported `failed`.
pub const MAX_RESTARTS: u32 = 5;
/// Delay before the first restart of a failing instance (doubled each time, up to 10 s).
pub const RESTART_BACKOFF: Duration = Duration::from_millis(500);
/// Most attempts of one compare-and-swap record update.
const MAX_CAS_ATTEMPTS: usize = 5;
/// Pause before reading `instances/` again after the store failed.
const RETRY_PAUSE: Duration = Duration::from_millis(300);
/// Directory under the work dir where remote packages are downloaded to (instance ids never
/// start with a dot, so it cannot clash with an instance's directory).
const STAGING_DIR: &str = ".staging";

/// Everything an agent needs, passed in by the binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// This node's id (as in `nodes/<id>` and in instance records' `node`).
    pub node_id: String,
    /// Instance packages are unpacked into `<work_dir>/<instance id>`.
    pub work_dir: PathBuf,
    /// Instance logs (`<id>.out`, `<id>.err`).
    pub log_dir: PathBuf,
    /// The proxy's socket, given to instances as `SHOAL_PROXY_SOCKET`.
    pub proxy_socket: PathBuf,
    /// The dataworker's socket, given to instances as `SHOAL_DATAWORKER_SOCKET`.
    pub dataworker_socket: PathBuf,
    /// TTL of the lease the agent record lives under (at least one second).
    pub lease_ttl: Duration,
    /// Time between SIGTERM and SIGKILL when stopping an instance.
    pub grace: Duration,
    /// How to reach S3 for `s3://` packages (`shoal://` packages come from
    /// `dataworker_socket`).
    pub s3: S3Settings,
    /// Where to serve instance logs over HTTP (port 0: any free port); the bound address is
    /// published as `logs_addr` in the agent record.
    pub logs_addr: std::net::SocketAddr,
    /// The node's labels, published in the agent record for placement.
    pub labels: BTreeMap<String, String>,
}

/// Why the agent did not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A configuration value is not acceptable.
    #[error("invalid agent config `{field}`: {reason}")]
    InvalidConfig {
        /// Field name.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A directory could not be created.
    #[error("create directory {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The node's resources could not be read.
    #[error("sample node resources")]
    Resources(#[source] crate::resources::ResourceError),
    /// Registering `agents/<node id>` failed.
    #[error("register agent record")]
    Register(#[source] MetaError),
    /// The log endpoint's address could not be bound.
    #[error("log endpoint {addr}")]
    Logs {
        /// The address.
        addr: std::net::SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A running agent. Stop it with [`Agent::shutdown`]; dropping it stops the instances too,
/// without waiting.
#[derive(Debug)]
pub struct Agent {
    node_id: String,
    stop: CancellationToken,
    tasks: TaskTracker,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> AgentError {
    AgentError::InvalidConfig {
        field,
        reason: reason.into(),
    }
}

/// An error and its sources, joined by `: `. A source whose message is already part of the
/// text (some errors repeat their source in their own message) is not repeated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let msg = src.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = src.source();
    }
    s
}

/// Capacity and use, sampled now.
fn agent_record(
    cfg: &AgentConfig,
    sample: &NodeResources,
    limiter: &Limiter,
    instances: u64,
) -> AgentRecord {
    AgentRecord {
        node_id: cfg.node_id.clone(),
        cpu_milli: u64::from(sample.cpu_cores).saturating_mul(1000),
        mem_total_mib: sample.mem_total_mib,
        cpu_used_milli: u64::from(sample.cpu_used_milli),
        mem_available_mib: sample.mem_available_mib,
        instances,
        limits_enforced: limiter.can_limit(),
        limits_reason: limiter.reason().map(str::to_string),
        logs_addr: Some(cfg.logs_addr.to_string()),
        labels: cfg.labels.clone(),
    }
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, MetaError> {
    serde_json::to_vec(v).map_err(|e| MetaError::Backend(e.to_string()))
}

impl Agent {
    /// Validates `cfg`, creates the directories, registers `agents/<node id>` and starts the
    /// registration and assignment tasks. Must be called within a Tokio runtime.
    pub async fn start(
        mut cfg: AgentConfig,
        meta: Arc<dyn MetaStore>,
    ) -> Result<Agent, AgentError> {
        if let Err(e) = IdKind::Node.check(&cfg.node_id) {
            return Err(invalid("node_id", e.to_string()));
        }
        if cfg.lease_ttl < Duration::from_secs(1) {
            return Err(invalid("lease_ttl", "must be at least one second"));
        }
        for dir in [&cfg.work_dir, &cfg.log_dir] {
            std::fs::create_dir_all(dir).map_err(|source| AgentError::Dir {
                path: dir.clone(),
                source,
            })?;
        }
        // Staged downloads left by an agent that died mid-fetch; none is in flight yet.
        if let Err(e) = std::fs::remove_dir_all(cfg.work_dir.join(STAGING_DIR)) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(error = %e, "removing stale staged packages failed");
            }
        }
        let logs = tokio::net::TcpListener::bind(cfg.logs_addr)
            .await
            .map_err(|source| AgentError::Logs {
                addr: cfg.logs_addr,
                source,
            })?;
        cfg.logs_addr = logs.local_addr().unwrap_or(cfg.logs_addr);
        let limiter = Limiter::detect(None);
        let mut cpu = CpuSampler::new().map_err(AgentError::Resources)?;
        let sample =
            NodeResources::sample(&cfg.work_dir, &mut cpu).map_err(AgentError::Resources)?;
        let record = agent_record(&cfg, &sample, &limiter, 0);
        let value = encode(&record).map_err(AgentError::Register)?;
        let held =
            LeasedRecord::register(meta.clone(), agent_key(&cfg.node_id), value, cfg.lease_ttl)
                .await
                .map_err(AgentError::Register)?;
        tracing::info!(node = %cfg.node_id, cpu_milli = record.cpu_milli, mem_mib = record.mem_total_mib, limits = record.limits_enforced, "agent registered");

        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let running = Arc::new(AtomicU64::new(0));
        let cfg = Arc::new(cfg);
        let (book, follower) = TokenBook::follow(meta.clone());
        tasks.spawn(crate::logs::serve(
            logs,
            cfg.log_dir.clone(),
            book,
            follower,
            stop.clone(),
        ));
        tasks.spawn(refresh_use(
            held,
            cfg.clone(),
            cpu,
            limiter.clone(),
            running.clone(),
            stop.clone(),
        ));
        let supervisor = Supervisor::new(SupervisorConfig::default(), limiter);
        let rt = Runtime {
            meta,
            downloader: Downloader::new(cfg.dataworker_socket.clone(), cfg.s3.clone()),
            cfg: cfg.clone(),
            sup: supervisor,
            tracked: HashMap::new(),
            reporters: TaskTracker::new(),
            reporters_stop: CancellationToken::new(),
            running,
        };
        tasks.spawn(rt.run(stop.clone()));
        Ok(Agent {
            node_id: cfg.node_id.clone(),
            stop,
            tasks,
        })
    }

    /// This agent's node id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Stops every instance (SIGTERM, SIGKILL after the grace), waits for their processes to
    /// be gone, and revokes the agent's lease.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        tracing::info!(node = %self.node_id, "agent stopped");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Refreshes the use figures of the agent record every [`USE_REFRESH`] until `stop`, then
/// removes the record (revoking its lease, so control sees the node go at once).
async fn refresh_use(
    held: LeasedRecord,
    cfg: Arc<AgentConfig>,
    mut cpu: CpuSampler,
    limiter: Limiter,
    running: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let mut refresh = tokio::time::interval(USE_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    refresh.tick().await; // the first tick is at once; the record was just written
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = refresh.tick() => {}
        }
        let sample = match NodeResources::sample(&cfg.work_dir, &mut cpu) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %chain(&e), "sampling node resources failed");
                continue;
            }
        };
        let record = agent_record(&cfg, &sample, &limiter, running.load(Ordering::Relaxed));
        match encode(&record) {
            Ok(v) => held.set(v),
            Err(e) => tracing::warn!(error = %e, "encoding the agent record failed"),
        }
    }
    held.stop().await;
}

/// An instance this agent handles (running, or failed before it could run).
#[derive(Debug)]
struct Tracked {
    key: String,
    reporter: Option<CancellationToken>,
    supervised: bool,
    /// The id of the instance's credential, until it is revoked.
    token_id: Option<String>,
}

/// The assignment loop's state; owned by its task.
#[derive(Debug)]
struct Runtime {
    meta: Arc<dyn MetaStore>,
    cfg: Arc<AgentConfig>,
    downloader: Downloader,
    sup: Supervisor,
    tracked: HashMap<String, Tracked>,
    reporters: TaskTracker,
    reporters_stop: CancellationToken,
    running: Arc<AtomicU64>,
}

/// Where an instance's package comes from.
#[derive(Debug)]
enum Source {
    /// On this node's filesystem.
    Local(PackageSource),
    /// Downloaded first.
    Remote(RemoteSource),
}

/// The record fields for a supervisor status: (state, reason, pid).
fn record_fields(st: &InstanceStatus) -> (InstancePhase, Option<String>, Option<u32>) {
    match &st.state {
        InstanceState::Starting => (InstancePhase::Starting, None, st.pid),
        InstanceState::Running => (InstancePhase::Running, None, st.pid),
        InstanceState::Restarting { attempt } => (
            InstancePhase::Starting,
            Some(format!("restarting (attempt {attempt})")),
            None,
        ),
        InstanceState::Exited { code: 0 } => (
            InstancePhase::Exited,
            Some("exited with code 0".into()),
            None,
        ),
        InstanceState::Exited { code } => (
            InstancePhase::Failed,
            Some(format!("exited with code {code}")),
            None,
        ),
        InstanceState::Failed { reason } => (InstancePhase::Failed, Some(reason.clone()), None),
        InstanceState::Stopped { .. } => (InstancePhase::Exited, Some("stopped".into()), None),
    }
}

/// Writes (state, reason, pid) into the record at `key` by compare-and-swap on its mod
/// revision. Leaves the record alone when it is gone, moved to another node, or marked
/// `stopping` by control. Returns whether the record now says what was asked.
async fn update_record(
    meta: &dyn MetaStore,
    key: &str,
    node: &str,
    state: InstancePhase,
    reason: Option<String>,
    pid: Option<u32>,
) -> Result<bool, MetaError> {
    for _ in 0..MAX_CAS_ATTEMPTS {
        let Some(kv) = meta.get(key).await? else {
            return Ok(false);
        };
        let Ok(mut rec) = serde_json::from_slice::<InstanceRecord>(&kv.value) else {
            return Ok(false);
        };
        if rec.node != node || rec.state == InstancePhase::Stopping {
            return Ok(false);
        }
        if rec.state == state && rec.reason == reason && rec.pid == pid {
            return Ok(true);
        }
        rec.state = state;
        rec.reason = reason.clone();
        rec.pid = pid;
        let txn = Txn {
            compare: vec![Compare::ModRevision(key.to_string(), kv.mod_revision)],
            success: vec![TxnOp::Put {
                key: key.to_string(),
                value: encode(&rec)?,
                lease: None,
            }],
            failure: vec![],
        };
        if meta.txn(txn).await? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Revokes credential `id`; failures are logged (a revocation that does not reach the store
/// leaves a token only the ended instance ever held).
async fn revoke(meta: &dyn MetaStore, id: &str) {
    if let Err(e) = revoke_token(meta, id).await {
        tracing::warn!(token = %id, error = %e, "revoking an instance credential failed");
    }
}

/// Reports every status change of one instance into its record until stopped or the
/// instance's task ends; revokes its credential `token_id` once it has ended for good.
async fn report(
    meta: Arc<dyn MetaStore>,
    key: String,
    node: String,
    mut rx: watch::Receiver<InstanceStatus>,
    token_id: String,
    stop: CancellationToken,
) {
    let mut revoked = false;
    loop {
        let status = rx.borrow_and_update().clone();
        if status.state.is_terminal() && !revoked {
            revoke(meta.as_ref(), &token_id).await;
            revoked = true;
        }
        let (state, reason, pid) = record_fields(&status);
        if let Err(e) = update_record(meta.as_ref(), &key, &node, state, reason, pid).await {
            tracing::warn!(%key, error = %e, "instance state not written");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

/// Whether the names of `rec` pass the protocol's rules; the reason to record if not. The
/// instance id becomes a directory and log file names, the function name an environment
/// variable and a credential's binding: neither is used before this check.
fn checked_names(rec: &InstanceRecord) -> Result<(), String> {
    IdKind::Instance
        .check(&rec.id)
        .and_then(|()| IdKind::Function.check(&rec.function))
        .map_err(|e| format!("invalid instance record: {e}"))
}

fn instance_id_of(key: &str) -> Option<&str> {
    key.strip_prefix(INSTANCES_PREFIX)?.rsplit('/').next()
}

impl Runtime {
    async fn run(mut self, stop: CancellationToken) {
        let mut follower = Follower::new(self.meta.clone(), INSTANCES_PREFIX, RETRY_PAUSE);
        while let Some(f) = follower.next(&stop).await {
            match f {
                Followed::Snapshot(kvs) => {
                    let mut present = Vec::with_capacity(kvs.len());
                    for kv in &kvs {
                        if let Some(id) = self.on_put(&kv.key, &kv.value).await {
                            present.push(id);
                        }
                    }
                    let gone: Vec<String> = self
                        .tracked
                        .keys()
                        .filter(|id| !present.contains(id))
                        .cloned()
                        .collect();
                    for id in gone {
                        self.stop_instance(&id).await;
                    }
                }
                Followed::Event(WatchEvent::Put(kv)) => {
                    self.on_put(&kv.key, &kv.value).await;
                }
                Followed::Event(WatchEvent::Delete { key, .. }) => {
                    let id = instance_id_of(&key).map(str::to_string);
                    if let Some(id) = id {
                        if self.tracked.get(&id).is_some_and(|t| t.key == key) {
                            self.stop_instance(&id).await;
                        }
                    }
                }
            }
        }
        // Shutdown: reporters first (the records stay as they are; control sees the lease
        // go), then every process, then their credentials.
        self.reporters_stop.cancel();
        self.reporters.close();
        let statuses = self.sup.shutdown().await;
        self.reporters.wait().await;
        for t in self.tracked.values_mut() {
            if let Some(id) = t.token_id.take() {
                revoke(self.meta.as_ref(), &id).await;
            }
        }
        tracing::info!(instances = statuses.len(), "agent instances stopped");
    }

    /// Revokes every credential still bound to `binding` (left by an agent that died, or by
    /// an earlier start of the same instance).
    async fn revoke_stale(&self, binding: &InstanceBinding) -> Result<(), MetaError> {
        let (kvs, _) = self.meta.range(TOKENS_PREFIX).await?;
        for kv in kvs {
            let Ok(rec) = serde_json::from_slice::<TokenRecord>(&kv.value) else {
                continue;
            };
            if rec.instance.as_ref() == Some(binding) {
                revoke(self.meta.as_ref(), &rec.id).await;
            }
        }
        Ok(())
    }

    /// Issues the credential of instance `rec` of `spec`; `None` (logged) if the store
    /// refused.
    async fn issue_token(
        &self,
        rec: &InstanceRecord,
        spec: &FunctionSpec,
    ) -> Option<shoal_meta::records::Issued> {
        let binding = InstanceBinding {
            function: rec.function.clone(),
            instance: rec.id.clone(),
        };
        if let Err(e) = self.revoke_stale(&binding).await {
            tracing::warn!(instance = %rec.id, error = %e, "looking for stale credentials failed");
        }
        match issue_instance_token(self.meta.as_ref(), spec.tenant(), binding).await {
            Ok(issued) => Some(issued),
            Err(e) => {
                tracing::warn!(instance = %rec.id, error = %e, "issuing the instance's credential failed");
                None
            }
        }
    }

    /// Handles one record; returns its instance id when it is this node's and tracked.
    async fn on_put(&mut self, key: &str, value: &[u8]) -> Option<String> {
        let rec: InstanceRecord = match serde_json::from_slice(value) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%key, error = %e, "skipping unreadable instance record");
                return None;
            }
        };
        let tracked = self.tracked.get(&rec.id).is_some_and(|t| t.key == key);
        if rec.node != self.cfg.node_id || rec.state == InstancePhase::Stopping {
            if tracked {
                self.stop_instance(&rec.id).await;
            }
            return None;
        }
        if !tracked && rec.state.is_wanted() {
            match checked_names(&rec) {
                Ok(()) => self.launch(key, &rec).await,
                Err(reason) => self.fail(key, &rec, reason).await,
            }
        }
        self.tracked.contains_key(&rec.id).then(|| rec.id.clone())
    }

    /// Records a failure that happened before the process could run.
    async fn fail(&mut self, key: &str, rec: &InstanceRecord, reason: String) {
        tracing::warn!(instance = %rec.id, function = %rec.function, %reason, "instance failed");
        self.tracked.insert(
            rec.id.clone(),
            Tracked {
                key: key.to_string(),
                reporter: None,
                supervised: false,
                token_id: None,
            },
        );
        if let Err(e) = update_record(
            self.meta.as_ref(),
            key,
            &self.cfg.node_id,
            InstancePhase::Failed,
            Some(reason),
            None,
        )
        .await
        {
            tracing::warn!(%key, error = %e, "instance state not written");
        }
    }

    async fn launch(&mut self, key: &str, rec: &InstanceRecord) {
        let fkey = function_key(&rec.function);
        let spec = match self.meta.get(&fkey).await {
            Ok(Some(kv)) => match serde_json::from_slice::<FunctionSpec>(&kv.value) {
                Ok(s) => s,
                Err(e) => {
                    let reason = format!("function record {fkey} is unreadable: {e}");
                    return self.fail(key, rec, reason).await;
                }
            },
            Ok(None) => {
                let reason = format!("function {} not found", rec.function);
                return self.fail(key, rec, reason).await;
            }
            Err(e) => {
                // Not this instance's fault: leave it for the next re-read.
                tracing::warn!(instance = %rec.id, error = %e, "reading the function failed");
                return;
            }
        };
        let source = match &spec.code {
            CodeSource::Dir { path } => Ok(Source::Local(PackageSource::Dir(path.into()))),
            CodeSource::TarGz { path } => Ok(Source::Local(PackageSource::TarGz(path.into()))),
            CodeSource::Object { id } => RemoteSource::object(id).map(Source::Remote),
            CodeSource::S3 { url } => RemoteSource::parse_s3(url).map(Source::Remote),
        };
        let source = match source {
            Ok(s) => s,
            Err(e) => {
                return self
                    .fail(key, rec, format!("fetch package: {}", chain(&e)))
                    .await
            }
        };
        let _ = update_record(
            self.meta.as_ref(),
            key,
            &self.cfg.node_id,
            InstancePhase::Starting,
            Some("fetching package".into()),
            None,
        )
        .await;
        let workdir = match self
            .fetch_package(&rec.id, source, spec.digest.clone())
            .await
        {
            Ok(p) => p,
            Err(reason) => return self.fail(key, rec, reason).await,
        };
        let mut command = spec.command.clone();
        if let Some(first) = command.first_mut() {
            if let Some(rel) = first.strip_prefix("./") {
                *first = workdir.join(rel).display().to_string();
            }
        }
        let mut env: BTreeMap<String, String> = spec.env.clone();
        env.insert(
            "SHOAL_PROXY_SOCKET".into(),
            self.cfg.proxy_socket.display().to_string(),
        );
        env.insert(
            "SHOAL_DATAWORKER_SOCKET".into(),
            self.cfg.dataworker_socket.display().to_string(),
        );
        env.insert("SHOAL_CONCURRENCY".into(), spec.concurrency.to_string());
        let Some(issued) = self.issue_token(rec, &spec).await else {
            // The store's trouble, not the instance's: tried again on the next re-read.
            if let Some(dir) = self.instance_dir(&rec.id) {
                let _ = tokio::task::spawn_blocking(move || remove_dir(&dir)).await;
            }
            return;
        };
        let token_id = issued.record.id.clone();
        env.insert("SHOAL_TOKEN".into(), issued.token);
        let ispec = InstanceSpec {
            id: rec.id.clone(),
            function: rec.function.clone(),
            command,
            workdir,
            env,
            log_dir: self.cfg.log_dir.clone(),
            restart: RestartPolicy::OnFailure {
                max_restarts: MAX_RESTARTS,
                backoff_initial: RESTART_BACKOFF,
                backoff_max: Duration::from_secs(10),
            },
            cpu_milli: spec.resources.cpu_milli,
            mem_mib: u64::from(spec.resources.mem_mib),
            grace: self.cfg.grace,
        };
        let rx = match self.sup.start(ispec) {
            Ok(rx) => rx,
            Err(e) => {
                revoke(self.meta.as_ref(), &token_id).await;
                return self.fail(key, rec, format!("start: {}", chain(&e))).await;
            }
        };
        crate::logs::record_tenant(&self.cfg.log_dir, &rec.id, spec.tenant());
        tracing::info!(instance = %rec.id, function = %rec.function, tenant = %spec.tenant(), "instance started");
        let stop_reporting = self.reporters_stop.child_token();
        self.reporters.spawn(report(
            self.meta.clone(),
            key.to_string(),
            self.cfg.node_id.clone(),
            rx,
            token_id.clone(),
            stop_reporting.clone(),
        ));
        self.tracked.insert(
            rec.id.clone(),
            Tracked {
                key: key.to_string(),
                reporter: Some(stop_reporting),
                supervised: true,
                token_id: Some(token_id),
            },
        );
        self.count();
    }

    /// Fetches the package of instance `id` into `<work_dir>/<id>` (emptied first). The error
    /// is the reason to record: `fetch package ...` naming the source.
    async fn fetch_package(
        &self,
        id: &str,
        source: Source,
        digest: Option<String>,
    ) -> Result<PathBuf, String> {
        let dest = self
            .instance_dir(id)
            .ok_or_else(|| format!("fetch package: invalid instance id {id:?}"))?;
        {
            let dest = dest.clone();
            tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dest) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(format!("fetch package: clear {}: {e}", dest.display()))
                }
                _ => Ok(()),
            })
            .await
            .map_err(|e| format!("fetch package: {e}"))??;
        }
        match source {
            Source::Local(source) => {
                let what = match &source {
                    PackageSource::Dir(p) | PackageSource::TarGz(p) => p.display().to_string(),
                };
                match tokio::task::spawn_blocking(move || fetch(&source, &dest, digest.as_deref()))
                    .await
                {
                    Ok(Ok(p)) => Ok(p),
                    Ok(Err(e)) => Err(format!("fetch package {what}: {}", chain(&e))),
                    Err(e) => Err(format!("fetch package {what}: {e}")),
                }
            }
            Source::Remote(source) => {
                let staging = self.cfg.work_dir.join(STAGING_DIR);
                self.downloader
                    .fetch(&source, &staging, &dest, digest.as_deref())
                    .await
                    .map_err(|e| format!("fetch package: {}", chain(&e)))
            }
        }
    }

    /// Stops and forgets one instance, and removes its package directory.
    async fn stop_instance(&mut self, id: &str) {
        let Some(t) = self.tracked.remove(id) else {
            return;
        };
        if let Some(r) = &t.reporter {
            r.cancel();
        }
        if t.supervised {
            match self.sup.stop(id).await {
                Ok(st) => tracing::info!(instance = %id, state = ?st.state, "instance stopped"),
                Err(e) => tracing::warn!(instance = %id, error = %e, "stopping instance failed"),
            }
            self.sup.remove(id);
        }
        if let Some(token) = &t.token_id {
            revoke(self.meta.as_ref(), token).await;
        }
        if let Some(dir) = self.instance_dir(id) {
            let _ = tokio::task::spawn_blocking(move || remove_dir(&dir)).await;
        }
        self.count();
    }

    /// `<work_dir>/<id>`, for an id that passes the protocol's rule (so it is one plain path
    /// component); `None` for any other id, which never becomes a path.
    fn instance_dir(&self, id: &str) -> Option<PathBuf> {
        IdKind::Instance
            .check(id)
            .ok()
            .map(|()| self.cfg.work_dir.join(id))
    }

    fn count(&self) {
        let n = self.tracked.values().filter(|t| t.supervised).count();
        self.running
            .store(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "removing instance directory failed");
        }
    }
}
