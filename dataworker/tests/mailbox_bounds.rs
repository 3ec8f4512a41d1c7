//! A hostile client of the shared-memory mailbox (raw handshake, its own sequence numbers):
//! it posts requests that must wait in tasks without waiting for their replies (each new
//! sequence number used to start one more task, without bound), and a request announcing
//! one-way frames it never sends (the poller used to spin on it forever instead of sleeping).
//!
//! The waiting requests are gets of ids whose directory owner is a member that never answers
//! (a node record planted in the store), so each one waits for the whole pull timeout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::BytesMut;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use shoal_dataworker::{ClusterConfig, ClusterParts, Config, Dataworker};
use shoal_devcluster::wait::wait_for_async;
use shoal_meta::records::node_key;
use shoal_meta::{MemStore, MetaStore};
use shoal_protocol::{
    encode_frame, ClientFrame, ClientHello, ErrorCode, FrameDecoder, NodeRecord, ObjectId, Request,
    Response, ServerFrame,
};
use shoal_shm::{recv_with_fds, Ctl, Mailbox};
use shoal_store::{Ring, DEFAULT_VNODES};
use shoal_transport::{DevCa, NodeTls};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(30);
/// The server's bound (`ring::MAX_DEFERRED_PER_CLIENT`).
const MAX_DEFERRED: u32 = 4;

