//! The one rule of every kind of name shoal takes from outside ([`IdKind`]), so that REST,
//! the CLI, the SDK, the agent and the workers all accept exactly the same names.
//!
//! | kind | bytes | first byte | length |
//! |---|---|---|---|
//! | [`IdKind::Object`], [`IdKind::Key`] | any UTF-8 but NUL and the ASCII control characters | any | 1..=1024 |
//! | [`IdKind::Function`], [`IdKind::Pool`], [`IdKind::Tenant`] | `a-z`, `0-9`, `-` | `a-z` | 1..=63 |
//! | [`IdKind::Instance`] | `A-Z`, `a-z`, `0-9`, `.`, `_`, `-` | `A-Z`, `a-z`, `0-9` | 1..=128 |
//! | [`IdKind::Node`] | `A-Z`, `a-z`, `0-9`, `.`, `_`, `-` | `A-Z`, `a-z`, `0-9` | 1..=64 |
//! | [`IdKind::Stream`] | `A-Z`, `a-z`, `0-9`, `.`, `_`, `-` | `A-Z`, `a-z`, `0-9` | 1..=128 |
//!
//! Invariants (checked by the property tests below):
//! - every accepted name of a *path-safe* kind ([`IdKind::is_path_safe`]: all but objects and
//!   keys) is one plain path component: no `/`, never `.` or `..`, no NUL, no control
//!   character, no leading `.` (a hidden file, or the agent's `.staging`) or `-` (an option to
//!   a command), bounded length; and printable ASCII only, so it is also a safe HTTP header
//!   value, URL path segment and log field. Function, pool, tenant, instance and node names
//!   become file names (instance directories and logs, certificate files, node directories)
//!   and parts of metadata keys (`functions/<name>`, `instances/<function>/<id>`).
//! - object ids and KV keys are broader: any UTF-8 text without NUL (reserved: it separates a
//!   tenant from its ids, see [`crate::ObjectId`]) and without control characters (so an id
//!   cannot forge a line in a log, a terminal or a header). They may hold `/`, `..`, spaces
//!   and any other character because they never become paths: spilled objects are files
//!   named by allocation generation, not by id, and no component turns an id into a file
//!   name or a header.
//!
//! Every refusal is an [`IdError`], whose wire code is [`ErrorCode::InvalidId`]
//! ([`IdError::code`]); a record validator adds the field it checked (`InvalidSpec` in
//! `shoal_meta::records`, `InvalidArgument` on the REST API).
use crate::ErrorCode;
use std::fmt;

/// Longest object id or KV key, in bytes (the part a client writes, without a tenant prefix).
pub const MAX_ID_LEN: usize = 1024;
/// Longest function, pool or tenant name.
pub const MAX_NAME_LEN: usize = 63;
/// Longest tenant name (the rule of function names).
pub const MAX_TENANT_LEN: usize = MAX_NAME_LEN;
/// Longest instance id.
pub const MAX_INSTANCE_ID_LEN: usize = 128;
/// Longest node id (it names a directory and a certificate's files).
pub const MAX_NODE_ID_LEN: usize = 64;
/// Longest stream name.
pub const MAX_STREAM_NAME_LEN: usize = 128;

/// What a name names; each kind has one rule (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IdKind {
    /// An object id.
    Object,
    /// A KV key (the rule of object ids).
    Key,
    /// A function name.
    Function,
    /// A resource pool name (the rule of function names).
    Pool,
    /// A tenant name (the rule of function names).
    Tenant,
    /// A function instance id.
    Instance,
    /// A node id.
    Node,
    /// A stream name.
    Stream,
}

/// Which bytes a kind allows, and which may come first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Charset {
    /// UTF-8 without NUL or control characters; any first character.
    Text,
    /// `[a-z0-9-]`, starting with `[a-z]`.
    Dns,
    /// `[A-Za-z0-9._-]`, starting with `[A-Za-z0-9]`.
    Path,
}

impl Charset {
    fn allows(self, b: u8) -> bool {
        match self {
            Charset::Text => true,
            Charset::Dns => b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-',
            Charset::Path => b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'),
        }
    }

