//! Private directories and the secret files in them: the one check every shoal component
//! makes before it keeps something in a directory (the runtime directory `shoal up` uses,
//! `/tmp/shoal-<uid>` by default, and its `tls/`, `control/` and node directories), and the
//! one way secrets are written and read there.
//!
//! Invariants:
//! - [`ensure_private_dir`] creates a missing directory (and missing parents) with mode
//!   0700, then [`check_private_dir`] refuses it unless it is a real
//!   directory (not a symlink), owned by the effective user, and not writable by group or
//!   others; and unless every directory above it belongs to that user or to root and is
//!   either not writable by others or sticky (as `/tmp`), so nobody else can rename it away
//!   and put another in its place. A directory another user made first (a predictable name
//!   in `/tmp` is easy to take) is refused with a message that says how to fix it.
//! - [`write_private_file`] writes a file whole or not at all: a fresh temporary file in the
//!   same directory, created with `O_CREAT | O_EXCL | O_NOFOLLOW` and the file's mode (0600
//!   for a secret), synced, then renamed over the name. A symlink planted at the temporary
//!   name makes the create fail; one planted at the final name is replaced, never followed.
//! - [`read_private_file`] opens with `O_NOFOLLOW` and refuses anything but a regular file
//!   owned by the effective user; a secret ([`Secrecy::Secret`]) must also be unreadable by
//!   group and others. So a planted symlink or a file someone else wrote is never taken for
//!   a key or a token.
//!
//! These are checks on a directory shoal manages. Files an operator names explicitly (a
//! mounted Kubernetes secret, say) are read as named by their users.
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a directory or a file is not safe to keep shoal's files and secrets in.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrivateError {
    /// A file system call failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS's reason.
        #[source]
        source: io::Error,
    },
    /// The path is a symbolic link where a real directory or file must be.
    #[error(
        "{path} is a symbolic link; shoal does not follow links for its private files \
         (remove it, or name the real path)"
    )]
    Symlink {
        /// The link.
        path: PathBuf,
    },
    /// The path is not a directory (or, for a file, not a regular file).
    #[error("{path} is not a {expected}")]
    WrongKind {
        /// The path.
        path: PathBuf,
        /// `directory` or `regular file`.
        expected: &'static str,
    },
    /// The directory or file belongs to another user.
    #[error(
        "{path} belongs to uid {owner}, not to this user (uid {me}): another user may have \
         made it to read or replace what shoal keeps there; remove it (or choose another \
         directory, e.g. with --socket-dir) and start again"
    )]
    Owner {
        /// The path.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The effective uid of this process.
        me: u32,
    },
    /// Group or others may write to the directory (or to one above it, which is not sticky).
    #[error(
        "group or others may write to {path} (mode {mode:o}); run `chmod go-w {path}` (or \
         choose another directory) and start again"
    )]
    Writable {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A secret file may be read by group or others.
    #[error(
        "{path} may be read by group or others (mode {mode:o}); run `chmod 600 {path}` and \
         start again"
    )]
    Readable {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is larger than anything shoal keeps there.
    #[error("{path} is larger than {max} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit.
        max: u64,
    },
}

/// How private a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrecy {
    /// A key, a token, the metadata file: mode 0600, and refused when group or others may
    /// read it.
    Secret,
    /// A certificate: mode 0644.
    Public,
}

impl Secrecy {
    fn mode(self) -> u32 {
        match self {
            Secrecy::Secret => 0o600,
            Secrecy::Public => 0o644,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PrivateError + '_ {
    move |source| PrivateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn me() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Creates `dir` with mode 0700 if it is missing (and its missing parents, 0700 too), then
/// checks it with [`check_private_dir`].
pub fn ensure_private_dir(dir: &Path) -> Result<(), PrivateError> {
    match fs::symlink_metadata(dir) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Someone may make it in between: then it is checked like any other.
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err(dir))?;
        }
        Err(e) => return Err(io_err(dir)(e)),
    }
    check_private_dir(dir)
}

