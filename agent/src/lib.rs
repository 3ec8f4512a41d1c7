//! shoal's per-node agent: the function agent and runtime manager.
//!
//! One agent runs per node. It materialises a function's code package into a per-instance
//! directory ([`fetch`]; `shoal://` and `s3://` archives are downloaded first by
//! [`Downloader`]), runs instances as supervised processes with restart policies,
//! per-instance logs and graceful stop ([`Supervisor`]), confines them with cgroup CPU and
//! memory limits when the node allows it ([`Limiter`]), and reports node capacity and use
//! ([`NodeResources`]).
//!
//! [`Agent`] wires these to the metadata store: it registers the node's capacity under a lease
//! and runs the instance records control assigns to the node, reporting their state back. It
//! gives each instance its own credential (`SHOAL_TOKEN`, bound to that instance, revoked
//! when it ends) and serves instance logs only to a token that may read their tenant.
//!
//! It reads no environment variables (only [`S3Settings::from_env`] does, for the binary to
//! call) and holds no global state; everything is passed in. It reads records and keys from
//! `shoal_meta::records` and never depends on `shoal-control` (only its tests run one).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod cgroup;
mod logs;
mod package;
mod remote;
mod resources;
mod runtime;
mod supervisor;

pub use cgroup::{CgroupError, CgroupHandle, Limiter, LimiterKind};
pub use package::{
    dir_digest, fetch, fetch_with_limits, file_digest, FetchError, FetchLimits, PackageSource,
};
pub use remote::{Downloader, RemoteError, RemoteSource, S3Settings};
pub use resources::{
    parse_meminfo, parse_pid_rss, parse_pid_stat, parse_proc_stat, used_milli, CpuSampler,
    CpuTimes, NodeResources, ProcessUsage, ResourceError,
};
pub use runtime::{Agent, AgentConfig, AgentError, MAX_RESTARTS, RESTART_BACKOFF, USE_REFRESH};
pub use supervisor::{
    InstanceError, InstanceSpec, InstanceState, InstanceStatus, Limits, LogStream, RestartPolicy,
    StartError, Supervisor, SupervisorConfig,
};
