//! Instance records: one per instance of a function, under
//! `instances/<function>/<id>` ([`instance_key`](super::instance_key)). Placement (control)
//! creates a record as [`InstancePhase::Scheduled`] and asks for a stop with
//! [`InstancePhase::Stopping`]; the node's agent writes every other phase as its process
//! moves. Pure: no IO.
use serde::{Deserialize, Serialize};

/// Where an instance is in its life, as its record says. The serde names (`scheduled`,
/// `starting`, `running`, `failed`, `exited`, `stopping`) are what the store and the REST
/// API carry; [`InstancePhase::as_str`] gives the same names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstancePhase {
    /// Placed by control; no agent has acted on it yet.
    Scheduled,
    /// The agent is fetching the code or the process has not registered with its proxy yet.
    Starting,
    /// The process runs and takes calls.
    Running,
    /// The process failed to start, or ended with a non-zero code or a signal.
    Failed,
    /// The process ended with code 0, or was stopped.
    Exited,
    /// Control asked the agent to stop the instance.
    Stopping,
}

impl InstancePhase {
    /// Every phase, in declaration order.
    pub const ALL: [InstancePhase; 6] = [
        InstancePhase::Scheduled,
        InstancePhase::Starting,
        InstancePhase::Running,
        InstancePhase::Failed,
        InstancePhase::Exited,
        InstancePhase::Stopping,
    ];

    /// The phase's name on the wire (its serde name).
    pub fn as_str(self) -> &'static str {
        match self {
            InstancePhase::Scheduled => "scheduled",
            InstancePhase::Starting => "starting",
            InstancePhase::Running => "running",
            InstancePhase::Failed => "failed",
            InstancePhase::Exited => "exited",
            InstancePhase::Stopping => "stopping",
        }
    }

    /// `Failed` or `Exited`: the process is gone and the record waits to be replaced.
    pub fn is_done(self) -> bool {
        matches!(self, InstancePhase::Failed | InstancePhase::Exited)
    }

    /// `Scheduled`, `Starting` or `Running`: the agent should have the process running.
    pub fn is_wanted(self) -> bool {
        matches!(
            self,
            InstancePhase::Scheduled | InstancePhase::Starting | InstancePhase::Running
        )
    }
}

impl std::fmt::Display for InstancePhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One running (or starting, or failed) instance of a function, as its agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// Instance id (unique within the function).
    pub id: String,
    /// Function name.
    pub function: String,
    /// Node the instance runs on.
    pub node: String,
    /// Where the instance is in its life.
    pub state: InstancePhase,
    /// Why the instance is in that state, if the agent says.
    #[serde(default)]
    pub reason: Option<String>,
    /// Process id on the node.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Version of the function the instance was scheduled for (set by placement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function_version: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_names_are_the_wire_names() {
        for p in InstancePhase::ALL {
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{}\"", p.as_str()));
            assert_eq!(serde_json::from_str::<InstancePhase>(&json).unwrap(), p);
        }
        assert!(serde_json::from_str::<InstancePhase>("\"Running\"").is_err());
    }
}
