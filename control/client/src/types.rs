//! Answer bodies of control's API that are not records of `shoal_meta::records` (see the
//! schemas of the same names in `control/openapi.json`).
use serde::{Deserialize, Serialize};
use shoal_meta::records::{
    FunctionSpec, InstancePhase, InstanceRecord, LeaderInfo, NodeRecord, Pool,
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
