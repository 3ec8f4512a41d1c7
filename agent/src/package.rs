//! Fetching a function's code package into a per-instance directory.
//!
//! Invariants:
//! - nothing is ever written outside `dest`: archive entries with absolute paths or `..`
//!   components are refused, symlinks whose target would leave `dest` are refused (lexically
//!   as each is unpacked, then once the tree is complete by following every link, so that a
//!   chain of links that are each harmless cannot lead out), and each directory on the way to
//!   an entry is checked to lie inside `dest` (symlinks resolved) before the next one is
//!   created in it (so a symlink planted by an earlier entry cannot redirect a later write or
//!   a directory creation);
//! - only regular files, directories and symlinks are materialised; hard links, devices and
//!   FIFOs are refused; setuid/setgid/sticky bits are dropped;
//! - the number of entries and the total number of file bytes are bounded ([`FetchLimits`]);
//! - on error, a `dest` created by the fetch is removed again (best effort).
//!
//! Digests are `sha256:` followed by 64 lowercase or uppercase hex digits. For
//! [`PackageSource::TarGz`] the digest is over the archive file's bytes, checked before anything
//! is unpacked. For [`PackageSource::Dir`] the digest is over a deterministic serialisation of
//! the tree (see [`dir_digest`]).

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

/// Where a code package comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PackageSource {
    /// A local directory, copied recursively.
    Dir(PathBuf),
    /// A local gzip-compressed tar archive, unpacked.
    TarGz(PathBuf),
}

/// Bounds applied while materialising a package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchLimits {
    /// Largest number of entries (files, directories, symlinks).
    pub max_entries: u64,
    /// Largest sum of regular-file sizes in bytes.
    pub max_total_bytes: u64,
}

