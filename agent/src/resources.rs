//! Node capacity and usage, and per-process usage, from `/proc` and `statvfs`.
//!
//! The parsers are pure functions over the file contents so they can be tested without a
//! particular machine. CPU use needs two samples: [`CpuSampler`] keeps the previous one.
//! Process CPU times assume the Linux `USER_HZ` of 100 ticks per second.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Linux exposes process times in `USER_HZ` ticks, which is 100 on all mainstream ABIs.
const USER_HZ: u64 = 100;

/// Why sampling failed.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    /// Reading a `/proc` file failed.
    #[error("read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// A `/proc` file did not have the expected format.
    #[error("parse {path}: {what}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was missing or malformed.
        what: &'static str,
    },
    /// `statvfs` on the disk path failed.
    #[error("statvfs {path}")]
    Statvfs {
        /// The path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: nix::Error,
    },
}

fn read(path: &str) -> Result<String, ResourceError> {
    fs::read_to_string(path).map_err(|source| ResourceError::Read {
        path: PathBuf::from(path),
        source,
    })
}

/// Aggregate CPU times from the first line of `/proc/stat`, in ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    /// Sum of all time fields (excluding guest time, which is already in user).
    pub total: u64,
    /// Idle plus iowait.
    pub idle: u64,
    /// Number of `cpuN` lines (online CPUs).
    pub cores: u32,
}

/// Parses the contents of `/proc/stat`.
pub fn parse_proc_stat(text: &str) -> Option<CpuTimes> {
    let mut out = CpuTimes::default();
    let mut found = false;
    for line in text.lines() {
        let mut it = line.split_whitespace();
        match it.next() {
            Some("cpu") => {
                let v: Vec<u64> = it.take(8).filter_map(|x| x.parse().ok()).collect();
                if v.len() < 4 {
                    return None;
                }
                out.total = v.iter().sum();
                out.idle = v[3] + v.get(4).copied().unwrap_or(0);
                found = true;
            }
            Some(name) if name.starts_with("cpu") => out.cores += 1,
            _ => {}
        }
    }
    found.then_some(out)
}

/// Keeps the previous `/proc/stat` sample to turn two samples into a use figure.
#[derive(Debug, Clone)]
pub struct CpuSampler {
    last: CpuTimes,
}

impl CpuSampler {
    /// Takes the first sample.
    pub fn new() -> Result<CpuSampler, ResourceError> {
        Ok(CpuSampler {
            last: Self::read_times()?,
        })
    }

    fn read_times() -> Result<CpuTimes, ResourceError> {
        parse_proc_stat(&read("/proc/stat")?).ok_or(ResourceError::Parse {
            path: PathBuf::from("/proc/stat"),
            what: "aggregate cpu line",
        })
    }

    /// Takes a sample and returns (online cores, CPU used since the previous sample in
    /// thousandths of a core).
    pub fn sample(&mut self) -> Result<(u32, u32), ResourceError> {
        let now = Self::read_times()?;
        let used = used_milli(&self.last, &now);
        self.last = now;
        Ok((now.cores.max(1), used))
    }
}

/// CPU used between two samples, in thousandths of a core.
pub fn used_milli(before: &CpuTimes, after: &CpuTimes) -> u32 {
    let total = after.total.saturating_sub(before.total);
    let idle = after.idle.saturating_sub(before.idle);
    if total == 0 {
        return 0;
    }
    let busy = total.saturating_sub(idle);
    let cores = u64::from(after.cores.max(1));
    u32::try_from(busy * cores * 1000 / total).unwrap_or(u32::MAX)
}

/// Memory figures from `/proc/meminfo`, in MiB: (total, available).
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let mut total = None;
    let mut avail = None;
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let key = it.next();
        let kib: Option<u64> = it.next().and_then(|v| v.parse().ok());
        match key {
            Some("MemTotal:") => total = kib,
            Some("MemAvailable:") => avail = kib,
            _ => {}
        }
    }
    Some((total? / 1024, avail? / 1024))
}

