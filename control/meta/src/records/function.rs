//! Function specs and pools: the documents operators declare, and the checks every one passes
//! before it is stored ([`FunctionSpec::validate`], [`Pool::validate`]). Every limit is a
//! constant of this module. Pure: no IO.
use serde::{Deserialize, Serialize};
use shoal_protocol::IdKind;
use std::collections::BTreeMap;

/// Longest function or pool name (the protocol's rule).
pub const MAX_NAME_LEN: usize = shoal_protocol::MAX_NAME_LEN;
/// Most CPU a function instance may ask for, in thousandths of a core.
pub const MAX_CPU_MILLI: u32 = 64_000;
/// Most memory a function instance may ask for, in MiB.
pub const MAX_MEM_MIB: u32 = 262_144;
/// Most instances of one function.
pub const MAX_INSTANCES: u32 = 1000;
/// Most concurrent requests one instance may be given.
pub const MAX_CONCURRENCY: u32 = 10_000;
/// Most arguments in `command`, entries in `env`, `labels` or `node_selector`, or names in
/// `affinity` / `anti_affinity`.
pub const MAX_ENTRIES: usize = 256;
/// Longest string in a spec (a path, URL, argument, key or value), in bytes.
pub const MAX_STRING_LEN: usize = 4096;
/// Most CPU a pool may hold, in thousandths of a core.
pub const MAX_POOL_CPU_MILLI: u64 = 100_000_000;
/// Most memory a pool may hold, in MiB.
pub const MAX_POOL_MEM_MIB: u64 = 1 << 32;

/// Where a function's code comes from (JSON: `{"kind": "dir", "path": ...}` and so on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CodeSource {
    /// A directory on every node.
    Dir {
        /// Path of the directory.
        path: String,
    },
    /// A `.tar.gz` archive on every node.
    TarGz {
        /// Path of the archive.
        path: String,
    },
    /// An object in shoal's own store (`shoal://<id>`).
    Object {
        /// Object id.
        id: String,
    },
    /// An object in S3 (`s3://bucket/key`).
    S3 {
        /// URL, starting with `s3://`.
        url: String,
    },
}

impl std::fmt::Display for CodeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CodeSource::Dir { path } => write!(f, "dir:{path}"),
            CodeSource::TarGz { path } => write!(f, "tar.gz:{path}"),
            CodeSource::Object { id } => write!(f, "shoal://{id}"),
            CodeSource::S3 { url } => f.write_str(url),
        }
    }
}

/// What one instance of a function needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU in thousandths of a core, `1..=64000`.
    pub cpu_milli: u32,
    /// Memory in MiB, `1..=262144`.
    pub mem_mib: u32,
}

fn default_max_instances() -> u32 {
    1
}

fn default_concurrency() -> u32 {
    1
}

/// A function as operators declare it (JSON). Fields are public because this is a wire
/// document; the registry accepts it only after [`FunctionSpec::validate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionSpec {
    /// `1..=63` characters of `[a-z0-9-]`, starting with a letter.
    pub name: String,
    /// The tenant the function, its instances and their data belong to. Empty in a request:
    /// the caller's own tenant, which the registry fills in (only the operator may name
    /// another); never empty in a stored record (read as [`DEFAULT_TENANT`](super::DEFAULT_TENANT)
    /// if it were).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tenant: String,
    /// Assigned by the registry: 1 on create, bumped on every update. An update must carry
    /// the version it read.
    #[serde(default)]
    pub version: u64,
    /// Where the code comes from.
    pub code: CodeSource,
    /// Expected digest of the code, `sha256:` and 64 lowercase hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Program and arguments (non-empty).
    pub command: Vec<String>,
    /// Environment of the instances.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// What one instance needs.
    pub resources: Resources,
    /// Instances kept running even when idle (default 0).
    #[serde(default)]
    pub min_instances: u32,
    /// Most instances (`min_instances..=1000`, default 1).
    #[serde(default = "default_max_instances")]
    pub max_instances: u32,
    /// Concurrent requests per instance (`1..=10000`, default 1).
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// Free-form labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Instances run only on nodes having all these labels.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Functions whose instances this one's must share a node with (required, not preferred).
    #[serde(default)]
    pub affinity: Vec<String>,
    /// Functions whose instances this one's must never share a node with (required).
    #[serde(default)]
    pub anti_affinity: Vec<String>,
    /// The resource pool the instances run in (its nodes only, within its capacity); none:
    /// the shared nodes, those in no pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

