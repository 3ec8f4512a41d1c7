//! `peer_messages`: what one dataworker reads from another over QUIC. Each request is one
//! stream, `[u32 LE len][postcard PeerRequest]`; each reply `[u32 LE len][postcard
//! PeerResponse][u64 LE body_len][body]`. The input is a run of such frames, as a node would
//! receive them one stream after the other from a hostile peer.
//!
//! Every frame body goes through the transport's decoder both as a request (the serving side)
//! and as a response (the calling side); what decodes must round-trip. Directory updates and
//! lookups are then applied, in order, to one pure `Directory` shard the way the peer service
//! applies them (`dataworker/src/cluster/directory.rs`), and its answers must stay coherent.
use shoal_protocol::{ObjectId, PeerRequest, PeerResponse};
use shoal_store::{DirRecord, Directory, DirectoryConfig, Locate};
use shoal_transport::fuzz_support::{decode_frame, encode_frame, FRAME_HEADER};
use std::collections::BTreeSet;

/// The transport's default frame limit (`TransportConfig::max_frame`).
const MAX_FRAME: usize = 1 << 20;
/// Most frames of one input applied to the directory (bounds the work per input).
const MAX_FRAMES: usize = 256;
/// Milliseconds between two frames: the directory's clock advances as they arrive.
const TICK_MS: u64 = 7_000;

/// Feeds `data` as consecutive peer frames; stops where a real reader would close the
/// connection (an oversized or truncated frame).
pub fn peer_messages(data: &[u8]) {
    let mut dir = Directory::new(DirectoryConfig {
        tombstone_ms: 60_000,
        max_tombstones: 64,
    });
    let mut seen = BTreeSet::new();
    let mut rest = data;
    let mut now = 0u64;
    for _ in 0..MAX_FRAMES {
        let Some((header, tail)) = rest.split_first_chunk::<FRAME_HEADER>() else {
            break;
        };
        let len = u32::from_le_bytes(*header) as usize;
        if len > MAX_FRAME || tail.len() < len {
            break;
        }
        let (body, tail) = tail.split_at(len);
        rest = tail;
        now += TICK_MS;
        if let Ok(resp) = decode_frame::<PeerResponse>(body) {
            round_trip(&resp);
        }
        let Ok(req) = decode_frame::<PeerRequest>(body) else {
            continue;
        };
        round_trip(&req);
        apply(&mut dir, req, now, &mut seen);
        check(&dir, now, &seen);
    }
}

/// What the peer service does with a request, on its directory shard.
fn apply(dir: &mut Directory, req: PeerRequest, now: u64, seen: &mut BTreeSet<ObjectId>) {
    match req {
        PeerRequest::Register {
            node,
            incarnation,
            objects,
        } => {
            for o in objects {
                seen.insert(o.id.clone());
                let _ = dir.register(
                    &node,
                    incarnation,
                    DirRecord {
                        id: o.id,
                        size: o.size,
                        primary: o.primary,
                    },
                    now,
                );
            }
        }
        PeerRequest::Unregister { node, ids } => {
            for id in &ids {
                dir.unregister(&node, id);
            }
        }
        PeerRequest::Locate { id, .. } => {
            let _ = dir.locate(&id, now);
        }
        PeerRequest::Delete { id } => {
            dir.delete(&id, now);
            assert_eq!(
                dir.locate(&id, now),
                Locate::Unknown,
                "a deleted id is still found"
            );
        }
        // Served from the local store, not the directory.
        PeerRequest::DropCopies { .. } | PeerRequest::Fetch { .. } => {}
    }
    dir.expire(now);
}

/// Every id the directory answers for: its holders are named once each, primary first.
fn check(dir: &Directory, now: u64, seen: &BTreeSet<ObjectId>) {
    let mut found = 0;
    for id in seen {
        if let Locate::Found { holders, .. } = dir.locate(id, now) {
            found += 1;
            assert!(!holders.is_empty(), "{id:?} found with no holder");
            let unique: BTreeSet<&String> = holders.iter().collect();
            assert_eq!(unique.len(), holders.len(), "{id:?}: a holder twice");
        }
    }
    assert_eq!(
        found,
        dir.len(),
        "the directory knows ids nobody registered"
    );
}

/// The message encodes to a frame that decodes to it, and encodes the same way again.
fn round_trip<T>(m: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let wire = match encode_frame(m, MAX_FRAME, 0) {
        Ok(Ok(wire)) => wire,
        Ok(Err(len)) => panic!("a decoded message re-encodes to {len} bytes: {m:?}"),
        Err(e) => panic!("a decoded message does not encode ({e}): {m:?}"),
    };
    let back: T = match decode_frame(&wire[FRAME_HEADER..]) {
        Ok(back) => back,
        Err(e) => panic!("an encoded message does not decode ({e}): {m:?}"),
    };
    assert_eq!(&back, m, "decode(encode(m)) != m");
    assert!(
        matches!(encode_frame(&back, MAX_FRAME, 0), Ok(Ok(again)) if again == wire),
        "encoding is not stable across a round trip"
    );
}
