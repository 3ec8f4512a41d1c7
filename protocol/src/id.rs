//! Object ids and KV keys, and how they are namespaced by tenant.
//!
//! A client names an object with a plain id: UTF-8, 1..=[`MAX_ID_LEN`] bytes, no NUL and no
//! control character (the rule of [`IdKind::Object`], see [`crate::names`]). The
//! dataworker keeps every tenant's names apart by *qualifying* them: tenant `T`'s id `X` is
//! stored (and travels between dataworkers) as `T\0X`, except for the [`DEFAULT_TENANT`],
//! whose ids stay as they are, so the local user's names (and their fast path) are unchanged.
//! A qualified id is an [`ObjectId`] too; [`ObjectId::tenant`] and [`ObjectId::local`] take it
//! apart. Clients never send qualified ids: the worker refuses an id with a NUL as
//! `InvalidId` ([`ObjectId::is_qualified`]).
#[cfg(doc)]
use crate::names::MAX_ID_LEN;
use crate::names::{IdError, IdKind, IdProblem};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The tenant whose ids are stored unqualified: the local user's (same as
/// `shoal_meta::records::DEFAULT_TENANT`).
pub const DEFAULT_TENANT: &str = "default";
/// Separates the tenant from the id in a qualified id.
pub const TENANT_SEPARATOR: char = '\0';

/// A validated object id or KV key (the rule of [`IdKind::Object`]: UTF-8, 1..=1024 bytes,
/// no NUL, no control character); or such an id qualified by a tenant (see the module docs).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectId(String);

impl ObjectId {
    /// Validates `s` as a plain (client) id.
    pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        Self::check(&s)?;
        Ok(Self(s))
    }

    /// Validates raw bytes as a plain id.
    pub fn from_bytes(b: &[u8]) -> Result<Self, IdError> {
        let s = IdKind::Object.check_bytes(b)?;
        Ok(Self(s.to_owned()))
    }

    fn check(s: &str) -> Result<(), IdError> {
        IdKind::Object.check(s)
    }

    /// Validates a plain or a qualified id (what travels between dataworkers).
    pub fn parse_any(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        match s.split_once(TENANT_SEPARATOR) {
            None => Self::check(&s)?,
            Some((tenant, local)) => {
                if IdKind::Tenant.check(tenant).is_err() || tenant == DEFAULT_TENANT {
                    return Err(IdError::new(IdKind::Object, IdProblem::BadTenant));
                }
                Self::check(local)?;
            }
        }
        Ok(Self(s))
    }

    /// This id in `tenant`'s namespace: unchanged for the [`DEFAULT_TENANT`], `tenant\0id`
    /// otherwise. `self` must be a plain id and `tenant` a tenant name (the worker checks
    /// both before it qualifies).
    pub fn qualified(self, tenant: &str) -> ObjectId {
        if tenant == DEFAULT_TENANT {
            return self;
        }
        let mut s = String::with_capacity(tenant.len() + 1 + self.0.len());
        s.push_str(tenant);
        s.push(TENANT_SEPARATOR);
        s.push_str(&self.0);
        ObjectId(s)
    }

    /// Whether this id carries a tenant prefix (holds a NUL).
    pub fn is_qualified(&self) -> bool {
        self.0.as_bytes().contains(&0)
    }

    /// The tenant this id belongs to ([`DEFAULT_TENANT`] for a plain id).
    pub fn tenant(&self) -> &str {
        split_qualified(&self.0).0
    }

    /// The id as its tenant wrote it (without the prefix).
    pub fn local(&self) -> &str {
        split_qualified(&self.0).1
    }

    /// The id without its tenant prefix, as an id of its own.
    pub fn into_local(self) -> ObjectId {
        match self.0.find(TENANT_SEPARATOR) {
            Some(i) => ObjectId(self.0[i + 1..].to_owned()),
            None => self,
        }
    }

    /// The id as a string slice (qualified ids include their prefix and NUL).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Splits a qualified name (or a qualified prefix) into tenant and local part; a name
/// without a separator belongs to the [`DEFAULT_TENANT`].
pub fn split_qualified(s: &str) -> (&str, &str) {
    match s.split_once(TENANT_SEPARATOR) {
        Some((t, l)) => (t, l),
        None => (DEFAULT_TENANT, s),
    }
}

/// The bytes that start every qualified name of `tenant`: empty for the
/// [`DEFAULT_TENANT`], `tenant\0` otherwise. A client looks `prefix ++ id` up in the shared
/// index.
pub fn tenant_prefix(tenant: &str) -> Vec<u8> {
    if tenant == DEFAULT_TENANT {
        return Vec::new();
    }
    let mut p = tenant.as_bytes().to_vec();
    p.push(0);
    p
}

