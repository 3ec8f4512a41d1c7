//! The file-system steps of the store's persistence, done so that nobody else can read the
//! files and a planted link cannot redirect them:
//!
//! - every file is opened with `O_NOFOLLOW`: a symbolic link at the snapshot, the log or the
//!   temporary path is refused, never followed;
//! - new files are created `0600` with `O_EXCL` (`create_new`) in the store's directory; an
//!   existing file readable by others is narrowed to `0600` through its descriptor;
//! - a file replaces another by `rename` followed by an fsync of the directory, after its own
//!   contents were fsynced, so a crash leaves the old or the new file, never a mix.
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The mode of every file the store writes.
pub(super) const FILE_MODE: u32 = 0o600;

/// A clearer error than `ELOOP` for a link where a file was expected.
fn explain(path: &Path, e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is a symbolic link; refusing to follow it",
                path.display()
            ),
        )
    } else {
        e
    }
}

/// Checks that `f` is a regular file and narrows its mode to [`FILE_MODE`] if others could
/// read it (files written by older versions were `0644`).
fn check_and_narrow(path: &Path, f: &File) -> io::Result<()> {
    let meta = f.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(file = %path.display(), "metadata file was readable by others; narrowing it to 0600");
        f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    }
    Ok(())
}

/// Reads a whole file without following a link; `None` when it does not exist.
pub(super) fn read(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let mut f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(explain(path, e)),
    };
    check_and_narrow(path, &f)?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    Ok(Some(bytes))
}

/// Opens an existing file for appending, without following a link.
pub(super) fn open_append(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| explain(path, e))?;
    check_and_narrow(path, &f)?;
    Ok(f)
}

/// `path` with `suffix` appended to its file name.
pub(super) fn sibling(path: &Path, suffix: &str) -> io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("metadata file {} has no file name", path.display()),
        )
    })?;
    let mut s = name.to_os_string();
    s.push(suffix);
    Ok(path.with_file_name(s))
}

/// Creates `tmp` afresh (`0600`, `O_EXCL`, `O_NOFOLLOW`) for appending. A regular file left
/// there by an interrupted write is removed first; anything else (a link, a directory) is
/// refused: the store never creates one, so it was planted or is a mistake to look at.
pub(super) fn create_tmp(tmp: &Path) -> io::Result<File> {
    let create = || {
        OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(tmp)
    };
    match create() {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(tmp)?;
            if !meta.file_type().is_file() {
                let what = if meta.file_type().is_symlink() {
                    "a symbolic link"
                } else {
                    "not a regular file"
                };
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "temporary file {} is {what}; refusing to write through it (remove it \
                         if it is yours)",
                        tmp.display()
                    ),
                ));
            }
            tracing::debug!(file = %tmp.display(), "removing a temporary file left by an interrupted write");
            std::fs::remove_file(tmp)?;
            create()
        }
        r => r,
    }
}

/// The directory holding `path`.
fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Renames the fsynced `tmp` over `path` and fsyncs the directory.
pub(super) fn replace(tmp: &Path, path: &Path) -> io::Result<()> {
    std::fs::rename(tmp, path)?;
    File::open(dir_of(path))?.sync_all()
}

/// Writes `bytes` as the new content of `path` through `tmp`: create (see [`create_tmp`]),
/// write, fsync, rename, fsync the directory. Returns the file, open for appending at its end.
/// If a step after the creation fails, the temporary file is removed.
pub(super) fn write_atomic(tmp: &Path, path: &Path, bytes: &[u8]) -> io::Result<File> {
    let mut f = create_tmp(tmp)?;
    let r = (|| {
        io::Write::write_all(&mut f, bytes)?;
        f.sync_all()?;
        replace(tmp, path)
    })();
    match r {
        Ok(()) => Ok(f),
        Err(e) => {
            let _ = std::fs::remove_file(tmp);
            Err(e)
        }
    }
}
