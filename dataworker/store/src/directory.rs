//! The object directory shard a dataworker keeps for the ids the ring gives it: for each
//! object, its size, its primary copy and every node holding a copy.
//!
//! Nodes are named with their *incarnation* (a number that changes each time a node process
//! starts). A location of an older incarnation is stale: that process and its memory are gone.
//! When the last location of an object goes because its node left (lease expired) or
//! restarted, the object becomes *lost*: lookups answer `Lost` (a fast `ObjectLost` for the
//! reader, not a hang) until the id is registered again or the tombstone ages out. A deleted
//! id is remembered for a while too, so that a late registration of a copy that is being
//! dropped does not bring the object back.
//!
//! Pure state machine: callers pass `now` (milliseconds) and act on what it returns.
use shoal_protocol::ObjectId;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// What a holder tells an owner about one of its copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirRecord {
    /// Object id.
    pub id: ObjectId,
    /// Payload size.
    pub size: u64,
    /// Whether this is the primary copy (sealed on that node) or a replica.
    pub primary: bool,
}

/// Answer to "where is it".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Locate {
    /// Sealed somewhere: the size and the holders, primary first, then replicas by name.
    Found {
        /// Payload size.
        size: u64,
        /// Node ids.
        holders: Vec<String>,
    },
    /// Every copy was on nodes that are gone.
    Lost,
    /// Not known here (not sealed yet, deleted, or never existed).
    Unknown,
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// It comes from an older incarnation of the node than the one the directory knows.
    StaleIncarnation,
    /// The id was deleted moments ago and this is a replica on its way out.
    Deleted,
}

