//! Control's REST API: the route table (`ROUTES`, the single source of truth that
//! `openapi.json` is tested against) and one handler per route.
//!
//! Conventions:
//! - JSON in and out. Errors are `{"code": "<ErrorCode name>", "message": "..."}` with the
//!   HTTP status derived from the code alone (`status_of`): `NotFound` 404,
//!   `AlreadyExists` 409 (also a stale-version update, whose message starts with
//!   "version conflict"), `InvalidArgument` 400, `Unauthenticated` 401 (with
//!   `WWW-Authenticate: Bearer`), `PermissionDenied` 403, `TooLarge` 413, `Overloaded` and
//!   `QuotaExceeded` 429, `InstanceFailed` 502, `Unavailable` 503, `Timeout` 504, anything
//!   else 500. The one exception: a known path with an unknown method is 405 with code
//!   `InvalidArgument` and an `Allow` header.
//! - Every route says what it asks of the caller ([`Access`]): nothing for `/health`, a
//!   token whose role allows an action for the rest (see `auth.rs`). The check runs before
//!   anything else, the leader check included; tenant checks run where the resource is read.
//! - Request bodies are bounded: `MAX_JSON_BODY` (1 MiB) for JSON, the configured
//!   `max_invoke_body` for invoke. A declared `Content-Length` over the limit is refused
//!   before reading; otherwise reading stops at the first chunk that crosses it.
//! - Writes (routes marked `write`) are served only by the leader. A standby answers 503
//!   `Unavailable` naming the leader's HTTP address, so clients retry there; reads are
//!   served by any control. Writes stay safe if leadership moves mid-request: they are
//!   store transactions, not read-modify-write on local state.
use crate::auth::{Access, Caller};
use crate::registry::RegistryError;
use crate::{read, View};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{Request, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use shoal_httpd::Body;
use shoal_meta::records::LeaderInfo;
use shoal_meta::records::{validate_tenant, Action, FunctionSpec, Pool, Principal, Quota};
use shoal_meta::Role;
use shoal_protocol::ErrorCode;
use std::time::Duration;

/// Largest JSON request body.
pub(crate) const MAX_JSON_BODY: usize = 1 << 20;

/// The OpenAPI document of `ROUTES`, served at `/v1/openapi.json`.
pub(crate) const OPENAPI: &str = include_str!("../openapi.json");

/// HTTP methods the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verb {
    Get,
    Post,
    Put,
    Delete,
}

impl Verb {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "GET",
            Verb::Post => "POST",
            Verb::Put => "PUT",
            Verb::Delete => "DELETE",
        }
    }

    fn of(m: &hyper::Method) -> Option<Verb> {
        match *m {
            hyper::Method::GET => Some(Verb::Get),
            hyper::Method::POST => Some(Verb::Post),
            hyper::Method::PUT => Some(Verb::Put),
            hyper::Method::DELETE => Some(Verb::Delete),
            _ => None,
        }
    }
}

/// What a route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Health,
    Leader,
    Nodes,
    Metrics,
    OpenApi,
    ListFunctions,
    CreateFunction,
    GetFunction,
    UpdateFunction,
    DeleteFunction,
    FunctionInstances,
    Invoke,
    Logs,
    ListInstances,
    ListPools,
    CreatePool,
    GetPool,
    DeletePool,
    WhoAmI,
    CreateToken,
    ListTokens,
    RevokeToken,
    GetQuota,
    SetQuota,
}

/// One route: method, path template (`{param}` matches one non-empty segment), handler,
/// what it asks of the caller, and whether only the leader may serve it.
#[derive(Debug)]
pub(crate) struct Route {
    pub(crate) verb: Verb,
    pub(crate) path: &'static str,
    op: Op,
    access: Access,
    write: bool,
}

const fn r(verb: Verb, path: &'static str, op: Op, access: Access, write: bool) -> Route {
    Route {
        verb,
        path,
        op,
        access,
        write,
    }
}

use Access::{Authenticated, Open};
use Verb::{Delete, Get, Post, Put};

const READ: Access = Access::Act(Action::ReadMeta);
const DEPLOY: Access = Access::Act(Action::WriteFunctions);
const CLUSTER: Access = Access::Act(Action::ManageCluster);
const TOKENS: Access = Access::Act(Action::ManageTokens);