/// Checks that `dir` is a real directory (not a symlink) owned by this user and not writable
/// by group or others, and that no other user can replace it: every directory above it
/// belongs to this user or root and is not writable by others unless it is sticky.
pub fn check_private_dir(dir: &Path) -> Result<(), PrivateError> {
    let me = me();
    let m = fs::symlink_metadata(dir).map_err(io_err(dir))?;
    if m.file_type().is_symlink() {
        return Err(PrivateError::Symlink {
            path: dir.to_path_buf(),
        });
    }
    if !m.is_dir() {
        return Err(PrivateError::WrongKind {
            path: dir.to_path_buf(),
            expected: "directory",
        });
    }
    if m.uid() != me {
        return Err(PrivateError::Owner {
            path: dir.to_path_buf(),
            owner: m.uid(),
            me,
        });
    }
    if m.mode() & 0o022 != 0 {
        return Err(PrivateError::Writable {
            path: dir.to_path_buf(),
            mode: m.mode() & 0o7777,
        });
    }
    // The directories above: resolved (an operator's own symlinks there are fine), then
    // each must not let another user rename the entry below it.
    let abs = std::path::absolute(dir).map_err(io_err(dir))?;
    let Some(parent) = abs.parent() else {
        return Ok(());
    };
    let real = fs::canonicalize(parent).map_err(io_err(parent))?;
    for a in real.ancestors() {
        let m = fs::metadata(a).map_err(io_err(a))?;
        if m.uid() != me && m.uid() != 0 {
            return Err(PrivateError::Owner {
                path: a.to_path_buf(),
                owner: m.uid(),
                me,
            });
        }
        let sticky = m.mode() & 0o1000 != 0;
        if m.mode() & 0o022 != 0 && !sticky {
            return Err(PrivateError::Writable {
                path: a.to_path_buf(),
                mode: m.mode() & 0o7777,
            });
        }
    }
    Ok(())
}

/// Distinguishes the temporary files of one process.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Writes `data` to `dir/name` whole or not at all: a fresh temporary file in `dir`
/// (`O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0600 or 0644 by `secrecy`), synced, renamed over
/// the name, and the directory synced. `dir` should have passed [`check_private_dir`].
pub fn write_private_file(
    dir: &Path,
    name: &str,
    data: &[u8],
    secrecy: Secrecy,
) -> Result<(), PrivateError> {
    let path = dir.join(name);
    let mut attempt = 0u32;
    let (tmp, mut file) = loop {
        let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{}.{seq}.tmp", std::process::id()));
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(secrecy.mode())
            .custom_flags(
                nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_CLOEXEC.bits(),
            )
            .open(&tmp)
        {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 16 => attempt += 1,
            Err(e) => return Err(io_err(&tmp)(e)),
        }
    };
    let written = file
        .write_all(data)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&path)(e));
    }
    // The rename is durable once the directory is synced; a failure here loses nothing but
    // durability across a crash.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads `path`, at most `max` bytes, without following a symlink: it must be a regular file
