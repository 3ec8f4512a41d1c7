//! The seed corpus: a few valid inputs per target, made with the real encoders (so they follow
//! the formats as they are), from which the fuzzer starts. The `replay` test runs them through
//! their targets and, with `SHOAL_FUZZ_WRITE_SEEDS=1`, writes the missing ones under
//! `fuzz/corpus/<target>/` (`scripts/fuzz.sh seeds`).
use serde::Serialize;
use shoal_meta::records::Role as TokenRole;
use shoal_meta::remote_fuzz_support::{ClientMsg, Req, Resp, ServerMsg, WireMetaError};
use shoal_meta::{Compare, KeyValue, MemStore, MetaStore, Txn, TxnOp, WatchEvent};
use shoal_protocol::{
    encode_frame, CallerFrame, ClientFrame, ClientHello, CtlLayout, ErrorCode, HeldObject, Hello,
    KvEntry, LaneInfo, Namespace, Payload, PeerRequest, PeerResponse, ProxyFrame, Request,
    Response, Role, ServerFrame, ViewDesc, WireError,
};
use std::time::Duration;

/// The seeds of `target` (empty for an unknown one).
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "client_frames" => client_frames(),
        "proxy_frames" => proxy_frames(),
        "peer_messages" => peer_messages(),
        "meta_protocol" => meta_protocol(),
        "rest_bodies" => rest_bodies(),
        "package_unpack" => package_unpack(),
        "package_entries" => package_entries(),
        "meta_file" => meta_file(),
        _ => Vec::new(),
    }
}

/// `selector` followed by `msgs` in shoal's framing.
fn framed<T: Serialize>(selector: u8, msgs: &[T]) -> Vec<u8> {
    let mut out = vec![selector];
    for m in msgs {
        encode_frame(m, &mut out).unwrap_or_else(|e| panic!("seed: {e}"));
    }
    out
}

fn id(s: &str) -> shoal_protocol::ObjectId {
    shoal_protocol::ObjectId::parse_any(s).unwrap_or_else(|e| panic!("seed id {s:?}: {e}"))
}

fn client_frames() -> Vec<Vec<u8>> {
    let hello = ClientHello {
        token: Some(format!("shoal_{}_{}", "0".repeat(16), "a".repeat(64))),
        tenant: Some("team-a".into()),
    };
    let reqs = [
        Request::Put {
            id: id("a"),
            data: vec![1, 2, 3],
        },
        Request::Create {
            id: id("big"),
            size: 1 << 20,
        },
        Request::Seal { id: id("big") },
        Request::Get {
            ids: vec![id("a"), id("big")],
            timeout_ms: 10,
        },
        Request::Release { gens: vec![1, 2] },
        Request::KvMSet {
            entries: vec![KvEntry {
                key: id("k"),
                value: b"v".to_vec(),
            }],
            ttl_secs: 5,
        },
        Request::KvRead {
            key: id("k"),
            offset: 0,
            len: 1,
        },
        Request::List {
            ns: Namespace::Kv,
            prefix: String::new(),
            limit: 10,
        },
        Request::Status,
    ];
    let frames: Vec<ClientFrame> = reqs
        .into_iter()
        .enumerate()
        .map(|(i, req)| ClientFrame { id: i as u32, req })
        .collect();
    let server = [
        ServerFrame::Hello(Hello {
            version: 1,
            client_id: 7,
            node_id: "node-1".into(),
            arena_bytes: 1 << 30,
            ctl: CtlLayout {
                buckets: 1024,
                pins: 256,
                ring: 64,
            },
            fast_path: true,
            mailbox: Some(1 << 16),
            inline_limit: 64 << 10,
            max_frame: 128 << 10,
            tenant: "default".into(),
        }),
        ServerFrame::Reply {
            id: 3,
            resp: Response::Views(vec![
                Ok(ViewDesc {
                    gen: 9,
                    offset: 4096,
                    len: 3,
                    segment: false,
                }),
                Ok(ViewDesc {
                    gen: 10,
                    offset: 0,
                    len: 1 << 20,
                    segment: true,
                }),
                Err(WireError::new(ErrorCode::NotFound, "big")),
            ]),
        },
        ServerFrame::Reply {
            id: 4,
            resp: Response::Ttl(Some(None)),
        },
        ServerFrame::Refused(WireError::new(ErrorCode::PermissionDenied, "no")),
    ];
    vec![
        framed(0, &[hello]),
        framed(1 + 3 * 7, &frames),
        framed(2 + 3 * 2, &server),
    ]
}

