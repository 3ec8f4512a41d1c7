//! CPU and memory limits through Linux cgroups, detected at runtime.
//!
//! [`Limiter::detect`] reads `/proc/self/mountinfo` and `/proc/self/cgroup` and picks, in
//! order: a caller-given cgroup v2 directory, the agent's own cgroup v2 group, or the agent's
//! own groups in separately mounted v1 `cpu` and `memory` hierarchies. Instance groups are made
//! under a `shoal` child of that base; nothing is assumed about the writability of a hierarchy
//! root. When nothing is usable the limiter is [`LimiterKind::Unavailable`] and
//! [`Limiter::reason`] says why, for status reports.
//!
//! Invariants: a [`CgroupHandle`] removes its directories on drop (best effort; removal fails
//! while processes remain, so the supervisor kills them first). Instance ids are restricted to
//! `[A-Za-z0-9._-]` so they cannot name a path outside the base.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// CFS period used for CPU quotas, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;
/// Smallest CPU quota the kernel accepts, in microseconds.
const CPU_MIN_QUOTA_US: u64 = 1_000;
/// Name of the agent's group under its base group(s).
const GROUP: &str = "shoal";

/// Which mechanism a [`Limiter`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimiterKind {
    /// Unified hierarchy (`cpu.max`, `memory.max`).
    V2,
    /// Legacy hierarchies (`cpu.cfs_quota_us`, `memory.limit_in_bytes`).
    V1,
    /// Limits cannot be applied; see [`Limiter::reason`].
    Unavailable,
}

#[derive(Debug, Clone)]
enum Mode {
    V2 { base: PathBuf },
    V1 { cpu: PathBuf, memory: PathBuf },
    Unavailable { reason: String },
}

/// Creates per-instance cgroups with CPU and memory limits, or explains why it cannot.
#[derive(Debug, Clone)]
pub struct Limiter {
    mode: Mode,
}

/// Why a cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The limiter cannot apply limits on this node.
    #[error("cgroup limits unavailable: {0}")]
    Unavailable(String),
    /// The instance id is not usable as a cgroup name.
    #[error("invalid instance id for a cgroup: {0:?}")]
    InvalidId(String),
    /// Creating the group directory failed.
    #[error("create cgroup {path}")]
    Create {
        /// Directory that could not be created.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Writing a limit file failed.
    #[error("write cgroup limit {path}")]
    WriteLimit {
        /// File that could not be written.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Moving a process into the group failed.
    #[error("add pid {pid} to cgroup {path}")]
    AddProcess {
        /// Process id.
        pid: u32,
        /// `cgroup.procs` file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Removing the group directory failed.
    #[error("remove cgroup {path}")]
    Remove {
        /// Directory that could not be removed.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
}

/// One line of `/proc/self/mountinfo` that describes a cgroup mount.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CgMount {
    root: String,
    mount_point: PathBuf,
    v2: bool,
    controllers: Vec<String>,
}

fn parse_mountinfo(text: &str) -> Vec<CgMount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split_whitespace().collect();
        let post: Vec<&str> = post.split_whitespace().collect();
        if pre.len() < 5 || post.len() < 3 {
            continue;
        }
        let fstype = post[0];
        let v2 = match fstype {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        let controllers = if v2 {
            Vec::new()
        } else {
            post[2].split(',').map(str::to_string).collect()
        };
        out.push(CgMount {
            root: unescape(pre[3]),
            mount_point: PathBuf::from(unescape(pre[4])),
            v2,
            controllers,
        });
    }
    out
}

/// Undoes mountinfo's octal escaping of space, tab, newline and backslash.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Parses `/proc/self/cgroup` into (controllers, path) pairs; v2 has empty controllers.
fn parse_self_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let _id = it.next()?;
            let ctrls = it.next()?;
            let path = it.next()?;
            let ctrls = ctrls
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect();
            Some((ctrls, path.to_string()))
        })
        .collect()
}

