//! `shoal://` packages from a real dataworker in this process: put with the SDK, fetched and
//! unpacked by the agent's downloader; a missing id is a clear not-found error at once.
#![allow(clippy::unwrap_used)]

mod support;

use shoal_agent::{Downloader, FetchError, RemoteError, RemoteSource, S3Settings};
use shoal_dataworker::{Config, Dataworker};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};
use support::{digest, garbage, hello_package};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_packages() {
    let tmp = tempfile::tempdir().unwrap();
    let sock_dir = tmp.path().join("dw");
    std::fs::create_dir(&sock_dir).unwrap();
    std::fs::set_permissions(&sock_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cfg = Config::new(&sock_dir);
    cfg.shm_size = 64 << 20;
    let worker = Dataworker::start(cfg, None).await.unwrap();
    let client = shoal_sdk::Client::connect(worker.socket_path())
        .await
        .unwrap();
    let good = hello_package();
    client.put("pkg-hello", &good).await.unwrap();
    client.put("pkg-corrupt", &garbage()).await.unwrap();

    let dl = Downloader::new(worker.socket_path(), S3Settings::default());
    let staged = tmp.path().join("work/.staging");

    // 1. A stored package is read from the dataworker and unpacked, digest checked.
    let src = RemoteSource::object("pkg-hello").unwrap();
    assert_eq!(src.to_string(), "shoal://pkg-hello");
    let root = dl
        .fetch(
            &src,
            &staged,
            &tmp.path().join("work/i-1"),
            Some(&digest(&good)),
        )
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(root.join("run.sh")).unwrap(),
        b"#!/bin/sh\necho hello\nexec sleep 30\n"
    );
    let mode = std::fs::metadata(root.join("run.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    assert_eq!(
        std::fs::read(root.join("lib/data.txt")).unwrap(),
        b"some data\n"
    );
    assert!(
        support::nothing_in(&staged),
        "staged file removed after success"
    );

    // 2. A missing id is "not found", without waiting for it to appear.
    let started = Instant::now();
    let dest = tmp.path().join("work/missing");
    let e = dl
        .fetch(
            &RemoteSource::object("no-such-package").unwrap(),
            &staged,
            &dest,
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, RemoteError::ObjectNotFound { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "object no-such-package not found in the store"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(support::nothing_in(&staged));
    assert!(!dest.exists());

    // 3. Digest mismatch and corrupt archive, as for any archive.
    let e = dl
        .fetch(
            &src,
            &staged,
            &tmp.path().join("work/mismatch"),
            Some(&digest(b"other")),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            RemoteError::Unpack {
                source: FetchError::DigestMismatch { .. },
                ..
            }
        ),
        "{e:?}"
    );
    let e = dl
        .fetch(
            &RemoteSource::object("pkg-corrupt").unwrap(),
            &staged,
            &tmp.path().join("work/corrupt"),
            None,
        )
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
    assert!(support::nothing_in(&staged));

    // 4. No dataworker: an error naming the object, not a hang.
    let nowhere = Downloader::new(tmp.path().join("nothing.sock"), S3Settings::default());
    let e = nowhere
        .fetch(&src, &staged, &tmp.path().join("work/nowhere"), None)
        .await
        .unwrap_err();
    assert!(matches!(e, RemoteError::Dataworker { .. }), "{e:?}");
    assert!(e.to_string().contains("shoal://pkg-hello"), "{e}");
    assert!(support::nothing_in(&staged));

    drop(client);
    worker.shutdown().await;
}
