//! Tenant quotas: `quotas/<tenant>`, written by the operator through control's REST API and
//! followed by every component that enforces one. Each limit is optional (absent: no limit)
//! and each is enforced where the resource is spent: arena and spill bytes by the
//! dataworker, instance count, CPU and memory by control when a function is created or
//! changed (counted at its `max_instances`), calls in flight by the proxy. A request that would
//! cross a limit is refused with `QuotaExceeded` before it changes anything. Pure: no IO.
use super::function::InvalidSpec;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Quota records: `quotas/<tenant>`.
pub const QUOTAS_PREFIX: &str = "quotas/";

/// `quotas/<tenant>`.
pub fn quota_key(tenant: &str) -> String {
    format!("{QUOTAS_PREFIX}{tenant}")
}

/// A tenant's limits. `None`: unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Bytes of sealed and unsealed objects and keys held in each node's arena.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arena_bytes: Option<u64>,
    /// Bytes spilled to each node's disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spill_bytes: Option<u64>,
    /// Instances, counted at each function's `max_instances`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<u64>,
    /// CPU of those instances, thousandths of a core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_milli: Option<u64>,
    /// Memory of those instances, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_mib: Option<u64>,
    /// Calls of the tenant in flight through each proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calls_in_flight: Option<u64>,
}

/// The resources a quota limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    /// [`Quota::arena_bytes`].
    ArenaBytes,
    /// [`Quota::spill_bytes`].
    SpillBytes,
    /// [`Quota::instances`].
    Instances,
    /// [`Quota::cpu_milli`].
    CpuMilli,
    /// [`Quota::mem_mib`].
    MemMib,
    /// [`Quota::calls_in_flight`].
    CallsInFlight,
}

impl Resource {
    /// Every resource.
    pub const ALL: [Resource; 6] = [
        Resource::ArenaBytes,
        Resource::SpillBytes,
        Resource::Instances,
        Resource::CpuMilli,
        Resource::MemMib,
        Resource::CallsInFlight,
    ];

    /// Its field name in [`Quota`].
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::ArenaBytes => "arena_bytes",
            Resource::SpillBytes => "spill_bytes",
            Resource::Instances => "instances",
            Resource::CpuMilli => "cpu_milli",
            Resource::MemMib => "mem_mib",
            Resource::CallsInFlight => "calls_in_flight",
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request that would take a tenant past one of its limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("quota exceeded: {resource} would be {wanted}, the limit is {limit}")]
pub struct QuotaExceeded {
    /// Which limit.
    pub resource: Resource,
    /// The limit.
    pub limit: u64,
    /// Use after the request.
    pub wanted: u64,
}

impl Quota {
    /// The limit on `r`, if any.
    pub fn limit(&self, r: Resource) -> Option<u64> {
        match r {
            Resource::ArenaBytes => self.arena_bytes,
            Resource::SpillBytes => self.spill_bytes,
            Resource::Instances => self.instances,
            Resource::CpuMilli => self.cpu_milli,
            Resource::MemMib => self.mem_mib,
            Resource::CallsInFlight => self.calls_in_flight,
        }
    }

    /// May a tenant using `used` of `r` take `more`? Refused when the sum would pass the
    /// limit (a limit of 0 refuses everything but a zero request).
    pub fn admit(&self, r: Resource, used: u64, more: u64) -> Result<(), QuotaExceeded> {
        let wanted = used.saturating_add(more);
        match self.limit(r) {
            Some(limit) if wanted > limit && more > 0 => Err(QuotaExceeded {
                resource: r,
                limit,
                wanted,
            }),
            _ => Ok(()),
        }
    }

    /// Checks the record (every limit is a plain count; nothing to refuse today but a
    /// limit above 2^53, which JSON readers in other languages could not hold exactly).
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        const MAX: u64 = 1 << 53;
        for r in Resource::ALL {
            if self.limit(r).is_some_and(|l| l > MAX) {
                return Err(InvalidSpec {
                    field: r.as_str().into(),
                    reason: format!("must be at most {MAX}"),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn json_names_are_the_field_names() {
        let q: Quota =
            serde_json::from_str(r#"{"arena_bytes": 10, "calls_in_flight": 2}"#).unwrap();
        assert_eq!(q.limit(Resource::ArenaBytes), Some(10));
        assert_eq!(q.limit(Resource::CallsInFlight), Some(2));
        assert_eq!(q.limit(Resource::SpillBytes), None);
        assert!(serde_json::from_str::<Quota>(r#"{"bogus": 1}"#).is_err());
        assert_eq!(serde_json::to_string(&Quota::default()).unwrap(), "{}");
    }

    #[test]
    fn validate_refuses_numbers_json_cannot_carry() {
        let q = Quota {
            mem_mib: Some(u64::MAX),
            ..Quota::default()
        };
        assert!(q.validate().is_err());
        assert!(Quota::default().validate().is_ok());
    }

    proptest! {
        #[test]
        fn admit_refuses_exactly_what_passes_the_limit(
            limit in 0u64..1000, used in 0u64..1000, more in 0u64..1000
        ) {
            let q = Quota { arena_bytes: Some(limit), ..Quota::default() };
            let r = q.admit(Resource::ArenaBytes, used, more);
            prop_assert_eq!(r.is_err(), more > 0 && used + more > limit);
            prop_assert!(Quota::default().admit(Resource::ArenaBytes, used, more).is_ok());
        }
    }
}
