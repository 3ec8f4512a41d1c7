//! The REST frontend's path to the functions: `POST /v1/functions/{name}/invoke` becomes one
//! call through a node's proxy, as any caller makes it.
//!
//! Control connects lazily to the proxy socket it is configured with (and to that node's
//! dataworker, so bodies above the proxy's inline limit travel as objects), keeps the
//! connection for later calls, and drops it after a connection-level failure so the next
//! call connects afresh. Without a configured proxy, invoke answers 503 `Unavailable`.
use shoal_protocol::{ErrorCode, WireError};
use shoal_sdk::{CallClient, Client};
use std::path::PathBuf;
use std::time::Duration;

/// Where control sends the calls it takes over HTTP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrontendConfig {
    /// A node proxy's Unix socket.
    pub proxy_socket: Option<PathBuf>,
    /// That node's dataworker socket (for arguments and results above the inline limit).
    pub dataworker_socket: Option<PathBuf>,
}

#[derive(Debug)]
pub(crate) struct Frontend {
    cfg: FrontendConfig,
    client: tokio::sync::Mutex<Option<CallClient>>,
}

fn unavailable(msg: String) -> WireError {
    WireError::new(ErrorCode::Unavailable, msg)
}

impl Frontend {
    pub(crate) fn new(cfg: FrontendConfig) -> Self {
        Self {
            cfg,
            client: tokio::sync::Mutex::new(None),
        }
    }

    async fn client(&self) -> Result<CallClient, WireError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let proxy = self.cfg.proxy_socket.as_ref().ok_or_else(|| {
            unavailable("this control has no proxy to send calls to (--proxy-socket)".into())
        })?;
        let store = match &self.cfg.dataworker_socket {
            Some(s) => Some(Client::connect(s).await.map_err(|e| {
                unavailable(format!(
                    "cannot reach the dataworker at {}: {e}",
                    s.display()
                ))
            })?),
            None => None,
        };
        let c = match store {
            Some(st) => CallClient::connect_with_store(proxy, st).await,
            None => CallClient::connect(proxy).await,
        }
        .map_err(|e| {
            unavailable(format!(
                "cannot reach the proxy at {}: {e}",
                proxy.display()
            ))
        })?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Calls `function` with `args`; its result bytes, or the error with its stable code.
    pub(crate) async fn invoke(
        &self,
        function: &str,
        args: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, WireError> {
        let c = self.client().await?;
        match c.invoke(function, args, timeout).await {
            Ok(v) => Ok(v),
            Err(shoal_sdk::Error::Remote(e)) => {
                if e.code == ErrorCode::Unavailable {
                    // The proxy may be gone; connect afresh next time.
                    *self.client.lock().await = None;
                }
                Err(e)
            }
            Err(e) => {
                *self.client.lock().await = None;
                Err(WireError::new(e.code(), e.to_string()))
            }
        }
    }
}
