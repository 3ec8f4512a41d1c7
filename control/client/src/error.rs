//! What can go wrong with a call, named after the step that failed.
use shoal_protocol::ErrorCode;
use std::time::Duration;

/// Why a call to control failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The base address is not a usable `http://host:port` URL.
    #[error("control address {base:?}: {reason}")]
    InvalidAddress {
        /// The address as given.
        base: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP client could not be built (TLS set-up).
    #[error("building the HTTP client: {0}")]
    Setup(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The token cannot be sent in an HTTP header (a control character, say). The token
    /// itself is not shown.
    #[error("the token is not usable in an HTTP header")]
    InvalidToken,
    /// The token could not be read from where it was named.
    #[error("reading the token from {path}: {source}")]
    TokenFile {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The runtime directory's token file is not private (a symlink, a file others may read,
    /// or another user's): it is not used. The token itself is not shown.
    #[error("not using the token in {path}: {source}")]
    UnsafeTokenFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why it is refused.
        #[source]
        source: shoal_pki::PrivateError,
    },
    /// The request body could not be encoded as JSON.
    #[error("encoding the request body: {0}")]
    Encode(#[source] serde_json::Error),
    /// Control refused the call: its stable code and message.
    #[error("{code}: {message}")]
    Api {
        /// The HTTP status of the answer.
        status: u16,
        /// What kind of failure; branch on this.
        code: ErrorCode,
        /// Control's explanation, for people.
        message: String,
    },
    /// No answer within the deadline.
    #[error("{method} {path}: control at {base} did not answer within {after:?}")]
    Timeout {
        /// Request method.
        method: &'static str,
        /// Request path.
        path: String,
        /// Control's address.
        base: String,
        /// The deadline.
        after: Duration,
    },
    /// The request could not be sent or its answer not read (connection refused or reset).
    #[error("{method} {path}: cannot reach control at {base}")]
    Transport {
        /// Request method.
        method: &'static str,
        /// Request path.
        path: String,
        /// Control's address.
        base: String,
        /// What the HTTP client said.
        #[source]
        source: reqwest::Error,
    },
    /// A failure status without control's JSON error body (a proxy in between, ...).
    #[error("{method} {path}: HTTP {status}: {body}")]
    Status {
        /// Request method.
        method: &'static str,
        /// Request path.
        path: String,
        /// The HTTP status.
        status: u16,
        /// The start of the body, lossily as text.
        body: String,
    },
    /// A success answer whose body is not what the route returns.
    #[error("{method} {path}: control's answer is not the expected JSON")]
    Decode {
        /// Request method.
        method: &'static str,
        /// Request path.
        path: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

impl ClientError {
    /// Control's error code, when control answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// The code named `name` (`ErrorCode::name`); `Unknown(0)` for a name this build does not
/// know.
pub(crate) fn code_named(name: &str) -> ErrorCode {
    (1..=u16::MAX)
        .map(ErrorCode::from_u16)
        .take_while(|c| !matches!(c, ErrorCode::Unknown(_)))
        .find(|c| c.name() == name)
        .unwrap_or(ErrorCode::Unknown(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_back_to_codes() {
        for c in [
            ErrorCode::NotFound,
            ErrorCode::AlreadyExists,
            ErrorCode::InvalidArgument,
            ErrorCode::TooLarge,
            ErrorCode::Unavailable,
            ErrorCode::InstanceFailed,
            ErrorCode::Unauthenticated,
            ErrorCode::PermissionDenied,
            ErrorCode::QuotaExceeded,
        ] {
            assert_eq!(code_named(c.name()), c);
        }
        assert_eq!(code_named("NoSuchCode"), ErrorCode::Unknown(0));
    }
}
