//! Keeping each function's instance count between its minimum and maximum, and replacing
//! what broke. The rules are documented on [`reconcile`].
use crate::{ClusterState, InstanceState, InstanceView, Request, Resources};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::BTreeMap;

/// How many instances of a function should exist, and what each needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionSpec {
    /// Function name.
    pub name: String,
    /// Instances kept up at all times.
    pub min_instances: u32,
    /// Instances never exceeded; a value below `min_instances` counts as `min_instances`.
    pub max_instances: u32,
    /// What each instance needs.
    pub resources: Resources,
}

impl FunctionSpec {
    /// A spec for `name`.
    pub fn new(
        name: impl Into<String>,
        min_instances: u32,
        max_instances: u32,
        resources: Resources,
    ) -> Self {
        FunctionSpec {
            name: name.into(),
            min_instances,
            max_instances,
            resources,
        }
    }

    /// A placement request for one instance, without constraints: the caller adds selectors,
    /// affinity, pool and policy as it needs.
    pub fn request(&self) -> Request {
        Request::new(self.name.clone(), self.resources)
    }
}

/// Why an instance is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplaceReason {
    /// The instance failed on a node that is still there and healthy.
    Failed,
    /// Its node is no longer known.
    NodeGone,
    /// Its node is unhealthy.
    NodeUnhealthy,
}

/// Why an instance is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoveReason {
    /// The function has more instances than its maximum.
    AboveMax,
    /// No spec names the function.
    NoSpec,
}

/// One step towards the specs. The caller carries it out (reserve and bind, stop, forget)
/// and calls [`reconcile`] again on the new state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Place and start one more instance of `function`.
    Create {
        /// Function name.
        function: String,
    },
    /// Stop (if still reachable) and forget `instance`, and start a new instance of
    /// `function` in its place; placement avoids a gone or unhealthy node by itself.
    Replace {
        /// The instance to replace.
        instance: String,
        /// Its function.
        function: String,
        /// Why.
        reason: ReplaceReason,
    },
    /// Stop (if still reachable) and forget `instance`.
    Remove {
        /// The instance to remove.
        instance: String,
        /// Its function.
        function: String,
        /// Why.
        reason: RemoveReason,
    },
}

/// What one function has.
#[derive(Default)]
struct Tally<'a> {
    live: Vec<&'a InstanceView>,
    broken: Vec<(&'a InstanceView, ReplaceReason)>,
    in_flight: u64,
}