fn metric(h: &PrometheusHandle, series: &str) -> f64 {
    h.render()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

async fn wait_metric(h: &PrometheusHandle, series: &str, at_least: f64) {
    wait_for_async(series, DEADLINE, || async {
        (metric(h, series) >= at_least).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

/// A client speaking the protocol by hand: its socket, mailbox and the control region.
struct Hostile {
    sock: UnixStream,
    mailbox: Mailbox,
    ctl: Ctl,
    decoder: FrameDecoder,
}

impl Hostile {
    fn connect(w: &Dataworker) -> Hostile {
        let mut sock = UnixStream::connect(w.socket_path()).unwrap();
        let mut hello = Vec::new();
        encode_frame(
            &ClientHello {
                token: None,
                tenant: None,
            },
            &mut hello,
        )
        .unwrap();
        sock.write_all(&hello).unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let (n, mut fds) = recv_with_fds(sock.as_fd(), &mut buf, 5).unwrap();
        let decoder = FrameDecoder::new(16 << 20);
        let h = match decoder
            .decode::<ServerFrame>(&mut BytesMut::from(&buf[..n]))
            .unwrap()
        {
            Some(ServerFrame::Hello(h)) => h,
            other => panic!("expected a hello, got {other:?}"),
        };
        assert_eq!(fds.len(), 5, "arena, index, bell page, pin page, mailbox");
        let mailbox = Mailbox::open(fds.pop().unwrap(), h.mailbox.unwrap()).unwrap();
        let _pins = fds.pop();
        let bell = fds.pop().unwrap();
        let ctl = Ctl::open(
            fds.pop().unwrap(),
            bell,
            h.ctl.buckets,
            h.ctl.pins,
            h.ctl.ring,
        )
        .unwrap();
        Hostile {
            sock,
            mailbox,
            ctl,
            decoder,
        }
    }

    fn post(&self, seq: u32, oneways: u64, req: Request) {
        let mut frame = Vec::new();
        encode_frame(&ClientFrame { id: seq, req }, &mut frame).unwrap();
        assert!(self.mailbox.post(seq, oneways, &frame));
        self.ctl.ring_doorbell();
    }

    async fn reply(&self, seq: u32) -> Response {
        wait_for_async("a mailbox reply", DEADLINE, || async {
            self.mailbox.reply_ready(seq).then_some(())
        })
        .await
        .unwrap();
        let mut raw = Vec::new();
        self.mailbox.reply(&mut raw);
        match self
            .decoder
            .decode::<ServerFrame>(&mut BytesMut::from(&raw[..]))
        {
            Ok(Some(ServerFrame::Reply { id, resp })) if id == seq => resp,
            other => panic!("unexpected reply {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_pile_up_waiting_requests_or_keep_the_poller_awake() {
    let metrics = PrometheusBuilder::new().install_recorder().unwrap();
    let meta: Arc<dyn MetaStore> = Arc::new(MemStore::open(None, "").unwrap());
    // A member that never answers: gets of the ids it owns wait for the whole pull timeout.
    let ghost = NodeRecord {
        node_id: "ghost".into(),
        incarnation: 1,
        peer_addr: "127.0.0.1:9".into(),
        http_addr: None,
        socket: String::new(),
        arena_bytes: 0,
        pid: 0,
    };
    meta.put(
        &node_key("ghost"),
        serde_json::to_vec(&ghost).unwrap(),
        None,
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(dir.path());
    cfg.node_id = "n0".into();
    cfg.shm_size = 16 << 20;
    let mut c = ClusterConfig::new("127.0.0.1:0".parse().unwrap());
    c.lease_ttl = Duration::from_secs(1);
    c.directory_copies = 1;
    c.pull_timeout = Duration::from_secs(600);
    cfg.cluster = Some(c);
    let ca = DevCa::generate().unwrap();
    let tls = NodeTls::from_node_cert(&ca.issue("n0").unwrap()).unwrap();
    let w = Dataworker::start_with(cfg, None, Some(ClusterParts { meta, tls }))
        .await
        .unwrap();
    wait_for_async("both members", DEADLINE, || async {
        (w.status().members.len() == 2).then_some(())
    })
    .await
    .unwrap();
    // The node's ring, to pick ids the ghost owns.
    let mut nodes: Vec<String> = w.status().members.into_iter().map(|m| m.node_id).collect();
    nodes.push("n0".into());
    let ring = Ring::new(nodes, DEFAULT_VNODES);
    let mut ghost_ids = (0..)
        .map(|i| format!("far-{i}"))
        .filter(|id| ring.owners(id.as_bytes(), 1).first() == Some(&"ghost"));

    let h = Hostile::connect(&w);
    let taken = "shoal_requests_total{op=\"get\",path=\"mailbox\"}";
    // Posts without waiting for replies: each waits in a task, up to the bound; past it the
    // answer is Overloaded at once.
    for seq in 1..=MAX_DEFERRED + 3 {
        let id = ObjectId::new(ghost_ids.next().unwrap()).unwrap();
        h.post(
            seq,
            0,
            Request::Get {
                ids: vec![id],
                timeout_ms: 0,
            },
        );
        wait_metric(&metrics, taken, f64::from(seq)).await;
        if seq <= MAX_DEFERRED {
            wait_metric(&metrics, "shoal_mailbox_deferred", f64::from(seq)).await;
        } else {
            match h.reply(seq).await {
                Response::Error(e) => assert_eq!(e.code, ErrorCode::Overloaded, "{e:?}"),
                other => panic!("expected Overloaded, got {other:?}"),
            }
        }
    }
    assert_eq!(
        metric(&metrics, "shoal_mailbox_deferred"),
        f64::from(MAX_DEFERRED)
    );
    assert_eq!(metric(&metrics, "shoal_mailbox_overloaded_total"), 3.0);

    // A request announcing a million one-way frames that never come: the poller sleeps.
    let seq = MAX_DEFERRED + 4;
    h.post(seq, 1_000_000, Request::Status);
    let sleeps = "shoal_mailbox_poller_sleeps_total";
    let before = metric(&metrics, sleeps);
    wait_metric(&metrics, sleeps, before + 3.0).await;
    assert!(!h.mailbox.reply_ready(seq));

    // A request waiting for one-way frames that do come is served when they have been (on a
    // second connection: the first one's mailbox is taken by the request above, and a post
    // over an unserved request is no request).
    drop(h);
    let h = Hostile::connect(&w);
    let seq = 1;
    h.post(seq, 1, Request::Status);
    let mut oneway = Vec::new();
    encode_frame(
        &ClientFrame {
            id: 0,
            req: Request::Release { gens: vec![] },
        },
        &mut oneway,
    )
    .unwrap();
    (&h.sock).write_all(&oneway).unwrap();
    assert!(matches!(h.reply(seq).await, Response::Status(_)));

    drop(h);
    w.shutdown().await;
    assert_eq!(metric(&metrics, "shoal_mailbox_deferred"), 0.0);
}
