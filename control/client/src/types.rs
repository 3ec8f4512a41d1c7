//! Answer bodies of control's API that are not records of `shoal_meta::records` (see the
//! schemas of the same names in `control/openapi.json`).
use serde::{Deserialize, Serialize};
use shoal_meta::records::{
    FunctionSpec, InstanceBinding, InstancePhase, InstanceRecord, LeaderInfo, NodeRecord, Pool,
    Quota, Role,
};

/// What a control process is in its election.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlRole {
    /// It leads: it serves writes and runs placement.
    Leader,
    /// Another control leads; this one serves reads and refuses writes.
    Standby,
    /// No control leads yet.
    Candidate,
}

/// `GET /health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `ok` when the process answers.
    pub status: String,
    /// The control process's name.
    pub name: String,
    /// Its role now.
    pub role: ControlRole,
    /// The leader, when this one is a standby.
    #[serde(default)]
    pub leader: Option<LeaderInfo>,
}

/// `GET /v1/leader`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leader {
    /// The answering control's role.
    pub role: ControlRole,
    /// The answering control's name.
    pub name: String,
    /// The leader, when the answering control is a standby.
    #[serde(default)]
    pub leader: Option<LeaderInfo>,
}

/// `GET /v1/nodes`: the dataworkers registered now, as the answering control sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nodes {
    /// The answering control's role.
    pub role: ControlRole,
    /// The leader, when the answering control is a standby.
    #[serde(default)]
    pub leader: Option<LeaderInfo>,
    /// The nodes' records.
    pub nodes: Vec<NodeRecord>,
}

/// One instance's entry of `GET /v1/functions/{name}/logs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceLogs {
    /// Instance id.
    pub id: String,
    /// Node it runs on.
    pub node: String,
    /// Its state.
    pub state: InstancePhase,
    /// The tail of its stdout (absent when `error` says why).
    #[serde(default)]
    pub stdout: Option<String>,
    /// The tail of its stderr (absent when `error` says why).
    #[serde(default)]
    pub stderr: Option<String>,
    /// Why its logs could not be read (its agent is unreachable, ...).
    #[serde(default)]
    pub error: Option<String>,
}

/// `GET /v1/whoami`: who the client's token stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoAmI {
    /// The token's tenant.
    pub tenant: String,
    /// Its role there.
    pub role: Role,
    /// Where its functions and tokens go when a request names no tenant: its own tenant, or
    /// `default` for the operator (the system tenant's admin).
    pub home_tenant: String,
    /// Set for a function instance's own credential.
    #[serde(default)]
    pub instance: Option<InstanceBinding>,
}

/// `POST /v1/tokens`: what token to issue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRequest {
    /// The tenant it acts for (`None`: the caller's home tenant). Only the operator may name
    /// another tenant than its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// What it may do there.
    pub role: Role,
    /// What it is for (at most 256 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Lifetime in seconds (`None`: no expiry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

/// A token's record as the API shows it: never the secret, nor its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// 16 hex digits; what `DELETE /v1/tokens/{id}` names.
    pub id: String,
    /// The tenant it acts for.
    pub tenant: String,
    /// What it may do there.
    pub role: Role,
    /// When it was issued, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// When it stops working (`None`: never).
    #[serde(default)]
    pub expires_ms: Option<u64>,
    /// What it is for.
    #[serde(default)]
    pub description: String,
    /// Set for a function instance's own credential.
    #[serde(default)]
    pub instance: Option<InstanceBinding>,
}

/// The answer to `POST /v1/tokens`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedToken {
    /// The token: its only copy (the store keeps a hash).
    pub token: String,
    /// Its record.
    pub record: TokenInfo,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken")
            .field("token", &"<secret>")
            .field("record", &self.record)
            .finish()
    }
}

/// What a tenant's functions take, counted at each function's `max_instances`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaUsage {
    /// Sum of `max_instances`.
    pub instances: u64,
    /// Sum of `max_instances × resources.cpu_milli`.
    pub cpu_milli: u64,
    /// Sum of `max_instances × resources.mem_mib`.
    pub mem_mib: u64,
}

/// `GET /v1/tenants/{tenant}/quota`: a tenant's limits and use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaStatus {
    /// The tenant.
    pub tenant: String,
    /// Its limits (none set: unlimited).
    pub quota: Quota,
    /// What its functions take now.
    pub usage: QuotaUsage,
}

/// `{"tokens": [...]}`.
#[derive(Deserialize)]
pub(crate) struct TokenList {
    pub(crate) tokens: Vec<TokenInfo>,
}

/// `{"functions": [...]}`.
#[derive(Deserialize)]
pub(crate) struct FunctionList {
    pub(crate) functions: Vec<FunctionSpec>,
}

/// `{"instances": [...]}`.
#[derive(Deserialize)]
pub(crate) struct InstanceList {
    pub(crate) instances: Vec<InstanceRecord>,
}

/// `{"pools": [...]}`.
#[derive(Deserialize)]
pub(crate) struct PoolList {
    pub(crate) pools: Vec<Pool>,
}

/// `{"instances": [...]}` of the logs route.
#[derive(Deserialize)]
pub(crate) struct LogList {
    pub(crate) instances: Vec<InstanceLogs>,
}

/// Control's error body.
#[derive(Deserialize)]
pub(crate) struct ErrorBody {
    pub(crate) code: String,
    pub(crate) message: String,
}
