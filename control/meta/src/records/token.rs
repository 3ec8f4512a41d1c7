//! Tokens and what they allow: the bearer credentials of the REST API, the metadata API and
//! local clients, stored hashed under `tokens/<id>`, and the one authorization decision every
//! component makes with them ([`Principal::authorize`]). Pure: no IO, no clock, no random
//! source (the caller passes `now` and the random bytes).
//!
//! A token reads `shoal_<id>_<secret>`: the id (16 hex digits) names its record, the secret
//! (64 hex digits, 256 random bits) is checked against the record's SHA-256 in constant time.
//! The store never holds a secret, so reading the store does not give a usable token. A token
//! is revoked by deleting its record; every component follows `tokens/`, so a revoked token
//! stops working as soon as the deletion reaches it.
//!
//! Every token belongs to one tenant and carries one role. The roles are those of a
//! Kubernetes namespace: `admin` (everything in its tenant, its tokens included), `deployer`
//! (functions and pools), `invoker` (calls and data), `reader` (list and get). The admin of
//! the reserved tenant [`SYSTEM_TENANT`] is the cluster's operator: it acts on every tenant
//! and alone may manage nodes.
use super::function::{validate_id, InvalidSpec};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shoal_protocol::IdKind;
use std::fmt;

/// Token records: `tokens/<id>`.
pub const TOKENS_PREFIX: &str = "tokens/";
/// The tenant whose admin operates the whole cluster.
pub const SYSTEM_TENANT: &str = "system";
/// The tenant a local user's data and functions belong to unless they say otherwise.
pub const DEFAULT_TENANT: &str = "default";
/// Longest description kept with a token.
pub const MAX_DESCRIPTION_LEN: usize = 256;
/// Random bytes [`TokenRecord::issue`] consumes: 8 for the id, 32 for the secret.
pub const TOKEN_RANDOM_BYTES: usize = ID_BYTES + SECRET_BYTES;

const TOKEN_PREFIX: &str = "shoal_";
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;
const TOKEN_LEN: usize = TOKEN_PREFIX.len() + 2 * ID_BYTES + 1 + 2 * SECRET_BYTES;

/// `tokens/<id>`.
pub fn token_key(id: &str) -> String {
    format!("{TOKENS_PREFIX}{id}")
}

/// Checks a tenant name with the protocol's rule ([`IdKind::Tenant`], the rule of function
/// names: 1..=63 of `a-z`, `0-9`, `-`, starting with a letter).
pub fn validate_tenant(tenant: &str) -> Result<(), InvalidSpec> {
    validate_id(IdKind::Tenant, "tenant", tenant)
}

/// What a token may do within its tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything in the tenant, its tokens included.
    Admin,
    /// Deploy, update and delete functions and pools; list and get them.
    Deployer,
    /// Invoke functions; read and write objects and keys.
    Invoker,
    /// List and get functions, instances, pools, objects and keys.
    Reader,
}

impl Role {
    /// Every role, most powerful first.
    pub const ALL: [Role; 4] = [Role::Admin, Role::Deployer, Role::Invoker, Role::Reader];

    /// The role's name on the wire (its serde name).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Deployer => "deployer",
            Role::Invoker => "invoker",
            Role::Reader => "reader",
        }
    }

    /// Whether this role may do `action` within its own tenant.
    /// [`Action::ManageCluster`] is never allowed by a role alone: see [`Principal`].
    pub fn allows(self, action: Action) -> bool {
        use Action as A;
        match self {
            Role::Admin => action != A::ManageCluster,
            Role::Deployer => matches!(action, A::ReadMeta | A::WriteFunctions),
            Role::Invoker => matches!(action, A::Invoke | A::ReadData | A::WriteData),
            Role::Reader => matches!(action, A::ReadMeta | A::ReadData),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = InvalidSpec;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| InvalidSpec {
                field: "role".into(),
                reason: "must be admin, deployer, invoker or reader".into(),
            })
    }
}

