//! Placement: while this control process leads, keep every function's instance records
//! between its minimum and maximum on the nodes that have a live agent.
//!
//! One owned task ([`run`]) re-reads `functions/`, `agents/` and `instances/` on every pass,
//! builds a [`ClusterState`] from them, runs [`reconcile`] and writes the outcome back as
//! instance records. A pass runs after any change under those prefixes (watched) and at least
//! every [`PLACEMENT_INTERVAL`]; a broken watch is simply re-established on the next pass.
//! Each pass is bounded by the size of the cluster's metadata.
//!
//! - A node is schedulable while its agent's record `agents/<node>` ([`AgentRecord`], under the
//!   agent's lease) exists; its capacity comes from that record.
//! - Records on a node without a live agent are treated as lost and, once this leader has
//!   seen them so for [`NODE_LOST_GRACE`], replaced elsewhere (the old record is deleted).
//! - A `failed` or `exited` record on a live node stays visible for [`FAILED_RETRY`] (so
//!   operators see why), then it is deleted and replaced; it is replaced at once when the
//!   function's version changed since the record was written.
//! - Records of functions that no longer exist are deleted; the agent stops the process.
//! - Updating a function rolls its instances: records of an older version are shown to the
//!   scheduler as instances of another function, so it places the current version's
//!   instances beside them (a surge); an old record is deleted once the current version has
//!   its minimum of instances running, so a function with instances never drops to none.
//! - New records are written with a create-if-absent transaction; ids are
//!   `<function>-<8 hex digits>`.
use shoal_meta::records::{
    instance_key, AgentRecord, FunctionSpec, InstancePhase, InstanceRecord, Pool, AGENTS_PREFIX,
    FUNCTIONS_PREFIX, INSTANCES_PREFIX, POOLS_PREFIX,
};
use shoal_meta::{now_ms, KeyValue, MetaError, MetaStore, Role, Txn, WatchStream};
use shoal_scheduler::{
    reconcile, Action, ClusterState, InstanceState, InstanceView, NodeView, ReplaceReason,
    Resources, StateError, Term,
};
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Longest time between two placement passes.
pub const PLACEMENT_INTERVAL: Duration = Duration::from_secs(2);
/// How long a failed or exited instance record stays before it is replaced.
pub const FAILED_RETRY: Duration = Duration::from_secs(30);
/// How long this leader must have seen an instance's node without an agent before the
/// instance counts as lost and is replaced (covers a leader change and agent restarts).
pub const NODE_LOST_GRACE: Duration = Duration::from_secs(2);
/// Most records written or deleted in one pass; the rest waits for the next one.
pub const MAX_WRITES_PER_PASS: usize = 256;
/// How long a reservation is held within a pass.
const RESERVATION_TTL_MS: u64 = 10_000;

/// The pool node `labels` belong to: the first pool (by name) whose non-empty selector they
/// all match. A pool with an empty selector claims no node.
fn pool_of<'p>(pools: &'p [Pool], labels: &BTreeMap<String, String>) -> Option<&'p Pool> {
    pools.iter().find(|p| {
        !p.node_selector.is_empty()
            && p.node_selector
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
    })
}

