//! Who a client is, and the tenant namespace its requests act in.
//!
//! At connect ([`Auth::admit`]) a client becomes a [`Caller`]: by the token its
//! [`ClientHello`] carries, checked against the [`TokenBook`] the worker follows when it has a
//! metadata store, or else by its uid (`SO_PEERCRED`) through the configured map (the
//! worker's own uid: the default tenant's admin). It acts in its credential's tenant, or in
//! the one its hello names if the credential may act there (only the operator, the system
//! tenant's admin, may name another; without a name the operator acts in the default
//! tenant). A token wins over the uid, so a function
//! instance running as the user's uid acts in its own tenant. No mapping and no token:
//! `PermissionDenied`; a token that is malformed, unknown, revoked or expired, or a token
//! on a worker without a metadata store: `Unauthenticated`.
//!
//! Then every request passes [`qualify`] before the store sees it: the role is checked
//! (a reader may only read) and every id is qualified with the caller's tenant
//! ([`ObjectId::qualified`]; the default tenant's ids stay as they are). A client never
//! names a qualified id: an id with a NUL is `InvalidId`. Since the store is keyed by
//! qualified ids, another tenant's object is simply another key: a get, delete or overwrite
//! of it is `NotFound` (or creates the caller's own), and listings hold only the caller's
//! names. Dataworkers trust each other: peer messages carry qualified ids as they are.
use shoal_meta::records::{Action, Denied, Principal};
use shoal_meta::TokenBook;
use shoal_protocol::{
    ClientHello, ErrorCode, KvEntry, ObjectId, Request, WireError, DEFAULT_TENANT, TENANT_SEPARATOR,
};
use std::collections::HashMap;
use std::time::Duration;

/// How long a connect with a token waits for the first read of `tokens/` after start.
/// Longest wait for the book to learn a well-formed token it does not know yet (one issued a
/// moment ago, e.g. control's frontend credential or an instance's).
const TOKEN_WAIT: Duration = Duration::from_secs(1);
const BOOK_WAIT: Duration = Duration::from_secs(2);

/// A connected client: who it is and what it may do in the tenant it acts in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Caller {
    /// The credential's principal (the uid mapping's, or the token's).
    pub(crate) principal: Principal,
    /// The tenant its requests act in (the principal's own, or the one the operator named).
    pub(crate) tenant: String,
    /// May read objects and keys.
    pub(crate) may_read: bool,
    /// May write them.
    pub(crate) may_write: bool,
    /// The token it presented, checked again while it is connected (a revoked token's
    /// connections are closed).
    pub(crate) token: Option<String>,
}

impl Caller {
    /// The caller of the worker itself (peers, tests): the default tenant's admin.
    #[cfg(test)]
    pub(crate) fn local_admin() -> Caller {
        Caller::new(
            Principal::new(DEFAULT_TENANT, shoal_meta::records::Role::Admin),
            None,
            None,
        )
    }

    /// `principal` acting in `tenant`, else in its own tenant; the operator (who holds no
    /// data of its own) acts in the default tenant unless it names one, as `kubectl` does.
    fn new(principal: Principal, tenant: Option<String>, token: Option<String>) -> Caller {
        let tenant = tenant.unwrap_or_else(|| {
            if principal.is_system_admin() {
                DEFAULT_TENANT.to_owned()
            } else {
                principal.tenant.clone()
            }
        });
        Caller {
            may_read: principal.authorize(Action::ReadData, &tenant).is_ok(),
            may_write: principal.authorize(Action::WriteData, &tenant).is_ok(),
            principal,
            tenant,
            token,
        }
    }
}

/// The worker's authentication: the uid map and, with a metadata store, the token book.
#[derive(Debug)]
pub(crate) struct Auth {
    uids: HashMap<u32, Principal>,
    book: Option<TokenBook>,
}

fn refused(code: ErrorCode, msg: impl Into<String>) -> WireError {
    WireError::new(code, msg)
}

impl Auth {
    /// An authenticator over `uids` (see [`crate::Config::uid_map`]) and `book`.
    pub(crate) fn new(uids: Vec<crate::config::UidTenant>, book: Option<TokenBook>) -> Auth {
        Auth {
            uids: uids
                .into_iter()
                .map(|m| (m.uid, Principal::new(&m.tenant, m.role)))
                .collect(),
            book,
        }
    }

