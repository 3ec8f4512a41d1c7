//! Consistent-hash ring: which live nodes own an object id's directory entry.
//!
//! Each node is hashed onto a 64-bit circle at `vnodes` points (virtual nodes). A key's owners
//! are the distinct nodes met walking clockwise from the key's hash: the first is the
//! *primary* owner, the next ones keep copies of its directory entry so that losing one node
//! never loses the record of where an object is. Adding or removing one of N nodes moves about
//! 1/N of the keys (property-tested below).
//!
//! Pure data: built from a list of node ids, no IO, deterministic for the same input.
use std::collections::BTreeSet;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Virtual nodes per node by default: enough for an even spread at tens of nodes.
pub const DEFAULT_VNODES: u32 = 128;

/// The ring over a set of node ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ring {
    /// `(point, index into nodes)`, sorted by point.
    points: Vec<(u64, u32)>,
    nodes: Vec<String>,
}

fn point(node: &str, vnode: u32) -> u64 {
    xxh3_64_with_seed(node.as_bytes(), u64::from(vnode) ^ 0x5348_4f41_4c52_494e)
}

/// Where a key sits on the circle.
pub fn key_point(key: &[u8]) -> u64 {
    xxh3_64_with_seed(key, 0)
}

impl Ring {
    /// A ring over `nodes` (duplicates ignored) with `vnodes` points each.
    pub fn new<I, S>(nodes: I, vnodes: u32) -> Ring
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let nodes: Vec<String> = nodes
            .into_iter()
            .map(Into::into)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let vnodes = vnodes.max(1);
        let mut points = Vec::with_capacity(nodes.len() * vnodes as usize);
        for (i, n) in nodes.iter().enumerate() {
            for v in 0..vnodes {
                points.push((point(n, v), i as u32));
            }
        }
        points.sort_unstable();
        Ring { points, nodes }
    }

    /// The node ids on the ring, sorted.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// Whether the ring has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Up to `n` distinct owners of `key`, primary first.
    pub fn owners(&self, key: &[u8], n: usize) -> Vec<&str> {
        let want = n.min(self.nodes.len());
        let mut out: Vec<&str> = Vec::with_capacity(want);
        if want == 0 {
            return out;
        }
        let h = key_point(key);
        let start = self.points.partition_point(|&(p, _)| p < h);
        for k in 0..self.points.len() {
            let (_, idx) = self.points[(start + k) % self.points.len()];
            let node = self.nodes[idx as usize].as_str();
            if !out.contains(&node) {
                out.push(node);
                if out.len() == want {
                    break;
                }
            }
        }
        out
    }

    /// The primary owner of `key`.
    pub fn primary(&self, key: &[u8]) -> Option<&str> {
        self.owners(key, 1).into_iter().next()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    #[test]
    fn empty_ring_owns_nothing() {
        let r = Ring::new(Vec::<String>::new(), 16);
        assert!(r.owners(b"x", 2).is_empty());
        assert_eq!(r.primary(b"x"), None);
    }

    #[test]
    fn spread_is_even_enough() {
        let r = Ring::new(names(5), DEFAULT_VNODES);
        let mut count = std::collections::HashMap::new();
        for k in 0..50_000u32 {
            *count
                .entry(r.primary(&k.to_le_bytes()).unwrap().to_string())
                .or_insert(0u32) += 1;
        }
        for (n, c) in count {
            // 10,000 expected each; allow ±30%.
            assert!((7_000..13_000).contains(&c), "{n} owns {c}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn owners_are_distinct_and_deterministic(n in 1usize..8, want in 1usize..5, key in any::<Vec<u8>>()) {
            let a = Ring::new(names(n), 32);
            let b = Ring::new(names(n).into_iter().rev(), 32);
            let o = a.owners(&key, want);
            prop_assert_eq!(o.len(), want.min(n));
            let set: BTreeSet<_> = o.iter().collect();
            prop_assert_eq!(set.len(), o.len());
            prop_assert_eq!(o, b.owners(&key, want));
        }

        #[test]
        fn removing_one_of_n_moves_about_one_nth(n in 3usize..10, gone in 0usize..10) {
            let gone = gone % n;
            let all = names(n);
            let before = Ring::new(all.clone(), DEFAULT_VNODES);
            let after = Ring::new(all.iter().filter(|x| **x != all[gone]).cloned(), DEFAULT_VNODES);
            let keys = 4000u32;
            let mut moved = 0u32;
            for k in 0..keys {
                let key = k.to_le_bytes();
                let (b, a) = (before.primary(&key).unwrap(), after.primary(&key).unwrap());
                if b != a {
                    // Only keys of the removed node move, and they move to a survivor.
                    prop_assert_eq!(b, all[gone].as_str());
                    moved += 1;
                }
            }
            let expected = f64::from(keys) / n as f64;
            prop_assert!((f64::from(moved) - expected).abs() < expected * 0.5,
                "moved {} of {} keys, expected about {}", moved, keys, expected);
        }

        #[test]
        fn a_primary_lost_hands_over_to_its_successor(n in 2usize..8, key in any::<u64>()) {
            // The second owner becomes primary when the first leaves: the directory copy kept
            // there is exactly where lookups go next.
            let all = names(n);
            let r = Ring::new(all.clone(), DEFAULT_VNODES);
            let key = key.to_le_bytes();
            let o = r.owners(&key, 2);
            let after = Ring::new(all.iter().filter(|x| **x != o[0]).cloned(), DEFAULT_VNODES);
            prop_assert_eq!(after.primary(&key), Some(o[1]));
        }
    }
}
