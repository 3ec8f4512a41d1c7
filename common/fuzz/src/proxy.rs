//! `proxy_frames`: what a node's proxy reads from callers, function instances and other
//! proxies (`CallerFrame`s), and what they read from it (`ProxyFrame`s).
use crate::stream::{check_stream, select};
use shoal_protocol::{CallerFrame, ObjectId, Payload, ProxyFrame};

/// The proxy's default frame limit (`ProxyConfig::max_frame`), which the SDK's call client
/// also applies with the default inline limit.
const PROXY_MAX_FRAME: usize = 1 << 20;

/// The first byte picks the direction and the read size; the rest is the byte stream.
pub fn proxy_frames(data: &[u8]) {
    let Some((kind, read, stream)) = select(data, 2) else {
        return;
    };
    let read = usize::from(read) + 1;
    if kind == 0 {
        for f in check_stream::<CallerFrame>(stream, PROXY_MAX_FRAME, read) {
            match &f {
                CallerFrame::Call { args, .. } => check_payload(args),
                CallerFrame::Result { result: Ok(p), .. } => check_payload(p),
                _ => {}
            }
        }
    } else {
        for f in check_stream::<ProxyFrame>(stream, PROXY_MAX_FRAME, read) {
            match &f {
                ProxyFrame::Invoke { args, .. } => check_payload(args),
                ProxyFrame::Reply { result: Ok(p), .. } => check_payload(p),
                _ => {}
            }
        }
    }
}

/// An object payload names a valid id.
fn check_payload(p: &Payload) {
    if let Payload::Object(id) = p {
        match ObjectId::parse_any(id.as_str()) {
            Ok(again) => assert_eq!(&again, id),
            Err(e) => panic!("a decoded payload id does not parse ({e}): {id:?}"),
        }
    }
}
