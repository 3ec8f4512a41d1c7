//! The function registry: typed, validated function specs and pools, stored in the
//! [`MetaStore`] as JSON under `functions/<name>` and `pools/<name>`; instance records read
//! from `instances/<function>/<id>` (the agents write them); tenant quotas under
//! `quotas/<tenant>`.
//!
//! Invariants:
//! - Every name from a path or a body passes the protocol's rule of its kind
//!   (`shoal_protocol::IdKind`, through `shoal_meta::records`) before it becomes part of a
//!   key.
//! - Nothing reaches the store without passing [`FunctionSpec::validate`] /
//!   [`Pool::validate`] / [`Quota::validate`] (`shoal_meta::records`, where every limit is a
//!   constant).
//! - Every function belongs to a tenant, never empty in a stored record: a spec that names
//!   none gets its creator's ([`home_tenant`]); only the operator (the system tenant's admin)
//!   may name another. A function never changes tenant.
//! - A caller sees only its own tenant's functions and their instances; another tenant's
//!   function answers exactly as an absent one ([`RegistryError::NotFound`], same message).
//!   The operator sees every tenant.
//! - Function names are cluster-unique (the key is `functions/<name>`): creating a name that
//!   another tenant holds answers [`RegistryError::AlreadyExists`] (409), which says the name
//!   is taken and nothing else about the function.
//! - A tenant's functions, counted at their `max_instances`, stay within its quota's
//!   `instances`, `cpu_milli` and `mem_mib`: a create or update that would cross one is
//!   refused with [`RegistryError::Quota`] before anything is written. The check and the
//!   write run under one lock per registry, so concurrent writes through one control (the
//!   leader serves every write) cannot both squeeze under a limit. An update that does not
//!   grow a resource is never refused for it, even when a lowered quota is already passed.
//! - A function's `version` is assigned here: 1 on create, +1 on every update. An update
//!   names the version it read and is applied only if the stored record is still that
//!   version, by a transaction on the key's mod revision (optimistic concurrency; no locks).
//!   A delete is applied to the record whose tenant was checked, by the same kind of
//!   transaction.
//! - Create is a transaction with `Compare::Absent`: two concurrent creates of one name
//!   cannot both succeed.
use serde::{Deserialize, Serialize};
use shoal_meta::records::{
    function_key, pool_key, quota_key, validate_id, validate_name, validate_tenant, FunctionSpec,
    InstanceRecord, InvalidSpec, Pool, Principal, Quota, QuotaExceeded, Resource, DEFAULT_TENANT,
    FUNCTIONS_PREFIX, INSTANCES_PREFIX, POOLS_PREFIX,
};
use shoal_meta::{Compare, MetaError, MetaStore, Txn, TxnOp};
use shoal_protocol::{ErrorCode, IdKind};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A field breaks its constraints.
    #[error(transparent)]
    Invalid(#[from] InvalidSpec),
    /// No such function or pool (or one of another tenant: the same answer).
    #[error("{kind} `{name}` not found")]
    NotFound {
        /// `function`, `pool` or `tenant`.
        kind: &'static str,
        /// Name.
        name: String,
    },
    /// A function or pool of that name exists already (in any tenant: names are
    /// cluster-unique).
    #[error("{kind} `{name}` already exists")]
    AlreadyExists {
        /// `function` or `pool`.
        kind: &'static str,
        /// Name.
        name: String,
    },
    /// The update was based on a version that is no longer current.
    #[error("version conflict on function `{name}`: the update is based on version {sent}, the current version is {current}; read it again and retry")]
    Conflict {
        /// Name.
        name: String,
        /// The version the update named.
        sent: u64,
        /// The stored version (0: it changed or vanished while updating).
        current: u64,
    },
    /// The caller may not do this (a tenant it does not belong to).
    #[error("permission denied: {0}")]
    Forbidden(String),
    /// The write would take the tenant past its quota; nothing was written.
    #[error("tenant `{tenant}`: {source}")]
    Quota {
        /// The tenant.
        tenant: String,
        /// Which limit.
        #[source]
        source: QuotaExceeded,
    },
    /// A stored record does not parse (written by another build, or damaged).
    #[error("stored record `{key}` does not parse: {source}")]
    Corrupt {
        /// Key.
        key: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The metadata store failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
}

impl RegistryError {
    /// The stable wire code. A version conflict is `AlreadyExists` (a newer version exists);
    /// its message starts with "version conflict".
    pub fn code(&self) -> ErrorCode {
        match self {
            RegistryError::Invalid(_) => ErrorCode::InvalidArgument,
            RegistryError::NotFound { .. } => ErrorCode::NotFound,
            RegistryError::AlreadyExists { .. } | RegistryError::Conflict { .. } => {
                ErrorCode::AlreadyExists
            }
            RegistryError::Forbidden(_) => ErrorCode::PermissionDenied,
            RegistryError::Quota { .. } => ErrorCode::QuotaExceeded,
            RegistryError::Corrupt { .. } => ErrorCode::Internal,
            RegistryError::Meta(e) => e.code(),
        }
    }
}

/// What a tenant's functions take, counted at each function's `max_instances` (what a quota's
/// `instances`, `cpu_milli` and `mem_mib` limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantUsage {
    /// Sum of `max_instances`.
    pub instances: u64,
    /// Sum of `max_instances × resources.cpu_milli`.
    pub cpu_milli: u64,
    /// Sum of `max_instances × resources.mem_mib`.
    pub mem_mib: u64,
}

