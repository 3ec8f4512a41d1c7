//! Starting, watching, restarting and stopping function instances.
//!
//! Each instance is one owned Tokio task that owns the child process, its cgroup and a
//! [`watch`] sender for its [`InstanceStatus`]. The [`Supervisor`] keeps the task's
//! [`JoinHandle`] and a cancellation token per instance; [`Supervisor::stop`] and
//! [`Supervisor::shutdown`] cancel and then await the tasks, so when they return the processes
//! are gone.
//!
//! Invariants:
//! - every instance runs in its own process group (`process_group(0)`); stopping sends
//!   SIGTERM to the group, then SIGKILL to the group after the grace period; after the main
//!   process ends, by itself or not, the remaining group members are SIGKILLed, and so are any
//!   processes left in the instance's cgroup (which catches members that changed group);
//! - a failure to spawn (missing command, bad working directory) is terminal: the instance
//!   ends `Failed` with the reason, with no restart;
//! - restarts follow the [`RestartPolicy`] with exponential back-off capped at `backoff_max`
//!   and a bounded number of restarts;
//! - the child's environment is exactly `PATH` (from [`SupervisorConfig`], unless the spec
//!   sets it), `SHOAL_INSTANCE_ID`, `SHOAL_FUNCTION` and the spec's variables: nothing of the
//!   agent's own environment leaks;
//! - stdout and stderr go straight to `<log_dir>/<id>.out` and `.err` (appended); a log file
//!   larger than [`SupervisorConfig::max_log_bytes`] is rotated to `.1` when the instance
//!   (re)starts, so disk use is bounded per start, not during one long run;
//! - the number of instances tracked, finished or not, is bounded by
//!   [`SupervisorConfig::max_instances`]; finished ones are evicted first.
//!
//! The gap between `spawn` and moving the pid into its cgroup is a few microseconds while the
//! child is still in `exec`; a process forked in that window would escape the limits (but not
//! the process-group cleanup).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cgroup::{CgroupHandle, Limiter};
use shoal_protocol::IdKind;

/// How long to wait for processes left in a cgroup to disappear after SIGKILL.
const CGROUP_DRAIN: Duration = Duration::from_secs(2);

/// Supervisor-wide settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorConfig {
    /// Most instances tracked at once (running or finished-but-not-removed).
    pub max_instances: usize,
    /// `PATH` given to children whose spec does not set one.
    pub default_path: String,
    /// A log file larger than this is rotated when its instance (re)starts.
    pub max_log_bytes: u64,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            max_instances: 256,
            default_path: "/usr/local/bin:/usr/bin:/bin".to_string(),
            max_log_bytes: 16 * 1024 * 1024,
        }
    }
}

/// When an instance that ended is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Never restart.
    Never,
    /// Restart after a non-zero exit or death by signal.
    OnFailure {
        /// Most restarts before giving up.
        max_restarts: u32,
        /// Delay before the first restart; doubled for each further one.
        backoff_initial: Duration,
        /// Upper bound of the delay.
        backoff_max: Duration,
    },
    /// Restart after any exit.
    Always {
        /// Most restarts before giving up (`u32::MAX` for practically unlimited).
        max_restarts: u32,
        /// Delay before the first restart; doubled for each further one.
        backoff_initial: Duration,
        /// Upper bound of the delay.
        backoff_max: Duration,
    },
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    /// Instance id: the protocol's rule ([`IdKind::Instance`]: 1 to 128 characters of
    /// `[A-Za-z0-9._-]`, starting with a letter or a digit).
    pub id: String,
    /// Function the instance belongs to (reported, and passed as `SHOAL_FUNCTION`).
    pub function: String,
    /// Program and arguments; the program is looked up in the child's `PATH`.
    pub command: Vec<String>,
    /// Working directory (usually the unpacked package).
    pub workdir: PathBuf,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// Directory for the `.out` and `.err` files.
    pub log_dir: PathBuf,
    /// Restart policy.
    pub restart: RestartPolicy,
    /// CPU limit in thousandths of a core; 0 for none.
    pub cpu_milli: u32,
    /// Memory limit in MiB; 0 for none.
    pub mem_mib: u64,
    /// Time between SIGTERM and SIGKILL when stopping.
    pub grace: Duration,
}