impl Default for FetchLimits {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            max_total_bytes: 1 << 30,
        }
    }
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The source path does not exist.
    #[error("package source not found: {0}")]
    NotFound(PathBuf),
    /// The archive is not valid gzip or tar.
    #[error("package archive is corrupt")]
    Corrupt(#[source] io::Error),
    /// The computed digest differs from the expected one.
    #[error("package digest mismatch: expected {expected}, actual {actual}")]
    DigestMismatch {
        /// Digest the caller asked for.
        expected: String,
        /// Digest of what was found.
        actual: String,
    },
    /// The expected digest is not of the form `sha256:` plus 64 hex digits.
    #[error("invalid digest {0:?}: expected sha256 followed by 64 hex digits")]
    InvalidDigest(String),
    /// An entry would escape `dest`, or is of a refused kind.
    #[error("unsafe package entry: {0}")]
    Unsafe(PathBuf),
    /// The package exceeds a [`FetchLimits`] bound.
    #[error("package too large: {what} exceeds {limit}")]
    TooLarge {
        /// Which bound was exceeded.
        what: &'static str,
        /// The bound.
        limit: u64,
    },
    /// A filesystem operation failed.
    #[error("{step} {path}")]
    Io {
        /// The step that failed.
        step: &'static str,
        /// The path it was applied to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FetchError + 'a {
    move |source| FetchError::Io {
        step,
        path: path.to_path_buf(),
        source,
    }
}

/// Fetches `source` into `dest` with default [`FetchLimits`]; see [`fetch_with_limits`].
pub fn fetch(
    source: &PackageSource,
    dest: &Path,
    digest: Option<&str>,
) -> Result<PathBuf, FetchError> {
    fetch_with_limits(source, dest, digest, &FetchLimits::default())
}

/// Fetches `source` into `dest` (created if missing; must be empty if present), verifying
/// `digest` when given. Returns the canonical path of `dest`.
pub fn fetch_with_limits(
    source: &PackageSource,
    dest: &Path,
    digest: Option<&str>,
    limits: &FetchLimits,
) -> Result<PathBuf, FetchError> {
    let src = match source {
        PackageSource::Dir(p) | PackageSource::TarGz(p) => p,
    };
    if !src.exists() {
        return Err(FetchError::NotFound(src.clone()));
    }
    let expected = digest.map(parse_digest).transpose()?;
    if let (Some(expected), PackageSource::TarGz(p)) = (&expected, source) {
        let actual = file_digest(p)?;
        if &actual != expected {
            return Err(FetchError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
    }
    let created = !dest.exists();
    fs::create_dir_all(dest).map_err(io_err("create destination", dest))?;
    let nonempty = fs::read_dir(dest)
        .map_err(io_err("read destination", dest))?
        .next()
        .is_some();
    if nonempty {
        return Err(FetchError::Io {
            step: "check destination is empty",
            path: dest.to_path_buf(),
            source: io::Error::new(io::ErrorKind::AlreadyExists, "destination not empty"),
        });
    }
    let root = fs::canonicalize(dest).map_err(io_err("canonicalize destination", dest))?;
    let result = match source {
        PackageSource::Dir(p) => copy_dir(p, &root, limits).and_then(|()| match &expected {
            Some(expected) => {
                let actual = dir_digest(p)?;
                if &actual == expected {
                    Ok(())
                } else {
                    Err(FetchError::DigestMismatch {
                        expected: expected.clone(),
                        actual,
                    })
                }
            }
            None => Ok(()),
        }),
        PackageSource::TarGz(p) => unpack_tar_gz(p, &root, limits),
    };
    match result {
        Ok(()) => Ok(root),
        Err(e) => {
            if created {
                let _ = fs::remove_dir_all(&root);
            } else if let Ok(entries) = fs::read_dir(&root) {
                for entry in entries.flatten() {
                    let p = entry.path();
                    let _ = if p.is_dir() && !p.is_symlink() {
                        fs::remove_dir_all(&p)
                    } else {
                        fs::remove_file(&p)
                    };
                }
            }
            Err(e)
        }
    }
}

fn parse_digest(d: &str) -> Result<String, FetchError> {
    let hex = d
        .strip_prefix("sha256:")
        .ok_or_else(|| FetchError::InvalidDigest(d.to_string()))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(FetchError::InvalidDigest(d.to_string()));
    }
    Ok(format!("sha256:{}", hex.to_ascii_lowercase()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The `sha256:<hex>` digest of a file's bytes (what [`fetch`] checks for archives).
pub fn file_digest(path: &Path) -> Result<String, FetchError> {
    let mut f = fs::File::open(path).map_err(io_err("open archive", path))?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h).map_err(io_err("read archive", path))?;
    Ok(format!("sha256:{}", hex(&h.finalize())))
}

/// The deterministic `sha256:<hex>` digest of a directory tree (what [`fetch`] checks for
/// [`PackageSource::Dir`]).
///
/// Entries are visited in byte order of their relative paths; each contributes its relative
/// path, a NUL, a kind byte (`d`, `f` or `l`), and then for files the length as 8 little-endian
/// bytes followed by the contents, for symlinks the target followed by a NUL. Permissions and
/// timestamps are not covered.
pub fn dir_digest(root: &Path) -> Result<String, FetchError> {
    let mut h = Sha256::new();
    let mut stack = vec![PathBuf::new()];
    let mut all = Vec::new();
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .map_err(io_err("read directory", &dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_err("read directory", &dir))?;
        names.sort();
        for name in names {
            let r = rel.join(&name);
            let meta =
                fs::symlink_metadata(root.join(&r)).map_err(io_err("stat", &root.join(&r)))?;
            if meta.is_dir() {
                stack.push(r.clone());
            }
            all.push((r, meta));
        }
    }
    all.sort_by(|a, b| a.0.as_os_str().cmp(b.0.as_os_str()));
    for (rel, meta) in all {
        use std::os::unix::ffi::OsStrExt;
        h.update(rel.as_os_str().as_bytes());
        h.update([0]);
        let full = root.join(&rel);
        if meta.is_dir() {
            h.update(b"d");
        } else if meta.file_type().is_symlink() {
            h.update(b"l");
            let t = fs::read_link(&full).map_err(io_err("read symlink", &full))?;
            h.update(t.as_os_str().as_bytes());
            h.update([0]);
        } else {
            h.update(b"f");
            h.update(meta.len().to_le_bytes());
            let mut f = fs::File::open(&full).map_err(io_err("open file", &full))?;
            io::copy(&mut f, &mut h).map_err(io_err("read file", &full))?;
        }
    }
    Ok(format!("sha256:{}", hex(&h.finalize())))
}

/// Lexically checks a relative entry path: only normal components (and `.`) allowed.
fn safe_rel(path: &Path) -> Result<PathBuf, FetchError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return Err(FetchError::Unsafe(path.to_path_buf())),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(FetchError::Unsafe(path.to_path_buf()));
    }
    Ok(out)
}

/// Checks that a symlink at `rel` (relative to the package root) pointing at `target` stays
/// inside the package root, lexically.
fn check_symlink(rel: &Path, target: &Path) -> Result<(), FetchError> {
    if target.is_absolute() {
        return Err(FetchError::Unsafe(rel.to_path_buf()));
    }
    let mut depth: i64 = rel.components().count() as i64 - 1;
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return Err(FetchError::Unsafe(rel.to_path_buf()));
                }
            }
            _ => return Err(FetchError::Unsafe(rel.to_path_buf())),
        }
    }
    Ok(())
}

