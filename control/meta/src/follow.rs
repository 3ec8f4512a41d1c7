//! Following a prefix: read it, then watch it from that revision, and read again whenever the
//! watch breaks or the store fails, pausing between attempts. Every component that keeps a
//! view of the store (the agent's assignments, the proxy's routes) does exactly this.
use crate::types::{KeyValue, MetaStore, WatchEvent, WatchStream};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What [`Follower::next`] yields.
#[derive(Debug)]
pub enum Followed {
    /// Every key under the prefix, read afresh: the follower's view must be replaced by it
    /// (changes may have been missed since the last event).
    Snapshot(Vec<KeyValue>),
    /// One change after the snapshot, in revision order.
    Event(WatchEvent),
}

/// Follows one prefix of a store; see the module docs.
#[derive(Debug)]
pub struct Follower {
    meta: Arc<dyn MetaStore>,
    prefix: String,
    retry: Duration,
    stream: Option<WatchStream>,
    /// Revision of the last snapshot not yet watched from.
    pending_watch: Option<i64>,
}

impl Follower {
    /// A follower of `prefix` that waits `retry` after a failed read or watch.
    pub fn new(meta: Arc<dyn MetaStore>, prefix: impl Into<String>, retry: Duration) -> Self {
        Self {
            meta,
            prefix: prefix.into(),
            retry,
            stream: None,
            pending_watch: None,
        }
    }

    /// The next snapshot or change; `None` once `stop` is cancelled. Store failures are
    /// logged at debug level and retried, never returned: while the store is down, this
    /// waits and the caller keeps its last view. Cancel-safe: dropped mid-way (say, in a
    /// `select!` whose other branch won), it loses nothing and the next call resumes.
    pub async fn next(&mut self, stop: &CancellationToken) -> Option<Followed> {
        loop {
            if stop.is_cancelled() {
                return None;
            }
            if let Some(rev) = self.pending_watch {
                match self.meta.watch(&self.prefix, rev).await {
                    Ok(s) => {
                        self.stream = Some(s);
                        self.pending_watch = None;
                    }
                    Err(e) => {
                        tracing::debug!(prefix = %self.prefix, error = %e, "watch failed; reading again");
                        self.pending_watch = None;
                        self.pause(stop).await;
                        continue;
                    }
                }
            }
            if let Some(stream) = self.stream.as_mut() {
                let ev = tokio::select! {
                    _ = stop.cancelled() => return None,
                    ev = stream.recv() => ev,
                };
                match ev {
                    Some(ev) => return Some(Followed::Event(ev)),
                    None => {
                        // The watch broke: read again.
                        self.stream = None;
                        continue;
                    }
                }
            }
            match self.meta.range(&self.prefix).await {
                Ok((kvs, rev)) => {
                    self.pending_watch = Some(rev);
                    return Some(Followed::Snapshot(kvs));
                }
                Err(e) => {
                    tracing::debug!(prefix = %self.prefix, error = %e, "read failed; retrying");
                    self.pause(stop).await;
                }
            }
        }
    }

    /// A change already queued, without waiting (to take a burst of events at once).
    pub fn try_next_event(&mut self) -> Option<WatchEvent> {
        self.stream.as_mut()?.try_recv().ok()
    }

    async fn pause(&self, stop: &CancellationToken) {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(self.retry) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::MemStore;

    #[tokio::test]
    async fn snapshot_then_events_then_stop() {
        let meta: Arc<dyn MetaStore> = Arc::new(MemStore::open(None, "").unwrap());
        meta.put("a/1", b"x".to_vec(), None).await.unwrap();
        meta.put("b/1", b"y".to_vec(), None).await.unwrap();
        let stop = CancellationToken::new();
        let mut f = Follower::new(meta.clone(), "a/", Duration::from_millis(10));
        match f.next(&stop).await.unwrap() {
            Followed::Snapshot(kvs) => {
                assert_eq!(kvs.len(), 1);
                assert_eq!(kvs[0].key, "a/1");
            }
            other => panic!("{other:?}"),
        }
        meta.put("a/2", b"z".to_vec(), None).await.unwrap();
        meta.put("b/2", b"w".to_vec(), None).await.unwrap();
        meta.delete("a/1").await.unwrap();
        match f.next(&stop).await.unwrap() {
            Followed::Event(WatchEvent::Put(kv)) => assert_eq!(kv.key, "a/2"),
            other => panic!("{other:?}"),
        }
        match f.next(&stop).await.unwrap() {
            Followed::Event(WatchEvent::Delete { key, .. }) => assert_eq!(key, "a/1"),
            other => panic!("{other:?}"),
        }
        stop.cancel();
        assert!(f.next(&stop).await.is_none());
    }
}
