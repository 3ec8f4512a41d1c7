//! What each node's components publish about themselves, each under a lease so that a dead
//! node's records vanish with it: the dataworker's [`NodeRecord`] (`nodes/<id>`), the agent's
//! [`AgentRecord`] (`agents/<id>`) and the proxy's [`ProxyRecord`] (`proxies/<id>`); and
//! control's [`LeaderInfo`] (`control/leader`). Pure: no IO.
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// A dataworker's membership record; a wire type of the status protocol too, so it is
/// defined in `shoal-protocol`.
pub use shoal_protocol::NodeRecord;

/// What an agent publishes about its node (JSON under `agents/<node id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Node id.
    pub node_id: String,
    /// CPU capacity in thousandths of a core (online cores × 1000).
    pub cpu_milli: u64,
    /// Total memory in MiB.
    pub mem_total_mib: u64,
    /// CPU in use, in thousandths of a core (last sample).
    #[serde(default)]
    pub cpu_used_milli: u64,
    /// Memory available for new work, in MiB (last sample).
    #[serde(default)]
    pub mem_available_mib: u64,
    /// Instances the agent runs now.
    #[serde(default)]
    pub instances: u64,
    /// Whether cgroup limits are enforced on this node.
    #[serde(default)]
    pub limits_enforced: bool,
    /// Why limits are not enforced, when they are not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits_reason: Option<String>,
    /// Where the agent serves its instances' logs over HTTP (`host:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs_addr: Option<String>,
    /// The node's labels (matched by functions' `node_selector` and pools' selectors).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A proxy's entry in the metadata store (JSON under `proxies/<node id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyRecord {
    /// Node id.
    pub node_id: String,
    /// Address of its peer listener (TLS over TCP, cluster mTLS).
    pub peer_addr: SocketAddr,
}

/// What the leader record says (JSON under `control/leader`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    /// Control process name.
    pub name: String,
    /// Its HTTP API.
    pub http_addr: String,
}