/// Creates the parent directories of `root/rel`, one at a time and each only after its own
/// parent was found (symlinks resolved) inside `root`, so nothing is created outside `root`
/// even when an earlier entry planted a symlink on the way. Removes a pre-existing
/// non-directory at the target path.
fn prepare(root: &Path, rel: &Path) -> Result<PathBuf, FetchError> {
    let target = root.join(rel);
    let mut dir = root.to_path_buf();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            let next = dir.join(c);
            match fs::symlink_metadata(&next) {
                Ok(m) if m.is_dir() => dir = next,
                Ok(m) if m.file_type().is_symlink() => {
                    let real = fs::canonicalize(&next).map_err(io_err("canonicalize", &next))?;
                    if !real.starts_with(root) || !real.is_dir() {
                        return Err(FetchError::Unsafe(rel.to_path_buf()));
                    }
                    dir = real;
                }
                Ok(_) => return Err(FetchError::Unsafe(rel.to_path_buf())),
                Err(_) => {
                    fs::create_dir(&next).map_err(io_err("create directory", &next))?;
                    dir = next;
                }
            }
        }
    }
    if let Ok(meta) = fs::symlink_metadata(&target) {
        if !meta.is_dir() {
            fs::remove_file(&target).map_err(io_err("replace entry", &target))?;
        }
    }
    Ok(target)
}

/// Symlinks followed at most while resolving one (the kernel's limit).
const MAX_LINK_HOPS: usize = 40;

/// Where `path` (absolute) finally leads: symlinks followed, the part that does not exist
/// taken lexically. `None` for a loop, which leads nowhere.
fn final_target(path: &Path) -> Option<PathBuf> {
    // Components still to walk, the next one last.
    let mut todo: Vec<PathBuf> = Vec::new();
    let push = |p: &Path, todo: &mut Vec<PathBuf>| {
        todo.extend(p.components().rev().map(|c| PathBuf::from(c.as_os_str())));
    };
    push(path, &mut todo);
    let mut cur = PathBuf::from("/");
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        match c.components().next() {
            Some(Component::RootDir) => cur = PathBuf::from("/"),
            Some(Component::ParentDir) => {
                cur.pop();
            }
            Some(Component::Normal(n)) => {
                let next = cur.join(n);
                match fs::read_link(&next) {
                    Ok(t) => {
                        hops += 1;
                        if hops > MAX_LINK_HOPS {
                            return None;
                        }
                        push(&t, &mut todo);
                    }
                    Err(_) => cur = next,
                }
            }
            _ => {}
        }
    }
    Some(cur)
}

/// Checks every symlink under `root`, once the whole tree is there: each must lead inside
/// `root`. The lexical check of each link alone lets a chain out (`x/up -> ..`, then
/// `esc -> x/up/..`).
fn check_links(root: &Path) -> Result<(), FetchError> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).map_err(io_err("read directory", &dir))? {
            let entry = entry.map_err(io_err("read directory", &dir))?;
            let path = entry.path();
            let ft = entry.file_type().map_err(io_err("stat", &path))?;
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_symlink() && final_target(&path).is_some_and(|t| !t.starts_with(root)) {
                let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
                return Err(FetchError::Unsafe(rel));
            }
        }
    }
    Ok(())
}

struct Budget<'a> {
    limits: &'a FetchLimits,
    entries: u64,
    bytes: u64,
}

impl Budget<'_> {
    fn entry(&mut self, size: u64) -> Result<(), FetchError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(FetchError::TooLarge {
                what: "entry count",
                limit: self.limits.max_entries,
            });
        }
        self.bytes = self.bytes.saturating_add(size);
        if self.bytes > self.limits.max_total_bytes {
            return Err(FetchError::TooLarge {
                what: "total bytes",
                limit: self.limits.max_total_bytes,
            });
        }
        Ok(())
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), FetchError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o777))
        .map_err(io_err("set permissions", path))
}

