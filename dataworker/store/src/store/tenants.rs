//! Per-tenant accounting of the [`Store`](super::Store): the arena and spill bytes each tenant
//! holds, and the limits it may not pass.
//!
//! What a tenant is charged for one entry: its payload plus its name as the tenant wrote it
//! (without the tenant prefix), whatever the allocator rounds that up to. The charge sits on
//! the arena side while the entry has memory (sealed or not, zombies included: the bytes are
//! still taken) and on the spill side while it is spilled; a spill and a restore move it from
//! one side to the other, a free or a removal takes it away. Usage never goes negative
//! (a bookkeeping slip is caught by `check_invariants`, and saturates in release builds).
//!
//! Limits are checked only where a tenant asks for *new* bytes (create, KV create): passing
//! one is `QuotaExceeded` before anything changes. A restore is never refused by the arena
//! limit (reading one's own data must not fail; the bytes only move back from the spill
//! side), and a spill that would pass the spill limit does not happen: the entry is dropped
//! instead, or, when it must be kept (a primary in a cluster), stays in memory.
use super::StoreError;
use shoal_protocol::DEFAULT_TENANT;
use std::collections::HashMap;

/// Bytes one tenant holds on this node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantUsage {
    /// Payload and name bytes of entries in the arena (sealed, unsealed, still viewed).
    pub arena_bytes: u64,
    /// Payload and name bytes of entries spilled to disk.
    pub spill_bytes: u64,
}

/// Limits of one tenant on this node (`None`: unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantLimits {
    /// Most arena bytes.
    pub arena_bytes: Option<u64>,
    /// Most spill bytes.
    pub spill_bytes: Option<u64>,
}

/// Usage and limits by tenant. The default tenant's (nearly every entry of a single-user
/// node) sit in fields of their own, so its writes pay no hashing for them.
#[derive(Debug, Default)]
pub(super) struct Tenants {
    default_usage: TenantUsage,
    default_limits: TenantLimits,
    usage: HashMap<String, TenantUsage>,
    limits: HashMap<String, TenantLimits>,
}

/// Which side of a tenant's usage a charge is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Arena,
    Spill,
}

impl Tenants {
    fn slot(&mut self, tenant: &str) -> &mut TenantUsage {
        if tenant == DEFAULT_TENANT {
            return &mut self.default_usage;
        }
        if !self.usage.contains_key(tenant) {
            self.usage.insert(tenant.to_owned(), TenantUsage::default());
        }
        // Inserted just above when absent.
        self.usage.get_mut(tenant).unwrap_or_else(|| unreachable!())
    }

    pub(super) fn add(&mut self, tenant: &str, side: Side, bytes: u64) {
        let u = self.slot(tenant);
        let v = match side {
            Side::Arena => &mut u.arena_bytes,
            Side::Spill => &mut u.spill_bytes,
        };
        *v = v.saturating_add(bytes);
    }

    pub(super) fn sub(&mut self, tenant: &str, side: Side, bytes: u64) {
        let u = if tenant == DEFAULT_TENANT {
            Some(&mut self.default_usage)
        } else {
            self.usage.get_mut(tenant)
        };
        let Some(u) = u else {
            debug_assert!(
                bytes == 0,
                "uncharging {bytes} from unknown tenant {tenant}"
            );
            return;
        };
        let v = match side {
            Side::Arena => &mut u.arena_bytes,
            Side::Spill => &mut u.spill_bytes,
        };
        debug_assert!(*v >= bytes, "{tenant}: usage would go negative");
        *v = v.saturating_sub(bytes);
        if *u == TenantUsage::default() && tenant != DEFAULT_TENANT {
            self.usage.remove(tenant);
        }
    }

    pub(super) fn usage(&self, tenant: &str) -> TenantUsage {
        if tenant == DEFAULT_TENANT {
            return self.default_usage;
        }
        self.usage.get(tenant).copied().unwrap_or_default()
    }

    /// Every tenant holding bytes, with its usage.
    pub(super) fn all(&self) -> HashMap<String, TenantUsage> {
        let mut m = self.usage.clone();
        if self.default_usage != TenantUsage::default() {
            m.insert(DEFAULT_TENANT.to_owned(), self.default_usage);
        }
        m
    }

    pub(super) fn set_limits(&mut self, tenant: &str, limits: TenantLimits) {
        if tenant == DEFAULT_TENANT {
            self.default_limits = limits;
        } else if limits == TenantLimits::default() {
            self.limits.remove(tenant);
        } else {
            self.limits.insert(tenant.to_owned(), limits);
        }
    }

    pub(super) fn limits(&self, tenant: &str) -> TenantLimits {
        if tenant == DEFAULT_TENANT {
            return self.default_limits;
        }
        self.limits.get(tenant).copied().unwrap_or_default()
    }

    /// May `tenant` take `more` new arena bytes? The rule of `Quota::admit`: refused when
    /// the sum would pass the limit (a limit of 0 refuses everything but nothing).
    pub(super) fn admit_arena(&self, tenant: &str, more: u64) -> Result<(), StoreError> {
        let Some(limit) = self.limits(tenant).arena_bytes else {
            return Ok(());
        };
        let wanted = self.usage(tenant).arena_bytes.saturating_add(more);
        if more > 0 && wanted > limit {
            return Err(StoreError::QuotaExceeded {
                resource: "arena_bytes",
                limit,
                wanted,
            });
        }
        Ok(())
    }

    /// Whether `bytes` more may be spilled for `tenant`.
    pub(super) fn spill_fits(&self, tenant: &str, bytes: u64) -> bool {
        self.limits(tenant)
            .spill_bytes
            .is_none_or(|limit| self.usage(tenant).spill_bytes.saturating_add(bytes) <= limit)
    }
}