fn proxy_frames() -> Vec<Vec<u8>> {
    let key = [7u8; shoal_protocol::LANE_KEY_LEN];
    let caller = [
        CallerFrame::Hello {
            version: 1,
            role: Role::Caller,
            token: None,
        },
        CallerFrame::Call {
            id: 1,
            function: "echo".into(),
            instance: None,
            args: Payload::Inline(b"hi".to_vec()),
            timeout_ms: 1000,
            trace_id: 5,
        },
        CallerFrame::Lanes {
            id: 2,
            function: "echo".into(),
        },
        CallerFrame::Release { id: 1 },
    ];
    let instance = [
        CallerFrame::Hello {
            version: 1,
            role: Role::Instance {
                function: "echo".into(),
                instance_id: "echo-1".into(),
                concurrency: 4,
            },
            token: Some("shoal_x".into()),
        },
        CallerFrame::Lane {
            path: "/tmp/shoal/l-1.sock".into(),
            key,
        },
        CallerFrame::Result {
            id: 1,
            result: Ok(Payload::Object(id("result-1"))),
        },
        CallerFrame::Drain,
    ];
    let proxy = [
        ProxyFrame::Welcome {
            node_id: "node-1".into(),
            inline_limit: 64 << 10,
        },
        ProxyFrame::Invoke {
            id: 1,
            function: "echo".into(),
            args: Payload::Inline(b"hi".to_vec()),
            timeout_ms: 999,
            trace_id: 5,
        },
        ProxyFrame::Reply {
            id: 1,
            result: Err(WireError::new(ErrorCode::Overloaded, "busy")),
        },
        ProxyFrame::Lanes {
            id: 2,
            lanes: vec![LaneInfo {
                instance_id: "echo-1".into(),
                path: "/tmp/shoal/l-1.sock".into(),
                key,
            }],
        },
        ProxyFrame::Drained,
    ];
    vec![
        framed(0, &caller),
        framed(2 * 5, &instance),
        framed(1 + 2 * 3, &proxy),
    ]
}

/// Frames as the transport writes them: `[u32 LE len][postcard]`, one after the other.
fn quic_frames<T: Serialize>(msgs: &[T]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        let body = postcard::to_stdvec(m).unwrap_or_else(|e| panic!("seed: {e}"));
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
    }
    out
}

fn peer_messages() -> Vec<Vec<u8>> {
    let held = |s: &str, primary| HeldObject {
        id: id(s),
        size: 10,
        primary,
    };
    let reqs = [
        PeerRequest::Register {
            node: "node-a".into(),
            incarnation: 1,
            objects: vec![held("x", true), held("team\0y", true)],
        },
        PeerRequest::Register {
            node: "node-b".into(),
            incarnation: 4,
            objects: vec![held("x", false)],
        },
        PeerRequest::Locate {
            id: id("x"),
            wait_ms: 0,
        },
        PeerRequest::Unregister {
            node: "node-a".into(),
            ids: vec![id("x")],
        },
        PeerRequest::Register {
            node: "node-a".into(),
            incarnation: 2,
            objects: vec![held("z", true)],
        },
        PeerRequest::Delete { id: id("team\0y") },
        PeerRequest::DropCopies { ids: vec![id("z")] },
        PeerRequest::Fetch {
            id: id("x"),
            offset: 0,
            len: 10,
        },
    ];
    let resps = [
        PeerResponse::Ok,
        PeerResponse::Located {
            size: 10,
            holders: vec!["node-a".into(), "node-b".into()],
        },
        PeerResponse::Fetched { size: 10, len: 10 },
        PeerResponse::Error(WireError::new(ErrorCode::ObjectLost, "gone")),
    ];
    vec![quic_frames(&reqs), quic_frames(&resps)]
}

