//! Fetching a function's code package into a per-instance directory.
//!
//! Invariants:
//! - nothing is ever written outside `dest`, and nothing is written *through* a symlink:
//!   every entry is created through directory file descriptors opened component by
//!   component with `O_NOFOLLOW` from `dest` (see `Tree`), so an entry whose path crosses a
//!   symlink (one planted by an earlier entry, or a chain of them) is refused, not followed;
//!   entries with absolute paths or `..` components are refused before that;
//! - symlinks are created last, after every file and directory, and each one must resolve
//!   inside `dest` once they all exist (following the chain of links it crosses, so `b ->
//!   a/..` with `a -> .` is refused as pointing outside); absolute targets and loops are
//!   refused;
//! - only regular files, directories and symlinks are materialised; hard links, devices,
//!   FIFOs and sparse files are refused; setuid/setgid/sticky bits are dropped; pax global
//!   headers (metadata only, as `git archive` writes) are skipped;
//! - the number of entries and the total number of file bytes are bounded ([`FetchLimits`]);
//!   an archive's own size too;
//! - what is unpacked is exactly what was hashed: an archive is read once, into an unnamed
//!   private temporary file (no other process can open it) while its digest is computed, and
//!   unpacked from that file; a directory is copied first and its digest computed over the
//!   copy. So a source changed between the check and the unpack is never unpacked unchecked;
//! - on error, a `dest` created by the fetch is removed again (best effort).
//!
//! Digests are `sha256:` followed by 64 lowercase or uppercase hex digits. For
//! [`PackageSource::TarGz`] the digest is over the archive file's bytes, checked before anything
//! is unpacked. For [`PackageSource::Dir`] the digest is over a deterministic serialisation of
//! the tree (see [`dir_digest`]).

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{symlinkat, unlinkat, UnlinkatFlags};
use sha2::{Digest, Sha256};

/// Most symlinks followed while resolving one symlink's target (as the kernel's limit).
const MAX_LINK_HOPS: u32 = 40;

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
    match source {
        PackageSource::TarGz(p) => {
            // Read once, into a private copy: the digest and the unpack see the same bytes.
            let staged = stage_archive(p, dest, limits)?;
            unpack_staged(staged, dest, expected.as_deref(), limits)
        }
        PackageSource::Dir(p) => materialise(dest, |root| {
            copy_dir(p, root, limits)?;
            // Over the copy, not the source: what runs is what was checked.
            check_digest(expected.as_deref(), || dir_digest(root))
        }),
    }
}

/// An archive's bytes in an unnamed temporary file that no other process can open, and the
/// digest of exactly those bytes.
#[derive(Debug)]
pub(crate) struct StagedArchive {
    file: fs::File,
    digest: String,
}

impl StagedArchive {
    /// `file` (an unnamed private file, see [`private_file_in`]) holding bytes whose digest
    /// is `digest`.
    pub(crate) fn new(file: fs::File, digest: String) -> StagedArchive {
        StagedArchive { file, digest }
    }
}

/// An unnamed, private temporary file in `dir` (`O_TMPFILE`, or created and unlinked at once):
/// only this process holds it.
pub(crate) fn private_file_in(dir: &Path) -> io::Result<fs::File> {
    tempfile::tempfile_in(dir)
}

/// `sha256:<hex>` of a finished hasher.
pub(crate) fn digest_of(h: Sha256) -> String {
    format!("sha256:{}", hex(&h.finalize()))
}

/// Copies the archive at `path` into a private file beside `dest`, hashing it on the way.
fn stage_archive(
    path: &Path,
    dest: &Path,
    limits: &FetchLimits,
) -> Result<StagedArchive, FetchError> {
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
    let mut out = private_file_in(&dir).map_err(io_err("create staging file in", &dir))?;
    let src = fs::File::open(path).map_err(io_err("open archive", path))?;
    let mut h = Sha256::new();
    let mut reader = src.take(limits.max_total_bytes.saturating_add(1));
    let mut buf = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(io_err("read archive", path))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > limits.max_total_bytes {
            return Err(FetchError::TooLarge {
                what: "archive bytes",
                limit: limits.max_total_bytes,
            });
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(io_err("write staging file in", &dir))?;
    }
    Ok(StagedArchive::new(out, digest_of(h)))
}

