//! [`ControlClient`]: one method per route, each with a deadline.
use crate::error::{code_named, ClientError};
use crate::routes::Route;
use crate::types::{
    ErrorBody, FunctionList, Health, InstanceList, InstanceLogs, IssuedToken, Leader, LogList,
    Nodes, PoolList, QuotaStatus, TokenInfo, TokenList, TokenRequest, WhoAmI,
};
use bytes::Bytes;
use serde::de::{DeserializeOwned, IgnoredAny};
use shoal_meta::records::{FunctionSpec, InstanceRecord, Pool, Quota};
use std::sync::Arc;
use std::time::Duration;

/// Deadline of every request but invoke, unless [`ControlClient::with_timeout`] sets another.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How much longer than its call's deadline an invoke request waits for control's answer
/// (control answers `Timeout` itself at the call's deadline).
pub const INVOKE_MARGIN: Duration = Duration::from_secs(5);
/// The call deadline control applies when an invoke does not name one.
const CONTROL_INVOKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Most bytes of an unexpected error body kept in [`ClientError::Status`].
const SHOWN_BODY: usize = 512;

/// A client of one control process's REST API (`http://host:port`). Cheap to clone; clones
/// share connections.
///
/// Every route but `/health` needs a token: give it with [`ControlClient::with_token`]
/// ([`crate::find_token`] finds the one a user has); without one, control answers
/// `Unauthenticated`.
#[derive(Debug, Clone)]
pub struct ControlClient {
    base: String,
    http: reqwest::Client,
    timeout: Duration,
    token: Option<Bearer>,
}

/// The `Authorization` header value, marked sensitive (kept out of debug output and HTTP/2
/// header compression).
#[derive(Clone)]
struct Bearer(reqwest::header::HeaderValue);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bearer <secret>")
    }
}

/// A request body and its content type.
struct Body {
    bytes: Bytes,
    content_type: &'static str,
}

