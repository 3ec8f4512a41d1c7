//! Who is on the other end of the proxy's Unix socket, and what it may do.
//!
//! - **The peer.** Every connection's uid (`SO_PEERCRED`) must be one the proxy allows
//!   ([`crate::ProxyConfig::allowed_uids`], or a uid of the tenant map); any other is refused
//!   with `PermissionDenied` before its hello is read any further.
//! - **Callers.** A caller that presents a token is the token's principal; one that presents
//!   none is the tenant its uid maps to ([`crate::ProxyConfig::tenant_uids`]; by default the
//!   proxy's own uid is tenant `default`), as that tenant's admin. Unmapped and without a
//!   token: `Unauthenticated`.
//! - **Instances.** An instance must present its own credential: a token whose binding names
//!   exactly the function and instance id it registers as (the node's agent issues one per
//!   instance). No token, an unknown one, or another instance's: refused. The tenant of the
//!   token is the function's tenant for the router.
//! - **Calls in flight.** Each tenant has one counter per proxy ([`TenantCalls`]), looked up
//!   once per connection; a call takes a [`Charge`] on it (one atomic add) and gives it back
//!   when it ends. Past `quotas/<tenant>`'s `calls_in_flight` a call is refused with
//!   `QuotaExceeded` at once. Calls through call lanes never reach the proxy, so a tenant with
//!   that quota is offered no lanes: all its calls are counted here.
//!
//! Tokens come from a [`TokenBook`] and quotas from a follower of `quotas/`, both on the
//! metadata store ([`Access::follow`]). Without a store no token can be checked: callers are
//! known by uid only and no instance can register.
use shoal_meta::records::{
    Action, Denied, InstanceBinding, Principal, Quota, Role, DEFAULT_TENANT, QUOTAS_PREFIX,
};
use shoal_meta::{Followed, Follower, MetaStore, TokenBook, WatchEvent};
use shoal_protocol::{ErrorCode, WireError, MAX_TOKEN_LEN};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Longest wait for the first read of `tokens/` before hellos are answered anyway.
const BOOK_WAIT: Duration = Duration::from_secs(5);
/// Longest wait for the book to learn a token it does not know (one issued a moment ago,
/// such as an instance's, issued just before its process started).
const TOKEN_WAIT: Duration = Duration::from_secs(1);
/// Pause before reading `quotas/` again after the store failed.
const RETRY_PAUSE: Duration = Duration::from_millis(300);

/// A local peer's credentials (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PeerCred {
    pub(crate) uid: u32,
}

/// One tenant's calls in flight through this proxy, and its limit (`u64::MAX`: none).
#[derive(Debug)]
pub(crate) struct TenantCalls {
    in_flight: AtomicU64,
    limit: AtomicU64,
}

impl TenantCalls {
    pub(crate) fn new() -> Self {
        Self {
            in_flight: AtomicU64::new(0),
            limit: AtomicU64::new(u64::MAX),
        }
    }

    /// One more call, unless that would pass the limit.
    pub(crate) fn charge(self: &Arc<Self>) -> Result<Charge, WireError> {
        let limit = self.limit.load(Ordering::Relaxed);
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if before >= limit {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(WireError::new(
                ErrorCode::QuotaExceeded,
                format!("the tenant's quota of {limit} calls in flight is reached"),
            ));
        }
        Ok(Charge(self.clone()))
    }

    /// Whether the tenant's calls are limited (then they all go through the proxy).
    pub(crate) fn limited(&self) -> bool {
        self.limit.load(Ordering::Relaxed) != u64::MAX
    }

    /// Calls in flight now.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// One call counted against its tenant; given back on drop.
#[derive(Debug)]
pub(crate) struct Charge(Arc<TenantCalls>);

impl Drop for Charge {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The proxy's access decisions and the state they are made from.
#[derive(Debug)]
pub(crate) struct Access {
    allowed_uids: HashSet<u32>,
    tenant_uids: HashMap<u32, String>,
    /// Set once the follower runs (on the engine's runtime).
    book: OnceLock<TokenBook>,
    /// True once tokens are loaded (or cannot be: no store, or the first read timed out).
    ready: watch::Sender<bool>,
    tenants: Mutex<HashMap<String, Arc<TenantCalls>>>,
}

/// A [`Denied`] as the wire says it; another tenant's function is not found.
pub(crate) fn denied(d: Denied, what: &str) -> WireError {
    match d {
        Denied::Unauthenticated => WireError::new(
            ErrorCode::Unauthenticated,
            "missing, unknown or expired token",
        ),
        Denied::Role { role, action } => WireError::new(
            ErrorCode::PermissionDenied,
            format!("role {role} may not {action:?}"),
        ),
        Denied::OtherTenant => {
            WireError::new(ErrorCode::NotFound, format!("no instance of {what}"))
        }
    }
}

impl Access {
    /// Access for a proxy with these uid settings; `has_store`: whether tokens and quotas
    /// will be followed.
    pub(crate) fn new(
        allowed_uids: &[u32],
        tenant_uids: &BTreeMap<u32, String>,
        has_store: bool,
    ) -> Self {
        let mut allowed: HashSet<u32> = allowed_uids.iter().copied().collect();
        allowed.extend(tenant_uids.keys().copied());
        let (ready, _) = watch::channel(!has_store);
        Self {
            allowed_uids: allowed,
            tenant_uids: tenant_uids.iter().map(|(u, t)| (*u, t.clone())).collect(),
            book: OnceLock::new(),
            ready,
            tenants: Mutex::new(HashMap::new()),
        }
    }

