//! A caller that attacks the call lane an instance handed it (#14): it maps the lane and the
//! gauge read-write, so it can try to truncate them under the instance (whose lane thread
//! would then fault with SIGBUS) and announce a call longer than its slot. The instance
//! refuses the first, closes that caller's lane on the second, and serves everyone else.
#![allow(clippy::unwrap_used)] // test helpers panic on setup failure by design
mod support;

use shoal_devcluster::wait::wait_for;
use shoal_meta::records::{InstanceBinding, DEFAULT_TENANT};
use shoal_meta::MetaStore;
use shoal_protocol::{encode_frame, Payload, ProxyFrame, Role};
use shoal_proxy::{Proxy, ProxyConfig};
use shoal_sdk::{CallClient, CallOptions, FunctionInstance};
use shoal_shm::SlotState;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;
use support::raw;

const SEC: Duration = Duration::from_secs(1);

/// The lane layout (`shoal-shm`'s `lane.rs`): a 64-byte header, then per slot a 64-byte
/// header (state, request length, reply length) and the request bytes.
const SLOT0: u64 = 64;
const REQ_LEN: u64 = 4;
const SLOT_HEADER: u64 = 64;
const POSTED: u32 = 1;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_attacking_its_lane_loses_only_that_lane() {
    let dir = tempfile::tempdir().unwrap();
    let meta: Arc<dyn MetaStore> = Arc::new(shoal_meta::MemStore::open(None, "").unwrap());
    let mut cfg = ProxyConfig::new("n1", dir.path().join("proxy.sock"));
    cfg.meta = Some(meta.clone());
    let proxy = Proxy::start(cfg).unwrap();
    let binding = InstanceBinding {
        function: "echo".into(),
        instance: "e1".into(),
    };
    let token = shoal_meta::issue_instance_token(meta.as_ref(), DEFAULT_TENANT, binding)
        .await
        .unwrap()
        .token;
    let inst = FunctionInstance::register(proxy.socket_path(), "echo", "e1", 4, Some(&token))
        .await
        .unwrap();
    tokio::spawn(inst.run(|a: Vec<u8>| async move { Ok(a) }));

    let path = proxy.socket_path().to_owned();
    tokio::task::spawn_blocking(move || {
        let mut caller = raw::open(&path, Role::Caller, None).unwrap();
        let mut id = 0;
        let info = wait_for("a lane offered", 5 * SEC, || {
            id += 1;
            caller.lanes(id, "echo").pop()
        })
        .unwrap();
        let mut lane = raw::open_lane(&info.path, &info.key).expect("a lane");
        let region = std::fs::File::from(lane.region.fd().try_clone_to_owned().unwrap());

        // 1. Truncating the lane or the gauge under the instance: refused.
        assert!(region.set_len(0).is_err(), "the lane was truncated");
        assert!(lane.gauge.set_len(0).is_err(), "the gauge was truncated");

        // 2. A well-formed call announced as longer than its slot.
        let mut frame = Vec::new();
        let invoke = ProxyFrame::Invoke {
            id: 1,
            function: "echo".into(),
            args: Payload::Inline(b"hi".to_vec()),
            timeout_ms: 5000,
            trace_id: 0,
        };
        encode_frame(&invoke, &mut frame).unwrap();
        region.write_all_at(&frame, SLOT0 + SLOT_HEADER).unwrap();
        region
            .write_all_at(&u32::MAX.to_le_bytes(), SLOT0 + REQ_LEN)
            .unwrap();
        region.write_all_at(&POSTED.to_le_bytes(), SLOT0).unwrap();
        lane.s.write_all(&[1]).unwrap();
        // The instance closes this lane (its socket ends) without answering the call.
        let mut buf = [0u8; 64];
        loop {
            match lane.s.read(&mut buf) {
                Ok(0) => break,
                // Closed with our ring bytes unread: the kernel resets instead of a FIN.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Ok(_) => {} // rings
                Err(e) => panic!("the instance kept the lane open: {e}"),
            }
        }
        assert_eq!(lane.region.state(0), SlotState::Taken, "not answered");
    })
    .await
    .unwrap();

    // The instance serves on, through the proxy and through new lanes.
    for lanes in [false, true] {
        let opts = CallOptions {
            lanes,
            ..CallOptions::default()
        };
        let c = CallClient::connect_with(proxy.socket_path(), opts)
            .await
            .unwrap();
        for i in 0..20u8 {
            assert_eq!(c.invoke("echo", &[i], SEC).await.unwrap(), [i]);
        }
    }
    proxy.shutdown().await;
}
