//! The checks every target over shoal's framing (`[u32 len][u8 version][postcard body]`, the
//! dataworker, proxy and metadata sockets) shares: what a reader gets from a byte stream must
//! not depend on how the stream was cut into reads, and every message it gets must encode
//! back to bytes that decode to the same message (and encode identically again).
use bytes::BytesMut;
use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_protocol::{encode_frame, FrameDecoder, FRAME_HEADER_LEN};
use std::fmt::Debug;

/// Most frames one input may yield that are checked one by one (bounds the work per input).
const MAX_FRAMES: usize = 4096;

/// How a byte stream ended for the reader.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// No error; this many bytes wait for the rest of a frame.
    Pending(usize),
    /// The connection is closed with this error (its message: the variant and its numbers).
    Broken(String),
}

/// Frames a reader takes off `data`, fed in reads of `read` bytes (all at once when `None`).
fn drain<T: DeserializeOwned>(
    dec: &FrameDecoder,
    data: &[u8],
    read: Option<usize>,
) -> (Vec<T>, End) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let pieces: Box<dyn Iterator<Item = &[u8]>> = match read {
        Some(n) => Box::new(data.chunks(n.max(1))),
        None => Box::new(std::iter::once(data)),
    };
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode::<T>(&mut buf) {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(e) => return (out, End::Broken(e.to_string())),
            }
        }
    }
    (out, End::Pending(buf.len()))
}

/// Decodes `data` as a stream of `T` frames of at most `max_body` bytes, whole and in reads
/// of `read` bytes, and checks that both give the same frames and end the same way; then
/// that every frame round-trips. Returns the frames.
pub(crate) fn check_stream<T>(data: &[u8], max_body: usize, read: usize) -> Vec<T>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let dec = FrameDecoder::new(max_body);
    let (whole, end) = drain::<T>(&dec, data, None);
    let (pieces, end_pieces) = drain::<T>(&dec, data, Some(read));
    assert_eq!(
        whole, pieces,
        "frames depend on how the stream was read ({read}-byte reads)"
    );
    assert_eq!(
        end, end_pieces,
        "the stream ends differently in {read}-byte reads"
    );
    if let End::Pending(n) = end {
        // What stays buffered is the start of one frame that is not complete yet.
        assert!(
            n < FRAME_HEADER_LEN + max_body,
            "{n} bytes buffered for a frame of at most {max_body}"
        );
    }
    for m in whole.iter().take(MAX_FRAMES) {
        round_trip(m, max_body);
    }
    whole
}

/// `m` encodes to a frame that decodes to `m`, and encoding that again gives the same bytes.
pub(crate) fn round_trip<T>(m: &T, max_body: usize)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let mut wire = Vec::new();
    if let Err(e) = encode_frame(m, &mut wire) {
        panic!("a decoded message does not encode: {e}: {m:?}");
    }
    let body = wire.len() - FRAME_HEADER_LEN;
    assert!(
        body <= max_body,
        "a message decoded from a frame of at most {max_body} bytes re-encodes to {body}: {m:?}"
    );
    let dec = FrameDecoder::new(max_body);
    let mut buf = BytesMut::from(&wire[..]);
    let back = match dec.decode::<T>(&mut buf) {
        Ok(Some(back)) => back,
        other => panic!("an encoded message does not decode: {other:?}: {m:?}"),
    };
    assert!(buf.is_empty(), "bytes left after a re-encoded frame");
    assert_eq!(&back, m, "decode(encode(m)) != m");
    let mut again = Vec::new();
    if let Err(e) = encode_frame(&back, &mut again) {
        panic!("a round-tripped message does not encode: {e}");
    }
    assert_eq!(again, wire, "encoding is not stable across a round trip");
}

/// The first byte of an input, when a target reads it as a selector: `(byte % n, byte / n)`
/// and the rest of the input.
pub(crate) fn select(data: &[u8], n: u8) -> Option<(u8, u8, &[u8])> {
    let (&b, rest) = data.split_first()?;
    Some((b % n, b / n, rest))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde::{Deserialize, Deserializer, Serialize};

    fn frame<T: Serialize>(m: &T) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(m, &mut out).unwrap();
        out
    }

    #[test]
    fn a_clean_stream_passes_in_any_reads() {
        let mut wire = frame(&(7u32, "a".to_string()));
        wire.extend(frame(&(8u32, "bc".to_string())));
        wire.extend_from_slice(&[1, 0]); // the start of a third frame
        for read in [1, 2, 7, 100] {
            let got = check_stream::<(u32, String)>(&wire, 64, read);
            assert_eq!(got, vec![(7, "a".into()), (8, "bc".into())]);
        }
    }

    /// A message that changes each time it is decoded.
    #[derive(Debug, PartialEq, Serialize)]
    struct Drift(u8);

    impl<'de> Deserialize<'de> for Drift {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            Ok(Drift(u8::deserialize(d)?.wrapping_add(1)))
        }
    }

    #[test]
    #[should_panic(expected = "decode(encode(m)) != m")]
    fn a_codec_that_does_not_round_trip_is_caught() {
        check_stream::<Drift>(&frame(&1u8), 64, 1);
    }
}
