//! What this node answers other dataworkers on its QUIC endpoint: directory updates and
//! locates for the ids it owns, deletes, and the bytes of the objects it holds.
//!
//! A fetched range is streamed straight from its segment's read-only mapping (small arena
//! objects are copied out first) while a pin (under the peer client id) keeps it allocated;
//! the pin ends when the transport drops the body, sent or not.
use super::Cluster;
use crate::local::Local;
use crate::segments::PinnedData;
use shoal_protocol::{PeerRequest, PeerResponse};
use shoal_transport::{Body, Reply, Service};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The service the peer server runs; it lives as long as the server task.
pub(super) fn service(cluster: Arc<Cluster>) -> Arc<PeerService> {
    Arc::new(PeerService { cluster })
}

/// Answers other dataworkers.
pub(super) struct PeerService {
    cluster: Arc<Cluster>,
}

/// Bytes of a pinned object, streamed to a peer; the pin ends when the body is dropped.
struct PinnedBytes {
    local: Arc<Local>,
    gen: u64,
    data: PinnedData,
}

impl Body for PinnedBytes {
    fn bytes(&self) -> &[u8] {
        // The pin keeps the memory; a range that cannot be read sends nothing, which the
        // reader sees as a short body.
        self.data.bytes()
    }
}

impl Drop for PinnedBytes {
    fn drop(&mut self) {
        self.local.release_peer(self.gen);
    }
}

#[async_trait::async_trait]
impl Service for PeerService {
    type Req = PeerRequest;
    type Resp = PeerResponse;

    async fn handle(&self, _peer: SocketAddr, req: PeerRequest) -> Reply<PeerResponse> {
        let cluster = &self.cluster;
        let local = &cluster.local;
        let resp = match req {
            r @ (PeerRequest::Register { .. } | PeerRequest::Unregister { .. }) => {
                cluster.handle_directory(r)
            }
            PeerRequest::Locate { id, wait_ms } => {
                let wait = Duration::from_millis(wait_ms).min(local.cfg.max_get_timeout);
                cluster.locate_here(&id, wait).await
            }
            PeerRequest::Delete { id } => cluster.delete_here(&id).await,
            PeerRequest::DropCopies { ids } => {
                for id in &ids {
                    local.drop_copy(id);
                }
                PeerResponse::Ok
            }
            PeerRequest::Fetch { id, offset, len } => {
                return match local.pin_for_peer(&id) {
                    Ok(v) => {
                        let off = offset.min(v.len);
                        let n = len.min(v.len - off);
                        let data = match local.pinned_bytes(&v, off, n) {
                            Ok(d) => d,
                            Err(e) => {
                                local.release_peer(v.gen);
                                return Reply {
                                    resp: PeerResponse::Error(e),
                                    body: None,
                                };
                            }
                        };
                        metrics::counter!("shoal_serve_bytes_total").increment(n);
                        Reply {
                            resp: PeerResponse::Fetched {
                                size: v.len,
                                len: n,
                            },
                            body: Some(Box::new(PinnedBytes {
                                local: local.clone(),
                                gen: v.gen,
                                data,
                            })),
                        }
                    }
                    Err(e) => Reply {
                        resp: PeerResponse::Error(e),
                        body: None,
                    },
                };
            }
        };
        Reply { resp, body: None }
    }
}