/// Every route the API serves.
#[rustfmt::skip]
pub(crate) const ROUTES: &[Route] = &[
    r(Get, "/health", Op::Health, Open, false),
    r(Get, "/healthz", Op::Health, Open, false),
    r(Get, "/metrics", Op::Metrics, Access::Metrics, false),
    r(Get, "/v1/leader", Op::Leader, READ, false),
    r(Get, "/v1/nodes", Op::Nodes, READ, false),
    r(Get, "/v1/openapi.json", Op::OpenApi, READ, false),
    r(Get, "/v1/whoami", Op::WhoAmI, Authenticated, false),
    r(Get, "/v1/functions", Op::ListFunctions, READ, false),
    r(Post, "/v1/functions", Op::CreateFunction, DEPLOY, true),
    r(Get, "/v1/functions/{name}", Op::GetFunction, READ, false),
    r(Put, "/v1/functions/{name}", Op::UpdateFunction, DEPLOY, true),
    r(Delete, "/v1/functions/{name}", Op::DeleteFunction, DEPLOY, true),
    r(Get, "/v1/functions/{name}/instances", Op::FunctionInstances, READ, false),
    r(Post, "/v1/functions/{name}/invoke", Op::Invoke, Access::Act(Action::Invoke), false),
    r(Get, "/v1/functions/{name}/logs", Op::Logs, READ, false),
    r(Get, "/v1/instances", Op::ListInstances, READ, false),
    r(Get, "/v1/pools", Op::ListPools, Authenticated, false),
    r(Post, "/v1/pools", Op::CreatePool, CLUSTER, true),
    r(Get, "/v1/pools/{name}", Op::GetPool, Authenticated, false),
    r(Delete, "/v1/pools/{name}", Op::DeletePool, CLUSTER, true),
    r(Post, "/v1/tokens", Op::CreateToken, TOKENS, true),
    r(Get, "/v1/tokens", Op::ListTokens, TOKENS, false),
    r(Delete, "/v1/tokens/{id}", Op::RevokeToken, TOKENS, true),
    r(Get, "/v1/tenants/{tenant}/quota", Op::GetQuota, Authenticated, false),
    r(Put, "/v1/tenants/{tenant}/quota", Op::SetQuota, CLUSTER, true),
];

/// The path parameter of a match (every template has at most one).
fn match_path<'p>(template: &str, path: &'p str) -> Option<Option<&'p str>> {
    let mut param = None;
    let mut t = template.split('/');
    let mut p = path.split('/');
    loop {
        match (t.next(), p.next()) {
            (None, None) => return Some(param),
            (Some(ts), Some(ps)) => {
                if ts.starts_with('{') && ts.ends_with('}') {
                    if ps.is_empty() {
                        return None;
                    }
                    param = Some(ps);
                } else if ts != ps {
                    return None;
                }
            }
            _ => return None,
        }
    }
}

/// An error answer: a stable code and a message for people.
#[derive(Debug)]
pub(crate) struct ApiError {
    code: ErrorCode,
    message: String,
}

impl ApiError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }

    /// The stable code.
    #[cfg(test)]
    pub(crate) fn code(&self) -> ErrorCode {
        self.code
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        ApiError::new(e.code(), e.to_string())
    }
}

/// Default deadline of a call through the REST frontend.
pub(crate) const DEFAULT_INVOKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest deadline a caller may ask for.
pub(crate) const MAX_INVOKE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Query parameter `key`, as sent.
fn query_str<'q>(query: Option<&'q str>, key: &str) -> Option<&'q str> {
    query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// The `tenant` query parameter (a filter of listings), checked.
fn query_tenant(query: Option<&str>) -> Result<Option<&str>, ApiError> {
    match query_str(query, "tenant") {
        None => Ok(None),
        Some(t) => {
            validate_tenant(t)
                .map_err(|e| ApiError::new(ErrorCode::InvalidArgument, e.to_string()))?;
            Ok(Some(t))
        }
    }
}

/// Query parameter `key` as a number, else `default`.
fn query_u64(query: Option<&str>, key: &str, default: u64) -> Result<u64, ApiError> {
    let Some(v) = query_str(query, key) else {
        return Ok(default);
    };
    v.parse::<u64>().map_err(|_| {
        ApiError::new(
            ErrorCode::InvalidArgument,
            format!("{key}={v}: not a number"),
        )
    })
}