/// The placement task: acts only while `role` says Leader; ends on `shutdown`.
pub(crate) async fn run(
    meta: Arc<dyn MetaStore>,
    mut role: watch::Receiver<Role>,
    shutdown: CancellationToken,
) {
    let mut placer = Placer::default();
    let mut watches: Vec<Option<WatchStream>> = vec![None, None, None];
    loop {
        let leader = matches!(*role.borrow_and_update(), Role::Leader);
        if leader {
            match placer.pass(meta.as_ref()).await {
                Ok(revs) => {
                    for (w, (prefix, rev)) in watches.iter_mut().zip(revs) {
                        if w.is_none() {
                            *w = meta.watch(prefix, rev).await.ok();
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "placement pass failed"),
            }
        } else {
            watches.iter_mut().for_each(|w| *w = None);
            placer.failed_since.clear();
            placer.lost_since.clear();
        }
        let [a, b, c] = &mut watches[..] else {
            return;
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = role.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(PLACEMENT_INTERVAL) => {}
            () = next_event(a) => {}
            () = next_event(b) => {}
            () = next_event(c) => {}
        }
        // Coalesce a burst of events into one pass.
        for w in watches.iter_mut() {
            drain(w);
        }
    }
}

/// Waits for one event of `w` (forever when there is no watch); drops a watch that ended.
async fn next_event(w: &mut Option<WatchStream>) {
    match w {
        Some(s) => {
            if s.recv().await.is_none() {
                *w = None;
            }
        }
        None => std::future::pending().await,
    }
}

fn drain(w: &mut Option<WatchStream>) {
    if let Some(s) = w {
        loop {
            match s.try_recv() {
                Ok(_) => {}
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                    *w = None;
                    break;
                }
            }
        }
    }
}

/// State kept between passes: when each record was first seen failed, or on a node
/// without an agent.
#[derive(Debug, Default)]
struct Placer {
    failed_since: HashMap<String, Instant>,
    lost_since: HashMap<String, Instant>,
}

/// One instance record as read.
#[derive(Debug)]
struct Stored {
    key: String,
    record: InstanceRecord,
}

fn decode_all<T: serde::de::DeserializeOwned>(kvs: &[KeyValue]) -> Vec<(String, T)> {
    kvs.iter()
        .filter_map(|kv| match serde_json::from_slice(&kv.value) {
            Ok(v) => Some((kv.key.clone(), v)),
            Err(e) => {
                tracing::warn!(key = %kv.key, error = %e, "placement skips an unreadable record");
                None
            }
        })
        .collect()
}

fn scheduler_state(phase: InstancePhase) -> InstanceState {
    match phase {
        InstancePhase::Running => InstanceState::Running,
        InstancePhase::Failed | InstancePhase::Exited => InstanceState::Failed,
        InstancePhase::Stopping => InstanceState::Exiting,
        InstancePhase::Scheduled | InstancePhase::Starting => InstanceState::Starting,
    }
}

fn new_instance_id(function: &str) -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms());
    h.write(function.as_bytes());
    format!("{function}-{:08x}", h.finish() as u32)
}