    /// Waits until tokens are loaded, so a hello right after the proxy started is not
    /// refused for a token the book has not read yet (at most [`BOOK_WAIT`] in all).
    pub(crate) async fn ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = tokio::time::timeout(BOOK_WAIT, rx.wait_for(|r| *r)).await;
    }

    /// Waits until the book knows `token`, at most [`TOKEN_WAIT`]: a token issued a moment ago
    /// reaches the book as a watch event. (An unknown token thus costs its connection a
    /// second before it is refused.)
    pub(crate) async fn wait_for_token(&self, token: &str) {
        if self.book.get().is_none()
            || token.len() > MAX_TOKEN_LEN
            || shoal_meta::records::parse_token(token).is_err()
        {
            return; // nothing will make it good
        }
        if let Some(book) = self.book.get() {
            let _ = book.authenticate_within(token, TOKEN_WAIT).await;
        }
    }

    /// Refuses a local peer whose uid is not allowed.
    pub(crate) fn check_peer(&self, peer: PeerCred) -> Result<(), WireError> {
        if self.allowed_uids.contains(&peer.uid) {
            return Ok(());
        }
        Err(WireError::new(
            ErrorCode::PermissionDenied,
            format!("uid {} may not use this proxy", peer.uid),
        ))
    }

    /// The principal `token` stands for now.
    pub(crate) fn authenticate(&self, token: &str) -> Result<Principal, WireError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(denied(Denied::Unauthenticated, ""));
        }
        let book = self.book.get().ok_or_else(|| {
            WireError::new(
                ErrorCode::Unauthenticated,
                "this proxy has no metadata store to check tokens with",
            )
        })?;
        book.authenticate(token).map_err(|d| denied(d, ""))
    }

    /// Who a caller connection acts as: its token's principal, else its uid's tenant.
    pub(crate) fn caller(
        &self,
        peer: PeerCred,
        token: Option<&str>,
    ) -> Result<Principal, WireError> {
        if let Some(t) = token {
            return self.authenticate(t);
        }
        match self.tenant_uids.get(&peer.uid) {
            Some(tenant) => Ok(Principal::new(tenant, Role::Admin)),
            None => Err(WireError::new(
                ErrorCode::Unauthenticated,
                format!("uid {} maps to no tenant: present a token", peer.uid),
            )),
        }
    }

    /// The principal of an instance registering as `instance` of `function`: its token must
    /// be bound to exactly that.
    pub(crate) fn instance(
        &self,
        token: Option<&str>,
        function: &str,
        instance: &str,
    ) -> Result<Principal, WireError> {
        let token = token.ok_or_else(|| {
            WireError::new(
                ErrorCode::Unauthenticated,
                "an instance must present its credential (SHOAL_TOKEN)",
            )
        })?;
        let p = self.authenticate(token)?;
        let want = InstanceBinding {
            function: function.to_owned(),
            instance: instance.to_owned(),
        };
        if p.instance.as_ref() != Some(&want) {
            return Err(WireError::new(
                ErrorCode::PermissionDenied,
                format!("this credential may not register as instance {instance} of {function}"),
            ));
        }
        Ok(p)
    }

    /// May `who` call a function of `tenant`? Another tenant's function is not found.
    pub(crate) fn may_invoke(
        who: &Principal,
        tenant: &str,
        function: &str,
    ) -> Result<(), WireError> {
        who.authorize(Action::Invoke, tenant)
            .map_err(|d| denied(d, &format!("function {function}")))
    }

    /// The calls-in-flight counter of `tenant` (created on first use).
    pub(crate) fn tenant(&self, tenant: &str) -> Arc<TenantCalls> {
        let mut map = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
        map.entry(tenant.to_owned())
            .or_insert_with(|| Arc::new(TenantCalls::new()))
            .clone()
    }

    fn set_limit(&self, tenant: &str, quota: Option<&Quota>) {
        let limit = quota.and_then(|q| q.calls_in_flight).unwrap_or(u64::MAX);
        self.tenant(tenant).limit.store(limit, Ordering::Relaxed);
    }

    /// Follows `tokens/` and `quotas/` on `meta` until `stop`.
    pub(crate) async fn follow(self: Arc<Self>, meta: Arc<dyn MetaStore>, stop: CancellationToken) {
        let (book, follower) = TokenBook::follow(meta.clone());
        let _ = self.book.set(book.clone());
        let quotas = {
            let me = self.clone();
            let stop = stop.clone();
            async move { me.follow_quotas(meta, stop).await }
        };
        let loaded = async {
            if !book.loaded(BOOK_WAIT).await {
                tracing::warn!("tokens not loaded yet; instances cannot register until they are");
            }
            self.ready.send_replace(true);
            stop.cancelled().await;
        };
        tokio::join!(quotas, loaded);
        follower.stop().await;
    }

    async fn follow_quotas(&self, meta: Arc<dyn MetaStore>, stop: CancellationToken) {
        let mut follower = Follower::new(meta, QUOTAS_PREFIX, RETRY_PAUSE);
        while let Some(next) = follower.next(&stop).await {
            match next {
                Followed::Snapshot(kvs) => {
                    let known: Vec<String> = self
                        .tenants
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .keys()
                        .cloned()
                        .collect();
                    for t in known {
                        self.set_limit(&t, None);
                    }
                    for kv in kvs {
                        self.put_quota(&kv.key, &kv.value);
                    }
                }
                Followed::Event(WatchEvent::Put(kv)) => self.put_quota(&kv.key, &kv.value),
                Followed::Event(WatchEvent::Delete { key, .. }) => {
                    if let Some(t) = key.strip_prefix(QUOTAS_PREFIX) {
                        self.set_limit(t, None);
                    }
                }
            }
        }
    }

    fn put_quota(&self, key: &str, value: &[u8]) {
        let Some(tenant) = key.strip_prefix(QUOTAS_PREFIX) else {
            return;
        };
        match serde_json::from_slice::<Quota>(value) {
            Ok(q) => self.set_limit(tenant, Some(&q)),
            Err(e) => tracing::warn!(%key, error = %e, "malformed quota record; ignored"),
        }
    }
}

