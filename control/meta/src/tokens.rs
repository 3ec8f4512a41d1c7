//! The token book: every component's view of `tokens/`, kept current by a [`Follower`], and
//! the calls that issue, list and revoke tokens in the store. What a token is and what it
//! allows is [`records::token`](crate::records::TokenRecord); this module only reads and
//! writes the records.
//!
//! A revoked token is a deleted record: the deletion reaches every book as a watch event,
//! within a second of the revocation on every backend. While the store is unreachable the book
//! keeps its last view (a revocation made meanwhile takes effect when it comes back).
use crate::follow::{Followed, Follower};
use crate::records::{
    parse_token, token_key, Denied, InstanceBinding, Issued, Principal, Role, TokenRecord,
    TOKENS_PREFIX, TOKEN_RANDOM_BYTES,
};
use crate::types::{KeyValue, MetaError, MetaStore, Txn, WatchEvent};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Pause between attempts to read `tokens/` while the store fails.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// Why issuing a token failed.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// A field broke its constraints.
    #[error(transparent)]
    Invalid(#[from] crate::records::InvalidSpec),
    /// The store refused or failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
}

/// The current tokens, as a follower of `tokens/` sees them. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TokenBook {
    tokens: Arc<RwLock<HashMap<String, TokenRecord>>>,
    /// 0 until the first read of `tokens/` is in; then bumped on every change.
    generation: watch::Receiver<u64>,
}

/// The task that keeps a [`TokenBook`] current; stop it with [`TokenFollower::stop`].
#[derive(Debug)]
pub struct TokenFollower {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl TokenFollower {
    /// Stops following and waits for the task to end.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

impl TokenBook {
    /// A book of `meta`'s tokens and the task that keeps it current.
    pub fn follow(meta: Arc<dyn MetaStore>) -> (TokenBook, TokenFollower) {
        let tokens = Arc::new(RwLock::new(HashMap::new()));
        let (loaded_tx, generation) = watch::channel(0u64);
        let stop = CancellationToken::new();
        let book = TokenBook { tokens, generation };
        let task = tokio::spawn(run(
            Follower::new(meta, TOKENS_PREFIX, RETRY_PAUSE),
            book.tokens.clone(),
            loaded_tx,
            stop.clone(),
        ));
        (book, TokenFollower { stop, task })
    }

    /// Waits until the first read of `tokens/` is in (or `timeout` passes); whether it is.
    pub async fn loaded(&self, timeout: Duration) -> bool {
        let mut rx = self.generation.clone();
        tokio::time::timeout(timeout, rx.wait_for(|g| *g > 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The principal `token` stands for now, or [`Denied::Unauthenticated`] if it is
    /// malformed, unknown (or revoked), wrong or expired.
    pub fn authenticate(&self, token: &str) -> Result<Principal, Denied> {
        let parts = parse_token(token)?;
        let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner());
        let record = tokens.get(parts.id).ok_or(Denied::Unauthenticated)?;
        record.check(parts.secret, now_ms())
    }

    /// Like [`TokenBook::authenticate`], but a well-formed token the book does not know yet
    /// gets up to `wait` to arrive (one issued a moment ago reaches the book as a watch
    /// event: an instance's credential, issued just before its process started). Woken by
    /// the book's changes, not by polling.
    pub async fn authenticate_within(
        &self,
        token: &str,
        wait: Duration,
    ) -> Result<Principal, Denied> {
        parse_token(token)?;
        let mut rx = self.generation.clone();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            rx.borrow_and_update();
            match self.authenticate(token) {
                Ok(p) => return Ok(p),
                Err(e) => match tokio::time::timeout_at(deadline, rx.changed()).await {
                    Ok(Ok(())) => continue,
                    _ => return Err(e),
                },
            }
        }
    }

    /// Every token the book holds (expired ones included), by id.
    pub fn list(&self) -> Vec<TokenRecord> {
        let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<TokenRecord> = tokens.values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }
}

async fn run(
    mut follower: Follower,
    tokens: Arc<RwLock<HashMap<String, TokenRecord>>>,
    generation: watch::Sender<u64>,
    stop: CancellationToken,
) {
    while let Some(next) = follower.next(&stop).await {
        let mut map = tokens.write().unwrap_or_else(|e| e.into_inner());
        match next {
            Followed::Snapshot(kvs) => {
                map.clear();
                map.extend(kvs.iter().filter_map(decode));
            }
            Followed::Event(WatchEvent::Put(kv)) => {
                if let Some((id, rec)) = decode(&kv) {
                    map.insert(id, rec);
                }
            }
            Followed::Event(WatchEvent::Delete { key, .. }) => {
                if let Some(id) = key.strip_prefix(TOKENS_PREFIX) {
                    map.remove(id);
                }
            }
        }
        drop(map);
        generation.send_modify(|g| *g += 1);
    }
}

/// A stored record whose key matches its id; anything else is ignored (and logged).
fn decode(kv: &KeyValue) -> Option<(String, TokenRecord)> {
    match serde_json::from_slice::<TokenRecord>(&kv.value) {
        Ok(rec) if token_key(&rec.id) == kv.key => Some((rec.id.clone(), rec)),
        Ok(_) => {
            tracing::warn!(key = %kv.key, "token record under the wrong key; ignored");
            None
        }
        Err(e) => {
            tracing::warn!(key = %kv.key, error = %e, "malformed token record; ignored");
            None
        }
    }
}

/// Issues a token and stores its record (create-if-absent, so two issuers never share an id).
/// The returned [`Issued::token`] is the only copy of the secret.
pub async fn issue_token(
    meta: &dyn MetaStore,
    tenant: &str,
    role: Role,
    description: &str,
    ttl: Option<Duration>,
) -> Result<Issued, IssueError> {
    store_new(meta, tenant, role, description, ttl, None).await
}

/// Issues a function instance's own credential: role `invoker` in `tenant`, bound to
/// `binding` (the proxy lets it register only as that instance). Its node's agent issues it
/// when the instance starts and revokes it when the instance ends.
pub async fn issue_instance_token(
    meta: &dyn MetaStore,
    tenant: &str,
    binding: InstanceBinding,
) -> Result<Issued, IssueError> {
    let description = format!("instance {} of {}", binding.instance, binding.function);
    store_new(
        meta,
        tenant,
        Role::Invoker,
        &description,
        None,
        Some(binding),
    )
    .await
}

async fn store_new(
    meta: &dyn MetaStore,
    tenant: &str,
    role: Role,
    description: &str,
    ttl: Option<Duration>,
    binding: Option<InstanceBinding>,
) -> Result<Issued, IssueError> {
    let now = now_ms();
    let expires = ttl.map(|t| now.saturating_add(u64::try_from(t.as_millis()).unwrap_or(u64::MAX)));
    loop {
        let mut random = [0u8; TOKEN_RANDOM_BYTES];
        getrandom::fill(&mut random).map_err(|e| MetaError::Backend(format!("random: {e}")))?;
        let mut issued = TokenRecord::issue(tenant, role, description, now, expires, &random)?;
        issued.record.instance = binding.clone();
        let key = token_key(&issued.record.id);
        let value =
            serde_json::to_vec(&issued.record).map_err(|e| MetaError::Backend(e.to_string()))?;
        if meta.txn(Txn::create(key, value)).await? {
            return Ok(issued);
        }
        // 64 random bits collided with an existing id: draw again.
    }
}

/// Deletes token `id`'s record; whether it existed.
pub async fn revoke_token(meta: &dyn MetaStore, id: &str) -> Result<bool, MetaError> {
    meta.delete(&token_key(id)).await
}

/// Milliseconds since the Unix epoch, by the wall clock (token expiry is wall-clock time).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::MemStore;