/// Lifecycle state of an instance.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum InstanceState {
    /// Being spawned.
    Starting,
    /// The process is running.
    Running,
    /// Waiting out the back-off before restart number `attempt`.
    Restarting {
        /// Restart number, from 1.
        attempt: u32,
    },
    /// Ended with an exit code and will not be restarted.
    Exited {
        /// Exit code.
        code: i32,
    },
    /// Could not be started, died by a signal, or ran out of restarts.
    Failed {
        /// Human-readable reason.
        reason: String,
    },
    /// Stopped on request.
    Stopped {
        /// Whether SIGKILL was needed after the grace period.
        forced: bool,
    },
}

impl InstanceState {
    /// Whether the instance has ended for good.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            InstanceState::Exited { .. }
                | InstanceState::Failed { .. }
                | InstanceState::Stopped { .. }
        )
    }
}

/// Whether resource limits apply to an instance.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Limits {
    /// The instance runs in a cgroup with its limits.
    Enforced,
    /// Limits are not applied, for the given reason.
    NotEnforced(String),
}

impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limits::Enforced => f.write_str("limits enforced"),
            Limits::NotEnforced(r) => write!(f, "limits not enforced: {r}"),
        }
    }
}

/// A snapshot of an instance, as published to subscribers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InstanceStatus {
    /// Instance id.
    pub id: String,
    /// Function name.
    pub function: String,
    /// Lifecycle state.
    pub state: InstanceState,
    /// Pid of the current process, while there is one.
    pub pid: Option<u32>,
    /// Restarts performed so far.
    pub restarts: u32,
    /// Whether limits apply.
    pub limits: Limits,
}

/// Which log stream to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    /// `<id>.out`.
    Stdout,
    /// `<id>.err`.
    Stderr,
}

/// Why [`Supervisor::start`] refused a spec.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The id is not acceptable.
    #[error("invalid instance id {0:?}")]
    InvalidId(String),
    /// The command is empty.
    #[error("instance {0}: empty command")]
    EmptyCommand(String),
    /// An instance with this id is still running.
    #[error("instance {0} is already running")]
    AlreadyRunning(String),
    /// The instance bound is reached and nothing finished can be evicted.
    #[error("too many instances (limit {0})")]
    TooManyInstances(usize),
    /// Not called within a Tokio runtime.
    #[error("start must be called within a Tokio runtime")]
    NoRuntime,
    /// The log directory could not be created.
    #[error("create log directory {path}")]
    LogDir {
        /// The directory.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
}

/// Why an operation on an existing instance failed.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// No instance with this id is tracked.
    #[error("unknown instance {0}")]
    Unknown(String),
    /// Reading a log file failed.
    #[error("read log {path}")]
    ReadLog {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
}

#[derive(Debug)]
struct Entry {
    log_dir: PathBuf,
    status: watch::Receiver<InstanceStatus>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Entry {
    fn finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }
}

/// Owns the instances of one node.
///
/// Methods that change the set of instances take `&mut self`; callers that need concurrent
/// access wrap the supervisor in a `tokio::sync::Mutex` or drive it from one task.
#[derive(Debug)]
pub struct Supervisor {
    config: Arc<SupervisorConfig>,
    limiter: Limiter,
    instances: HashMap<String, Entry>,
    root: CancellationToken,
}

