//! The embedded store's files under crashes, damage and a hostile neighbour in the
//! directory: a torn log tail is cut off, any other damage is refused, the files stay bounded
//! and private, a mutation writes one record (not the whole store), and links planted where
//! the store writes are refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_meta::{decode_store, MemStore, MemStoreOptions, MetaError, MetaStore, StoreFileError};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// No compaction unless asked for.
fn no_compaction() -> MemStoreOptions {
    MemStoreOptions {
        log_min_bytes: u64::MAX,
        ..MemStoreOptions::default()
    }
}

fn log_of(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".log");
    PathBuf::from(s)
}

fn open(path: &Path) -> MemStore {
    MemStore::open_with(Some(path), "", no_compaction()).unwrap()
}

fn refused(path: &Path) -> String {
    let err = MemStore::open_with(Some(path), "", no_compaction())
        .expect_err("damaged files must be refused");
    assert!(matches!(err, MetaError::Backend(_)), "{err}");
    err.to_string()
}

async fn keys(s: &MemStore) -> Vec<String> {
    s.range("")
        .await
        .unwrap()
        .0
        .into_iter()
        .map(|kv| kv.key)
        .collect()
}

fn log_len(path: &Path) -> u64 {
    std::fs::metadata(log_of(path)).unwrap().len()
}

/// A store with keys k1..=k5 (one record each, revisions 1..=5) and no compaction; returns
/// the log's length before and after the last record. The store is dropped without `close`
/// (as by a crash: `close` would compact).
async fn five_records(path: &Path) -> (u64, u64) {
    let s = open(path);
    for i in 1..=4 {
        s.put(&format!("k{i}"), vec![i as u8; 40], None)
            .await
            .unwrap();
    }
    let before = s.file_sizes().1;
    s.put("k5", vec![5; 40], None).await.unwrap();
    let after = s.file_sizes().1;
    assert_eq!(after, log_len(path));
    (before, after)
}

#[tokio::test]
async fn a_torn_tail_is_cut_off_and_the_store_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    let (before, after) = five_records(&path).await;
    let full = std::fs::read(log_of(&path)).unwrap();
    // A crash anywhere in the last append: the file holds a prefix of its record.
    for cut in before..after {
        std::fs::write(log_of(&path), &full[..cut as usize]).unwrap();
        let s = open(&path);
        assert_eq!(s.revision(), 4, "cut at {cut}");
        assert_eq!(keys(&s).await, ["k1", "k2", "k3", "k4"]);
        assert_eq!(log_len(&path), before, "the torn bytes are cut off");
        // The store goes on from there, and what it writes next survives a restart.
        assert_eq!(s.put("k6", vec![6], None).await.unwrap(), 5);
        drop(s);
        let s = open(&path);
        assert_eq!(keys(&s).await, ["k1", "k2", "k3", "k4", "k6"]);
    }
}

#[tokio::test]
async fn a_zero_filled_tail_is_an_interrupted_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    let (before, after) = five_records(&path).await;
    let full = std::fs::read(log_of(&path)).unwrap();
    // The file's size reached the disk but not the record's data.
    let mut zeroed = full.clone();
    zeroed[before as usize..].fill(0);
    std::fs::write(log_of(&path), &zeroed).unwrap();
    let s = open(&path);
    assert_eq!(s.revision(), 4);
    assert_eq!(log_len(&path), before);
    drop(s);
    // The size grew by a page of zeros after an intact record.
    let mut grown = full.clone();
    grown.extend_from_slice(&[0; 4096]);
    std::fs::write(log_of(&path), &grown).unwrap();
    let s = open(&path);
    assert_eq!(s.revision(), 5);
    assert_eq!(log_len(&path), after);
    assert!(after > before);
}

#[tokio::test]
async fn a_bit_flip_anywhere_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    let (before, _) = five_records(&path).await;
    let log = log_of(&path);
    let good = std::fs::read(&log).unwrap();
    // Every byte of the log: in the header, in a middle record (intact records follow: a
    // committed record would be lost), in the last record (no trace of an interrupted write).
    for at in 0..good.len() {
        let mut bad = good.clone();
        bad[at] ^= 0x10;
        std::fs::write(&log, &bad).unwrap();
        let msg = refused(&path);
        assert!(
            msg.contains(&log.display().to_string()),
            "names the log: {msg}"
        );
        let what = match at {
            0..9 => "magic",
            9..27 => "checksum",
            _ => "corrupt",
        };
        assert!(msg.contains(what), "flip at {at}: {msg}");
        assert_eq!(
            std::fs::read(&log).unwrap(),
            bad,
            "a refused store is left as it is"
        );
    }
    // The snapshot too.
    std::fs::write(&log, &good).unwrap();
    let snap = std::fs::read(&path).unwrap();
    for at in 0..snap.len() {
        let mut bad = snap.clone();
        bad[at] ^= 0x01;
        std::fs::write(&path, &bad).unwrap();
        let msg = refused(&path);
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(!msg.contains("meta.db.log"), "names the snapshot: {msg}");
    }
    std::fs::write(&path, &snap).unwrap();
    let s = open(&path);
    assert_eq!(s.revision(), 5);
    assert!(before > 0);
}

