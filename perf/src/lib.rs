//! shoal's benchmark suite. Every figure is measured in the same run as its baseline (memcpy,
//! a raw Unix-socket round trip, a real `redis-server`; for the cluster, TCP + TLS and a raw
//! TCP round trip; for calls, nats-server) and printed as JSON lines with the
//! fields of [`Record`]; a table of ratios against the targets follows.
//!
//! Benchmarks are not tests: nothing here fails because a number is slow. A missed target is
//! reported as such and the run still succeeds.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod baseline;
mod calls;
mod cluster;
mod harness;
mod local;
mod record;
mod report;

pub use baseline::{memcpy_bandwidth, tcp_round_trip, uds_round_trip, RedisServer, RespClient};
pub use calls::{run_calls, CallsOptions};
pub use cluster::{run_cluster, serve_bytes, ClusterOptions};
pub use harness::{run_single, run_threads, RunSpec};
pub use local::{run_local, LocalOptions};
pub use record::{Latencies, Record};
pub use report::{Metric, Report, Target, TargetResult};