impl<'de> Deserialize<'de> for ObjectId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ObjectId::parse_any(s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for ObjectId {
    /// A plain id as is; a qualified one as `tenant:id` (no NUL in logs and messages).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.split_once(TENANT_SEPARATOR) {
            Some((t, l)) => write!(f, "{t}:{l}"),
            None => f.write_str(&self.0),
        }
    }
}

impl std::str::FromStr for ObjectId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::MAX_ID_LEN;
    use proptest::prelude::*;

    fn problem(r: Result<ObjectId, IdError>) -> IdProblem {
        r.unwrap_err().problem().clone()
    }

    #[test]
    fn limits() {
        assert_eq!(problem(ObjectId::new("")), IdProblem::Empty);
        assert!(ObjectId::new("a").is_ok());
        assert!(ObjectId::new("é".repeat(512)).is_ok());
        assert!(ObjectId::new("a/../b c").is_ok(), "ids are not paths");
        assert_eq!(
            problem(ObjectId::new("x".repeat(1025))),
            IdProblem::TooLong {
                len: 1025,
                max: MAX_ID_LEN
            }
        );
        assert_eq!(
            problem(ObjectId::from_bytes(&[0xff, 0xfe])),
            IdProblem::NotUtf8
        );
        assert_eq!(problem(ObjectId::new("a\0b")), IdProblem::Nul);
        assert_eq!(
            problem(ObjectId::new("a\r\nb")),
            IdProblem::Control { at: 1 }
        );
        assert_eq!(
            problem(ObjectId::from_bytes(b"a\x1b[2J")),
            IdProblem::Control { at: 1 }
        );
    }

    #[test]
    fn deserialize_validates() {
        let bytes = postcard::to_stdvec(&String::new()).unwrap();
        assert!(postcard::from_bytes::<ObjectId>(&bytes).is_err());
        let bytes = postcard::to_stdvec(&"ok".to_string()).unwrap();
        assert_eq!(
            postcard::from_bytes::<ObjectId>(&bytes).unwrap().as_str(),
            "ok"
        );
        for bad in [
            "\0x",
            "Team\0x",
            "default\0x",
            "t\0",
            "t\0a\0b",
            "a\0b\0",
            "1t\0x",
            "t\0a\nb",
        ] {
            let bytes = postcard::to_stdvec(&bad.to_string()).unwrap();
            assert!(postcard::from_bytes::<ObjectId>(&bytes).is_err(), "{bad:?}");
        }
        let bytes = postcard::to_stdvec(&"team-a\0x".to_string()).unwrap();
        let q = postcard::from_bytes::<ObjectId>(&bytes).unwrap();
        assert!(q.is_qualified());
        assert_eq!((q.tenant(), q.local()), ("team-a", "x"));
    }

    #[test]
    fn qualifying() {
        let id = ObjectId::new("x").unwrap();
        assert_eq!(
            id.clone().qualified(DEFAULT_TENANT),
            id,
            "default is unchanged"
        );
        let q = id.clone().qualified("team-b");
        assert_eq!(q.as_str(), "team-b\0x");
        assert_eq!(q.to_string(), "team-b:x");
        assert_eq!(q.tenant(), "team-b");
        assert_eq!(q.local(), "x");
        assert_eq!(q.clone().into_local(), id);
        assert_eq!(id.tenant(), DEFAULT_TENANT);
        assert_eq!(tenant_prefix("team-b"), b"team-b\0");
        assert!(tenant_prefix(DEFAULT_TENANT).is_empty());
        assert_eq!(split_qualified("team-b\0pre"), ("team-b", "pre"));
        assert_eq!(split_qualified("pre"), (DEFAULT_TENANT, "pre"));
    }

    proptest! {
        /// Qualifying never lets two tenants' names meet, and taking a qualified id apart
        /// gives back what went in.
        #[test]
        fn tenants_never_collide(
            a in "[a-z][a-z0-9-]{0,10}", b in "[a-z][a-z0-9-]{0,10}",
            x in "[^\\x00-\\x1f\\x7f]{1,20}", y in "[^\\x00-\\x1f\\x7f]{1,20}",
        ) {
            let (ix, iy) = (ObjectId::new(x.clone()).unwrap(), ObjectId::new(y.clone()).unwrap());
            let (qa, qb) = (ix.clone().qualified(&a), iy.clone().qualified(&b));
            prop_assert_eq!(qa == qb, a == b && x == y);
            prop_assert_eq!(qa.tenant(), a.as_str());
            prop_assert_eq!(qa.local(), x.as_str());
            prop_assert_eq!(ObjectId::parse_any(qa.as_str().to_owned()).unwrap(), qa.clone());
            let mut wire = tenant_prefix(&a);
            wire.extend_from_slice(x.as_bytes());
            prop_assert_eq!(wire.as_slice(), qa.as_str().as_bytes());
        }
    }
}