    async fn wait(book: &TokenBook, token: &str, want_ok: bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while book.authenticate(token).is_ok() != want_ok {
            assert!(
                tokio::time::Instant::now() < deadline,
                "book never caught up"
            );
            tokio::time::sleep(Duration::from_millis(5)).await; // poll interval
        }
    }

    #[tokio::test]
    async fn issued_tokens_authenticate_and_revoked_ones_stop() {
        let meta: Arc<dyn MetaStore> = Arc::new(MemStore::open(None, "").unwrap());
        let before = issue_token(&*meta, "team-a", Role::Reader, "old", None)
            .await
            .unwrap();
        let (book, follower) = TokenBook::follow(meta.clone());
        assert!(book.loaded(Duration::from_secs(5)).await);
        assert_eq!(
            book.authenticate(&before.token).unwrap(),
            Principal::new("team-a", Role::Reader)
        );

        let after = issue_token(&*meta, "team-b", Role::Admin, "new", None)
            .await
            .unwrap();
        wait(&book, &after.token, true).await;
        assert_eq!(book.list().len(), 2);

        assert!(revoke_token(&*meta, &before.record.id).await.unwrap());
        wait(&book, &before.token, false).await;
        assert_eq!(
            book.authenticate(&before.token),
            Err(Denied::Unauthenticated)
        );
        assert!(!revoke_token(&*meta, &before.record.id).await.unwrap());
        follower.stop().await;
    }

    #[tokio::test]
    async fn forged_records_and_expired_tokens_do_not_authenticate() {
        let meta: Arc<dyn MetaStore> = Arc::new(MemStore::open(None, "").unwrap());
        let good = issue_token(&*meta, "t", Role::Admin, "", None)
            .await
            .unwrap();
        // The same record under another key: ignored.
        let mut forged = good.record.clone();
        forged.id = "00000000000000ff".into();
        meta.put(
            &token_key("0000000000000001"),
            serde_json::to_vec(&forged).unwrap(),
            None,
        )
        .await
        .unwrap();
        meta.put(&token_key("garbage"), b"{".to_vec(), None)
            .await
            .unwrap();
        let short = issue_token(&*meta, "t", Role::Admin, "", Some(Duration::from_millis(1)))
            .await
            .unwrap();
        let (book, follower) = TokenBook::follow(meta.clone());
        assert!(book.loaded(Duration::from_secs(5)).await);
        assert_eq!(book.list().len(), 2, "only the two well-keyed records");
        assert!(book.authenticate(&good.token).is_ok());
        wait(&book, &short.token, false).await;
        let forged_token = good.token.replace(&good.record.id, "0000000000000001");
        assert_eq!(
            book.authenticate(&forged_token),
            Err(Denied::Unauthenticated)
        );
        follower.stop().await;
    }
}
