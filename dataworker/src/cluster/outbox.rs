//! The outbox: what this node holds, told to the directory owners of each id.
//!
//! The data path reports each change as a [`Note`] through an [`Outbox`] without waiting
//! (the channel is bounded; a note that does not fit is dropped and counted, and the next
//! resync repairs it). The outbox task batches notes, groups them by owner and sends
//! `Register`/`Unregister`. A resync (re-registering everything held) runs on every ring
//! change, every `resync_interval` (anti-entropy), and after a failed round with a backoff of
//! 1 s doubling up to the resync interval, so an owner that stays unreachable costs a bounded
//! amount of work.
use super::{Cluster, CALL_TIMEOUT};
use shoal_protocol::{HeldObject, ObjectId, PeerRequest, PeerResponse};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Most ids in one Register/Unregister message (ids are up to 1 KiB: a message stays well
/// under the transport's 1 MiB frame limit).
const BATCH: usize = 512;

/// A change the data path reports to the outbox.
#[derive(Debug)]
pub(crate) enum Note {
    /// This node now holds a sealed copy.
    Held(HeldObject),
    /// This node dropped its copy (evicted).
    Gone(ObjectId),
    /// Re-register everything held.
    Resync,
}

/// The sending half of the outbox: how the local store and the cluster report changes.
#[derive(Debug, Clone)]
pub(crate) struct Outbox(mpsc::Sender<Note>);

impl Outbox {
    /// A bounded outbox of `capacity` notes and the receiver [`Cluster::spawn`] drains.
    pub(crate) fn channel(capacity: usize) -> (Outbox, mpsc::Receiver<Note>) {
        // `mpsc::channel` panics on zero; one slot still works (resyncs repair the rest).
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Outbox(tx), rx)
    }

    /// Reports a change to the owners, without waiting.
    pub(crate) fn note(&self, n: Note) {
        if let Err(e) = self.0.try_send(n) {
            // The periodic resync repairs what a full outbox dropped.
            metrics::counter!("shoal_cluster_notes_dropped_total").increment(1);
            tracing::debug!(error = %e, "cluster outbox full; the next resync repairs it");
        }
    }
}

async fn sleep_until_opt(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

impl Cluster {
    /// The outbox task: drains `rx` until shutdown; see the module docs.
    pub(super) async fn outbox(self: Arc<Self>, mut rx: mpsc::Receiver<Note>) {
        let shutdown = self.shutdown.clone();
        let mut resync = tokio::time::interval(self.cfg.resync_interval);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry: Option<tokio::time::Instant> = None;
        let mut backoff = Duration::from_secs(1);
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                n = rx.recv() => match n { Some(n) => n, None => break },
                _ = resync.tick() => Note::Resync,
                _ = sleep_until_opt(retry) => Note::Resync,
            };
            retry = None;
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(n) => batch.push(n),
                    Err(_) => break,
                }
            }
            let resync = batch.iter().any(|n| matches!(n, Note::Resync));
            let mut held: Vec<HeldObject> = Vec::new();
            let mut gone: Vec<ObjectId> = Vec::new();
            if resync {
                held = self.local.held_objects();
            }
            for n in batch {
                match n {
                    Note::Held(h) if !resync => held.push(h),
                    Note::Gone(id) => gone.push(id),
                    _ => {}
                }
            }
            if self.send_registrations(held, gone).await {
                backoff = Duration::from_secs(1);
            } else {
                retry = Some(tokio::time::Instant::now() + backoff);
                backoff = (backoff * 2).min(self.cfg.resync_interval);
            }
        }
    }

    /// Sends registrations grouped by owner; returns false if some owner was unreachable.
    async fn send_registrations(&self, held: Vec<HeldObject>, gone: Vec<ObjectId>) -> bool {
        let mut reg: BTreeMap<String, Vec<HeldObject>> = BTreeMap::new();
        let mut unreg: BTreeMap<String, Vec<ObjectId>> = BTreeMap::new();
        for h in held {
            for o in self.owners(&h.id) {
                reg.entry(o).or_default().push(h.clone());
            }
        }
        for id in gone {
            for o in self.owners(&id) {
                unreg.entry(o).or_default().push(id.clone());
            }
        }
        let mut ok = true;
        for (owner, objs) in reg {
            for chunk in objs.chunks(BATCH) {
                let req = PeerRequest::Register {
                    node: self.node_id.clone(),
                    incarnation: self.incarnation,
                    objects: chunk.to_vec(),
                };
                ok &= self.tell(&owner, req).await;
            }
        }
        for (owner, ids) in unreg {
            for chunk in ids.chunks(BATCH) {
                let req = PeerRequest::Unregister {
                    node: self.node_id.clone(),
                    ids: chunk.to_vec(),
                };
                ok &= self.tell(&owner, req).await;
            }
        }
        ok
    }

    /// Sends a directory message to `owner` (or applies it here); true when it was applied.
    async fn tell(&self, owner: &str, req: PeerRequest) -> bool {
        if owner == self.node_id {
            return matches!(self.handle_directory(req), PeerResponse::Ok);
        }
        let Some(addr) = self.addr_of(owner) else {
            return false;
        };
        match tokio::time::timeout(CALL_TIMEOUT, self.endpoint.call(addr, &req)).await {
            Ok(Ok(PeerResponse::Ok)) => true,
            Ok(Ok(other)) => {
                tracing::debug!(owner, reply = ?other, "directory update refused");
                true
            }
            Ok(Err(e)) => {
                tracing::debug!(owner, error = %e, "directory update failed");
                false
            }
            Err(_) => false,
        }
    }
}