/// owned by this user and, for a [`Secrecy::Secret`], unreadable by group and others.
pub fn read_private_file(path: &Path, max: u64, secrecy: Secrecy) -> Result<Vec<u8>, PrivateError> {
    let file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_CLOEXEC.bits())
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            return Err(PrivateError::Symlink {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err(path)(e)),
    };
    let m = file.metadata().map_err(io_err(path))?;
    if !m.is_file() {
        return Err(PrivateError::WrongKind {
            path: path.to_path_buf(),
            expected: "regular file",
        });
    }
    let me = me();
    if m.uid() != me {
        return Err(PrivateError::Owner {
            path: path.to_path_buf(),
            owner: m.uid(),
            me,
        });
    }
    if secrecy == Secrecy::Secret && m.mode() & 0o077 != 0 {
        return Err(PrivateError::Readable {
            path: path.to_path_buf(),
            mode: m.mode() & 0o7777,
        });
    }
    let mut data = Vec::new();
    file.take(max.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(io_err(path))?;
    if data.len() as u64 > max {
        return Err(PrivateError::TooLarge {
            path: path.to_path_buf(),
            max,
        });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A directory owned by another user: a fresh one given to `nobody` when this runs as
    /// root, else `/` (root's).
    fn someone_elses(t: &Path) -> PathBuf {
        if me() != 0 {
            return PathBuf::from("/");
        }
        let d = t.join("theirs");
        fs::create_dir(&d).unwrap();
        chmod(&d, 0o700);
        nix::unistd::chown(&d, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        d
    }

    #[test]
    fn a_missing_directory_is_made_0700() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b/rt");
        ensure_private_dir(&d).unwrap();
        assert_eq!(fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        ensure_private_dir(&d).unwrap();
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = someone_elses(t.path());
        let e = ensure_private_dir(&d).unwrap_err();
        assert!(matches!(e, PrivateError::Owner { .. }), "{e}");
        assert!(e.to_string().contains("remove it"), "{e}");
    }

    #[test]
    fn a_directory_others_may_write_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("open");
        fs::create_dir(&d).unwrap();
        for mode in [0o777, 0o770, 0o1777, 0o702] {
            chmod(&d, mode);
            let e = check_private_dir(&d).unwrap_err();
            assert!(matches!(e, PrivateError::Writable { .. }), "{mode:o}: {e}");
            assert!(e.to_string().contains("chmod go-w"), "{e}");
        }
        // Readable and searchable by others is fine (other users' clients reach sockets).
        chmod(&d, 0o755);
        check_private_dir(&d).unwrap();
        // Below a directory others may write (and that is not sticky), it is refused too.
        chmod(&d, 0o777);
        let inner = d.join("rt");
        fs::create_dir(&inner).unwrap();
        chmod(&inner, 0o700);
        let e = check_private_dir(&inner).unwrap_err();
        assert!(
            matches!(e, PrivateError::Writable { ref path, .. } if *path == d),
            "{e}"
        );
        // A sticky one (as /tmp) is fine.
        chmod(&d, 0o1777);
        check_private_dir(&inner).unwrap();
    }

    #[test]
    fn a_symlinked_directory_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real");
        fs::create_dir(&real).unwrap();
        chmod(&real, 0o700);
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = ensure_private_dir(&link).unwrap_err();
        assert!(matches!(e, PrivateError::Symlink { .. }), "{e}");
        let file = t.path().join("file");
        fs::write(&file, b"").unwrap();
        let e = ensure_private_dir(&file).unwrap_err();
        assert!(matches!(e, PrivateError::WrongKind { .. }), "{e}");
    }

    /// A symlink planted at a secret's name is replaced by the write and refused by the read;
    /// what it pointed at is never touched.
    #[test]
    fn planted_symlinks_are_never_followed() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("rt");
        ensure_private_dir(&d).unwrap();
        let victim = t.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        chmod(&victim, 0o600);
        std::os::unix::fs::symlink(&victim, d.join("secret")).unwrap();
        let e = read_private_file(&d.join("secret"), 1024, Secrecy::Secret).unwrap_err();
        assert!(matches!(e, PrivateError::Symlink { .. }), "{e}");
        write_private_file(&d, "secret", b"mine", Secrecy::Secret).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        let m = fs::symlink_metadata(d.join("secret")).unwrap();
        assert!(m.is_file() && m.mode() & 0o777 == 0o600);
        assert_eq!(
            read_private_file(&d.join("secret"), 1024, Secrecy::Secret).unwrap(),
            b"mine"
        );
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["secret"]);
    }

    #[test]
    fn a_secret_others_may_read_or_someone_else_wrote_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("rt");
        ensure_private_dir(&d).unwrap();
        write_private_file(&d, "key", b"k", Secrecy::Secret).unwrap();
        chmod(&d.join("key"), 0o644);
        let e = read_private_file(&d.join("key"), 1024, Secrecy::Secret).unwrap_err();
        assert!(matches!(e, PrivateError::Readable { .. }), "{e}");
        // A public file may be world-readable.
        assert_eq!(
            read_private_file(&d.join("key"), 1024, Secrecy::Public).unwrap(),
            b"k"
        );
        let e = read_private_file(&d.join("key"), 0, Secrecy::Public).unwrap_err();
        assert!(matches!(e, PrivateError::TooLarge { .. }), "{e}");
        if me() == 0 {
            chmod(&d.join("key"), 0o600);
            nix::unistd::chown(
                &d.join("key"),
                Some(nix::unistd::Uid::from_raw(65534)),
                None,
            )
            .unwrap();
            let e = read_private_file(&d.join("key"), 1024, Secrecy::Secret).unwrap_err();
            assert!(matches!(e, PrivateError::Owner { .. }), "{e}");
        }
    }
}
