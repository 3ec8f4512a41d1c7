//! The remote route table: which other nodes run instances of which functions, fed by a
//! watch on the metadata store.
//!
//! [`RouteView`] is the sans-IO part: the `instances/`, `functions/` and `proxies/` records
//! go in, the routes come out ([`RouteView::routes`]): one per (node, function) with a
//! `running` instance on another node whose proxy is registered, carrying that proxy's
//! address, the instance ids, and their summed concurrency.
//!
//! [`feed_loop`] follows the store (`shoal_meta::Follower`: read, then watch from that
//! revision, read again when the watch breaks) and hands every new table to
//! [`RouteTable::apply`], which adds, updates and retires the router's remote routes and
//! starts one forwarder per node. When the store is unreachable the last table stays in
//! force, so warm calls keep flowing without control. [`register_loop`] holds this proxy's
//! own `proxies/<node>` record under a lease (`shoal_meta::LeasedRecord`).
use crate::peer::Forwarders;
use crate::shared::Shared;
use shoal_meta::records::{
    proxy_key, FunctionSpec, InstancePhase, InstanceRecord, ProxyRecord, FUNCTIONS_PREFIX,
    INSTANCES_PREFIX, PROXIES_PREFIX,
};
use shoal_meta::{Followed, Follower, LeasedRecord, MetaStore, WatchEvent};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Pause before reading the store again after it failed.
const RETRY_PAUSE: Duration = Duration::from_millis(300);

/// One remote route as the metadata implies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RouteSpec {
    pub(crate) addr: SocketAddr,
    pub(crate) instance_ids: BTreeSet<String>,
    pub(crate) concurrency: u32,
    /// The function's tenant (callers of others are not served it).
    pub(crate) tenant: String,
}

/// (node, function).
pub(crate) type RouteKey = (String, String);

/// The records routes are computed from.
#[derive(Debug, Default)]
pub(crate) struct RouteView {
    instances: BTreeMap<String, InstanceRecord>,
    functions: BTreeMap<String, FunctionSpec>,
    proxies: BTreeMap<String, ProxyRecord>,
}

impl RouteView {
    /// A view of `kvs` (any keys; those outside the three prefixes are ignored).
    pub(crate) fn from_kvs(kvs: impl IntoIterator<Item = (String, Vec<u8>)>) -> Self {
        let mut v = RouteView::default();
        for (k, val) in kvs {
            v.put(&k, &val);
        }
        v
    }

    /// A key was written. Undecodable values are treated as absent.
    pub(crate) fn put(&mut self, key: &str, value: &[u8]) {
        if key.starts_with(INSTANCES_PREFIX) {
            match serde_json::from_slice(value) {
                Ok(r) => self.instances.insert(key.to_owned(), r),
                Err(_) => self.instances.remove(key),
            };
        } else if let Some(name) = key.strip_prefix(FUNCTIONS_PREFIX) {
            match serde_json::from_slice(value) {
                Ok(f) => self.functions.insert(name.to_owned(), f),
                Err(_) => self.functions.remove(name),
            };
        } else if let Some(node) = key.strip_prefix(PROXIES_PREFIX) {
            match serde_json::from_slice(value) {
                Ok(p) => self.proxies.insert(node.to_owned(), p),
                Err(_) => self.proxies.remove(node),
            };
        }
    }

    /// A key was deleted.
    pub(crate) fn delete(&mut self, key: &str) {
        if key.starts_with(INSTANCES_PREFIX) {
            self.instances.remove(key);
        } else if let Some(name) = key.strip_prefix(FUNCTIONS_PREFIX) {
            self.functions.remove(name);
        } else if let Some(node) = key.strip_prefix(PROXIES_PREFIX) {
            self.proxies.remove(node);
        }
    }

