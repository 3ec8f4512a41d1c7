//! `s3://` packages against a real S3 server (moto on loopback): download, unpack, digest,
//! corrupt archives, missing keys, the size limit, and the staging file's cleanup.
#![allow(clippy::unwrap_used)]

mod support;

use shoal_agent::{Downloader, FetchError, RemoteError, RemoteSource};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use support::{digest, garbage, hello_package, Moto};

fn s3(url: &str) -> RemoteSource {
    RemoteSource::parse_s3(url).unwrap()
}

fn assert_hello(root: &Path) {
    assert_eq!(
        std::fs::read(root.join("run.sh")).unwrap(),
        b"#!/bin/sh\necho hello\nexec sleep 30\n"
    );
    assert_eq!(
        std::fs::read(root.join("lib/data.txt")).unwrap(),
        b"some data\n"
    );
    let mode = std::fs::metadata(root.join("run.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755, "the executable bit is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_packages() {
    let moto = Moto::start();
    moto.create_bucket("pkgs");
    let good = hello_package();
    moto.put("pkgs", "fns/hello.tar.gz", &good);
    moto.put("pkgs", "fns/corrupt.tar.gz", &garbage());

    let tmp = tempfile::tempdir().unwrap();
    let staging = tmp.path().join("work/.staging");
    let staged = staging.clone();
    // No dataworker here: s3:// never touches it.
    let dl = Downloader::new(tmp.path().join("no-dataworker.sock"), moto.settings());

    // 1. A good package with the right digest is downloaded and unpacked.
    let dest = tmp.path().join("work/i-1");
    let root = dl
        .fetch(
            &s3("s3://pkgs/fns/hello.tar.gz"),
            &staged,
            &dest,
            Some(&digest(&good)),
        )
        .await
        .unwrap();
    assert_eq!(root, dest.canonicalize().unwrap());
    assert_hello(&root);
    assert!(
        support::nothing_in(&staged),
        "staged file removed after success"
    );
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0);

    // ... and without a digest as well.
    let root = dl
        .fetch(
            &s3("s3://pkgs/fns/hello.tar.gz"),
            &staged,
            &tmp.path().join("work/i-2"),
            None,
        )
        .await
        .unwrap();
    assert_hello(&root);

    // 2. A missing key is a clear not-found error.
    let dest = tmp.path().join("work/missing");
    let e = dl
        .fetch(&s3("s3://pkgs/fns/missing.tar.gz"), &staged, &dest, None)
        .await
        .unwrap_err();
    assert!(matches!(e, RemoteError::S3NotFound { .. }), "{e:?}");
    assert!(e.is_not_found());
    assert_eq!(
        e.to_string(),
        "s3://pkgs/fns/missing.tar.gz not found (404)"
    );
    assert!(
        support::nothing_in(&staged),
        "staged file removed after a 404"
    );
    assert!(!dest.exists());

    // 3. A digest that does not match refuses the package before unpacking anything.
    let dest = tmp.path().join("work/mismatch");
    let wrong = digest(b"something else");
    let e = dl
        .fetch(
            &s3("s3://pkgs/fns/hello.tar.gz"),
            &staged,
            &dest,
            Some(&wrong),
        )
        .await
        .unwrap_err();
    match &e {
        RemoteError::Unpack {
            what,
            source: FetchError::DigestMismatch { expected, actual },
        } => {
            assert_eq!(what, "s3://pkgs/fns/hello.tar.gz");
            assert_eq!(expected, &wrong);
            assert_eq!(actual, &digest(&good));
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert!(
        support::nothing_in(&staged),
        "staged file removed after a mismatch"
    );
    assert!(!dest.exists());

    // 4. Random bytes are a corrupt archive; nothing is left behind.
    let dest = tmp.path().join("work/corrupt");
    let e = dl
        .fetch(&s3("s3://pkgs/fns/corrupt.tar.gz"), &staged, &dest, None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            RemoteError::Unpack {
                source: FetchError::Corrupt(_),
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        support::nothing_in(&staged),
        "staged file removed after a corrupt archive"
    );
    assert!(!dest.exists());

    // 5. A package above the download limit is refused while downloading.
    let small = dl.clone().with_max_bytes(16);
    let dest = tmp.path().join("work/big");
    let e = small
        .fetch(&s3("s3://pkgs/fns/hello.tar.gz"), &staged, &dest, None)
        .await
        .unwrap_err();
    assert!(
        matches!(e, RemoteError::TooLarge { limit: 16, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("s3://pkgs/fns/hello.tar.gz"), "{e}");
    assert!(support::nothing_in(&staged));
    assert!(!dest.exists());

    // 6. Malformed URLs never reach the network.
    for bad in ["s3://pkgs", "s3:///key", "s3://pkgs/"] {
        let e = RemoteSource::parse_s3(bad).unwrap_err();
        assert!(
            matches!(e, RemoteError::InvalidSource { .. }),
            "{bad}: {e:?}"
        );
        assert!(e.to_string().contains(bad), "{e}");
    }
}

/// TLS goes through rustls with the ring provider and verifies certificates: moto's
/// self-signed one is refused (as a certificate error, not a panic or a plain-text answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_over_tls_verifies_certificates() {
    let moto = Moto::start_tls();
    let tmp = tempfile::tempdir().unwrap();
    let settings = moto.settings();
    assert!(settings
        .endpoint
        .as_deref()
        .unwrap()
        .starts_with("https://"));
    let dl = Downloader::new(tmp.path().join("no-dataworker.sock"), settings);
    let staged = tmp.path().join("staging");
    let e = dl
        .fetch(
            &s3("s3://pkgs/hello.tar.gz"),
            &staged,
            &tmp.path().join("dest"),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, RemoteError::S3 { .. }), "{e:?}");
    let debug = format!("{e:?}");
    assert!(debug.contains("UnknownIssuer"), "{debug}");
    assert!(support::nothing_in(&staged));
}