impl ControlClient {
    /// A client of the control at `base`: `host:port` or `http://host:port` (an `https://`
    /// address works too, verified with the platform's certificates).
    pub fn new(base: &str) -> Result<ControlClient, ClientError> {
        let trimmed = base.trim();
        let with_scheme = if trimmed.contains("://") {
            trimmed.to_string()
        } else {
            format!("http://{trimmed}")
        };
        let invalid = |reason: String| ClientError::InvalidAddress {
            base: base.to_string(),
            reason,
        };
        let url = reqwest::Url::parse(&with_scheme).map_err(|e| invalid(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid(format!("scheme {:?}: http or https", url.scheme())));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid("no host".into()));
        }
        if url.path() != "/" || url.query().is_some() {
            return Err(invalid("expected host:port, without a path".into()));
        }
        let setup = |e: Box<dyn std::error::Error + Send + Sync>| ClientError::Setup(e);
        // reqwest is built with `rustls-no-provider`: give it the ring provider here rather
        // than installing a process-wide default.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls_platform_verifier::Verifier::new(provider.clone())
            .map_err(|e| setup(Box::new(e)))?;
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| setup(Box::new(e)))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(CONNECT_TIMEOUT)
            .no_proxy()
            .build()
            .map_err(|e| setup(Box::new(e)))?;
        Ok(ControlClient {
            base: url.as_str().trim_end_matches('/').to_string(),
            http,
            timeout: DEFAULT_TIMEOUT,
            token: None,
        })
    }

    /// The same client sending `token` as `Authorization: Bearer <token>` on every request.
    /// [`ClientError::InvalidToken`] if it cannot be a header value (it is not checked
    /// otherwise: control decides).
    pub fn with_token(mut self, token: &str) -> Result<ControlClient, ClientError> {
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .map_err(|_| ClientError::InvalidToken)?;
        v.set_sensitive(true);
        self.token = Some(Bearer(v));
        Ok(self)
    }

    /// Whether requests carry a token.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// The same client with another deadline for each request (invoke excepted).
    pub fn with_timeout(mut self, timeout: Duration) -> ControlClient {
        self.timeout = timeout;
        self
    }

    /// The base URL requests go to (`http://host:port`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET /health`: whether the process answers, and its role.
    pub async fn health(&self) -> Result<Health, ClientError> {
        self.json(Route::Health, None, None, None).await
    }

    /// `GET /v1/leader`: the answering control's role and, from a standby, the leader.
    pub async fn leader(&self) -> Result<Leader, ClientError> {
        self.json(Route::Leader, None, None, None).await
    }

    /// `GET /v1/nodes`: the dataworkers registered now.
    pub async fn nodes(&self) -> Result<Nodes, ClientError> {
        self.json(Route::Nodes, None, None, None).await
    }

    /// `GET /v1/functions`: every function.
    pub async fn functions(&self) -> Result<Vec<FunctionSpec>, ClientError> {
        let l: FunctionList = self.json(Route::ListFunctions, None, None, None).await?;
        Ok(l.functions)
    }

    /// `POST /v1/functions`: creates a function; the answer carries its version (1).
    /// `AlreadyExists` if the name is taken, `InvalidArgument` naming a bad field.
    pub async fn create_function(&self, spec: &FunctionSpec) -> Result<FunctionSpec, ClientError> {
        let body = json_body(spec)?;
        self.json(Route::CreateFunction, None, None, Some(body))
            .await
    }

    /// `GET /v1/functions/{name}`.
    pub async fn function(&self, name: &str) -> Result<FunctionSpec, ClientError> {
        self.json(Route::GetFunction, Some(name), None, None).await
    }

    /// `PUT /v1/functions/{name}`: replaces the function; `spec.version` must be the version
    /// read (else `AlreadyExists`, "version conflict"). The answer carries the new version.
    pub async fn update_function(
        &self,
        name: &str,
        spec: &FunctionSpec,
    ) -> Result<FunctionSpec, ClientError> {
        let body = json_body(spec)?;
        self.json(Route::UpdateFunction, Some(name), None, Some(body))
            .await
    }

    /// `DELETE /v1/functions/{name}`.
    pub async fn delete_function(&self, name: &str) -> Result<(), ClientError> {
        let _: IgnoredAny = self
            .json(Route::DeleteFunction, Some(name), None, None)
            .await?;
        Ok(())
    }

    /// The instances of `function` (`GET /v1/functions/{name}/instances`, `NotFound` for an
    /// unknown function), or of every function (`GET /v1/instances`).
    pub async fn instances(
        &self,
        function: Option<&str>,
    ) -> Result<Vec<InstanceRecord>, ClientError> {
        let l: InstanceList = match function {
            Some(f) => {
                self.json(Route::FunctionInstances, Some(f), None, None)
                    .await?
            }
            None => self.json(Route::ListInstances, None, None, None).await?,
        };
        Ok(l.instances)
    }

    /// `POST /v1/functions/{name}/invoke`: one call through control's REST frontend; the
    /// function's answer. `timeout` is the call's deadline (control's default when `None`);
    /// the request waits that long plus [`INVOKE_MARGIN`].
    pub async fn invoke(
        &self,
        name: &str,
        args: impl Into<Bytes>,
        timeout: Option<Duration>,
    ) -> Result<Bytes, ClientError> {
        let query = timeout.map(|t| format!("timeout_ms={}", t.as_millis()));
        let wait = timeout.unwrap_or(CONTROL_INVOKE_TIMEOUT) + INVOKE_MARGIN;
        let body = Body {
            bytes: args.into(),
            content_type: "application/octet-stream",
        };
        self.send(Route::Invoke, Some(name), query, Some(body), wait)
            .await
    }

    /// `GET /v1/functions/{name}/logs`: the tail of each instance's stdout and stderr,
    /// `tail` bytes of each at most (control's default when `None`).
    pub async fn logs(
        &self,
        name: &str,
        tail: Option<u64>,
    ) -> Result<Vec<InstanceLogs>, ClientError> {
        let query = tail.map(|t| format!("tail={t}"));
        let l: LogList = self.json(Route::Logs, Some(name), query, None).await?;
        Ok(l.instances)
    }

    /// `GET /v1/pools`: every pool.
    pub async fn pools(&self) -> Result<Vec<Pool>, ClientError> {
        let l: PoolList = self.json(Route::ListPools, None, None, None).await?;
        Ok(l.pools)
    }

    /// `POST /v1/pools`: creates a pool.
    pub async fn create_pool(&self, pool: &Pool) -> Result<Pool, ClientError> {
        let body = json_body(pool)?;
        self.json(Route::CreatePool, None, None, Some(body)).await
    }

    /// `GET /v1/pools/{name}`.
    pub async fn pool(&self, name: &str) -> Result<Pool, ClientError> {
        self.json(Route::GetPool, Some(name), None, None).await
    }

    /// `DELETE /v1/pools/{name}`.
    pub async fn delete_pool(&self, name: &str) -> Result<(), ClientError> {
        let _: IgnoredAny = self.json(Route::DeletePool, Some(name), None, None).await?;
        Ok(())
    }

    /// `GET /v1/whoami`: the tenant and role the client's token stands for.
    pub async fn whoami(&self) -> Result<WhoAmI, ClientError> {
        self.json(Route::WhoAmI, None, None, None).await
    }

    /// `POST /v1/tokens`: issues a token; the answer holds its only copy. A tenant's admin
    /// issues in its own tenant only (`PermissionDenied` otherwise); the operator anywhere.
    pub async fn create_token(&self, req: &TokenRequest) -> Result<IssuedToken, ClientError> {
        let body = json_body(req)?;
        self.json(Route::CreateToken, None, None, Some(body)).await
    }

    /// `GET /v1/tokens`: the tokens of the caller's tenant (the operator's: every tenant's,
    /// or only `tenant`'s when given). Never a secret.
    pub async fn tokens(&self, tenant: Option<&str>) -> Result<Vec<TokenInfo>, ClientError> {
        let query = tenant.map(|t| format!("tenant={t}"));
        let l: TokenList = self.json(Route::ListTokens, None, query, None).await?;
        Ok(l.tokens)
    }

    /// `DELETE /v1/tokens/{id}`: revokes a token of the caller's tenant; it stops working
    /// within a second everywhere. `NotFound` for an unknown id or another tenant's.
    pub async fn revoke_token(&self, id: &str) -> Result<(), ClientError> {
        let _: IgnoredAny = self.json(Route::RevokeToken, Some(id), None, None).await?;
        Ok(())
    }

    /// `GET /v1/tenants/{tenant}/quota`: the tenant's limits and what it uses.
    pub async fn quota(&self, tenant: &str) -> Result<QuotaStatus, ClientError> {
        self.json(Route::GetQuota, Some(tenant), None, None).await
    }

    /// `PUT /v1/tenants/{tenant}/quota`: replaces the tenant's limits (the operator only).
    pub async fn set_quota(&self, tenant: &str, quota: &Quota) -> Result<QuotaStatus, ClientError> {
        let body = json_body(quota)?;
        self.json(Route::SetQuota, Some(tenant), None, Some(body))
            .await
    }

    /// A request whose success answer is JSON of type `T`.
    async fn json<T: DeserializeOwned>(
        &self,
        route: Route,
        name: Option<&str>,
        query: Option<String>,
        body: Option<Body>,
    ) -> Result<T, ClientError> {
        let bytes = self.send(route, name, query, body, self.timeout).await?;
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode {
            method: route.spec().0,
            path: route.path(name),
            source,
        })
    }

    /// One request: the body of a 2xx answer, else the error control gave.
    async fn send(
        &self,
        route: Route,
        name: Option<&str>,
        query: Option<String>,
        body: Option<Body>,
        timeout: Duration,
    ) -> Result<Bytes, ClientError> {
        let (method, _) = route.spec();
        let path = route.path(name);
        let url = match &query {
            Some(q) => format!("{}{path}?{q}", self.base),
            None => format!("{}{path}", self.base),
        };
        let verb = match method {
            "POST" => reqwest::Method::POST,
            "PUT" => reqwest::Method::PUT,
            "DELETE" => reqwest::Method::DELETE,
            _ => reqwest::Method::GET,
        };
        let mut req = self.http.request(verb, url).timeout(timeout);
        if let Some(Bearer(v)) = &self.token {
            req = req.header(reqwest::header::AUTHORIZATION, v.clone());
        }
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, b.content_type)
                .body(b.bytes);
        }
        let failed = |e: reqwest::Error| {
            if e.is_timeout() {
                ClientError::Timeout {
                    method,
                    path: path.clone(),
                    base: self.base.clone(),
                    after: timeout,
                }
            } else {
                ClientError::Transport {
                    method,
                    path: path.clone(),
                    base: self.base.clone(),
                    source: e,
                }
            }
        };
        let resp = req.send().await.map_err(failed)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(failed)?;
        if status.is_success() {
            return Ok(bytes);
        }
        Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(e) => ClientError::Api {
                status: status.as_u16(),
                code: code_named(&e.code),
                message: e.message,
            },
            Err(_) => ClientError::Status {
                method,
                path,
                status: status.as_u16(),
                body: String::from_utf8_lossy(&bytes[..bytes.len().min(SHOWN_BODY)]).into_owned(),
            },
        })
    }
}

/// `v` as a JSON request body.
fn json_body<T: serde::Serialize>(v: &T) -> Result<Body, ClientError> {
    Ok(Body {
        bytes: serde_json::to_vec(v).map_err(ClientError::Encode)?.into(),
        content_type: "application/json",
    })
}