/// Limits of the directory's memory of gone objects.
#[derive(Debug, Clone, Copy)]
pub struct DirectoryConfig {
    /// How long a lost or deleted id is remembered (ms).
    pub tombstone_ms: u64,
    /// At most this many tombstones; the oldest go first.
    pub max_tombstones: usize,
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        Self {
            tombstone_ms: 10 * 60 * 1000,
            max_tombstones: 100_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tomb {
    Lost,
    Deleted,
}

#[derive(Debug, Clone)]
struct Entry {
    size: u64,
    primary: Option<String>,
    /// node -> incarnation of the copy.
    holders: BTreeMap<String, u64>,
}

/// One node's shard of the object directory.
#[derive(Debug, Default)]
pub struct Directory {
    cfg: DirectoryConfig,
    entries: HashMap<ObjectId, Entry>,
    tombs: HashMap<ObjectId, (Tomb, u64)>,
    tomb_order: BTreeSet<(u64, ObjectId)>,
    /// The newest incarnation seen of each node.
    incarnations: HashMap<String, u64>,
}

impl Directory {
    /// An empty shard.
    pub fn new(cfg: DirectoryConfig) -> Self {
        Self {
            cfg,
            ..Self::default()
        }
    }

    /// Objects with at least one live copy known here.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no object is known here.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn bury(&mut self, id: ObjectId, tomb: Tomb, now: u64) {
        if let Some((_, at)) = self.tombs.insert(id.clone(), (tomb, now)) {
            self.tomb_order.remove(&(at, id.clone()));
        }
        self.tomb_order.insert((now, id));
        while self.tombs.len() > self.cfg.max_tombstones {
            let Some((at, old)) = self.tomb_order.pop_first() else {
                break;
            };
            if self.tombs.get(&old).is_some_and(|&(_, t)| t == at) {
                self.tombs.remove(&old);
            }
        }
    }

    fn unbury(&mut self, id: &ObjectId) {
        if let Some((_, at)) = self.tombs.remove(id) {
            self.tomb_order.remove(&(at, id.clone()));
        }
    }

    /// Removes every location matching `gone`; returns the ids that lost their last copy.
    fn drop_locations(&mut self, now: u64, gone: impl Fn(&str, u64) -> bool) -> Vec<ObjectId> {
        let mut lost = Vec::new();
        self.entries.retain(|id, e| {
            e.holders.retain(|n, inc| !gone(n, *inc));
            if e.primary
                .as_ref()
                .is_some_and(|p| !e.holders.contains_key(p))
            {
                e.primary = None;
            }
            if e.holders.is_empty() {
                lost.push(id.clone());
                false
            } else {
                true
            }
        });
        for id in &lost {
            self.bury(id.clone(), Tomb::Lost, now);
        }
        lost
    }

    /// A node is live with `incarnation`. Copies from its earlier incarnations are gone;
    /// returns the ids that thereby lost their last copy.
    pub fn node_up(&mut self, node: &str, incarnation: u64, now: u64) -> Vec<ObjectId> {
        let known = self.incarnations.entry(node.to_string()).or_insert(0);
        if incarnation <= *known {
            return Vec::new();
        }
        *known = incarnation;
        self.drop_locations(now, |n, inc| n == node && inc < incarnation)
    }

    /// A node left the cluster: its copies are gone. Returns the ids that lost their last copy.
    pub fn node_down(&mut self, node: &str, now: u64) -> Vec<ObjectId> {
        self.drop_locations(now, |n, _| n == node)
    }

    /// Records that `node` (in `incarnation`) holds a copy.
    pub fn register(
        &mut self,
        node: &str,
        incarnation: u64,
        rec: DirRecord,
        now: u64,
    ) -> Result<(), Refused> {
        let known = self.incarnations.entry(node.to_string()).or_insert(0);
        if incarnation < *known {
            return Err(Refused::StaleIncarnation);
        }
        let newer = incarnation > *known;
        *known = incarnation;
        if newer {
            self.drop_locations(now, |n, inc| n == node && inc < incarnation);
        }
        match self.tombs.get(&rec.id) {
            Some((Tomb::Deleted, at))
                if !rec.primary && now.saturating_sub(*at) < self.cfg.tombstone_ms =>
            {
                return Err(Refused::Deleted);
            }
            Some(_) => self.unbury(&rec.id),
            None => {}
        }
        let e = self.entries.entry(rec.id).or_insert_with(|| Entry {
            size: rec.size,
            primary: None,
            holders: BTreeMap::new(),
        });
        if rec.primary {
            e.primary = Some(node.to_string());
            e.size = rec.size;
        }
        e.holders.insert(node.to_string(), incarnation);
        Ok(())
    }

    /// `node` no longer holds a copy (evicted or deleted locally). The entry goes when no
    /// holder is left; that is not a loss.
    pub fn unregister(&mut self, node: &str, id: &ObjectId) {
        if let Some(e) = self.entries.get_mut(id) {
            e.holders.remove(node);
            if e.primary.as_deref() == Some(node) {
                e.primary = None;
            }
            if e.holders.is_empty() {
                self.entries.remove(id);
            }
        }
    }

    /// The object was deleted: forget it and return the nodes that hold copies to drop.
    pub fn delete(&mut self, id: &ObjectId, now: u64) -> Vec<String> {
        let holders = self
            .entries
            .remove(id)
            .map(|e| e.holders.into_keys().collect())
            .unwrap_or_default();
        self.bury(id.clone(), Tomb::Deleted, now);
        holders
    }

    /// Where `id` is.
    pub fn locate(&self, id: &ObjectId, now: u64) -> Locate {
        if let Some(e) = self.entries.get(id) {
            let mut holders: Vec<String> = e.primary.iter().cloned().collect();
            holders.extend(
                e.holders
                    .keys()
                    .filter(|n| Some(*n) != e.primary.as_ref())
                    .cloned(),
            );
            return Locate::Found {
                size: e.size,
                holders,
            };
        }
        match self.tombs.get(id) {
            Some((Tomb::Lost, at)) if now.saturating_sub(*at) < self.cfg.tombstone_ms => {
                Locate::Lost
            }
            _ => Locate::Unknown,
        }
    }

    /// Keeps only the entries `owned` says this shard is responsible for (after the ring
    /// changed); returns how many were dropped. The new owners hear from the holders.
    pub fn retain_owned(&mut self, owned: impl Fn(&ObjectId) -> bool) -> usize {
        let before = self.entries.len();
        self.entries.retain(|id, _| owned(id));
        before - self.entries.len()
    }

    /// Forgets tombstones older than the configured time.
    pub fn expire(&mut self, now: u64) {
        while let Some((at, _)) = self.tomb_order.first() {
            if now.saturating_sub(*at) < self.cfg.tombstone_ms {
                break;
            }
            let Some((at, id)) = self.tomb_order.pop_first() else {
                break;
            };
            if self.tombs.get(&id).is_some_and(|&(_, t)| t == at) {
                self.tombs.remove(&id);
            }
        }
    }

    /// Checks internal consistency (tests).
    #[cfg(test)]
    fn check(&self) {
        for (id, e) in &self.entries {
            assert!(!e.holders.is_empty(), "{id} has no holder");
            if let Some(p) = &e.primary {
                assert!(
                    e.holders.contains_key(p),
                    "{id}: primary {p} is not a holder"
                );
            }
            assert!(
                !matches!(self.tombs.get(id), Some((Tomb::Lost, _))),
                "{id} is both known and lost"
            );
            for (n, inc) in &e.holders {
                assert!(
                    self.incarnations.get(n).is_some_and(|k| k == inc),
                    "{id}: holder {n}/{inc} is not the newest incarnation"
                );
            }
        }
        assert_eq!(self.tombs.len(), self.tomb_order.len());
        assert!(self.tombs.len() <= self.cfg.max_tombstones);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn id(s: &str) -> ObjectId {
        ObjectId::new(s).unwrap()
    }

    fn rec(s: &str, primary: bool) -> DirRecord {
        DirRecord {
            id: id(s),
            size: 10,
            primary,
        }
    }

    #[test]
    fn primary_first_then_replicas() {
        let mut d = Directory::new(DirectoryConfig::default());
        d.register("b", 1, rec("x", false), 0).unwrap();
        d.register("c", 1, rec("x", true), 0).unwrap();
        d.register("a", 1, rec("x", false), 0).unwrap();
        assert_eq!(
            d.locate(&id("x"), 0),
            Locate::Found {
                size: 10,
                holders: vec!["c".into(), "a".into(), "b".into()]
            }
        );
        d.check();
    }

    #[test]
    fn last_copy_gone_is_lost_until_reput() {
        let mut d = Directory::new(DirectoryConfig::default());
        d.register("a", 1, rec("x", true), 0).unwrap();
        d.register("b", 1, rec("x", false), 0).unwrap();
        assert!(d.node_down("a", 5).is_empty());
        assert!(matches!(d.locate(&id("x"), 5), Locate::Found { .. }));
        assert_eq!(d.node_down("b", 6), vec![id("x")]);
        assert_eq!(d.locate(&id("x"), 7), Locate::Lost);
        d.register("c", 1, rec("x", true), 8).unwrap();
        assert!(matches!(d.locate(&id("x"), 9), Locate::Found { .. }));
        d.check();
    }

    #[test]
    fn a_restarted_node_does_not_resurrect_its_old_copies() {
        let mut d = Directory::new(DirectoryConfig::default());
        d.register("a", 1, rec("x", true), 0).unwrap();
        assert_eq!(d.node_up("a", 2, 1), vec![id("x")]);
        assert_eq!(d.locate(&id("x"), 2), Locate::Lost);
        // A late message from the old process is refused.
        assert_eq!(
            d.register("a", 1, rec("y", true), 3),
            Err(Refused::StaleIncarnation)
        );
        d.check();
    }

    #[test]
    fn a_deleted_object_is_not_brought_back_by_a_late_replica() {
        let mut d = Directory::new(DirectoryConfig::default());
        d.register("a", 1, rec("x", true), 0).unwrap();
        d.register("b", 1, rec("x", false), 0).unwrap();
        let mut holders = d.delete(&id("x"), 1);
        holders.sort();
        assert_eq!(holders, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(
            d.register("b", 1, rec("x", false), 2),
            Err(Refused::Deleted)
        );
        assert_eq!(d.locate(&id("x"), 2), Locate::Unknown);
        // A new put of the same id is a new object.
        d.register("a", 1, rec("x", true), 3).unwrap();
        assert!(matches!(d.locate(&id("x"), 3), Locate::Found { .. }));
    }

    #[test]
    fn tombstones_age_out_and_are_bounded() {
        let mut d = Directory::new(DirectoryConfig {
            tombstone_ms: 100,
            max_tombstones: 3,
        });
        for (i, n) in ["a", "b", "c", "d"].iter().enumerate() {
            d.register(n, 1, rec(n, true), 0).unwrap();
            d.node_down(n, i as u64);
        }
        assert_eq!(d.locate(&id("a"), 10), Locate::Unknown, "oldest dropped");
        assert_eq!(d.locate(&id("d"), 10), Locate::Lost);
        d.expire(200);
        assert_eq!(d.locate(&id("d"), 200), Locate::Unknown);
        d.check();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Register(u8, u8, u8, bool),
        Unregister(u8, u8),
        Delete(u8),
        Down(u8),
        Up(u8, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..4u8, 1..4u8, 0..6u8, any::<bool>()).prop_map(|(n, i, o, p)| Op::Register(n, i, o, p)),
            1 => (0..4u8, 0..6u8).prop_map(|(n, o)| Op::Unregister(n, o)),
            1 => (0..6u8).prop_map(Op::Delete),
            1 => (0..4u8).prop_map(Op::Down),
            1 => (0..4u8, 1..4u8).prop_map(|(n, i)| Op::Up(n, i)),
        ]
    }

    proptest! {
        #[test]
        fn random_histories_keep_invariants(ops in proptest::collection::vec(op(), 1..200)) {
            let mut d = Directory::new(DirectoryConfig { tombstone_ms: 1_000_000, max_tombstones: 4 });
            let node = |n: u8| format!("n{n}");
            let obj = |o: u8| id(&format!("o{o}"));
            for (now, op) in ops.into_iter().enumerate() {
                let now = now as u64;
                match op.clone() {
                    Op::Register(n, inc, o, p) => {
                        let _ = d.register(&node(n), u64::from(inc), DirRecord { id: obj(o), size: 1, primary: p }, now);
                    }
                    Op::Unregister(n, o) => d.unregister(&node(n), &obj(o)),
                    Op::Delete(o) => {
                        d.delete(&obj(o), now);
                        prop_assert_eq!(d.locate(&obj(o), now), Locate::Unknown);
                    }
                    Op::Down(n) => {
                        let lost = d.node_down(&node(n), now);
                        // Tombstones are bounded (4 here): when one loss makes more, the
                        // oldest are forgotten (Unknown), never found.
                        let lost_kept = lost.len() <= 4;
                        for id in lost {
                            let at = d.locate(&id, now);
                            if lost_kept {
                                prop_assert_eq!(at, Locate::Lost);
                            } else {
                                prop_assert!(matches!(at, Locate::Lost | Locate::Unknown), "{:?}", at);
                            }
                        }
                    }
                    Op::Up(n, inc) => { d.node_up(&node(n), u64::from(inc), now); }
                }
                d.check();
                // A node that is down holds nothing any more.
                if let Op::Down(n) = op {
                    for o in 0..6u8 {
                        if let Locate::Found { holders, .. } = d.locate(&obj(o), now) {
                            prop_assert!(!holders.contains(&node(n)));
                        }
                    }
                }
            }
        }
    }
}