impl TenantUsage {
    /// What one function takes.
    pub fn of(spec: &FunctionSpec) -> TenantUsage {
        let n = u64::from(spec.max_instances);
        TenantUsage {
            instances: n,
            cpu_milli: n.saturating_mul(u64::from(spec.resources.cpu_milli)),
            mem_mib: n.saturating_mul(u64::from(spec.resources.mem_mib)),
        }
    }

    fn add(&mut self, o: TenantUsage) {
        self.instances = self.instances.saturating_add(o.instances);
        self.cpu_milli = self.cpu_milli.saturating_add(o.cpu_milli);
        self.mem_mib = self.mem_mib.saturating_add(o.mem_mib);
    }

    fn get(&self, r: Resource) -> u64 {
        match r {
            Resource::Instances => self.instances,
            Resource::CpuMilli => self.cpu_milli,
            Resource::MemMib => self.mem_mib,
            _ => 0,
        }
    }
}

/// The resources control enforces (the others are enforced by the dataworker and the proxy).
const FUNCTION_RESOURCES: [Resource; 3] =
    [Resource::Instances, Resource::CpuMilli, Resource::MemMib];

/// A tenant's quota and what it uses now (`GET /v1/tenants/{tenant}/quota`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaStatus {
    /// The tenant.
    pub tenant: String,
    /// Its limits (none set: unlimited).
    pub quota: Quota,
    /// What its functions take.
    pub usage: TenantUsage,
}

/// Whether `who` sees what belongs to `tenant`: the operator sees every tenant, everyone else
/// only their own.
pub fn sees(who: &Principal, tenant: &str) -> bool {
    who.is_system_admin() || who.tenant == tenant
}

/// Where `who`'s things go when a request names no tenant: its own tenant, except for the
/// operator, whose functions go to [`DEFAULT_TENANT`] (the local user's tenant).
pub fn home_tenant(who: &Principal) -> &str {
    if who.is_system_admin() {
        DEFAULT_TENANT
    } else {
        &who.tenant
    }
}

/// The registry over a metadata store. Cheap to clone (clones share the quota lock).
#[derive(Debug, Clone)]
pub struct Registry {
    meta: Arc<dyn MetaStore>,
    /// Held from a quota check to the write it admits.
    quota_lock: Arc<tokio::sync::Mutex<()>>,
}

fn invalid(field: &str, reason: impl Into<String>) -> RegistryError {
    RegistryError::Invalid(InvalidSpec {
        field: field.to_string(),
        reason: reason.into(),
    })
}

