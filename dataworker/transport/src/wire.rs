//! The framing on one bidirectional QUIC stream, and the close/reset codes.
//!
//! ```text
//! request  = [u32 LE len][postcard body]                       (then FIN)
//! response = [u32 LE len][postcard body][u64 LE body_len][body] (then FIN)
//! ```
//!
//! Invariants: a frame length is checked against `max_frame` before anything is allocated; a
//! frame that is too long, truncated or undecodable is a protocol violation of the whole
//! connection, which the reader closes.

use quinn::{ReadError, ReadExactError, RecvStream, VarInt};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Length of the frame header.
pub const FRAME_HEADER: usize = 4;
/// Length of the body length that follows a response frame.
pub(crate) const BODY_LEN: usize = 8;

/// Connection close codes (application).
pub(crate) mod close {
    use quinn::VarInt;
    /// The endpoint is closing.
    pub(crate) const NORMAL: VarInt = VarInt::from_u32(0);
    /// The peer sent a malformed or oversized frame.
    pub(crate) const PROTOCOL_VIOLATION: VarInt = VarInt::from_u32(1);
    /// The peer was disconnected locally (it left the cluster).
    pub(crate) const DISCONNECTED: VarInt = VarInt::from_u32(2);
    /// The server is shutting down.
    pub(crate) const SHUTDOWN: VarInt = VarInt::from_u32(3);
}

/// Stream reset / stop codes.
pub(crate) mod reset {
    use quinn::VarInt;
    /// The server shut down before the reply was complete.
    pub(crate) const SHUTDOWN: VarInt = VarInt::from_u32(1);
    /// The handler panicked or its reply could not be encoded.
    pub(crate) const INTERNAL: VarInt = VarInt::from_u32(2);
    /// The request frame did not arrive in time.
    pub(crate) const REQUEST_TIMEOUT: VarInt = VarInt::from_u32(3);
    /// The client no longer wants the reply (its sink failed).
    pub(crate) const CANCELLED: VarInt = VarInt::from_u32(4);
}

/// Why a frame could not be read.
#[derive(Debug)]
pub(crate) enum FrameError {
    /// The announced length exceeds the limit.
    TooLarge { len: u64, max: usize },
    /// The stream ended inside the frame.
    Truncated,
    /// The stream or connection failed.
    Read(ReadError),
}

impl FrameError {
    /// The reason sent in the CONNECTION_CLOSE frame and logged.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            FrameError::TooLarge { .. } => "frame too large",
            FrameError::Truncated => "truncated frame",
            FrameError::Read(_) => "read failed",
        }
    }
}

fn exact_err(e: ReadExactError) -> FrameError {
    match e {
        ReadExactError::FinishedEarly(_) => FrameError::Truncated,
        ReadExactError::ReadError(e) => FrameError::Read(e),
    }
}

/// Initial allocation for a frame; it grows as bytes arrive, so an announced length costs nothing
/// until the peer actually sends (and flow control bounds what it can send).
const FRAME_INITIAL_CAPACITY: usize = 16 << 10;

/// Reads one `[u32 LE len][body]` frame, refusing lengths above `max` before allocating.
pub(crate) async fn read_frame(recv: &mut RecvStream, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; FRAME_HEADER];
    recv.read_exact(&mut header).await.map_err(exact_err)?;
    let len = u32::from_le_bytes(header);
    let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
    if len_usize > max {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max,
        });
    }
    let mut buf = Vec::with_capacity(len_usize.min(FRAME_INITIAL_CAPACITY));
    while buf.len() < len_usize {
        match recv.read_chunk(len_usize - buf.len(), true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) => return Err(FrameError::Truncated),
            Err(e) => return Err(FrameError::Read(e)),
        }
    }
    Ok(buf)
}

/// Reads the `u64 LE` body length that follows a response frame.
pub(crate) async fn read_body_len(recv: &mut RecvStream) -> Result<u64, FrameError> {
    let mut buf = [0u8; BODY_LEN];
    recv.read_exact(&mut buf).await.map_err(exact_err)?;
    Ok(u64::from_le_bytes(buf))
}

/// Encodes `value` as a frame into a fresh buffer with `extra` spare bytes of capacity; `None` for
/// the length if the encoding exceeds `max`.
pub fn encode_frame<T: Serialize + ?Sized>(
    value: &T,
    max: usize,
    extra: usize,
) -> Result<Result<Vec<u8>, usize>, postcard::Error> {
    let mut buf = Vec::with_capacity(64 + extra);
    buf.extend_from_slice(&[0u8; FRAME_HEADER]);
    let mut buf = postcard::to_extend(value, buf)?;
    let len = buf.len() - FRAME_HEADER;
    match u32::try_from(len) {
        Ok(len32) if len <= max => {
            buf[..FRAME_HEADER].copy_from_slice(&len32.to_le_bytes());
            Ok(Ok(buf))
        }
        _ => Ok(Err(len)),
    }
}

/// Decodes a whole frame body; trailing bytes are an error.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<T, postcard::Error> {
    let (value, rest) = postcard::take_from_bytes(buf)?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(postcard::Error::DeserializeBadEncoding)
    }
}

/// A code as the `u64` reported in errors.
pub(crate) fn code(v: VarInt) -> u64 {
    v.into_inner()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn encode_decode_roundtrip_and_limits() {
        let buf = encode_frame(&("abc", 7u32), 1024, 0).unwrap().unwrap();
        assert_eq!(
            u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize,
            buf.len() - 4
        );
        let (s, n): (String, u32) = decode_frame(&buf[4..]).unwrap();
        assert_eq!((s.as_str(), n), ("abc", 7));
        assert_eq!(encode_frame(&vec![0u8; 100], 10, 0).unwrap(), Err(101));
        let mut trailing = buf[4..].to_vec();
        trailing.push(0);
        assert!(decode_frame::<(String, u32)>(&trailing).is_err());
    }
}