/// Checks `staged`'s digest against `expected` (a parsed digest or a `sha256:` string) and
/// unpacks exactly those bytes into `dest` (created if missing; must be empty if present).
/// Returns the canonical path of `dest`.
pub(crate) fn unpack_staged(
    staged: StagedArchive,
    dest: &Path,
    expected: Option<&str>,
    limits: &FetchLimits,
) -> Result<PathBuf, FetchError> {
    let expected = expected.map(parse_digest).transpose()?;
    let StagedArchive { mut file, digest } = staged;
    check_digest(expected.as_deref(), || Ok(digest))?;
    file.rewind()
        .map_err(io_err("rewind staging file of", dest))?;
    materialise(dest, |root| unpack_tar_gz(file, root, limits))
}

fn check_digest(
    expected: Option<&str>,
    actual: impl FnOnce() -> Result<String, FetchError>,
) -> Result<(), FetchError> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let actual = actual()?;
    if actual == expected {
        Ok(())
    } else {
        Err(FetchError::DigestMismatch {
            expected: expected.to_string(),
            actual,
        })
    }
}

/// Creates `dest` (it must be empty if present), runs `fill` on its canonical path, and
/// empties or removes `dest` again when `fill` fails.
fn materialise(
    dest: &Path,
    fill: impl FnOnce(&Path) -> Result<(), FetchError>,
) -> Result<PathBuf, FetchError> {
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
    match fill(&root) {
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
/// inside the package root, lexically. (Chains through other symlinks are checked once every
/// link exists, by `Tree::resolves_inside`.)
fn check_symlink(rel: &Path, target: &Path) -> Result<(), FetchError> {
    if target.is_absolute() || target.as_os_str().is_empty() {
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

/// A package being materialised under its root. Every file and directory is created through
/// directory file descriptors, opened component by component from the root with
/// `O_NOFOLLOW`: a component that is a symlink (or a file) makes the entry `Unsafe`, so no
/// write ever leaves the root through a link. Symlinks are only recorded; [`Tree::finish`]
/// creates them once everything else exists, checks that each one resolves inside the root,
/// and then sets the directories' modes.
struct Tree<'a> {
    root: OwnedFd,
    root_path: &'a Path,
    budget: Budget<'a>,
    /// Symlinks to create, in archive order: where, and their target.
    links: Vec<(PathBuf, PathBuf)>,
    /// Where a symlink will be (to refuse entries beneath one, and let a later entry replace
    /// an earlier link).
    link_paths: HashSet<PathBuf>,
    /// Directories and their modes, set last.
    dirs: Vec<(PathBuf, u32)>,
}

fn errno<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(Errno) -> FetchError + 'a {
    move |e| FetchError::Io {
        step,
        path: path.to_path_buf(),
        source: io::Error::from(e),
    }
}

/// The kind of what `name` in `dir` is, without following a symlink; `None` if absent.
fn kind_at(dir: BorrowedFd<'_>, name: &OsStr, rel: &Path) -> Result<Option<SFlag>, FetchError> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(errno("stat", rel)(e)),
    }
}

impl<'a> Tree<'a> {
    fn open(root_path: &'a Path, limits: &'a FetchLimits) -> Result<Tree<'a>, FetchError> {
        let root = openat(
            nix::fcntl::AT_FDCWD,
            root_path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno("open destination", root_path))?;
        Ok(Tree {
            root,
            root_path,
            budget: Budget {
                limits,
                entries: 0,
                bytes: 0,
            },
            links: Vec::new(),
            link_paths: HashSet::new(),
            dirs: Vec::new(),
        })
    }

    /// The directory `rel` under the root, opened through each component without following
    /// a symlink; missing components are created (0755, less the umask) when `create`.
    fn dir(&self, rel: &Path, create: bool) -> Result<OwnedFd, FetchError> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let mut cur: Option<OwnedFd> = None;
        for c in rel.components() {
            let Component::Normal(name) = c else {
                return Err(FetchError::Unsafe(rel.to_path_buf()));
            };
            let parent = cur.as_ref().map_or(self.root.as_fd(), |f| f.as_fd());
            let next = match openat(parent, name, flags, Mode::empty()) {
                Err(Errno::ENOENT) if create => {
                    match mkdirat(parent, name, Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(errno("create directory", rel)(e)),
                    }
                    openat(parent, name, flags, Mode::empty())
                }
                r => r,
            };
            cur = Some(match next {
                Ok(fd) => fd,
                // A symlink (ELOOP with O_NOFOLLOW) or a file where a directory should be.
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    return Err(FetchError::Unsafe(rel.to_path_buf()))
                }
                Err(e) => return Err(errno("open directory", rel)(e)),
            });
        }
        match cur {
            Some(fd) => Ok(fd),
            None => openat(self.root.as_fd(), ".", flags, Mode::empty())
                .map_err(errno("open destination", self.root_path)),
        }
    }

    /// The parent directory of `rel` (created as needed) and `rel`'s last component, after
    /// refusing a path beneath a (future) symlink of the package.
    fn parent_of<'r>(&self, rel: &'r Path) -> Result<(OwnedFd, &'r OsStr), FetchError> {
        let unsafe_entry = || FetchError::Unsafe(rel.to_path_buf());
        let name = rel.file_name().ok_or_else(unsafe_entry)?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        if parent.ancestors().any(|a| self.link_paths.contains(a)) {
            return Err(unsafe_entry());
        }
        Ok((self.dir(parent, true)?, name))
    }

    /// Makes room for a new entry at `name` in `dir`: an earlier file or symlink there is
    /// replaced (the later entry wins, as in tar); a directory is not.
    fn clear(&mut self, dir: BorrowedFd<'_>, name: &OsStr, rel: &Path) -> Result<(), FetchError> {
        self.link_paths.remove(rel);
        self.links.retain(|(p, _)| p != rel);
        match kind_at(dir, name, rel)? {
            None => Ok(()),
            Some(SFlag::S_IFDIR) => Err(FetchError::Io {
                step: "create entry",
                path: rel.to_path_buf(),
                source: io::Error::new(io::ErrorKind::AlreadyExists, "a directory is there"),
            }),
            Some(_) => {
                unlinkat(dir, name, UnlinkatFlags::NoRemoveDir).map_err(errno("replace entry", rel))
            }
        }
    }

    fn add_dir(&mut self, rel: &Path, mode: u32) -> Result<(), FetchError> {
        self.budget.entry(0)?;
        if rel.ancestors().any(|a| self.link_paths.contains(a)) {
            return Err(FetchError::Unsafe(rel.to_path_buf()));
        }
        self.dir(rel, true)?;
        self.dirs.push((rel.to_path_buf(), (mode & 0o777) | 0o700));
        Ok(())
    }

    /// A regular file at `rel` with `size` bytes read from `data` (never more), mode `mode`
    /// less the setuid, setgid and sticky bits.
    fn add_file(
        &mut self,
        rel: &Path,
        mode: u32,
        size: u64,
        data: &mut dyn Read,
    ) -> Result<(), FetchError> {
        self.budget.entry(size)?;
        let (dir, name) = self.parent_of(rel)?;
        self.clear(dir.as_fd(), name, rel)?;
        let fd = openat(
            dir.as_fd(),
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(errno("create file", rel))?;
        let mut out = fs::File::from(fd);
        let mut limited = data.take(size);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = limited.read(&mut buf).map_err(FetchError::Corrupt)?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])
                .map_err(io_err("write file", rel))?;
        }
        fchmod(out.as_fd(), Mode::from_bits_truncate(mode & 0o777))
            .map_err(errno("set permissions", rel))
    }

    /// A symlink at `rel` to `target`, created by [`Tree::finish`].
    fn add_symlink(&mut self, rel: &Path, target: &Path) -> Result<(), FetchError> {
        self.budget.entry(0)?;
        check_symlink(rel, target)?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        if parent.ancestors().any(|a| self.link_paths.contains(a)) {
            return Err(FetchError::Unsafe(rel.to_path_buf()));
        }
        self.links.retain(|(p, _)| p != rel);
        self.links.push((rel.to_path_buf(), target.to_path_buf()));
        self.link_paths.insert(rel.to_path_buf());
        Ok(())
    }

    /// Creates the symlinks, checks that each resolves inside the root, sets the
    /// directories' modes.
    fn finish(mut self) -> Result<(), FetchError> {
        let links = std::mem::take(&mut self.links);
        self.link_paths.clear();
        for (rel, target) in &links {
            let (dir, name) = self.parent_of(rel)?;
            self.clear(dir.as_fd(), name, rel)?;
            symlinkat(target.as_path(), dir.as_fd(), name).map_err(errno("create symlink", rel))?;
        }
        for (rel, _) in &links {
            if !self.resolves_inside(rel)? {
                return Err(FetchError::Unsafe(rel.clone()));
            }
        }
        // Directory modes last, so a read-only directory does not block its own entries.
        for (rel, mode) in &self.dirs {
            let fd = self.dir(rel, false)?;
            fchmod(fd.as_fd(), Mode::from_bits_truncate(*mode))
                .map_err(errno("set permissions", rel))?;
        }
        Ok(())
    }

    /// Whether the symlink at `rel` resolves to a place inside the root, following every
    /// link on the way as the kernel would (a missing component ends the walk: nothing can
    /// appear there any more). Loops and absolute targets count as outside.
    fn resolves_inside(&self, rel: &Path) -> Result<bool, FetchError> {
        // `stack` is the resolved path so far, relative to the root; by construction it
        // never holds a symlink, so `root_path.join(stack)` is walked without following one.
        let mut stack: Vec<OsString> = rel
            .parent()
            .map(|p| p.iter().map(OsStr::to_os_string).collect())
            .unwrap_or_default();
        let first = fs::read_link(self.root_path.join(rel)).map_err(io_err("read symlink", rel))?;
        let mut pending: Vec<OsString> = Vec::new();
        if !push_target(&mut pending, &first) {
            return Ok(false);
        }
        let mut hops = 0u32;
        while let Some(c) = pending.pop() {
            match c.as_bytes() {
                b"." => {}
                b".." => {
                    if stack.pop().is_none() {
                        return Ok(false);
                    }
                }
                _ => {
                    stack.push(c);
                    let here: PathBuf = stack.iter().collect();
                    let full = self.root_path.join(&here);
                    match fs::symlink_metadata(&full) {
                        Ok(m) if m.file_type().is_symlink() => {
                            hops += 1;
                            if hops > MAX_LINK_HOPS {
                                return Ok(false);
                            }
                            let t = fs::read_link(&full).map_err(io_err("read symlink", &here))?;
                            stack.pop();
                            if !push_target(&mut pending, &t) {
                                return Ok(false);
                            }
                        }
                        Ok(m) if !m.is_dir() => {
                            // A file: nothing resolves beneath it.
                            return Ok(true);
                        }
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
                        Err(e) => return Err(io_err("stat", &here)(e)),
                    }
                }
            }
        }
        Ok(true)
    }
}