fn not_found(kind: &'static str, name: &str) -> RegistryError {
    RegistryError::NotFound {
        kind,
        name: name.to_string(),
    }
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, RegistryError> {
    serde_json::to_vec(v).map_err(|e| RegistryError::Meta(MetaError::Backend(e.to_string())))
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, value: &[u8]) -> Result<T, RegistryError> {
    serde_json::from_slice(value).map_err(|source| RegistryError::Corrupt {
        key: key.to_string(),
        source,
    })
}

impl Registry {
    /// A registry over `meta`.
    pub fn new(meta: Arc<dyn MetaStore>) -> Registry {
        Registry {
            meta,
            quota_lock: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Validates and stores a new function as version 1 (whatever `version` it carries), in
    /// the tenant it names or, naming none, in `who`'s [`home_tenant`]. Only the operator
    /// may name another tenant than its own. A name held by any tenant answers
    /// [`RegistryError::AlreadyExists`] (names are cluster-unique; the answer reveals
    /// nothing but that the name is taken).
    pub async fn create_function(
        &self,
        who: &Principal,
        mut spec: FunctionSpec,
    ) -> Result<FunctionSpec, RegistryError> {
        spec.validate()?;
        if spec.tenant.is_empty() {
            spec.tenant = home_tenant(who).to_string();
        } else if !sees(who, &spec.tenant) {
            return Err(RegistryError::Forbidden(format!(
                "a token of tenant `{}` may not create functions in tenant `{}`",
                who.tenant, spec.tenant
            )));
        }
        spec.version = 1;
        let key = function_key(&spec.name);
        let _admitted = self.quota_lock.lock().await;
        self.admit(&spec.tenant, None, &spec).await?;
        self.create(&key, encode(&spec)?, "function", &spec.name)
            .await?;
        Ok(spec)
    }

    /// One function, if `who` sees its tenant (else [`RegistryError::NotFound`], as if it
    /// did not exist).
    pub async fn get_function(
        &self,
        who: &Principal,
        name: &str,
    ) -> Result<FunctionSpec, RegistryError> {
        validate_name("name", name)?;
        Ok(self.visible_function(who, name).await?.0)
    }

    /// The function and its mod revision, or `NotFound` when absent or of a tenant `who`
    /// does not see.
    async fn visible_function(
        &self,
        who: &Principal,
        name: &str,
    ) -> Result<(FunctionSpec, i64), RegistryError> {
        let key = function_key(name);
        let kv = self
            .meta
            .get(&key)
            .await?
            .ok_or_else(|| not_found("function", name))?;
        let spec: FunctionSpec = decode(&key, &kv.value)?;
        if !sees(who, spec.tenant()) {
            return Err(not_found("function", name));
        }
        Ok((spec, kv.mod_revision))
    }

    /// The functions `who` sees, by name; only those of `tenant` when given.
    pub async fn list_functions(
        &self,
        who: &Principal,
        tenant: Option<&str>,
    ) -> Result<Vec<FunctionSpec>, RegistryError> {
        let all: Vec<FunctionSpec> = self.list(FUNCTIONS_PREFIX).await?;
        Ok(all
            .into_iter()
            .filter(|f| sees(who, f.tenant()) && tenant.is_none_or(|t| f.tenant() == t))
            .collect())
    }

    /// Replaces function `name` with `spec`, whose `version` must be the stored one; stores
    /// it with the version bumped and returns it. The tenant stays the stored one (a spec
    /// naming another is refused).
    pub async fn update_function(
        &self,
        who: &Principal,
        name: &str,
        mut spec: FunctionSpec,
    ) -> Result<FunctionSpec, RegistryError> {
        validate_name("name", name)?;
        if spec.name != name {
            return Err(invalid(
                "name",
                format!("`{}` differs from the name in the path `{name}`", spec.name),
            ));
        }
        spec.validate()?;
        if spec.version == 0 {
            return Err(invalid(
                "version",
                "an update must carry the version it is based on",
            ));
        }
        let _admitted = self.quota_lock.lock().await;
        let (current, rev) = self.visible_function(who, name).await?;
        if spec.tenant.is_empty() {
            spec.tenant = current.tenant().to_string();
        } else if spec.tenant != current.tenant() {
            return Err(invalid(
                "tenant",
                "a function cannot move to another tenant (delete it and create it there)",
            ));
        }
        if current.version != spec.version {
            return Err(RegistryError::Conflict {
                name: name.to_string(),
                sent: spec.version,
                current: current.version,
            });
        }
        self.admit(&spec.tenant, Some(&current), &spec).await?;
        let sent = spec.version;
        spec.version = current.version.saturating_add(1);
        let key = function_key(name);
        let txn = Txn {
            compare: vec![Compare::ModRevision(key.clone(), rev)],
            success: vec![TxnOp::Put {
                key,
                value: encode(&spec)?,
                lease: None,
            }],
            failure: vec![],
        };
        if !self.meta.txn(txn).await? {
            return Err(RegistryError::Conflict {
                name: name.to_string(),
                sent,
                current: 0,
            });
        }
        Ok(spec)
    }

    /// Deletes function `name` (`NotFound` when absent or of a tenant `who` does not see).
    pub async fn delete_function(&self, who: &Principal, name: &str) -> Result<(), RegistryError> {
        validate_name("name", name)?;
        let (_, rev) = self.visible_function(who, name).await?;
        let key = function_key(name);
        let txn = Txn {
            compare: vec![Compare::ModRevision(key.clone(), rev)],
            success: vec![TxnOp::Delete { key }],
            failure: vec![],
        };
        if self.meta.txn(txn).await? {
            Ok(())
        } else {
            // It changed (or went) since it was read: as if it were not there.
            Err(not_found("function", name))
        }
    }

    /// Instances of function `name` (which must exist and be visible to `who`). Records
    /// that do not parse are skipped.
    pub async fn function_instances(
        &self,
        who: &Principal,
        name: &str,
    ) -> Result<Vec<InstanceRecord>, RegistryError> {
        self.get_function(who, name).await?;
        self.instances(&format!("{INSTANCES_PREFIX}{name}/")).await
    }

    /// The instance records `who` sees (those of its tenant's functions; the operator sees
    /// all, those of removed functions included), only those of `tenant` when given.
    /// Records that do not parse are skipped.
    pub async fn all_instances(
        &self,
        who: &Principal,
        tenant: Option<&str>,
    ) -> Result<Vec<InstanceRecord>, RegistryError> {
        let all = self.instances(INSTANCES_PREFIX).await?;
        if who.is_system_admin() && tenant.is_none() {
            return Ok(all);
        }
        let functions: Vec<FunctionSpec> = self.list(FUNCTIONS_PREFIX).await?;
        let tenant_of: BTreeMap<&str, &str> = functions
            .iter()
            .map(|f| (f.name.as_str(), f.tenant()))
            .collect();
        Ok(all
            .into_iter()
            .filter(|i| {
                tenant_of
                    .get(i.function.as_str())
                    .is_some_and(|t| sees(who, t) && tenant.is_none_or(|want| *t == want))
            })
            .collect())
    }

    /// Validates and stores a new pool.
    pub async fn create_pool(&self, pool: Pool) -> Result<Pool, RegistryError> {
        pool.validate()?;
        self.create(&pool_key(&pool.name), encode(&pool)?, "pool", &pool.name)
            .await?;
        Ok(pool)
    }

    /// One pool.
    pub async fn get_pool(&self, name: &str) -> Result<Pool, RegistryError> {
        validate_id(IdKind::Pool, "name", name)?;
        let key = pool_key(name);
        let kv = self
            .meta
            .get(&key)
            .await?
            .ok_or_else(|| not_found("pool", name))?;
        decode(&key, &kv.value)
    }

    /// Every pool, by name.
    pub async fn list_pools(&self) -> Result<Vec<Pool>, RegistryError> {
        self.list(POOLS_PREFIX).await
    }

    /// Deletes pool `name`.
    pub async fn delete_pool(&self, name: &str) -> Result<(), RegistryError> {
        validate_id(IdKind::Pool, "name", name)?;
        if self.meta.delete(&pool_key(name)).await? {
            Ok(())
        } else {
            Err(not_found("pool", name))
        }
    }

    /// `tenant`'s quota (unlimited when none is set).
    pub async fn quota(&self, tenant: &str) -> Result<Quota, RegistryError> {
        let key = quota_key(tenant);
        match self.meta.get(&key).await? {
            Some(kv) => decode(&key, &kv.value),
            None => Ok(Quota::default()),
        }
    }

    /// What `tenant`'s functions take now.
    pub async fn usage(&self, tenant: &str) -> Result<TenantUsage, RegistryError> {
        let functions: Vec<FunctionSpec> = self.list(FUNCTIONS_PREFIX).await?;
        let mut used = TenantUsage::default();
        for f in functions.iter().filter(|f| f.tenant() == tenant) {
            used.add(TenantUsage::of(f));
        }
        Ok(used)
    }

    /// `tenant`'s quota and use, if `who` sees the tenant (else `NotFound`).
    pub async fn quota_status(
        &self,
        who: &Principal,
        tenant: &str,
    ) -> Result<QuotaStatus, RegistryError> {
        validate_tenant(tenant)?;
        if !sees(who, tenant) {
            return Err(not_found("tenant", tenant));
        }
        Ok(QuotaStatus {
            tenant: tenant.to_string(),
            quota: self.quota(tenant).await?,
            usage: self.usage(tenant).await?,
        })
    }

    /// Validates and stores `tenant`'s quota (replacing any; an empty one removes every
    /// limit). Functions already over a lowered limit keep running; only growing them is
    /// refused. Authorization is the caller's: only the operator may set quotas.
    pub async fn set_quota(&self, tenant: &str, quota: Quota) -> Result<Quota, RegistryError> {
        validate_tenant(tenant)?;
        quota.validate()?;
        self.meta
            .put(&quota_key(tenant), encode(&quota)?, None)
            .await?;
        Ok(quota)
    }

    /// Refuses a write that would take `tenant` past a limit: `new` replacing `old` (absent
    /// for a create). Only a resource that grows is checked.
    async fn admit(
        &self,
        tenant: &str,
        old: Option<&FunctionSpec>,
        new: &FunctionSpec,
    ) -> Result<(), RegistryError> {
        let quota = self.quota(tenant).await?;
        if FUNCTION_RESOURCES.iter().all(|r| quota.limit(*r).is_none()) {
            return Ok(());
        }
        let used = self.usage(tenant).await?;
        let before = old.map(TenantUsage::of).unwrap_or_default();
        let after = TenantUsage::of(new);
        for r in FUNCTION_RESOURCES {
            let (b, a) = (before.get(r), after.get(r));
            if a > b {
                quota
                    .admit(r, used.get(r), a - b)
                    .map_err(|source| RegistryError::Quota {
                        tenant: tenant.to_string(),
                        source,
                    })?;
            }
        }
        Ok(())
    }

    async fn create(
        &self,
        key: &str,
        value: Vec<u8>,
        kind: &'static str,
        name: &str,
    ) -> Result<(), RegistryError> {
        if self.meta.txn(Txn::create(key, value)).await? {
            Ok(())
        } else {
            Err(RegistryError::AlreadyExists {
                kind,
                name: name.to_string(),
            })
        }
    }

    async fn list<T: for<'de> Deserialize<'de>>(
        &self,
        prefix: &str,
    ) -> Result<Vec<T>, RegistryError> {
        let (kvs, _) = self.meta.range(prefix).await?;
        kvs.iter().map(|kv| decode(&kv.key, &kv.value)).collect()
    }

    async fn instances(&self, prefix: &str) -> Result<Vec<InstanceRecord>, RegistryError> {
        let (kvs, _) = self.meta.range(prefix).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| match serde_json::from_slice(&kv.value) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "skipping unreadable instance record");
                    None
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_meta::records::Role;
    use shoal_meta::MemStore;

    fn spec(name: &str, max_instances: u32) -> FunctionSpec {
        serde_json::from_value(serde_json::json!({
            "name": name,
            "code": {"kind": "dir", "path": "/srv"},
            "command": ["./run"],
            "resources": {"cpu_milli": 100, "mem_mib": 64},
            "max_instances": max_instances,
        }))
        .unwrap()
    }

    /// Concurrent creates cannot squeeze past a limit together: the check and the write run
    /// under one lock.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_creates_stay_within_the_quota() {
        let reg = Registry::new(Arc::new(MemStore::open(None, "").unwrap()));
        let who = Principal::new("team-a", Role::Deployer);
        let quota = Quota {
            instances: Some(3),
            ..Quota::default()
        };
        reg.set_quota("team-a", quota).await.unwrap();
        let tries: Vec<_> = (0..12)
            .map(|i| {
                let (reg, who) = (reg.clone(), who.clone());
                tokio::spawn(
                    async move { reg.create_function(&who, spec(&format!("f{i}"), 1)).await },
                )
            })
            .collect();
        let mut admitted = 0;
        for t in tries {
            match t.await.unwrap() {
                Ok(_) => admitted += 1,
                Err(e) => assert_eq!(e.code(), ErrorCode::QuotaExceeded, "{e}"),
            }
        }
        assert_eq!(admitted, 3);
        assert_eq!(reg.usage("team-a").await.unwrap().instances, 3);
        // Other tenants are not counted, nor limited by it.
        let other = Principal::new("team-b", Role::Deployer);
        reg.create_function(&other, spec("g", 50)).await.unwrap();
        assert_eq!(reg.usage("team-a").await.unwrap().instances, 3);
    }

    #[test]
    fn the_operator_deploys_to_default_and_sees_every_tenant() {
        let op = Principal::system_admin();
        let a = Principal::new("team-a", Role::Admin);
        assert_eq!(home_tenant(&op), DEFAULT_TENANT);
        assert_eq!(home_tenant(&a), "team-a");
        assert!(sees(&op, "team-a") && sees(&a, "team-a"));
        assert!(!sees(&a, "team-b") && !sees(&a, DEFAULT_TENANT));
    }
}