    /// The remote routes seen from node `me`. An instance whose function has no record is
    /// left out: its tenant is unknown, so nobody could be allowed to call it.
    pub(crate) fn routes(&self, me: &str) -> BTreeMap<RouteKey, RouteSpec> {
        let mut out: BTreeMap<RouteKey, RouteSpec> = BTreeMap::new();
        for inst in self.instances.values() {
            if inst.node == me || inst.state != InstancePhase::Running {
                continue;
            }
            let Some(proxy) = self.proxies.get(&inst.node) else {
                continue;
            };
            let Some(function) = self.functions.get(&inst.function) else {
                continue;
            };
            let per = function.concurrency.max(1);
            let r = out
                .entry((inst.node.clone(), inst.function.clone()))
                .or_insert_with(|| RouteSpec {
                    addr: proxy.peer_addr,
                    instance_ids: BTreeSet::new(),
                    concurrency: 0,
                    tenant: function.tenant().to_owned(),
                });
            r.instance_ids.insert(inst.id.clone());
            r.concurrency = r.concurrency.saturating_add(per);
        }
        out
    }
}

/// The routes in force in the router, and the forwarders they use.
#[derive(Debug)]
pub(crate) struct RouteTable {
    shared: Arc<Shared>,
    active: BTreeMap<RouteKey, (u64, RouteSpec)>,
    forwarders: Forwarders,
}

impl RouteTable {
    pub(crate) fn new(shared: Arc<Shared>, forwarders: Forwarders) -> Self {
        Self {
            shared,
            active: BTreeMap::new(),
            forwarders,
        }
    }

    /// Makes `wanted` the routes in force: new and changed ones are set in the router,
    /// vanished ones retired (their calls in flight still complete), and forwarders of nodes
    /// no route leads to any more are let go.
    pub(crate) fn apply(&mut self, wanted: BTreeMap<RouteKey, RouteSpec>) {
        let gone: Vec<RouteKey> = self
            .active
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some((route, _)) = self.active.remove(&key) {
                tracing::info!(node = %key.0, function = %key.1, "remote route retired");
                self.shared.retire_route(route);
            }
        }
        for (key, spec) in wanted {
            if self.active.get(&key).is_some_and(|(_, s)| *s == spec) {
                continue;
            }
            let tx = match self.forwarders.get(&key.0, spec.addr) {
                Some(tx) => tx,
                None => self.forwarders.spawn(&self.shared, &key.0, spec.addr),
            };
            let route = match self.active.get(&key) {
                Some((route, _)) => *route,
                None => self.shared.route_id(),
            };
            tracing::info!(node = %key.0, function = %key.1, addr = %spec.addr, instances = spec.instance_ids.len(), concurrency = spec.concurrency, "remote route set");
            self.shared.set_route(
                route,
                &key.1,
                &key.0,
                spec.instance_ids.clone(),
                spec.concurrency,
                &spec.tenant,
                tx,
            );
            self.active.insert(key, (route, spec));
        }
        let nodes: BTreeSet<&str> = self.active.keys().map(|(n, _)| n.as_str()).collect();
        self.forwarders.retain(|node| nodes.contains(node));
    }
}

/// Reads and watches the store until `stop`, keeping `table` in step with it.
pub(crate) async fn feed_loop(
    meta: Arc<dyn MetaStore>,
    mut table: RouteTable,
    me: String,
    stop: CancellationToken,
) {
    // The whole store: routes need three prefixes, and one watch keeps them consistent.
    let mut follower = Follower::new(meta, "", RETRY_PAUSE);
    let mut view = RouteView::default();
    while let Some(f) = follower.next(&stop).await {
        match f {
            Followed::Snapshot(kvs) => {
                view = RouteView::from_kvs(kvs.into_iter().map(|kv| (kv.key, kv.value)));
            }
            Followed::Event(ev) => {
                // Take every event already queued before recomputing.
                let mut next = Some(ev);
                while let Some(ev) = next {
                    match ev {
                        WatchEvent::Put(kv) => view.put(&kv.key, &kv.value),
                        WatchEvent::Delete { key, .. } => view.delete(&key),
                    }
                    next = follower.try_next_event();
                }
            }
        }
        table.apply(view.routes(&me));
    }
}

