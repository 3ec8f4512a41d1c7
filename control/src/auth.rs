//! Who is asking, and whether they may: the authentication and route-level authorization of
//! control's REST API.
//!
//! Every route but `GET /health` and `GET /healthz` needs `Authorization: Bearer <token>`,
//! checked against control's [`TokenBook`] (it follows `tokens/` in the store, so a revoked
//! token stops working within a second). The answers:
//! - 401 `Unauthenticated` with `WWW-Authenticate: Bearer`: no token, or a malformed, unknown,
//!   revoked or expired one. The message is the same for all of them.
//! - 403 `PermissionDenied`: the token is good but its role does not allow the route's
//!   [`Action`] (pool writes and quota writes need [`Action::ManageCluster`], which only the
//!   operator, the system tenant's admin, has).
//! - 404 `NotFound`: the resource belongs to another tenant. That check needs the resource,
//!   so it is made where it is read (the registry, the token routes), with the message a
//!   missing resource gets.
//! - 503 `Unavailable`: the book has not read `tokens/` yet (store unreachable since start).
//!
//! `/metrics` is open when control's HTTP listener is bound to a loopback address (only this
//! machine reaches it); bound elsewhere it needs a token of the system tenant.
use crate::router::ApiError;
use hyper::header::{HeaderMap, AUTHORIZATION};
use shoal_meta::records::{Action, Denied, Principal, SYSTEM_TENANT};
use shoal_meta::TokenBook;
use shoal_protocol::ErrorCode;
use std::fmt;
use std::time::Duration;

/// Longest a request waits for the token book's first read of the store.
const LOAD_WAIT: Duration = Duration::from_secs(5);

/// What a route asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Nothing (`/health`).
    Open,
    /// `/metrics`: nothing on a loopback listener, else a system-tenant token.
    Metrics,
    /// Any valid token.
    Authenticated,
    /// A valid token whose role allows the action in its own tenant.
    Act(Action),
}

/// An authenticated caller: its principal, and the bearer token it sent (forwarded to the
/// agents when control reads logs on its behalf).
#[derive(Clone)]
pub(crate) struct Caller {
    pub(crate) principal: Principal,
    token: String,
}

impl Caller {
    /// The token the caller presented.
    pub(crate) fn token(&self) -> &str {
        &self.token
    }
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the token.
        f.debug_struct("Caller")
            .field("principal", &self.principal)
            .finish_non_exhaustive()
    }
}

/// The checks, over the token book control follows.
#[derive(Debug)]
pub(crate) struct Auth {
    book: TokenBook,
    /// Whether the HTTP listener is bound to a loopback address.
    loopback: bool,
}

impl Auth {
    pub(crate) fn new(book: TokenBook, loopback: bool) -> Auth {
        Auth { book, loopback }
    }

    /// Checks a request's credentials against `access`: the caller (`None` for an open
    /// route), or the refusal to answer with.
    pub(crate) async fn check(
        &self,
        access: Access,
        headers: &HeaderMap,
    ) -> Result<Option<Caller>, ApiError> {
        let caller = match access {
            Access::Open => return Ok(None),
            Access::Metrics if self.loopback => return Ok(None),
            Access::Metrics | Access::Authenticated | Access::Act(_) => {
                self.authenticate(headers).await?
            }
        };
        match access {
            Access::Metrics if caller.principal.tenant != SYSTEM_TENANT => {
                return Err(ApiError::new(
                    ErrorCode::PermissionDenied,
                    "/metrics on a non-loopback address needs a token of the system tenant",
                ))
            }
            Access::Act(action) => {
                let own = caller.principal.tenant.clone();
                caller
                    .principal
                    .authorize(action, &own)
                    .map_err(|d| denied(d, "resource"))?;
            }
            _ => {}
        }
        Ok(Some(caller))
    }

    async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let token = bearer(headers).map_err(|d| denied(d, ""))?;
        if !self.book.loaded(LOAD_WAIT).await {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                "control has not read the tokens from the metadata store yet; retry shortly",
            ));
        }
        let principal = self.book.authenticate(token).map_err(|d| denied(d, ""))?;
        Ok(Caller {
            principal,
            token: token.to_string(),
        })
    }
}

/// The token of an `Authorization: Bearer <token>` header (the scheme in any case).
fn bearer(headers: &HeaderMap) -> Result<&str, Denied> {
    let value = headers
        .get(AUTHORIZATION)
        .ok_or(Denied::Unauthenticated)?
        .to_str()
        .map_err(|_| Denied::Unauthenticated)?;
    let (scheme, token) = value
        .trim()
        .split_once(' ')
        .ok_or(Denied::Unauthenticated)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Denied::Unauthenticated);
    }
    Ok(token.trim())
}

/// What an action is, for people.
fn describe(action: Action) -> &'static str {
    match action {
        Action::ReadMeta => "read functions, instances, pools and logs",
        Action::WriteFunctions => "create, update or delete functions",
        Action::Invoke => "invoke functions",
        Action::ReadData => "read objects and keys",
        Action::WriteData => "write objects and keys",
        Action::ManageTokens => "manage tokens",
        Action::ManageCluster => "manage the cluster (pools, quotas, nodes)",
    }
}

/// The answer to a refusal. `kind` names what another tenant's resource is called, for
/// the 404 (`function`, `token`, ...).
pub(crate) fn denied(d: Denied, kind: &str) -> ApiError {
    match d {
        Denied::Unauthenticated => ApiError::new(
            ErrorCode::Unauthenticated,
            "missing, malformed, unknown, revoked or expired token: send `Authorization: Bearer <token>` \
             (the CLI reads SHOAL_TOKEN, SHOAL_TOKEN_FILE or the runtime directory's admin.token)",
        ),
        Denied::Role { role, action } => ApiError::new(
            ErrorCode::PermissionDenied,
            format!("a token with role {role} may not {}", describe(action)),
        ),
        Denied::OtherTenant => ApiError::new(ErrorCode::NotFound, format!("{kind} not found")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn bearer_takes_the_token_of_a_bearer_header_only() {
        assert_eq!(bearer(&headers("Bearer abc")), Ok("abc"));
        assert_eq!(bearer(&headers("bearer  abc ")), Ok("abc"));
        assert_eq!(
            bearer(&headers("Basic dXNlcjpwdw==")),
            Err(Denied::Unauthenticated)
        );
        assert_eq!(bearer(&headers("Bearer")), Err(Denied::Unauthenticated));
        assert_eq!(bearer(&HeaderMap::new()), Err(Denied::Unauthenticated));
    }

    #[test]
    fn refusals_map_to_their_codes() {
        assert_eq!(
            denied(Denied::Unauthenticated, "").code(),
            ErrorCode::Unauthenticated
        );
        let role = Denied::Role {
            role: shoal_meta::records::Role::Reader,
            action: Action::WriteFunctions,
        };
        assert_eq!(denied(role, "").code(), ErrorCode::PermissionDenied);
        assert_eq!(
            denied(Denied::OtherTenant, "function").code(),
            ErrorCode::NotFound
        );
    }
}