/// The call's deadline: `timeout_ms` from the query string, else the default.
fn invoke_timeout(query: Option<&str>) -> Result<Duration, ApiError> {
    let max = MAX_INVOKE_TIMEOUT.as_millis() as u64;
    let ms = query_u64(
        query,
        "timeout_ms",
        DEFAULT_INVOKE_TIMEOUT.as_millis() as u64,
    )?;
    if ms == 0 || ms > max {
        return Err(ApiError::new(
            ErrorCode::InvalidArgument,
            format!("timeout_ms={ms}: a number of milliseconds from 1 to {max}"),
        ));
    }
    Ok(Duration::from_millis(ms))
}

/// The HTTP status of an error code.
pub(crate) fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::AlreadyExists => StatusCode::CONFLICT,
        ErrorCode::InvalidArgument | ErrorCode::InvalidId => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::Overloaded | ErrorCode::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::InstanceFailed => StatusCode::BAD_GATEWAY,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

use shoal_httpd::{reply, Resp};

fn json_reply<T: serde::Serialize>(status: StatusCode, v: &T) -> Resp {
    match serde_json::to_vec(v) {
        Ok(b) => reply(status, "application/json", b),
        Err(e) => error_reply(&ApiError::new(
            ErrorCode::Internal,
            format!("encoding the answer: {e}"),
        )),
    }
}

fn error_reply(e: &ApiError) -> Resp {
    let body = json!({"code": e.code.name(), "message": e.message});
    let mut resp = reply(status_of(e.code), "application/json", body.to_string());
    if e.code == ErrorCode::Unauthenticated {
        resp.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer realm=\"shoal\""),
        );
    }
    resp
}

/// Reads a body of at most `limit` bytes.
async fn read_body(req: Request<Body>, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorCode::TooLarge,
            format!("request body is over the limit of {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match http_body_util::Limited::new(req.into_body(), limit)
        .collect()
        .await
    {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::new(
            ErrorCode::InvalidArgument,
            format!("reading the request body: {e}"),
        )),
    }
}

async fn read_json<T: for<'de> serde::Deserialize<'de>>(req: Request<Body>) -> Result<T, ApiError> {
    let body = read_body(req, MAX_JSON_BODY).await?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidArgument,
            format!("invalid JSON body: {e}"),
        )
    })
}

fn require_leader(view: &View) -> Result<(), ApiError> {
    match &*view.role.borrow() {
        Role::Leader => Ok(()),
        Role::Follower { leader } => {
            let msg = match serde_json::from_slice::<LeaderInfo>(leader) {
                Ok(l) => format!(
                    "this control is a standby; send writes to the leader {} at http://{}",
                    l.name, l.http_addr
                ),
                Err(_) => "this control is a standby; the leader record is unreadable".into(),
            };
            Err(ApiError::new(ErrorCode::Unavailable, msg))
        }
        Role::Candidate => Err(ApiError::new(
            ErrorCode::Unavailable,
            "no control leads yet (election in progress); retry shortly",
        )),
    }
}

