//! The admin token file (`shoal control --admin-token-file PATH`): how the local user gets a
//! credential without asking anyone. Once the store is reachable, control checks the file;
//! unless it holds a token that authenticates as the operator (the system tenant's admin),
//! the leading control issues one and writes it there. `shoal up` points this at
//! `<runtime dir>/admin.token`, where the CLI looks by itself.
//!
//! Invariants:
//! - Only the leader issues and writes, so two controls sharing a file never both do; a
//!   standby that finds no good token waits until it leads (or the leader's token appears).
//! - The file is written whole or not at all (`shoal_pki::write_private_file`: a temporary
//!   file created with `O_CREAT|O_EXCL|O_NOFOLLOW` and mode 0600 in the same directory,
//!   synced, then renamed over the path). A reader never sees a partial token, nobody else
//!   can read it, and a symlink planted at the path is replaced, not followed.
//! - The directory must pass `shoal_pki::ensure_private_dir` (created 0700 if missing; a real
//!   directory of this user that group and others may not write, under directories nobody
//!   else can swap); anything else is refused before a token is issued, so a directory
//!   someone else prepared (say `/tmp/shoal-<uid>`) never receives the token.
//! - The file is read back without following a symlink, and only if it is this user's and
//!   unreadable by others (`shoal_pki::read_private_file`); anything else counts as no token.
use shoal_meta::records::{parse_token, token_key, Role as TokenRole, TokenRecord, SYSTEM_TENANT};
use shoal_meta::{issue_token, now_ms, IssueError, MetaError, MetaStore, Role};
use shoal_pki::{ensure_private_dir, read_private_file, write_private_file, PrivateError, Secrecy};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Pause before trying again while the store fails.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// Most bytes read from the file (a token is 87).
const MAX_FILE_LEN: u64 = 1024;

/// Where the admin token file stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminTokenState {
    /// Not known yet (the store has not answered, or the file is being written).
    Pending,
    /// The file holds a token that authenticates as the operator.
    Ready,
    /// The file holds no good token and this control is not the leader: the leader writes
    /// it (this control will, if it comes to lead).
    Standby,
    /// The file cannot be written safely; control will not try again.
    Failed(String),
}

/// Why the file could not be written.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("refusing to write the admin token: {0}")]
    UnsafeDir(#[source] PrivateError),
    #[error("writing the admin token: {0}")]
    Write(#[source] PrivateError),
    #[error("issuing the admin token: {0}")]
    Issue(#[from] IssueError),
}

impl WriteError {
    /// Whether trying again later may succeed (the store failed).
    fn is_transient(&self) -> bool {
        matches!(self, WriteError::Issue(IssueError::Meta(_)))
    }
}

/// Keeps `path` holding an operator token: the task `Control::start` spawns. Ends once the
/// file is good, on a failure that retrying cannot fix, or at shutdown.
pub(crate) async fn run(
    meta: Arc<dyn MetaStore>,
    path: PathBuf,
    mut role: watch::Receiver<Role>,
    state: watch::Sender<AdminTokenState>,
    shutdown: CancellationToken,
) {
    loop {
        match holds_admin(meta.as_ref(), &path).await {
            Ok(true) => {
                tracing::info!(path = %path.display(), "admin token file holds a valid token");
                state.send_replace(AdminTokenState::Ready);
                return;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "checking the admin token file: the store failed; retrying");
                if pause(&shutdown, RETRY_PAUSE).await {
                    return;
                }
                continue;
            }
        }
        let now = role.borrow_and_update().clone();
        if now != Role::Leader {
            state.send_replace(match now {
                Role::Follower { .. } => AdminTokenState::Standby,
                _ => AdminTokenState::Pending,
            });
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = role.changed() => if r.is_err() { return },
            }
            continue;
        }
        state.send_replace(AdminTokenState::Pending);
        match write_new(meta.as_ref(), &path).await {
            Ok(()) => {
                tracing::info!(path = %path.display(), "wrote a new admin token (system tenant, role admin)");
                state.send_replace(AdminTokenState::Ready);
                return;
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "writing the admin token file; retrying");
                if pause(&shutdown, RETRY_PAUSE).await {
                    return;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot write the admin token file");
                state.send_replace(AdminTokenState::Failed(e.to_string()));
                return;
            }
        }
    }
}