    /// The principal a bearer token stands for now.
    pub(crate) async fn authenticate(&self, token: &str) -> Result<Principal, WireError> {
        let Some(book) = &self.book else {
            return Err(refused(
                ErrorCode::Unauthenticated,
                "this dataworker has no metadata store to check tokens with",
            ));
        };
        book.loaded(BOOK_WAIT).await;
        book.authenticate_within(token, TOKEN_WAIT)
            .await
            .map_err(|e| match e {
                Denied::Unauthenticated => refused(
                    ErrorCode::Unauthenticated,
                    "token is malformed, unknown, revoked or expired",
                ),
                other => refused(ErrorCode::PermissionDenied, other.to_string()),
            })
    }

    /// Whether `token` still stands for the same principal (checked while connected).
    pub(crate) fn still_valid(&self, token: &str, principal: &Principal) -> bool {
        self.book
            .as_ref()
            .is_some_and(|b| b.authenticate(token).is_ok_and(|p| &p == principal))
    }

    /// Decides who a client of `uid` that sent `hello` is; see the module docs.
    pub(crate) async fn admit(&self, uid: u32, hello: ClientHello) -> Result<Caller, WireError> {
        hello.check()?;
        let principal = match &hello.token {
            Some(token) => self.authenticate(token).await?,
            None => self.uids.get(&uid).cloned().ok_or_else(|| {
                refused(
                    ErrorCode::PermissionDenied,
                    format!("uid {uid} is not mapped to a tenant; present a token"),
                )
            })?,
        };
        if let Some(t) = &hello.tenant {
            shoal_meta::records::validate_tenant(t)
                .map_err(|e| refused(ErrorCode::InvalidArgument, e.to_string()))?;
            if principal.authorize(Action::ReadData, t).is_err()
                && principal.authorize(Action::WriteData, t).is_err()
            {
                return Err(refused(
                    ErrorCode::PermissionDenied,
                    format!(
                        "tenant {}'s credential may not act in tenant {t}",
                        principal.tenant
                    ),
                ));
            }
        }
        let caller = Caller::new(principal, hello.tenant, hello.token);
        if !caller.may_read && !caller.may_write {
            return Err(refused(
                ErrorCode::PermissionDenied,
                format!(
                    "role {} may neither read nor write data",
                    caller.principal.role
                ),
            ));
        }
        Ok(caller)
    }
}

fn id(id: ObjectId, tenant: &str) -> Result<ObjectId, WireError> {
    if id.is_qualified() {
        return Err(WireError::new(
            ErrorCode::InvalidId,
            "ids may not contain a NUL byte",
        ));
    }
    Ok(id.qualified(tenant))
}

fn ids(v: Vec<ObjectId>, tenant: &str) -> Result<Vec<ObjectId>, WireError> {
    v.into_iter().map(|i| id(i, tenant)).collect()
}

