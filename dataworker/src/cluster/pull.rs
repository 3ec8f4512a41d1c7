//! Remote gets: making an object sealed on another node local.
//!
//! [`Cluster::pull`] asks the id's owners where it is ([`Cluster::locate`]; the primary owner
//! parks a get that may wait until the id is sealed), creates an unsealed replica buffer (in
//! the arena when small, else a segment the worker fills itself), fetches the bytes from a holder in parallel ranges over several QUIC
//! streams straight into that buffer ([`Cluster::transfer`]), seals it and so registers the
//! replica. A holder that fails is skipped for the next; when all failed, the pull waits for
//! the membership to catch up until its deadline.
//!
//! Invariants: concurrent pulls of one id share one transfer ([`Pulls`]); a transfer runs in a
//! task of its own on the worker's tracker, so a get that gives up never cancels it half-way:
//! it always ends by sealing or by aborting its buffer (after stopping every range that writes
//! into it), at its deadline or at shutdown. Nothing half-written becomes visible or leaks.
use super::{transport_err, wire, Cluster, CALL_TIMEOUT};
use shoal_protocol::{ErrorCode, ObjectId, PeerRequest, PeerResponse, WireError};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Pause before asking again when every owner or holder failed.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// A pull's outcome, once it has one.
type PullResult = Option<Result<(), WireError>>;

/// The pulls in flight, by id: later gets of the same id wait on the first one's result.
#[derive(Debug, Default)]
pub(super) struct Pulls(Mutex<HashMap<ObjectId, watch::Receiver<PullResult>>>);