/// Pushes `target`'s components onto `pending` so that they pop in order; `false` for an
/// absolute target (which leaves the root at once).
fn push_target(pending: &mut Vec<OsString>, target: &Path) -> bool {
    if target.has_root() {
        return false;
    }
    for c in target.components().rev() {
        match c {
            Component::Normal(n) => pending.push(n.to_os_string()),
            Component::CurDir => pending.push(".".into()),
            Component::ParentDir => pending.push("..".into()),
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Opens the regular file `path` of a source directory without following a symlink.
fn open_source_file(path: &Path) -> Result<fs::File, FetchError> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(OFlag::O_NOFOLLOW.bits())
        .open(path)
        .map_err(io_err("open file", path))?;
    let m = f.metadata().map_err(io_err("stat", path))?;
    if !m.is_file() {
        return Err(FetchError::Unsafe(path.to_path_buf()));
    }
    Ok(f)
}

fn copy_dir(src: &Path, root: &Path, limits: &FetchLimits) -> Result<(), FetchError> {
    let mut tree = Tree::open(root, limits)?;
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
                tree.add_dir(&r, meta.permissions().mode())?;
                stack.push(r);
            } else if ft.is_symlink() {
                let target = fs::read_link(&from).map_err(io_err("read symlink", &from))?;
                tree.add_symlink(&r, &target)?;
            } else if ft.is_file() {
                let mut f = open_source_file(&from)?;
                tree.add_file(&r, meta.permissions().mode(), meta.len(), &mut f)?;
            } else {
                return Err(FetchError::Unsafe(r));
            }
        }
    }
    tree.finish()
}

