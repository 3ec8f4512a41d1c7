//! The cluster's records and where they live: every document a component writes to the
//! metadata store, and its key. This is the one definition of each key prefix and of each
//! record's shape; control, the proxies, the agents and the dataworkers all read it from here
//! and none of them reaches into another's crate for it.
//!
//! Key layout (relative to the store's cluster prefix, which every backend adds):
//!
//! | key | record | written by |
//! |---|---|---|
//! | `nodes/<node>` | [`NodeRecord`] | the node's dataworker, under a lease |
//! | `agents/<node>` | [`AgentRecord`] | the node's agent, under a lease |
//! | `proxies/<node>` | [`ProxyRecord`] | the node's proxy, under a lease |
//! | `functions/<name>` | [`FunctionSpec`] | control's registry |
//! | `pools/<name>` | [`Pool`] | control's registry |
//! | `instances/<function>/<id>` | [`InstanceRecord`] | control's placement, then the agent |
//! | `control/leader` | [`LeaderInfo`] | the leading control, under a lease |
//! | `tokens/<id>` | [`TokenRecord`] | control, when a token is issued; an agent, for each instance it starts; deleted to revoke |
//! | `quotas/<tenant>` | [`Quota`] | control, for the operator |
//!
//! Records are JSON. Pure: no IO, no clock.
mod function;
mod instance;
mod node;
mod quota;
mod token;

pub use function::{
    validate_id, validate_name, CodeSource, FunctionSpec, InvalidSpec, Pool, Resources,
    MAX_CONCURRENCY, MAX_CPU_MILLI, MAX_ENTRIES, MAX_INSTANCES, MAX_MEM_MIB, MAX_NAME_LEN,
    MAX_POOL_CPU_MILLI, MAX_POOL_MEM_MIB, MAX_STRING_LEN,
};
pub use instance::{InstancePhase, InstanceRecord};
pub use node::{AgentRecord, LeaderInfo, NodeRecord, ProxyRecord};
pub use quota::{quota_key, Quota, QuotaExceeded, Resource, QUOTAS_PREFIX};
pub use token::{
    parse_token, token_key, validate_tenant, Action, Denied, InstanceBinding, Issued, Principal,
    Role, TokenParts, TokenRecord, DEFAULT_TENANT, MAX_DESCRIPTION_LEN, SYSTEM_TENANT,
    TOKENS_PREFIX, TOKEN_RANDOM_BYTES,
};

/// Dataworkers' membership records: `nodes/<node id>`.
pub const NODES_PREFIX: &str = "nodes/";
/// Agents' node records: `agents/<node id>`.
pub const AGENTS_PREFIX: &str = "agents/";
/// Proxies' peer listeners: `proxies/<node id>`.
pub const PROXIES_PREFIX: &str = "proxies/";
/// Function specs: `functions/<name>`.
pub const FUNCTIONS_PREFIX: &str = "functions/";
/// Pools: `pools/<name>`.
pub const POOLS_PREFIX: &str = "pools/";
/// Instance records: `instances/<function>/<id>`.
pub const INSTANCES_PREFIX: &str = "instances/";
/// The control leader record.
pub const LEADER_KEY: &str = "control/leader";

/// `nodes/<node>`.
pub fn node_key(node: &str) -> String {
    format!("{NODES_PREFIX}{node}")
}

/// `agents/<node>`.
pub fn agent_key(node: &str) -> String {
    format!("{AGENTS_PREFIX}{node}")
}

/// `proxies/<node>`.
pub fn proxy_key(node: &str) -> String {
    format!("{PROXIES_PREFIX}{node}")
}

/// `functions/<name>`.
pub fn function_key(name: &str) -> String {
    format!("{FUNCTIONS_PREFIX}{name}")
}

/// `pools/<name>`.
pub fn pool_key(name: &str) -> String {
    format!("{POOLS_PREFIX}{name}")
}

/// `instances/<function>/`: the prefix of one function's instance records.
pub fn instances_of(function: &str) -> String {
    format!("{INSTANCES_PREFIX}{function}/")
}

/// `instances/<function>/<id>`.
pub fn instance_key(function: &str, id: &str) -> String {
    format!("{INSTANCES_PREFIX}{function}/{id}")
}
