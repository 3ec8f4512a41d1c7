//! Finding the user's token: where the CLI, the tests and any other client look, in one
//! place. The environment comes in as a function (the binary passes `std::env::var_os`,
//! tests a map), so this module reads no process state but the user id.
//!
//! The order ([`find_token`]): the token given explicitly (`--token`), `SHOAL_TOKEN`, the
//! file `SHOAL_TOKEN_FILE` names, then `<runtime dir>/admin.token`, where `shoal up`'s control
//! writes an operator token (the runtime directory is [`default_runtime_dir`]). The first
//! one set wins; a named file that cannot be read is an error, a missing default file is
//! not (the client then sends no token and control answers `Unauthenticated`).
//!
//! The default file is in a directory with a predictable name (`/tmp/shoal-<uid>`), which
//! another user could have made first: it is read without following a symlink and only if it
//! is a regular file of this user that nobody else may read (`shoal_pki::read_private_file`),
//! so a token planted there is never sent. A file named explicitly is read as named.
use crate::error::ClientError;
use shoal_pki::{read_private_file, PrivateError, Secrecy};
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The variable holding a token.
pub const TOKEN_ENV: &str = "SHOAL_TOKEN";
/// The variable naming a file that holds a token.
pub const TOKEN_FILE_ENV: &str = "SHOAL_TOKEN_FILE";
/// The name of the admin token file in the runtime directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// Most bytes read from a token file (a token is 87).
const MAX_TOKEN_FILE: u64 = 4096;

/// Where a token came from (to say so when control refuses it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// Given explicitly (`--token`).
    Explicit,
    /// `SHOAL_TOKEN`.
    Env,
    /// The file `SHOAL_TOKEN_FILE` names.
    File(PathBuf),
    /// The runtime directory's `admin.token`.
    Default(PathBuf),
}

impl std::fmt::Display for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::Explicit => f.write_str("--token"),
            TokenSource::Env => f.write_str(TOKEN_ENV),
            TokenSource::File(p) => write!(f, "{TOKEN_FILE_ENV}={}", p.display()),
            TokenSource::Default(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A token and where it was found.
#[derive(Clone, PartialEq, Eq)]
pub struct FoundToken {
    /// The token.
    pub token: String,
    /// Where it came from.
    pub source: TokenSource,
}

impl std::fmt::Debug for FoundToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FoundToken")
            .field("token", &"<secret>")
            .field("source", &self.source)
            .finish()
    }
}

/// The user's token: `explicit`, else `SHOAL_TOKEN`, else the file `SHOAL_TOKEN_FILE` names,
/// else `<default runtime dir>/admin.token` if it exists; `None` if there is none. `env`
/// reads a variable (`|k| std::env::var_os(k)` in a binary). Empty values count as unset.
pub fn find_token(
    explicit: Option<&str>,
    env: &dyn Fn(&str) -> Option<OsString>,
) -> Result<Option<FoundToken>, ClientError> {
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(t) = explicit.map(str::trim).filter(|t| !t.is_empty()) {
        return Ok(Some(FoundToken {
            token: t.to_string(),
            source: TokenSource::Explicit,
        }));
    }
    if let Some(t) = set(TOKEN_ENV) {
        return Ok(Some(FoundToken {
            token: t.to_string_lossy().trim().to_string(),
            source: TokenSource::Env,
        }));
    }
    if let Some(p) = set(TOKEN_FILE_ENV) {
        let path = PathBuf::from(p);
        let token = read_token_file(&path)?;
        return Ok(Some(FoundToken {
            token,
            source: TokenSource::File(path),
        }));
    }
    let path = default_runtime_dir(env).join(ADMIN_TOKEN_FILE);
    let bytes = match read_private_file(&path, MAX_TOKEN_FILE, Secrecy::Secret) {
        Ok(b) => b,
        Err(PrivateError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None)
        }
        Err(source) => return Err(ClientError::UnsafeTokenFile { path, source }),
    };
    let token = first_line(&path, &String::from_utf8_lossy(&bytes))?;
    Ok(Some(FoundToken {
        token,
        source: TokenSource::Default(path),
    }))
}

/// The first line of a token file's text, trimmed; an error if it is empty.
fn first_line(path: &Path, text: &str) -> Result<String, ClientError> {
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        return Err(ClientError::TokenFile {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is empty"),
        });
    }
    Ok(token)
}

/// The first line of a token file, trimmed.
pub fn read_token_file(path: &Path) -> Result<String, ClientError> {
    let failed = |source| ClientError::TokenFile {
        path: path.to_path_buf(),
        source,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TOKEN_FILE).read_to_string(&mut text))
        .map_err(failed)?;
    first_line(path, &text)
}