/// The actions that bring `state` towards `functions`. Pure and deterministic.
///
/// Per function, instances are sorted into:
///
/// - *live*: `Starting` or `Running` on a known, healthy node;
/// - *in flight*: reservations of the function (they become instances when bound);
/// - *broken*: `Failed`, or `Starting`/`Running` on a node that is gone or unhealthy;
/// - ignored: `Exiting` (on its way out) and `Exited` (done; the caller forgets it).
///
/// With `max` the larger of the spec's minimum and maximum, and `have = live + in flight`:
/// broken instances are [replaced](Action::Replace) in ascending id order while
/// `have + replaced < max`, the rest are [removed](Action::Remove); if `have + replaced < min`,
/// the difference is [created](Action::Create); if `have > max`, live instances are removed
/// (`Starting` before `Running`, then descending id) until `max` is reached or none is left.
/// Instances of a function without a spec (live or broken) are removed.
///
/// Actions come grouped by function in ascending name order; within one function: replacements,
/// creations, removals. The result depends only on the specs (first spec wins for a repeated
/// name) and the state's contents.
pub fn reconcile(functions: &[FunctionSpec], state: &ClusterState) -> Vec<Action> {
    let mut specs: BTreeMap<&str, &FunctionSpec> = BTreeMap::new();
    for spec in functions {
        specs.entry(spec.name.as_str()).or_insert(spec);
    }
    let mut tallies: BTreeMap<&str, Tally<'_>> =
        specs.keys().map(|name| (*name, Tally::default())).collect();
    // `instances()` is in ascending id order, so `live` and `broken` are too.
    for inst in state.instances() {
        let node = state.node(&inst.node);
        let node_trouble = match node {
            None => Some(ReplaceReason::NodeGone),
            Some(n) if !n.healthy => Some(ReplaceReason::NodeUnhealthy),
            Some(_) => None,
        };
        let tally = tallies.entry(inst.function.as_str()).or_default();
        match (inst.state, node_trouble) {
            (InstanceState::Starting | InstanceState::Running, None) => tally.live.push(inst),
            (InstanceState::Starting | InstanceState::Running, Some(reason)) => {
                tally.broken.push((inst, reason));
            }
            (InstanceState::Failed, reason) => {
                tally
                    .broken
                    .push((inst, reason.unwrap_or(ReplaceReason::Failed)));
            }
            _ => {}
        }
    }
    for r in state.reservations() {
        tallies.entry(r.function.as_str()).or_default().in_flight += 1;
    }

    let mut actions = Vec::new();
    for (function, tally) in tallies {
        let remove = |inst: &InstanceView, reason| Action::Remove {
            instance: inst.id.clone(),
            function: function.to_owned(),
            reason,
        };
        let Some(spec) = specs.get(function) else {
            let mut doomed: Vec<&InstanceView> = tally.live;
            doomed.extend(tally.broken.iter().map(|(i, _)| *i));
            doomed.sort_by(|a, b| a.id.cmp(&b.id));
            actions.extend(doomed.into_iter().map(|i| remove(i, RemoveReason::NoSpec)));
            continue;
        };
        let min = u64::from(spec.min_instances);
        let max = u64::from(spec.max_instances.max(spec.min_instances));
        let live = u64::try_from(tally.live.len()).unwrap_or(u64::MAX);
        let have = live.saturating_add(tally.in_flight);

        let mut replaced = 0u64;
        let mut surplus_broken = Vec::new();
        for (inst, reason) in &tally.broken {
            if have.saturating_add(replaced) < max {
                replaced += 1;
                actions.push(Action::Replace {
                    instance: inst.id.clone(),
                    function: function.to_owned(),
                    reason: *reason,
                });
            } else {
                surplus_broken.push(*inst);
            }
        }
        let after = have.saturating_add(replaced);
        for _ in after..min {
            actions.push(Action::Create {
                function: function.to_owned(),
            });
        }
        let mut removals: Vec<&InstanceView> = surplus_broken;
        if have > max {
            let mut live = tally.live;
            live.sort_by_key(|i| (i.state == InstanceState::Running, Reverse(i.id.as_str())));
            let excess = usize::try_from(have - max).unwrap_or(usize::MAX);
            removals.extend(live.into_iter().take(excess));
        }
        actions.extend(
            removals
                .into_iter()
                .map(|i| remove(i, RemoveReason::AboveMax)),
        );
    }
    actions
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{InstanceEvent, NodeView};

    const R: Resources = Resources::new(100, 100);

    fn cluster(nodes: &[&str]) -> ClusterState {
        let mut c = ClusterState::new();
        for n in nodes {
            c.upsert_node(NodeView::new(*n, Resources::new(10_000, 10_000)));
        }
        c
    }

    fn add(c: &mut ClusterState, id: &str, function: &str, node: &str, state: InstanceState) {
        c.insert_instance(InstanceView {
            id: id.into(),
            function: function.into(),
            node: node.into(),
            resources: R,
            state,
        })
        .unwrap();
    }

    fn create(f: &str) -> Action {
        Action::Create { function: f.into() }
    }

    fn replace(i: &str, f: &str, reason: ReplaceReason) -> Action {
        Action::Replace {
            instance: i.into(),
            function: f.into(),
            reason,
        }
    }

    fn remove(i: &str, f: &str, reason: RemoveReason) -> Action {
        Action::Remove {
            instance: i.into(),
            function: f.into(),
            reason,
        }
    }

    #[test]
    fn creates_up_to_min_counting_live_and_in_flight() {
        let mut c = cluster(&["a"]);
        add(&mut c, "i1", "f", "a", InstanceState::Running);
        add(&mut c, "i2", "f", "a", InstanceState::Exiting);
        add(&mut c, "i3", "f", "a", InstanceState::Exited);
        c.reserve("r1", &Request::new("f", R), 0, 100).unwrap();
        let specs = [
            FunctionSpec::new("f", 4, 10, R),
            FunctionSpec::new("g", 1, 1, R),
        ];
        assert_eq!(
            reconcile(&specs, &c),
            vec![create("f"), create("f"), create("g")]
        );
        let specs = [FunctionSpec::new("f", 2, 10, R)];
        assert_eq!(reconcile(&specs, &c), vec![]);
    }

    #[test]
    fn replaces_instances_of_a_dead_node() {
        let mut c = cluster(&["a", "b", "c"]);
        add(&mut c, "i1", "f", "a", InstanceState::Running);
        add(&mut c, "i2", "f", "b", InstanceState::Running);
        add(&mut c, "i3", "f", "c", InstanceState::Starting);
        add(&mut c, "i4", "f", "c", InstanceState::Running);
        c.remove_node("a").unwrap();
        let mut sick = c.node("b").unwrap().clone();
        sick.healthy = false;
        c.upsert_node(sick);
        c.apply("i4", InstanceEvent::Crashed).unwrap();
        let specs = [FunctionSpec::new("f", 4, 4, R)];
        assert_eq!(
            reconcile(&specs, &c),
            vec![
                replace("i1", "f", ReplaceReason::NodeGone),
                replace("i2", "f", ReplaceReason::NodeUnhealthy),
                replace("i4", "f", ReplaceReason::Failed),
            ]
        );
        // The replacement lands on the surviving node.
        let req = specs[0].request();
        assert_eq!(c.place(&req).unwrap(), "c");
    }

    #[test]
    fn removes_above_max_starting_first_then_newest() {
        let mut c = cluster(&["a"]);
        add(&mut c, "i1", "f", "a", InstanceState::Running);
        add(&mut c, "i2", "f", "a", InstanceState::Running);
        add(&mut c, "i3", "f", "a", InstanceState::Running);
        add(&mut c, "i4", "f", "a", InstanceState::Starting);
        add(&mut c, "i5", "f", "a", InstanceState::Failed);
        add(&mut c, "i6", "old", "a", InstanceState::Running);
        add(&mut c, "i7", "old", "a", InstanceState::Failed);
        add(&mut c, "i8", "old", "a", InstanceState::Exiting);
        let specs = [FunctionSpec::new("f", 1, 2, R)];
        assert_eq!(
            reconcile(&specs, &c),
            vec![
                remove("i5", "f", RemoveReason::AboveMax),
                remove("i4", "f", RemoveReason::AboveMax),
                remove("i3", "f", RemoveReason::AboveMax),
                remove("i6", "old", RemoveReason::NoSpec),
                remove("i7", "old", RemoveReason::NoSpec),
            ]
        );
    }

    #[test]
    fn replacements_stop_at_max_and_max_below_min_is_min() {
        let mut c = cluster(&["a"]);
        add(&mut c, "i1", "f", "a", InstanceState::Running);
        add(&mut c, "i2", "f", "a", InstanceState::Failed);
        add(&mut c, "i3", "f", "a", InstanceState::Failed);
        let specs = [FunctionSpec::new("f", 0, 2, R)];
        assert_eq!(
            reconcile(&specs, &c),
            vec![
                replace("i2", "f", ReplaceReason::Failed),
                remove("i3", "f", RemoveReason::AboveMax),
            ]
        );
        let specs = [
            FunctionSpec::new("f", 3, 1, R),
            FunctionSpec::new("f", 0, 0, R),
        ];
        assert_eq!(
            reconcile(&specs, &c),
            vec![
                replace("i2", "f", ReplaceReason::Failed),
                replace("i3", "f", ReplaceReason::Failed),
            ]
        );
    }
}