/// A node's capacity and current use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeResources {
    /// Online CPUs.
    pub cpu_cores: u32,
    /// CPU used since the sampler's previous sample, in thousandths of a core.
    pub cpu_used_milli: u32,
    /// Total memory.
    pub mem_total_mib: u64,
    /// Memory available for new work (`MemAvailable`).
    pub mem_available_mib: u64,
    /// Size of the filesystem holding the disk path.
    pub disk_total_mib: u64,
    /// Free space on it for unprivileged users.
    pub disk_free_mib: u64,
}

impl NodeResources {
    /// Samples the node; `disk_path` is where packages and logs live.
    pub fn sample(disk_path: &Path, cpu: &mut CpuSampler) -> Result<NodeResources, ResourceError> {
        let (cpu_cores, cpu_used_milli) = cpu.sample()?;
        let (mem_total_mib, mem_available_mib) =
            parse_meminfo(&read("/proc/meminfo")?).ok_or(ResourceError::Parse {
                path: PathBuf::from("/proc/meminfo"),
                what: "MemTotal or MemAvailable",
            })?;
        let st =
            nix::sys::statvfs::statvfs(disk_path).map_err(|source| ResourceError::Statvfs {
                path: disk_path.to_path_buf(),
                source,
            })?;
        #[allow(clippy::useless_conversion)]
        let frag = u64::from(st.fragment_size());
        #[allow(clippy::useless_conversion)]
        let blocks = u64::from(st.blocks());
        #[allow(clippy::useless_conversion)]
        let avail = u64::from(st.blocks_available());
        Ok(NodeResources {
            cpu_cores,
            cpu_used_milli,
            mem_total_mib,
            mem_available_mib,
            disk_total_mib: blocks.saturating_mul(frag) / (1024 * 1024),
            disk_free_mib: avail.saturating_mul(frag) / (1024 * 1024),
        })
    }
}

/// One process's resource use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessUsage {
    /// Resident set size in KiB.
    pub rss_kib: u64,
    /// User plus system CPU time consumed so far.
    pub cpu_time: Duration,
}

/// Parses `/proc/<pid>/stat` into user+system ticks.
pub fn parse_pid_stat(text: &str) -> Option<u64> {
    // The command name is in parentheses and may contain spaces; fields follow the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state(0) ppid(1) ... utime(11) stime(12).
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Parses `VmRSS` (KiB) from `/proc/<pid>/status`; 0 when absent (kernel threads, zombies).
pub fn parse_pid_rss(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl ProcessUsage {
    /// Samples process `pid`.
    pub fn sample(pid: u32) -> Result<ProcessUsage, ResourceError> {
        let stat_path = format!("/proc/{pid}/stat");
        let ticks = parse_pid_stat(&read(&stat_path)?).ok_or(ResourceError::Parse {
            path: PathBuf::from(&stat_path),
            what: "utime and stime",
        })?;
        let rss_kib = parse_pid_rss(&read(&format!("/proc/{pid}/status"))?);
        Ok(ProcessUsage {
            rss_kib,
            cpu_time: Duration::from_millis(ticks * 1000 / USER_HZ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat() {
        let t = parse_proc_stat(
            "cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 50 0 50 350 50 0 0 0\ncpu1 1 1 1 1\nintr 1\n",
        );
        assert_eq!(
            t,
            Some(CpuTimes {
                total: 1000,
                idle: 800,
                cores: 2
            })
        );
        let before = CpuTimes {
            total: 0,
            idle: 0,
            cores: 2,
        };
        let after = CpuTimes {
            total: 1000,
            idle: 500,
            cores: 2,
        };
        assert_eq!(used_milli(&before, &after), 1000);
        assert_eq!(used_milli(&after, &after), 0);
    }

    #[test]
    fn meminfo() {
        let m = "MemTotal:       2048 kB\nMemFree: 1 kB\nMemAvailable:   1024 kB\n";
        assert_eq!(parse_meminfo(m), Some((2, 1)));
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn pid_stat() {
        let s = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 5 1000 10";
        assert_eq!(parse_pid_stat(s), Some(10));
        assert_eq!(parse_pid_rss("Name: x\nVmRSS:\t  1234 kB\n"), 1234);
    }

    #[test]
    fn own_process_sample() {
        let u = ProcessUsage::sample(std::process::id());
        assert!(u.is_ok_and(|u| u.rss_kib > 0));
    }
}
