//! Limits every backend enforces the same way, and the namespace (prefix) that maps the keys
//! callers see to the keys a backend stores.
//!
//! Invariant: every key that reaches a backend went through [`Namespace::key`] (or
//! [`Namespace::txn`]), so it is non-empty, within [`MAX_KEY_LEN`] including the prefix, and
//! its value within [`MAX_VALUE_LEN`]. The limits are chosen so that anything valid also fits
//! etcd's default request limit (1.5 MiB) and the remote protocol's frame limit.
use crate::types::{Compare, MetaError, Txn, TxnOp};
use std::collections::HashSet;
use std::time::Duration;

/// Longest key, in bytes, including the backend's prefix.
pub const MAX_KEY_LEN: usize = 4096;
/// Largest value, in bytes.
pub const MAX_VALUE_LEN: usize = 1 << 20;
/// Most compares, and most operations per branch, in one transaction (etcd's default).
pub const MAX_TXN_OPS: usize = 128;
/// Most bytes of keys and values in one transaction (both branches and the compares).
pub const MAX_TXN_BYTES: usize = MAX_VALUE_LEN + (256 << 10);
/// Longest lease TTL.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(24 * 3600);

/// `ttl` rounded up to whole seconds, at least one; `InvalidArgument` above [`MAX_LEASE_TTL`].
pub(crate) fn lease_secs(ttl: Duration) -> Result<u64, MetaError> {
    if ttl > MAX_LEASE_TTL {
        return Err(MetaError::InvalidArgument(format!(
            "lease TTL {ttl:?} exceeds the maximum of {MAX_LEASE_TTL:?}"
        )));
    }
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    Ok(secs.max(1))
}

/// Checks a value's size.
pub(crate) fn check_value(value: &[u8]) -> Result<(), MetaError> {
    if value.len() > MAX_VALUE_LEN {
        return Err(MetaError::InvalidArgument(format!(
            "value of {} bytes exceeds the maximum of {MAX_VALUE_LEN}",
            value.len()
        )));
    }
    Ok(())
}

/// A backend's key prefix: callers' keys are relative to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Namespace {
    prefix: String,
}

impl Namespace {
    /// A namespace under `prefix` (may be empty).
    pub(crate) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// The prefix.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The stored key for the caller's `key`, validated.
    pub(crate) fn key(&self, key: &str) -> Result<String, MetaError> {
        if key.is_empty() {
            return Err(MetaError::InvalidArgument("empty key".into()));
        }
        let full = self.prefix.len() + key.len();
        if full > MAX_KEY_LEN {
            return Err(MetaError::InvalidArgument(format!(
                "key of {full} bytes (with the prefix) exceeds the maximum of {MAX_KEY_LEN}"
            )));
        }
        Ok(format!("{}{key}", self.prefix))
    }

    /// The stored prefix for the caller's range or watch `prefix` (may be empty).
    pub(crate) fn range(&self, prefix: &str) -> Result<String, MetaError> {
        let full = self.prefix.len() + prefix.len();
        if full > MAX_KEY_LEN {
            return Err(MetaError::InvalidArgument(format!(
                "prefix of {full} bytes exceeds the maximum key length of {MAX_KEY_LEN}"
            )));
        }
        Ok(format!("{}{prefix}", self.prefix))
    }

    /// The caller's key for a stored key; `None` if it is outside the namespace.
    pub(crate) fn strip<'a>(&self, stored: &'a str) -> Option<&'a str> {
        stored.strip_prefix(self.prefix.as_str())
    }

    /// The transaction with stored keys, validated: limits, and no key written twice in one
    /// branch (etcd refuses that too).
    pub(crate) fn txn(&self, txn: Txn) -> Result<Txn, MetaError> {
        if txn.compare.len() > MAX_TXN_OPS
            || txn.success.len() > MAX_TXN_OPS
            || txn.failure.len() > MAX_TXN_OPS
        {
            return Err(MetaError::InvalidArgument(format!(
                "transaction has more than {MAX_TXN_OPS} compares or operations in a branch"
            )));
        }
        let mut bytes = 0usize;
        let mut compare = Vec::with_capacity(txn.compare.len());
        for c in txn.compare {
            compare.push(match c {
                Compare::Absent(k) => {
                    let k = self.key(&k)?;
                    bytes += k.len();
                    Compare::Absent(k)
                }
                Compare::Value(k, v) => {
                    let k = self.key(&k)?;
                    check_value(&v)?;
                    bytes += k.len() + v.len();
                    Compare::Value(k, v)
                }
                Compare::ModRevision(k, r) => {
                    let k = self.key(&k)?;
                    bytes += k.len();
                    Compare::ModRevision(k, r)
                }
            });
        }
        let success = self.branch(txn.success, &mut bytes)?;
        let failure = self.branch(txn.failure, &mut bytes)?;
        if bytes > MAX_TXN_BYTES {
            return Err(MetaError::InvalidArgument(format!(
                "transaction of {bytes} bytes exceeds the maximum of {MAX_TXN_BYTES}"
            )));
        }
        Ok(Txn {
            compare,
            success,
            failure,
        })
    }

    fn branch(&self, ops: Vec<TxnOp>, bytes: &mut usize) -> Result<Vec<TxnOp>, MetaError> {
        let mut seen = HashSet::with_capacity(ops.len());
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            let op = match op {
                TxnOp::Put { key, value, lease } => {
                    let key = self.key(&key)?;
                    check_value(&value)?;
                    *bytes += key.len() + value.len();
                    TxnOp::Put { key, value, lease }
                }
                TxnOp::Delete { key } => {
                    let key = self.key(&key)?;
                    *bytes += key.len();
                    TxnOp::Delete { key }
                }
            };
            let key = match &op {
                TxnOp::Put { key, .. } | TxnOp::Delete { key } => key,
            };
            if !seen.insert(key.clone()) {
                return Err(MetaError::InvalidArgument(format!(
                    "key {key:?} is written twice in one transaction branch"
                )));
            }
            out.push(op);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ttl_rounding() {
        assert_eq!(lease_secs(Duration::ZERO).unwrap(), 1);
        assert_eq!(lease_secs(Duration::from_millis(1)).unwrap(), 1);
        assert_eq!(lease_secs(Duration::from_millis(1001)).unwrap(), 2);
        assert_eq!(lease_secs(Duration::from_secs(3)).unwrap(), 3);
        assert!(lease_secs(MAX_LEASE_TTL + Duration::from_secs(1)).is_err());
    }

    #[test]
    fn keys_are_checked() {
        let ns = Namespace::new("p/");
        assert_eq!(ns.key("a").unwrap(), "p/a");
        assert!(ns.key("").is_err());
        assert!(ns.key(&"x".repeat(MAX_KEY_LEN)).is_err());
        assert_eq!(ns.strip("p/a"), Some("a"));
        assert_eq!(ns.strip("q/a"), None);
        let dup = Txn {
            success: vec![
                TxnOp::Delete { key: "a".into() },
                TxnOp::Put {
                    key: "a".into(),
                    value: vec![],
                    lease: None,
                },
            ],
            ..Txn::default()
        };
        assert!(matches!(ns.txn(dup), Err(MetaError::InvalidArgument(_))));
    }
}
