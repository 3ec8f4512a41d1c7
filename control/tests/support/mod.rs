//! What the REST tests share: a control process on 127.0.0.1:0 over a `MemStore`, tokens
//! issued on its store (as an operator would), a client sending one, and raw HTTP for the
//! requests the client cannot or would not send.
#![allow(dead_code, clippy::unwrap_used)]

use serde_json::Value;
use shoal_control::{Control, ControlConfig, DEFAULT_MAX_INVOKE_BODY};
use shoal_control_client::{ClientError, ControlClient, ErrorCode};
use shoal_meta::records::{Role, SYSTEM_TENANT};
use shoal_meta::{MemStore, MetaStore};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Waits until `cond` holds, failing the test (naming `what`) after ten seconds.
pub(crate) async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    shoal_devcluster::wait::wait_for_async(what, Duration::from_secs(10), || {
        let c = cond();
        async move { c.await.then_some(()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

pub(crate) fn config(max_invoke_body: usize) -> ControlConfig {
    ControlConfig {
        meta_addr: None,
        meta_tls: None,
        http_addr: "127.0.0.1:0".parse().unwrap(),
        election_ttl: Duration::from_secs(2),
        name: "test-control".into(),
        max_invoke_body,
        frontend: Default::default(),
        admin_token_file: None,
    }
}

/// A control with `cfg` on `meta` that has become leader.
pub(crate) async fn start_cfg(cfg: ControlConfig, meta: Arc<dyn MetaStore>) -> Control {
    let c = Control::start(cfg, meta, None).await.unwrap();
    wait_until("becomes leader", || async { c.is_leader() }).await;
    c
}

pub(crate) async fn start_with(meta: Arc<dyn MetaStore>, max_invoke_body: usize) -> Control {
    start_cfg(config(max_invoke_body), meta).await
}

/// A leading control on a fresh store, and an operator token (the system tenant's admin).
pub(crate) async fn start() -> (Control, Arc<MemStore>, String) {
    let store = Arc::new(MemStore::open(None, "").unwrap());
    let admin = issue(store.as_ref(), SYSTEM_TENANT, Role::Admin).await;
    (
        start_with(store.clone(), DEFAULT_MAX_INVOKE_BODY).await,
        store,
        admin,
    )
}

/// A token of `role` in `tenant`, issued on the store as control's token route would.
pub(crate) async fn issue(store: &dyn MetaStore, tenant: &str, role: Role) -> String {
    shoal_meta::issue_token(store, tenant, role, "test", None)
        .await
        .unwrap()
        .token
}

/// A client of the control at `addr` sending `token`.
pub(crate) fn client(addr: SocketAddr, token: &str) -> ControlClient {
    ControlClient::new(&addr.to_string())
        .unwrap()
        .with_token(token)
        .unwrap()
}

/// A client sending no token.
pub(crate) fn anonymous(addr: SocketAddr) -> ControlClient {
    ControlClient::new(&addr.to_string()).unwrap()
}

/// Asserts a refusal: status and stable code; the message.
pub(crate) fn refused<T: std::fmt::Debug>(
    r: Result<T, ClientError>,
    status: u16,
    code: ErrorCode,
) -> String {
    match r {
        Err(ClientError::Api {
            status: s,
            code: c,
            message,
        }) => {
            assert_eq!((s, c), (status, code), "{message}");
            message
        }
        other => panic!("expected {status} {code}, got {other:?}"),
    }
}

/// One answer: status, lower-cased headers, body.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Answer {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Asserts an error answer: status and stable code.
    pub(crate) fn error(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status, status, "{}", self.text());
        let j = self.json();
        assert_eq!(j["code"], code, "{j}");
        j["message"].as_str().unwrap().to_string()
    }
}

pub(crate) fn parse(raw: &[u8]) -> Answer {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = std::str::from_utf8(&raw[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// The header line carrying `token`, if any.
pub(crate) fn auth_line(token: Option<&str>) -> String {
    token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"))
}

/// Sends one request (`Connection: close`, with `token` as bearer when given) and reads the
/// answer to EOF.
pub(crate) async fn request(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: &[u8],
) -> Answer {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{}Content-Length: {}\r\n\r\n",
        auth_line(token),
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    parse(&raw)
}

pub(crate) async fn get(addr: SocketAddr, token: Option<&str>, path: &str) -> Answer {
    request(addr, token, "GET", path, b"").await
}

pub(crate) async fn send_json(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    v: &Value,
) -> Answer {
    request(addr, token, method, path, v.to_string().as_bytes()).await
}