/// Holds `proxies/<node>` under a lease of `ttl` until `stop`, then removes it. The lease
/// is kept alive, and granted again with the record rewritten whenever the store says it
/// is gone (`shoal_meta::LeasedRecord`).
pub(crate) async fn register_loop(
    meta: Arc<dyn MetaStore>,
    record: ProxyRecord,
    ttl: Duration,
    stop: CancellationToken,
) {
    let value = match serde_json::to_vec(&record) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "encoding the proxy record failed");
            return;
        }
    };
    let held = LeasedRecord::spawn(meta, proxy_key(&record.node_id), value, ttl);
    let mut registered = held.registered();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            changed = registered.changed() => {
                if changed.is_err() {
                    break;
                }
                if *registered.borrow_and_update() {
                    tracing::info!(node = %record.node_id, addr = %record.peer_addr, "proxy registered");
                }
            }
        }
    }
    held.stop().await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn inst(id: &str, function: &str, node: &str, state: InstancePhase) -> (String, Vec<u8>) {
        let r = InstanceRecord {
            id: id.into(),
            function: function.into(),
            node: node.into(),
            state,
            reason: None,
            pid: None,
            function_version: None,
        };
        (
            shoal_meta::records::instance_key(function, id),
            serde_json::to_vec(&r).unwrap(),
        )
    }

    fn function(name: &str, tenant: &str) -> (String, Vec<u8>) {
        let spec = serde_json::json!({
            "name": name,
            "tenant": tenant,
            "code": {"kind": "dir", "path": "/tmp"},
            "command": ["x"],
            "resources": {"cpu_milli": 100, "mem_mib": 16},
        });
        (
            shoal_meta::records::function_key(name),
            serde_json::to_vec(&spec).unwrap(),
        )
    }

    fn proxy(node: &str, port: u16) -> (String, Vec<u8>) {
        let r = ProxyRecord {
            node_id: node.into(),
            peer_addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        (
            shoal_meta::records::proxy_key(node),
            serde_json::to_vec(&r).unwrap(),
        )
    }

    #[test]
    fn routes_are_running_remote_instances_with_a_proxy() {
        let view = RouteView::from_kvs([
            inst("a", "echo", "n1", InstancePhase::Running),
            inst("b", "echo", "n2", InstancePhase::Running),
            inst("c", "echo", "n2", InstancePhase::Running),
            inst("d", "echo", "n3", InstancePhase::Running), // no proxy on n3
            inst("e", "echo", "n2", InstancePhase::Starting),
            inst("f", "wc", "n2", InstancePhase::Failed),
            inst("g", "unrecorded", "n2", InstancePhase::Running), // no function record
            function("echo", "team-a"),
            function("wc", ""),
            proxy("n1", 1),
            proxy("n2", 2),
            (shoal_meta::records::node_key("n2"), b"ignored".to_vec()),
        ]);
        let r = view.routes("n1");
        assert_eq!(r.len(), 1);
        let spec = &r[&("n2".to_string(), "echo".to_string())];
        assert_eq!(spec.addr.port(), 2);
        assert_eq!(spec.tenant, "team-a");
        assert_eq!(spec.concurrency, 2, "two instances, concurrency 1 each");
        assert_eq!(
            spec.instance_ids.iter().cloned().collect::<Vec<_>>(),
            ["b", "c"]
        );
        // Seen from n2, its own instances are local; n1's instance is the route.
        let r2 = view.routes("n2");
        assert_eq!(
            r2.keys().cloned().collect::<Vec<_>>(),
            [("n1".to_string(), "echo".to_string())]
        );
    }

    #[test]
    fn deletes_and_garbage_remove_routes() {
        let mut view = RouteView::from_kvs([
            inst("b", "echo", "n2", InstancePhase::Running),
            function("echo", ""),
            proxy("n2", 2),
        ]);
        assert_eq!(view.routes("n1").len(), 1);
        view.delete(&format!("{PROXIES_PREFIX}n2"));
        assert!(view.routes("n1").is_empty());
        let (k, v) = proxy("n2", 3);
        view.put(&k, &v);
        assert_eq!(view.routes("n1").len(), 1);
        view.put(&format!("{INSTANCES_PREFIX}echo/b"), b"not json");
        assert!(view.routes("n1").is_empty());
    }
}
