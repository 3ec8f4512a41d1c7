//! Object ids and KV keys, and how they are namespaced by tenant.
//!
//! A client names an object with a plain id: UTF-8, 1..=[`MAX_ID_LEN`] bytes, no NUL. The
//! dataworker keeps every tenant's names apart by *qualifying* them: tenant `T`'s id `X` is
//! stored (and travels between dataworkers) as `T\0X`, except for the [`DEFAULT_TENANT`],
//! whose ids stay as they are, so the local user's names (and their fast path) are unchanged.
//! A qualified id is an [`ObjectId`] too; [`ObjectId::tenant`] and [`ObjectId::local`] take it
//! apart. Clients never send qualified ids: the worker refuses an id with a NUL as
//! `InvalidId` ([`ObjectId::is_qualified`]).
use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest id accepted, in bytes (the part a client writes, without a tenant prefix).
pub const MAX_ID_LEN: usize = 1024;
/// Longest tenant name inside a qualified id (the rule of tenant names: 1..=63 of
/// `a-z`, `0-9`, `-`).
pub const MAX_TENANT_LEN: usize = 63;
/// The tenant whose ids are stored unqualified: the local user's (same as
/// `shoal_meta::records::DEFAULT_TENANT`).
pub const DEFAULT_TENANT: &str = "default";
/// Separates the tenant from the id in a qualified id.
pub const TENANT_SEPARATOR: char = '\0';

/// Why a string is not a valid object id or KV key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The id is empty.
    #[error("id is empty")]
    Empty,
    /// The id is longer than [`MAX_ID_LEN`] bytes.
    #[error("id is {0} bytes, longer than the limit of {MAX_ID_LEN}")]
    TooLong(usize),
    /// The id is not UTF-8.
    #[error("id is not valid UTF-8")]
    NotUtf8,
    /// The id holds a NUL byte (reserved: it separates a tenant from its ids).
    #[error("id contains a NUL byte")]
    Nul,
    /// A qualified id whose tenant part is not a tenant name.
    #[error("the tenant part of a qualified id is not a tenant name")]
    BadTenant,
}

/// A validated object id or KV key: UTF-8, 1..=1024 bytes, no NUL; or such an id qualified
/// by a tenant (see the module docs).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectId(String);

/// Whether `t` has the shape of a tenant name (the full rule lives with the token records;
/// this is what the wire needs: non-empty, short, no separator).
fn tenant_shape(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= MAX_TENANT_LEN
        && t.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl ObjectId {
    /// Validates `s` as a plain (client) id.
    pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        Self::check(&s)?;
        Ok(Self(s))
    }

    /// Validates raw bytes as a plain id.
    pub fn from_bytes(b: &[u8]) -> Result<Self, IdError> {
        let s = std::str::from_utf8(b).map_err(|_| IdError::NotUtf8)?;
        Self::new(s)
    }

    fn check(s: &str) -> Result<(), IdError> {
        match s.len() {
            0 => Err(IdError::Empty),
            n if n > MAX_ID_LEN => Err(IdError::TooLong(n)),
            _ if s.as_bytes().contains(&0) => Err(IdError::Nul),
            _ => Ok(()),
        }
    }

    /// Validates a plain or a qualified id (what travels between dataworkers).
    pub fn parse_any(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        match s.split_once(TENANT_SEPARATOR) {
            None => Self::check(&s)?,
            Some((tenant, local)) => {
                if !tenant_shape(tenant) || tenant == DEFAULT_TENANT {
                    return Err(IdError::BadTenant);
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
    use proptest::prelude::*;

    #[test]
    fn limits() {
        assert_eq!(ObjectId::new(""), Err(IdError::Empty));
        assert!(ObjectId::new("a").is_ok());
        assert!(ObjectId::new("é".repeat(512)).is_ok());
        assert_eq!(ObjectId::new("x".repeat(1025)), Err(IdError::TooLong(1025)));
        assert_eq!(ObjectId::from_bytes(&[0xff, 0xfe]), Err(IdError::NotUtf8));
        assert_eq!(ObjectId::new("a\0b"), Err(IdError::Nul));
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
        for bad in ["\0x", "Team\0x", "default\0x", "t\0", "t\0a\0b", "a\0b\0"] {
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
            x in "[^\u{0}]{1,20}", y in "[^\u{0}]{1,20}",
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