fn meta_protocol() -> Vec<Vec<u8>> {
    let reqs = [
        Req::Put {
            key: "nodes/a".into(),
            value: b"{}".to_vec(),
            lease: None,
        },
        Req::Grant {
            ttl: Duration::from_secs(5),
        },
        Req::Put {
            key: "leased".into(),
            value: b"1".to_vec(),
            lease: Some(1),
        },
        Req::KeepAlive { lease: 1 },
        Req::Get {
            key: "nodes/a".into(),
        },
        Req::Range {
            prefix: "nodes/".into(),
        },
        Req::Txn(Txn {
            compare: vec![
                Compare::Absent("b".into()),
                Compare::ModRevision("nodes/a".into(), 1),
            ],
            success: vec![
                TxnOp::Put {
                    key: "b".into(),
                    value: b"2".to_vec(),
                    lease: None,
                },
                TxnOp::Delete {
                    key: "nodes/a".into(),
                },
            ],
            failure: vec![],
        }),
        Req::Watch {
            prefix: "nodes/".into(),
            after: 0,
        },
        Req::CancelWatch { watch: 7 },
        Req::Revoke { lease: 1 },
        Req::Delete { key: "b".into() },
    ];
    let msgs: Vec<ClientMsg> = reqs
        .into_iter()
        .enumerate()
        .map(|(i, req)| ClientMsg { id: i as u32, req })
        .collect();
    let kv = KeyValue {
        key: "nodes/a".into(),
        value: b"{}".to_vec(),
        create_revision: 1,
        mod_revision: 2,
        lease: Some(1),
    };
    let server = [
        ServerMsg::Reply {
            id: 0,
            result: Ok(Resp::Range(vec![kv.clone()], 2)),
        },
        ServerMsg::Reply {
            id: 1,
            result: Err(WireMetaError::LeaseNotFound(3)),
        },
        ServerMsg::Reply {
            id: 2,
            result: Ok(Resp::KeepAlive(Duration::from_secs(5))),
        },
        ServerMsg::Event {
            watch: 7,
            event: WatchEvent::Put(kv),
        },
        ServerMsg::Event {
            watch: 7,
            event: WatchEvent::Delete {
                key: "b".into(),
                mod_revision: 3,
            },
        },
        ServerMsg::WatchEnded { watch: 7 },
    ];
    vec![framed(2 * 4, &msgs), framed(1 + 2 * 11, &server)]
}

fn rest_bodies() -> Vec<Vec<u8>> {
    let body = |route: u8, v: serde_json::Value| {
        let mut out = vec![route];
        out.extend(serde_json::to_vec(&v).unwrap_or_else(|e| panic!("seed: {e}")));
        out
    };
    vec![
        body(
            0,
            serde_json::json!({
                "name": "hello",
                "tenant": "team-a",
                "code": {"kind": "tar_gz", "path": "/srv/hello.tar.gz"},
                "digest": format!("sha256:{}", "ab".repeat(32)),
                "command": ["python3", "main.py"],
                "env": {"MODE": "fast"},
                "resources": {"cpu_milli": 500, "mem_mib": 256},
                "min_instances": 1,
                "max_instances": 3,
                "concurrency": 8,
                "labels": {"team": "a"},
                "node_selector": {"zone": "z1"},
                "affinity": ["cache"],
                "anti_affinity": ["hello"],
                "pool": "gpu",
            }),
        ),
        body(
            0,
            serde_json::json!({
                "name": "obj",
                "code": {"kind": "object", "id": "pkg/obj.tar.gz"},
                "command": ["./run"],
                "resources": {"cpu_milli": 1, "mem_mib": 1},
            }),
        ),
        body(
            1,
            serde_json::json!({
                "name": "gpu",
                "node_selector": {"gpu": "yes"},
                "cpu_milli": 8000,
                "mem_mib": 65536,
            }),
        ),
        body(
            2,
            serde_json::json!({"arena_bytes": 1u64 << 30, "calls_in_flight": 100, "instances": 10}),
        ),
        body(
            3,
            serde_json::json!({
                "tenant": "team-a",
                "role": TokenRole::Invoker,
                "description": "ci",
                "ttl_secs": 3600,
            }),
        ),
    ]
}

