//! [`Data`], an argument or result as bytes or a zero-copy view of a dataworker object, and
//! the helpers that put payloads above the inline limit into objects and view them (waiting at
//! most `OBJECT_WAIT` for another node's object).
use crate::{Client, Error, View};
use shoal_protocol::{ErrorCode, WireError};
use std::time::Duration;

/// An argument or a result: bytes, or a zero-copy view of an object in the dataworker.
#[derive(Debug)]
pub enum Data {
    /// Bytes that travelled inline.
    Bytes(Vec<u8>),
    /// An object's bytes, mapped from shared memory.
    Object(View),
}

impl Data {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Data::Bytes(b) => b,
            Data::Object(v) => v.as_bytes(),
        }
    }

    /// The bytes, owned (copies an object's).
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            Data::Bytes(b) => b,
            Data::Object(v) => v.as_bytes().to_vec(),
        }
    }
}

impl std::ops::Deref for Data {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

/// Longest wait for a payload object to appear, past the call's own deadline.
pub(super) const OBJECT_WAIT: Duration = Duration::from_secs(10);

pub(super) fn too_large(what: &str, len: usize, limit: u64) -> Error {
    Error::Remote(WireError::new(
        ErrorCode::TooLarge,
        format!(
            "{what} of {len} bytes exceeds the inline limit of {limit}, and no dataworker \
             client was given to pass it as an object"
        ),
    ))
}

/// Stores `bytes` as a fresh object; its id.
pub(super) async fn put_object(
    store: &Client,
    bytes: &[u8],
) -> Result<shoal_protocol::ObjectId, Error> {
    let id = Client::generate_id();
    store.put(id.as_str(), bytes).await?;
    Ok(id)
}

/// The view of object `id`, waiting up to `wait` for it; the object is deleted once viewed
/// when `consume` (the view stays valid).
pub(super) async fn view_object(
    store: Option<&Client>,
    id: &shoal_protocol::ObjectId,
    wait: Duration,
    consume: bool,
) -> Result<View, Error> {
    let store = store.ok_or_else(|| {
        Error::Remote(WireError::new(
            ErrorCode::InvalidArgument,
            format!("payload is object {id}, and no dataworker client was given to read it"),
        ))
    })?;
    let view = store.get(id.as_str(), wait).await?;
    if consume {
        let _ = store.delete(id.as_str()).await;
    }
    Ok(view)
}
