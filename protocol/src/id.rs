use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 1024;

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
}

/// A validated object id or KV key: UTF-8, 1..=1024 bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectId(String);

impl ObjectId {
    /// Validates `s` as an id.
    pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        Self::check(&s)?;
        Ok(Self(s))
    }

    /// Validates raw bytes as an id.
    pub fn from_bytes(b: &[u8]) -> Result<Self, IdError> {
        let s = std::str::from_utf8(b).map_err(|_| IdError::NotUtf8)?;
        Self::new(s)
    }

    fn check(s: &str) -> Result<(), IdError> {
        match s.len() {
            0 => Err(IdError::Empty),
            n if n > MAX_ID_LEN => Err(IdError::TooLong(n)),
            _ => Ok(()),
        }
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for ObjectId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ObjectId::new(s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
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

    #[test]
    fn limits() {
        assert_eq!(ObjectId::new(""), Err(IdError::Empty));
        assert!(ObjectId::new("a").is_ok());
        assert!(ObjectId::new("é".repeat(512)).is_ok());
        assert_eq!(ObjectId::new("x".repeat(1025)), Err(IdError::TooLong(1025)));
        assert_eq!(ObjectId::from_bytes(&[0xff, 0xfe]), Err(IdError::NotUtf8));
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
    }
}
