//! The token routes: `POST /v1/tokens` issues one, `GET /v1/tokens` lists them (never a secret,
//! nor its hash), `DELETE /v1/tokens/{id}` revokes one. The router has already checked that
//! the caller's role may [`Action::ManageTokens`] in its own tenant; here each request is
//! checked against the tenant it touches:
//! - a tenant's admin issues tokens of any role in its own tenant only; only the operator
//!   (the system tenant's admin) issues them for another tenant or for the system tenant;
//! - listings hold the caller's tenant only (the operator sees all, or `?tenant=`);
//! - another tenant's token cannot be revoked, and answers 404 as a missing one does.
//!
//! A request naming no tenant issues in the caller's home tenant (the operator's is
//! `default`, where the local user's functions go), as function creation does.
use crate::auth::denied;
use crate::registry::{home_tenant, sees};
use crate::router::ApiError;
use serde::{Deserialize, Serialize};
use shoal_meta::records::{
    token_key, Action, InstanceBinding, Principal, Role, TokenRecord, TOKENS_PREFIX,
};
use shoal_meta::{issue_token, revoke_token, IssueError, MetaStore};
use shoal_protocol::ErrorCode;
use std::time::Duration;

/// Longest lifetime a token may be given: ten years.
pub(crate) const MAX_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

/// `POST /v1/tokens`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// The tenant it acts for (default: the caller's home tenant).
    #[serde(default)]
    tenant: Option<String>,
    /// What it may do there.
    role: Role,
    /// What it is for.
    #[serde(default)]
    description: Option<String>,
    /// Lifetime in seconds (default: no expiry).
    #[serde(default)]
    ttl_secs: Option<u64>,
}

/// A token's record as the API shows it: everything but the secret's hash.
#[derive(Debug, Serialize)]
pub(crate) struct TokenView {
    id: String,
    tenant: String,
    role: Role,
    created_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_ms: Option<u64>,
    description: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    instance: Option<InstanceBinding>,
}

impl From<TokenRecord> for TokenView {
    fn from(r: TokenRecord) -> TokenView {
        TokenView {
            id: r.id,
            tenant: r.tenant,
            role: r.role,
            created_ms: r.created_ms,
            expires_ms: r.expires_ms,
            description: r.description,
            instance: r.instance,
        }
    }
}

/// The answer to `POST /v1/tokens`: the token (its only copy) and its record.
#[derive(Debug, Serialize)]
pub(crate) struct IssuedView {
    token: String,
    record: TokenView,
}

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidArgument, msg)
}

/// Issues a token as `who` asks.
pub(crate) async fn create(
    meta: &dyn MetaStore,
    who: &Principal,
    req: TokenRequest,
) -> Result<IssuedView, ApiError> {
    let tenant = match req.tenant.filter(|t| !t.is_empty()) {
        Some(t) => t,
        None => home_tenant(who).to_string(),
    };
    if let Err(d) = who.authorize(Action::ManageTokens, &tenant) {
        return Err(match d {
            shoal_meta::records::Denied::OtherTenant => ApiError::new(
                ErrorCode::PermissionDenied,
                format!(
                    "a token of tenant `{}` may issue tokens only in its own tenant",
                    who.tenant
                ),
            ),
            d => denied(d, "token"),
        });
    }
    let ttl = match req.ttl_secs {
        None => None,
        Some(s) if (1..=MAX_TTL_SECS).contains(&s) => Some(Duration::from_secs(s)),
        Some(s) => {
            return Err(invalid(format!(
                "invalid `ttl_secs`: {s} is not within 1..={MAX_TTL_SECS}"
            )))
        }
    };
    let description = req.description.unwrap_or_default();
    let issued = issue_token(meta, &tenant, req.role, &description, ttl)
        .await
        .map_err(|e| match e {
            IssueError::Invalid(e) => invalid(e.to_string()),
            IssueError::Meta(e) => ApiError::new(e.code(), e.to_string()),
        })?;
    tracing::info!(id = %issued.record.id, tenant = %tenant, role = %req.role, by = %who.tenant, "token issued");
    Ok(IssuedView {
        token: issued.token,
        record: issued.record.into(),
    })
}

/// The tokens `who` sees, only those of `tenant` when given; by id.
pub(crate) async fn list(
    meta: &dyn MetaStore,
    who: &Principal,
    tenant: Option<&str>,
) -> Result<Vec<TokenView>, ApiError> {
    let (kvs, _) = meta
        .range(TOKENS_PREFIX)
        .await
        .map_err(|e| ApiError::new(e.code(), e.to_string()))?;
    Ok(kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice::<TokenRecord>(&kv.value).ok())
        .filter(|r| sees(who, &r.tenant) && tenant.is_none_or(|t| r.tenant == t))
        .map(TokenView::from)
        .collect())
}

/// Revokes token `id`, if `who` sees its tenant (else `NotFound`, as for a missing one).
pub(crate) async fn revoke(
    meta: &dyn MetaStore,
    who: &Principal,
    id: &str,
) -> Result<(), ApiError> {
    if id.len() != 16 || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(invalid(format!(
            "invalid token id `{id}`: 16 lowercase hex digits"
        )));
    }
    let missing = || ApiError::new(ErrorCode::NotFound, format!("token `{id}` not found"));
    let store = |e: shoal_meta::MetaError| ApiError::new(e.code(), e.to_string());
    let kv = meta.get(&token_key(id)).await.map_err(store)?;
    let record = kv
        .and_then(|kv| serde_json::from_slice::<TokenRecord>(&kv.value).ok())
        .ok_or_else(missing)?;
    if !sees(who, &record.tenant) {
        return Err(missing());
    }
    if !revoke_token(meta, id).await.map_err(store)? {
        return Err(missing());
    }
    tracing::info!(id, tenant = %record.tenant, by = %who.tenant, "token revoked");
    Ok(())
}