/// A named share of the cluster: the nodes matching `node_selector`, and how much of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    /// Same rules as a function name.
    pub name: String,
    /// Nodes having all these labels belong to the pool.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// CPU the pool holds, in thousandths of a core (`1..=100000000`).
    pub cpu_milli: u64,
    /// Memory the pool holds, in MiB (`1..=4294967296`).
    pub mem_mib: u64,
}

/// A spec field that breaks its constraints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{field}`: {reason}")]
pub struct InvalidSpec {
    /// Dotted path of the field (`resources.cpu_milli`, `env[\"X\"]`, ...).
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> InvalidSpec {
    InvalidSpec {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Checks a function or pool name with the protocol's rule ([`IdKind::Function`]:
/// `1..=63` characters of `[a-z0-9-]`, starting with a letter). `field` names it in the error.
pub fn validate_name(field: &str, name: &str) -> Result<(), InvalidSpec> {
    validate_id(IdKind::Function, field, name)
}

/// Checks `value` against the protocol's rule for `kind` (one rule per kind of name, shared by
/// every component; see `shoal_protocol::IdKind`). `field` names it in the error.
pub fn validate_id(kind: IdKind, field: &str, value: &str) -> Result<(), InvalidSpec> {
    kind.check(value)
        .map_err(|e| invalid(field, e.problem().to_string()))
}

fn check_string(field: &str, s: &str, allow_empty: bool) -> Result<(), InvalidSpec> {
    if !allow_empty && s.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if s.len() > MAX_STRING_LEN {
        return Err(invalid(
            field,
            format!("is {} bytes, over the limit of {MAX_STRING_LEN}", s.len()),
        ));
    }
    if s.contains('\0') {
        return Err(invalid(field, "must not contain NUL"));
    }
    Ok(())
}

fn check_count(field: &str, n: usize) -> Result<(), InvalidSpec> {
    if n > MAX_ENTRIES {
        return Err(invalid(
            field,
            format!("has {n} entries, over the limit of {MAX_ENTRIES}"),
        ));
    }
    Ok(())
}

fn check_map(field: &str, m: &BTreeMap<String, String>) -> Result<(), InvalidSpec> {
    check_count(field, m.len())?;
    for (k, v) in m {
        check_string(&format!("{field}[{k:?}]"), k, false)?;
        check_string(&format!("{field}[{k:?}]"), v, true)?;
    }
    Ok(())
}

fn check_range<T: PartialOrd + std::fmt::Display>(
    field: &str,
    v: T,
    lo: T,
    hi: T,
) -> Result<(), InvalidSpec> {
    if v < lo || v > hi {
        return Err(invalid(field, format!("{v} is not in {lo}..={hi}")));
    }
    Ok(())
}

impl CodeSource {
    fn validate(&self) -> Result<(), InvalidSpec> {
        match self {
            CodeSource::Dir { path } | CodeSource::TarGz { path } => {
                check_string("code.path", path, false)
            }
            CodeSource::Object { id } => shoal_protocol::ObjectId::new(id.as_str())
                .map(|_| ())
                .map_err(|e| invalid("code.id", e.to_string())),
            CodeSource::S3 { url } => {
                check_string("code.url", url, false)?;
                match url.strip_prefix("s3://") {
                    Some(rest) if !rest.is_empty() && !rest.starts_with('/') => Ok(()),
                    _ => Err(invalid("code.url", "must be s3://bucket/key")),
                }
            }
        }
    }
}

impl FunctionSpec {
    /// The tenant it belongs to ([`DEFAULT_TENANT`](super::DEFAULT_TENANT) when unset).
    pub fn tenant(&self) -> &str {
        if self.tenant.is_empty() {
            super::DEFAULT_TENANT
        } else {
            &self.tenant
        }
    }

    /// Checks every field; the error names the first one that is wrong.
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        validate_name("name", &self.name)?;
        if !self.tenant.is_empty() {
            super::validate_tenant(&self.tenant)?;
        }
        self.code.validate()?;
        if let Some(d) = &self.digest {
            let ok = d.strip_prefix("sha256:").is_some_and(|h| {
                h.len() == 64
                    && h.bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            });
            if !ok {
                return Err(invalid(
                    "digest",
                    "must be sha256: and 64 lowercase hex digits",
                ));
            }
        }
        if self.command.is_empty() {
            return Err(invalid("command", "must not be empty"));
        }
        check_count("command", self.command.len())?;
        for (i, a) in self.command.iter().enumerate() {
            check_string(&format!("command[{i}]"), a, i != 0)?;
        }
        check_map("env", &self.env)?;
        for k in self.env.keys() {
            if k.contains('=') {
                return Err(invalid(format!("env[{k:?}]"), "name must not contain '='"));
            }
        }
        check_range(
            "resources.cpu_milli",
            self.resources.cpu_milli,
            1,
            MAX_CPU_MILLI,
        )?;
        check_range("resources.mem_mib", self.resources.mem_mib, 1, MAX_MEM_MIB)?;
        check_range("max_instances", self.max_instances, 1, MAX_INSTANCES)?;
        if self.min_instances > self.max_instances {
            return Err(invalid(
                "min_instances",
                format!(
                    "{} is above max_instances {}",
                    self.min_instances, self.max_instances
                ),
            ));
        }
        check_range("concurrency", self.concurrency, 1, MAX_CONCURRENCY)?;
        check_map("labels", &self.labels)?;
        check_map("node_selector", &self.node_selector)?;
        for (field, names) in [
            ("affinity", &self.affinity),
            ("anti_affinity", &self.anti_affinity),
        ] {
            check_count(field, names.len())?;
            for (i, n) in names.iter().enumerate() {
                validate_name(&format!("{field}[{i}]"), n)?;
            }
        }
        if let Some(p) = &self.pool {
            validate_id(IdKind::Pool, "pool", p)?;
        }
        Ok(())
    }
}

impl Pool {
    /// Checks every field; the error names the first one that is wrong.
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        validate_id(IdKind::Pool, "name", &self.name)?;
        check_map("node_selector", &self.node_selector)?;
        check_range("cpu_milli", self.cpu_milli, 1, MAX_POOL_CPU_MILLI)?;
        check_range("mem_mib", self.mem_mib, 1, MAX_POOL_MEM_MIB)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FunctionSpec {
        serde_json::from_value(serde_json::json!({
            "name": "hello",
            "code": {"kind": "dir", "path": "/srv/hello"},
            "command": ["python3", "main.py"],
            "resources": {"cpu_milli": 500, "mem_mib": 256},
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn field_of(r: Result<(), InvalidSpec>) -> String {
        match r {
            Err(InvalidSpec { field, .. }) => field,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn defaults_and_valid() {
        let s = spec();
        assert_eq!((s.min_instances, s.max_instances, s.concurrency), (0, 1, 1));
        assert!(s.validate().is_ok());
    }

    #[test]
    fn names() {
        for ok in ["a", "a-1", "abc-def-9"] {
            assert!(validate_name("name", ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in ["", "1a", "-a", "A", "a_b", "a.b", "é", long.as_str()] {
            assert!(validate_name("name", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_field_is_named() {
        let mut s = spec();
        s.resources.cpu_milli = 0;
        assert_eq!(field_of(s.validate()), "resources.cpu_milli");
        let mut s = spec();
        s.resources.mem_mib = MAX_MEM_MIB + 1;
        assert_eq!(field_of(s.validate()), "resources.mem_mib");
        let mut s = spec();
        s.command.clear();
        assert_eq!(field_of(s.validate()), "command");
        let mut s = spec();
        s.min_instances = 2;
        assert_eq!(field_of(s.validate()), "min_instances");
        let mut s = spec();
        s.max_instances = MAX_INSTANCES + 1;
        assert_eq!(field_of(s.validate()), "max_instances");
        let mut s = spec();
        s.concurrency = 0;
        assert_eq!(field_of(s.validate()), "concurrency");
        let mut s = spec();
        s.digest = Some("sha256:xyz".into());
        assert_eq!(field_of(s.validate()), "digest");
        s.digest = Some(format!("sha256:{}", "ab".repeat(32)));
        assert!(s.validate().is_ok());
        let mut s = spec();
        s.code = CodeSource::S3 {
            url: "http://x".into(),
        };
        assert_eq!(field_of(s.validate()), "code.url");
        let mut s = spec();
        s.code = CodeSource::Object { id: String::new() };
        assert_eq!(field_of(s.validate()), "code.id");
        let mut s = spec();
        s.anti_affinity = vec!["ok".into(), "Bad".into()];
        assert_eq!(field_of(s.validate()), "anti_affinity[1]");
        let mut s = spec();
        s.env.insert("A=B".into(), "x".into());
        assert_eq!(field_of(s.validate()), "env[\"A=B\"]");
    }

    #[test]
    fn code_source_forms() {
        let o = CodeSource::Object { id: "abc".into() };
        assert_eq!(o.to_string(), "shoal://abc");
        let j = serde_json::to_value(CodeSource::TarGz {
            path: "/a.tgz".into(),
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(j, serde_json::json!({"kind": "tar_gz", "path": "/a.tgz"}));
    }

    #[test]
    fn pools() {
        let p = Pool {
            name: "gpu".into(),
            node_selector: BTreeMap::new(),
            cpu_milli: 0,
            mem_mib: 1,
        };
        assert_eq!(field_of(p.validate()), "cpu_milli");
    }
}