fn unpack_tar_gz(archive: fs::File, root: &Path, limits: &FetchLimits) -> Result<(), FetchError> {
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(io::BufReader::new(archive)));
    let mut tree = Tree::open(root, limits)?;
    for entry in ar.entries().map_err(FetchError::Corrupt)? {
        let mut entry = entry.map_err(FetchError::Corrupt)?;
        let raw = entry.path().map_err(FetchError::Corrupt)?.into_owned();
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            // Metadata for the whole archive (`git archive` writes one); nothing to create.
            continue;
        }
        // A bare "./" (root) entry is harmless; skip it.
        if kind.is_dir() && raw.components().all(|c| matches!(c, Component::CurDir)) {
            continue;
        }
        let rel = safe_rel(&raw)?;
        let mode = entry.header().mode().map_err(FetchError::Corrupt)?;
        if kind.is_dir() {
            tree.add_dir(&rel, mode)?;
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(FetchError::Corrupt)?
                .ok_or_else(|| FetchError::Unsafe(rel.clone()))?
                .into_owned();
            tree.add_symlink(&rel, &target)?;
        } else if kind.is_file() || kind == tar::EntryType::Continuous {
            let size = entry.header().size().map_err(FetchError::Corrupt)?;
            tree.add_file(&rel, mode, size, &mut entry)?;
        } else {
            // Hard links, character and block devices, FIFOs, sparse files.
            return Err(FetchError::Unsafe(rel));
        }
    }
    tree.finish()
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
