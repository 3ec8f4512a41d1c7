//! A local shoal on this machine, run as processes of the `shoal` binary: what `shoal up`
//! starts, and how the perf suite and the integration tests start `shoal up` itself.
//!
//! - [`ready`]: the typed records every component prints on its ready line
//!   ([`DataworkerReady`], [`ControlReady`], [`ProxyReady`], [`AgentReady`]) and the
//!   [`Cluster`] description `shoal up --json` prints. Writers and readers share these
//!   types; nobody indexes a ready line as untyped JSON.
//! - [`Proc`]: a child process that must print its ready line within a deadline, stopped
//!   with SIGTERM and killed after a grace; stopped when dropped, so no test or benchmark
//!   leaves a process behind.
//! - [`RunningCluster`]: control and, per node, a dataworker, a proxy and an agent, started
//!   in order from a [`ClusterSpec`] and stopped in reverse (agents first, so they stop the
//!   instances they run). This is `shoal up`.
//! - [`Up`]: `shoal up --json` as a child process, for callers outside the binary.
//! - [`wait`]: waiting for a condition with a deadline, the one way tests and benchmarks
//!   wait for an event.
//!
//! This crate never links a component: it only runs the `shoal` binary it is given. It must
//! not depend on the CLI's argument types; it knows the components' flags by name.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod cluster;
mod error;
mod process;
pub mod ready;
mod up;
pub mod wait;

pub use cluster::{ClusterSpec, NodeSpec, RunningCluster, Store};
pub use error::Error;
pub use process::{Proc, DEFAULT_GRACE};
pub use ready::{
    AgentReady, ClientEnv, Cluster, ControlInfo, ControlReady, DataworkerReady, NodeInfo,
    ProxyReady,
};
pub use up::{RunningUp, Up};