#[tokio::test]
async fn a_mutation_appends_one_record_and_leaves_the_snapshot_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    let s = open(&path);
    for i in 0..2000 {
        s.put(&format!("key/{i:05}"), vec![7; 64], None)
            .await
            .unwrap();
    }
    s.compact().unwrap();
    let snap = std::fs::metadata(&path).unwrap();
    assert!(snap.len() > 100_000, "a store worth not rewriting");
    let log_before = log_len(&path);
    for i in 0..10 {
        s.put(&format!("key/{i:05}"), vec![8; 64], None)
            .await
            .unwrap();
    }
    s.delete("key/01999").await.unwrap();
    let after = std::fs::metadata(&path).unwrap();
    assert_eq!(
        (after.ino(), after.len(), after.mtime_nsec()),
        (snap.ino(), snap.len(), snap.mtime_nsec()),
        "the snapshot is not rewritten per mutation"
    );
    let grown = log_len(&path) - log_before;
    assert!(grown < 11 * 200, "eleven small records, {grown} bytes");
    drop(s);
    let s = open(&path);
    assert_eq!(
        s.get("key/00003").await.unwrap().unwrap().value,
        vec![8; 64]
    );
    assert_eq!(s.get("key/01999").await.unwrap(), None);
    assert_eq!(s.range("").await.unwrap().0.len(), 1999);
}

#[tokio::test]
async fn many_mutations_keep_the_files_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    let opts = MemStoreOptions {
        log_min_bytes: 16 << 10,
        log_ratio: 2,
        ..MemStoreOptions::default()
    };
    let s = MemStore::open_with(Some(&path), "", opts.clone()).unwrap();
    let lease = s.grant(Duration::from_secs(600)).await.unwrap();
    let mut largest = (0, 0);
    for i in 0..5000u32 {
        let key = format!("k{}", i % 10);
        let lease = (i % 3 == 0).then_some(lease);
        s.put(&key, i.to_le_bytes().repeat(50), lease)
            .await
            .unwrap();
        if i % 7 == 0 {
            s.delete(&key).await.unwrap();
        }
        let (snap, log) = s.file_sizes();
        assert_eq!(log, log_len(&path));
        // At most the bound plus the record that crossed it.
        assert!(
            log <= opts.log_min_bytes.max(2 * snap) + 1024,
            "log {log} bytes, snapshot {snap}"
        );
        largest = (largest.0.max(snap), largest.1.max(log));
    }
    assert!(largest.1 < 20 << 10, "{largest:?}");
    assert!(largest.0 < 4 << 10, "{largest:?}");
    let want = s.range("").await.unwrap().0;
    let rev = s.revision();
    drop(s);
    let s = MemStore::open_with(Some(&path), "", opts).unwrap();
    assert_eq!(s.range("").await.unwrap().0, want);
    assert_eq!(s.revision(), rev);
    assert_eq!(s.keep_alive(lease).await.unwrap(), Duration::from_secs(600));
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn the_files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    let s = open(&path);
    s.put("a", vec![1], None).await.unwrap();
    assert_eq!((mode(&path), mode(&log_of(&path))), (0o600, 0o600));
    s.compact().unwrap();
    assert_eq!((mode(&path), mode(&log_of(&path))), (0o600, 0o600));
    drop(s);
    // Files left readable by others (as earlier versions wrote them) are narrowed.
    for p in [&path, &log_of(&path)] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let s = open(&path);
    assert_eq!((mode(&path), mode(&log_of(&path))), (0o600, 0o600));
    assert_eq!(keys(&s).await, ["a"]);
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "no temporary file left behind: {names:?}");
}

#[tokio::test]
async fn links_planted_where_the_store_writes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let victim_mode = mode(&victim);
    let s = open(&path);
    s.put("a", vec![1], None).await.unwrap();
    for tmp in ["meta.db.tmp", "meta.db.log.tmp"] {
        let link = dir.path().join(tmp);
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let err = s.compact().unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{tmp}: {err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(mode(&victim), victim_mode);
        // The store keeps working through its log.
        s.put("a", vec![2], None).await.unwrap();
        std::fs::remove_file(&link).unwrap();
    }
    s.compact().unwrap();
    drop(s);
    assert_eq!(open(&path).get("a").await.unwrap().unwrap().value, [2]);

    // A link in place of the snapshot or the log is not followed either.
    let elsewhere = tempfile::tempdir().unwrap();
    for (name, target) in [("meta.db", "snap"), ("meta.db.log", "log")] {
        let real = dir.path().join(name);
        let moved = elsewhere.path().join(target);
        std::fs::rename(&real, &moved).unwrap();
        std::os::unix::fs::symlink(&moved, &real).unwrap();
        let msg = refused(&path);
        assert!(msg.contains("symbolic link"), "{name}: {msg}");
        std::fs::remove_file(&real).unwrap();
        std::fs::rename(&moved, &real).unwrap();
    }
    open(&path);
}