/// Whether `id` is an instance id by the protocol's rule ([`IdKind::Instance`]): then it is
/// a safe single path component (`<work_dir>/<id>`, `<log_dir>/<id>.out`) and header value.
pub(crate) fn valid_id(id: &str) -> bool {
    IdKind::Instance.check(id).is_ok()
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

pub(crate) fn log_path(dir: &Path, id: &str, stream: LogStream) -> PathBuf {
    dir.join(match stream {
        LogStream::Stdout => format!("{id}.out"),
        LogStream::Stderr => format!("{id}.err"),
    })
}

impl Supervisor {
    /// A supervisor that limits instances through `limiter`.
    pub fn new(config: SupervisorConfig, limiter: Limiter) -> Supervisor {
        Supervisor {
            config: Arc::new(config),
            limiter,
            instances: HashMap::new(),
            root: CancellationToken::new(),
        }
    }

    /// The limiter in use.
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// Starts an instance and returns a receiver of its status changes. Must be called
    /// within a Tokio runtime. Spawn failures are reported through the status, not here.
    pub fn start(
        &mut self,
        spec: InstanceSpec,
    ) -> Result<watch::Receiver<InstanceStatus>, StartError> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| StartError::NoRuntime)?;
        if !valid_id(&spec.id) {
            return Err(StartError::InvalidId(spec.id));
        }
        if spec.command.is_empty() {
            return Err(StartError::EmptyCommand(spec.id));
        }
        if let Some(e) = self.instances.get(&spec.id) {
            if !e.finished() {
                return Err(StartError::AlreadyRunning(spec.id));
            }
            self.instances.remove(&spec.id);
        }
        if self.instances.len() >= self.config.max_instances {
            let victim = self
                .instances
                .iter()
                .find(|(_, e)| e.finished())
                .map(|(k, _)| k.clone());
            match victim {
                Some(k) => {
                    self.instances.remove(&k);
                }
                None => return Err(StartError::TooManyInstances(self.config.max_instances)),
            }
        }
        fs::create_dir_all(&spec.log_dir).map_err(|source| StartError::LogDir {
            path: spec.log_dir.clone(),
            source,
        })?;
        let (cgroup, limits) = if let Some(reason) = self.limiter.reason() {
            (None, Limits::NotEnforced(reason.to_string()))
        } else {
            match self.limiter.create(&spec.id, spec.cpu_milli, spec.mem_mib) {
                Ok(h) => (Some(h), Limits::Enforced),
                Err(e) => {
                    let reason = chain(&e);
                    tracing::warn!(instance = %spec.id, %reason, "limits not enforced");
                    (None, Limits::NotEnforced(reason))
                }
            }
        };
        let (tx, rx) = watch::channel(InstanceStatus {
            id: spec.id.clone(),
            function: spec.function.clone(),
            state: InstanceState::Starting,
            pid: None,
            restarts: 0,
            limits,
        });
        let stop = self.root.child_token();
        let log_dir = spec.log_dir.clone();
        let id = spec.id.clone();
        let task = rt.spawn(run_instance(
            spec,
            Arc::clone(&self.config),
            cgroup,
            tx,
            stop.clone(),
        ));
        self.instances.insert(
            id,
            Entry {
                log_dir,
                status: rx.clone(),
                stop,
                task: Some(task),
            },
        );
        Ok(rx)
    }

    /// Stops an instance (SIGTERM, then SIGKILL after its grace) and waits until its processes
    /// are gone. Returns the final status. Stopping a finished instance just returns its status.
    pub async fn stop(&mut self, id: &str) -> Result<InstanceStatus, InstanceError> {
        let entry = self
            .instances
            .get_mut(id)
            .ok_or_else(|| InstanceError::Unknown(id.to_string()))?;
        entry.stop.cancel();
        if let Some(task) = entry.task.take() {
            if let Err(e) = task.await {
                tracing::error!(instance = id, error = %e, "instance task ended abnormally");
            }
        }
        let status = entry.status.borrow().clone();
        Ok(status)
    }

    /// Stops all instances concurrently and waits for all of them. Returns their final
    /// statuses. The supervisor can be used again afterwards.
    pub async fn shutdown(&mut self) -> Vec<InstanceStatus> {
        self.root.cancel();
        for (id, e) in &mut self.instances {
            if let Some(task) = e.task.take() {
                if let Err(err) = task.await {
                    tracing::error!(instance = %id, error = %err, "instance task ended abnormally");
                }
            }
        }
        self.root = CancellationToken::new();
        self.statuses()
    }

    /// Forgets a finished instance. Returns `false` if it is unknown or still running.
    pub fn remove(&mut self, id: &str) -> bool {
        if self.instances.get(id).is_some_and(Entry::finished) {
            self.instances.remove(id);
            true
        } else {
            false
        }
    }

    /// The current status of one instance.
    pub fn status(&self, id: &str) -> Option<InstanceStatus> {
        self.instances.get(id).map(|e| e.status.borrow().clone())
    }

    /// A receiver of one instance's status changes.
    pub fn subscribe(&self, id: &str) -> Option<watch::Receiver<InstanceStatus>> {
        self.instances.get(id).map(|e| e.status.clone())
    }

    /// The current status of every tracked instance, sorted by id.
    pub fn statuses(&self) -> Vec<InstanceStatus> {
        let mut v: Vec<_> = self
            .instances
            .values()
            .map(|e| e.status.borrow().clone())
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// The last `tail_bytes` of an instance's stdout log (lossy UTF-8).
    pub fn logs(&self, id: &str, tail_bytes: u64) -> Result<String, InstanceError> {
        self.logs_stream(id, LogStream::Stdout, tail_bytes)
    }

    /// The last `tail_bytes` of one of an instance's logs (lossy UTF-8). A log not yet
    /// created reads as empty.
    pub fn logs_stream(
        &self,
        id: &str,
        stream: LogStream,
        tail_bytes: u64,
    ) -> Result<String, InstanceError> {
        let entry = self
            .instances
            .get(id)
            .ok_or_else(|| InstanceError::Unknown(id.to_string()))?;
        let path = log_path(&entry.log_dir, id, stream);
        read_tail(&path, tail_bytes).map_err(|source| InstanceError::ReadLog { path, source })
    }
}