/// What a request does, as far as authorization cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// List or get functions, instances, pools; read logs.
    ReadMeta,
    /// Create, update or delete functions and pools.
    WriteFunctions,
    /// Call a function.
    Invoke,
    /// Get or list objects and keys.
    ReadData,
    /// Put, seal or delete objects and keys.
    WriteData,
    /// Create, list or revoke tokens.
    ManageTokens,
    /// Node membership and the cluster's own records; the metadata API.
    ManageCluster,
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 7] = [
        Action::ReadMeta,
        Action::WriteFunctions,
        Action::Invoke,
        Action::ReadData,
        Action::WriteData,
        Action::ManageTokens,
        Action::ManageCluster,
    ];
}

/// Who is asking: the tenant and role of a checked token (or of a local client's mapping).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Principal {
    /// The tenant the credential belongs to.
    pub tenant: String,
    /// What it may do there.
    pub role: Role,
    /// Set for a function instance's own credential: the one instance it may act as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<InstanceBinding>,
}

/// The function instance a per-instance credential stands for: an instance may register
/// with its proxy only as this instance of this function, and set only its own limits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceBinding {
    /// The function's name.
    pub function: String,
    /// The instance's id.
    pub instance: String,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No credential, a malformed one, an unknown one, a wrong secret or an expired one: the
    /// caller learns nothing more (HTTP 401).
    #[error("missing, unknown or expired token")]
    Unauthenticated,
    /// The credential is good but its role does not allow the action (HTTP 403).
    #[error("role {role} may not {action:?}")]
    Role {
        /// The caller's role.
        role: Role,
        /// What it tried.
        action: Action,
    },
    /// The resource belongs to another tenant (HTTP 404: its existence is not revealed).
    #[error("not found")]
    OtherTenant,
}

impl Principal {
    /// The operator: admin of [`SYSTEM_TENANT`].
    pub fn system_admin() -> Principal {
        Principal::new(SYSTEM_TENANT, Role::Admin)
    }

    /// `role` in `tenant`, bound to no instance.
    pub fn new(tenant: &str, role: Role) -> Principal {
        Principal {
            tenant: tenant.into(),
            role,
            instance: None,
        }
    }

    /// Whether this is the cluster's operator, who acts on every tenant.
    pub fn is_system_admin(&self) -> bool {
        self.tenant == SYSTEM_TENANT && self.role == Role::Admin
    }

    /// May this principal do `action` on something that belongs to `tenant`? The operator
    /// may do everything; everyone else only what their role allows, only in their own
    /// tenant, and never [`Action::ManageCluster`].
    pub fn authorize(&self, action: Action, tenant: &str) -> Result<(), Denied> {
        if self.is_system_admin() {
            return Ok(());
        }
        if tenant != self.tenant {
            return Err(Denied::OtherTenant);
        }
        if !self.role.allows(action) {
            return Err(Denied::Role {
                role: self.role,
                action,
            });
        }
        Ok(())
    }
}

/// A token as the store holds it: everything but the secret, whose hash stands in for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    /// 16 hex digits; the record's key is `tokens/<id>`.
    pub id: String,
    /// The tenant it acts for.
    pub tenant: String,
    /// What it may do there.
    pub role: Role,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    /// When it was issued, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// When it stops working, milliseconds since the Unix epoch; `None`: never.
    #[serde(default)]
    pub expires_ms: Option<u64>,
    /// What it is for, as its creator said.
    #[serde(default)]
    pub description: String,
    /// Set for a function instance's credential (issued by its node's agent when the
    /// instance starts, revoked when it ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<InstanceBinding>,
}

/// A token just issued: the string to hand to its user (shown once) and the record to store.
#[derive(Debug, Clone)]
pub struct Issued {
    /// `shoal_<id>_<secret>`.
    pub token: String,
    /// What goes under `tokens/<id>`.
    pub record: TokenRecord,
}

/// A token string split into its parts, after checking its shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenParts<'a> {
    /// Names the record.
    pub id: &'a str,
    /// Checked against the record's hash.
    pub secret: &'a str,
}

