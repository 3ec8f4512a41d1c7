//! Framing: `[u32 little-endian body length][u8 version][postcard body]`.
//!
//! The decoder checks the length against a limit before buffering the body, so a peer cannot
//! make the other side allocate more than the limit; any malformed input is an error after
//! which the connection must be closed.
use bytes::{Buf, BytesMut};
use serde::{de::DeserializeOwned, Serialize};

/// The protocol version carried in every frame header.
pub const PROTOCOL_VERSION: u8 = 1;
/// Bytes before the body: length (4) + version (1).
pub const FRAME_HEADER_LEN: usize = 5;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The announced body is larger than the limit.
    #[error("frame of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Limit.
        limit: usize,
    },
    /// The version byte is not ours.
    #[error("unsupported protocol version {0}")]
    BadVersion(u8),
    /// The body did not decode.
    #[error("malformed frame body: {0}")]
    Malformed(#[from] postcard::Error),
    /// The body decoded but bytes were left over.
    #[error("{0} trailing bytes after the frame body")]
    Trailing(usize),
}

/// Appends one encoded frame to `out`.
pub fn encode_frame<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    let mut out_vec = std::mem::take(out);
    out_vec = postcard::to_extend(msg, out_vec)?;
    *out = out_vec;
    let body_len = out.len() - start - FRAME_HEADER_LEN;
    let len = u32::try_from(body_len).map_err(|_| FrameError::TooLarge {
        len: body_len,
        limit: u32::MAX as usize,
    })?;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4] = PROTOCOL_VERSION;
    Ok(())
}

/// Incremental decoder over a byte buffer that the caller fills from a socket.
#[derive(Debug)]
pub struct FrameDecoder {
    max_body: usize,
}

impl FrameDecoder {
    /// A decoder that refuses bodies longer than `max_body`.
    pub fn new(max_body: usize) -> Self {
        Self { max_body }
    }

