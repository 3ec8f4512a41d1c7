//! The metadata store's two doors for outside bytes:
//!
//! - `meta_protocol`: control's metadata API (`control/meta/src/remote`). What a node sends
//!   is decoded as the server decodes it, and every call in it is run, in order, against a
//!   real in-memory `MemStore` by the server's own dispatcher; each reply goes through the
//!   server's encoder and the client's decoder and must come out unchanged. Afterwards the
//!   store must hold only what its limits allow. What a server sends is decoded as the client
//!   decodes it.
//! - `meta_file`: the embedded store's file, opened with `MemStore::open` (one call, whatever
//!   the file format is); a store that opened must answer reads and take a write.
use crate::stream::{check_stream, select};
use bytes::BytesMut;
use shoal_meta::remote_fuzz_support::{
    decode_server_msg, encode_server_msg, run, ClientMsg, Req, ServerMsg, MAX_REPLY_FRAME,
    MAX_REQUEST_FRAME,
};
use shoal_meta::{MemStore, MetaStore, MAX_KEY_LEN, MAX_VALUE_LEN};
use shoal_protocol::FrameDecoder;
use std::future::Future;

/// The prefix the store under test keeps its keys under (control's is similar): keys are
/// limited with it included.
const PREFIX: &str = "shoal/";
/// Most calls of one input that are run (bounds the work per input).
const MAX_CALLS: usize = 64;

/// Runs `f` to completion on this thread's runtime (current-thread, with time).
pub(crate) fn block_on<F: Future>(f: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
    }
    RT.with(|rt| rt.block_on(f))
}

/// The first byte picks the direction and the read size; the rest is the byte stream.
pub fn meta_protocol(data: &[u8]) {
    let Some((kind, read, stream)) = select(data, 2) else {
        return;
    };
    let read = usize::from(read) + 1;
    if kind == 1 {
        check_stream::<ServerMsg>(stream, MAX_REPLY_FRAME, read);
        return;
    }
    let msgs = check_stream::<ClientMsg>(stream, MAX_REQUEST_FRAME, read);
    if msgs.is_empty() {
        return;
    }
    block_on(async {
        let store = match MemStore::open(None, PREFIX) {
            Ok(s) => s,
            Err(e) => panic!("in-memory MemStore: {e}"),
        };
        for ClientMsg { id, req } in msgs.into_iter().take(MAX_CALLS) {
            if matches!(req, Req::Watch { .. } | Req::CancelWatch { .. }) {
                continue;
            }
            let result = run(&store, req).await.map_err(Into::into);
            reply_round_trips(&ServerMsg::Reply { id, result });
        }
        check_store(&store).await;
        store.close().await;
    });
}

/// The server's encoding of `msg` is what the client decodes.
fn reply_round_trips(msg: &ServerMsg) {
    let mut wire = Vec::new();
    encode_server_msg(msg, &mut wire);
    let dec = FrameDecoder::new(MAX_REPLY_FRAME);
    let mut buf = BytesMut::from(&wire[..]);
    match decode_server_msg(&dec, &mut buf) {
        Ok(Some(back)) => assert_eq!(&back, msg, "a reply changed on the wire"),
        other => panic!("the client cannot read a reply ({other:?}): {msg:?}"),
    }
    assert!(buf.is_empty(), "bytes left after a reply");
}

/// What the store holds is within its limits, sorted, and its revisions are coherent.
async fn check_store(store: &MemStore) {
    let (kvs, rev) = match store.range("").await {
        Ok(r) => r,
        Err(e) => panic!("range after the calls: {e}"),
    };
    assert!(rev >= 0, "revision {rev}");
    for w in kvs.windows(2) {
        assert!(w[0].key < w[1].key, "range is not sorted: {:?}", w[0].key);
    }
    for kv in &kvs {
        assert!(!kv.key.is_empty(), "an empty key was stored");
        assert!(
            PREFIX.len() + kv.key.len() <= MAX_KEY_LEN,
            "a {}-byte key was stored",
            kv.key.len()
        );
        assert!(kv.value.len() <= MAX_VALUE_LEN, "a value over the limit");
        assert!(
            0 < kv.create_revision
                && kv.create_revision <= kv.mod_revision
                && kv.mod_revision <= rev,
            "revisions out of order: {kv:?} at {rev}"
        );
    }
}

/// Opens `data` as the embedded store's file.
pub fn meta_file(data: &[u8]) {
    let dir = scratch_dir();
    let path = dir.path().join("meta.db");
    if let Err(e) = std::fs::write(&path, data) {
        panic!("writing the input file: {e}");
    }
    block_on(async {
        // The one call under test.
        let Ok(store) = MemStore::open(Some(&path), PREFIX) else {
            return;
        };
        // A store that opened is usable: it reads, and it takes a write.
        check_store(&store).await;
        if let Err(e) = store.put("fuzz/key", b"v".to_vec(), None).await {
            panic!("a store opened from a file refuses a write: {e}");
        }
        match store.get("fuzz/key").await {
            Ok(Some(kv)) => assert_eq!(kv.value, b"v"),
            other => panic!("a written key reads back as {other:?}"),
        }
        store.close().await;
    });
}

/// A temporary directory in memory when the machine has `/dev/shm` (the store fsyncs).
pub(crate) fn scratch_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::Builder::new()
            .prefix("shoal-fuzz-")
            .tempdir_in(shm)
    } else {
        tempfile::Builder::new().prefix("shoal-fuzz-").tempdir()
    };
    dir.unwrap_or_else(|e| panic!("temporary directory: {e}"))
}