/// Checks `req` against the caller's role and puts every id of it in the caller's tenant;
/// see the module docs. For the default tenant nothing is copied.
pub(crate) fn qualify(req: Request, caller: &Caller) -> Result<Request, WireError> {
    let allowed = if req.writes() {
        caller.may_write
    } else {
        caller.may_read
    };
    if !allowed {
        return Err(WireError::new(
            ErrorCode::PermissionDenied,
            format!(
                "role {} may not {} data",
                caller.principal.role,
                if req.writes() { "write" } else { "read" }
            ),
        ));
    }
    let t = caller.tenant.as_str();
    Ok(match req {
        Request::Create { id: i, size } => Request::Create {
            id: id(i, t)?,
            size,
        },
        Request::Seal { id: i } => Request::Seal { id: id(i, t)? },
        Request::Abort { id: i } => Request::Abort { id: id(i, t)? },
        Request::Put { id: i, data } => Request::Put {
            id: id(i, t)?,
            data,
        },
        Request::Get { ids: v, timeout_ms } => Request::Get {
            ids: ids(v, t)?,
            timeout_ms,
        },
        Request::Delete { id: i } => Request::Delete { id: id(i, t)? },
        Request::Contains { ids: v } => Request::Contains { ids: ids(v, t)? },
        Request::List { ns, prefix, limit } => {
            if prefix.contains(TENANT_SEPARATOR) {
                return Err(WireError::new(
                    ErrorCode::InvalidId,
                    "a prefix may not contain a NUL byte",
                ));
            }
            let prefix = if t == DEFAULT_TENANT {
                prefix
            } else {
                format!("{t}{TENANT_SEPARATOR}{prefix}")
            };
            Request::List { ns, prefix, limit }
        }
        Request::KvSet {
            key,
            value,
            ttl_secs,
            if_absent,
        } => Request::KvSet {
            key: id(key, t)?,
            value,
            ttl_secs,
            if_absent,
        },
        Request::KvCreate { key, size } => Request::KvCreate {
            key: id(key, t)?,
            size,
        },
        Request::KvCommit { key, ttl_secs } => Request::KvCommit {
            key: id(key, t)?,
            ttl_secs,
        },
        Request::KvMSet { entries, ttl_secs } => Request::KvMSet {
            entries: entries
                .into_iter()
                .map(|e| {
                    Ok(KvEntry {
                        key: id(e.key, t)?,
                        value: e.value,
                    })
                })
                .collect::<Result<_, WireError>>()?,
            ttl_secs,
        },
        Request::KvGet { keys } => Request::KvGet {
            keys: ids(keys, t)?,
        },
        Request::KvRead { key, offset, len } => Request::KvRead {
            key: id(key, t)?,
            offset,
            len,
        },
        Request::KvDel { keys } => Request::KvDel {
            keys: ids(keys, t)?,
        },
        Request::KvExists { keys } => Request::KvExists {
            keys: ids(keys, t)?,
        },
        Request::KvExpire { key, ttl_secs } => Request::KvExpire {
            key: id(key, t)?,
            ttl_secs,
        },
        Request::KvTtl { key } => Request::KvTtl { key: id(key, t)? },
        r @ (Request::Release { .. } | Request::Status) => r,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UidTenant;
    use shoal_meta::records::Role;

    fn oid(s: &str) -> ObjectId {
        ObjectId::new(s).unwrap()
    }

    fn auth() -> Auth {
        Auth::new(
            vec![
                UidTenant {
                    uid: 1,
                    tenant: "team-a".into(),
                    role: Role::Reader,
                },
                UidTenant {
                    uid: 2,
                    tenant: DEFAULT_TENANT.into(),
                    role: Role::Admin,
                },
                UidTenant {
                    uid: 3,
                    tenant: "team-d".into(),
                    role: Role::Deployer,
                },
            ],
            None,
        )
    }

    #[tokio::test]
    async fn uids_map_and_unknown_ones_or_tokens_without_a_store_are_refused() {
        let a = auth();
        let c = a.admit(1, ClientHello::default()).await.unwrap();
        assert_eq!(
            (c.tenant.as_str(), c.may_read, c.may_write),
            ("team-a", true, false)
        );
        let e = a.admit(9, ClientHello::default()).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::PermissionDenied);
        let with_token = ClientHello {
            token: Some("shoal_x".into()),
            tenant: None,
        };
        assert_eq!(
            a.admit(2, with_token).await.unwrap_err().code,
            ErrorCode::Unauthenticated,
            "a token is never ignored in favour of the uid"
        );
        // Role::allows is the one source: a deployer neither reads nor writes data.
        assert_eq!(
            a.admit(3, ClientHello::default()).await.unwrap_err().code,
            ErrorCode::PermissionDenied
        );
        // Only the operator names another tenant.
        let elsewhere = ClientHello {
            token: None,
            tenant: Some("team-b".into()),
        };
        assert_eq!(
            a.admit(2, elsewhere).await.unwrap_err().code,
            ErrorCode::PermissionDenied
        );
    }

    #[test]
    fn requests_are_qualified_and_checked() {
        let mut c = Caller::new(Principal::new("team-b", Role::Invoker), None, None);
        let r = qualify(
            Request::Put {
                id: oid("x"),
                data: vec![],
            },
            &c,
        )
        .unwrap();
        assert!(matches!(r, Request::Put { id, .. } if id.as_str() == "team-b\0x"));
        let r = qualify(
            Request::List {
                ns: shoal_protocol::Namespace::Kv,
                prefix: "p".into(),
                limit: 1,
            },
            &c,
        )
        .unwrap();
        assert!(matches!(r, Request::List { prefix, .. } if prefix == "team-b\0p"));
        let smuggled = ObjectId::parse_any("team-a\0x").unwrap();
        let e = qualify(Request::Delete { id: smuggled }, &c).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidId);
        let e = qualify(
            Request::List {
                ns: shoal_protocol::Namespace::Object,
                prefix: "team-a\0".into(),
                limit: 1,
            },
            &Caller::local_admin(),
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidId);
        c.may_write = false;
        let e = qualify(Request::Delete { id: oid("x") }, &c).unwrap_err();
        assert_eq!(e.code, ErrorCode::PermissionDenied);
        assert!(qualify(
            Request::KvGet {
                keys: vec![oid("k")]
            },
            &c
        )
        .is_ok());
        // The default tenant's ids are left as they are.
        let r = qualify(Request::Seal { id: oid("x") }, &Caller::local_admin()).unwrap();
        assert_eq!(r, Request::Seal { id: oid("x") });
    }

    #[test]
    fn the_wire_default_tenant_is_the_token_records_default_tenant() {
        assert_eq!(DEFAULT_TENANT, shoal_meta::records::DEFAULT_TENANT);
    }
}