    /// Bytes of body the decoder accepts at most.
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// Takes one frame off the front of `buf` if a whole one is there.
    ///
    /// `Ok(None)`: need more bytes. `Err`: the stream is broken; close the connection.
    pub fn decode<T: DeserializeOwned>(&self, buf: &mut BytesMut) -> Result<Option<T>, FrameError> {
        if buf.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > self.max_body {
            return Err(FrameError::TooLarge {
                len,
                limit: self.max_body,
            });
        }
        if buf[4] != PROTOCOL_VERSION {
            return Err(FrameError::BadVersion(buf[4]));
        }
        if buf.len() < FRAME_HEADER_LEN + len {
            buf.reserve(FRAME_HEADER_LEN + len - buf.len());
            return Ok(None);
        }
        buf.advance(FRAME_HEADER_LEN);
        let body = buf.split_to(len);
        let (msg, rest) = postcard::take_from_bytes::<T>(&body)?;
        if !rest.is_empty() {
            return Err(FrameError::Trailing(rest.len()));
        }
        Ok(Some(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClientFrame, ObjectId, Request, Response, ServerFrame};
    use proptest::prelude::*;

    fn sample() -> ClientFrame {
        ClientFrame {
            id: 7,
            req: Request::Put {
                id: ObjectId::new("a").unwrap(),
                data: vec![1, 2, 3],
            },
        }
    }

    #[test]
    fn round_trip_in_pieces() {
        let mut wire = Vec::new();
        encode_frame(&sample(), &mut wire).unwrap();
        encode_frame(&sample(), &mut wire).unwrap();
        let dec = FrameDecoder::new(1 << 20);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire {
            buf.extend_from_slice(&[b]);
            while let Some(f) = dec.decode::<ClientFrame>(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, vec![sample(), sample()]);
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_is_refused_before_buffering() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0x7f, PROTOCOL_VERSION][..]);
        let err = FrameDecoder::new(1024).decode::<ClientFrame>(&mut buf);
        assert!(matches!(err, Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn bad_version_and_trailing() {
        let mut wire = Vec::new();
        encode_frame(&sample(), &mut wire).unwrap();
        let mut bad = wire.clone();
        bad[4] = 99;
        let dec = FrameDecoder::new(1024);
        assert!(matches!(
            dec.decode::<ClientFrame>(&mut BytesMut::from(&bad[..])),
            Err(FrameError::BadVersion(99))
        ));
        // Same body with one extra byte inside the announced length.
        let mut trailing = wire.clone();
        trailing.push(0);
        let len = (trailing.len() - FRAME_HEADER_LEN) as u32;
        trailing[..4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            dec.decode::<ClientFrame>(&mut BytesMut::from(&trailing[..])),
            Err(FrameError::Trailing(1))
        ));
    }

    #[test]
    fn client_hello_round_trips_and_is_bounded() {
        let h = crate::ClientHello {
            token: Some("shoal_x".into()),
            tenant: None,
        };
        let mut wire = Vec::new();
        encode_frame(&h, &mut wire).unwrap();
        let dec = FrameDecoder::new(crate::MAX_CLIENT_HELLO);
        let got: crate::ClientHello = dec.decode(&mut BytesMut::from(&wire[..])).unwrap().unwrap();
        assert_eq!(got, h);
        assert!(got.check().is_ok());
        let long = crate::ClientHello {
            token: Some("x".repeat(crate::MAX_TOKEN_LEN + 1)),
            tenant: None,
        };
        assert_eq!(
            long.check().unwrap_err().code,
            crate::ErrorCode::Unauthenticated
        );
        let empty_tenant = crate::ClientHello {
            token: None,
            tenant: Some(String::new()),
        };
        assert!(empty_tenant.check().is_err());
    }

    #[test]
    fn invalid_id_inside_frame_is_malformed() {
        // An empty id is refused by ObjectId's Deserialize.
        let mut body = postcard::to_stdvec(&7u32).unwrap();
        body.extend(postcard::to_stdvec(&0u32).unwrap()); // variant Create
        body.extend(postcard::to_stdvec(&String::new()).unwrap());
        body.extend(postcard::to_stdvec(&1u64).unwrap());
        let mut wire = (body.len() as u32).to_le_bytes().to_vec();
        wire.push(PROTOCOL_VERSION);
        wire.extend(body);
        let r = FrameDecoder::new(1024).decode::<ClientFrame>(&mut BytesMut::from(&wire[..]));
        assert!(matches!(r, Err(FrameError::Malformed(_))));
    }

    proptest! {
        // Any byte string: the decoder returns a frame, asks for more, or errors; never panics,
        // and never holds more than the limit plus one header.
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let dec = FrameDecoder::new(2048);
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = dec.decode::<ClientFrame>(&mut buf) {}
            let mut buf = BytesMut::from(&data[..]);
            let _ = dec.decode::<ServerFrame>(&mut buf);
            let mut buf = BytesMut::from(&data[..]);
            if let Ok(Some(h)) = dec.decode::<crate::ClientHello>(&mut buf) {
                let _ = h.check();
            }
            // The node-to-node messages are postcard too: garbage is an error, not a panic.
            let _ = postcard::from_bytes::<crate::PeerRequest>(&data);
            let _ = postcard::from_bytes::<crate::PeerResponse>(&data);
        }

        // Valid frames with random payloads survive any split point.
        #[test]
        fn split_anywhere(data in proptest::collection::vec(any::<u8>(), 0..512), cut in 0usize..600) {
            let f = ServerFrame::Reply { id: 1, resp: Response::Bools(data.iter().map(|b| b % 2 == 0).collect()) };
            let mut wire = Vec::new();
            encode_frame(&f, &mut wire).unwrap();
            let cut = cut.min(wire.len());
            let dec = FrameDecoder::new(1 << 16);
            let mut buf = BytesMut::from(&wire[..cut]);
            let first = dec.decode::<ServerFrame>(&mut buf).unwrap();
            if cut < wire.len() {
                prop_assert!(first.is_none());
                buf.extend_from_slice(&wire[cut..]);
                prop_assert_eq!(dec.decode::<ServerFrame>(&mut buf).unwrap(), Some(f));
            } else {
                prop_assert_eq!(first, Some(f));
            }
        }
    }
}