/// Sleeps `d`; whether shutdown came first.
async fn pause(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// Whether `path` holds a token that authenticates as the operator now. A missing,
/// unreadable or malformed file is `false`; only a store failure is an error.
async fn holds_admin(meta: &dyn MetaStore, path: &Path) -> Result<bool, MetaError> {
    let Some(token) = read_token(path) else {
        return Ok(false);
    };
    let Ok(parts) = parse_token(&token) else {
        return Ok(false);
    };
    let Some(kv) = meta.get(&token_key(parts.id)).await? else {
        return Ok(false);
    };
    let Ok(record) = serde_json::from_slice::<TokenRecord>(&kv.value) else {
        return Ok(false);
    };
    Ok(record.id == parts.id
        && record
            .check(parts.secret, now_ms())
            .is_ok_and(|p| p.is_system_admin()))
}

/// The file's first line, if it can be read: a regular file of this user that others may not
/// read, not a symlink.
fn read_token(path: &Path) -> Option<String> {
    let bytes = read_private_file(path, MAX_FILE_LEN, Secrecy::Secret)
        .map_err(|e| tracing::debug!(error = %e, "the admin token file is not usable"))
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    Some(text.lines().next()?.trim().to_string())
}

/// Issues an operator token and writes it to `path` (the directory checked first, so a
/// refused directory never costs a token).
async fn write_new(meta: &dyn MetaStore, path: &Path) -> Result<(), WriteError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    ensure_private_dir(&dir).map_err(WriteError::UnsafeDir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "admin.token".into());
    let description = format!("admin token of {}", path.display());
    let issued = issue_token(meta, SYSTEM_TENANT, TokenRole::Admin, &description, None).await?;
    write_private_file(
        &dir,
        &name,
        format!("{}\n", issued.token).as_bytes(),
        Secrecy::Secret,
    )
    .map_err(WriteError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_meta::MemStore;
    use std::os::unix::fs::PermissionsExt;

    fn store() -> Arc<dyn MetaStore> {
        Arc::new(MemStore::open(None, "").unwrap())
    }

    #[tokio::test]
    async fn writes_a_private_operator_token_once() {
        let meta = store();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rt").join("admin.token");
        assert!(!holds_admin(meta.as_ref(), &path).await.unwrap());
        write_new(meta.as_ref(), &path).await.unwrap();
        assert!(holds_admin(meta.as_ref(), &path).await.unwrap());
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        let d = std::fs::metadata(path.parent().unwrap()).unwrap();
        assert_eq!(d.permissions().mode() & 0o777, 0o700);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["admin.token"]);
    }

    #[tokio::test]
    async fn a_token_that_is_not_the_operators_is_not_kept() {
        let meta = store();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        let reader = issue_token(meta.as_ref(), SYSTEM_TENANT, TokenRole::Reader, "", None)
            .await
            .unwrap();
        std::fs::write(&path, &reader.token).unwrap();
        assert!(!holds_admin(meta.as_ref(), &path).await.unwrap());
        std::fs::write(&path, "garbage").unwrap();
        assert!(!holds_admin(meta.as_ref(), &path).await.unwrap());
    }

    /// A symlink planted at the token's path is not followed: not when reading (even to a
    /// file holding a valid operator token), not when writing (the link is replaced, what it
    /// points at is untouched).
    #[tokio::test]
    async fn a_symlink_at_the_token_path_is_not_followed() {
        let meta = store();
        let dir = tempfile::tempdir().unwrap();
        let rt = dir.path().join("rt");
        std::fs::create_dir(&rt).unwrap();
        std::fs::set_permissions(&rt, std::fs::Permissions::from_mode(0o700)).unwrap();
        let path = rt.join("admin.token");
        let elsewhere = dir.path().join("elsewhere");
        let op = issue_token(meta.as_ref(), SYSTEM_TENANT, TokenRole::Admin, "", None)
            .await
            .unwrap();
        std::fs::write(&elsewhere, &op.token).unwrap();
        std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        assert!(!holds_admin(meta.as_ref(), &path).await.unwrap());
        write_new(meta.as_ref(), &path).await.unwrap();
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), op.token);
        assert!(holds_admin(meta.as_ref(), &path).await.unwrap());
    }

    #[tokio::test]
    async fn refuses_a_directory_others_may_write() {
        let meta = store();
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = write_new(meta.as_ref(), &open.join("admin.token"))
            .await
            .unwrap_err();
        assert!(matches!(e, WriteError::UnsafeDir(_)), "{e}");
        assert!(!e.is_transient());
        // Refused before a token was issued.
        let (tokens, _) = meta.range("tokens/").await.unwrap();
        assert!(tokens.is_empty());
    }
}
