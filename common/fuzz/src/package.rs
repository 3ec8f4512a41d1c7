//! `package_unpack` and `package_entries`: a function's code package as the agent unpacks it
//! (`shoal_agent::fetch_with_limits` on a `.tar.gz`) into an instance directory, with an
//! innocent file beside it. Whatever the archive holds, afterwards:
//!
//! - nothing exists outside the instance directory that was not there before, and the file
//!   beside it is unchanged (no entry, no directory created on the way, no write through a
//!   symlink, landed outside);
//! - every symlink inside resolves (following symlinks, the dangling rest lexically) to a
//!   place inside the instance directory;
//! - only directories, regular files with one link and symlinks are there, none with a
//!   setuid, setgid or sticky bit;
//! - a fetch that failed left no instance directory behind.
use flate2::write::GzEncoder;
use shoal_agent::{fetch_with_limits, file_digest, FetchLimits, PackageSource};
use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

/// Small bounds: an input is a few KiB; the limits themselves are part of what is checked.
const LIMITS: FetchLimits = FetchLimits {
    max_entries: 256,
    max_total_bytes: 1 << 20,
};
/// What the file beside the instance directory holds.
const SENTINEL: &[u8] = b"not yours";
/// Symlinks followed at most while resolving one path (Linux's limit).
const MAX_HOPS: usize = 40;

/// The first byte says how to read the rest: bit 2 set, it is a list of entries (as
/// `package_entries` reads them) that the target writes as a tar archive; else bit 0 set, it is a tar
/// archive; else the `.tar.gz` file itself. The target gzips the first two, so the fuzzer
/// works on the tar structure or on the entries. Bit 1 set: the fetch is given the file's
/// digest (the path that checks it).
pub fn package_unpack(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode & 4 == 4 {
        gzip(&structured(rest))
    } else if mode & 1 == 1 {
        gzip(rest)
    } else {
        rest.to_vec()
    };
    unpack_and_check(&bytes, mode & 2 == 2);
}

/// `package_entries`: [`package_unpack`] of a list of entries only (the first byte: bit 1,
/// with the digest), so that short inputs, which the fuzzer explores fastest, are archives
/// of several entries: what it takes to chain symlinks out of the instance directory.
pub fn package_entries(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    unpack_and_check(&gzip(&structured(rest)), mode & 2 == 2);
}

/// Unpacks the `.tar.gz` `bytes` (checking its digest too when `digest`) beside an innocent
/// file, and checks what the module docs say must hold.
fn unpack_and_check(bytes: &[u8], digest: bool) {
    let scratch = crate::meta::scratch_dir();
    // Canonical, so that paths compare with what the unpacker canonicalises.
    let top = fs::canonicalize(scratch.path()).unwrap_or_else(|e| panic!("scratch: {e}"));
    let archive = top.join("pkg.tar.gz");
    fs::write(&archive, bytes).unwrap_or_else(|e| panic!("writing the archive: {e}"));
    let beside = top.join("beside");
    fs::create_dir(&beside).unwrap_or_else(|e| panic!("mkdir: {e}"));
    fs::write(beside.join("keep"), SENTINEL).unwrap_or_else(|e| panic!("sentinel: {e}"));
    let work = top.join("work");
    fs::create_dir(&work).unwrap_or_else(|e| panic!("mkdir: {e}"));
    let dest = work.join("inst");
    let before = walk(&top);

    let digest = digest.then(|| file_digest(&archive).unwrap_or_else(|e| panic!("{e}")));
    let result = fetch_with_limits(
        &PackageSource::TarGz(archive.clone()),
        &dest,
        digest.as_deref(),
        &LIMITS,
    );

    // Nothing new outside the instance directory, and the file beside it untouched.
    for p in walk(&top) {
        assert!(
            p.starts_with(&dest) || before.contains(&p),
            "unpacking created {} outside the instance directory ({result:?})",
            p.display()
        );
    }
    match fs::read(beside.join("keep")) {
        Ok(b) => assert_eq!(b, SENTINEL, "a file outside the instance was overwritten"),
        Err(e) => panic!("a file outside the instance is gone: {e}"),
    }
    match result {
        Ok(root) => {
            assert_eq!(root, dest, "the fetch reports another directory");
            check_tree(&dest);
        }
        Err(_) => assert!(
            fs::symlink_metadata(&dest).is_err(),
            "a failed fetch left {} behind",
            dest.display()
        ),
    }
    // Make sure the scratch directory can go: directory modes from the archive may be tight.
    restore_modes(&top);
}

/// What entry names and link targets are made of: enough to climb out (`..`), to name a
/// place twice (a directory, then a link through it) and to start from the root (`/`).
const PIECES: [&str; 8] = ["x", "up", "esc", "..", ".", "f", "evil", "/"];
/// Most entries of one structured archive.
const MAX_ENTRIES: usize = 32;

