//! Package fetching: directories, archives, digests and hostile archives.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::Write;
use std::path::Path;

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