/// The default uid map: the proxy's own uid is tenant `default`.
pub(crate) fn default_tenant_uids(own: u32) -> BTreeMap<u32, String> {
    BTreeMap::from([(own, DEFAULT_TENANT.to_owned())])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn charges_stop_at_the_limit_and_come_back_on_drop() {
        let t = Arc::new(TenantCalls::new());
        let many: Vec<Charge> = (0..100).map(|_| t.charge().unwrap()).collect();
        assert_eq!(t.in_flight(), 100);
        t.limit.store(100, Ordering::Relaxed);
        assert!(t.limited());
        assert_eq!(t.charge().unwrap_err().code, ErrorCode::QuotaExceeded);
        assert_eq!(t.in_flight(), 100, "a refused call changes nothing");
        drop(many);
        assert_eq!(t.in_flight(), 0);
        let one = t.charge().unwrap();
        assert_eq!(t.in_flight(), 1);
        drop(one);
        t.limit.store(0, Ordering::Relaxed);
        assert!(t.charge().is_err());
    }

    #[test]
    fn uids_map_callers_and_gate_peers() {
        let a = Access::new(&[7], &default_tenant_uids(1000), true);
        assert!(a.check_peer(PeerCred { uid: 7 }).is_ok());
        assert!(a.check_peer(PeerCred { uid: 1000 }).is_ok());
        assert_eq!(
            a.check_peer(PeerCred { uid: 8 }).unwrap_err().code,
            ErrorCode::PermissionDenied
        );
        let p = a.caller(PeerCred { uid: 1000 }, None).unwrap();
        assert_eq!(p, Principal::new(DEFAULT_TENANT, Role::Admin));
        assert_eq!(
            a.caller(PeerCred { uid: 7 }, None).unwrap_err().code,
            ErrorCode::Unauthenticated,
            "allowed, but in no tenant"
        );
        assert_eq!(
            a.caller(PeerCred { uid: 1000 }, Some("shoal_garbage"))
                .unwrap_err()
                .code,
            ErrorCode::Unauthenticated,
            "no book yet: a token cannot be checked"
        );
        assert_eq!(
            a.instance(None, "f", "i").unwrap_err().code,
            ErrorCode::Unauthenticated
        );
    }

    #[test]
    fn another_tenants_function_is_not_found() {
        let a = Principal::new("a", Role::Invoker);
        assert!(Access::may_invoke(&a, "a", "f").is_ok());
        assert_eq!(
            Access::may_invoke(&a, "b", "f").unwrap_err().code,
            ErrorCode::NotFound
        );
        let reader = Principal::new("a", Role::Reader);
        assert_eq!(
            Access::may_invoke(&reader, "a", "f").unwrap_err().code,
            ErrorCode::PermissionDenied
        );
        assert!(Access::may_invoke(&Principal::system_admin(), "b", "f").is_ok());
    }
}