    fn starts(self, b: u8) -> bool {
        match self {
            Charset::Text => true,
            Charset::Dns => b.is_ascii_lowercase(),
            Charset::Path => b.is_ascii_alphanumeric(),
        }
    }

    fn allowed(self) -> &'static str {
        match self {
            Charset::Text => "UTF-8 text without NUL or control characters",
            Charset::Dns => "a-z, 0-9 and '-'",
            Charset::Path => "A-Z, a-z, 0-9, '.', '_' and '-'",
        }
    }

    fn start(self) -> &'static str {
        match self {
            Charset::Text => "any character",
            Charset::Dns => "a lowercase letter",
            Charset::Path => "a letter or a digit",
        }
    }
}

impl IdKind {
    /// Every kind.
    pub const ALL: [IdKind; 8] = [
        IdKind::Object,
        IdKind::Key,
        IdKind::Function,
        IdKind::Pool,
        IdKind::Tenant,
        IdKind::Instance,
        IdKind::Node,
        IdKind::Stream,
    ];

    /// The longest name of this kind, in bytes.
    pub const fn max_len(self) -> usize {
        match self {
            IdKind::Object | IdKind::Key => MAX_ID_LEN,
            IdKind::Function | IdKind::Pool | IdKind::Tenant => MAX_NAME_LEN,
            IdKind::Instance => MAX_INSTANCE_ID_LEN,
            IdKind::Node => MAX_NODE_ID_LEN,
            IdKind::Stream => MAX_STREAM_NAME_LEN,
        }
    }

    /// Whether every accepted name is a safe single path component (and printable ASCII):
    /// all kinds but objects and keys.
    pub const fn is_path_safe(self) -> bool {
        !matches!(self, IdKind::Object | IdKind::Key)
    }

    fn charset(self) -> Charset {
        match self {
            IdKind::Object | IdKind::Key => Charset::Text,
            IdKind::Function | IdKind::Pool | IdKind::Tenant => Charset::Dns,
            IdKind::Instance | IdKind::Node | IdKind::Stream => Charset::Path,
        }
    }

    /// What the kind is called in messages (`function name`, `instance id`, ...).
    pub const fn noun(self) -> &'static str {
        match self {
            IdKind::Object => "object id",
            IdKind::Key => "key",
            IdKind::Function => "function name",
            IdKind::Pool => "pool name",
            IdKind::Tenant => "tenant name",
            IdKind::Instance => "instance id",
            IdKind::Node => "node id",
            IdKind::Stream => "stream name",
        }
    }

    /// The rule in words, for help texts: `1..=63 bytes of a-z, 0-9 and '-', starting with
    /// a lowercase letter`.
    pub fn rule(self) -> String {
        let c = self.charset();
        match c {
            Charset::Text => format!("1..={} bytes of {}", self.max_len(), c.allowed()),
            _ => format!(
                "1..={} bytes of {}, starting with {}",
                self.max_len(),
                c.allowed(),
                c.start()
            ),
        }
    }

    /// Checks `s` against this kind's rule.
    pub fn check(self, s: &str) -> Result<(), IdError> {
        let fail = |problem| {
            Err(IdError {
                kind: self,
                problem,
            })
        };
        let bytes = s.as_bytes();
        if bytes.is_empty() {
            return fail(IdProblem::Empty);
        }
        if bytes.len() > self.max_len() {
            return fail(IdProblem::TooLong {
                len: bytes.len(),
                max: self.max_len(),
            });
        }
        let cs = self.charset();
        for (at, &b) in bytes.iter().enumerate() {
            if b == 0 {
                return fail(IdProblem::Nul);
            }
            if b.is_ascii_control() {
                return fail(IdProblem::Control { at });
            }
            if !cs.allows(b) {
                return fail(IdProblem::Char {
                    at,
                    ch: s.get(at..).and_then(|r| r.chars().next()).unwrap_or('?'),
                    allowed: cs.allowed(),
                });
            }
            if at == 0 && !cs.starts(b) {
                return fail(IdProblem::Start {
                    ch: s.chars().next().unwrap_or('?'),
                    rule: cs.start(),
                });
            }
        }
        Ok(())
    }

    /// Checks raw bytes: they must be UTF-8 and pass [`IdKind::check`].
    pub fn check_bytes(self, b: &[u8]) -> Result<&str, IdError> {
        let s = std::str::from_utf8(b).map_err(|_| IdError {
            kind: self,
            problem: IdProblem::NotUtf8,
        })?;
        self.check(s)?;
        Ok(s)
    }
}