impl Placer {
    /// One pass; returns the revisions to watch each prefix from.
    async fn pass(&mut self, meta: &dyn MetaStore) -> Result<[(&'static str, i64); 3], MetaError> {
        let (fkvs, frev) = meta.range(FUNCTIONS_PREFIX).await?;
        let (akvs, arev) = meta.range(AGENTS_PREFIX).await?;
        let (ikvs, irev) = meta.range(INSTANCES_PREFIX).await?;
        // Pools change rarely; they are read on every pass (agents refresh every few
        // seconds, so a pool change takes effect within that).
        let (pkvs, _) = meta.range(POOLS_PREFIX).await?;
        let mut pools: Vec<Pool> = decode_all::<Pool>(&pkvs)
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        let specs: BTreeMap<String, FunctionSpec> = decode_all::<FunctionSpec>(&fkvs)
            .into_iter()
            .map(|(_, s)| (s.name.clone(), s))
            .collect();
        let agents: Vec<AgentRecord> = decode_all::<AgentRecord>(&akvs)
            .into_iter()
            .map(|(_, a)| a)
            .collect();
        let records: BTreeMap<String, Stored> = decode_all::<InstanceRecord>(&ikvs)
            .into_iter()
            .map(|(key, record)| (record.id.clone(), Stored { key, record }))
            .collect();

        let mut state = ClusterState::new();
        for a in &agents {
            let mut node = NodeView::new(
                a.node_id.clone(),
                Resources::new(a.cpu_milli, a.mem_total_mib),
            );
            for (k, v) in &a.labels {
                node = node.with_label(k.clone(), v.clone());
            }
            if let Some(p) = pool_of(&pools, &a.labels) {
                node = node.with_pool(p.name.clone());
            }
            state.upsert_node(node);
        }
        let now = Instant::now();
        self.failed_since
            .retain(|id, _| records.get(id).is_some_and(|s| is_done(&s.record)));
        self.lost_since.retain(|id, _| {
            records
                .get(id)
                .is_some_and(|s| state.node(&s.record.node).is_none())
        });
        let mut writes = 0usize;
        for s in records.values() {
            let r = &s.record;
            if !specs.contains_key(&r.function) {
                // Function gone: the record goes, the agent stops the process.
                if writes < MAX_WRITES_PER_PASS {
                    writes += 1;
                    delete_record(meta, s).await?;
                }
                continue;
            }
            if is_done(r) {
                self.failed_since.entry(r.id.clone()).or_insert(now);
            }
            let res = specs
                .get(&r.function)
                .map(|f| {
                    Resources::new(
                        u64::from(f.resources.cpu_milli),
                        u64::from(f.resources.mem_mib),
                    )
                })
                .unwrap_or(Resources::ZERO);
            let mut view = InstanceView {
                id: r.id.clone(),
                function: match outdated_version(r, &specs) {
                    // Counted apart from the current version's instances (see module docs).
                    Some(v) => format!("{}@v{v}", r.function),
                    None => r.function.clone(),
                },
                node: r.node.clone(),
                resources: res,
                state: scheduler_state(r.state),
            };
            if state.node(&r.node).is_none() {
                self.lost_since.entry(r.id.clone()).or_insert(now);
                if view.state.holds_resources() {
                    // Its agent's lease ended: the instance is lost.
                    view.state = InstanceState::Failed;
                }
            }
            match state.insert_instance(view.clone()) {
                Ok(()) => {}
                Err(StateError::WouldOvercommit { .. }) => {
                    // Written by an earlier leader or before a capacity drop: count it, hold nothing.
                    view.resources = Resources::ZERO;
                    if let Err(e) = state.insert_instance(view) {
                        tracing::warn!(instance = %r.id, error = %e, "placement ignores an instance");
                    }
                }
                Err(e) => {
                    tracing::warn!(instance = %r.id, error = %e, "placement ignores an instance")
                }
            }
        }

        let sched_specs: Vec<shoal_scheduler::FunctionSpec> = specs
            .values()
            .map(|f| {
                shoal_scheduler::FunctionSpec::new(
                    f.name.clone(),
                    f.min_instances,
                    f.max_instances,
                    Resources::new(
                        u64::from(f.resources.cpu_milli),
                        u64::from(f.resources.mem_mib),
                    ),
                )
            })
            .collect();
        let now_ms = now_ms();
        for action in reconcile(&sched_specs, &state) {
            if writes >= MAX_WRITES_PER_PASS {
                break;
            }
            match action {
                Action::Create { function } => {
                    if let Some(spec) = specs.get(&function) {
                        writes += 1;
                        self.create(meta, &mut state, spec, &specs, &pools, now_ms)
                            .await?;
                    }
                }
                Action::Replace {
                    instance,
                    function,
                    reason,
                } => {
                    let Some(old) = records.get(&instance) else {
                        continue;
                    };
                    let Some(spec) = specs.get(&function) else {
                        continue;
                    };
                    let recent = |m: &HashMap<String, Instant>, d: Duration| {
                        m.get(&instance).is_some_and(|t| now.duration_since(*t) < d)
                    };
                    let wait = match reason {
                        ReplaceReason::Failed => {
                            // Leave the failed record visible for a while before retrying,
                            // unless the function changed since.
                            old.record.function_version == Some(spec.version)
                                && recent(&self.failed_since, FAILED_RETRY)
                        }
                        ReplaceReason::NodeGone | ReplaceReason::NodeUnhealthy => {
                            recent(&self.lost_since, NODE_LOST_GRACE)
                        }
                    };
                    if wait {
                        continue;
                    }
                    writes += 1;
                    tracing::info!(%instance, %function, ?reason, node = %old.record.node, "replacing instance");
                    delete_record(meta, old).await?;
                    self.failed_since.remove(&instance);
                    self.lost_since.remove(&instance);
                    self.create(meta, &mut state, spec, &specs, &pools, now_ms)
                        .await?;
                }
                Action::Remove {
                    instance, reason, ..
                } => {
                    if let Some(old) = records.get(&instance) {
                        if outdated_version(&old.record, &specs).is_some()
                            && !current_version_ready(&old.record.function, &records, &specs)
                        {
                            continue; // keep serving until its successors run
                        }
                        writes += 1;
                        tracing::info!(%instance, ?reason, "removing instance");
                        delete_record(meta, old).await?;
                    }
                }
            }
        }
        Ok([
            (FUNCTIONS_PREFIX, frev),
            (AGENTS_PREFIX, arev),
            (INSTANCES_PREFIX, irev),
        ])
    }

    /// Reserve + bind in `state`, then write the record (create-if-absent). A function in a
    /// pool is placed only while the pool's instances fit in its capacity.
    async fn create(
        &mut self,
        meta: &dyn MetaStore,
        state: &mut ClusterState,
        spec: &FunctionSpec,
        specs: &BTreeMap<String, FunctionSpec>,
        pools: &[Pool],
        now_ms: u64,
    ) -> Result<(), MetaError> {
        let mut req = shoal_scheduler::Request::new(
            spec.name.clone(),
            Resources::new(
                u64::from(spec.resources.cpu_milli),
                u64::from(spec.resources.mem_mib),
            ),
        );
        req.node_selector = spec.node_selector.clone();
        req.affinity.required = spec.affinity.iter().map(Term::function).collect();
        req.anti_affinity.required = spec.anti_affinity.iter().map(Term::function).collect();
        req.pool = spec.pool.clone();
        if let Some(name) = &spec.pool {
            let Some(pool) = pools.iter().find(|p| &p.name == name) else {
                tracing::debug!(function = %spec.name, pool = %name, "pool does not exist");
                return Ok(());
            };
            let (cpu, mem) = state
                .instances()
                .filter(|i| i.state.holds_resources())
                .filter(|i| specs.get(&i.function).and_then(|s| s.pool.as_ref()) == Some(name))
                .fold((0u64, 0u64), |(c, m), i| {
                    (c + i.resources.cpu_milli, m + i.resources.mem_mib)
                });
            if cpu + req.resources.cpu_milli > pool.cpu_milli
                || mem + req.resources.mem_mib > pool.mem_mib
            {
                tracing::debug!(function = %spec.name, pool = %name, "pool is full");
                return Ok(());
            }
        }
        let id = new_instance_id(&spec.name);
        let reservation = match state.reserve(&id, &req, now_ms, RESERVATION_TTL_MS) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(function = %spec.name, error = %e, "cannot place an instance now");
                return Ok(());
            }
        };
        if let Err(e) = state.bind(&id, &id, now_ms) {
            tracing::warn!(function = %spec.name, error = %e, "bind failed");
            state.release(&id);
            return Ok(());
        }
        let record = InstanceRecord {
            id: id.clone(),
            function: spec.name.clone(),
            node: reservation.node.clone(),
            state: InstancePhase::Scheduled,
            reason: None,
            pid: None,
            function_version: Some(spec.version),
        };
        let key = instance_key(&spec.name, &id);
        let value = serde_json::to_vec(&record).map_err(|e| MetaError::Backend(e.to_string()))?;
        let created = meta.txn(Txn::create(key, value)).await?;
        if created {
            tracing::info!(instance = %id, function = %spec.name, node = %reservation.node, "instance scheduled");
        }
        Ok(())
    }
}

