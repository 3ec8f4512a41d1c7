//! Package fetching: directories, archives, digests and hostile archives.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use shoal_agent::{fetch, fetch_with_limits, file_digest, FetchError, FetchLimits, PackageSource};

fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("sub/deeper")).unwrap();
    fs::write(root.join("main.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::write(root.join("sub/data.bin"), (0u8..=255).collect::<Vec<_>>()).unwrap();
    fs::write(root.join("sub/deeper/empty"), b"").unwrap();
    std::os::unix::fs::symlink("sub/data.bin", root.join("link")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(root.join("main.sh"), fs::Permissions::from_mode(0o755)).unwrap();
}

fn assert_same(a: &Path, b: &Path) {
    for rel in ["main.sh", "sub/data.bin", "sub/deeper/empty"] {
        assert_eq!(
            fs::read(a.join(rel)).unwrap(),
            fs::read(b.join(rel)).unwrap(),
            "{rel}"
        );
    }
    assert_eq!(
        fs::read_link(b.join("link")).unwrap(),
        Path::new("sub/data.bin")
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(b.join("main.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
}

fn tar_gz_of(src: &Path, out: &Path) {
    let f = fs::File::create(out).unwrap();
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
    let mut b = tar::Builder::new(gz);
    b.follow_symlinks(false);
    b.append_dir_all(".", src).unwrap();
    b.into_inner().unwrap().finish().unwrap();
}

/// Writes a tar.gz with one regular file whose raw header name is `name`.
fn raw_archive(out: &Path, name: &[u8], kind: tar::EntryType, link: Option<&[u8]>) {
    let mut h = tar::Header::new_gnu();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name);
        if let Some(l) = link {
            old.linkname[..l.len()].copy_from_slice(l);
        }
    }
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(if kind.is_file() { 3 } else { 0 });
    h.set_cksum();
    let f = fs::File::create(out).unwrap();
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
    let mut b = tar::Builder::new(gz);
    let data: &[u8] = if kind.is_file() { b"bad" } else { b"" };
    b.append(&h, data).unwrap();
    b.into_inner().unwrap().finish().unwrap();
}

#[test]
fn dir_copy_is_byte_exact_and_digest_is_deterministic() {
    let t = tempfile::tempdir().unwrap();
    make_tree(&t.path().join("src"));
    let src = PackageSource::Dir(t.path().join("src"));
    let out = fetch(&src, &t.path().join("a"), None).unwrap();
    assert_same(&t.path().join("src"), &out);
    let d1 = shoal_agent::dir_digest(&t.path().join("src")).unwrap();
    assert_eq!(d1, shoal_agent::dir_digest(&out).unwrap());
    fetch(&src, &t.path().join("b"), Some(&d1)).unwrap();
    let wrong = format!("sha256:{}", "0".repeat(64));
    let e = fetch(&src, &t.path().join("c"), Some(&wrong)).unwrap_err();
    assert!(matches!(e, FetchError::DigestMismatch { .. }), "{e:?}");
    assert!(!t.path().join("c").exists(), "failed fetch must clean up");
}

#[test]
fn tar_gz_unpack_is_byte_exact_with_digest() {
    let t = tempfile::tempdir().unwrap();
    make_tree(&t.path().join("src"));
    let ar = t.path().join("pkg.tar.gz");
    tar_gz_of(&t.path().join("src"), &ar);
    let digest = file_digest(&ar).unwrap();
    let out = fetch(
        &PackageSource::TarGz(ar),
        &t.path().join("out"),
        Some(&digest),
    )
    .unwrap();
    assert_same(&t.path().join("src"), &out);
}

#[test]
fn digest_mismatch_is_reported_before_unpacking() {
    let t = tempfile::tempdir().unwrap();
    make_tree(&t.path().join("src"));
    let ar = t.path().join("pkg.tar.gz");
    tar_gz_of(&t.path().join("src"), &ar);
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let e = fetch(
        &PackageSource::TarGz(ar.clone()),
        &t.path().join("out"),
        Some(&wrong),
    )
    .unwrap_err();
    match e {
        FetchError::DigestMismatch { expected, actual } => {
            assert_eq!(expected, wrong);
            assert_eq!(actual, file_digest(&ar).unwrap());
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(!t.path().join("out").exists());
    let e = fetch(
        &PackageSource::TarGz(ar),
        &t.path().join("o2"),
        Some("md5:1"),
    )
    .unwrap_err();
    assert!(matches!(e, FetchError::InvalidDigest(_)), "{e:?}");
}

#[test]
fn corrupt_and_missing_archives() {
    let t = tempfile::tempdir().unwrap();
    let ar = t.path().join("bad.tar.gz");
    fs::write(&ar, b"this is not gzip at all").unwrap();
    let e = fetch(&PackageSource::TarGz(ar), &t.path().join("out"), None).unwrap_err();
    assert!(matches!(e, FetchError::Corrupt(_)), "{e:?}");
    assert!(!t.path().join("out").exists());

    // Valid gzip, truncated tar.
    let good = t.path().join("good.tar.gz");
    fs::create_dir(t.path().join("src")).unwrap();
    fs::write(t.path().join("src/f"), vec![7u8; 10_000]).unwrap();
    tar_gz_of(&t.path().join("src"), &good);
    let bytes = fs::read(&good).unwrap();
    let trunc = t.path().join("trunc.tar.gz");
    let mut f = fs::File::create(&trunc).unwrap();
    f.write_all(&bytes[..bytes.len() / 2]).unwrap();
    drop(f);
    let e = fetch(&PackageSource::TarGz(trunc), &t.path().join("o2"), None).unwrap_err();
    assert!(matches!(e, FetchError::Corrupt(_)), "{e:?}");

    let e = fetch(
        &PackageSource::TarGz(t.path().join("nope.tar.gz")),
        &t.path().join("o3"),
        None,
    )
    .unwrap_err();
    assert!(matches!(e, FetchError::NotFound(_)), "{e:?}");
}

/// Raw entry name, entry type, link target.
type Case = (&'static [u8], tar::EntryType, Option<&'static [u8]>);

#[test]
fn traversal_absolute_and_escaping_symlinks_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let cases: [Case; 5] = [
        (b"../escape.txt", tar::EntryType::Regular, None),
        (b"a/../../escape.txt", tar::EntryType::Regular, None),
        (b"/tmp/shoal-abs-escape.txt", tar::EntryType::Regular, None),
        (b"evil", tar::EntryType::Symlink, Some(b"../../etc")),
        (b"abs", tar::EntryType::Symlink, Some(b"/etc/passwd")),
    ];
    for (i, (name, kind, link)) in cases.into_iter().enumerate() {
        let ar = t.path().join(format!("evil{i}.tar.gz"));
        raw_archive(&ar, name, kind, link);
        let dest = t.path().join(format!("box{i}/out"));
        let e = fetch(&PackageSource::TarGz(ar), &dest, None).unwrap_err();
        assert!(matches!(e, FetchError::Unsafe(_)), "case {i}: {e:?}");
        assert!(!t.path().join(format!("box{i}/escape.txt")).exists());
    }
    assert!(!Path::new("/tmp/shoal-abs-escape.txt").exists());
    // A hard link is refused too.
    let ar = t.path().join("hard.tar.gz");
    raw_archive(&ar, b"h", tar::EntryType::Link, Some(b"/etc/passwd"));
    let e = fetch(&PackageSource::TarGz(ar), &t.path().join("hard"), None).unwrap_err();
    assert!(matches!(e, FetchError::Unsafe(_)), "{e:?}");
}

#[test]
fn limits_are_enforced() {
    let t = tempfile::tempdir().unwrap();
    make_tree(&t.path().join("src"));
    let ar = t.path().join("pkg.tar.gz");
    tar_gz_of(&t.path().join("src"), &ar);
    let small = FetchLimits {
        max_entries: 2,
        max_total_bytes: 1 << 20,
    };
    let e = fetch_with_limits(
        &PackageSource::TarGz(ar.clone()),
        &t.path().join("o"),
        None,
        &small,
    )
    .unwrap_err();
    assert!(matches!(e, FetchError::TooLarge { .. }), "{e:?}");
    let tiny = FetchLimits {
        max_entries: 100,
        max_total_bytes: 10,
    };
    let e = fetch_with_limits(
        &PackageSource::Dir(t.path().join("src")),
        &t.path().join("o2"),
        None,
        &tiny,
    )
    .unwrap_err();
    assert!(matches!(e, FetchError::TooLarge { .. }), "{e:?}");
}

/// One raw tar entry: name, type, link target, data.
struct Raw<'a> {
    name: &'a [u8],
    kind: tar::EntryType,
    link: Option<&'a [u8]>,
    data: &'a [u8],
}

fn file<'a>(name: &'a [u8], data: &'a [u8]) -> Raw<'a> {
    Raw {
        name,
        kind: tar::EntryType::Regular,
        link: None,
        data,
    }
}

fn dir(name: &[u8]) -> Raw<'_> {
    Raw {
        name,
        kind: tar::EntryType::Directory,
        link: None,
        data: b"",
    }
}

fn symlink<'a>(name: &'a [u8], target: &'a [u8]) -> Raw<'a> {
    Raw {
        name,
        kind: tar::EntryType::Symlink,
        link: Some(target),
        data: b"",
    }
}

/// Writes a tar.gz of `entries`, headers written byte by byte (no checks of the tar crate's
/// builder in the way).
fn crafted(out: &Path, entries: &[Raw<'_>]) {
    let f = fs::File::create(out).unwrap();
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
    let mut b = tar::Builder::new(gz);
    for e in entries {
        let mut h = tar::Header::new_gnu();
        {
            let old = h.as_old_mut();
            old.name[..e.name.len()].copy_from_slice(e.name);
            if let Some(l) = e.link {
                old.linkname[..l.len()].copy_from_slice(l);
            }
        }
        h.set_entry_type(e.kind);
        h.set_mode(if e.kind.is_dir() { 0o755 } else { 0o644 });
        h.set_size(e.data.len() as u64);
        h.set_cksum();
        b.append(&h, e.data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap();
}

/// Unpacks `entries` into `<tmp>/box/out`; the result, and `<tmp>/box` (the directory just
/// outside the package) to look for anything that escaped.
fn unpack(
    t: &Path,
    name: &str,
    entries: &[Raw<'_>],
) -> (Result<std::path::PathBuf, FetchError>, std::path::PathBuf) {
    let boxed = t.join(name);
    fs::create_dir_all(&boxed).unwrap();
    let ar = t.join(format!("{name}.tar.gz"));
    crafted(&ar, entries);
    (
        fetch(&PackageSource::TarGz(ar), &boxed.join("out"), None),
        boxed,
    )
}

/// What `dir` holds besides the package directory `out`.
fn escaped(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "out")
        .collect();
    v.sort();
    v
}

/// A chain of symlinks, each lexically inside the package, that together point outside it:
/// `a -> .` and `b -> a/..` (which is the package's parent). Refused, and nothing is written
/// through it: not a file, not a directory created on the way.
#[test]
fn symlink_chains_that_leave_the_package_are_refused() {
    let t = tempfile::tempdir().unwrap();
    // The chain alone: `b` would point outside.
    let (r, boxed) = unpack(
        t.path(),
        "chain",
        &[symlink(b"a", b"."), symlink(b"b", b"a/..")],
    );
    assert!(matches!(r, Err(FetchError::Unsafe(_))), "{r:?}");
    assert!(escaped(&boxed).is_empty(), "{:?}", escaped(&boxed));
    assert!(!boxed.join("out").exists(), "a failed fetch cleans up");
    // Entries written through the chain: a file, and a directory path that would be created
    // on the way.
    let (r, boxed) = unpack(
        t.path(),
        "through",
        &[
            symlink(b"a", b"."),
            symlink(b"b", b"a/.."),
            file(b"b/owned.txt", b"pwned"),
        ],
    );
    assert!(matches!(r, Err(FetchError::Unsafe(_))), "{r:?}");
    assert!(escaped(&boxed).is_empty(), "{:?}", escaped(&boxed));
    let (r, boxed) = unpack(
        t.path(),
        "mkdir",
        &[
            symlink(b"a", b"."),
            symlink(b"b", b"a/.."),
            file(b"b/newdir/deeper/x", b"pwned"),
        ],
    );
    assert!(matches!(r, Err(FetchError::Unsafe(_))), "{r:?}");
    assert!(escaped(&boxed).is_empty(), "{:?}", escaped(&boxed));
    // A longer chain through a directory: `d/up -> ..` is the root, `x -> d/up/..` is
    // outside.
    let (r, boxed) = unpack(
        t.path(),
        "longer",
        &[
            dir(b"d"),
            symlink(b"d/up", b".."),
            symlink(b"x", b"d/up/../.."),
        ],
    );
    assert!(matches!(r, Err(FetchError::Unsafe(_))), "{r:?}");
    assert!(escaped(&boxed).is_empty());
    // A loop resolves nowhere: refused too.
    let (r, _) = unpack(
        t.path(),
        "loop",
        &[symlink(b"p", b"q"), symlink(b"q", b"p")],
    );
    assert!(matches!(r, Err(FetchError::Unsafe(_))), "{r:?}");
}

/// An entry A is a symlink to a directory (inside or outside), entry B writes through
/// `A/x`: refused either way, nothing is written through a link.
#[test]
fn nothing_is_written_through_a_symlink() {
    let t = tempfile::tempdir().unwrap();
    let outside = t.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let target = format!("../../{}", "outside");
    // Lexically outside: refused at the link already.
    let (r, _) = unpack(
        t.path(),
        "direct",
        &[symlink(b"a", target.as_bytes()), file(b"a/x", b"pwned")],
    );
    assert!(matches!(r, Err(FetchError::Unsafe(_))), "{r:?}");
    assert!(fs::read_dir(&outside).unwrap().next().is_none());
    // Inside, but a write through it is refused all the same.
    let (r, boxed) = unpack(
        t.path(),
        "inside",
        &[
            dir(b"sub"),
            symlink(b"lib", b"sub"),
            file(b"lib/x", b"data"),
        ],
    );
    assert!(matches!(r, Err(FetchError::Unsafe(_))), "{r:?}");
    assert!(escaped(&boxed).is_empty());
    // A symlink, then a file of the same name: the later entry replaces the link and the
    // file lands in the package, not where the link pointed.
    let out = t.path().join("replace/out");
    let ar = t.path().join("replace.tar.gz");
    crafted(
        &ar,
        &[symlink(b"f", b"sub/g"), dir(b"sub"), file(b"f", b"mine")],
    );
    let root = fetch(&PackageSource::TarGz(ar), &out, None).unwrap();
    assert!(!fs::symlink_metadata(root.join("f"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read(root.join("f")).unwrap(), b"mine");
    assert!(!root.join("sub/g").exists());
}

/// Symlinks that stay inside are kept, chains included, and may be dangling.
#[test]
fn symlinks_inside_the_package_are_kept() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("ok/out");
    let ar = t.path().join("ok.tar.gz");
    crafted(
        &ar,
        &[
            dir(b"bin"),
            file(b"bin/tool", b"#!/bin/sh\n"),
            symlink(b"here", b"."),
            symlink(b"tool", b"here/bin/tool"),
            symlink(b"bin/up", b".."),
            symlink(b"bin/self", b"up/bin/tool"),
            symlink(b"later", b"not/yet/there"),
        ],
    );
    let root = fetch(&PackageSource::TarGz(ar), &out, None).unwrap();
    assert_eq!(fs::read(root.join("tool")).unwrap(), b"#!/bin/sh\n");
    assert_eq!(fs::read(root.join("bin/self")).unwrap(), b"#!/bin/sh\n");
    assert_eq!(
        fs::read_link(root.join("later")).unwrap(),
        Path::new("not/yet/there")
    );
}

/// Hard links, character and block devices and FIFOs are refused, whatever they name.
#[test]
fn links_devices_and_fifos_are_refused() {
    let t = tempfile::tempdir().unwrap();
    for (i, kind) in [
        tar::EntryType::Link,
        tar::EntryType::Char,
        tar::EntryType::Block,
        tar::EntryType::Fifo,
    ]
    .into_iter()
    .enumerate()
    {
        let (r, boxed) = unpack(
            t.path(),
            &format!("kind{i}"),
            &[
                file(b"ok.txt", b"fine"),
                Raw {
                    name: b"node",
                    kind,
                    link: Some(b"ok.txt"),
                    data: b"",
                },
            ],
        );
        assert!(matches!(r, Err(FetchError::Unsafe(_))), "{kind:?}: {r:?}");
        assert!(!boxed.join("out").exists(), "{kind:?}: cleaned up");
    }
}

/// A pax global header (what `git archive` writes first) is metadata, not an entry.
#[test]
fn a_pax_global_header_is_skipped() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("pax/out");
    let ar = t.path().join("pax.tar.gz");
    crafted(
        &ar,
        &[
            Raw {
                name: b"pax_global_header",
                kind: tar::EntryType::XGlobalHeader,
                link: None,
                data: b"52 comment=0123456789abcdef0123456789abcdef01234567\n",
            },
            file(b"main.sh", b"echo hi\n"),
        ],
    );
    let root = fetch(&PackageSource::TarGz(ar), &out, None).unwrap();
    assert_eq!(escaped(&root), ["main.sh"]);
}

/// Whether some file descriptor of this process has `path` open for reading (the writer's
/// own descriptors do not count).
fn open_here(path: &Path) -> bool {
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| fs::read_link(e.path()).is_ok_and(|p| p == path))
        .any(|e| {
            let info = fs::read_to_string(Path::new("/proc/self/fdinfo").join(e.file_name()))
                .unwrap_or_default();
            info.lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                .is_some_and(|flags| flags & 0o3 == 0)
        })
}

/// The digest is checked on the very bytes that are unpacked: the archive is read once. A
/// source that gives other bytes on a second read (here a FIFO whose writer sends the good
/// archive to the first reader and a hostile one to whoever opens it after that reader is
/// done) cannot slip the hostile bytes in after the check.
#[test]
fn the_digest_covers_the_bytes_that_are_unpacked() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let t = tempfile::tempdir().unwrap();
    let good_dir = t.path().join("good-src");
    fs::create_dir(&good_dir).unwrap();
    fs::write(good_dir.join("main.sh"), b"echo good\n").unwrap();
    let good = t.path().join("good.tar.gz");
    tar_gz_of(&good_dir, &good);
    let digest = file_digest(&good).unwrap();
    let evil = t.path().join("evil.tar.gz");
    crafted(&evil, &[file(b"main.sh", b"echo evil\n")]);
    let (good, evil) = (fs::read(&good).unwrap(), fs::read(&evil).unwrap());

    let fifo = t.path().join("pkg.tar.gz");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (fifo, done) = (fifo.clone(), done.clone());
        std::thread::spawn(move || {
            // The first reader gets the good archive. Its descriptor is seen before the
            // writer lets go (it cannot reach the end before), so that its close below is its
            // own and not an open still in progress.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let mut first = fs::OpenOptions::new().write(true).open(&fifo).unwrap();
            shoal_devcluster::wait::poll_until(deadline, || open_here(&fifo).then_some(()))
                .unwrap();
            first.write_all(&good).unwrap();
            drop(first);
            // Once that reader has closed it...
            shoal_devcluster::wait::poll_until(deadline, || {
                (done.load(Ordering::SeqCst) || !open_here(&fifo)).then_some(())
            });
            // ... whoever opens it next gets the hostile one (until the fetch is over).
            let again = shoal_devcluster::wait::poll_until(deadline, || {
                if done.load(Ordering::SeqCst) {
                    return Some(None);
                }
                use std::os::unix::fs::OpenOptionsExt;
                // Non-blocking: fails (ENXIO) while no reader is opening the FIFO.
                fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                    .open(&fifo)
                    .ok()
                    .map(Some)
            })
            .flatten();
            if let Some(mut f) = again {
                let _ = f.write_all(&evil);
            }
        })
    };
    let out = t.path().join("out");
    let r = fetch(&PackageSource::TarGz(fifo), &out, Some(&digest));
    done.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let root = r.unwrap();
    assert_eq!(fs::read(root.join("main.sh")).unwrap(), b"echo good\n");
}

/// A directory package's digest is computed over the copy that runs, and files are read
/// without following a symlink swapped in for them.
#[test]
fn dir_digest_is_over_the_copy() {
    let t = tempfile::tempdir().unwrap();
    make_tree(&t.path().join("src"));
    let src = PackageSource::Dir(t.path().join("src"));
    let d = shoal_agent::dir_digest(&t.path().join("src")).unwrap();
    let out = fetch(&src, &t.path().join("a"), Some(&d)).unwrap();
    assert_eq!(shoal_agent::dir_digest(&out).unwrap(), d);
}