fn copy_dir(src: &Path, root: &Path, limits: &FetchLimits) -> Result<(), FetchError> {
    use std::os::unix::fs::PermissionsExt;
    let mut budget = Budget {
        limits,
        entries: 0,
        bytes: 0,
    };
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = src.join(&rel);
        for entry in fs::read_dir(&dir).map_err(io_err("read directory", &dir))? {
            let entry = entry.map_err(io_err("read directory", &dir))?;
            let r = rel.join(entry.file_name());
            let from = entry.path();
            let meta = fs::symlink_metadata(&from).map_err(io_err("stat", &from))?;
            let ft = meta.file_type();
            if ft.is_dir() {
                budget.entry(0)?;
                let to = prepare(root, &r)?;
                fs::create_dir_all(&to).map_err(io_err("create directory", &to))?;
                set_mode(&to, meta.permissions().mode() | 0o700)?;
                stack.push(r);
            } else if ft.is_symlink() {
                budget.entry(0)?;
                let target = fs::read_link(&from).map_err(io_err("read symlink", &from))?;
                check_symlink(&r, &target)?;
                let to = prepare(root, &r)?;
                std::os::unix::fs::symlink(&target, &to).map_err(io_err("create symlink", &to))?;
            } else if ft.is_file() {
                budget.entry(meta.len())?;
                let to = prepare(root, &r)?;
                fs::copy(&from, &to).map_err(io_err("copy file", &from))?;
                set_mode(&to, meta.permissions().mode())?;
            } else {
                return Err(FetchError::Unsafe(r));
            }
        }
    }
    check_links(root)
}

fn unpack_tar_gz(archive: &Path, root: &Path, limits: &FetchLimits) -> Result<(), FetchError> {
    let file = fs::File::open(archive).map_err(io_err("open archive", archive))?;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(io::BufReader::new(file)));
    let mut budget = Budget {
        limits,
        entries: 0,
        bytes: 0,
    };
    let mut dirs = Vec::new();
    for entry in ar.entries().map_err(FetchError::Corrupt)? {
        let mut entry = entry.map_err(FetchError::Corrupt)?;
        let raw = entry.path().map_err(FetchError::Corrupt)?.into_owned();
        let kind = entry.header().entry_type();
        // A bare "./" (root) entry is harmless; skip it.
        if kind.is_dir() && raw.components().all(|c| matches!(c, Component::CurDir)) {
            continue;
        }
        let rel = safe_rel(&raw)?;
        let mode = entry.header().mode().map_err(FetchError::Corrupt)?;
        if kind.is_dir() {
            budget.entry(0)?;
            let to = prepare(root, &rel)?;
            fs::create_dir_all(&to).map_err(io_err("create directory", &to))?;
            dirs.push((to, mode | 0o700));
        } else if kind.is_symlink() {
            budget.entry(0)?;
            let target = entry
                .link_name()
                .map_err(FetchError::Corrupt)?
                .ok_or_else(|| FetchError::Unsafe(rel.clone()))?
                .into_owned();
            check_symlink(&rel, &target)?;
            let to = prepare(root, &rel)?;
            std::os::unix::fs::symlink(&target, &to).map_err(io_err("create symlink", &to))?;
        } else if kind.is_file() || kind == tar::EntryType::Continuous {
            let size = entry.header().size().map_err(FetchError::Corrupt)?;
            budget.entry(size)?;
            let to = prepare(root, &rel)?;
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&to)
                .map_err(io_err("create file", &to))?;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = entry.read(&mut buf).map_err(FetchError::Corrupt)?;
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n])
                    .map_err(io_err("write file", &to))?;
            }
            drop(out);
            set_mode(&to, mode)?;
        } else {
            return Err(FetchError::Unsafe(rel));
        }
    }
    check_links(root)?;
    // Directory modes last, so a read-only directory does not block its own entries.
    for (dir, mode) in dirs {
        set_mode(&dir, mode)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlink_checks() {
        assert!(check_symlink(Path::new("a/b"), Path::new("../c")).is_ok());
        assert!(check_symlink(Path::new("a/b"), Path::new("../../c")).is_err());
        assert!(check_symlink(Path::new("b"), Path::new("/etc/passwd")).is_err());
        assert!(check_symlink(Path::new("b"), Path::new("./x/../y")).is_ok());
    }

    #[test]
    fn rel_checks() {
        assert!(safe_rel(Path::new("/etc/x")).is_err());
        assert!(safe_rel(Path::new("a/../../x")).is_err());
        assert_eq!(
            safe_rel(Path::new("./a/b")).ok(),
            Some(PathBuf::from("a/b"))
        );
    }

    #[test]
    fn digest_parsing() {
        assert!(parse_digest("md5:00").is_err());
        assert!(parse_digest(&format!("sha256:{}", "A".repeat(64))).is_ok());
        assert!(parse_digest(&format!("sha256:{}", "g".repeat(64))).is_err());
    }
}