/// The last `tail_bytes` of the file at `path` (lossy UTF-8); a missing file reads as empty.
pub(crate) fn read_tail(path: &Path, tail_bytes: u64) -> io::Result<String> {
    let mut f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let start = len.saturating_sub(tail_bytes);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(len - start).read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // Tasks still running stop their instances (grace, then kill); the children are also
        // `kill_on_drop` should the runtime go away first.
        self.root.cancel();
    }
}

fn open_log(dir: &Path, id: &str, stream: LogStream, max: u64) -> io::Result<fs::File> {
    let path = log_path(dir, id, stream);
    if fs::metadata(&path).is_ok_and(|m| m.len() > max) {
        let mut rotated = path.clone().into_os_string();
        rotated.push(".1");
        fs::rename(&path, rotated)?;
    }
    fs::OpenOptions::new().create(true).append(true).open(path)
}

fn spawn(spec: &InstanceSpec, config: &SupervisorConfig) -> Result<tokio::process::Child, String> {
    let program = &spec.command[0];
    let out = open_log(
        &spec.log_dir,
        &spec.id,
        LogStream::Stdout,
        config.max_log_bytes,
    )
    .map_err(|e| format!("open stdout log: {e}"))?;
    let err = open_log(
        &spec.log_dir,
        &spec.id,
        LogStream::Stderr,
        config.max_log_bytes,
    )
    .map_err(|e| format!("open stderr log: {e}"))?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&spec.command[1..])
        .current_dir(&spec.workdir)
        .env_clear()
        .env("PATH", &config.default_path)
        .envs(&spec.env)
        .env("SHOAL_INSTANCE_ID", &spec.id)
        .env("SHOAL_FUNCTION", &spec.function)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0)
        .kill_on_drop(true);
    cmd.spawn()
        .map_err(|e| format!("spawn {program:?} in {}: {e}", spec.workdir.display()))
}

fn signal_group(pid: Option<u32>, sig: Signal) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // ESRCH when the group is already empty.
        let _ = killpg(Pid::from_raw(pid), sig);
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "ended".to_string(),
    }
}

/// SIGTERM to the group, wait up to `grace`, then SIGKILL. Returns whether SIGKILL was needed.
async fn terminate(child: &mut tokio::process::Child, pid: Option<u32>, grace: Duration) -> bool {
    signal_group(pid, Signal::SIGTERM);
    let forced = match tokio::time::timeout(grace, child.wait()).await {
        Ok(_) => false,
        Err(_) => {
            signal_group(pid, Signal::SIGKILL);
            let _ = child.kill().await;
            true
        }
    };
    signal_group(pid, Signal::SIGKILL);
    forced
}