impl TokenRecord {
    /// Issues a token for `tenant` with `role`, from `random` (which must come from a
    /// cryptographic source: 64 bits name the token, 256 bits are its secret).
    pub fn issue(
        tenant: &str,
        role: Role,
        description: &str,
        now_ms: u64,
        expires_ms: Option<u64>,
        random: &[u8; TOKEN_RANDOM_BYTES],
    ) -> Result<Issued, InvalidSpec> {
        validate_tenant(tenant)?;
        if description.len() > MAX_DESCRIPTION_LEN {
            return Err(InvalidSpec {
                field: "description".into(),
                reason: format!("must be at most {MAX_DESCRIPTION_LEN} bytes"),
            });
        }
        if expires_ms.is_some_and(|at| at <= now_ms) {
            return Err(InvalidSpec {
                field: "expires".into(),
                reason: "must be in the future".into(),
            });
        }
        let id = hex(&random[..ID_BYTES]);
        let secret = hex(&random[ID_BYTES..]);
        let record = TokenRecord {
            secret_sha256: hex(&Sha256::digest(secret.as_bytes())),
            id: id.clone(),
            tenant: tenant.into(),
            role,
            created_ms: now_ms,
            expires_ms,
            description: description.into(),
            instance: None,
        };
        Ok(Issued {
            token: format!("{TOKEN_PREFIX}{id}_{secret}"),
            record,
        })
    }

    /// Checks `secret` (from [`parse_token`]) against this record at `now_ms`: the
    /// principal it stands for, or [`Denied::Unauthenticated`] for a wrong secret or an
    /// expired token. The hashes are compared in constant time.
    pub fn check(&self, secret: &str, now_ms: u64) -> Result<Principal, Denied> {
        let given = hex(&Sha256::digest(secret.as_bytes()));
        if !constant_time_eq(given.as_bytes(), self.secret_sha256.as_bytes()) {
            return Err(Denied::Unauthenticated);
        }
        if self.expires_ms.is_some_and(|at| now_ms >= at) {
            return Err(Denied::Unauthenticated);
        }
        Ok(Principal {
            tenant: self.tenant.clone(),
            role: self.role,
            instance: self.instance.clone(),
        })
    }

    /// Whether the token has expired at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_ms.is_some_and(|at| now_ms >= at)
    }
}

