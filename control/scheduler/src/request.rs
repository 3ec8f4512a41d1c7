//! What a caller asks for: one instance of a function, with constraints and a scoring policy.
use crate::Resources;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// A condition on a node, used by [`Affinity`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Term {
    /// The node has label `key` with exactly `value`.
    NodeLabel {
        /// Label key.
        key: String,
        /// Label value.
        value: String,
    },
    /// The node holds an instance or reservation of `function` (one in a state that
    /// [holds resources](crate::InstanceState::holds_resources)).
    WithFunction {
        /// Function name.
        function: String,
    },
}

impl Term {
    /// [`Term::NodeLabel`].
    pub fn label(key: impl Into<String>, value: impl Into<String>) -> Term {
        Term::NodeLabel {
            key: key.into(),
            value: value.into(),
        }
    }

    /// [`Term::WithFunction`].
    pub fn function(function: impl Into<String>) -> Term {
        Term::WithFunction {
            function: function.into(),
        }
    }

    /// Whether a node with these labels, holding these functions, matches.
    pub(crate) fn matches(
        &self,
        labels: &BTreeMap<String, String>,
        functions: &BTreeSet<&str>,
    ) -> bool {
        match self {
            Term::NodeLabel { key, value } => labels.get(key) == Some(value),
            Term::WithFunction { function } => functions.contains(function.as_str()),
        }
    }
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Term::NodeLabel { key, value } => write!(f, "label {key}={value}"),
            Term::WithFunction { function } => write!(f, "function {function:?} on the node"),
        }
    }
}

/// A weighted, soft [`Term`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Preference {
    /// How much a match counts; weights of all matching preferences add up.
    pub weight: u32,
    /// The condition.
    pub term: Term,
}

/// Hard and soft conditions on the node. Used twice in a [`Request`]: as affinity (the node
/// should match) and as anti-affinity (the node should not match).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Affinity {
    /// Hard conditions. Affinity: the node must match every one. Anti-affinity: the node must
    /// match none.
    #[serde(default)]
    pub required: Vec<Term>,
    /// Soft conditions. Affinity: each match adds its weight to the node's score.
    /// Anti-affinity: each match subtracts it.
    #[serde(default)]
    pub preferred: Vec<Preference>,
}

impl Affinity {
    /// Adds a hard condition.
    pub fn require(mut self, term: Term) -> Self {
        self.required.push(term);
        self
    }

    /// Adds a soft condition with this weight.
    pub fn prefer(mut self, weight: u32, term: Term) -> Self {
        self.preferred.push(Preference { weight, term });
        self
    }

    /// Sum of the weights of the preferences the node matches.
    pub(crate) fn preferred_weight(
        &self,
        labels: &BTreeMap<String, String>,
        functions: &BTreeSet<&str>,
    ) -> i64 {
        self.preferred
            .iter()
            .filter(|p| p.term.matches(labels, functions))
            .fold(0i64, |acc, p| acc.saturating_add(i64::from(p.weight)))
    }
}

/// How feasible nodes are ranked (after preferred affinity, which always counts first).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Prefer the node that would be least allocated afterwards: spreads load and failure.
    #[default]
    Spread,
    /// Prefer the node that would be most allocated afterwards (and still fits): packs
    /// instances tightly and leaves whole nodes free.
    BinPack,
}

/// A request to place one instance of a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Function the instance runs.
    pub function: String,
    /// What the instance needs.
    pub resources: Resources,
    /// Labels the node must carry, each with exactly this value.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Conditions the node should meet.
    #[serde(default)]
    pub affinity: Affinity,
    /// Conditions the node should not meet.
    #[serde(default)]
    pub anti_affinity: Affinity,
    /// The node pool. `None` is the shared pool: nodes without a pool. A node in a pool takes
    /// only requests for that pool.
    #[serde(default)]
    pub pool: Option<String>,
    /// How feasible nodes are ranked.
    #[serde(default)]
    pub policy: Policy,
}

impl Request {
    /// A request for `function` needing `resources`, with no constraints, in the shared pool,
    /// ranked by [`Policy::Spread`].
    pub fn new(function: impl Into<String>, resources: Resources) -> Self {
        Request {
            function: function.into(),
            resources,
            node_selector: BTreeMap::new(),
            affinity: Affinity::default(),
            anti_affinity: Affinity::default(),
            pool: None,
            policy: Policy::Spread,
        }
    }
}