/// The version `r` was scheduled for, when it is older than its function's and `r` is not
/// done.
fn outdated_version(r: &InstanceRecord, specs: &BTreeMap<String, FunctionSpec>) -> Option<u64> {
    let spec = specs.get(&r.function)?;
    r.function_version
        .filter(|v| *v != spec.version && !is_done(r))
}

/// Whether `function`'s current version has its minimum of instances running.
fn current_version_ready(
    function: &str,
    records: &BTreeMap<String, Stored>,
    specs: &BTreeMap<String, FunctionSpec>,
) -> bool {
    let Some(spec) = specs.get(function) else {
        return true;
    };
    let running = records
        .values()
        .filter(|s| {
            s.record.function == function
                && s.record.function_version == Some(spec.version)
                && s.record.state == InstancePhase::Running
        })
        .count();
    running >= spec.min_instances as usize
}

fn is_done(r: &InstanceRecord) -> bool {
    r.state.is_done()
}

async fn delete_record(meta: &dyn MetaStore, s: &Stored) -> Result<(), MetaError> {
    meta.delete(&s.key).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pool(name: &str, sel: &[(&str, &str)]) -> Pool {
        Pool {
            name: name.into(),
            node_selector: sel
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cpu_milli: 1000,
            mem_mib: 1024,
        }
    }

    #[test]
    fn a_node_belongs_to_the_first_pool_whose_selector_it_matches() {
        let pools = [
            pool("a", &[("zone", "x"), ("gpu", "yes")]),
            pool("b", &[("zone", "x")]),
            pool("everything", &[]),
        ];
        let labels = |l: &[(&str, &str)]| -> BTreeMap<String, String> {
            l.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let of = |l: &[(&str, &str)]| pool_of(&pools, &labels(l)).map(|p| p.name.as_str());
        assert_eq!(of(&[("zone", "x"), ("gpu", "yes")]), Some("a"));
        assert_eq!(of(&[("zone", "x")]), Some("b"));
        // An empty selector claims nothing.
        assert_eq!(of(&[("zone", "y")]), None);
        assert_eq!(of(&[]), None);
    }
}