/// The directory of our own group inside a mount, or the mount point if our path is not
/// under the mount's root (for instance when the mount is another namespace's view).
fn own_dir(m: &CgMount, own: &str) -> PathBuf {
    let rel = own
        .strip_prefix(m.root.trim_end_matches('/'))
        .filter(|r| r.is_empty() || r.starts_with('/'));
    match rel {
        Some(rel) => m.mount_point.join(rel.trim_start_matches('/')),
        None => m.mount_point.clone(),
    }
}

fn read_words(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Tries to use a v2 directory as the parent of the agent's group.
fn try_v2(parent: &Path) -> Result<PathBuf, String> {
    let avail = read_words(&parent.join("cgroup.controllers"));
    if !(avail.iter().any(|c| c == "cpu") && avail.iter().any(|c| c == "memory")) {
        return Err(format!(
            "cgroup2 {}: cpu and memory controllers not available (have: {:?})",
            parent.display(),
            avail.join(" ")
        ));
    }
    let sub = parent.join("cgroup.subtree_control");
    let enabled = read_words(&sub);
    if !(enabled.iter().any(|c| c == "cpu") && enabled.iter().any(|c| c == "memory")) {
        fs::write(&sub, "+cpu +memory").map_err(|e| {
            format!(
                "cgroup2 {}: cannot enable cpu and memory: {e}",
                sub.display()
            )
        })?;
    }
    let base = parent.join(GROUP);
    fs::create_dir_all(&base)
        .map_err(|e| format!("cgroup2: cannot create {}: {e}", base.display()))?;
    fs::write(base.join("cgroup.subtree_control"), "+cpu +memory").map_err(|e| {
        format!(
            "cgroup2 {}: cannot enable cpu and memory: {e}",
            base.display()
        )
    })?;
    Ok(base)
}

/// Tries to use a v1 hierarchy directory as the parent of the agent's group.
fn try_v1(parent: &Path, probe: &str) -> Result<PathBuf, String> {
    let base = parent.join(GROUP);
    fs::create_dir_all(&base)
        .map_err(|e| format!("cgroup v1: cannot create {}: {e}", base.display()))?;
    if !base.join(probe).exists() {
        return Err(format!("cgroup v1: {} has no {probe}", base.display()));
    }
    Ok(base)
}

impl Limiter {
    /// Detects how limits can be applied on this machine.
    ///
    /// `root_hint`, when given, is a cgroup v2 directory delegated to the agent (for example by
    /// systemd); it is tried first. Otherwise the agent's own groups are found through
    /// `/proc/self/mountinfo` and `/proc/self/cgroup`. Never fails: an unusable setup yields a
    /// limiter of kind [`LimiterKind::Unavailable`] with a reason.
    pub fn detect(root_hint: Option<PathBuf>) -> Limiter {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let self_cg = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        Self::detect_from(root_hint.as_deref(), &mountinfo, &self_cg)
    }

    /// Like [`Limiter::detect`], with the contents of `/proc/self/mountinfo` and
    /// `/proc/self/cgroup` given by the caller.
    pub fn detect_from(root_hint: Option<&Path>, mountinfo: &str, self_cgroup: &str) -> Limiter {
        let mut reasons = Vec::new();
        if let Some(hint) = root_hint {
            match try_v2(hint) {
                Ok(base) => {
                    return Limiter {
                        mode: Mode::V2 { base },
                    }
                }
                Err(r) => reasons.push(r),
            }
        }
        let mounts = parse_mountinfo(mountinfo);
        let own = parse_self_cgroup(self_cgroup);
        let own_path = |ctrl: Option<&str>| -> String {
            own.iter()
                .find(|(c, _)| match ctrl {
                    None => c.is_empty(),
                    Some(name) => c.iter().any(|x| x == name),
                })
                .map(|(_, p)| p.clone())
                .unwrap_or_else(|| "/".to_string())
        };
        match mounts.iter().find(|m| m.v2) {
            Some(m) => match try_v2(&own_dir(m, &own_path(None))) {
                Ok(base) => {
                    return Limiter {
                        mode: Mode::V2 { base },
                    }
                }
                Err(r) => reasons.push(r),
            },
            None => reasons.push("no cgroup2 mount".to_string()),
        }
        let find_v1 = |ctrl: &str| {
            mounts
                .iter()
                .find(|m| !m.v2 && m.controllers.iter().any(|c| c == ctrl))
        };
        match (find_v1("cpu"), find_v1("memory")) {
            (Some(c), Some(m)) => {
                let cpu = try_v1(&own_dir(c, &own_path(Some("cpu"))), "cpu.cfs_quota_us");
                let mem = try_v1(
                    &own_dir(m, &own_path(Some("memory"))),
                    "memory.limit_in_bytes",
                );
                match (cpu, mem) {
                    (Ok(cpu), Ok(memory)) => {
                        return Limiter {
                            mode: Mode::V1 { cpu, memory },
                        }
                    }
                    (Err(a), Err(b)) => {
                        reasons.push(a);
                        reasons.push(b);
                    }
                    (Err(r), _) | (_, Err(r)) => reasons.push(r),
                }
            }
            _ => reasons.push("cgroup v1: cpu and memory controllers not both mounted".into()),
        }
        Limiter::unavailable(reasons.join("; "))
    }

    /// A limiter that never applies limits, reporting `reason`.
    pub fn unavailable(reason: impl Into<String>) -> Limiter {
        Limiter {
            mode: Mode::Unavailable {
                reason: reason.into(),
            },
        }
    }

    /// The mechanism in use.
    pub fn kind(&self) -> LimiterKind {
        match self.mode {
            Mode::V2 { .. } => LimiterKind::V2,
            Mode::V1 { .. } => LimiterKind::V1,
            Mode::Unavailable { .. } => LimiterKind::Unavailable,
        }
    }

    /// Whether [`Limiter::create`] can succeed.
    pub fn can_limit(&self) -> bool {
        !matches!(self.mode, Mode::Unavailable { .. })
    }

    /// Why limits cannot be applied, if they cannot.
    pub fn reason(&self) -> Option<&str> {
        match &self.mode {
            Mode::Unavailable { reason } => Some(reason),
            _ => None,
        }
    }

    /// The base directories instance groups are created in (one for v2, cpu and memory for v1).
    pub fn base_dirs(&self) -> Vec<PathBuf> {
        match &self.mode {
            Mode::V2 { base } => vec![base.clone()],
            Mode::V1 { cpu, memory } => vec![cpu.clone(), memory.clone()],
            Mode::Unavailable { .. } => Vec::new(),
        }
    }

    /// Creates the group for `instance_id` with a CPU quota of `cpu_milli` thousandths of a
    /// core and a memory limit of `mem_mib` MiB (0 means unlimited for either). A stale empty
    /// group of the same name is replaced.
    pub fn create(
        &self,
        instance_id: &str,
        cpu_milli: u32,
        mem_mib: u64,
    ) -> Result<CgroupHandle, CgroupError> {
        let valid = !instance_id.is_empty()
            && instance_id.len() <= 128
            && instance_id != "."
            && instance_id != ".."
            && instance_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
        if !valid {
            return Err(CgroupError::InvalidId(instance_id.to_string()));
        }
        let quota = if cpu_milli == 0 {
            None
        } else {
            Some((u64::from(cpu_milli) * CPU_PERIOD_US / 1000).max(CPU_MIN_QUOTA_US))
        };
        let mem = (mem_mib > 0).then(|| mem_mib.saturating_mul(1024 * 1024));
        let mut handle = CgroupHandle {
            dirs: Vec::new(),
            removed: false,
        };
        match &self.mode {
            Mode::Unavailable { reason } => return Err(CgroupError::Unavailable(reason.clone())),
            Mode::V2 { base } => {
                let dir = make_dir(&base.join(instance_id))?;
                handle.dirs.push(dir.clone());
                let cpu = match quota {
                    Some(q) => format!("{q} {CPU_PERIOD_US}"),
                    None => format!("max {CPU_PERIOD_US}"),
                };
                write(&dir.join("cpu.max"), &cpu)?;
                let mem = mem.map_or_else(|| "max".to_string(), |m| m.to_string());
                write(&dir.join("memory.max"), &mem)?;
            }
            Mode::V1 { cpu, memory } => {
                let cdir = make_dir(&cpu.join(instance_id))?;
                handle.dirs.push(cdir.clone());
                if memory != cpu {
                    let mdir = make_dir(&memory.join(instance_id))?;
                    handle.dirs.push(mdir);
                }
                write(&cdir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                let q = quota.map_or_else(|| "-1".to_string(), |q| q.to_string());
                write(&cdir.join("cpu.cfs_quota_us"), &q)?;
                let mdir = memory.join(instance_id);
                let m = mem.map_or_else(|| "-1".to_string(), |m| m.to_string());
                write(&mdir.join("memory.limit_in_bytes"), &m)?;
            }
        }
        Ok(handle)
    }

    /// Removes the agent's (empty) base groups, best effort.
    pub fn cleanup(&self) {
        for d in self.base_dirs() {
            let _ = fs::remove_dir(d);
        }
    }
}

fn make_dir(dir: &Path) -> Result<PathBuf, CgroupError> {
    if dir.exists() {
        // A leftover from a previous run; removable only when it holds no process.
        let _ = fs::remove_dir(dir);
    }
    fs::create_dir(dir).map_err(|source| CgroupError::Create {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(dir.to_path_buf())
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::WriteLimit {
        path: path.to_path_buf(),
        source,
    })
}

/// One instance's cgroup(s); removed on drop.
#[derive(Debug)]
pub struct CgroupHandle {
    dirs: Vec<PathBuf>,
    removed: bool,
}

impl CgroupHandle {
    /// The group directories (one for v2; cpu and memory for v1).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Moves `pid` into the group(s).
    pub fn add(&self, pid: u32) -> Result<(), CgroupError> {
        for d in &self.dirs {
            let path = d.join("cgroup.procs");
            fs::write(&path, pid.to_string()).map_err(|source| CgroupError::AddProcess {
                pid,
                path,
                source,
            })?;
        }
        Ok(())
    }

    /// The processes currently in the group(s).
    pub fn pids(&self) -> Vec<u32> {
        let mut out: Vec<u32> = self
            .dirs
            .iter()
            .flat_map(|d| read_words(&d.join("cgroup.procs")))
            .filter_map(|w| w.parse().ok())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Removes the group directories. Fails while processes remain in them. Idempotent.
    pub fn remove(&mut self) -> Result<(), CgroupError> {
        if self.removed {
            return Ok(());
        }
        for d in &self.dirs {
            match fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(CgroupError::Remove {
                        path: d.clone(),
                        source,
                    })
                }
            }
        }
        self.removed = true;
        Ok(())
    }
}

impl Drop for CgroupHandle {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn parses_mountinfo() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].controllers, vec!["rw", "cpu"]);
        assert!(m[2].v2);
        assert_eq!(m[1].root, "/docker/abc");
    }

    #[test]
    fn own_dir_strips_mount_root() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(
            own_dir(&m[1], "/docker/abc/x"),
            PathBuf::from("/sys/fs/cgroup/memory/x")
        );
        assert_eq!(
            own_dir(&m[1], "/other"),
            PathBuf::from("/sys/fs/cgroup/memory")
        );
        assert_eq!(own_dir(&m[0], "/"), PathBuf::from("/sys/fs/cgroup/cpu"));
        let own = parse_self_cgroup("4:memory:/a/b\n0::/\n");
        assert_eq!(own[0], (vec!["memory".to_string()], "/a/b".to_string()));
        assert_eq!(own[1], (Vec::new(), "/".to_string()));
    }

    #[test]
    fn nothing_mounted_is_unavailable_with_reason() {
        let l = Limiter::detect_from(None, "", "");
        assert_eq!(l.kind(), LimiterKind::Unavailable);
        assert!(l.reason().is_some_and(|r| r.contains("no cgroup2 mount")));
        assert!(matches!(
            l.create("x", 100, 10),
            Err(CgroupError::Unavailable(_))
        ));
    }

    #[test]
    fn rejects_bad_ids() {
        let l = Limiter::unavailable("test");
        assert!(matches!(
            l.create("../x", 1, 1),
            Err(CgroupError::InvalidId(_))
        ));
    }
}