fn package_unpack() -> Vec<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    append(&mut b, &mut dir, "bin/", &[][..]);
    let mut file = tar::Header::new_gnu();
    file.set_entry_type(tar::EntryType::Regular);
    file.set_mode(0o755);
    let script = b"#!/bin/sh\necho hi\n";
    file.set_size(script.len() as u64);
    append(&mut b, &mut file, "bin/run", &script[..]);
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    link.set_mode(0o777);
    link.set_link_name("bin/run")
        .unwrap_or_else(|e| panic!("seed: {e}"));
    append(&mut b, &mut link, "run", &[][..]);
    let mut up = tar::Header::new_gnu();
    up.set_entry_type(tar::EntryType::Symlink);
    up.set_size(0);
    up.set_mode(0o777);
    up.set_link_name("../run")
        .unwrap_or_else(|e| panic!("seed: {e}"));
    append(&mut b, &mut up, "bin/up", &[][..]);
    let tar = b.into_inner().unwrap_or_else(|e| panic!("seed: {e}"));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar).unwrap_or_else(|e| panic!("seed: {e}"));
    let gz = gz.finish().unwrap_or_else(|e| panic!("seed: {e}"));
    let with = |mode: u8, bytes: &[u8]| {
        let mut out = vec![mode];
        out.extend_from_slice(bytes);
        out
    };
    // Structured: directory x, symlink x/up -> .., file f.
    let entries = [0, 0, 0, 2, 1, 0, 1, 0, 3, 1, 0, 5];
    vec![with(1, &tar), with(0, &gz), with(2, &gz), with(4, &entries)]
}

fn package_entries() -> Vec<Vec<u8>> {
    // Directory x, symlink x/up -> .., file f, symlink run -> f; with and without the digest.
    let entries = [0, 0, 0, 2, 1, 0, 1, 0, 3, 1, 0, 5, 2, 0, 0, 0, 5];
    [0, 2]
        .into_iter()
        .map(|mode| [&[mode][..], &entries].concat())
        .collect()
}

fn append(b: &mut tar::Builder<Vec<u8>>, h: &mut tar::Header, path: &str, data: &[u8]) {
    h.set_path(path).unwrap_or_else(|e| panic!("seed: {e}"));
    h.set_cksum();
    b.append(h, data).unwrap_or_else(|e| panic!("seed: {e}"));
}

/// A file the embedded store wrote itself: some keys, one under a lease.
fn meta_file() -> Vec<Vec<u8>> {
    let dir = crate::meta::scratch_dir();
    let path = dir.path().join("meta.db");
    crate::meta::block_on(async {
        let store =
            MemStore::open(Some(&path), "shoal/").unwrap_or_else(|e| panic!("seed store: {e}"));
        let lease = store
            .grant(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("seed: {e}"));
        for (k, v, l) in [
            ("nodes/a", &b"{\"node_id\":\"a\"}"[..], Some(lease)),
            ("functions/hello", b"{}", None),
            ("tokens/0123", b"{}", None),
        ] {
            store
                .put(k, v.to_vec(), l)
                .await
                .unwrap_or_else(|e| panic!("seed: {e}"));
        }
        store
            .delete("tokens/0123")
            .await
            .unwrap_or_else(|e| panic!("seed: {e}"));
        store.close().await;
    });
    vec![std::fs::read(&path).unwrap_or_else(|e| panic!("seed file: {e}"))]
}