impl fmt::Display for IdKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.noun())
    }
}

/// What is wrong with a name.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdProblem {
    /// The name is empty.
    Empty,
    /// The name is longer than its kind allows.
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The name is not UTF-8.
    NotUtf8,
    /// The name holds a NUL byte (reserved: it separates a tenant from its ids).
    Nul,
    /// The name holds an ASCII control character (CR, LF, TAB, ESC, DEL, ...).
    Control {
        /// Byte offset of the first one.
        at: usize,
    },
    /// The name holds a character its kind does not allow.
    Char {
        /// Byte offset of the first one.
        at: usize,
        /// The character.
        ch: char,
        /// What the kind allows, in words.
        allowed: &'static str,
    },
    /// The name starts with a character its kind does not allow first.
    Start {
        /// The character.
        ch: char,
        /// What may come first, in words.
        rule: &'static str,
    },
    /// A qualified id whose tenant part is not a tenant name (or is the default tenant's,
    /// which is never written).
    BadTenant,
}

impl fmt::Display for IdProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdProblem::Empty => f.write_str("must not be empty"),
            IdProblem::TooLong { len, max } => {
                write!(f, "is {len} bytes, longer than the limit of {max}")
            }
            IdProblem::NotUtf8 => f.write_str("is not valid UTF-8"),
            IdProblem::Nul => f.write_str("must not contain a NUL byte"),
            IdProblem::Control { at } => {
                write!(f, "must not contain a control character (one at byte {at})")
            }
            IdProblem::Char { at, ch, allowed } => {
                write!(f, "may hold only {allowed} ({ch:?} at byte {at})")
            }
            IdProblem::Start { ch, rule } => write!(f, "must start with {rule}, not {ch:?}"),
            IdProblem::BadTenant => {
                f.write_str("has a tenant part that is not a (non-default) tenant name")
            }
        }
    }
}

/// Why a string is not a valid name of its kind. Its message names the kind and the rule it
/// breaks, never the value (which may be long, or hold the very characters refused).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {problem}")]
pub struct IdError {
    kind: IdKind,
    problem: IdProblem,
}

impl IdError {
    pub(crate) fn new(kind: IdKind, problem: IdProblem) -> IdError {
        IdError { kind, problem }
    }

    /// The kind of name that was checked.
    pub fn kind(&self) -> IdKind {
        self.kind
    }

    /// What is wrong with it.
    pub fn problem(&self) -> &IdProblem {
        &self.problem
    }