impl Pulls {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectId, watch::Receiver<PullResult>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Cluster {
    /// Makes `id` local: finds it (waiting until `deadline` for it to be sealed when `wait`),
    /// pulls it from a holder and seals it here as a replica. Concurrent pulls of one id share
    /// the work. `Ok` means it is local now (or was meanwhile sealed here).
    ///
    /// The work runs in its own task, not in the caller's future: a get that gives up (its
    /// connection closed, its deadline passed) never cancels a transfer half-way, so the
    /// transfer always ends by sealing or freeing its buffer. It stops at its own deadline or
    /// at shutdown.
    pub(crate) async fn pull(
        self: &Arc<Self>,
        id: &ObjectId,
        deadline: tokio::time::Instant,
        wait: bool,
    ) -> Result<(), WireError> {
        let mut rx = {
            let mut p = self.pulls.lock();
            match p.get(id) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    p.insert(id.clone(), rx.clone());
                    let (c, id) = (self.clone(), id.clone());
                    self.tasks.spawn(async move {
                        let r = tokio::select! {
                            r = c.pull_once(&id, deadline, wait) => r,
                            _ = c.shutdown.cancelled() => {
                                Err(wire(ErrorCode::Unavailable, "the dataworker is shutting down"))
                            }
                        };
                        c.pulls.lock().remove(&id);
                        let _ = tx.send(Some(r));
                    });
                    rx
                }
            }
        };
        loop {
            if let Some(r) = rx.borrow().clone() {
                return r;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    return rx
                        .borrow()
                        .clone()
                        .unwrap_or_else(|| Err(wire(ErrorCode::Internal, "pull abandoned")))
                }
                Err(_) => return Err(wire(ErrorCode::Timeout, format!("{id}: pull timed out"))),
            }
        }
    }

    async fn pull_once(
        &self,
        id: &ObjectId,
        deadline: tokio::time::Instant,
        wait: bool,
    ) -> Result<(), WireError> {
        let mut failed_holders: HashSet<String> = HashSet::new();
        loop {
            let (size, mut holders) = self.locate(id, deadline, wait).await?;
            if holders.contains(&self.node_id) {
                if wait || self.local.has_sealed(id) {
                    // Registered here: it is local, or being sealed here and a waiting get
                    // sees it through the local waiters.
                    return Ok(());
                }
                // A registration older than a local delete: not a copy to read.
                holders.retain(|h| *h != self.node_id);
                if holders.is_empty() {
                    return Err(wire(ErrorCode::NotFound, format!("{id} not found")));
                }
            }
            let mut last_err = None;
            let untried: Vec<&String> = holders
                .iter()
                .filter(|h| !failed_holders.contains(*h))
                .collect();
            for h in untried {
                let Some(addr) = self.addr_of(h) else {
                    continue;
                };
                match self.transfer(id, size, addr, deadline).await {
                    Ok(()) => return Ok(()),
                    Err(e) if e.code == ErrorCode::AlreadyExists => return Ok(()),
                    Err(e) if e.code == ErrorCode::PermissionDenied => return Err(e),
                    Err(e) => {
                        tracing::debug!(%id, holder = %h, error = %e, "pull from holder failed");
                        failed_holders.insert(h.clone());
                        last_err = Some(e);
                    }
                }
            }
            // Every known holder failed: wait for membership to catch up (the owner then
            // answers ObjectLost, or names a new holder).
            if tokio::time::Instant::now() + RETRY_PAUSE >= deadline {
                return Err(last_err.unwrap_or_else(|| {
                    wire(
                        ErrorCode::Timeout,
                        format!("{id}: no holder answered in time"),
                    )
                }));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
            if failed_holders.len() >= holders.len() {
                failed_holders.clear();
            }
        }
    }

    /// Asks the owners where `id` is: the primary owner first (waiting there when `wait`), the
    /// next ones when it cannot be reached.
    async fn locate(
        &self,
        id: &ObjectId,
        deadline: tokio::time::Instant,
        wait: bool,
    ) -> Result<(u64, Vec<String>), WireError> {
        loop {
            let owners = self.owners(id);
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let mut unreachable = None;
            // Whether some owner failed in a way that may pass (down, slow): worth retrying.
            let mut transient = false;
            for (i, owner) in owners.iter().enumerate() {
                // Only the primary owner parks a waiting get; the others answer at once.
                let wait_for = if wait && i == 0 {
                    remaining
                } else {
                    Duration::ZERO
                };
                let resp = if *owner == self.node_id {
                    self.locate_here(id, wait_for).await
                } else {
                    let Some(addr) = self.addr_of(owner) else {
                        continue;
                    };
                    let req = PeerRequest::Locate {
                        id: id.clone(),
                        wait_ms: wait_for.as_millis() as u64,
                    };
                    let call = self.endpoint.call::<_, PeerResponse>(addr, &req);
                    match tokio::time::timeout(wait_for + CALL_TIMEOUT, call).await {
                        Ok(Ok(r)) => r,
                        Ok(Err(e)) => {
                            let e = transport_err(&e);
                            transient |= e.code == ErrorCode::Unavailable;
                            unreachable.get_or_insert(e);
                            continue;
                        }
                        Err(_) => {
                            transient = true;
                            unreachable = Some(wire(ErrorCode::Timeout, "owner did not answer"));
                            continue;
                        }
                    }
                };
                match resp {
                    PeerResponse::Located { size, holders } => return Ok((size, holders)),
                    PeerResponse::Error(e)
                        if e.code == ErrorCode::NotFound && i + 1 < owners.len() && !wait =>
                    {
                        // A secondary owner may know it when the primary just changed.
                        unreachable.get_or_insert(e);
                    }
                    PeerResponse::Error(e) if i == 0 || e.code == ErrorCode::ObjectLost => {
                        return Err(e)
                    }
                    PeerResponse::Error(e) => {
                        unreachable.get_or_insert(e);
                    }
                    other => {
                        return Err(wire(
                            ErrorCode::ProtocolError,
                            format!("unexpected locate reply {other:?}"),
                        ))
                    }
                }
            }
            let err = unreachable.unwrap_or_else(|| {
                wire(
                    ErrorCode::NotFound,
                    format!("{id} not found in the cluster"),
                )
            });
            if !transient || (err.code == ErrorCode::NotFound && !wait) {
                return Err(err);
            }
            // Owners unreachable: retry until the deadline (membership may change meanwhile).
            if tokio::time::Instant::now() + RETRY_PAUSE >= deadline {
                return Err(err);
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// Pulls `size` bytes of `id` from the node at `addr` into a new replica buffer, in
    /// parallel ranges, and seals it. On failure the buffer is dropped.
    async fn transfer(
        &self,
        id: &ObjectId,
        size: u64,
        addr: SocketAddr,
        deadline: tokio::time::Instant,
    ) -> Result<(), WireError> {
        let started = Instant::now();
        let target = self.local.create_replica(id, size)?;
        let streams = self
            .cfg
            .fetch_streams
            .clamp(1, 64)
            .min(size.div_ceil(self.cfg.fetch_chunk).max(1) as usize);
        let per = size.div_ceil(streams as u64).max(1);
        let mut set = tokio::task::JoinSet::new();
        let mut start = 0;
        while start < size || (size == 0 && set.is_empty()) {
            let len = per.min(size - start);
            let endpoint = self.endpoint.clone();
            let local = self.local.clone();
            let req = PeerRequest::Fetch {
                id: id.clone(),
                offset: start,
                len,
            };
            let target = target.clone();
            set.spawn(async move {
                let mut got = 0u64;
                let mut sink = |off: u64, bytes: &[u8]| {
                    if off + bytes.len() as u64 > len {
                        return Err(std::io::Error::other("body longer than asked"));
                    }
                    got = got.max(off + bytes.len() as u64);
                    target
                        .write_at(&local.arena, start + off, bytes)
                        .map_err(std::io::Error::other)
                };
                let r = endpoint
                    .fetch::<_, PeerResponse>(addr, &req, &mut sink)
                    .await;
                match r {
                    Ok(PeerResponse::Fetched { size: s, len: n }) if n == len && got == len => {
                        Ok(s)
                    }
                    Ok(PeerResponse::Fetched { .. }) => Err(wire(
                        ErrorCode::ObjectLost,
                        "holder sent a different range than asked",
                    )),
                    Ok(PeerResponse::Error(e)) => Err(e),
                    Ok(other) => Err(wire(
                        ErrorCode::ProtocolError,
                        format!("unexpected fetch reply {other:?}"),
                    )),
                    Err(e) => Err(transport_err(&e)),
                }
            });
            start += len;
            if size == 0 {
                break;
            }
        }
        let mut result = Ok(());
        loop {
            let next = tokio::select! {
                n = tokio::time::timeout_at(deadline, set.join_next()) => n,
                _ = self.shutdown.cancelled() => {
                    result = Err(wire(ErrorCode::Unavailable, "the dataworker is shutting down"));
                    break;
                }
            };
            match next {
                Err(_) => {
                    result = Err(wire(
                        ErrorCode::Timeout,
                        format!("{id}: transfer timed out"),
                    ));
                    break;
                }
                Ok(None) => break,
                Ok(Some(Ok(Ok(s)))) if s == size => {}
                Ok(Some(Ok(Ok(_)))) => {
                    result = Err(wire(ErrorCode::ObjectLost, "holder has a different size"));
                    break;
                }
                Ok(Some(Ok(Err(e)))) => {
                    result = Err(e);
                    break;
                }
                Ok(Some(Err(e))) => {
                    result = Err(wire(ErrorCode::Internal, format!("fetch task: {e}")));
                    break;
                }
            }
        }
        if let Err(e) = result {
            // Stop the other ranges before the buffer goes: nothing writes into freed memory.
            set.shutdown().await;
            self.local.abort_replica(id);
            return Err(e);
        }
        self.local.seal_replica(id)?;
        let secs = started.elapsed().as_secs_f64();
        metrics::counter!("shoal_pull_bytes_total").increment(size);
        metrics::histogram!("shoal_pull_seconds").record(secs);
        tracing::debug!(%id, size, secs, "pulled");
        Ok(())
    }
}
