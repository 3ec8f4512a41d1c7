use serde::{Deserialize, Serialize};
use std::fmt;

/// Stable error codes carried across the wire. The numbers never change meaning; new codes are
/// only added. Unknown numbers decode as [`ErrorCode::Unknown`] so old clients keep working.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// No such object or key.
    NotFound,
    /// The operation did not complete before its deadline.
    Timeout,
    /// The arena has no room even after eviction.
    StoreFull,
    /// An id, key or name breaks the rule of its kind (empty, too long, not UTF-8, a
    /// character its kind does not allow; see `IdKind`).
    InvalidId,
    /// The caller is not allowed.
    PermissionDenied,
    /// An object with that id already exists.
    AlreadyExists,
    /// The object is already sealed.
    AlreadySealed,
    /// The object is not sealed yet (or not created by this client).
    NotSealed,
    /// An argument is out of range.
    InvalidArgument,
    /// Too many requests or clients; try again later.
    Overloaded,
    /// A bug or an unexpected OS failure on the server side.
    Internal,
    /// The peer broke the protocol.
    ProtocolError,
    /// A payload or frame is over its limit.
    TooLarge,
    /// The only copy of an object is gone.
    ObjectLost,
    /// The service is shutting down or unreachable.
    Unavailable,
    /// The function instance handling a call failed (crashed or disconnected) mid-call.
    InstanceFailed,
    /// The caller's tenant is at one of its quotas; nothing was changed.
    QuotaExceeded,
    /// No credential, or one that is unknown, revoked, expired or malformed.
    Unauthenticated,
    /// A code this build does not know.
    Unknown(u16),
}

impl ErrorCode {
    /// The stable number of this code.
    pub fn as_u16(self) -> u16 {
        match self {
            Self::NotFound => 1,
            Self::Timeout => 2,
            Self::StoreFull => 3,
            Self::InvalidId => 4,
            Self::PermissionDenied => 5,
            Self::AlreadyExists => 6,
            Self::AlreadySealed => 7,
            Self::NotSealed => 8,
            Self::InvalidArgument => 9,
            Self::Overloaded => 10,
            Self::Internal => 11,
            Self::ProtocolError => 12,
            Self::TooLarge => 13,
            Self::ObjectLost => 14,
            Self::Unavailable => 15,
            Self::InstanceFailed => 16,
            Self::QuotaExceeded => 17,
            Self::Unauthenticated => 18,
            Self::Unknown(n) => n,
        }
    }

    /// The code for a stable number.
    pub fn from_u16(n: u16) -> Self {
        match n {
            1 => Self::NotFound,
            2 => Self::Timeout,
            3 => Self::StoreFull,
            4 => Self::InvalidId,
            5 => Self::PermissionDenied,
            6 => Self::AlreadyExists,
            7 => Self::AlreadySealed,
            8 => Self::NotSealed,
            9 => Self::InvalidArgument,
            10 => Self::Overloaded,
            11 => Self::Internal,
            12 => Self::ProtocolError,
            13 => Self::TooLarge,
            14 => Self::ObjectLost,
            15 => Self::Unavailable,
            16 => Self::InstanceFailed,
            17 => Self::QuotaExceeded,
            18 => Self::Unauthenticated,
            n => Self::Unknown(n),
        }
    }

    /// A short stable name, e.g. `NotFound`.
    pub fn name(self) -> &'static str {
        match self {
            Self::NotFound => "NotFound",
            Self::Timeout => "Timeout",
            Self::StoreFull => "StoreFull",
            Self::InvalidId => "InvalidId",
            Self::PermissionDenied => "PermissionDenied",
            Self::AlreadyExists => "AlreadyExists",
            Self::AlreadySealed => "AlreadySealed",
            Self::NotSealed => "NotSealed",
            Self::InvalidArgument => "InvalidArgument",
            Self::Overloaded => "Overloaded",
            Self::Internal => "Internal",
            Self::ProtocolError => "ProtocolError",
            Self::TooLarge => "TooLarge",
            Self::ObjectLost => "ObjectLost",
            Self::Unavailable => "Unavailable",
            Self::InstanceFailed => "InstanceFailed",
            Self::QuotaExceeded => "QuotaExceeded",
            Self::Unauthenticated => "Unauthenticated",
            Self::Unknown(_) => "Unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(n) => write!(f, "Unknown({n})"),
            c => f.write_str(c.name()),
        }
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(self.as_u16())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self::from_u16(u16::deserialize(d)?))
    }
}

/// An error as it travels on the wire: a stable code and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct WireError {
    /// What kind of failure this is; clients branch on it.
    pub code: ErrorCode,
    /// Details for people; never parsed.
    pub message: String,
}

impl WireError {
    /// Builds an error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_stable() {
        for n in 0..40u16 {
            assert_eq!(ErrorCode::from_u16(n).as_u16(), n);
        }
        assert_eq!(ErrorCode::StoreFull.as_u16(), 3);
        assert_eq!(ErrorCode::QuotaExceeded.as_u16(), 17);
        assert_eq!(ErrorCode::Unauthenticated.as_u16(), 18);
        assert_eq!(ErrorCode::from_u16(999), ErrorCode::Unknown(999));
    }
}
