//! The REST frontend's path to the functions: `POST /v1/functions/{name}/invoke` becomes one
//! call through a node's proxy, as any caller makes it.
//!
//! Control connects lazily to the proxy socket it is configured with (and to that node's
//! dataworker, so bodies above the proxy's inline limit travel as objects), one connection per
//! tenant, with an operator credential of its own (the REST layer has already checked the
//! caller's token against the function's tenant); it keeps the connections for later calls
//! and drops one after a connection-level failure so the next call connects afresh. Without a configured proxy, invoke answers 503 `Unavailable`.
use shoal_meta::records::{Role, SYSTEM_TENANT};
use shoal_meta::{issue_token, revoke_token, MetaStore};
use shoal_protocol::{ErrorCode, WireError};
use shoal_sdk::{CallClient, CallOptions, Client, ConnectOptions};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Where control sends the calls it takes over HTTP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrontendConfig {
    /// A node proxy's Unix socket.
    pub proxy_socket: Option<PathBuf>,
    /// That node's dataworker socket (for arguments and results above the inline limit).
    pub dataworker_socket: Option<PathBuf>,
}

/// Most tenants the frontend keeps a connection for; past it, one is dropped for the new one.
const MAX_TENANT_CLIENTS: usize = 64;
/// Lifetime of the frontend's own operator credential; it is replaced at half of it.
const CREDENTIAL_TTL: Duration = Duration::from_secs(3600);

/// Control's own credential towards the node: an operator token it issues itself (short
/// lived, revoked when replaced and at shutdown), so it can call any tenant's function once
/// the REST layer has authorized the caller for that tenant.
#[derive(Debug)]
struct Credential {
    token: String,
    id: String,
    issued: std::time::Instant,
}

#[derive(Debug, Default)]
struct State {
    credential: Option<Credential>,
    /// One caller connection per tenant: the proxy checks the tenant of every call against
    /// the connection's, and payload objects live in the tenant's namespace.
    clients: HashMap<String, CallClient>,
}

#[derive(Debug)]
pub(crate) struct Frontend {
    cfg: FrontendConfig,
    meta: Arc<dyn MetaStore>,
    state: tokio::sync::Mutex<State>,
}

fn unavailable(msg: String) -> WireError {
    WireError::new(ErrorCode::Unavailable, msg)
}

impl Frontend {
    pub(crate) fn new(cfg: FrontendConfig, meta: Arc<dyn MetaStore>) -> Self {
        Self {
            cfg,
            meta,
            state: tokio::sync::Mutex::new(State::default()),
        }
    }

    /// The current credential, issuing a new one (and revoking the old) when it is past half
    /// its life; the connections made with the old one are dropped.
    async fn credential(&self, st: &mut State) -> Result<String, WireError> {
        if let Some(c) = &st.credential {
            if c.issued.elapsed() < CREDENTIAL_TTL / 2 {
                return Ok(c.token.clone());
            }
        }
        let issued = issue_token(
            self.meta.as_ref(),
            SYSTEM_TENANT,
            Role::Admin,
            "control's REST frontend",
            Some(CREDENTIAL_TTL),
        )
        .await
        .map_err(|e| unavailable(format!("issuing the frontend's credential: {e}")))?;
        if let Some(old) = st.credential.take() {
            let _ = revoke_token(self.meta.as_ref(), &old.id).await;
        }
        st.clients.clear();
        st.credential = Some(Credential {
            token: issued.token.clone(),
            id: issued.record.id,
            issued: std::time::Instant::now(),
        });
        Ok(issued.token)
    }

    async fn client(&self, tenant: &str) -> Result<CallClient, WireError> {
        let mut st = self.state.lock().await;
        let token = self.credential(&mut st).await?;
        if let Some(c) = st.clients.get(tenant) {
            return Ok(c.clone());
        }
        let proxy = self.cfg.proxy_socket.as_ref().ok_or_else(|| {
            unavailable("this control has no proxy to send calls to (--proxy-socket)".into())
        })?;
        let store = match &self.cfg.dataworker_socket {
            Some(s) => {
                let mut opts = ConnectOptions::new(s).with_token(token.clone());
                opts.tenant = Some(tenant.to_string());
                Some(Client::connect_with(opts).await.map_err(|e| {
                    unavailable(format!(
                        "cannot reach the dataworker at {}: {e}",
                        s.display()
                    ))
                })?)
            }
            None => None,
        };
        let opts = CallOptions {
            store,
            token: Some(token),
            ..CallOptions::default()
        };
        let c = CallClient::connect_with(proxy, opts).await.map_err(|e| {
            unavailable(format!(
                "cannot reach the proxy at {}: {e}",
                proxy.display()
            ))
        })?;
        if st.clients.len() >= MAX_TENANT_CLIENTS {
            if let Some(k) = st.clients.keys().next().cloned() {
                st.clients.remove(&k);
            }
        }
        st.clients.insert(tenant.to_string(), c.clone());
        Ok(c)
    }

    /// Calls `function` of `tenant` with `args` (the caller is already authorized for it);
    /// its result bytes, or the error with its stable code.
    pub(crate) async fn invoke(
        &self,
        tenant: &str,
        function: &str,
        args: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, WireError> {
        let c = self.client(tenant).await?;
        let forget = || async {
            // The proxy may be gone (or our credential expired): connect afresh next time.
            self.state.lock().await.clients.remove(tenant);
        };
        match c.invoke(function, args, timeout).await {
            Ok(v) => Ok(v),
            Err(shoal_sdk::Error::Remote(e)) => {
                if matches!(e.code, ErrorCode::Unavailable | ErrorCode::Unauthenticated) {
                    forget().await;
                }
                Err(e)
            }
            Err(e) => {
                forget().await;
                Err(WireError::new(e.code(), e.to_string()))
            }
        }
    }

    /// Revokes the frontend's credential (at control's shutdown).
    pub(crate) async fn close(&self) {
        let mut st = self.state.lock().await;
        st.clients.clear();
        if let Some(c) = st.credential.take() {
            let _ = revoke_token(self.meta.as_ref(), &c.id).await;
        }
    }
}
