//! `client_frames`: what a dataworker reads from a local client (its `ClientHello`, then
//! `ClientFrame`s, on the Unix socket or through its mailbox) and what a client reads back
//! (`ServerFrame`s).
use crate::stream::{check_stream, select};
use shoal_protocol::{
    ClientFrame, ClientHello, ObjectId, Request, ServerFrame, MAX_CLIENT_HELLO, MAX_TENANT_LEN,
    MAX_TOKEN_LEN,
};

/// A dataworker's frame limit with the default 64 KiB inline limit (`Config::max_frame`).
const WORKER_MAX_FRAME: usize = (64 << 10) + (64 << 10);
/// What the SDK accepts from a worker: its frame limit plus room for a listing.
const CLIENT_MAX_FRAME: usize = WORKER_MAX_FRAME + (1 << 20);

/// The first byte picks the message type (hello, request, reply) and the read size; the rest
/// is the byte stream.
pub fn client_frames(data: &[u8]) {
    let Some((kind, read, stream)) = select(data, 3) else {
        return;
    };
    let read = usize::from(read) + 1;
    match kind {
        0 => {
            for h in check_stream::<ClientHello>(stream, MAX_CLIENT_HELLO, read) {
                check_hello(&h);
            }
        }
        1 => {
            for f in check_stream::<ClientFrame>(stream, WORKER_MAX_FRAME, read) {
                check_request(&f.req);
            }
        }
        _ => {
            check_stream::<ServerFrame>(stream, CLIENT_MAX_FRAME, read);
        }
    }
}

/// A hello the worker lets through is within the bounds it documents.
fn check_hello(h: &ClientHello) {
    if h.check().is_ok() {
        if let Some(t) = &h.token {
            assert!(t.len() <= MAX_TOKEN_LEN, "a {}-byte token passed", t.len());
        }
        if let Some(t) = &h.tenant {
            assert!(
                !t.is_empty() && t.len() <= MAX_TENANT_LEN,
                "a {}-byte tenant passed",
                t.len()
            );
        }
    }
}

/// Every id in a decoded request is a valid id: the same string parses again to the same id.
fn check_request(req: &Request) {
    let _ = (req.is_one_way(), req.writes());
    let ids: Vec<&ObjectId> = match req {
        Request::Create { id, .. }
        | Request::Seal { id }
        | Request::Abort { id }
        | Request::Put { id, .. }
        | Request::Delete { id } => vec![id],
        Request::KvSet { key, .. }
        | Request::KvCreate { key, .. }
        | Request::KvCommit { key, .. }
        | Request::KvRead { key, .. }
        | Request::KvExpire { key, .. }
        | Request::KvTtl { key } => vec![key],
        Request::Get { ids, .. } | Request::Contains { ids } => ids.iter().collect(),
        Request::KvGet { keys } | Request::KvDel { keys } | Request::KvExists { keys } => {
            keys.iter().collect()
        }
        Request::KvMSet { entries, .. } => entries.iter().map(|e| &e.key).collect(),
        Request::Release { .. } | Request::List { .. } | Request::Status => Vec::new(),
    };
    for id in ids {
        check_id(id);
    }
}

fn check_id(id: &ObjectId) {
    match ObjectId::parse_any(id.as_str()) {
        Ok(again) => assert_eq!(&again, id),
        Err(e) => panic!("a decoded id does not parse ({e}): {id:?}"),
    }
}