    /// The stable wire code of every invalid name.
    pub fn code(&self) -> ErrorCode {
        ErrorCode::InvalidId
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::{Component, Path};

    fn problem(kind: IdKind, s: &str) -> Option<IdProblem> {
        kind.check(s).err().map(|e| e.problem().clone())
    }

    #[test]
    fn rules_by_example() {
        for ok in ["a", "a-1", "abc-def-9"] {
            for k in [IdKind::Function, IdKind::Pool, IdKind::Tenant] {
                assert!(k.check(ok).is_ok(), "{k} {ok:?}");
            }
        }
        for ok in ["node-0", "i-1.a_B", "fn-0000abcd", "9"] {
            for k in [IdKind::Instance, IdKind::Node, IdKind::Stream] {
                assert!(k.check(ok).is_ok(), "{k} {ok:?}");
            }
        }
        for ok in ["a/b/../c", "héllo wörld", ".hidden", "-x"] {
            assert!(IdKind::Object.check(ok).is_ok(), "{ok:?}");
        }
        assert_eq!(problem(IdKind::Function, ""), Some(IdProblem::Empty));
        assert!(matches!(
            problem(IdKind::Function, "1a"),
            Some(IdProblem::Start { ch: '1', .. })
        ));
        assert!(matches!(
            problem(IdKind::Tenant, "a_b"),
            Some(IdProblem::Char { at: 1, ch: '_', .. })
        ));
        assert!(matches!(
            problem(IdKind::Pool, &"a".repeat(64)),
            Some(IdProblem::TooLong { len: 64, max: 63 })
        ));
        for bad in [
            "..",
            ".",
            ".staging",
            "-rf",
            "a/b",
            "a b",
            "x\r\nSet: 1",
            "é",
        ] {
            assert!(IdKind::Instance.check(bad).is_err(), "{bad:?}");
            assert!(IdKind::Node.check(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            problem(IdKind::Object, "a\nb"),
            Some(IdProblem::Control { at: 1 })
        );
        assert_eq!(problem(IdKind::Key, "a\0b"), Some(IdProblem::Nul));
        assert_eq!(
            IdKind::Node
                .check_bytes(&[0xff])
                .map_err(|e| e.problem().clone()),
            Err(IdProblem::NotUtf8)
        );
    }

    #[test]
    fn messages_name_the_kind_and_the_rule_but_not_the_value() {
        let e = IdKind::Instance.check("../etc\r\nX: 1").unwrap_err();
        let m = e.to_string();
        assert!(m.starts_with("instance id must start with"), "{m}");
        assert!(!m.contains('\n') && !m.contains("etc"), "{m}");
        assert_eq!(e.code(), ErrorCode::InvalidId);
        assert_eq!(
            IdKind::Function.rule(),
            "1..=63 bytes of a-z, 0-9 and '-', starting with a lowercase letter"
        );
    }

    /// Strings full of the characters that make trouble in paths and headers.
    fn hostile() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z0-9./_\\- \\r\\n\\t\\x00\\x7fé:%]{0,80}",
            any::<String>(),
            "(\\.\\./|/|\\.|-|[a-z]){1,12}",
        ]
    }

    fn kind() -> impl Strategy<Value = IdKind> {
        proptest::sample::select(IdKind::ALL.to_vec())
    }

    proptest! {
        /// An accepted name of a path-safe kind is one plain path component and a safe header
        /// value; an accepted object id or key has no NUL and no control character.
        #[test]
        fn accepted_names_are_safe(k in kind(), s in hostile()) {
            if k.check(&s).is_ok() {
                prop_assert!(!s.is_empty() && s.len() <= k.max_len());
                prop_assert!(!s.bytes().any(|b| b == 0 || b.is_ascii_control()));
                if k.is_path_safe() {
                    let mut parts = Path::new(&s).components();
                    prop_assert_eq!(parts.next(), Some(Component::Normal(s.as_ref())));
                    prop_assert_eq!(parts.next(), None);
                    prop_assert!(!s.contains('/') && s != "." && s != "..");
                    prop_assert!(!s.starts_with('.') && !s.starts_with('-'));
                    // Printable ASCII: a valid HTTP header value and URL path segment.
                    prop_assert!(s.bytes().all(|b| (0x21..=0x7e).contains(&b)));
                }
            }
        }

        /// The rules are not vacuous: names of their shape are accepted.
        #[test]
        fn names_of_the_documented_shape_pass(
            dns in "[a-z][a-z0-9-]{0,62}",
            path in "[A-Za-z0-9][A-Za-z0-9._-]{0,63}",
            text in "[^\\x00-\\x1f\\x7f]{1,100}",
        ) {
            for k in [IdKind::Function, IdKind::Pool, IdKind::Tenant] {
                prop_assert!(k.check(&dns).is_ok(), "{} {:?}", k, dns);
            }
            for k in [IdKind::Instance, IdKind::Node, IdKind::Stream] {
                prop_assert!(k.check(&path).is_ok(), "{} {:?}", k, path);
            }
            if text.len() <= MAX_ID_LEN {
                prop_assert!(IdKind::Object.check(&text).is_ok());
                prop_assert!(IdKind::Key.check(&text).is_ok());
            }
        }
    }
}