/// The runtime directory when none is named: `$XDG_RUNTIME_DIR/shoal`, else
/// `$TMPDIR/shoal-<uid>` (`/tmp/shoal-<uid>` without `TMPDIR`). Where `shoal up` puts its
/// sockets and its admin token, and where the CLI looks for them.
pub fn default_runtime_dir(env: &dyn Fn(&str) -> Option<OsString>) -> PathBuf {
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    match set("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("shoal"),
        None => {
            let tmp = set("TMPDIR").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
            tmp.join(format!("shoal-{}", nix::unistd::getuid().as_raw()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn the_first_source_set_wins() {
        let dir = tempfile::tempdir().unwrap();
        let xdg = dir.path().to_str().unwrap();
        let rt = dir.path().join("shoal");
        std::fs::create_dir(&rt).unwrap();
        std::fs::write(rt.join(ADMIN_TOKEN_FILE), "from-default\n").unwrap();
        private(&rt.join(ADMIN_TOKEN_FILE));
        let named = dir.path().join("named");
        std::fs::write(&named, " from-file \nsecond line").unwrap();
        let named_s = named.to_str().unwrap();

        let all = env_of(&[
            ("XDG_RUNTIME_DIR", xdg),
            (TOKEN_ENV, "from-env"),
            (TOKEN_FILE_ENV, named_s),
        ]);
        let found = |explicit, env: &dyn Fn(&str) -> Option<OsString>| {
            find_token(explicit, env)
                .unwrap()
                .map(|f| (f.token, f.source))
        };
        assert_eq!(
            found(Some("given"), &all),
            Some(("given".into(), TokenSource::Explicit))
        );
        assert_eq!(
            found(None, &all),
            Some(("from-env".into(), TokenSource::Env))
        );
        let file_and_default = env_of(&[("XDG_RUNTIME_DIR", xdg), (TOKEN_FILE_ENV, named_s)]);
        assert_eq!(
            found(None, &file_and_default),
            Some(("from-file".into(), TokenSource::File(named.clone())))
        );
        let default_only = env_of(&[("XDG_RUNTIME_DIR", xdg), (TOKEN_ENV, "")]);
        assert_eq!(
            found(None, &default_only),
            Some((
                "from-default".into(),
                TokenSource::Default(rt.join(ADMIN_TOKEN_FILE))
            ))
        );
    }

    fn private(p: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// The default file sits in a directory with a predictable name: a token someone else
    /// put there (a symlink to theirs, a file others may read, a file of another user) is
    /// refused, never sent.
    #[test]
    fn a_default_token_that_is_not_private_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let rt = dir.path().join("shoal");
        std::fs::create_dir(&rt).unwrap();
        let env = env_of(&[("XDG_RUNTIME_DIR", dir.path().to_str().unwrap())]);
        let file = rt.join(ADMIN_TOKEN_FILE);
        let theirs = dir.path().join("theirs");
        std::fs::write(&theirs, "planted\n").unwrap();
        private(&theirs);
        std::os::unix::fs::symlink(&theirs, &file).unwrap();
        let e = find_token(None, &env).unwrap_err();
        assert!(matches!(e, ClientError::UnsafeTokenFile { .. }), "{e}");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        std::fs::remove_file(&file).unwrap();
        std::fs::write(&file, "mine\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = find_token(None, &env).unwrap_err();
        assert!(matches!(e, ClientError::UnsafeTokenFile { .. }), "{e}");
        private(&file);
        assert_eq!(find_token(None, &env).unwrap().unwrap().token, "mine");
        if nix::unistd::geteuid().is_root() {
            nix::unistd::chown(&file, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            let e = find_token(None, &env).unwrap_err();
            assert!(matches!(e, ClientError::UnsafeTokenFile { .. }), "{e}");
        }
    }

    #[test]
    fn a_missing_default_is_none_but_a_missing_named_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let xdg = dir.path().to_str().unwrap();
        assert!(find_token(None, &env_of(&[("XDG_RUNTIME_DIR", xdg)]))
            .unwrap()
            .is_none());
        let missing = dir.path().join("nope");
        let e = find_token(
            None,
            &env_of(&[(TOKEN_FILE_ENV, missing.to_str().unwrap())]),
        )
        .unwrap_err();
        assert!(matches!(e, ClientError::TokenFile { .. }), "{e}");
    }

    #[test]
    fn the_runtime_dir_follows_xdg_then_tmpdir() {
        assert_eq!(
            default_runtime_dir(&env_of(&[("XDG_RUNTIME_DIR", "/run/user/7")])),
            PathBuf::from("/run/user/7/shoal")
        );
        let uid = nix::unistd::getuid().as_raw();
        assert_eq!(
            default_runtime_dir(&env_of(&[("XDG_RUNTIME_DIR", ""), ("TMPDIR", "/scratch")])),
            PathBuf::from(format!("/scratch/shoal-{uid}"))
        );
        assert_eq!(
            default_runtime_dir(&env_of(&[])),
            PathBuf::from(format!("/tmp/shoal-{uid}"))
        );
    }
}
