use shoal_protocol::{ErrorCode, IdError, WireError};

/// What went wrong; branch on [`Error::code`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The worker answered with an error.
    #[error("{0}")]
    Remote(#[from] WireError),
    /// The id or key is invalid.
    #[error("invalid id: {0}")]
    InvalidId(#[from] IdError),
    /// The socket failed.
    #[error("dataworker socket: {0}")]
    Io(#[from] std::io::Error),
    /// Mapping shared memory failed.
    #[error("shared memory: {0}")]
    Shm(String),
    /// The worker broke the protocol or closed the connection.
    #[error("protocol: {0}")]
    Protocol(String),
    /// No socket path was given and the environment variable is not set.
    #[error("no dataworker socket: pass one or set {0}")]
    NoSocket(&'static str),
}

impl Error {
    /// The stable code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Remote(w) => w.code,
            Error::InvalidId(_) => ErrorCode::InvalidId,
            Error::Io(_) | Error::NoSocket(_) => ErrorCode::Unavailable,
            Error::Shm(_) => ErrorCode::Internal,
            Error::Protocol(_) => ErrorCode::ProtocolError,
        }
    }

    pub(crate) fn protocol(msg: impl Into<String>) -> Self {
        Error::Protocol(msg.into())
    }
}

impl From<shoal_shm::ShmError> for Error {
    fn from(e: shoal_shm::ShmError) -> Self {
        Error::Shm(e.to_string())
    }
}

impl From<shoal_shm::CtlError> for Error {
    fn from(e: shoal_shm::CtlError) -> Self {
        Error::Shm(e.to_string())
    }
}