#[tokio::test]
async fn a_log_left_by_an_interrupted_compaction_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    let s = open(&path);
    let lease = s.grant(Duration::from_secs(60)).await.unwrap();
    s.put("a", vec![1], Some(lease)).await.unwrap();
    s.put("b", vec![2], None).await.unwrap();
    s.delete("b").await.unwrap();
    let old_log = std::fs::read(log_of(&path)).unwrap();
    // The crash came after the new snapshot's rename and before the new log's.
    s.compact().unwrap();
    drop(s);
    std::fs::write(log_of(&path), &old_log).unwrap();
    let s = open(&path);
    assert_eq!(s.revision(), 3);
    assert_eq!(keys(&s).await, ["a"]);
    // Records appended after it continue its sequence.
    s.put("c", vec![3], None).await.unwrap();
    drop(s);
    let s = open(&path);
    assert_eq!(keys(&s).await, ["a", "c"]);
    s.revoke(lease).await.unwrap();
    assert_eq!(keys(&s).await, ["c"]);
    s.compact().unwrap();
    s.put("d", vec![4], None).await.unwrap();
    let snap_then = std::fs::read(&path).unwrap();
    drop(s);

    // A log that starts after the snapshot: records in between are missing.
    let other = tempfile::tempdir().unwrap();
    let p2 = other.path().join("meta.db");
    let s2 = open(&p2);
    s2.put("x", vec![0], None).await.unwrap();
    drop(s2);
    let stale_snapshot = std::fs::read(&p2).unwrap();
    std::fs::write(&path, &stale_snapshot).unwrap();
    let msg = refused(&path);
    assert!(msg.contains("not from the same store"), "{msg}");
    std::fs::write(&path, &snap_then).unwrap();
    assert_eq!(keys(&open(&path)).await, ["c", "d"]);
}

#[tokio::test]
async fn a_log_without_its_snapshot_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    let s = open(&path);
    s.put("a", vec![1], None).await.unwrap();
    drop(s);
    std::fs::remove_file(&path).unwrap();
    let msg = refused(&path);
    assert!(msg.contains("missing but its log"), "{msg}");
}

#[tokio::test]
async fn decode_store_reports_what_it_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    let (before, after) = five_records(&path).await;
    let snap = std::fs::read(&path).unwrap();
    let log = std::fs::read(log_of(&path)).unwrap();
    let image = decode_store(&snap, Some(&log)).unwrap();
    assert_eq!((image.revision(), image.keys(), image.seq()), (5, 5, 5));
    assert_eq!(image.torn_bytes(), 0);
    let image = decode_store(&snap, Some(&log[..after as usize - 1])).unwrap();
    assert_eq!(
        (image.revision(), image.torn_bytes()),
        (4, after - before - 1)
    );
    let image = decode_store(&snap, None).unwrap();
    assert_eq!(image.revision(), 0);
    assert!(matches!(
        decode_store(&log, None),
        Err(StoreFileError::BadMagic { .. })
    ));
}

mod damage {
    use super::*;
    use proptest::prelude::*;

    /// Real files of a small store, built once.
    fn files() -> &'static (Vec<u8>, Vec<u8>) {
        static FILES: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
        FILES.get_or_init(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("meta.db");
                let s = open(&path);
                let lease = s.grant(Duration::from_secs(60)).await.unwrap();
                for i in 0..6u8 {
                    let l = (i % 2 == 0).then_some(lease);
                    s.put(&format!("k{}", i % 4), vec![i; 30], l).await.unwrap();
                }
                s.delete("k1").await.unwrap();
                s.revoke(lease).await.unwrap();
                drop(s);
                (
                    std::fs::read(&path).unwrap(),
                    std::fs::read(log_of(&path)).unwrap(),
                )
            })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any damage to the log gives an error or a prefix of the history, never a panic or
        /// a store ahead of what was written.
        #[test]
        fn damaged_logs_never_panic(cut in 0usize..2000, flips in prop::collection::vec((0usize..2000, 1u8..=255), 0..4)) {
            let (snap, log) = files();
            let mut bad = log.clone();
            for (at, x) in flips {
                let at = at % bad.len();
                bad[at] ^= x;
            }
            bad.truncate(cut.min(bad.len()));
            if let Ok(image) = decode_store(snap, Some(&bad)) {
                prop_assert!(image.revision() <= decode_store(snap, Some(log)).unwrap().revision());
            }
        }
    }
}