/// Splits `shoal_<16 hex>_<64 hex>` into id and secret; anything else is
/// [`Denied::Unauthenticated`].
pub fn parse_token(token: &str) -> Result<TokenParts<'_>, Denied> {
    let rest = token
        .strip_prefix(TOKEN_PREFIX)
        .filter(|_| token.len() == TOKEN_LEN)
        .ok_or(Denied::Unauthenticated)?;
    let (id, secret) = rest.split_once('_').ok_or(Denied::Unauthenticated)?;
    let is_hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if id.len() != 2 * ID_BYTES
        || secret.len() != 2 * SECRET_BYTES
        || !is_hex(id)
        || !is_hex(secret)
    {
        return Err(Denied::Unauthenticated);
    }
    Ok(TokenParts { id, secret })
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// Equal lengths and bytes, in time that depends only on the length.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: u64 = 1_000_000;

    fn issue(tenant: &str, role: Role, seed: u8) -> Issued {
        let mut random = [0u8; TOKEN_RANDOM_BYTES];
        for (i, b) in random.iter_mut().enumerate() {
            *b = seed.wrapping_mul(31).wrapping_add(i as u8);
        }
        TokenRecord::issue(tenant, role, "test", NOW, Some(NOW + 1000), &random).unwrap()
    }

    #[test]
    fn an_issued_token_parses_and_checks_as_its_principal() {
        let issued = issue("team-a", Role::Deployer, 1);
        assert_eq!(issued.token.len(), TOKEN_LEN);
        let parts = parse_token(&issued.token).unwrap();
        assert_eq!(parts.id, issued.record.id);
        let who = issued.record.check(parts.secret, NOW).unwrap();
        assert_eq!(who, Principal::new("team-a", Role::Deployer));
        assert!(!issued.record.secret_sha256.contains(parts.secret));
    }

    #[test]
    fn a_wrong_secret_or_an_expired_token_is_refused() {
        let a = issue("team-a", Role::Admin, 1);
        let b = issue("team-a", Role::Admin, 2);
        let b_secret = parse_token(&b.token).unwrap().secret;
        assert_eq!(a.record.check(b_secret, NOW), Err(Denied::Unauthenticated));
        let a_secret = parse_token(&a.token).unwrap().secret;
        assert!(a.record.check(a_secret, NOW + 999).is_ok());
        assert_eq!(
            a.record.check(a_secret, NOW + 1000),
            Err(Denied::Unauthenticated)
        );
        assert!(a.record.is_expired(NOW + 1000));
    }

    #[test]
    fn malformed_tokens_do_not_parse() {
        let good = issue("t", Role::Reader, 3).token;
        let cases = [
            String::new(),
            "shoal_".into(),
            good.replace("shoal_", "shoaL_"),
            good.to_uppercase(),
            format!("{good}0"),
            good[..good.len() - 1].to_string(),
            good.replacen('_', "-", 2),
            format!("{}g", &good[..good.len() - 1]),
            format!("{}\r\nX: y", &good[..good.len() - 5]),
        ];
        for bad in cases {
            assert_eq!(parse_token(&bad), Err(Denied::Unauthenticated), "{bad:?}");
        }
    }

    #[test]
    fn issue_checks_its_inputs() {
        let r = [7u8; TOKEN_RANDOM_BYTES];
        assert!(TokenRecord::issue("Bad Tenant", Role::Admin, "", NOW, None, &r).is_err());
        assert!(TokenRecord::issue("t", Role::Admin, &"x".repeat(257), NOW, None, &r).is_err());
        assert!(TokenRecord::issue("t", Role::Admin, "", NOW, Some(NOW), &r).is_err());
        assert!(TokenRecord::issue("t", Role::Admin, "", NOW, None, &r).is_ok());
    }

    #[test]
    fn roles_allow_what_their_names_say() {
        use Action as A;
        let allowed =
            |r: Role| -> Vec<Action> { A::ALL.into_iter().filter(|a| r.allows(*a)).collect() };
        assert_eq!(
            allowed(Role::Admin),
            [
                A::ReadMeta,
                A::WriteFunctions,
                A::Invoke,
                A::ReadData,
                A::WriteData,
                A::ManageTokens
            ]
        );
        assert_eq!(allowed(Role::Deployer), [A::ReadMeta, A::WriteFunctions]);
        assert_eq!(
            allowed(Role::Invoker),
            [A::Invoke, A::ReadData, A::WriteData]
        );
        assert_eq!(allowed(Role::Reader), [A::ReadMeta, A::ReadData]);
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
            let json = serde_json::to_string(&role).unwrap();
            assert_eq!(json, format!("\"{role}\""));
        }
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn only_the_system_admin_manages_the_cluster() {
        let system = Principal::system_admin();
        assert!(system
            .authorize(Action::ManageCluster, SYSTEM_TENANT)
            .is_ok());
        let tenant_admin = Principal::new("team-a", Role::Admin);
        assert!(tenant_admin
            .authorize(Action::ManageCluster, "team-a")
            .is_err());
        let system_reader = Principal::new(SYSTEM_TENANT, Role::Reader);
        assert_eq!(
            system_reader.authorize(Action::ReadData, "team-a"),
            Err(Denied::OtherTenant)
        );
    }

    fn role() -> impl Strategy<Value = Role> {
        prop::sample::select(Role::ALL.to_vec())
    }

    fn action() -> impl Strategy<Value = Action> {
        prop::sample::select(Action::ALL.to_vec())
    }

    fn tenant() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["system", "default", "team-a", "team-b"]).prop_map(String::from)
    }

    proptest! {
        /// Nobody but the operator crosses a tenant; within a tenant, exactly the role's
        /// permissions hold; the operator may do everything.
        #[test]
        fn authorization_is_the_role_within_the_tenant(
            role in role(), own in tenant(), target in tenant(), action in action()
        ) {
            let who = Principal::new(&own, role);
            let got = who.authorize(action, &target);
            if who.is_system_admin() {
                prop_assert!(got.is_ok());
            } else if own != target {
                prop_assert_eq!(got, Err(Denied::OtherTenant));
            } else {
                prop_assert_eq!(got.is_ok(), role.allows(action));
                prop_assert!(action != Action::ManageCluster || got.is_err());
            }
        }

        /// No string but the issued token checks as it.
        #[test]
        fn only_the_issued_secret_checks(seed in any::<u8>(), other in "[0-9a-f]{64}") {
            let issued = issue("team-a", Role::Invoker, seed);
            let secret = parse_token(&issued.token).unwrap().secret;
            prop_assume!(other != secret);
            prop_assert_eq!(issued.record.check(&other, NOW), Err(Denied::Unauthenticated));
        }
    }
}
