//! Requests that may wait: gets of objects that are not sealed here yet (locally or, in a
//! cluster, anywhere), and deletes that must reach every copy in the cluster. Both the socket
//! connections and the mailbox thread hand such requests to these async functions.
use crate::local::{GetMode, GetOutcome};
use crate::worker::Worker;
use shoal_protocol::{ErrorCode, ObjectId, Request, Response, WireError};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// Whether `req` may have to wait or use the network (gets; deletes in a cluster), so that it
/// goes through [`run`]. Cheap: it looks only at the request and the node's mode.
pub(crate) fn is_deferred(worker: &Worker, req: &Request) -> bool {
    match req {
        Request::Get { .. } => true,
        Request::Delete { .. } => worker.in_cluster(),
        _ => false,
    }
}

/// Answers a deferred request.
pub(crate) async fn run(worker: Arc<Worker>, client: u64, req: Request) -> Response {
    match req {
        Request::Get { ids, timeout_ms } => get(worker, client, ids, timeout_ms).await,
        Request::Delete { id } => delete(worker, client, id).await,
        other => worker.handle(client, other),
    }
}

/// Waits until every id is sealed here or, in a cluster, pulls it from the node that has it;
/// answers at the deadline with `Timeout` for what is still missing. A zero timeout does not
/// wait for objects that are not sealed anywhere, but still pulls sealed remote ones.
pub(crate) async fn get(
    worker: Arc<Worker>,
    client: u64,
    ids: Vec<ObjectId>,
    timeout_ms: u64,
) -> Response {
    let cluster = worker.cluster.clone();
    let wait_for_seal = timeout_ms > 0;
    let timeout = if wait_for_seal {
        Duration::from_millis(timeout_ms).min(worker.local.cfg.max_get_timeout)
    } else {
        match (&cluster, &worker.local.cfg.cluster) {
            (Some(_), Some(c)) => c.pull_timeout,
            _ => Duration::ZERO,
        }
    };
    if timeout.is_zero() {
        return match worker.local.try_get(client, &ids, GetMode::NoWait) {
            GetOutcome::Done(r) => r,
            GetOutcome::Wait(_) => Response::error(ErrorCode::Internal, "get did not settle"),
        };
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut settled: HashMap<ObjectId, WireError> = HashMap::new();
    let mut started: HashSet<ObjectId> = HashSet::new();
    let mut pulls = tokio::task::JoinSet::new();
    loop {
        let mut pending = match worker
            .local
            .try_get_settled(client, &ids, GetMode::Wait, &settled)
        {
            GetOutcome::Done(r) => break r,
            GetOutcome::Wait(p) => p,
        };
        if let Some(c) = &cluster {
            for (id, _) in &pending {
                if started.insert(id.clone()) {
                    let (c, id) = (c.clone(), id.clone());
                    pulls.spawn(async move {
                        let r = c.pull(&id, deadline, wait_for_seal).await;
                        (id, r)
                    });
                }
            }
        }
        let expired = {
            // Waiting on the first unsealed id is enough: every wake re-checks all of them.
            let first = pending.first_mut().map(|(_, rx)| rx);
            tokio::select! {
                _ = changed(first) => false,
                Some(done) = pulls.join_next(), if !pulls.is_empty() => {
                    if let Ok((id, Err(e))) = done {
                        // A shared pull started by a get with a nearer deadline, or one that
                        // did not wait: this get may still wait, so it pulls again.
                        let retry = tokio::time::Instant::now() < deadline
                            && (e.code == ErrorCode::Timeout
                                || (wait_for_seal && e.code == ErrorCode::NotFound));
                        if retry {
                            started.remove(&id);
                        } else {
                            settled.insert(id, e);
                        }
                    }
                    false
                }
                _ = tokio::time::sleep_until(deadline) => true,
            }
        };
        if expired {
            drop(pending);
            pulls.shutdown().await;
            worker.local.drop_idle_waiters();
            break match worker
                .local
                .try_get_settled(client, &ids, GetMode::Expired, &settled)
            {
                GetOutcome::Done(r) => r,
                GetOutcome::Wait(_) => Response::error(ErrorCode::Internal, "get did not settle"),
            };
        }
    }
}

async fn changed(rx: Option<&mut tokio::sync::watch::Receiver<()>>) {
    match rx {
        // An error means the sender was dropped: that is the wake-up.
        Some(rx) => {
            let _ = rx.changed().await;
        }
        None => std::future::pending().await,
    }
}

/// Deletes `id` here and, in a cluster, every copy elsewhere. `NotFound` only when no node
/// knew it.
pub(crate) async fn delete(worker: Arc<Worker>, client: u64, id: ObjectId) -> Response {
    let local = worker.handle(client, Request::Delete { id: id.clone() });
    let Some(c) = &worker.cluster else {
        return local;
    };
    let remote = c.delete(&id).await;
    match local {
        Response::Error(e) if e.code == ErrorCode::NotFound && remote => Response::Ok,
        other => other,
    }
}