/// A tar archive of the entries `data` describes, each as `[kind, n, n pieces]` (then, for a
/// link, `[m, m pieces]`): kind % 5 is a directory, a file, a symlink, a hard link or a FIFO;
/// names and targets join 1..=4 [`PIECES`] with `/`. Names are written into the headers
/// as they are, `..` included (the tar crate's own setters would refuse them).
fn structured(data: &[u8]) -> Vec<u8> {
    let mut it = data.iter().copied();
    let path = |it: &mut dyn Iterator<Item = u8>| -> Option<String> {
        let n = 1 + usize::from(it.next()? % 4);
        let mut p = String::new();
        for i in 0..n {
            let piece = PIECES[usize::from(it.next()? % 8)];
            if i > 0 && !p.ends_with('/') && piece != "/" {
                p.push('/');
            }
            p.push_str(piece);
        }
        Some(p)
    };
    let mut b = tar::Builder::new(Vec::new());
    for _ in 0..MAX_ENTRIES {
        let Some(kind) = it.next() else { break };
        let Some(name) = path(&mut it) else { break };
        let mut h = tar::Header::new_gnu();
        let (ty, body): (_, &[u8]) = match kind % 5 {
            0 => (tar::EntryType::Directory, b""),
            1 => (tar::EntryType::Regular, b"hi\n"),
            2 => (tar::EntryType::Symlink, b""),
            3 => (tar::EntryType::Link, b""),
            _ => (tar::EntryType::Fifo, b""),
        };
        if matches!(ty, tar::EntryType::Symlink | tar::EntryType::Link) {
            let Some(target) = path(&mut it) else { break };
            let field = &mut h.as_old_mut().linkname;
            field[..target.len()].copy_from_slice(target.as_bytes());
        }
        let field = &mut h.as_old_mut().name;
        field[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(ty);
        h.set_mode(if kind & 0x80 != 0 { 0o4777 } else { 0o755 });
        h.set_size(body.len() as u64);
        h.set_cksum();
        if b.append(&h, body).is_err() {
            break;
        }
    }
    b.into_inner().unwrap_or_default()
}

fn gzip(tar: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(tar)
        .and_then(|()| enc.finish())
        .unwrap_or_else(|e| panic!("gzip: {e}"))
}

/// Every path under `top` (not following symlinks), `top` excluded.
fn walk(top: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![top.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p.clone());
            }
            out.insert(p);
        }
    }
    out
}

/// The unpacked tree holds only safe kinds of entries, and its symlinks stay inside it.
fn check_tree(dest: &Path) {
    for p in walk(dest) {
        let meta = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let t = meta.file_type();
        assert!(
            !(t.is_block_device() || t.is_char_device() || t.is_fifo() || t.is_socket()),
            "{} is a special file",
            p.display()
        );
        if t.is_file() {
            assert_eq!(meta.nlink(), 1, "{} is a hard link", p.display());
        }
        if !t.is_symlink() {
            assert_eq!(
                meta.mode() & 0o7000,
                0,
                "{} has mode {:o}",
                p.display(),
                meta.mode()
            );
        }
        if t.is_symlink() {
            if let Some(to) = resolve(&p) {
                assert!(
                    to.starts_with(dest),
                    "symlink {} leads outside, to {}",
                    p.display(),
                    to.display()
                );
            }
        }
    }
}

/// Where `path` (absolute) leads: symlinks followed, components that do not exist taken
/// lexically. `None` for a loop (which leads nowhere).
fn resolve(path: &Path) -> Option<PathBuf> {
    // Components still to walk, the next one last.
    let mut pending: Vec<PathBuf> = Vec::new();
    let push = |p: &Path, pending: &mut Vec<PathBuf>| {
        for c in p.components().rev() {
            pending.push(PathBuf::from(c.as_os_str()));
        }
    };
    push(path, &mut pending);
    let mut cur = PathBuf::from("/");
    let mut hops = 0;
    while let Some(c) = pending.pop() {
        match c.components().next() {
            Some(Component::RootDir) => cur = PathBuf::from("/"),
            Some(Component::ParentDir) => {
                cur.pop();
            }
            Some(Component::Normal(n)) => {
                let next = cur.join(n);
                match fs::read_link(&next) {
                    Ok(target) => {
                        hops += 1;
                        if hops > MAX_HOPS {
                            return None;
                        }
                        push(&target, &mut pending);
                    }
                    Err(_) => cur = next,
                }
            }
            _ => {}
        }
    }
    Some(cur)
}

/// Gives every directory under `top` its owner's full rights back, so it can be removed.
fn restore_modes(top: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for p in walk(top) {
        if fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
            let _ = fs::set_permissions(&p, fs::Permissions::from_mode(0o700));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn resolve_follows_symlinks_and_takes_the_rest_lexically() {
        let d = tempfile::tempdir().unwrap();
        let top = fs::canonicalize(d.path()).unwrap();
        fs::create_dir(top.join("x")).unwrap();
        std::os::unix::fs::symlink("..", top.join("x/up")).unwrap();
        std::os::unix::fs::symlink("x/up/..", top.join("esc")).unwrap();
        std::os::unix::fs::symlink("loop", top.join("loop")).unwrap();
        assert_eq!(resolve(&top.join("x/up")), Some(top.clone()));
        assert_eq!(
            resolve(&top.join("esc/gone/a")),
            top.parent().map(|p| p.join("gone/a"))
        );
        assert_eq!(resolve(&top.join("loop")), None);
    }

    #[test]
    #[should_panic(expected = "leads outside")]
    fn a_symlink_chain_out_of_the_tree_is_caught() {
        let d = tempfile::tempdir().unwrap();
        let top = fs::canonicalize(d.path()).unwrap();
        let dest = top.join("inst");
        fs::create_dir_all(dest.join("x")).unwrap();
        std::os::unix::fs::symlink("..", dest.join("x/up")).unwrap();
        check_tree(&dest);
        // Lexically inside (x, up, .. = depth 1), really the parent of `inst`.
        std::os::unix::fs::symlink("x/up/..", dest.join("esc")).unwrap();
        check_tree(&dest);
    }
}
