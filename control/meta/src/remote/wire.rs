//! The wire protocol between [`serve`](super::serve) and [`RemoteStore`](super::RemoteStore):
//! [`ClientMsg`] requests tagged with an id, [`ServerMsg`] replies and watch events carrying it,
//! and their codec on shoal's framing. Decoding never panics on garbage (property-tested below);
//! a server message too large for clients is replaced by an error reply or the end of its watch.
use super::MAX_REPLY_FRAME;
use crate::types::{KeyValue, LeaseId, MetaError, Revision, Txn, WatchEvent};
use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use shoal_protocol::{encode_frame, FrameDecoder, FrameError, FRAME_HEADER_LEN};
use std::time::Duration;

#[cfg(doc)]
use crate::types::MetaStore;

/// A request from a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientMsg {
    /// Matches the reply (and, for a watch, its events).
    pub id: u32,
    /// The call.
    pub req: Req,
}

/// The calls of [`MetaStore`], plus cancelling a watch.
// Each variant mirrors the `MetaStore` method or `MetaError` variant of its name.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Req {
    Get {
        key: String,
    },
    Range {
        prefix: String,
    },
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
    Txn(Txn),
    Grant {
        ttl: Duration,
    },
    KeepAlive {
        lease: LeaseId,
    },
    Revoke {
        lease: LeaseId,
    },
    Watch {
        prefix: String,
        after: Revision,
    },
    /// Stop the watch started by request `watch` (no reply).
    CancelWatch {
        watch: u32,
    },
}

/// Successful results.
// Each variant mirrors the `MetaStore` method or `MetaError` variant of its name.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resp {
    Get(Option<KeyValue>),
    Range(Vec<KeyValue>, Revision),
    Put(Revision),
    Delete(bool),
    Txn(bool),
    Grant(LeaseId),
    KeepAlive(Duration),
    Revoke,
    Watching,
}

/// [`MetaError`] on the wire.
// Each variant mirrors the `MetaStore` method or `MetaError` variant of its name.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireMetaError {
    Unavailable(String),
    LeaseNotFound(LeaseId),
    InvalidArgument(String),
    Compacted(Revision),
    Backend(String),
}

impl From<MetaError> for WireMetaError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::Unavailable(m) => Self::Unavailable(m),
            MetaError::LeaseNotFound(l) => Self::LeaseNotFound(l),
            MetaError::InvalidArgument(m) => Self::InvalidArgument(m),
            MetaError::Compacted(r) => Self::Compacted(r),
            MetaError::Backend(m) => Self::Backend(m),
        }
    }
}

impl From<WireMetaError> for MetaError {
    fn from(e: WireMetaError) -> Self {
        match e {
            WireMetaError::Unavailable(m) => Self::Unavailable(m),
            WireMetaError::LeaseNotFound(l) => Self::LeaseNotFound(l),
            WireMetaError::InvalidArgument(m) => Self::InvalidArgument(m),
            WireMetaError::Compacted(r) => Self::Compacted(r),
            WireMetaError::Backend(m) => Self::Backend(m),
        }
    }
}

/// A message from the server.
// Each variant mirrors the `MetaStore` method or `MetaError` variant of its name.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// The result of request `id`.
    Reply {
        id: u32,
        result: Result<Resp, WireMetaError>,
    },
    /// An event of the watch started by request `watch`.
    Event { watch: u32, event: WatchEvent },
    /// The watch started by request `watch` ended; no more events follow.
    WatchEnded { watch: u32 },
}

/// Takes one request off `buf` (what the server runs on every byte a client sends).
pub fn decode_request(
    dec: &FrameDecoder,
    buf: &mut BytesMut,
) -> Result<Option<ClientMsg>, FrameError> {
    dec.decode(buf)
}

/// Takes one server message off `buf` (what the client runs on every byte it receives).
pub fn decode_server_msg(
    dec: &FrameDecoder,
    buf: &mut BytesMut,
) -> Result<Option<ServerMsg>, FrameError> {
    dec.decode(buf)
}

/// Appends `msg` as a frame; a reply too large for clients becomes an error reply, an event
/// too large ends its watch (cannot happen within the key and value limits).
pub fn encode_server_msg(msg: &ServerMsg, buf: &mut Vec<u8>) {
    let start = buf.len();
    let fits = match encode_frame(msg, buf) {
        Ok(()) => buf.len() - start - FRAME_HEADER_LEN <= MAX_REPLY_FRAME,
        Err(_) => false,
    };
    if fits {
        return;
    }
    let size = buf.len() - start;
    buf.truncate(start);
    let substitute = match msg {
        ServerMsg::Reply { id, .. } => ServerMsg::Reply {
            id: *id,
            result: Err(WireMetaError::Backend(format!(
                "reply of {size} bytes exceeds the {MAX_REPLY_FRAME}-byte limit; read a narrower prefix"
            ))),
        },
        ServerMsg::Event { watch, .. } | ServerMsg::WatchEnded { watch } => {
            ServerMsg::WatchEnded { watch: *watch }
        }
    };
    if encode_frame(&substitute, buf).is_err() {
        buf.truncate(start);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::remote::MAX_REQUEST_FRAME;
    use proptest::prelude::*;

    proptest! {
        // Whatever a client sends, the server's decoder returns a message, asks for more or
        // errors; it never panics. Same for what a client decodes.
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let dec = FrameDecoder::new(1024);
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = decode_request(&dec, &mut buf) {}
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = decode_server_msg(&dec, &mut buf) {}
        }

        // A valid frame header around arbitrary bytes: still no panic.
        #[test]
        fn framed_garbage_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut wire = (body.len() as u32).to_le_bytes().to_vec();
            wire.push(shoal_protocol::PROTOCOL_VERSION);
            wire.extend_from_slice(&body);
            let dec = FrameDecoder::new(MAX_REQUEST_FRAME);
            let _ = decode_request(&dec, &mut BytesMut::from(&wire[..]));
            let _ = decode_server_msg(&dec, &mut BytesMut::from(&wire[..]));
        }

        #[test]
        fn requests_round_trip(id in any::<u32>(), key in "[a-z/]{1,20}", value in proptest::collection::vec(any::<u8>(), 0..64)) {
            let msg = ClientMsg { id, req: Req::Put { key, value, lease: Some(7) } };
            let mut wire = Vec::new();
            encode_frame(&msg, &mut wire).unwrap();
            let dec = FrameDecoder::new(MAX_REQUEST_FRAME);
            prop_assert_eq!(decode_request(&dec, &mut BytesMut::from(&wire[..])).unwrap(), Some(msg));
        }
    }
}