/// Kills whatever is left in the cgroup and removes it.
async fn drain_cgroup(cgroup: Option<CgroupHandle>) {
    let Some(mut cg) = cgroup else { return };
    let deadline = tokio::time::Instant::now() + CGROUP_DRAIN;
    loop {
        for pid in cg.pids() {
            if let Ok(p) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGKILL);
            }
        }
        match cg.remove() {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                tracing::warn!(error = %chain(&e), "cgroup not removed");
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    initial.saturating_mul(factor).min(max)
}

async fn run_instance(
    spec: InstanceSpec,
    config: Arc<SupervisorConfig>,
    cgroup: Option<CgroupHandle>,
    tx: watch::Sender<InstanceStatus>,
    stop: CancellationToken,
) {
    let set = |state: InstanceState, pid: Option<u32>| {
        tx.send_modify(|s| {
            s.state = state;
            s.pid = pid;
        });
    };
    let mut restarts = 0u32;
    loop {
        set(InstanceState::Starting, None);
        let mut child = match spawn(&spec, &config) {
            Ok(c) => c,
            Err(reason) => {
                set(InstanceState::Failed { reason }, None);
                break;
            }
        };
        let pid = child.id();
        if let (Some(cg), Some(p)) = (&cgroup, pid) {
            if let Err(e) = cg.add(p) {
                let reason = chain(&e);
                tracing::warn!(instance = %spec.id, %reason, "limits not enforced");
                tx.send_modify(|s| s.limits = Limits::NotEnforced(reason));
            }
        }
        set(InstanceState::Running, pid);
        let exit = tokio::select! {
            r = child.wait() => Some(r),
            () = stop.cancelled() => None,
        };
        let status = match exit {
            None => {
                let forced = terminate(&mut child, pid, spec.grace).await;
                set(InstanceState::Stopped { forced }, None);
                break;
            }
            Some(Err(e)) => {
                signal_group(pid, Signal::SIGKILL);
                let _ = child.kill().await;
                set(
                    InstanceState::Failed {
                        reason: format!("wait for process: {e}"),
                    },
                    None,
                );
                break;
            }
            Some(Ok(status)) => status,
        };
        // Whatever the main process left behind in its group goes with it.
        signal_group(pid, Signal::SIGKILL);
        let failed = !status.success();
        let retry = match spec.restart {
            RestartPolicy::Never => None,
            RestartPolicy::OnFailure {
                max_restarts,
                backoff_initial,
                backoff_max,
            } if failed => Some((max_restarts, backoff_initial, backoff_max)),
            RestartPolicy::OnFailure { .. } => None,
            RestartPolicy::Always {
                max_restarts,
                backoff_initial,
                backoff_max,
            } => Some((max_restarts, backoff_initial, backoff_max)),
        };
        let end_state = || match status.code() {
            Some(code) if retry.is_none() => InstanceState::Exited { code },
            _ if retry.is_some() => InstanceState::Failed {
                reason: format!("{}; gave up after {restarts} restarts", describe(status)),
            },
            _ => InstanceState::Failed {
                reason: describe(status),
            },
        };
        let Some((max, initial, max_delay)) = retry else {
            set(end_state(), None);
            break;
        };
        if restarts >= max {
            set(end_state(), None);
            break;
        }
        restarts += 1;
        tx.send_modify(|s| {
            s.state = InstanceState::Restarting { attempt: restarts };
            s.pid = None;
            s.restarts = restarts;
        });
        tracing::info!(instance = %spec.id, attempt = restarts, "{}; restarting", describe(status));
        tokio::select! {
            () = tokio::time::sleep(backoff(initial, max_delay, restarts)) => {}
            () = stop.cancelled() => {
                set(InstanceState::Stopped { forced: false }, None);
                break;
            }
        }
    }
    drain_cgroup(cgroup).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let i = Duration::from_millis(100);
        let m = Duration::from_secs(1);
        assert_eq!(backoff(i, m, 1), i);
        assert_eq!(backoff(i, m, 2), Duration::from_millis(200));
        assert_eq!(backoff(i, m, 4), Duration::from_millis(800));
        assert_eq!(backoff(i, m, 5), m);
        assert_eq!(backoff(i, m, 100), m);
    }

    #[test]
    fn ids() {
        assert!(valid_id("fn-1.a_b"));
        assert!(!valid_id(".."));
        assert!(!valid_id("a/b"));
        assert!(!valid_id(""));
    }
}