/// Answers one request.
pub(crate) async fn handle(
    req: Request<Body>,
    view: &View,
    metrics: Option<&PrometheusHandle>,
) -> Resp {
    let path = req.uri().path().to_string();
    let (role, _) = view.role();
    let matched: Vec<(&Route, Option<&str>)> = ROUTES
        .iter()
        .filter_map(|r| match_path(r.path, &path).map(|p| (r, p)))
        .collect();
    let verb = Verb::of(req.method());
    let found = matched.iter().find(|(r, _)| Some(r.verb) == verb);
    let (template, mut resp) = match found {
        Some((route, param)) => {
            let param = param.unwrap_or_default().to_string();
            let resp = match view.auth.check(route.access, req.headers()).await {
                Ok(caller) => {
                    let leads = if route.write {
                        require_leader(view)
                    } else {
                        Ok(())
                    };
                    match leads {
                        Ok(()) => dispatch(route.op, &param, req, view, metrics, caller).await,
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };
            (route.path, resp.unwrap_or_else(|e| error_reply(&e)))
        }
        None if matched.is_empty() => (
            "unknown",
            error_reply(&ApiError::new(
                ErrorCode::NotFound,
                format!("no route {} {path}", req.method()),
            )),
        ),
        None => {
            let allow: Vec<&str> = matched.iter().map(|(r, _)| r.verb.as_str()).collect();
            let mut resp = error_reply(&ApiError::new(
                ErrorCode::InvalidArgument,
                format!("{path} does not take {}", req.method()),
            ));
            *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            if let Ok(v) = allow.join(", ").parse() {
                resp.headers_mut().insert(hyper::header::ALLOW, v);
            }
            ("unknown", resp)
        }
    };
    metrics::counter!(
        "shoal_control_http_requests_total",
        "route" => template,
        "status" => resp.status().as_str().to_string()
    )
    .increment(1);
    if let Ok(v) = role.parse() {
        resp.headers_mut().insert("x-shoal-role", v);
    }
    resp
}

/// The caller of a route that is not open (the auth check gave one).
fn principal(caller: Option<&Caller>) -> Result<&Principal, ApiError> {
    caller.map(|c| &c.principal).ok_or_else(|| {
        ApiError::new(
            ErrorCode::Internal,
            "route without a caller (an open route reached a handler that needs one)",
        )
    })
}

async fn dispatch(
    op: Op,
    name: &str,
    req: Request<Body>,
    view: &View,
    metrics: Option<&PrometheusHandle>,
    caller: Option<Caller>,
) -> Result<Resp, ApiError> {
    let reg = &view.registry;
    let (role, leader) = view.role();
    let query = req.uri().query().map(str::to_string);
    let query = query.as_deref();
    Ok(match op {
        Op::Health => json_reply(
            StatusCode::OK,
            &json!({"status": "ok", "name": view.name, "role": role, "leader": leader}),
        ),
        Op::Leader => json_reply(
            StatusCode::OK,
            &json!({"role": role, "name": view.name, "leader": leader}),
        ),
        Op::Nodes => {
            let nodes: Vec<_> = read(&view.nodes).values().cloned().collect();
            json_reply(
                StatusCode::OK,
                &json!({"role": role, "leader": leader, "nodes": nodes}),
            )
        }
        Op::Metrics => match metrics {
            Some(h) => reply(StatusCode::OK, "text/plain; version=0.0.4", h.render()),
            None => {
                return Err(ApiError::new(
                    ErrorCode::NotFound,
                    "metrics are not enabled",
                ))
            }
        },
        Op::OpenApi => reply(StatusCode::OK, "application/json", OPENAPI),
        Op::WhoAmI => {
            let who = principal(caller.as_ref())?;
            json_reply(
                StatusCode::OK,
                &json!({
                    "tenant": who.tenant,
                    "role": who.role,
                    "home_tenant": crate::registry::home_tenant(who),
                    "instance": who.instance,
                }),
            )
        }
        Op::ListFunctions => {
            let who = principal(caller.as_ref())?;
            let tenant = query_tenant(query)?;
            json_reply(
                StatusCode::OK,
                &json!({"functions": reg.list_functions(who, tenant).await?}),
            )
        }
        Op::CreateFunction => {
            let who = principal(caller.as_ref())?;
            let spec: FunctionSpec = read_json(req).await?;
            json_reply(StatusCode::CREATED, &reg.create_function(who, spec).await?)
        }
        Op::GetFunction => {
            let who = principal(caller.as_ref())?;
            json_reply(StatusCode::OK, &reg.get_function(who, name).await?)
        }
        Op::UpdateFunction => {
            let who = principal(caller.as_ref())?;
            let spec: FunctionSpec = read_json(req).await?;
            json_reply(StatusCode::OK, &reg.update_function(who, name, spec).await?)
        }
        Op::DeleteFunction => {
            reg.delete_function(principal(caller.as_ref())?, name)
                .await?;
            json_reply(StatusCode::OK, &json!({"deleted": name}))
        }
        Op::FunctionInstances => {
            let who = principal(caller.as_ref())?;
            json_reply(
                StatusCode::OK,
                &json!({"instances": reg.function_instances(who, name).await?}),
            )
        }
        Op::Logs => {
            let caller = caller.as_ref();
            let who = principal(caller)?;
            let token = caller.map(Caller::token).unwrap_or_default();
            let tail =
                query_u64(query, "tail", crate::logs::DEFAULT_TAIL)?.min(crate::logs::MAX_TAIL);
            let instances = reg.function_instances(who, name).await?;
            json_reply(
                StatusCode::OK,
                &crate::logs::tails(view.meta.as_ref(), instances, tail, token).await,
            )
        }
        Op::ListInstances => {
            let who = principal(caller.as_ref())?;
            let tenant = query_tenant(query)?;
            json_reply(
                StatusCode::OK,
                &json!({"instances": reg.all_instances(who, tenant).await?}),
            )
        }
        Op::Invoke => {
            let spec = reg.get_function(principal(caller.as_ref())?, name).await?;
            let timeout = invoke_timeout(query)?;
            let args = read_body(req, view.max_invoke_body).await?;
            match view
                .frontend
                .invoke(spec.tenant(), name, &args, timeout)
                .await
            {
                Ok(out) => reply(StatusCode::OK, "application/octet-stream", out),
                Err(e) => return Err(ApiError::new(e.code, e.message)),
            }
        }
        Op::ListPools => json_reply(StatusCode::OK, &json!({"pools": reg.list_pools().await?})),
        Op::CreatePool => {
            let pool: Pool = read_json(req).await?;
            json_reply(StatusCode::CREATED, &reg.create_pool(pool).await?)
        }
        Op::GetPool => json_reply(StatusCode::OK, &reg.get_pool(name).await?),
        Op::DeletePool => {
            reg.delete_pool(name).await?;
            json_reply(StatusCode::OK, &json!({"deleted": name}))
        }
        Op::CreateToken => {
            let who = principal(caller.as_ref())?;
            let body: crate::tokens_api::TokenRequest = read_json(req).await?;
            let issued = crate::tokens_api::create(view.meta.as_ref(), who, body).await?;
            json_reply(StatusCode::CREATED, &issued)
        }
        Op::ListTokens => {
            let who = principal(caller.as_ref())?;
            let tenant = query_tenant(query)?;
            let tokens = crate::tokens_api::list(view.meta.as_ref(), who, tenant).await?;
            json_reply(StatusCode::OK, &json!({ "tokens": tokens }))
        }
        Op::RevokeToken => {
            crate::tokens_api::revoke(view.meta.as_ref(), principal(caller.as_ref())?, name)
                .await?;
            json_reply(StatusCode::OK, &json!({ "revoked": name }))
        }
        Op::GetQuota => {
            let who = principal(caller.as_ref())?;
            json_reply(StatusCode::OK, &reg.quota_status(who, name).await?)
        }
        Op::SetQuota => {
            let who = principal(caller.as_ref())?;
            let quota: Quota = read_json(req).await?;
            reg.set_quota(name, quota).await?;
            json_reply(StatusCode::OK, &reg.quota_status(who, name).await?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match() {
        assert_eq!(match_path("/v1/functions", "/v1/functions"), Some(None));
        assert_eq!(
            match_path("/v1/functions/{name}", "/v1/functions/a"),
            Some(Some("a"))
        );
        assert_eq!(match_path("/v1/functions/{name}", "/v1/functions/"), None);
        assert_eq!(match_path("/v1/functions/{name}", "/v1/functions"), None);
        assert_eq!(
            match_path("/v1/functions/{name}", "/v1/functions/a/instances"),
            None
        );
        assert_eq!(match_path("/v1/functions", "/v1/functions/"), None);
    }

    #[test]
    fn no_route_is_ambiguous() {
        for a in ROUTES {
            for b in ROUTES {
                if std::ptr::eq(a, b) || a.verb != b.verb {
                    continue;
                }
                let probe = a
                    .path
                    .replace("{name}", "x")
                    .replace("{id}", "x")
                    .replace("{tenant}", "x");
                assert!(
                    match_path(b.path, &probe).is_none(),
                    "{} {} overlaps {}",
                    a.verb.as_str(),
                    a.path,
                    b.path
                );
            }
        }
    }

    #[test]
    fn statuses() {
        assert_eq!(status_of(ErrorCode::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(status_of(ErrorCode::AlreadyExists), StatusCode::CONFLICT);
        assert_eq!(
            status_of(ErrorCode::InvalidArgument),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status_of(ErrorCode::TooLarge),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            status_of(ErrorCode::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status_of(ErrorCode::Internal),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            status_of(ErrorCode::Unauthenticated),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status_of(ErrorCode::PermissionDenied),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            status_of(ErrorCode::QuotaExceeded),
            StatusCode::TOO_MANY_REQUESTS
        );
    }

    /// Only the health routes are open; every write needs more than reading.
    #[test]
    fn only_health_is_open() {
        for route in ROUTES {
            let open = route.access == Access::Open;
            assert_eq!(
                open,
                route.path.starts_with("/health"),
                "{} {}",
                route.verb.as_str(),
                route.path
            );
            if route.write {
                assert!(
                    !matches!(route.access, Access::Open | Access::Authenticated)
                        && route.access != READ,
                    "{} {} writes with {:?}",
                    route.verb.as_str(),
                    route.path,
                    route.access
                );
            }
        }
    }
}
