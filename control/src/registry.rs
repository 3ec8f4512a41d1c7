//! The function registry: typed, validated function specs and pools, stored in the
//! [`MetaStore`] as JSON under `functions/<name>` and `pools/<name>`; instance records read
//! from `instances/<function>/<id>` (the agents write them).
//!
//! Invariants:
//! - Nothing reaches the store without passing [`FunctionSpec::validate`] /
//!   [`Pool::validate`] (`shoal_meta::records`, where every limit is a constant).
//! - A function's `version` is assigned here: 1 on create, +1 on every update. An update
//!   names the version it read and is applied only if the stored record is still that
//!   version, by a transaction on the key's mod revision (optimistic concurrency; no locks).
//! - Create is a transaction with `Compare::Absent`: two concurrent creates of one name
//!   cannot both succeed.
use serde::{Deserialize, Serialize};
use shoal_meta::records::{
    function_key, pool_key, validate_name, FunctionSpec, InstanceRecord, InvalidSpec, Pool,
    FUNCTIONS_PREFIX, INSTANCES_PREFIX, POOLS_PREFIX,
};
use shoal_meta::{Compare, MetaError, MetaStore, Txn, TxnOp};
use shoal_protocol::ErrorCode;
use std::sync::Arc;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A field breaks its constraints.
    #[error(transparent)]
    Invalid(#[from] InvalidSpec),
    /// No such function or pool.
    #[error("{kind} `{name}` not found")]
    NotFound {
        /// `function` or `pool`.
        kind: &'static str,
        /// Name.
        name: String,
    },
    /// A function or pool of that name exists already.
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
            RegistryError::Corrupt { .. } => ErrorCode::Internal,
            RegistryError::Meta(e) => e.code(),
        }
    }
}

/// The registry over a metadata store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Registry {
    meta: Arc<dyn MetaStore>,
}

fn invalid(field: &str, reason: impl Into<String>) -> RegistryError {
    RegistryError::Invalid(InvalidSpec {
        field: field.to_string(),
        reason: reason.into(),
    })
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
        Registry { meta }
    }

    /// Validates and stores a new function as version 1 (whatever `version` it carries).
    pub async fn create_function(
        &self,
        mut spec: FunctionSpec,
    ) -> Result<FunctionSpec, RegistryError> {
        spec.validate()?;
        spec.version = 1;
        let key = function_key(&spec.name);
        self.create(&key, encode(&spec)?, "function", &spec.name)
            .await?;
        Ok(spec)
    }

    /// One function.
    pub async fn get_function(&self, name: &str) -> Result<FunctionSpec, RegistryError> {
        validate_name("name", name)?;
        Ok(self.get_function_rev(name).await?.0)
    }

    async fn get_function_rev(&self, name: &str) -> Result<(FunctionSpec, i64), RegistryError> {
        let key = function_key(name);
        let kv = self
            .meta
            .get(&key)
            .await?
            .ok_or_else(|| RegistryError::NotFound {
                kind: "function",
                name: name.to_string(),
            })?;
        Ok((decode(&key, &kv.value)?, kv.mod_revision))
    }

    /// Every function, by name.
    pub async fn list_functions(&self) -> Result<Vec<FunctionSpec>, RegistryError> {
        self.list(FUNCTIONS_PREFIX).await
    }

    /// Replaces function `name` with `spec`, whose `version` must be the stored one; stores
    /// it with the version bumped and returns it.
    pub async fn update_function(
        &self,
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
        let (current, rev) = self.get_function_rev(name).await?;
        if current.version != spec.version {
            return Err(RegistryError::Conflict {
                name: name.to_string(),
                sent: spec.version,
                current: current.version,
            });
        }
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

    /// Deletes function `name`.
    pub async fn delete_function(&self, name: &str) -> Result<(), RegistryError> {
        validate_name("name", name)?;
        self.delete(&function_key(name), "function", name).await
    }

    /// Instances of function `name` (which must exist). Records that do not parse are skipped.
    pub async fn function_instances(
        &self,
        name: &str,
    ) -> Result<Vec<InstanceRecord>, RegistryError> {
        self.get_function(name).await?;
        self.instances(&format!("{INSTANCES_PREFIX}{name}/")).await
    }

    /// Every instance record. Records that do not parse are skipped.
    pub async fn all_instances(&self) -> Result<Vec<InstanceRecord>, RegistryError> {
        self.instances(INSTANCES_PREFIX).await
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
        validate_name("name", name)?;
        let key = pool_key(name);
        let kv = self
            .meta
            .get(&key)
            .await?
            .ok_or_else(|| RegistryError::NotFound {
                kind: "pool",
                name: name.to_string(),
            })?;
        decode(&key, &kv.value)
    }

    /// Every pool, by name.
    pub async fn list_pools(&self) -> Result<Vec<Pool>, RegistryError> {
        self.list(POOLS_PREFIX).await
    }

    /// Deletes pool `name`.
    pub async fn delete_pool(&self, name: &str) -> Result<(), RegistryError> {
        validate_name("name", name)?;
        self.delete(&pool_key(name), "pool", name).await
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

    async fn delete(&self, key: &str, kind: &'static str, name: &str) -> Result<(), RegistryError> {
        if self.meta.delete(key).await? {
            Ok(())
        } else {
            Err(RegistryError::NotFound {
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
